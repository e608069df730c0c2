"""What runs on a Ray worker: the :class:`WorkerSpec` it rebuilds the driver's model, derivatives, objective
and solver from, and the four tasks (:func:`fit_shard`, :func:`product_shard`, :func:`store_shard`,
:func:`score_shard`) the driver (:mod:`influence.backends.ray_driver`) submits.

A worker process keeps the loaded model, archive and compiled functions of the last spec it saw
(:func:`context`), so it pays the model load once; the tasks themselves are stateless (retried elsewhere
when their worker dies). Before any work a worker checks its archive and model against the driver's
fingerprints (on a cluster they must be the same files, at the same absolute paths).
"""
import dataclasses
import os
import time
from pathlib import Path

import numpy as np

from influence.errors import UserError
from influence.settings import MATH_SETTINGS


def _loaded():
    """A field of the spec that a worker loads once per process (model, archive, derivatives, objective)."""
    return dataclasses.field(metadata={"loaded": True})


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """Everything a Ray worker rebuilds its model, derivatives, objective and solver from (made by
    :meth:`influence.Influence.worker_spec`; picklable, hashable). Paths are absolute (workers run
    elsewhere); the fingerprints are what a worker checks its archive and model against.

    ``model``: a model file or a ``keras.applications`` name (``weights``, ``preprocess``, ``params`` as
    :func:`influence.model.models.load_classifier` takes them); ``hessian``: the objective's matrix;
    ``solver``, ``damping`` (parsed), ``options`` (sorted ``(name, value)`` pairs): exactly what the
    driver built its solver with; ``train``: the ``train.npz`` path; ``parts``: the folder of the shard
    scores; ``chunk``: training images per fitting/product call (set per fit by the backend). The fields
    marked ``loaded`` are what a worker process loads once and keeps (:func:`context`).
    """

    model: str = _loaded()
    weights: str = _loaded()
    preprocess: str = _loaded()
    params: str = _loaded()
    hessian: str = _loaded()
    solver: str
    damping: object
    options: tuple
    train: str = _loaded()
    train_fingerprint: str = _loaded()
    weights_fingerprint: str = _loaded()
    parts: str
    chunk: int = 0

    def loaded(self):
        """The values of the ``loaded`` fields: the key of a worker process's cache."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("loaded"))

    @property
    def solver_options(self):
        """``{option: value}`` the solver is built with (:func:`influence.curvature.make_solver`)."""
        return dict(self.options)

    @property
    def seed(self):
        return self.solver_options.get("seed")

    def math(self):
        """``{setting: text}`` of the settings that change the numbers (:data:`influence.settings.MATH_SETTINGS`)
        the spec holds: part of the key of a group's parts (:func:`influence.backends.ray_driver.group_parts`)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values.update(self.solver_options)
        return {k: str(values[k]) for k in MATH_SETTINGS if k in values}


# ----------------------------------------------------------------------------- this worker process's cache

#: the last spec's model, archive, derivatives, objective and solvers (one worker process's own). Module-level
#: on purpose: the tasks are plain functions that Ray runs, one after another, in a long-lived worker process,
#: and a task's arguments are pickled anew each time, so nothing a task is given can own what it loaded; the
#: module is the one thing that lives as long as the process (an actor would own it, but would pin each task
#: to one worker and lose the retry elsewhere when that worker dies)
_CONTEXT = {}


def import_tensorflow():
    """Import TensorFlow quietly in a worker; returns its version (a warm-up task, too)."""
    from influence.tf_import import import_tensorflow_quietly

    import_tensorflow_quietly()
    import tensorflow as tf

    return tf.__version__


def forget():
    """Drop this process's cached model, archive and solvers."""
    _CONTEXT.clear()


def context(spec):
    """This worker process's model, archive and derivative functions for ``spec`` (a :class:`WorkerSpec`;
    loaded once per model and archive; a task with another spec replaces them)."""
    key = spec.loaded()
    if _CONTEXT.get("key") == key:
        return _CONTEXT
    _CONTEXT.clear()
    import_tensorflow()
    from influence.build import build, classifier
    from influence.data.archive_reader import TrainArchive

    path = Path(spec.train)
    if not path.is_file():
        raise UserError(f"{path} on {os.uname().nodename}: no such training archive: copy the driver's train.npz "
                        f"to the same path on every node, or use a shared filesystem")
    train = TrainArchive(path)
    if train.fingerprint() != spec.train_fingerprint:
        raise UserError(f"{path} on {os.uname().nodename} is not the driver's training archive (fingerprint "
                        f"{train.fingerprint()}, driver {spec.train_fingerprint}): copy the same train.npz to "
                        f"every node, or use a shared filesystem")
    clf = classifier(spec.model, spec.weights, spec.preprocess, spec.params)
    from influence.curvature.cache import model_fingerprint

    if model_fingerprint(clf.model) != spec.weights_fingerprint:
        raise UserError(f"the model {spec.model} (weights {spec.weights}) on {os.uname().nodename} has other "
                        f"weights than the driver's: give every node the same model file")
    built = build(clf, train, hessian=spec.hessian, chunk=spec.chunk)
    _CONTEXT.update(key=key, train=train, clf=clf, derivs=built.derivs, objective=built.objective, solvers={})
    return _CONTEXT


