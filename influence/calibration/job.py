"""``calculate.py --calibrate``: the calibration step of the calculate job (:mod:`influence.engine`).

Runs once the model is loaded and ``solver auto`` resolved, before the resume check: the test images
are those the run scores (every item of its folders, ``limit`` applied, finished or not, so a resumed run
measures the same set), the retrainings are cached under the curvature cache (``<cache>/calibration/``),
and each solver of the grid is fitted into the same curvature cache, so the run loads the one it uses.

Which (solver, damping) the run then uses: the best cell of the grid that agrees with every one of
``solver`` and ``damping`` given explicitly. Neither given: the best cell; ``solver`` given: its best
damping; ``damping`` given: the best solver at that damping; both given: the run's own, measured only.
"""
import dataclasses
import logging
import time

import numpy as np

from pathlib import Path

from influence.calibration import saved_choice
from influence.errors import SettingError
from influence.settings import parse_damping

log = logging.getLogger(__name__)


def _split(text):
    return [t.strip() for t in str(text).split(",") if t.strip()] if text else None


def test_images(inputs, settings):
    """uint8 ``(T, H, W, C)`` and int64 ``(T,)``: every test image the run scores (folder, label, number order)."""
    from influence.worklist import list_test_items

    items, _ = list_test_items(inputs.test, inputs.folders, dataclasses.replace(settings, overwrite=True))
    arrays = {f: inputs.test.read(f) for f in dict.fromkeys(it.folder for it in items)}
    x = np.stack([arrays[it.folder][0][it.index] for it in items]) if items else None
    y = np.array([arrays[it.folder][1][it.index] for it in items], np.int64).reshape(-1)
    return x, y


def allowed_cells(cells, given):
    """bool per cell: it agrees with the explicit ``solver`` / ``damping`` and a variant's setting
    (``store_curvature``) given explicitly (the run's own cell holds them all)."""
    run = next(c for c in cells if c.run)
    own = dict(run.options)
    return [(("solver" not in given) or c.solver == run.solver) and (("damping" not in given) or
                                                                     c.damping == run.damping)
            and all(k not in given or own.get(k) == v for k, v in c.options) for c in cells]


def cache_folder(settings):
    """Where the retrainings and the kept choice live: the curvature cache (``cache``, default ``out/curvature``)."""
    return Path(settings.cache) if settings.cache else Path(settings.out) / "curvature"


def model_key(inf):
    """:func:`influence.calibration.saved_choice.model_key` of the :class:`influence.Influence` ``inf`` (the
    weights' fingerprint from its curvature key, which the run computes anyway: the weights are hashed once)."""
    return saved_choice.model_key(inf.clf, inf.train, model=inf.model_name, weights=inf.curvature_key["weights"],
                                  preprocess=inf.settings.preprocess, hessian=inf.objective.hessian)


def _run_options(settings, inf):
    """``{setting: value}`` of the run's variant as its solver resolved it (the store's ``store_curvature``)."""
    from influence.calibration.core import run_variant

    return dict(run_variant(inf)) if inf.solver_name == settings.solver else {}


def use_saved(settings, inf, given, rebuild):
    """A run without ``--calibrate``: the (solver, damping) a kept calibration of this model measured best
    (:mod:`influence.calibration.saved_choice`) -> ``(settings, inf, entry)``; ``entry`` (run.json's
    ``calibration_used``) is None when there is none or the run keeps its own (both given explicitly)."""
    key = model_key(inf)
    record = saved_choice.load(cache_folder(settings), key)
    if record is None:
        return settings, inf, None
    run_options = _run_options(settings, inf)
    chosen = saved_choice.pick(record, given, settings.solver, settings.damping, run_options)
    if chosen is None:
        return settings, inf, None
    (best, own, top), path = chosen, saved_choice.path_for(cache_folder(settings), key)
    measured = (f"{record.get('subsets')} subsets x "
                f"{len(record.get('seeds') or ())} seed(s) on {record.get('test_images')} test image(s)")
    own_text = (f"{saved_choice.row_name(own)} {own['lds']:.3f}" if own is not None
                else f"{settings.solver} {settings.damping}: not measured")
    options = dict(best.get("options") or {})
    entry = {"solver": best["solver"], "options": options, "damping": best["damping"], "lds": best["lds"],
             "own": None if own is None else {k: own.get(k) for k in ("solver", "options", "damping", "lds")},
             "noise_ceiling": record.get("noise_ceiling"), "measured": measured, "file": str(path)}
    if (best["solver"] == settings.solver and parse_damping(best["damping"]) == parse_damping(settings.damping)
            and all(run_options.get(k) == v for k, v in options.items())):
        if top is best:
            log.info("calibration kept in %s: %s is the best it measured (LDS %.3f; %s)", path.name,
                     saved_choice.row_name(best), best["lds"], measured)
        else:
            log.info("calibration kept in %s: %s measured LDS %.3f against %.3f for %s, within the noise: the run "
                     "keeps its own (%s)", path.name, saved_choice.row_name(top), top["lds"], best["lds"],
                     saved_choice.row_name(best), measured)
        inf.solver_choice = (f"{inf.solver_choice}; the kept calibration agrees (LDS {best['lds']:.3f})" if top is best
                             else f"{inf.solver_choice}; the kept calibration's best, {saved_choice.row_name(top)} "
                                  f"(LDS {top['lds']:.3f}), is within the noise of it ({best['lds']:.3f})")
        return settings, inf, {**entry, "changed": False}
    settings = dataclasses.replace(settings, solver=best["solver"], damping=best["damping"], **options)
    inf = rebuild(settings)
    inf.solver_choice = (f"calibration kept: {saved_choice.row_name(best)}, the best LDS it measured "
                         f"({best['lds']:.3f} against {own_text}; {measured})")
    log.info("%s; --calibrate again after retraining the model, or give --solver and --damping to choose",
             inf.solver_choice)
    return settings, inf, {**entry, "changed": True}


