"""Scale-out with Ray: curvature fitting and scoring sharded over worker processes, GPUs and hosts.

Both heavy jobs are sums over the training archive, so both split into **shards** (at most
:data:`MAX_SHARDS`, the same layout whatever the number of workers, so a rerun with other workers
still finds its finished shards and gets the same bits): scoring into runs of whole archive batches
(:func:`plan_shards`), fitting into runs of whole fitting chunks (:func:`plan_fit_shards`).

* **Fitting** (``--solver kfac``/``ekfac``/``pcg``): every chunk of a fitting shard holds the images
  it holds in a one-process ``solver.fit()``. Each shard's task returns its float64 factor sums
  (:meth:`KFACSolver.factor_sums`); the driver adds them up in shard order, eigendecomposes once
  (:meth:`KFACSolver.set_factors`), sends the eigenbases to the workers once (object store), and the
  eigenvalue-correction pass is sharded the same way (:meth:`KFACSolver.eigen_sums`). Up to
  :data:`MAX_SHARDS` chunks a shard is one chunk, so the driver adds the very chunk sums one process
  adds, in the same order: the fit is bit for bit the one-process fit (on identical hardware),
  whatever the number of workers. Beyond that the per-shard sums group the float64 additions
  otherwise (still the same for any number of workers; last-bit differences from one process).
  Other solvers fit in the driver, as without Ray.
* **Scoring**: the driver puts a group's inverse-HVPs into the object store once; each shard's task
  scores its training images exactly as :func:`influence.backends.score_archive` does (same batches,
  same ``--score-batch`` steps, so the same numbers) and writes its slice of every test image's scores
  atomically as ``<out>/parts/<group key>/<first>-<last>.npy``. The driver assembles them and the
  engine writes the usual outputs; a group's parts are removed once its outputs are written.

Workers are built from a :class:`WorkerSpec` that :meth:`influence.Influence.worker_spec` makes (never
from calculate.py's settings): the model file or name, weights, preprocess, params, hessian, the solver
and its parsed damping and options (the driver's own), the training archive's path, the parts folder
and the fingerprints a worker checks. :class:`RayBackend` takes that spec and the runtime options
(number of workers, cluster address). Tasks are stateless and retried (``max_retries``) when their
worker dies; a worker process keeps the loaded model, archive and compiled functions of the last spec
it saw (:func:`_context`), so it pays the model load once. The group key (:func:`group_parts`) covers
the spec's settings that change the numbers, the model weights, the training archive, the test images
of the group and their order, so a rerun after a killed driver skips the shards it finds only when they
are the same work.

Workers read ``train.npz`` (memory-mapped) and write the parts folder (calculate.py: ``<out>/parts``) at
the driver's absolute paths: on a cluster these must be on a shared filesystem, or (the archive only)
copied to the same path on every node; a worker checks the archive's fingerprint against the driver's.
An :class:`influence.Influence` whose training set is in memory has no such path: Ray refuses it.

Ray is optional: it is imported only here, inside the functions that need it.
"""
import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np

from influence.errors import SettingError, UserError
from influence.progress import progress
from influence.settings import MATH_SETTINGS

log = logging.getLogger(__name__)

#: most shards of the training archive (each a run of whole archive batches)
MAX_SHARDS = 64
#: a task whose worker dies is run again this many times
MAX_RETRIES = 3
#: folder under --out holding the scores of shards not yet assembled
PARTS = "parts"
INSTALL = "pip install -r requirements-distributed.txt"

_STATE = {}


# ----------------------------------------------------------------------------- settings and runtime

def enabled(settings):
    """True when ``workers`` or ``ray_address`` asks for Ray."""
    return bool(getattr(settings, "workers", 0) or getattr(settings, "ray_address", None))


def _setting(settings):
    """The setting that asks for Ray: ``ray_address`` or ``workers``."""
    return "ray_address" if getattr(settings, "ray_address", None) else "workers"


def check(settings):
    """One-line errors for the scale-out settings, before any work (Ray is looked up, not imported;
    the bound of ``workers`` is the setting's own check, :meth:`influence.settings.Settings.check`)."""
    if importlib.util.find_spec("ray") is None:
        raise SettingError(_setting(settings), f"needs Ray: {INSTALL}")
    if settings.ray_address:
        _check_reachable(settings.ray_address)


