"""``--solver store``: log once, query many (issue 31).

One pass over the training archive writes every training image's gradient, projected per layer on both
sides (:mod:`influence.store.projection`), to an on-disk store (:mod:`influence.store.shards`), and sums
the Gauss–Newton matrix in the projected space from the same pass::

    C = (1/n) Σ_i Σ_{c ∈ classes(i)} p_ic (R g_ic)(R g_ic)ᵀ + R ∇²Ω Rᵀ                 (D, D)

``g_ic`` the gradient of image ``i``'s loss with label ``c``, ``classes(i)`` as the ``fisher`` setting says
(``auto``: every class up to 10, else the 10 most probable: ``top:K``; ``empirical``: the true label), across all
layers (the cross-layer blocks are summed too; ``store_curvature`` says whether they are inverted: ``blocks``
inverts each layer's diagonal block ``C_ll`` alone, as LoGra and EK-FAC keep layers apart, ``dense`` the whole
``C``, ``auto`` the first where ``solver auto`` would not take krylov; :mod:`influence.store.damping`). The fit forms,
in float64, what its damping needs and the curvature cache keeps it with ``C``: a number λ the eigendecomposition
of ``C`` (then every λ changes only the per-test formula), a relative or ``optimizer`` damping one inverse of ``C +
Λ`` (at D = 4 096 seven times cheaper than the eigendecomposition, which it never needs); a rerun at the same
damping forms nothing. A test image's scores are one product::

    score(i, t) = (R g_i)ᵀ (C + λI)⁻¹ (R g_t)

with the store's rows ``R g_i`` (``C`` as its structure says); its per-layer shares are the products of each
layer's block. With ``D = P`` the projection is orthogonal and the scores are those of the Gauss–Newton matrix's
per-layer blocks (``dense``: the exact Gauss–Newton solver's). A relative damping (``0.1x``; ``auto`` is
``optimizer`` when the model holds its training state, :mod:`influence.curvature.choice`) is per layer, as
EK-FAC's: ``Λ = f × trace(C_ll)/D_l`` on layer ``l``'s coordinates (on the LDS panel's ``bn-brief`` at D = 1024:
0.211 at 1x against 0.119 with one λ from the mean eigenvalue of the whole C; ``mlp-brief`` 0.344 against 0.353).
Damping ``optimizer`` (per parameter, ``c·D`` from the training run) is projected as the curvature is: ``(C + c·R
diag(D) Rᵀ)⁻¹`` (:meth:`~influence.store.projection.Projection.projected_diagonal`), exact at ``D = P``.

The store lives next to the curvature cache (``<cache>/store-<digest>``, :meth:`StoreSolver.attach`);
without a cache, in a temporary folder removed with the solver. ``C`` (with its eigenvectors) is the
state the curvature cache keeps; a run that loads it scores new test images with no training pass.
"""
import logging
import math
import tempfile
import time

import numpy as np
import tensorflow as tf

from influence.curvature.base import InverseHVP, TrainingSums
from influence.curvature.kfac.plan import KronBlock, make_plan
from influence.curvature.kfac.signals import (LayerSignals, check_fisher, image_of_rows, kron_inputs,
                                              resolve_fisher)
from influence.errors import SettingError, UserError
from influence.model.taps import linear_kind
from influence.model.vectors import vec_size
from influence.progress import progress as progress_bar
from influence.settings import (MEMORY_BUDGET_GB, bytes_to_gb, gb_to_bytes, parse_store_dim,
                                store_curvature_problem, store_projection_problem)
from influence.store.damping import DampedCurvature
from influence.store.projection import Projection, kfac_projection, layer_dims
from influence.store.shards import LOCK_NAME, GradientStore, key_digest, prune_stores

log = logging.getLogger(__name__)

