#!/usr/bin/env python
"""HVPs per test image to reach a relative residual, cg vs pcg (EK-FAC preconditioned) vs LiSSA:
``python benchmarks/pcg.py [--quick]``.

The demo CNN (:func:`influence.demo.build_model`, trained by :func:`influence.demo.train_model` on
the bundled digits as the demo does, in memory: no ``make demo`` needed). For ``T`` held-out
digits ``v = ∇L(z_t)`` and ``A = H + λI`` over the whole training set:

* cg:  iterations to ``‖v − A x‖ ≤ tol·‖v‖`` (one whole-set HVP each);
* pcg: the same stopping rule, started from the EK-FAC solution: iterations + 1 HVPs (the start's
  residual); also from zero (iterations only), and the EK-FAC fit (two passes of forward +
  backward over the training set, no HVPs) in seconds;
* LiSSA (scale auto, minibatch ``b``): the relative residual of ``h_j / s`` at checkpoints, against
  the HVP work in whole-set equivalents ``j·b/n`` (the residual itself is measured with one extra
  whole-set HVP per checkpoint, not counted).

Prints a table; ``--json PATH`` writes the numbers. Timings are wall-clock on this machine.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402


def say(msg):
    print(msg, flush=True)


def build(n_train, epochs, seed):
    """The demo CNN trained on ``n_train`` digits; returns (classifier, objective, held-out x, y)."""
    from influence.experiments import demo
    from influence.model.derivatives import Derivatives
    from influence.model.objective import TrainingObjective
    from influence.model.models import Classifier, make_preprocess, select_params
    from influence.experiments.arrays import ArrayArchive, digit_arrays

    x, y, xh, yh = digit_arrays(demo.SIZE, 3, n_train, seed, resample="bilinear")
    model, seconds = demo.train_model(x, y, epochs=epochs, seed=seed)
    clf = Classifier(model, make_preprocess("unit"), select_params(model, "all"), "demo cnn")
    d = Derivatives(clf, (demo.SIZE, demo.SIZE, 3))
    say(f"demo CNN: {clf.num_params} parameters, trained on {n_train} digits for {epochs} epochs in {seconds:.0f} s")
    return clf, TrainingObjective(d, ArrayArchive(x, y), chunk=256), xh, yh


def residual(solver, v, x):
    """‖v − (H + λI) x‖ / ‖v‖ (one whole-set HVP)."""
    from influence.model.vectors import vec_axpy, vec_norm

    return vec_norm(vec_axpy(-1.0, solver.apply(x), v)) / vec_norm(v)


def lissa_curve(objective, damping, v, batch, checkpoints, seed):
    """LiSSA's relative residual at each checkpoint depth; returns [(depth, whole-set HVPs, residual)]."""
    from influence.curvature import make_solver
    from influence.model.vectors import vec_scale

    solver = make_solver("lissa", objective, damping, iter=max(checkpoints), bsize=batch, seed=seed, progress=False)
    solver.fit()
    rng = np.random.default_rng(seed)
    h = tuple(v)
    out = []
    import tensorflow as tf

    dtype = objective.d.dtype
    inv_s, keep = tf.constant(1.0 / solver.scale, dtype), tf.constant(1.0 - damping / solver.scale, dtype)
    n = objective.n
    for j in range(1, max(checkpoints) + 1):
        x, y = objective.archive.take(np.sort(rng.integers(0, n, batch)))
        h, _ = solver.step(x, y.astype(np.int64), v, h, inv_s, keep)
        if j in checkpoints:
            est = vec_scale(1.0 / solver.scale, h)
            out.append((j, j * batch / n, residual(solver, v, est)))
    return out, solver.scale