def _import_ray():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError:
        raise SettingError("workers", f"needs Ray: {INSTALL}") from None
    return ray


def _worker_env():
    """Environment of the worker processes: this package importable, TensorFlow quiet."""
    root = str(Path(__file__).resolve().parent.parent)
    path = [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    return {"PYTHONPATH": os.pathsep.join(path), "TF_CPP_MIN_LOG_LEVEL": "3", "RAY_USAGE_STATS_ENABLED": "0",
            "TF_FORCE_GPU_ALLOW_GROWTH": "true"}


def _local_gpus():
    try:
        import tensorflow as tf

        return len(tf.config.list_physical_devices("GPU"))
    except ImportError:
        return 0


def init_ray(workers=0, address=None, gpus=None):
    """Start a local Ray runtime with ``workers`` worker slots (one GPU each when there are GPUs),
    or join the cluster at ``address``. Returns the ``ray`` module. Usage statistics are off."""
    ray = _import_ray()
    common = dict(runtime_env={"env_vars": _worker_env()}, logging_level=logging.WARNING, log_to_driver=True)
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address, **common)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise SettingError("ray_address", f"{address}: cannot join the Ray cluster ({str(exc).splitlines()[0]}); "
                            f"start it with `ray start --head` (see README)") from None
        return ray
    gpus = _local_gpus() if gpus is None else gpus
    ray.init(num_cpus=int(workers), num_gpus=min(int(gpus), int(workers)), include_dashboard=False, **common)
    return ray


def _check_reachable(address, timeout=10.0):
    """A one-line error when ``host:port`` does not answer (Ray itself would retry for minutes)."""
    import socket

    host, sep, port = str(address).rpartition(":")
    if not sep or not port.isdigit() or "/" in host:
        return                                   # "auto", ray:// and other forms: left to Ray
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise SettingError("ray_address", f"{address}: nothing answers there ({exc.strerror or exc}); start the "
                        f"cluster with `ray start --head --port {port}` on {host} (see README)") from None


@dataclasses.dataclass
class Cluster:
    """What the driver knows of the runtime: task options and how many tasks run at once."""

    ray: object
    options: dict
    slots: int
    started: bool
    seconds: float


def _connect(workers=0, address=None):
    """The Ray runtime of this run, started with ``workers`` slots (or joined at ``address``) on first use."""
    cluster = _STATE.get("cluster")
    if cluster is not None:
        return cluster
    t0 = time.perf_counter()
    ray = _import_ray()
    started = False
    if ray.is_initialized():
        how = "using the running Ray runtime"
    elif address:
        init_ray(address=address)
        started, how = True, f"joined the Ray cluster at {address}"
    elif not workers:
        raise SettingError("workers", "must be at least 1 to start a local Ray runtime (or give ray_address)")
    else:
        init_ray(workers)
        started, how = True, "started a local Ray runtime"
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    if gpus:
        options, slots = {"num_gpus": 1, "num_cpus": 0}, gpus
    else:
        options, slots = {"num_cpus": 1}, max(1, cpus)
    if workers:
        if gpus and workers > gpus:
            log.warning("workers %d but %d GPU(s): one task per GPU, %d at once", workers, gpus, gpus)
        slots = min(slots, workers)
    seconds = time.perf_counter() - t0
    log.info("ray: %s in %.1f s; %d task(s) at once, one %s each (%d CPU, %d GPU in all)", how, seconds, slots,
             "GPU" if gpus else "CPU", cpus, gpus)
    cluster = Cluster(ray, options, slots, started, seconds)
    _STATE["cluster"] = cluster
    return cluster


@contextlib.contextmanager
def runtime(settings):
    """The scope of one run's Ray use: nothing without the flags; with them the runtime starts
    lazily (:func:`_connect`), is shut down at the end if this run started it, and on success the
    leftover ``<out>/parts`` (of groups no rerun will ask for) are removed."""
    if not enabled(settings):
        yield
        return
    check(settings)
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")   # the driver shares GPU 0 with a worker
    _STATE.clear()
    try:
        yield
        parts = Path(settings.out) / PARTS
        if parts.is_dir():
            shutil.rmtree(parts, ignore_errors=True)
    finally:
        cluster = _STATE.pop("cluster", None)
        if cluster is not None and cluster.started:
            cluster.ray.shutdown()