#: share of ``memory_budget`` the projected curvature may take at ``store_dim auto``: ``C``, its
#: eigenvectors and the decomposition's workspace, 3 D² float64
CURVATURE_SHARE = 0.5
#: ``make_plan``'s ``max_block`` for the store, whose layer blocks are never split: a factor's side in rows
#: (not bytes), above any layer's width
UNSPLIT = 1 << 30
#: what the curvature key says of each ``store_projection`` (the random one's text predates the setting: its
#: caches stay valid)
PROJECTION_KEYS = {"random": "orthonormal rows, per layer both sides",
                   "kfac": "top eigenvectors of each layer's K-FAC factors, per layer both sides"}
#: ``store_dim auto`` never exceeds this (a dense float64 eigendecomposition of D³ flops)
AUTO_MAX_DIM = 8192


def auto_dim(num_params, memory_budget):
    """D of ``store_dim auto``: the largest with ``3 · 8 D²`` bytes within :data:`CURVATURE_SHARE` of
    ``memory_budget`` GB, at most :data:`AUTO_MAX_DIM` and the parameter count."""
    cap = AUTO_MAX_DIM
    if memory_budget is not None:
        cap = min(cap, int(math.sqrt(CURVATURE_SHARE * gb_to_bytes(memory_budget) / 24)))
    return int(max(1, min(cap, num_params)))


def store_dims(store_dim, num_params, memory_budget):
    """``(the setting parsed, D)``: ``store_dim`` auto (:func:`auto_dim`) or as given, at most ``num_params``;
    SettingError when its dense curvature (3 D² float64) exceeds ``memory_budget``."""
    asked = parse_store_dim(store_dim)
    target = auto_dim(num_params, memory_budget) if asked == "auto" else min(asked, num_params)
    if asked != "auto" and memory_budget is not None and 24 * target ** 2 > gb_to_bytes(memory_budget):
        raise SettingError("store_dim", f"{asked} needs {bytes_to_gb(24 * target ** 2):.3g} GB for its dense "
                                        f"{target}x{target} curvature, above memory_budget {memory_budget:g} GB: "
                                        f"choose a smaller store_dim or a larger memory_budget")
    return asked, target


def store_fisher(fisher, num_classes):
    """The ``fisher`` setting resolved for the store (:func:`resolve_fisher`); SettingError for ``sampled``."""
    check_fisher(fisher, num_classes)
    resolved = resolve_fisher(fisher, num_classes)
    if resolved == "sampled":
        raise SettingError("fisher", "solver store takes auto, true, top:K or empirical (its curvature sums "
                                     "the Gauss-Newton terms of the most probable classes), not sampled")
    return resolved


def project_records(projection, signals, grouped, rows, dtype=tf.float64):
    """(rows, D) float64: the projected per-image gradients of the tapped records ``grouped`` (by layer id), a
    Kronecker layer's formed from its projected inputs and backward signals (:mod:`influence.store.projection`)
    in ``dtype`` (the model's: a conv layer's inputs and signals at every position are the pass's largest
    tensors, on VGG16 several GB a chunk in float64), the projected (small) result in float64."""
    parts = []
    for index, (b, mats) in enumerate(zip(projection.plan, projection.mats)):
        recs = grouped.get(id(b.layer))
        if not recs:
            parts.append(tf.zeros([rows, projection.sizes[index]], tf.float64))
            continue
        if isinstance(b, KronBlock):
            a, dl, _ = kron_inputs(b, recs, dtype)                            # (N, P, K1), (R·N, P, C)
            a = tf.einsum("npk,dk->npd", a, tf.constant(mats[0], dtype))
            dl = tf.einsum("rpc,ec->rpe", dl, tf.constant(mats[1], dtype))
            a = tf.gather(a, image_of_rows(tf.shape(dl)[0], tf.shape(a)[0]))
            g = tf.cast(tf.einsum("rpd,rpe->rde", a, dl), tf.float64)
            parts.append(tf.reshape(g, [tf.shape(g)[0], -1]))
        else:
            grads = signals.per_image_grads(b, recs)
            flat = tf.concat([tf.reshape(g, [tf.shape(g)[0], -1]) for g in grads], axis=1)
            parts.append(tf.matmul(flat, tf.constant(mats[0]), transpose_b=True))
    return tf.concat(parts, axis=1)


