"""Leave-one-out check of the scores (Koh & Liang 2017, Figure 2): ``python -m influence.validate``.

For a few held-out digits ("test images") we score every training image, take the ``--top`` most
influential ones (largest ``|score|``) plus ``--random`` others, retrain without each of them, and
compare the *predicted* change of the test loss with the *actual* one.

Sign and scale (docs/DESIGN.md): ``score(i, t) = ∇L(z_t)ᵀ (H + λI)⁻¹ ∇L(z_i)``, so removing ``z_i``
changes the loss of test image ``t`` by about ``+score / n``. That is the first-order change when the
image's weight in ``R(θ) = (1/n) Σ_j L(z_j) + Ω(θ)`` goes from ``1/n`` to ``0`` (upweighting by
``ε = −1/n``). The retraining here uses exactly that objective, ``(1/n) Σ_{j≠i} L(z_j) + Ω``. A mean
over the ``n − 1`` remaining images would also weaken ``Ω`` relative to the data by ``(n−1)/n``; at a
regularised optimum that moves every retrained model the same way and adds (to first order) the
same ``s_tᵀ∇Ω(θ̂)/(n−1)`` (``s_t = (H+λI)⁻¹∇L(z_t)``) to every actual change of test image ``t``. It
is logged, not mixed in.

Panels (``--panels``):

* ``convex`` -- softmax regression (Flatten → Dense(10) logits, float64, L2 on kernel and bias; the
  bias term is regularised too, so that the softmax's shift invariance leaves no flat direction) on
  the 8×8 digits, fitted to its optimum by Newton's method, scored with ``--solver exact``, retrained
  without each image to the optimum by Newton iterations from a warm start;
* ``lissa`` -- the same model and retrained optima, scored with LiSSA (scale auto);
* ``ekfac`` -- the convex model and retrained optima, scored with ``--solver ekfac`` (``--ekfac-fisher``,
  default sampled; λ = 0: the L2 on kernel and bias keeps it invertible); also compared with the exact scores
  (Pearson over every training image and test image);
* ``cnn`` -- the small CNN of :mod:`influence.demo` (float32), trained with its own recipe; the
  "retraining" is a fixed recipe from the trained weights (``K`` full-batch gradient steps with step
  ``η = 1/λ_max``) and the actual change is measured against the SAME recipe on the full training set,
  so whatever the recipe does anyway (the trained CNN is not at an optimum) cancels. ``K`` gradient
  steps move a direction of curvature ``h`` by ``(1 − (1 − ηh)^K)/h`` instead of ``1/h``, which is
  capped at ``ηK``: the recipe cannot follow curvature below about ``1/(ηK)``, which acts like a
  damping. ``--cnn-damping auto`` uses exactly ``λ = 1/(ηK) = λ_max/K``;
* ``cnn-ekfac`` -- the same CNN, recipe and damping, scored with ``--solver ekfac``; compared with the
  cg scores too when the ``cnn`` panel runs alongside.

Test images are the held-out digits with the largest loss under the trained model (where the
question "which training images did this" is asked; their gradients are large enough for the
actual changes to stand out of the arithmetic noise).

The command prints one line per panel (Pearson, Spearman, settings, seconds) and writes a scatter
figure (predicted on x, actual on y, the diagonal, r in the title). Exit code 1 when a panel misses
its goal (convex 0.99, lissa 0.95, cnn 0.86, ekfac 0.93 and 0.88 against the exact scores; cnn-ekfac
has none: EK-FAC on a CNN is reported, not promised).

``mislabel`` (not in the default set; ``--panels mislabel``), after Koh & Liang Fig. 6: flip the
labels of 10 % of the demo's 1500 training digits (seeded; each to another class drawn uniformly),
train the demo CNN on them with the demo's recipe, then check the training images in the order of
self-influence (the default solver's choice, krylov, and ekfac beside it; ``--mislabel-damping``,
default auto as calculate.py), of training loss, and at random. Its figure (fraction of the flipped
images found against the fraction of the training set checked) goes to ``--mislabel-out``. Goal: at
10 % checked, self-influence finds at least as many as the loss ranking and at least 3x random
(random finds 10 % on average).

``lds`` (not in the default set; ``--panels lds``): the linear datamodeling score of every solver against the
demo CNN retrained on random half-subsets (``--lds-subsets``, ``--lds-seeds``, cached in ``--lds-cache``);
all of it lives in :mod:`influence.experiments.lds`. Reported, not promised.
"""
import argparse
import logging
import math
import sys
import time