# ----------------------------------------------------------------------------- shards

@dataclasses.dataclass(frozen=True)
class Shard:
    """Archive batches ``batches`` = images ``[start, stop)`` in archive order."""

    batches: tuple
    start: int
    stop: int

    @property
    def name(self):
        return f"{self.batches[0]}-{self.batches[-1]}"

    def __len__(self):
        return self.stop - self.start


def plan_shards(train, max_shards=MAX_SHARDS):
    """Runs of whole batches: ``ceil(batches / max_shards)`` batches per shard (the last may be shorter)."""
    per = max(1, math.ceil(len(train.batches) / max_shards))
    shards, at = [], 0
    for i in range(0, len(train.batches), per):
        batches = tuple(int(b) for b in train.batches[i:i + per])
        size = sum(train.batch_len(b) for b in batches)
        shards.append(Shard(batches, at, at + size))
        at += size
    return shards


def plan_fit_shards(n, chunk, max_shards=None):
    """Image ranges ``[(start, stop)]`` of the sharded fit: runs of whole chunks of ``chunk`` images
    counted from image 0 (``ceil(chunks / max_shards)`` chunks per shard; default :data:`MAX_SHARDS`).

    ``solver.fit()`` in one process sums the training set in exactly these chunks, each chunk's
    products in the model's dtype (float32 for most models); a shard starting elsewhere (at an archive
    batch) would cut other chunks and round other float32 products (measured: 1.4e-5 relative on the
    scores of a float32 CNN at ``--damping 1e-3``). With at most ``max_shards`` chunks every shard is
    one chunk. The layout does not depend on the number of workers.
    """
    max_shards = MAX_SHARDS if max_shards is None else int(max_shards)
    chunk = max(1, int(chunk))
    per = chunk * max(1, math.ceil(math.ceil(n / chunk) / max(1, max_shards)))
    return [(s, min(s + per, n)) for s in range(0, n, per)]


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """Everything a Ray worker rebuilds its model, derivatives, objective and solver from (made by
    :meth:`influence.Influence.worker_spec`; picklable, hashable). Paths are absolute (workers run
    elsewhere); the fingerprints are what a worker checks its archive and model against.

    ``model``: a model file or a ``keras.applications`` name (``weights``, ``preprocess``, ``params`` as
    :func:`influence.model.models.load_classifier` takes them); ``hessian``: the objective's matrix;
    ``solver``, ``damping`` (parsed), ``options`` (sorted ``(name, value)`` pairs): exactly what the
    driver built its solver with; ``train``: the ``train.npz`` path; ``parts``: the folder of the shard
    scores; ``chunk``: training images per fitting/product call (set per fit by the backend).
    """

    model: str
    weights: str
    preprocess: str
    params: str
    hessian: str
    solver: str
    damping: object
    options: tuple
    train: str
    train_fingerprint: str
    weights_fingerprint: str
    parts: str
    chunk: int = 0

    @property
    def solver_options(self):
        """``{option: value}`` the solver is built with (:func:`influence.curvature.make_solver`)."""
        return dict(self.options)

    @property
    def seed(self):
        return self.solver_options.get("seed")

    def math(self):
        """``{setting: text}`` of the settings that change the numbers (:data:`influence.settings.MATH_SETTINGS`)
        the spec holds: part of the key of a group's parts (:func:`group_parts`)."""
        values = {"model": self.model, "weights": self.weights, "preprocess": self.preprocess,
                  "params": self.params, "solver": self.solver, "hessian": self.hessian, "damping": self.damping,
                  **self.solver_options}
        return {k: str(values[k]) for k in MATH_SETTINGS if k in values}


# ----------------------------------------------------------------------------- worker side

_CONTEXT = {}


def import_tensorflow():
    """Import TensorFlow quietly in a worker; returns its version (a warm-up task, too)."""
    from influence.tf_import import import_tensorflow_quietly

    import_tensorflow_quietly()
    import tensorflow as tf

    return tf.__version__