def write_shard(store, k, step, archive, chunk, compute, bar=None):
    """Write shard ``k`` of ``store`` from ``step(x, y) -> (fisher rows, gradients)`` on ``archive``'s images,
    ``chunk`` at a time from the shard's first image; returns the fisher rows' Gram sum over the shard ((D, D)
    float64: each chunk's product in ``compute``, the model's dtype, where float32 is twice as fast, added from
    zero in chunk order), the same in any process (a Ray worker's shard, :mod:`influence.backends.ray_driver`)."""
    start, stop = store.bounds(k)
    rows = np.empty((stop - start, store.dim))
    total = np.zeros((store.dim, store.dim))
    for s in range(start, stop, chunk):
        idx = np.arange(s, min(s + chunk, stop))
        x, y = archive.take(idx)
        fisher_rows, grads = step(x, np.asarray(y, np.int64).reshape(-1))
        fisher_rows = fisher_rows.numpy().astype(compute, copy=False)
        total += fisher_rows.T @ fisher_rows
        rows[s - start:s - start + len(idx)] = grads.numpy()
        if bar is not None:
            bar.update(len(idx))
    store.write_shard(k, rows)
    return total


def store_structure(store_curvature, clf, memory_budget):
    """``(structure, why)`` of the ``store_curvature`` setting: as given (why None), or ``auto``'s
    (:func:`influence.curvature.choice.per_layer_structure`, its reason logged); SettingError for another value."""
    problem = store_curvature_problem(store_curvature)
    if problem:
        raise SettingError("store_curvature", problem)
    if store_curvature != "auto":
        return store_curvature, None
    from influence.curvature.choice import per_layer_structure

    structure, why = per_layer_structure(clf, memory_budget)
    log.info("store: %s", why)
    return structure, why


def store_products(pre, store, offsets, block_rows=4096):
    """float32 (T, N, L): each part ``[offsets[l], offsets[l+1])`` of the preconditioned test vectors ``pre`` (T, D)
    against the same part of every stored row of ``store``, a block of ``block_rows`` rows read at a time."""
    out = np.empty((len(pre), store.n, len(offsets) - 1), np.float32)
    for start, rows in store.blocks(block_rows):
        for index in range(len(offsets) - 1):
            s, e = offsets[index], offsets[index + 1]
            out[:, start:start + len(rows), index] = pre[:, s:e] @ rows[:, s:e].T
    return out