def bench_damping(obj, vs, lam, args, ekfac_state):
    """cg, pcg (and LiSSA) at one damping; returns a dict (``negative_curvature`` when cg meets it)."""
    from influence.curvature import make_solver
    from influence.curvature.iterative.lockstep import lockstep_pcg
    from influence.errors import UserError

    tol = args.tol
    out = dict(damping=lam)
    t0 = time.perf_counter()
    cg = make_solver("cg", obj, lam, cg_tol=tol, cg_maxiter=args.maxiter, progress=False)
    try:
        cg_x = cg.solve(vs)
    except UserError as exc:
        out["negative_curvature"] = str(exc)
        say(f"λ = {lam:g}: {exc}")
        return out
    cg_s = time.perf_counter() - t0
    out["cg"] = dict(hvps=cg.info["iterations"], seconds=cg_s, residuals=[residual(cg, v, x) for v, x in zip(vs, cg_x)])
    pcg = make_solver("pcg", obj, lam, cg_tol=tol, cg_maxiter=args.maxiter, fisher=args.fisher, seed=args.seed,
                      memory_budget=None, progress=False)
    pcg.load_state(ekfac_state)
    t0 = time.perf_counter()
    pcg_x = pcg.solve(vs)
    pcg_s = time.perf_counter() - t0
    zero = lockstep_pcg(pcg.apply_many, vs, tol=tol, maxiter=args.maxiter, precondition=pcg.ekfac.precondition)
    ek = pcg.ekfac.solve(vs)
    out["pcg"] = dict(hvps=pcg.info["hvps"], seconds=pcg_s, residuals=[residual(cg, v, x) for v, x in zip(vs, pcg_x)],
                      hvps_zero_start=[r[1] for r in zero],
                      ekfac_alone_residual=[residual(cg, v, x) for v, x in zip(vs, ek)])
    out["ratio"] = float(np.mean(out["pcg"]["hvps"]) / np.mean(out["cg"]["hvps"]))
    say(f"λ = {lam:g}, tol = {tol:g}:")
    say(f"  cg : whole-set HVPs per test image {out['cg']['hvps']} (mean {np.mean(out['cg']['hvps']):.1f}), "
        f"{cg_s:.1f} s")
    say(f"  pcg: whole-set HVPs per test image {out['pcg']['hvps']} (mean {np.mean(out['pcg']['hvps']):.1f}; from zero "
        f"{out['pcg']['hvps_zero_start']}), {pcg_s:.1f} s")
    say(f"  pcg / cg HVPs = {out['ratio']:.3f} (goal <= 1/3: {'met' if out['ratio'] <= 1 / 3 else 'MISSED'})")
    say("  EK-FAC alone: relative residual "
        + np.array2string(np.array(out["pcg"]["ekfac_alone_residual"]), precision=3))
    if not args.no_lissa:
        budget = 4 * max(out["cg"]["hvps"])      # whole-set HVPs: up to 4x what cg needed
        last = max(1, int(budget * obj.n / args.lissa_batch))
        checkpoints = sorted({max(1, int(last * f)) for f in (0.05, 0.1, 0.25, 0.5, 1.0)})
        curves = []
        for v in vs[:args.lissa_tests]:
            curve, scale = lissa_curve(obj, lam, v, args.lissa_batch, checkpoints, args.seed)
            curves.append(curve)
            pts = ", ".join(f"{hv:.1f} HVPs -> {r:.2e}" for _, hv, r in curve)
            say(f"  lissa (b={args.lissa_batch}, s={scale:.3g}): {pts}")
        out["lissa"] = dict(batch=args.lissa_batch, scale=scale, curves=curves)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="500 training images, 8 epochs, 2 test images")
    p.add_argument("--train", type=int, default=None, help="training images (default 1500, as the demo)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 30, as the demo)")
    p.add_argument("--tests", type=int, default=None, help="test images (default 5)")
    p.add_argument("--damping", default="0.01,0.03,0.1",
                   help="comma-separated λ values (default 0.01,0.03,0.1; 0.01 is calculate.py's default)")
    p.add_argument("--tol", type=float, default=1e-4, help="relative residual to reach (default 1e-4)")
    p.add_argument("--maxiter", type=int, default=1000)
    p.add_argument("--lissa-batch", type=int, default=32, help="LiSSA minibatch (default 32, as the demo)")
    p.add_argument("--lissa-tests", type=int, default=1, help="test images LiSSA runs on (default 1)")
    p.add_argument("--no-lissa", action="store_true")
    p.add_argument("--fisher", default="sampled", choices=("sampled", "true", "empirical"),
                   help="Fisher of the EK-FAC preconditioner (default sampled)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the numbers here")
    args = p.parse_args(argv)
    n_train = args.train or (500 if args.quick else 1500)
    epochs = args.epochs or (8 if args.quick else 30)
    tests = args.tests or (2 if args.quick else 5)

    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from influence.curvature import make_solver

    clf, obj, xh, yh = build(n_train, epochs, args.seed)
    d = obj.d
    vs = [d.gradient(xh[k:k + 1], yh[k:k + 1].astype(np.int64)) for k in range(tests)]
    t0 = time.perf_counter()
    ekfac = make_solver("ekfac", obj, 0.0, fisher=args.fisher, seed=args.seed, memory_budget=None, progress=False)
    ekfac.fit()
    fit_s = time.perf_counter() - t0
    hvp_s = min(timed(lambda: obj.hvp_full(vs[0])) for _ in range(3))
    say(f"{tests} test images, n = {n_train}, {clf.num_params} parameters; EK-FAC fit {fit_s:.1f} s "
        f"(two passes), one whole-set HVP {hvp_s:.2f} s")
    report = dict(n_train=n_train, epochs=epochs, tests=tests, tol=args.tol, params=clf.num_params,
                  ekfac_fit_seconds=fit_s, hvp_seconds=hvp_s, runs=[])
    for lam in (float(s) for s in args.damping.split(",") if s.strip()):
        report["runs"].append(bench_damping(obj, vs, lam, args, ekfac.state()))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=float))
    return 0


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    sys.exit(main())
