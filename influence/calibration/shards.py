"""``--calibrate`` with ``--workers`` / ``--ray-address``: the retrainings as Ray tasks, one (subset, seed)
run each, at most the cluster's slots at once (one CPU, or one GPU, per task: :mod:`influence.backends.ray_runtime`).

A worker rebuilds the run from a :class:`RetrainSpec` (the model file, its preprocess, the training
archive's path, epochs, batch size and the test images): it loads the model with its compile config and
trains exactly what :class:`influence.calibration.retrain.Trainer` trains in one process, under the same
seed, so the losses, the cache and the choice are the same (tests/test_calibrate.py). The driver writes
the cache after every finished task, as the local loop does, so an interrupted sharded run resumes too.
"""
import dataclasses
import logging
import time
from pathlib import Path

import numpy as np

from influence.errors import UserError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RetrainSpec:
    """What a worker needs for one retraining (picklable): ``model`` a ``.keras``/``.h5`` path, ``preprocess``
    its mode, ``train`` a ``train.npz`` path, ``epochs``, ``batch_size``, ``x_test`` uint8 ``(T, H, W, C)``,
    ``y_test`` int64 ``(T,)``."""

    model: str
    preprocess: str
    train: str
    epochs: int
    batch_size: int
    x_test: np.ndarray
    y_test: np.ndarray
    init: str = "fresh"


def retrain_task(spec, indices, seed):
    """One retraining on a worker: ``(losses float64 (T,), seconds)``."""
    import keras

    from influence.calibration.retrain import Trainer, compile_config, compiled_fit
    from influence.data.archive_reader import TrainArchive
    from influence.model.models import make_preprocess

    t0 = time.perf_counter()
    model = keras.models.load_model(spec.model, compile=True)
    fit = compiled_fit(model, compile_config(model), spec.epochs, spec.batch_size)
    with TrainArchive(spec.train) as train:
        losses = Trainer(fit, train, spec.x_test, spec.y_test, make_preprocess(spec.preprocess),
                         init=spec.init)(indices, seed)
    return losses, time.perf_counter() - t0


def spec_for(inf, recipe, x_test, y_test):
    """The :class:`RetrainSpec` of an :class:`influence.Influence` over a model file and a ``train.npz``
    archive (the compile-config recipe); a one-line UserError otherwise."""
    from influence.data.archive_reader import TrainArchive

    source = inf.model_source
    if source is None or not Path(source[0]).is_file() or not isinstance(inf.train, TrainArchive):
        raise UserError("calibrate: Ray shards the retraining of a model file over a train.npz archive only "
                        "(its workers load both); run without workers")
    if "epochs" not in recipe:
        raise UserError("calibrate: Ray shards the retraining with the model's compile config, not a train_fn")
    mode = "none" if inf.settings.preprocess == "auto" else inf.settings.preprocess
    return RetrainSpec(str(Path(source[0]).resolve()), mode, str(Path(inf.train.path).resolve()),
                       int(recipe["epochs"]), int(recipe["batch_size"]), np.asarray(x_test, np.uint8),
                       np.asarray(y_test, np.int64), recipe.get("init", "fresh"))


class RayRunner:
    """``runner(jobs, on_result)`` for :func:`influence.calibration.retrain.retrain`: each job ``(index,
    (indices, seed))`` a Ray task on ``runtime`` (:class:`influence.backends.ray_runtime.RayRuntime`, the
    job's); ``on_result(index, (losses, seconds))`` as each finishes."""

    def __init__(self, runtime):
        self.runtime = runtime
        self.spec = None          # set by calibrate() once the recipe is known

    def __call__(self, jobs, on_result):
        cluster = self.runtime.cluster()
        task = cluster.remote(retrain_task)
        ref = cluster.ray.put(self.spec)
        log.info("calibrate: %d retraining(s) as Ray tasks, %d at once", len(jobs), cluster.slots)
        cluster.run(task, [(i, (ref, idx, seed)) for i, (idx, seed) in jobs], on_result)
