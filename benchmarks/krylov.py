"""The ``krylov`` section of ``benchmarks/run.py``: the krylov solver's fit and dpcg against cg.

On the LDS panel's frozen demo CNN (``lds_cache/demo``) when it is there, else on the demo data: the fit's
whole-set products per Lanczos pair asked, a cached rerun's products (none), and dpcg's whole-set passes
per test image against cg's to the same relative residual, at the fit's auto damping.
"""
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from demo_data import demo_data
from harness import REPO, record, say, timeit


def _krylov_model(tmp):
    """(model path, train archive path) of the LDS panel's frozen demo CNN (``lds_cache/demo``) when it is
    there, else of the demo built under ``tmp``."""
    panel = REPO / "lds_cache" / "demo"
    if (panel / "model.keras").exists() and (panel / "train.npz").exists():
        return panel / "model.keras", panel / "train.npz"
    root = demo_data(tmp)
    return root / "model.keras", root / "train.npz"


def bench_krylov(args):
    """The krylov fit (products, seconds; a cached rerun takes none) and dpcg against cg: whole-set passes
    per test image to the same relative residual, auto damping, on the demo CNN."""
    from influence.api import Influence
    from influence.curvature import make_solver

    tmp = Path(tempfile.mkdtemp(prefix="bench_krylov_"))
    try:
        model, train = _krylov_model(tmp)
        say(f"[krylov] {model}")
        inf = Influence(str(model), str(train), solver="krylov", preprocess="unit", cache=tmp / "curvature",
                        progress=False)
        obj = inf.objective
        t0 = time.perf_counter()
        inf.fit()
        fit_s = time.perf_counter() - t0
        info = inf.solver.info
        record("krylov", "fit: whole-set products per pair asked", info["products"] / info["rank_fitted"], "x",
               2.0, "<=", note=f"{info['products']} products for {info['rank_fitted']} pairs "
                               f"({info['converged']} converged, rank {info['rank']} kept), {fit_s:.0f} s")
        calls = []
        inner = obj.hvp_full
        obj.hvp_full = lambda v, indices=None: calls.append(1) or inner(v, indices)
        again = Influence(str(model), str(train), solver="krylov", preprocess="unit", cache=tmp / "curvature",
                          progress=False)
        again.objective.hvp_full = obj.hvp_full
        again.fit()
        record("krylov", "cached rerun: products", len(calls), "", 0, "<=", note=f"loaded: {again.loaded}")
        obj.hvp_full = inner
        rng = np.random.default_rng(0)
        tests = 2 if args.quick else 3
        idx = rng.choice(obj.n, tests, replace=False)
        x, y = obj.archive.take(np.sort(idx))
        vs = [obj.d.gradient(x[k:k + 1], y[k:k + 1].astype(np.int64)) for k in range(tests)]
        hvp_s = timeit(lambda: obj.hvp_full(vs[0]), 3)
        tol = 1e-3
        lam = inf.solver.damping
        passes = {}
        for name in ("cg", "dpcg"):
            s = make_solver(name, obj, lam, cg_tol=tol, cg_maxiter=2000, progress=False)
            if name == "dpcg":
                s.load_state(inf.solver.state())
            t0 = time.perf_counter()
            s.solve(vs)
            passes[name] = (float(np.mean(s.info["hvp_passes"])), time.perf_counter() - t0)
        record("krylov", f"dpcg / cg whole-set passes to residual {tol:g}", passes["dpcg"][0] / passes["cg"][0], "x",
               1 / 3, "<=", note=f"cg {passes['cg'][0]:.0f}, dpcg {passes['dpcg'][0]:.0f} per test image "
                                f"(λ = {lam:.3g}; one pass {hvp_s:.2f} s)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