class StoreSolver(DampedCurvature, InverseHVP):
    """The gradient store and the dense projected Gauss–Newton matrix (module docstring)."""

    name = "store"
    summary = ("training gradients projected per layer (D dims) and stored once on disk; the projected "
               "Gauss-Newton matrix inverted densely, whole or per layer; each test image is one product with the "
               "store")
    #: tests/test_curvature_contract.py: at D = P, ``(G + λI)⁻¹`` of the Gauss–Newton matrix's per-layer blocks
    #: (``store_curvature blocks``); an instance says ``"ggn"`` (the whole matrix) when its structure is ``dense``
    approximates = "ggn-blocks"
    #: a relative damping is per layer, as EK-FAC's: λ_l = factor × the mean eigenvalue of layer l's diagonal
    #: block of C (its trace / D_l); a number is one λ for every direction
    relative_damping = "blocks"
    self_influence_route = "projected gradients"
    takes_diagonal = True        # damping optimizer: C + c·R diag(D) Rᵀ (module docstring)

    def __init__(self, objective, damping, store_dim="auto", fisher="auto", seed=0, memory_budget=MEMORY_BUDGET_GB,
                 store_projection="kfac", store_curvature="auto", progress=True):
        super().__init__(objective, damping, progress)
        d = objective.d
        clf = d.clf
        if not clf.supports_tap:
            raise UserError(f"solver store needs a functional Keras model whose layers can be tapped; "
                            f"{clf.model.name} is not one: use solver ekfac or krylov")
        self.fisher = store_fisher(fisher, clf.num_classes)
        self.seed = int(seed)
        self.memory_budget = memory_budget
        kinds = {id(g.layer): linear_kind(g.layer) for g in clf.groups}
        self.plan = make_plan(clf.groups, kinds, UNSPLIT, True, self.name)
        p = vec_size(d.variables)
        self.dim_setting, target = store_dims(store_dim, p, memory_budget)
        self.projection = Projection(self.plan, layer_dims(self.plan, target), self.seed)
        problem = store_projection_problem(store_projection)
        if problem:
            raise SettingError("store_projection", problem)
        self.projection_kind = store_projection
        self.structure, why = store_structure(store_curvature, clf, memory_budget)    # what is inverted of C
        self.approximates = "ggn-blocks" if self.structure == "blocks" else "ggn"
        self._eigen = False          # kfac: the projection is on the factors' eigenvectors (fitted or loaded)
        self.signals = LayerSignals(d, kinds, d.variables, self.fisher)
        self._compiled = None
        self._root = None            # the folder the store lives in (attach), else a temporary one
        self._tmp = None
        self._digest = None
        self._held = None            # the store's in-use lock (GradientStore.hold) while this solver uses it
        self._evals = self._evecs = self._trace = None       # eigenvalues and eigenvectors of C (undamped), its trace
        self._inverse_held, self._inverse_of = None, None
        self._response_projected = None      # R diag(D) Rᵀ of damping optimizer, (D, D) float64, once
        self.info.update(fisher=self.fisher, store_dim=self.projection.dim, num_params=p, projection=store_projection,
                         store_curvature=self.structure, store_curvature_why=why,
                         layer_dims=[list(x) for x in self.projection.dims])

    # --- where the store lives ---------------------------------------------------------------------
    def cache_key(self):
        return {"store_dim": self.projection.dim, "layer_dims": [list(x) for x in self.projection.dims],
                "fisher": self.fisher, "seed": self.seed, "projection": PROJECTION_KEYS[self.projection_kind]}

    def attach(self, folder, key):
        """Keep the store under ``folder`` (the curvature cache), named by the curvature ``key``."""
        self._root = None if folder is None else folder
        self._digest = key_digest(key)

    def store(self):
        """The :class:`GradientStore` of this solver (under the attached folder, else a temporary one)."""
        if self._root is None:
            if self._tmp is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="influence-store-")
            self._root = self._tmp.name
        if self._digest is None:         # not attached: keyed by what the rows depend on
            from influence.curvature.cache import model_fingerprint

            self._digest = key_digest({"solver": self.cache_name, "n": self.obj.n, **self.cache_key(),
                                       "train": self.obj.archive.fingerprint(),
                                       "weights": model_fingerprint(self.obj.d.clf.model)})
        digest = self._digest if not self._eigen else key_digest([self._digest, self.projection.fingerprint()])
        return GradientStore(self._root, digest, self.obj.n, self.projection.dim)

    def _hold(self, store):
        """Hold ``store``'s in-use lock (one at a time) so that another process's :func:`prune_stores` keeps it."""
        if self._held is None or self._held.name != str(store.folder / LOCK_NAME):
            if self._held is not None:
                self._held.close()
            self._held = store.hold()

    # --- the one training pass -----------------------------------------------------------------------
    def _chunk_fn(self):
        """Compiled ``(x, y) -> (fisher rows (R·N, D), gradients (N, D))``, float64."""
        if self._compiled is None:
            d = self.obj.d
            self._compiled = tf.function(self._project_chunk, input_signature=[d.x_spec, d.y_spec])
        return self._compiled

    def _project_chunk(self, x, y):
        n, dtype = tf.shape(y)[0], self.obj.d.dtype
        true = self.signals.signals(x, y, None, true_labels=True)
        grads = project_records(self.projection, self.signals, true, n, dtype)
        if self.fisher == "empirical":
            return grads, grads
        grouped = self.signals.signals(x, y, None)
        rows = n * (self.obj.d.clf.num_classes if self.fisher == "true"
                    else min(int(self.fisher[4:]), self.obj.d.clf.num_classes))
        return project_records(self.projection, self.signals, grouped, rows, dtype), grads

    def fit(self, sums=None):
        """One pass: each shard's projected gradients written, ``C`` summed (resuming a partial write). ``sums``
        (:class:`~influence.curvature.base.TrainingSums`; a Ray backend's shards them) serves the K-FAC pass of
        ``store_projection kfac`` and writes the store's shards (:meth:`write_shard`), whose Gram sums are added
        here in shard order: the same bits in one process and over any number of workers."""
        sums = TrainingSums() if sums is None else sums
        if self.projection_kind == "kfac" and not self._eigen:
            self._set_projection(kfac_projection(self.projection, self.obj, self.fisher, self.memory_budget, sums,
                                                 self.progress))
        store = self.store()
        store.open_for_writing()
        self._hold(store)
        total, first = store.checkpoint()
        if total is None:
            total, first = np.zeros((store.dim, store.dim)), 0
        elif first:
            log.info("store: resuming %s: %d of %d shard(s) already written", store.folder, first, store.shards)
        t0 = time.perf_counter()

        def add(k, gram):
            """Shard ``k``'s Gram sum, in shard order; checkpointed after each shard but the last."""
            total[...] += gram
            if k + 1 < store.shards:
                store.save_checkpoint(total, k + 1)

        done = store.bounds(first)[0] if first < store.shards else store.n
        with progress_bar(total=store.n - done, desc="store: projected gradients", unit="img",
                          disable=not self.progress) as bar:
            sums.store_pass(self, store, first, add, bar)
        store.finish()
        if self._tmp is None:            # under the cache: the whole stores of other settings are never read again
            prune_stores(store.folder.parent, store.digest)
        curvature = total / max(store.n, 1) + self.projection.regulariser()
        self._set_curvature(0.5 * (curvature + curvature.T))
        if self._inverse() is None:      # what this damping needs, formed now and cached with C (state())
            self._decomposition()
        self.info.update(store=str(store.folder), store_bytes=store.nbytes(), store_seconds=time.perf_counter() - t0)
        log.info("store: %d training gradients of %d dims in %s (%.1f MB), curvature %dx%d", store.n, store.dim,
                 store.folder, store.nbytes() / 2**20, store.dim, store.dim)

    def write_shard(self, store, k, bar=None):
        """Write shard ``k`` of ``store`` (:func:`write_shard`) -> its (D, D) float64 Gram sum of fisher rows."""
        return write_shard(store, k, self._chunk_fn(), self.obj.archive, max(1, int(self.obj.chunk)),
                           self.obj.d.dtype.as_numpy_dtype, bar)

    def adopt_projection(self, arrays):
        """A Ray worker's solver takes the driver's fitted projection (``arrays``: :meth:`Projection.arrays`;
        None for the seeded random one, which every process builds alike)."""
        if arrays is not None:
            projection = self.projection.with_arrays(arrays)
            if not self._eigen or projection.fingerprint() != self.projection.fingerprint():
                self._set_projection(projection)

    def _set_projection(self, projection):
        """Adopt the K-FAC eigenvector projection (the compiled pass is traced again with it)."""
        self.projection, self._eigen, self._compiled = projection, True, None

    def state(self):
        """``C`` and what its damping needs (:meth:`curvature_state`), and a fitted projection's matrices (the rows
        on disk were made with them)."""
        state = self.curvature_state()
        return {**state, **self.projection.arrays()} if self._eigen else state

    def load_state(self, arrays):
        if self.projection_kind == "kfac":
            self._set_projection(self.projection.with_arrays(arrays))
        store = self.store()
        if store.folder.is_dir():
            self._hold(store)            # before the check: prune_stores removes only the stores no one holds
        if not store.complete():
            raise ValueError(f"the gradient store {store.folder} is missing or incomplete")
        self.adopt_curvature_state(arrays, self.projection.dim)
        self.info.update(store=str(store.folder), store_bytes=store.nbytes())

    def resolved_facts(self):
        """For the resume check: ``{fact resolved from auto: (value, what a run that did not record it used)}``."""
        return {"store_dim": (self.projection.dim, None), "store_curvature": (self.structure, "dense")}

    def share_fit(self, other):
        """Take the fitted store and ``C`` of ``other`` (a StoreSolver of the same :meth:`cache_key`, either structure:
        :meth:`share_curvature`) -> whether it was taken."""
        if other.cache_key() != self.cache_key() or not self.share_curvature(other):
            return False
        self.projection, self._eigen, self._compiled = other.projection, other._eigen, None
        self._root, self._tmp, self._digest = other._root, other._tmp, other._digest
        self._response_projected = other._response_projected
        store = self.store()
        self._hold(store)
        self.info.update(store=str(store.folder), store_bytes=store.nbytes())
        return True

    def mean_eigenvalue(self):
        """The projected matrix's exact ``trace(C)/D`` (fits on first use)."""
        if self._trace is None:
            self.fit()
        return self._trace / self.projection.dim, 0.0, 0

    @property
    def resident_bytes(self):
        """``C``, its eigenvectors and (a per-layer damping) ``(C + Λ)⁻¹``, float64; with damping ``optimizer``
        also ``R diag(D) Rᵀ``."""
        return (4 if self.damping_spec.optimizer else 3) * 8 * self.projection.dim ** 2

    # --- per test image -------------------------------------------------------------------------------
    def _ready(self):
        if self._curvature is None:
            self.fit()

    def project(self, vectors):
        """(T, D) float64 projected gradients of full-space Vecs."""
        return np.stack([self.projection.project(vec) for vec in vectors]) if len(vectors) else \
            np.zeros((0, self.projection.dim))

    def solve(self, vectors, ids=None):
        """``Rᵀ (C + λI)⁻¹ R v`` as full-space Vecs (``(G + λI)⁻¹ v`` at D = P)."""
        vectors = list(vectors)
        if not vectors:
            return []
        like = self.obj.d.variables
        sol = self.preconditioned(self.project(vectors))
        return [tuple(tf.constant(a, dtype=v.dtype) for a, v in zip(self.projection.back_project(z, like), like))
                for z in sol]

    def store_shares(self, vectors, block_rows=4096, per_layer=True):
        """float32 (T, N, L) per-layer scores of every stored training image against the test gradients
        ``vectors`` (full-space Vecs): one product with the store, no pass over the training archive; (T, N)
        totals without ``per_layer`` (:meth:`store_scores`)."""
        self._ready()
        pre = self.preconditioned(self.project(list(vectors))).astype(np.float32)
        out = store_products(pre, self.store(), self.projection.offsets if per_layer else [0, self.projection.dim],
                             block_rows)
        return out if per_layer else out[..., 0]

    def store_scores(self, vectors):
        """float32 (T, N): the scores of :meth:`store_shares` summed over the layers (``--calibrate``'s cells)."""
        return self.store_shares(vectors, per_layer=False)

    def self_influence_batch(self, x, y):
        """``(R g_i)ᵀ (C + λI)⁻¹ (R g_i)`` of each image with its own label: (N, H, W, C), (N,) -> float64 (N,)."""
        self._ready()
        y = np.asarray(y, np.int64).reshape(-1)
        if not len(y):
            return np.zeros(0)
        _, grads = self._chunk_fn()(x, y)
        z = grads.numpy()
        return np.einsum("nd,nd->n", self.preconditioned(z), z)