import numpy as np

from influence.experiments import lds, lds_models
from influence.experiments.mislabel import CHECKED, MislabelResult, plot_mislabel, run_mislabel_panel
from influence.experiments.panels import PanelResult, ekfac_panel, plot, run_panel
from influence.experiments.problems import CNNProblem, ConvexProblem

log = logging.getLogger(__name__)

PANELS = ("convex", "lissa", "cnn", "ekfac", "cnn-ekfac", "mislabel", "lds")
DEFAULT_PANELS = "convex,lissa,cnn,ekfac"


def build_parser():
    """The parser of ``python -m influence.validate`` (its help text is this module's docstring)."""
    from influence.cli import Parser

    p = Parser(prog="python -m influence.validate", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--panels", default=DEFAULT_PANELS,
                   help=f"comma-separated: {', '.join(PANELS)} (default {DEFAULT_PANELS})")
    p.add_argument("--tests", type=int, default=None, help="test images per panel (default 3; quick 2)")
    p.add_argument("--top", type=int, default=None, help="most influential removals per test image (default 10)")
    p.add_argument("--random", type=int, default=None, help="random removals per test image (default 5)")
    p.add_argument("--out", default="validate.png", help="figure file (default validate.png)")
    p.add_argument("--quick", action="store_true", help="fewer images and steps (a fast look)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lissa-depth", type=int, default=None, help="LiSSA depth (default 3000; quick 1500)")
    p.add_argument("--lissa-batch", type=int, default=100, help="LiSSA minibatch (default 100)")
    p.add_argument("--cnn-train", type=int, default=None, help="CNN training images (default 500; quick 300)")
    p.add_argument("--cnn-steps", type=int, default=30, help="full-batch steps of the CNN retraining recipe")
    p.add_argument("--cnn-damping", default="auto", help="damping for the CNN: a number or auto (= λ_max/steps)")
    p.add_argument("--mislabel-damping", default="auto",
                   help="damping of the mislabel panel's solvers: a number, auto or a factor like 0.3x "
                        "(default auto, as calculate.py)")
    p.add_argument("--mislabel-out", default=None,
                   help="figure of the mislabel panel (default: --out with _mislabel before the extension)")
    p.add_argument("--ekfac-fisher", default="sampled", choices=("sampled", "true", "empirical"),
                   help="Fisher of the ekfac panels (default sampled, as calculate.py)")
    p.add_argument("--lds-subsets", type=int, default=None, help="lds: random half-subsets (default 64; quick 6)")
    p.add_argument("--lds-seeds", type=int, default=2, help="lds: retraining seeds per subset (default 2)")
    p.add_argument("--lds-cache", default=None, help="lds: folder of the retraining cache (default lds_cache)")
    p.add_argument("--lds-folders", default="orig", help="lds: demo test folders scored (default orig)")
    p.add_argument("--no-lds-dense", action="store_true",
                   help="lds: skip the dense float64 Gauss-Newton reference rows (a few minutes on the demo CNN)")
    p.add_argument("--lds-model", default="demo", choices=tuple(lds_models.MODELS),
                   help="lds: the model retrained: demo (the demo CNN, confident), bn (BatchNorm CNN with a final "
                        "softmax, 8 epochs, less confident), mlp (a ReLU MLP with L2, 7 562 parameters), and the "
                        "briefly trained mlp-brief (39 k parameters, 329 steps), bn-brief (7 k, 480 steps) and wide "
                        "(659 k, 329 steps); each has its own cache under --lds-cache (influence/experiments/"
                        "lds_models.py MODELS)")
    p.add_argument("--lds-solvers", default="panel", choices=tuple(lds.SOLVER_SETS),
                   help="lds: the solver rows: panel (the default: the solvers and ranks of the README's tables), "
                        "grid (the default solver, krylov at damping 0.1x/1x/3x/10x/30x/optimizer and ekfac at "
                        "0.1x/1x/optimizer, sharing one curvature cache, so each fit is paid once), or store (the "
                        "gradient store at D 1024 and 4096, damping 0.1x/1x/10x/optimizer, sharing one cache)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def validate(args):
    """Run the chosen panels (``args`` from :func:`build_parser`); returns their results in order: a
    :class:`~influence.experiments.panels.PanelResult` per leave-one-out panel, a
    :class:`~influence.experiments.mislabel.MislabelResult` for ``mislabel``, lds's result for ``lds``."""
    from influence.errors import UserError
    from influence.curvature import make_solver

    panels = [p.strip() for p in args.panels.split(",") if p.strip()]
    bad = [p for p in panels if p not in PANELS]
    if bad or not panels:
        raise UserError(f"--panels: unknown {', '.join(bad) or '(none)'}; choose from {', '.join(PANELS)}")
    quick = args.quick
    tests = args.tests if args.tests is not None else (2 if quick else 3)
    top = args.top if args.top is not None else (8 if quick else 10)
    rand = args.random if args.random is not None else (4 if quick else 5)
    if tests < 1 or top < 0 or rand < 0 or top + rand < 2:
        raise UserError("--tests must be >= 1 and --top + --random >= 2")
    results = []
    convex = None
    if "convex" in panels or "lissa" in panels or "ekfac" in panels:
        convex = ConvexProblem(tests=tests, seed=args.seed)
    if "convex" in panels:
        solver = make_solver("exact", convex.objective, 0.0, progress=False)
        res = run_panel("convex", convex, solver, top, rand, args.seed,
                        settings=f"exact, λ=0, n={convex.n}")
        log.info("convex: exact solver λ_min %.3g, λ_max %.3g", solver.info["lambda_min"], solver.info["lambda_max"])
        results.append(res)
    if "lissa" in panels:
        depth = args.lissa_depth or (1500 if quick else 3000)
        solver = make_solver("lissa", convex.objective, 0.0, iter=depth, bsize=args.lissa_batch, seed=args.seed,
                             progress=False)
        res = run_panel("lissa", convex, solver, top, rand, args.seed,
                        settings=f"lissa T={depth} b={args.lissa_batch} s={solver.scale:.3g}, λ=0")
        results.append(res)
    if "ekfac" in panels:
        results.append(ekfac_panel("ekfac", convex, 0.0, top, rand, args.seed, args.ekfac_fisher,
                                    reference=("exact", make_solver("exact", convex.objective, 0.0, progress=False))))
    cg_scores = None
    if "cnn" in panels or "cnn-ekfac" in panels:
        n_train = args.cnn_train or (300 if quick else 500)
        steps = args.cnn_steps
        cnn = CNNProblem(n_train=n_train, epochs=15 if quick else 30, steps=steps, tests=tests, seed=args.seed)
        if str(args.cnn_damping).lower() == "auto":
            damping = cnn.lambda_max / steps
        else:
            try:
                damping = float(args.cnn_damping)
            except ValueError:
                raise UserError(f"--cnn-damping must be a number or auto, got {args.cnn_damping!r}") from None
    if "cnn" in panels:
        solver = make_solver("cg", cnn.objective, damping, cg_tol=1e-5, progress=False)
        start = time.perf_counter()
        cg_scores = cnn.scores(solver)     # kept for the cnn-ekfac panel's comparison
        scoring = time.perf_counter() - start
        res = run_panel("cnn", cnn, solver, top, rand, args.seed,
                        settings=f"cg λ={damping:.3g}, n={cnn.n}, {steps} GD steps", scored=cg_scores)
        res.seconds += scoring
        log.info("cnn: cg iterations %s; recipe noise %.2g vs median |actual| %.2g", solver.info["iterations"],
                 float(cnn.noise.max()), float(np.median(np.abs(res.actual))))
        results.append(res)
    if "cnn-ekfac" in panels:
        results.append(ekfac_panel("cnn-ekfac", cnn, damping, top, rand, args.seed, args.ekfac_fisher,
                                    reference=("cg", cg_scores) if cg_scores is not None else None,
                                    settings=f", {steps} GD steps"))
    if "mislabel" in panels:
        from influence.curvature.damping import parse_damping

        try:
            parse_damping(args.mislabel_damping)
        except UserError as exc:
            raise UserError(f"--mislabel-damping: {exc}") from None
        n_train, epochs = (500, 8) if quick else (1500, 30)     # the demo's own (--quick) recipe
        results.append(run_mislabel_panel(n_train=n_train, epochs=epochs, damping=args.mislabel_damping,
                                          seed=args.seed))
    if "lds" in panels:     # influence/experiments/lds.py: LDS of every solver against retrained subsets
        results.append(lds.run_from_args(args))
    return results


def mislabel_path(args):
    """Where the mislabel figure goes: ``--mislabel-out``, else ``--out`` with ``_mislabel`` added."""
    if args.mislabel_out:
        return args.mislabel_out
    from pathlib import Path

    out = Path(args.out)
    return str(out.with_name(f"{out.stem}_mislabel{out.suffix or '.png'}"))


def _job(args):
    """Run the panels, draw their figures, print one line per panel; returns 0, or 1 when a goal is missed."""
    from pathlib import Path

    start = time.perf_counter()
    for figure in (args.out, args.mislabel_out):      # their folders, made before hours of work
        if figure:
            Path(figure).parent.mkdir(parents=True, exist_ok=True)
    results = validate(args)
    loo = [r for r in results if isinstance(r, PanelResult)]
    figures = []
    if loo:
        plot(loo, args.out)
        figures.append(args.out)
        print(f"{'panel':9} {'Pearson':>8} {'Spearman':>9} {'goal':>5} {'points':>6} {'seconds':>8}  settings")
    for r in loo:
        mark = "" if r.ok else "  MISSED"
        ref = ""
        if r.reference:
            ref = f"; Pearson vs {r.reference} scores {r.reference_pearson:.4f}"
            if not math.isnan(r.reference_goal):
                ref += f" (goal {r.reference_goal:.2f})"
        print(f"{r.name:9} {r.pearson:8.4f} {r.spearman:9.4f} {r.goal:5.2f} {len(r.actual):6d} "
              f"{r.seconds:8.1f}  {r.settings}{ref}{mark}")
    for r in results:
        if isinstance(r, MislabelResult):
            path = mislabel_path(args)
            plot_mislabel(r, path)
            figures.append(path)
            print(f"mislabel: flipped labels found when checking {' / '.join(f'{100 * f:.0f}%' for f in CHECKED)} "
                  f"of the training set ({r.seconds:.1f} s; {r.settings}; {100 * r.memorised:.0f}% of the flipped "
                  f"labels memorised)")
            for name in list(r.curves) + ["random (expected)"]:
                print(f"  {name:18} " + "  ".join(f"{100 * r.at(name, f):5.1f}%" for f in CHECKED))
            if not r.ok:
                print(f"  MISSED: goal at 10% checked: self-influence >= loss ({100 * r.at('loss', 0.1):.1f}%) and "
                      f">= 3x random (30%); got {100 * r.at('self-influence', 0.1):.1f}%")
    figures += [f for r in results for f in getattr(r, "figures", [])]
    print(f"figure: {', '.join(figures)}   total {time.perf_counter() - start:.0f} s")
    return 0 if all(r.ok for r in results) else 1


def main(argv=None):
    """``python -m influence.validate [options]``; returns the exit code."""
    from influence import cli

    cli.quiet_tensorflow()
    return cli.main(build_parser, _job, argv)


if __name__ == "__main__":
    sys.exit(main())
