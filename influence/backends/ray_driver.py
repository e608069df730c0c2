"""Scale-out with Ray, the driver's side: shard plans, the sharded fit's sums, sharded scoring with its
parts files, and :class:`RayBackend` (the :mod:`influence.backends` interface over Ray).

Both heavy jobs are sums over the training archive, so both split into **shards** (at most
:data:`MAX_SHARDS`, the same layout whatever the number of workers, so a rerun with other workers
still finds its finished shards and gets the same bits): scoring into runs of whole archive batches
(:func:`plan_shards`), fitting into runs of whole fitting chunks (:func:`plan_fit_shards`).

* **Fitting**: the backend calls ``solver.fit(sums=RaySums(...))``; a solver whose fit is a sum over
  the training set takes it from that object (:class:`influence.curvature.base.TrainingSums`): the
  K-FAC family (kfac, ekfac, pcg's preconditioner) its two passes' float64 sums, krylov (and dpcg's
  basis) every Lanczos product ``A v``, the store (``--solver store``) its shards' Gram sums (in the store's own
  shards, each task writing its shard's files itself). Each shard's task (:mod:`influence.backends.ray_worker`) returns
  its share; the driver adds them up in shard order (:func:`sharded_sum`). Up to :data:`MAX_SHARDS`
  chunks a shard is one chunk, so the driver adds the very chunk sums one process adds, in the same
  order: the fit is bit for bit the one-process fit (on identical hardware), whatever the number of
  workers. Beyond that the per-shard sums group the additions otherwise (still the same for any number
  of workers; last-bit differences from one process). Other solvers fit in the driver, as without Ray.
* **Scoring**: the driver puts a group's inverse-HVPs into the object store once; each shard's task
  scores its training images exactly as :func:`influence.backends.local.score_archive` does (same
  batches, same ``--score-batch`` steps, so the same numbers) and writes its slice of every test image's
  scores atomically as ``<parts>/<group key>/<first>-<last>.npy``. The driver assembles them and the
  engine writes the usual outputs; a group's parts are removed once its outputs are written.

Workers are built from the :class:`influence.backends.ray_worker.WorkerSpec` that
:meth:`influence.Influence.worker_spec` makes (never from calculate.py's settings). The group key
(:func:`group_parts`) covers the spec's settings that change the numbers, the model weights, the
training archive, the test images of the group and their order, so a rerun after a killed driver skips
the shards it finds only when they are the same work.

Workers read ``train.npz`` (memory-mapped) and write the parts folder (calculate.py: ``<out>/parts``) at
the driver's absolute paths: on a cluster these must be on a shared filesystem, or (the archive only)
copied to the same path on every node. An :class:`influence.Influence` whose training set is in memory
has no such path: Ray refuses it.
"""
import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np

from influence.backends.ray_runtime import RayRuntime
from influence.backends.ray_worker import WorkerSpec, fit_shard, product_shard, score_shard, store_shard
from influence.curvature.base import TrainingSums
from influence.errors import UserError
from influence.progress import progress

log = logging.getLogger(__name__)

#: most shards of the training archive (each a run of whole archive batches)
MAX_SHARDS = 64
#: folder under --out holding the scores of shards not yet assembled
PARTS = "parts"


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


# ----------------------------------------------------------------------------- the sharded fit