def _context(spec):
    """This worker process's model, archive and derivative functions for ``spec`` (a :class:`WorkerSpec`;
    loaded once per model and archive; a task with another spec replaces them)."""
    key = (spec.model, spec.weights, spec.preprocess, spec.params, spec.hessian, spec.train,
           spec.train_fingerprint, spec.weights_fingerprint)
    if _CONTEXT.get("key") == key:
        return _CONTEXT
    _CONTEXT.clear()
    import_tensorflow()
    from influence.data.archive_reader import TrainArchive
    from influence.model.derivatives import Derivatives
    from influence.model.objective import TrainingObjective
    from influence.model.models import load_classifier

    path = Path(spec.train)
    if not path.is_file():
        raise UserError(f"{path} on {os.uname().nodename}: no such training archive: copy the driver's train.npz "
                        f"to the same path on every node, or use a shared filesystem")
    train = TrainArchive(path)
    if train.fingerprint() != spec.train_fingerprint:
        raise UserError(f"{path} on {os.uname().nodename} is not the driver's training archive (fingerprint "
                        f"{train.fingerprint()}, driver {spec.train_fingerprint}): copy the same train.npz to "
                        f"every node, or use a shared filesystem")
    clf = load_classifier(spec.model, spec.weights, spec.preprocess, spec.params)
    from influence.curvature.cache import model_fingerprint

    if model_fingerprint(clf.model) != spec.weights_fingerprint:
        raise UserError(f"the model {spec.model} (weights {spec.weights}) on {os.uname().nodename} has other "
                        f"weights than the driver's: give every node the same model file")
    derivs = Derivatives(clf, train.image_shape)
    _CONTEXT.update(key=key, train=train, clf=clf, derivs=derivs,
                    objective=TrainingObjective(derivs, train, chunk=max(1, spec.chunk), hessian=spec.hessian),
                    solvers={})
    return _CONTEXT


def _kfac_of(solver):
    """The K-FAC/EK-FAC object whose fit is sharded (pcg's preconditioner), or None."""
    from influence.curvature.kfac.solver import KFACSolver

    target = getattr(solver, "ekfac", solver)
    return target if isinstance(target, KFACSolver) else None


def worker_solver(spec):
    """The solver a worker builds from ``spec`` alone (kept for the next task of the same spec): the
    driver's method, parsed damping and options, on the worker's objective (``spec.chunk`` images per
    call, as in the driver)."""
    ctx = _context(spec)
    ctx["objective"].chunk = max(1, spec.chunk)
    key = (spec.solver, spec.damping, spec.options)
    if key not in ctx["solvers"]:
        from influence.curvature import make_solver

        solver = make_solver(spec.solver, ctx["objective"], spec.damping, progress=False, **spec.solver_options)
        ctx["solvers"] = {key: solver}
    return ctx["solvers"][key]


def _worker_kfac(spec):
    return _kfac_of(worker_solver(spec))


def fit_shard(spec, start, stop, basis=None):
    """Task: pass-1 factor sums of images ``[start, stop)``, or with ``basis`` the pass-2 sums
    (``{"sums": {key: float64 array}, "pid", "node", "seconds"}``)."""
    t0 = time.perf_counter()
    kfac = _worker_kfac(spec)
    if basis is None:
        sums = kfac.factor_sums(start, stop, keep=True)
    else:
        sums = kfac.eigen_sums(start, stop, basis, keep=True)
    return {"sums": sums, "pid": os.getpid(), "node": os.uname().nodename, "seconds": time.perf_counter() - t0}


