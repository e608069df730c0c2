"""A calibration kept for later runs: once ``--calibrate`` has measured which (solver, damping) is truest on a
model, every later run on the same model and training archive that leaves the solver or the damping to ``auto``
uses that measurement, without retraining (issue 30: "the calibrate step's LDS when it has run").

The file is ``<cache>/calibration/choice-<digest>.json`` (the curvature cache's folder, as the retrainings),
keyed by what the grid's scores depend on and NOT by the test images (:func:`model_key`): the model's weights,
the parameters the influence is taken over, the preprocessing, the training archive and the Hessian. It
holds every cell's LDS, so a run that fixes one of solver / damping takes the best cell that agrees with it
(:func:`pick`), as ``--calibrate`` itself does (:func:`influence.calibration.job.allowed_cells`).
"""
import json
import logging
from pathlib import Path

import numpy as np

from influence.calibration.core import CACHE_FOLDER
from influence.calibration.retrain import key_digest
from influence.io import atomic_write
from influence.settings import LISSA_SETTINGS, parse_damping

log = logging.getLogger(__name__)

PREFIX = "choice-"
#: bump when the file's meaning changes
FORMAT = 1


def model_key(clf, train, *, model, weights, preprocess, hessian):
    """What a calibration's cell scores depend on, as a dict of plain values (no solver, no test images);
    ``weights``: the model's fingerprint (:func:`influence.curvature.cache.model_fingerprint`)."""
    return {"format": FORMAT, "model": str(model), "weights": str(weights),
            "params": [v.path for v in clf.variables], "dtype": str(clf.dtype.name),
            "preprocess": str(preprocess), "train": train.fingerprint(), "train_images": len(train),
            "hessian": str(hessian)}


def path_for(cache, key):
    """``cache/calibration/choice-<digest>.json`` of ``key``."""
    return Path(cache) / CACHE_FOLDER / f"{PREFIX}{key_digest(key)}.json"


def save(cache, key, record):
    """Keep ``record`` (:meth:`influence.calibration.Calibration.record`: rows, best, ceiling, facts) for
    ``key`` under ``cache``, atomically -> the path."""
    path = path_for(cache, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        Path(tmp).write_text(json.dumps({"key": key, "calibration": record}, indent=1, default=str))
    return path


def load(cache, key):
    """The kept record for ``key`` under ``cache`` -> dict, or None (no file, another key, unreadable)."""
    path = path_for(cache, key)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("calibration: ignoring %s (%s)", path, exc)
        return None
    if data.get("key") != json.loads(json.dumps(key, default=str)):
        return None
    return data.get("calibration")


def row_name(row):
    """``store blocks 0.1x``: a kept row's solver, variant (``options``) and damping."""
    return " ".join([row["solver"], *(str(v) for v in (row.get("options") or {}).values()), str(row["damping"])])


def pick(record, given, run_solver, run_damping, run_options=None):
    """The cell of ``record`` a run takes -> ``(row, run_row, best_row)`` or None when it keeps its own setting.

    ``given``: the settings given explicitly. The best measured cell that agrees with the explicit ``solver``
    and ``damping`` and a variant's setting (``store_curvature``) given explicitly (neither solver nor damping: the
    best of the grid; both, or any of the original tool's LiSSA settings: None); ``run_row``: the row of the run's
    own (solver, variant, damping) when the grid measured it, else None; ``row`` is the best of the rows whose gain
    over ``run_row`` is beyond the noise (:func:`beyond_noise`), else ``run_row``; ``best_row`` the best allowed
    either way. ``run_options``: the run's variant
    (``{"store_curvature": "blocks"}``); rows kept before variants were recorded have none and agree with any.
    """
    given = set(given)
    if {"solver", "damping"} <= given or given & set(LISSA_SETTINGS):
        return None
    run_damping = parse_damping(run_damping)
    run_options = dict(run_options or {})

    def same_variant(row, keys):
        return all(run_options.get(k) == v for k, v in (row.get("options") or {}).items() if k in keys)

    rows = [r for r in record.get("rows", ()) if r.get("lds") is not None and not r.get("skipped")]
    allowed = [r for r in rows if ("solver" not in given or r["solver"] == run_solver)
               and ("damping" not in given or parse_damping(r["damping"]) == run_damping)
               and same_variant(r, given)]
    if not allowed:
        return None
    best = max(allowed, key=lambda r: r["lds"])
    own = next((r for r in rows if r["solver"] == run_solver and parse_damping(r["damping"]) == run_damping
                and same_variant(r, run_options)), None)
    if own is None:
        return best, own, best
    beyond = [r for r in allowed if r is own or beyond_noise(record, r, own)]
    if own not in allowed and not [r for r in beyond if r is not own]:
        return None                      # the run's own disagrees with the explicit settings and nothing beats it
    chosen = max(beyond, key=lambda r: r["lds"]) if beyond else own
    return chosen, own, best


def beyond_noise(record, row, own):
    """Whether ``row``'s LDS gain over ``own`` (both rows of ``record``), paired over the test images of the kept
    ``lds_per_test``, exceeds :data:`~influence.calibration.grid.SWITCH_Z` standard errors, as ``--calibrate``
    decides (:func:`influence.calibration.grid.choose`); True for a record kept without the per-test values."""
    from influence.calibration.grid import SWITCH_Z, paired_gain

    per_test, rows = record.get("lds_per_test"), record.get("rows", ())
    if not per_test or len(per_test) != len(rows):
        return True
    index = {id(r): i for i, r in enumerate(rows)}

    def values(r):
        return np.array([np.nan if v is None else v for v in per_test[index[id(r)]]], np.float64)

    gain, error = paired_gain(values(row), values(own))
    return gain > SWITCH_Z * error