def calibrate_run(settings, inputs, inf, given, rebuild, runtime=None):
    """The step -> ``(settings, inf, record)``: ``settings`` with the solver and damping the run uses,
    ``inf`` (rebuilt by ``rebuild(settings)`` when they changed), and run.json's ``calibration`` entry.
    ``runtime``: the job's Ray runtime (``workers`` / ``ray_address``: the retrainings run as its tasks).

    Writes ``calibration.csv`` and ``calibration.json`` in ``out`` and logs the table and the verdict.
    """
    from influence.calibration import calibrate
    from influence.calibration.grid import choose
    from influence.curvature import REGISTRY

    solvers = _split(settings.calibrate_solvers)
    for name in solvers or ():
        if name not in REGISTRY:
            raise SettingError("calibrate_solvers", f"{name!r} is not a solver; one of {', '.join(REGISTRY)}")
    x, y = test_images(inputs, settings)
    if x is None:
        raise SettingError("calibrate", "the run has no test images to measure the test loss on")
    cache = cache_folder(settings)
    t0 = time.perf_counter()
    runner = None
    if runtime is not None:                           # --workers / --ray-address: the retrainings as Ray tasks
        from influence.calibration.shards import RayRunner

        runner = RayRunner(runtime)
    result = calibrate(inf, x, y, subsets=settings.calibrate_subsets, seeds=settings.calibrate_seeds,
                       init=settings.calibrate_init, epochs=settings.epochs, batch_size=settings.batch_size, solvers=solvers,
                       dampings=_split(settings.calibrate_damping), cache=cache, runner=runner)
    for line in result.table():
        log.info("   %s", line)
    log.info("%s", result.verdict())
    allowed = allowed_cells(result.cells, given)
    pick = result.chosen(allowed)
    record = result.record()
    kept = saved_choice.save(cache, model_key(inf), {**record, "lds_per_test": [[None if not np.isfinite(v) else
                                                                                 float(v) for v in row]
                                                                                for row in result.lds]})
    run = result.cells[result.run]
    use = run if pick is None else result.cells[pick]
    if use != run:
        settings = dataclasses.replace(settings, solver=use.solver, damping=use.damping, **dict(use.options))
        inf = rebuild(settings)
        inf.solver_choice = (f"calibrate: {use.name}, the best LDS of the grid ({result.means[pick]:.3f} against "
                             f"{result.means[result.run]:.3f} for {run.name})")
        log.info("calibrate: this run uses %s (LDS %.3f) instead of %s (LDS %.3f)%s", use.name, result.means[pick],
                 run.name, result.means[result.run],
                 f"; {' and '.join(sorted(given & {'solver', 'damping'}))} given: the best that agrees" if
                 given & {"solver", "damping"} else "")
    elif pick is not None and (best := choose(result.means, allowed)) != pick:
        gain, error = result.gain(best)
        log.info("calibrate: this run keeps %s: %s scored %+.3f ± %.3f over it, within the noise", run.name,
                 result.cells[best].name, gain, error)
    elif pick is not None and pick != result.best:
        log.info("calibrate: this run keeps %s (%s given explicitly)", run.name,
                 " and ".join(sorted(given & {"solver", "damping", "store_curvature"})))
    record["applied"] = {"solver": use.solver, "options": dict(use.options), "damping": str(use.damping),
                         "changed": use != run}
    csv_path, json_path = result.write(settings.out)
    record["files"] = [str(csv_path), str(json_path), str(kept)]
    record["seconds"] = round(time.perf_counter() - t0, 2)
    log.info("calibrate: wrote %s and %s (%.0f s)", csv_path, json_path.name, record["seconds"])
    return settings, inf, record
