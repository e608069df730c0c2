"""The per-layer projections of the gradient store (LoGra-style, both sides of each layer).

A Dense/Conv layer (a K-FAC :class:`~influence.curvature.kfac.plan.KronBlock`) has the per-image gradient
``G_n = Σ_p a_{n,p} δ_{n,p}ᵀ`` (K1, C): input patches with the bias column, and backward signals
(:mod:`influence.model.taps`). It is projected on both sides::

    G̃_n = R_in G_n R_outᵀ = Σ_p (R_in a_{n,p}) (R_out δ_{n,p})ᵀ          (d_in, d_out)

so a training image's projected gradient is formed from the projected ``a`` and ``δ`` without its
full gradient. ``R_in`` (d_in, K1) and ``R_out`` (d_out, C) are seeded random matrices with orthonormal
rows (a Gaussian matrix orthonormalised by QR): ``R = R_in ⊗ R_out`` has orthonormal rows too, and at
full size (d_in = K1, d_out = C) it is orthogonal, so ``Rᵀ (R M Rᵀ + λI)⁻¹ R = (M + λI)⁻¹`` exactly.
Any other layer with weights (a :class:`~influence.curvature.kfac.plan.DiagBlock`: BatchNorm, ...) has
one such matrix ``R`` (d, p) on its flattened per-image gradient.

``store_projection kfac`` (the default) takes a Kronecker layer's ``R_in`` and ``R_out`` from its K-FAC
factors instead: the ``d_in`` eigenvectors of ``A = E[a aᵀ]`` and the ``d_out`` of ``S = E[δ δᵀ]`` with the
largest eigenvalues (:func:`eigen_mats`; a factor split into diagonal blocks, ``ekfac_max_block``, gives each
eigenvector zeros outside its block), so the store keeps the directions where the layer's curvature is and
drops its flattest ones, which a model trained for finite time has hardly moved along. It costs K-FAC's first
pass over the training set, before the store's. Measured on the LDS panel (README, "The gradient store").

Dimensions (:func:`layer_dims`): the target ``D`` is shared equally by the layers, a layer taking at most
its own size (the smallest layers first, what they leave going to the others), so a small last layer stays
whole; a Kronecker layer's share ``D_l`` keeps its smaller side whole when that side is at most ``√D_l``
(else ``round(√D_l)`` of it) and ``D_l`` divided by that of the larger side. At ``D ≥ P`` every layer is
whole. Measured on the LDS panel's ``mlp-brief`` at D = 1024 (README, "The gradient store"): 0.353 at its
best damping, against 0.319 for shares proportional to the layers' sizes and 0.313 for those with both
sides cut by ``√(D/P)``, the first rule tried.

Vectors: a projected gradient is (D,) float64, the layers' blocks in the order of the plan (the
classifier's groups), each flattened row-major ((d_in, d_out) for a Kronecker layer).
"""
import hashlib
import math

import numpy as np

from influence.curvature.kfac.plan import KronBlock


def layer_sizes(plan):
    """Parameters of each layer of the plan: ``K1 · C`` of a Kronecker layer, ``p`` of a diagonal one."""
    return [b.k1 * b.c_out if isinstance(b, KronBlock) else b.size for b in plan]