def score_shard(spec, batches, stacked, part, score_batch):
    """Task: the shares (T, N_shard, L) of the shard's batches, saved atomically as ``part``.

    The loop is a single-process run's (:func:`influence.scoring.scorer.score_batches`): batch by batch,
    ``score_batch`` images per call, so every call sees the same images.
    """
    t0 = time.perf_counter()
    ctx = _context(spec)
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
    return {"pid": os.getpid(), "node": os.uname().nodename, "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- driver side

def _remote(cluster, fn):
    return cluster.ray.remote(max_retries=MAX_RETRIES, **cluster.options)(fn)


def _run(cluster, task, jobs, on_result, window=None, held=lambda: 0):
    """Submit ``task.remote(*args)`` for each ``(index, args)`` in ``jobs``, at most ``window`` in
    flight (default: twice the slots; ``held()`` counts finished results the caller still holds),
    and call ``on_result(index, value)`` as they finish. Task failures become one-line errors."""
    ray = cluster.ray
    window = window or 2 * cluster.slots
    jobs = list(jobs)
    pending, at = {}, 0
    while at < len(jobs) or pending:
        while at < len(jobs) and len(pending) + held() < window:
            index, args = jobs[at]
            pending[task.remote(*args)] = index
            at += 1
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            index = pending.pop(ref)
            try:
                value = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                if isinstance(cause, UserError):
                    raise UserError(f"on a worker: {cause}") from None
                raise
            except ray.exceptions.RayError as exc:
                first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
                raise UserError(f"a shard failed {MAX_RETRIES + 1} times ({type(exc).__name__}: {first}); "
                                f"finished shards are kept: rerun to resume") from None
            del ref
            on_result(index, value)


def _krylov_of(solver):
    """The krylov object whose Lanczos products are sharded (dpcg's preconditioner), or None."""
    from influence.curvature.lowrank.krylov import KrylovSolver

    target = getattr(solver, "krylov", solver)
    return target if isinstance(target, KrylovSolver) else None


def product_shard(spec, start, stop, flat):
    """Task: the share of images ``[start, stop)`` of the whole-set product ``A v`` (``v`` = ``flat``, the
    model's dtype), summed over the objective's chunks in order, in the model's dtype
    (``{"sums": {"product": (P,) array}, "pid", "node", "seconds"}``)."""
    from influence.model.vectors import numpy_to_vec, vec_to_numpy

    t0 = time.perf_counter()
    ctx = _context(spec)
    obj = ctx["objective"]
    chunk = max(1, int(spec.chunk))
    derivs = ctx["derivs"]
    vp = derivs.hvp if spec.hessian == "full" else derivs.ggn_vp             # the driver's matrix
    v = numpy_to_vec(flat, derivs.variables)
    weight = obj.scalar(1.0 / obj.n)
    total = None
    for at in range(start, stop, chunk):
        x, y = obj.archive.take(np.arange(at, min(at + chunk, stop)))
        part = vp(x, y.astype(np.int64), v, weight, obj.scalar(1.0 if at == 0 else 0.0))
        total = part if total is None else tuple(a + b for a, b in zip(total, part))
    sums = {"product": vec_to_numpy(total).astype(flat.dtype)}
    return {"sums": sums, "pid": os.getpid(), "node": os.uname().nodename, "seconds": time.perf_counter() - t0}


def _fit_krylov(krylov, spec, cluster, chunk):
    """krylov's Lanczos with every product ``A v`` sharded over Ray (:func:`product_shard`) and the shards'
    shares added in shard order in the model's dtype: bit for bit the one-process product when each shard
    is one chunk (at most :data:`MAX_SHARDS` chunks), else equal to float rounding."""
    from influence.model.vectors import numpy_to_vec, vec_to_numpy

    obj = krylov.obj
    shards = plan_fit_shards(obj.n, chunk)
    spec = dataclasses.replace(spec, chunk=int(chunk), hessian=obj.hessian)
    task = _remote(cluster, product_shard)
    dtype = np.dtype(obj.d.dtype.as_numpy_dtype)
    like = obj.d.variables
    log.info("krylov: each Lanczos product over %d training images in %d shards of %d images over Ray", obj.n,
             len(shards), shards[0][1] - shards[0][0])

    def product(v):
        flat = cluster.ray.put(vec_to_numpy(v).astype(dtype))
        total = _sharded_sum(cluster, task, shards, spec, flat, None, dtype=dtype)
        return numpy_to_vec(total["product"], like)

    krylov.fit(product=product)


def fit(solver, spec, connect, chunk):
    """``solver.fit()`` with the training-set passes sharded over Ray (kfac, ekfac, pcg; krylov and
    dpcg: each Lanczos product); any other solver fits in the driver. ``chunk`` must be the objective's
    (images per fitting call); ``spec`` the workers' :class:`WorkerSpec`; ``connect()`` -> the
    :class:`Cluster` (called only when the fit is sharded). The result is bit for bit ``solver.fit()``'s
    when the archive has at most :data:`MAX_SHARDS` chunks, else equal to float rounding; it never
    depends on the number of workers (:func:`plan_fit_shards`)."""
    krylov = _krylov_of(solver)
    if krylov is not None:
        _fit_krylov(krylov, spec, connect(), chunk)
        return
    kfac = _kfac_of(solver)
    if kfac is None:
        log.info("solver %s: its fit is not sharded; fitting in the driver", solver.name)
        solver.fit()
        return
    n = kfac.obj.n
    if n < 1:
        raise UserError("the training archive is empty")
    cluster = connect()
    shards = plan_fit_shards(n, chunk)
    spec = dataclasses.replace(spec, chunk=int(chunk))
    log.info("%s: fitting on %d training images (%s Fisher), factors %.3g GB, in %d shards of %d images over Ray",
             kfac.name, n, kfac.fisher, kfac.factor_bytes / 2**30, len(shards), shards[0][1] - shards[0][0])
    task = _remote(cluster, fit_shard)

    def eigen_sums():
        basis = cluster.ray.put(kfac.eigenbasis())      # sent to the workers once
        return _sharded_sum(cluster, task, shards, spec, basis, f"{kfac.name} eigenvalues")

    kfac.fit_from(lambda: _sharded_sum(cluster, task, shards, spec, None, f"{kfac.name} factors"), eigen_sums)


def _sharded_sum(cluster, task, shards, spec, basis, desc, dtype=np.float64):
    """Σ over the ``(start, stop)`` shards of the tasks' ``{key: array}``, added in ``dtype`` in shard
    order (so the sum does not depend on which shard finished first, nor on the number of workers):
    ``((s0 + s1) + s2) + ...``, the order of one process's running sum when each shard is one chunk.
    ``desc``: the progress bar's (None: no bar)."""
    total, buffered, nxt = None, {}, [0]

    def add(index, value):
        nonlocal total
        log.debug("%s: images %d-%d summed by pid %d on %s in %.2f s", desc, *shards[index], value["pid"],
                  value["node"], value["seconds"])
        buffered[index] = value["sums"]
        while nxt[0] in buffered:
            part = buffered.pop(nxt[0])
            if total is None:
                total = {k: np.array(v, dtype) for k, v in part.items()}
            else:
                for k, v in part.items():
                    total[k] += v
            del part
            bar.update(shards[nxt[0]][1] - shards[nxt[0]][0])
            nxt[0] += 1

    with progress(total=shards[-1][1], desc=desc or "", unit="img", disable=desc is None) as bar:
        _run(cluster, task, [(i, (spec, start, stop, basis)) for i, (start, stop) in enumerate(shards)], add,
             held=lambda: len(buffered))
    return total


def group_parts(spec, curvature_key, fingerprints, group, score_batch):
    """``<parts>/<key>`` (``spec.parts``; calculate.py: ``<out>/parts``): the folder of one group's shard
    scores. The key covers every setting of ``spec`` that changes the numbers (:meth:`WorkerSpec.math`),
    the model weights and training archive (``curvature_key``), the test images of the group (folder
    digests, folder/label/number/index, in order) and ``score_batch``."""
    folders = sorted({it.folder for it in group})
    what = {
        "settings": spec.math(),
        "curvature": curvature_key,
        "test": {f: fingerprints["test"].get(f) for f in folders},
        "images": [[it.folder, it.label, it.n, it.index] for it in group],
        "score_batch": int(score_batch),
    }
    text = json.dumps(what, sort_keys=True, default=str)
    return Path(spec.parts) / hashlib.sha256(text.encode()).hexdigest()[:20]


def _part_ok(path, t, n):
    """True when ``path`` holds a finished shard's (t, n, L) scores; a bad file is removed."""
    if not path.is_file():
        return False
    try:
        shape = np.load(path, mmap_mode="r").shape
    except (OSError, ValueError, EOFError):
        shape = None
    if shape is not None and len(shape) == 3 and shape[:2] == (t, n):
        return True
    path.unlink(missing_ok=True)
    return False


def score_sharded(cluster, spec, train, stacked, score_batch, parts, progress_desc="scoring"):
    """:func:`influence.backends.score_archive` over Ray: float32 (T, N, L), in archive order.

    ``spec``: the workers' :class:`WorkerSpec`; ``train``: the driver's archive (the same file). Shards
    whose part is already in ``parts`` (see :func:`group_parts`) are not scored again.
    """
    from influence.io import atomic_write

    shards = plan_shards(train)
    stacked = [np.asarray(p) for p in stacked]
    t = int(stacked[0].shape[0])
    parts = Path(parts)
    parts.mkdir(parents=True, exist_ok=True)
    info = parts / "group.json"
    if not info.exists():
        with atomic_write(info) as tmp:
            tmp.write_text(json.dumps({"test_images": t, "shards": [s.name for s in shards]}))
    done = [s for s in shards if _part_ok(parts / f"{s.name}.npy", t, len(s))]
    todo = [s for s in shards if s not in done]
    if done:
        log.info("scoring: %d of %d shard(s) already scored in %s: skipped", len(done), len(shards), parts)
    if todo:
        ref = cluster.ray.put(stacked)
        task = _remote(cluster, score_shard)
        pids = set()
        t0 = time.perf_counter()
        with progress(total=sum(len(s) for s in todo), desc=progress_desc, unit="img") as bar:
            def finished(index, value):
                pids.add((value["node"], value["pid"]))
                log.debug("scoring: shard %s scored by pid %d on %s in %.2f s", todo[index].name, value["pid"],
                          value["node"], value["seconds"])
                bar.update(len(todo[index]))

            _run(cluster, task, [(i, (spec, s.batches, ref, str(parts / f"{s.name}.npy"), score_batch))
                                 for i, s in enumerate(todo)], finished)
        del ref
        log.debug("scoring: %d shard(s) in %.1f s by %d worker process(es)", len(todo), time.perf_counter() - t0,
                  len(pids))
    out = None
    for s in shards:
        arr = np.load(parts / f"{s.name}.npy")
        if out is None:
            out = np.empty((t, len(train), arr.shape[2]), np.float32)
        out[:, s.start:s.stop] = arr
    return out


class RayBackend:
    """The :mod:`influence.backends` interface over Ray: the kfac/ekfac/pcg fit and krylov/dpcg's products
    sharded (:func:`fit`), scoring sharded (:func:`score_sharded`) with each
    :class:`influence.backends.Work`'s shard scores kept under ``spec.parts`` until :meth:`release`.

    ``spec``: the :class:`WorkerSpec` of the :class:`influence.Influence` it serves
    (:meth:`influence.Influence.worker_spec`): the workers rebuild everything from it alone. ``workers``:
    local worker slots (started on first use unless a Ray runtime is running), or at most that many tasks
    at once on the cluster at ``address``.
    """

    name = "ray"

    def __init__(self, spec, *, workers=0, address=None):
        if not isinstance(spec, WorkerSpec):
            raise TypeError(f"RayBackend takes a WorkerSpec (Influence.worker_spec()), got {type(spec).__name__}")
        self.spec, self.workers, self.address = spec, int(workers or 0), address or None
        self._parts = {}

    def _connect(self):
        return _connect(self.workers, self.address)

    def _check(self, key):
        if key.get("weights", self.spec.weights_fingerprint) != self.spec.weights_fingerprint:
            raise UserError("the model's weights changed after its Ray worker spec was made: build the Influence "
                            "(and its backend) again")

    def fit(self, solver, archive, *, chunk, key):
        self._check(key)
        fit(solver, self.spec, self._connect, chunk)

    def score(self, scorer, archive, stacked, score_batch, *, key, work=None, desc="scoring"):
        """Shares (T, N, L); ``scorer`` is the driver's (each worker builds its own)."""
        self._check(key)
        if work is None:                  # nothing to resume: a folder of its own, removed at once
            import uuid

            parts = Path(self.spec.parts) / f"call-{uuid.uuid4().hex[:12]}"
            try:
                return score_sharded(self._connect(), self.spec, archive, stacked, score_batch, parts,
                                     progress_desc=desc)
            finally:
                remove_parts(parts)
        parts = group_parts(self.spec, key, work.fingerprints, work.items, score_batch)
        self._parts[id(work)] = parts
        return score_sharded(self._connect(), self.spec, archive, stacked, score_batch, parts, progress_desc=desc)

    def release(self, work):
        parts = self._parts.pop(id(work), None)
        if parts is not None:
            remove_parts(parts)


def remove_parts(parts):
    """Delete one group's parts once its outputs are written."""
    shutil.rmtree(parts, ignore_errors=True)