class RaySums(TrainingSums):
    """The sums over the training set a fit takes (:class:`influence.curvature.base.TrainingSums`), each
    one sharded over Ray (:func:`plan_fit_shards` of ``chunk``) and added in shard order. ``spec``: the
    workers' :class:`WorkerSpec`; ``runtime``: the :class:`influence.backends.ray_runtime.RayRuntime`
    (connected only when a sum is asked for: a solver whose fit takes none runs in the driver)."""

    def __init__(self, spec, runtime, chunk):
        self.spec, self.runtime, self.chunk = dataclasses.replace(spec, chunk=int(chunk)), runtime, int(chunk)

    def _shards(self, n, what):
        if n < 1:
            raise UserError("the training archive is empty")
        shards = plan_fit_shards(n, self.chunk)
        log.info("%s over %d training images in %d shards of %d images over Ray", what, n, len(shards),
                 shards[0][1] - shards[0][0])
        return shards

    def factor_sums(self, kfac):
        cluster = self.runtime.cluster()
        shards = self._shards(kfac.obj.n, f"{kfac.name}: pass 1")
        task = cluster.remote(fit_shard)
        return sharded_sum(cluster, task, shards, lambda a, b: (self.spec, type(kfac), a, b, None),
                           f"{kfac.name} factors")

    def eigen_sums(self, kfac):
        cluster = self.runtime.cluster()
        shards = self._shards(kfac.obj.n, f"{kfac.name}: pass 2")
        task = cluster.remote(fit_shard)
        basis = cluster.ray.put(kfac.eigenbasis())          # sent to the workers once
        return sharded_sum(cluster, task, shards, lambda a, b: (self.spec, type(kfac), a, b, basis),
                           f"{kfac.name} eigenvalues")

    def product(self, obj):
        """``v -> A v`` over the whole training set of ``obj`` (a TrainingObjective: its matrix), every
        product's shares (:func:`influence.backends.ray_worker.product_shard`) added in shard order in the
        model's dtype: bit for bit ``obj.hvp_full`` when each shard is one chunk."""
        from influence.model.vectors import numpy_to_vec, vec_to_numpy

        cluster = self.runtime.cluster()
        spec = dataclasses.replace(self.spec, hessian=obj.hessian)
        shards = self._shards(obj.n, "krylov: each Lanczos product")
        task = cluster.remote(product_shard)
        dtype = np.dtype(obj.d.dtype.as_numpy_dtype)
        like = obj.d.variables

        def product(v):
            flat = cluster.ray.put(vec_to_numpy(v).astype(dtype))
            total = sharded_sum(cluster, task, shards, lambda a, b: (spec, a, b, flat), None, dtype=dtype)
            return numpy_to_vec(total["product"], like)

        return product

    def store_pass(self, store_solver, store, first, add, bar):
        """The gradient store's shards ``first``.. written by Ray tasks (:func:`influence.backends.ray_worker.
        store_shard`; one task a shard, writing its files into ``store.folder``, which every node must see),
        their Gram sums handed to ``add`` in shard order: the same bits as one process's pass."""
        cluster = self.runtime.cluster()
        todo = list(range(first, store.shards))
        if not todo:
            return
        log.info("store: %d shard(s) of up to %d training images over Ray, written to %s", len(todo), store.rows,
                 store.folder)
        task = cluster.remote(store_shard)
        arrays = store_solver.projection.arrays() if store_solver.projection_kind == "kfac" else None
        projection = cluster.ray.put(arrays)                    # sent to the workers once
        layout = (str(store.folder.parent), store.digest, store.n, store.dim, store.rows)

        def consume(index, value):
            k = todo[index]
            log.debug("store: shard %d written by pid %d on %s in %.2f s", k, value["pid"], value["node"],
                      value["seconds"])
            add(k, value["sums"]["gram"])
            start, stop = store.bounds(k)
            bar.update(stop - start)

        on_result, held = in_shard_order(consume)
        cluster.run(task, [(i, (self.spec, projection, layout, k)) for i, k in enumerate(todo)], on_result,
                    held=held)


def in_shard_order(consume):
    """``(on_result, held)`` for :meth:`Cluster.run`: results arrive in any order, and ``consume(index, value)``
    sees them in index order (those that came early are buffered; ``held()`` counts them, so the run's window
    keeps finished-but-waiting results in check)."""
    buffered, nxt = {}, [0]

    def on_result(index, value):
        buffered[index] = value
        while nxt[0] in buffered:
            consume(nxt[0], buffered.pop(nxt[0]))
            nxt[0] += 1

    return on_result, lambda: len(buffered)


def sharded_sum(cluster, task, shards, args, desc, dtype=np.float64):
    """Σ over the ``(start, stop)`` shards of the tasks' ``{key: array}`` (task arguments ``args(start,
    stop)``), added in ``dtype`` in shard order (so the sum does not depend on which shard finished first,
    nor on the number of workers): ``((s0 + s1) + s2) + ...``, the order of one process's running sum
    when each shard is one chunk. ``desc``: the progress bar's (None: no bar)."""
    total = None

    def add(index, value):
        nonlocal total
        log.debug("%s: images %d-%d summed by pid %d on %s in %.2f s", desc, *shards[index], value["pid"],
                  value["node"], value["seconds"])
        part = value["sums"]
        if total is None:
            total = {k: np.array(v, dtype) for k, v in part.items()}
        else:
            for k, v in part.items():
                total[k] += v
        bar.update(shards[index][1] - shards[index][0])

    on_result, held = in_shard_order(add)
    with progress(total=shards[-1][1], desc=desc or "", unit="img", disable=desc is None) as bar:
        cluster.run(task, [(i, args(start, stop)) for i, (start, stop) in enumerate(shards)], on_result, held=held)
    return total


# ----------------------------------------------------------------------------- sharded scoring

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
    """:func:`influence.backends.local.score_archive` over Ray: float32 (T, N, L), in archive order.

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
        task = cluster.remote(score_shard)
        pids = set()
        t0 = time.perf_counter()
        with progress(total=sum(len(s) for s in todo), desc=progress_desc, unit="img") as bar:
            def finished(index, value):
                pids.add((value["node"], value["pid"]))
                log.debug("scoring: shard %s scored by pid %d on %s in %.2f s", todo[index].name, value["pid"],
                          value["node"], value["seconds"])
                bar.update(len(todo[index]))

            cluster.run(task, [(i, (spec, s.batches, ref, str(parts / f"{s.name}.npy"), score_batch))
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


def remove_parts(parts):
    """Delete one group's parts once its outputs are written."""
    shutil.rmtree(parts, ignore_errors=True)