def _objective(spec):
    """The worker's objective for ``spec``, taking ``spec.chunk`` images per call (the driver's)."""
    obj = context(spec)["objective"]
    obj.chunk = max(1, spec.chunk)
    return obj


def worker_solver(spec, cls=None):
    """The solver a worker builds from ``spec`` alone (kept for the next task of the same spec): the
    driver's method (or the method class ``cls``: the part a driver's solver fits, e.g. pcg's EK-FAC),
    parsed damping and the options it takes, on the worker's objective (``spec.chunk`` images per call,
    as in the driver)."""
    from influence.curvature import REGISTRY, solver_options

    cls = REGISTRY[spec.solver] if cls is None else cls
    obj = _objective(spec)
    ctx = context(spec)
    key = (cls, spec.damping, spec.options)
    if key not in ctx["solvers"]:
        options = {k: v for k, v in spec.options if k in solver_options(cls)}
        ctx["solvers"] = {key: cls(obj, spec.damping, progress=False, **options)}
    return ctx["solvers"][key]


def _done(t0, **out):
    return {**out, "pid": os.getpid(), "node": os.uname().nodename, "seconds": time.perf_counter() - t0}


def fit_shard(spec, cls, start, stop, basis=None):
    """Task: pass-1 factor sums of images ``[start, stop)`` of the K-FAC-family method ``cls`` (the one whose
    fit the driver shards), or with ``basis`` the pass-2 sums (``{"sums": {key: float64 array}, "pid",
    "node", "seconds"}``)."""
    t0 = time.perf_counter()
    kfac = worker_solver(spec, cls)
    if basis is None:
        sums = kfac.factor_sums(start, stop, keep=True)
    else:
        sums = kfac.eigen_sums(start, stop, basis, keep=True)
    return _done(t0, sums=sums)


def product_shard(spec, start, stop, flat):
    """Task: the share of images ``[start, stop)`` of the whole-set product ``A v`` (``v`` = ``flat``, the
    model's dtype): :meth:`influence.model.objective.TrainingObjective.hvp_share` on the worker's objective
    (``{"sums": {"product": (P,) array}, "pid", "node", "seconds"}``)."""
    from influence.model.vectors import numpy_to_vec, vec_to_numpy

    t0 = time.perf_counter()
    obj = _objective(spec)
    part = obj.hvp_share(numpy_to_vec(flat, obj.d.variables), start, stop)
    return _done(t0, sums={"product": vec_to_numpy(part).astype(flat.dtype)})


def store_shard(spec, projection, layout, k):
    """Task: shard ``k`` of the gradient store written (``layout``: its root folder, digest, images, dims and rows
    per shard, the driver's :class:`influence.store.shards.GradientStore`), by the store solver of ``spec`` with
    the driver's projection (``projection``: its arrays, None for the seeded random one)
    (``{"sums": {"gram": (D, D) float64}, "pid", "node", "seconds"}``)."""
    from influence.store.shards import GradientStore

    t0 = time.perf_counter()
    solver = worker_solver(spec)
    solver.adopt_projection(projection)
    return _done(t0, sums={"gram": solver.write_shard(GradientStore(*layout), k)})


def score_shard(spec, batches, stacked, part, score_batch):
    """Task: the shares (T, N_shard, L) of the shard's batches, saved atomically as ``part``.

    The loop is a single-process run's (:func:`influence.scoring.scorer.score_batches`): batch by batch,
    ``score_batch`` images per call, so every call sees the same images.
    """
    t0 = time.perf_counter()
    ctx = context(spec)
    import tensorflow as tf

    from influence.io import atomic_write
    from influence.scoring import Scorer
    from influence.scoring.scorer import score_batches

    if "scorer" not in ctx:
        ctx["scorer"] = Scorer(ctx["derivs"])
    out = score_batches(ctx["scorer"], ctx["train"], tuple(tf.constant(a) for a in stacked), score_batch, batches)
    part = Path(part)
    part.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(part) as tmp:
        np.save(tmp, out)
    return _done(t0)