def equal_shares(sizes, dim):
    """``dim`` shared equally by layers of ``sizes``, each at most its size (smallest first): list of ints."""
    shares, left = [0] * len(sizes), int(dim)
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])
    for j, i in enumerate(order):
        shares[i] = int(min(sizes[i], left // (len(sizes) - j)))
        left -= shares[i]
    return shares


def kron_sides(k1, c_out, share):
    """``(d_in, d_out)`` of a Kronecker layer's share: the smaller side whole when it is at most ``√share``,
    the larger side taking what is left (each at least 1)."""
    small, large = sorted((k1, c_out))
    d_small = min(small, max(1, round(math.sqrt(share))))
    d_large = min(large, max(1, share // d_small))
    if d_large == large:
        d_small = min(small, max(1, share // large))
    return (d_small, d_large) if k1 <= c_out else (d_large, d_small)


def layer_dims(plan, dim):
    """Per layer: ``(d_in, d_out)`` of a KronBlock, ``(d,)`` of a DiagBlock, for a target of ``dim`` dimensions
    over the plan's parameters (see the module's rule)."""
    shares = equal_shares(layer_sizes(plan), dim)
    return [kron_sides(b.k1, b.c_out, d) if isinstance(b, KronBlock) else (max(1, d),)
            for b, d in zip(plan, shares)]


def orthonormal_rows(rows, cols, rng):
    """(rows, cols) float64 with orthonormal rows (rows ≤ cols): a Gaussian matrix orthonormalised by QR
    (signs fixed by R's diagonal, so the result depends only on the Gaussian draw)."""
    g = rng.standard_normal((cols, rows))
    q, r = np.linalg.qr(g)
    q = q * np.where(np.diag(r) < 0, -1.0, 1.0)[None, :]
    return np.ascontiguousarray(q.T)


class Projection:
    """The seeded projections of every layer of ``plan`` at ``dims`` (:func:`layer_dims`).

    ``mats[l]``: ``(R_in, R_out)`` of a Kronecker layer, ``(R,)`` of a diagonal one (float64);
    ``offsets``: where each layer's block starts in the projected vector; ``dim``: D.
    """

    def __init__(self, plan, dims, seed, mats=None):
        self.plan = list(plan)
        self.dims = [tuple(int(v) for v in d) for d in dims]
        self.seed = int(seed)
        self.mats = []
        given = [None] * len(self.plan) if mats is None else list(mats)     # None: the seeded random rows
        for index, (b, d) in enumerate(zip(self.plan, self.dims)):
            rng = np.random.default_rng([self.seed, index])
            if given[index] is not None:
                self.mats.append(tuple(np.ascontiguousarray(m, np.float64) for m in given[index]))
            elif isinstance(b, KronBlock):
                self.mats.append((orthonormal_rows(d[0], b.k1, rng), orthonormal_rows(d[1], b.c_out, rng)))
            else:
                self.mats.append((orthonormal_rows(d[0], b.size, rng),))
        sizes = [int(np.prod(d)) for d in self.dims]
        self.sizes = sizes
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.dim = int(self.offsets[-1])

    def fingerprint(self):
        """24 hex digits of the matrices' bytes: which projection wrote a store."""
        h = hashlib.blake2b(digest_size=12)
        for mats in self.mats:
            for m in mats:
                h.update(np.ascontiguousarray(m, np.float64).tobytes())
        return h.hexdigest()

    def arrays(self):
        """The matrices as ``{"projection.<layer>.<side>": array}`` (a curvature cache's state)."""
        return {f"projection.{i}.{k}": m for i, mats in enumerate(self.mats) for k, m in enumerate(mats)}

    def with_arrays(self, arrays):
        """The same plan and dims with the matrices of :meth:`arrays` -> a new Projection."""
        mats = [tuple(np.asarray(arrays[f"projection.{i}.{k}"], np.float64) for k in range(len(m)))
                for i, m in enumerate(self.mats)]
        for new, old in zip(mats, self.mats):
            if [a.shape for a in new] != [a.shape for a in old]:
                raise ValueError("cached store projection does not match the layers' dimensions")
        return Projection(self.plan, self.dims, self.seed, mats)

    def full_layer(self, b, vec):
        """A layer's part of a full-space vector (a sequence of arrays in the variable order): (K1, C) for a
        Kronecker layer (kernel rows, then the bias row), (p,) for a diagonal one; float64."""
        if isinstance(b, KronBlock):
            rows = [np.asarray(vec[b.kernel_pos], np.float64).reshape(b.k_in, b.c_out)]
            if b.bias_pos is not None:
                rows.append(np.asarray(vec[b.bias_pos], np.float64).reshape(1, b.c_out))
            return np.concatenate(rows, axis=0)
        return np.concatenate([np.asarray(vec[i], np.float64).ravel() for i in b.positions])

    def project(self, vec):
        """(D,) float64: ``R v`` of a full-space vector ``vec`` (a Vec or a list of arrays in variable order).

        A Kronecker layer's kernel is multiplied by ``R_in`` in its own dtype (at least float32) before anything
        is widened: on VGG16 a float64 copy of fc1's 103 M weights took most of a test image's projection
        (3 s); the (d_in, C) product, the bias row and ``R_out`` are float64."""
        parts = []
        for b, mats in zip(self.plan, self.mats):
            if len(mats) != 2:
                parts.append(mats[0] @ self.full_layer(b, vec))
                continue
            kernel = np.asarray(vec[b.kernel_pos])
            dtype = np.result_type(kernel.dtype, np.float32)
            left = (mats[0][:, :b.k_in].astype(dtype) @ kernel.reshape(b.k_in, b.c_out).astype(dtype, copy=False))
            left = left.astype(np.float64)
            if b.bias_pos is not None:
                left += np.outer(mats[0][:, b.k_in], np.asarray(vec[b.bias_pos], np.float64))
            parts.append((left @ mats[1].T).ravel())
        return np.concatenate(parts)

    def back_project(self, z, like):
        """``Rᵀ z`` of a projected (D,) vector as a list of float64 arrays shaped like ``like`` (the variables)."""
        out = [np.zeros(tuple(v.shape)) for v in like]
        for index, (b, mats) in enumerate(zip(self.plan, self.mats)):
            part = np.asarray(z[self.offsets[index]:self.offsets[index + 1]], np.float64)
            if len(mats) == 2:
                full = mats[0].T @ part.reshape(self.dims[index]) @ mats[1]          # (K1, C)
                out[b.kernel_pos] = full[:b.k_in].reshape(b.kernel_shape)
                if b.bias_pos is not None:
                    out[b.bias_pos] = full[b.k_in]
            else:
                full = mats[0].T @ part
                at = 0
                for i, shape in zip(b.positions, b.shapes):
                    size = int(np.prod(shape))
                    out[i] = full[at:at + size].reshape(shape)
                    at += size
        return out

    def projected_diagonal(self, diagonal):
        """(D, D) float64 ``R diag(d) Rᵀ`` of a per-parameter diagonal ``d`` (a sequence of arrays shaped like the
        variables, as :meth:`full_layer` reads them), block-diagonal by layer. A Kronecker layer's block
        ``[(a, b), (c, e)] = Σ_ij R_in[a,i] R_in[c,i] d[i,j] R_out[b,j] R_out[e,j]`` (``d`` the layer's
        (K1, C) matrix: not a Kronecker product unless ``d`` is one); a diagonal layer's ``R diag(d) Rᵀ``."""
        out = np.zeros((self.dim, self.dim))
        for index, (b, mats) in enumerate(zip(self.plan, self.mats)):
            s, e = self.offsets[index], self.offsets[index + 1]
            full = self.full_layer(b, diagonal)
            if len(mats) == 2:
                r_in, r_out = mats
                inner = np.einsum("ai,ci,ij->acj", r_in, r_in, full, optimize=True)        # (d_in, d_in, C)
                block = np.einsum("acj,bj,ej->abce", inner, r_out, r_out, optimize=True)   # (d_in, d_out, d_in, d_out)
                out[s:e, s:e] = block.reshape(e - s, e - s)
            else:
                out[s:e, s:e] = (mats[0] * full[None, :]) @ mats[0].T
        return out

    def regulariser(self):
        """(D, D) float64 ``R ∇²Ω Rᵀ``, block-diagonal by layer: ``(R_in diag(r) R_inᵀ) ⊗ I`` for a Kronecker
        layer (``r``: the L2 Hessian of each kernel row and of the bias row), ``R diag(reg) Rᵀ`` otherwise."""
        out = np.zeros((self.dim, self.dim))
        for index, (b, mats) in enumerate(zip(self.plan, self.mats)):
            s, e = self.offsets[index], self.offsets[index + 1]
            if len(mats) == 2:
                block = np.kron((mats[0] * b.reg_rows[None, :]) @ mats[0].T, np.eye(self.dims[index][1]))
            else:
                block = (mats[0] * b.reg[None, :]) @ mats[0].T
            out[s:e, s:e] = block
        return out


def top_eigen_rows(vectors, values, bounds, count):
    """(count, size) float64 orthonormal rows: the ``count`` eigenvectors with the largest eigenvalues of a
    block-diagonal symmetric factor, each zero outside its block.

    ``vectors``: per block ``(b, b)`` eigenvectors as columns; ``values``: per block ``(b,)`` eigenvalues;
    ``bounds``: per block ``(start, stop)`` of its rows in the factor (size = the last stop). Ties keep the
    blocks' order (a stable sort).
    """
    flat = np.concatenate([np.asarray(v, np.float64) for v in values])
    owner = np.concatenate([np.full(len(v), k) for k, v in enumerate(values)])
    column = np.concatenate([np.arange(len(v)) for v in values])
    rows = np.zeros((int(count), int(bounds[-1][1])))
    for r, j in enumerate(np.argsort(-flat, kind="stable")[:int(count)]):
        start, stop = bounds[owner[j]]
        rows[r, start:stop] = np.asarray(vectors[owner[j]], np.float64)[:, column[j]]
    return rows


def eigen_mats(plan, dims, fit, fit_plan):
    """Per layer of ``plan``: ``(R_in, R_out)`` of a Kronecker layer from the top eigenvectors of its K-FAC
    factors in ``fit`` (:class:`~influence.curvature.kfac.state.KroneckerFit` over ``fit_plan``, whose
    blocks carry the factors' ``a_bounds`` / ``s_bounds``), None for any other layer (random rows). ``dims``:
    :func:`layer_dims`."""
    blocks = {b.name: b for b in fit_plan}
    mats = []
    for b, d in zip(plan, dims):
        if not isinstance(b, KronBlock):
            mats.append(None)
            continue
        eig, kb = fit.eig[b.name], blocks[b.name]
        mats.append((top_eigen_rows(eig["QA"], eig["eA"], kb.a_bounds, d[0]),
                     top_eigen_rows(eig["QS"], eig["eS"], kb.s_bounds, d[1])))
    return mats


#: the smallest factor block :func:`projection_block` splits K-FAC's factors into before it gives up
MIN_PROJECTION_BLOCK = 256


def projection_block(plan, kinds, item, memory_budget):
    """The ``ekfac_max_block`` of the K-FAC fit behind ``store_projection kfac``: the largest of ``MAX_BLOCK``,
    ``MAX_BLOCK / 2``, ... :data:`MIN_PROJECTION_BLOCK` whose fit (:func:`~influence.curvature.kfac.plan.fit_bytes`,
    the factors' float64 blocks) fits ``memory_budget`` GB -> ``(block, bytes at MAX_BLOCK, bytes at block)``;
    block None when not even the smallest fits.

    ``plan``: the store's (unsplit) plan; ``kinds``: ``{id(layer): linear_kind}``; ``item``: bytes of one number in
    the model's dtype. The store keeps only each factor's top eigenvectors, so a block-diagonal factor costs the
    projection some of its aim, never the store its correctness (its curvature is the projected Gauss–Newton matrix
    whatever the projection): on VGG16 at the default 2 GB the factors need 3.21 GB in blocks of 4096."""
    from dataclasses import replace

    from influence.curvature.kfac.plan import MAX_BLOCK, fit_bytes, split_blocks
    from influence.settings import gb_to_bytes

    def need(block):
        split = [replace(b, a_bounds=split_blocks(b.k1, block), s_bounds=split_blocks(b.c_out, block))
                 if isinstance(b, KronBlock) else b for b in plan]
        return max(sum(b.bytes(False) for b in split), fit_bytes(split, kinds, False, item))

    first = need(MAX_BLOCK)
    block, needed = MAX_BLOCK, first
    while memory_budget is not None and needed > gb_to_bytes(memory_budget):
        if block // 2 < MIN_PROJECTION_BLOCK:
            return None, first, needed
        block //= 2
        needed = need(block)
    return block, first, needed


def kfac_projection(projection, objective, fisher, memory_budget, sums=None, progress=True):
    """``projection``'s plan and dims with each Kronecker layer on its K-FAC factors' top eigenvectors
    (:func:`eigen_mats`) -> a new :class:`Projection`. Runs K-FAC's first pass over the training set
    (``sums``: where its sums come from, as any fit's; None: this process), its factors split into the blocks of
    :func:`projection_block` so that they fit ``memory_budget``."""
    import logging

    from influence.curvature.kfac.plan import MAX_BLOCK, format_gb
    from influence.curvature.kfac.solver import KFACSolver
    from influence.errors import SettingError
    from influence.model.taps import linear_kind

    log = logging.getLogger(__name__)
    d = objective.d
    kinds = {id(g.layer): linear_kind(g.layer) for g in d.clf.groups}
    block, first, needed = projection_block(projection.plan, kinds, np.dtype(d.dtype.as_numpy_dtype).itemsize,
                                            memory_budget)
    if block is None:
        worst = sorted((b for b in projection.plan if isinstance(b, KronBlock)), key=lambda b: -b.k1 * b.c_out)[:3]
        raise SettingError("store_projection", f"kfac fits K-FAC's factors first, and they need {format_gb(needed)} "
                                               f"even in blocks of {MIN_PROJECTION_BLOCK}, over memory_budget "
                                               f"{memory_budget:g} GB (largest layers: "
                                               f"{', '.join(b.name for b in worst)}); give a larger memory_budget, "
                                               f"fewer layers with params or store_projection random")
    if block < MAX_BLOCK:
        log.info("store: the K-FAC projection's factors split into blocks of at most %d rows (%s, within "
                 "memory_budget %g GB; in blocks of %d they would need %s)", block, format_gb(needed), memory_budget,
                 MAX_BLOCK, format_gb(first))
    kfac = KFACSolver(objective, "1x", fisher=fisher, ekfac_max_block=block, memory_budget=memory_budget,
                      progress=progress)
    kfac.fit(sums)
    mats = eigen_mats(projection.plan, projection.dims, kfac.fitted, kfac.plan)
    return Projection(projection.plan, projection.dims, projection.seed, mats)