# ----------------------------------------------------------------------------- the backend

def spec_of(inf, parts=None):
    """The :class:`WorkerSpec` of :class:`influence.Influence` ``inf``: its model file or name, weights,
    preprocess, params, hessian, solver with its parsed damping and options (its own), the training
    archive's path, the fingerprints a worker checks, and ``parts``: the folder of the shard scores
    (default ``<cache>/parts``, or a folder under the system's temporary folder without a cache). Paths
    are absolute. A training set in memory, or a model object, has no path a worker could read: a
    one-line :class:`UserError`."""
    import tempfile

    from influence.data.archive_reader import TrainArchive

    if not isinstance(inf.train, TrainArchive):
        raise UserError(f"train: Ray needs a train.npz archive (its workers read it from disk), not a training "
                        f"set in memory ({type(inf.train).__name__}): write one with prepare_data.py, or run "
                        f"without workers")
    if inf.model_source is None:
        raise UserError(f"model: Ray needs a model file or keras.applications name (its workers load it), not a "
                        f"model object ({inf.model_name}): save it as .keras, or run without workers")

    def absolute(value):
        return str(Path(value).resolve()) if value and Path(value).exists() else value

    s = inf.settings
    if parts is None:
        parts = inf.cache / PARTS if inf.cache is not None else Path(tempfile.gettempdir()) / f"influence-{PARTS}"
    return WorkerSpec(model=absolute(s.model), weights=absolute(s.weights), preprocess=s.preprocess,
                      params=s.params, hessian=s.hessian, solver=inf.solver_name, damping=s.damping,
                      options=tuple(sorted(inf.solver_options().items())),
                      train=str(Path(inf.train.path).resolve()), train_fingerprint=inf.train.fingerprint(),
                      weights_fingerprint=inf.curvature_key["weights"], parts=str(Path(parts).resolve()),
                      chunk=int(inf.objective.chunk))


class RayBackend:
    """The :mod:`influence.backends` interface over Ray: the fit's sums sharded (:class:`RaySums`), scoring
    sharded (:func:`score_sharded`) with each :class:`influence.backends.base.Work`'s shard scores kept
    under ``spec.parts`` until :meth:`release`.

    ``spec``: the :class:`WorkerSpec` of the :class:`influence.Influence` it serves
    (:meth:`influence.Influence.worker_spec`): the workers rebuild everything from it alone. ``runtime``: the
    :class:`influence.backends.ray_runtime.RayRuntime` it runs on (lent: closed by its owner), or None: its
    own, with ``workers`` local worker slots (started on first use unless a Ray runtime is running) or at
    most that many tasks at once on the cluster at ``address``, shut down by :meth:`close` (a context
    manager).
    """

    name = "ray"

    def __init__(self, spec, *, workers=0, address=None, runtime=None):
        if not isinstance(spec, WorkerSpec):
            raise TypeError(f"RayBackend takes a WorkerSpec (Influence.worker_spec()), got {type(spec).__name__}")
        self.spec = spec
        self._owns = runtime is None
        self.runtime = RayRuntime(workers, address) if runtime is None else runtime
        self._parts = {}

    def _check(self, key):
        if key.get("weights", self.spec.weights_fingerprint) != self.spec.weights_fingerprint:
            raise UserError("the model's weights changed after its Ray worker spec was made: build the Influence "
                            "(and its backend) again")

    def fit(self, solver, archive, *, chunk, key):
        """``solver.fit(sums=...)`` with the training-set sums sharded over Ray (:class:`RaySums`): bit for
        bit ``solver.fit()``'s when the archive has at most :data:`MAX_SHARDS` chunks of ``chunk`` (the
        objective's), else equal to float rounding; never dependent on the number of workers."""
        self._check(key)
        solver.fit(sums=RaySums(self.spec, self.runtime, chunk))

    def score(self, scorer, archive, stacked, score_batch, *, key, work=None, desc="scoring"):
        """Shares (T, N, L); ``scorer`` is the driver's (each worker builds its own)."""
        self._check(key)
        cluster = self.runtime.cluster()
        if work is None:                  # nothing to resume: a folder of its own, removed at once
            import uuid

            parts = Path(self.spec.parts) / f"call-{uuid.uuid4().hex[:12]}"
            try:
                return score_sharded(cluster, self.spec, archive, stacked, score_batch, parts, progress_desc=desc)
            finally:
                remove_parts(parts)
        parts = group_parts(self.spec, key, work.fingerprints, work.items, score_batch)
        self._parts[id(work)] = parts
        return score_sharded(cluster, self.spec, archive, stacked, score_batch, parts, progress_desc=desc)

    def release(self, work):
        parts = self._parts.pop(id(work), None)
        if parts is not None:
            remove_parts(parts)

    def close(self):
        """Shut down the runtime this backend started (a lent one is its owner's to close)."""
        if self._owns:
            self.runtime.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
