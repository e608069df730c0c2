"""Solving with a fitted K-FAC / EK-FAC in numpy: ``(F + R + λI)⁻¹ v`` one test vector at a time.

The matrix is block-diagonal, one block per layer of the plan (:mod:`influence.curvature.kfac.plan`).
With a Kronecker layer's eigenbases ``Q_A`` (``(K1, K1)``, block-diagonal when split) and ``Q_S``
(``(C, C)``) and its undamped eigenvalues ``Λ + ρ`` (``(K1, C)``, :mod:`influence.curvature.kfac.state`),
the test vector's part ``V`` of that layer (``(K1, C)``: ``kernel.reshape(K, C)`` with the bias row) is
solved as::

    (F_l + R_l + λI)⁻¹ V = Q_A [ (Q_Aᵀ V Q_S) ⊘ (Λ + ρ 1ᵀ + λ) ] Q_Sᵀ

and a diagonal layer's part as ``v ⊘ (E[g²] + 2c + λ)``. ``λ`` is the damping, or per layer a factor
of the mean of its ``Λ + ρ`` when the damping is relative (influence.curvature.damping). The
damped eigenvalues ``Λ + ρ + λ`` are formed from a :class:`~influence.curvature.kfac.state.KroneckerFit`
and a damping by :func:`damped_eigenvalues` (once per damping, by the caller), in the model's dtype,
and every product runs in it; :class:`KroneckerSolve` takes the eigenvectors and those damped
eigenvalues as arguments of every call.
A rank-one ``V`` (one image through a Dense layer on a flat input: ``a δᵀ``) is rotated as
``(Q_Aᵀ a)(Q_Sᵀ δ)ᵀ`` (:func:`rank_one`), checked only on layers of at least ``RANK_ONE_MIN`` weights.
"""
import numpy as np
import tensorflow as tf

from influence.curvature.kfac.plan import DiagBlock, KronBlock
from influence.errors import SettingError
from influence.model.vectors import split_flat, vec_to_numpy

#: a layer's F + R + λI counts as singular below this fraction of its largest eigenvalue
SINGULAR = 1e-12
#: layers with at least this many weights check a test vector for rank one before rotating it
RANK_ONE_MIN = 2**20


def kron_rotate(v, qa, a_bounds, qs, s_bounds, back=False, work=None):
    """``Q_Aᵀ V Q_S`` (or ``Q_A V Q_Sᵀ`` with ``back``) for block-diagonal ``Q_A``, ``Q_S``.

    Args:
      v: (K1, C) in the dtype of the ``q`` blocks.
      qa: list of (b, b) eigenvector blocks of A covering rows ``a_bounds`` [(start, stop)].
      qs: list of (b, b) eigenvector blocks of S covering columns ``s_bounds``.
      work: an optional (K1, C) array to overwrite on the way (may be ``v`` itself); saves one
        temporary of ``v``'s size.

    Returns:
      (K1, C), a new array.
    """
    left = np.empty_like(v) if work is None else work
    for (s, e), q in zip(a_bounds, qa):
        left[s:e] = (q if back else q.T) @ v[s:e]
    out = np.empty_like(v)
    for (s, e), q in zip(s_bounds, qs):
        out[:, s:e] = left[:, s:e] @ (q.T if back else q)
    return out


def rank_one(mat, rtol, rows=4096):
    """``(u, w)`` with ``mat ≈ u wᵀ`` to relative Frobenius error ``rtol``, or None when it is not rank one.

    A Dense layer on a flat input has a rank-one gradient for one image (``a δᵀ``, the bias row
    included), so its rotation into the Kronecker eigenbasis costs ``K1² + C²`` instead of
    ``K1²C + K1C²``. ``w`` is the row of largest norm and ``u = mat w / (w·w)``; the check reads
    ``mat`` in blocks of ``rows`` rows (no full-size temporary).

    Args:
      mat: (K1, C) float array; rtol: the tolerance (100 ulps of the dtype in the solver).

    Returns:
      ((K1,), (C,)) arrays of ``mat``'s dtype, or None.
    """
    norms = np.einsum("ij,ij->i", mat, mat, dtype=np.float64)
    total = float(norms.sum())
    if total == 0.0 or not np.isfinite(total):
        return None
    w = mat[int(np.argmax(norms))]
    u = (mat @ w) / np.dot(w, w)
    err = 0.0
    for s in range(0, len(mat), rows):
        d = mat[s:s + rows] - np.outer(u[s:s + rows], w)
        err += float(np.einsum("ij,ij->", d, d, dtype=np.float64))
    return (u, w) if err <= rtol * rtol * total else None


def block_damping(spec, undamped):
    """λ of one block from its ``Λ + ρ`` (float64 array): the damping ``spec``'s value, or its factor
    times their mean when relative (influence.curvature.damping)."""
    return spec.for_block(float(np.mean(undamped)) if undamped.size else 0.0)


def split_like(flat, variables):
    """float64 ``(P,)`` (or None) -> float64 arrays shaped like ``variables`` (or None): ``D`` of damping
    ``optimizer`` per variable (:func:`~influence.model.vectors.split_flat`)."""
    return None if flat is None else split_flat(flat, variables)


def projected_diagonal(b, diagonal, eig):
    """A per-parameter damping ``D`` seen in block ``b``'s eigenbasis: the diagonal of ``Qᵀ diag(D) Q``.

    For a Kronecker layer with ``Q = Q_A ⊗ Q_S`` that diagonal is ``(Q_A ∘ Q_A)ᵀ D_b (Q_S ∘ Q_S)``
    (``∘`` elementwise, ``D_b`` the layer's ``D`` as its (K1, C) kernel-and-bias matrix): each eigen-direction
    is damped by the mean of ``D`` over the weights it spans. It is the closest diagonal to ``diag(D)`` in that
    basis, as EK-FAC's eigenvalues are the closest to the Fisher (damping ``optimizer``, per layer).

    Args:
      b: a plan block; diagonal: float64 arrays shaped like the variables (``D`` split per variable);
      eig: the fit's float64 eigenvectors ``{layer: {"QA": [...], "QS": [...]}}`` (Kronecker blocks).

    Returns:
      float64, shaped like the block's ``Λ + ρ``: (K1, C) for a Kronecker block, (size,) for a diagonal one.
    """
    if isinstance(b, DiagBlock):
        return np.concatenate([np.asarray(diagonal[i], np.float64).ravel() for i in b.positions])
    mat = np.empty((b.k1, b.c_out), np.float64)
    mat[:b.k_in] = np.asarray(diagonal[b.kernel_pos], np.float64).reshape(b.k_in, b.c_out)
    if b.bias_pos is not None:
        mat[b.k_in] = np.asarray(diagonal[b.bias_pos], np.float64)
    squares = {k: [np.square(q) for q in eig[b.name][k]] for k in ("QA", "QS")}
    return kron_rotate(mat, squares["QA"], b.a_bounds, squares["QS"], b.s_bounds)


def block_added(b, spec, undamped, diagonal=None, eig=None):
    """What the damping adds to block ``b``'s ``Λ + ρ`` (float64 ``undamped``): a scalar ``λ``
    (:func:`block_damping`), or with ``diagonal`` (damping ``optimizer``) ``c ×`` :func:`projected_diagonal`."""
    if diagonal is None:
        return block_damping(spec, undamped)
    return spec.value * projected_diagonal(b, diagonal, eig)


def damped_eigenvalues(fit, spec, dtype, name, diagonal=None):
    """``Λ + ρ + λ`` of every block of a :class:`~influence.curvature.kfac.state.KroneckerFit`.

    Args:
      fit: the fitted state; spec: the damping (influence.curvature.damping); dtype: the numpy dtype of
        the result (the model's); name: the solver's name for the error; diagonal: with damping
        ``optimizer``, its ``D`` split per variable (float64 arrays shaped like the variables), added per
        eigen-direction as :func:`projected_diagonal` (``λ`` is then an array).

    Returns:
      ``(dens, lams)``: ``{layer: Λ + ρ + λ}`` in ``dtype`` (Kronecker: (K1, C); diagonal: (size,)) and
      ``{layer: λ}`` (floats; the mean of the added term with ``diagonal``). SettingError when a block of
      ``F + R + λI`` is singular.
    """
    dens, lams = {}, {}
    for b in fit.plan:
        den = fit.undamped(b)
        lam = block_added(b, spec, den, diagonal, None if diagonal is None else fit.eig)
        lams[b.name] = float(np.mean(lam))
        den += lam
        if den.min() <= SINGULAR * max(float(den.max()), 1e-300):
            raise SettingError("damping", f"F + λI of solver {name} is singular in layer {b.name} (a Fisher "
                                          f"eigenvalue is {float((den - lam).min()):.3g}); give a damping > 0")
        dens[b.name] = den.astype(dtype, copy=False)
        del den, lam
    return dens, lams


class KroneckerSolve:
    """``(F + R + λI)⁻¹ v`` for the blocks of ``plan``, written into arrays shaped like ``variables``.

    Args:
      plan: the blocks (:func:`influence.curvature.kfac.plan.make_plan`).
      variables: the flat variable list (shapes of the results).
      dtype: the model's numpy dtype (every product runs in it).

    Every call takes the fitted part explicitly: ``basis`` ``{layer: {"QA": [(b, b)], "QS": [(b, b)]}}``
    (:attr:`KroneckerFit.eig <influence.curvature.kfac.state.KroneckerFit>`) and ``dens`` ``{layer:
    Λ + ρ + λ}`` (:func:`damped_eigenvalues`).
    """

    def __init__(self, plan, variables, dtype):
        self.plan = plan
        self.shapes = [tuple(var.shape) for var in variables]
        self.dtype = dtype

    @property
    def workspace_bytes(self):
        """Transient bytes of one :meth:`stacked` vector: three (K1, C) matrices of the largest layer."""
        item = np.dtype(self.dtype).itemsize
        return 3 * item * max([b.k1 * b.c_out for b in self.plan if isinstance(b, KronBlock)] + [0])

    def inverse_into(self, basis, dens, v, parts):
        """``(F + R + λI)⁻¹ v`` for one Vec ``v``, written into ``parts`` (numpy arrays shaped like the
        variables, one per variable; the products run in the model's dtype)."""
        dtype = self.dtype
        for b in self.plan:
            den = dens[b.name]
            if isinstance(b, DiagBlock):
                flat = vec_to_numpy([v[i] for i in b.positions]).astype(dtype, copy=False) / den
                at = 0
                for i, shape in zip(b.positions, b.shapes):
                    size = int(np.prod(shape))
                    parts[i][...] = flat[at:at + size].reshape(shape)
                    at += size
                continue
            eig = basis[b.name]
            qa, qs = ([q.astype(dtype, copy=False) for q in eig[k]] for k in ("QA", "QS"))
            mat = np.empty((b.k1, b.c_out), dtype)
            mat[:b.k_in] = np.asarray(v[b.kernel_pos]).reshape(b.k_in, b.c_out)
            if b.bias_pos is not None:
                mat[b.k_in] = np.asarray(v[b.bias_pos])
            low = rank_one(mat, 100 * np.finfo(dtype).eps) if b.k1 * b.c_out >= RANK_ONE_MIN else None
            if low is not None:         # one test image through a Dense layer: (Q_Aᵀ u)(Q_Sᵀ w)ᵀ
                u, w = low
                ut = np.concatenate([q.T @ u[s:e] for (s, e), q in zip(b.a_bounds, qa)])
                wt = np.concatenate([w[s:e] @ q for (s, e), q in zip(b.s_bounds, qs)])
                rot = np.multiply.outer(ut, wt, out=mat)
            else:
                rot = kron_rotate(mat, qa, b.a_bounds, qs, b.s_bounds, work=mat)
            del mat
            rot /= den
            sol = kron_rotate(rot, qa, b.a_bounds, qs, b.s_bounds, back=True, work=rot)
            del rot
            parts[b.kernel_pos][...] = sol[:b.k_in].reshape(b.kernel_shape)
            if b.bias_pos is not None:
                parts[b.bias_pos][...] = sol[b.k_in]

    def inverse(self, basis, dens, vectors):
        """[(F + R + λI)⁻¹ v] for Vecs ``v`` -> list of Vecs (dtype of the model)."""
        out = []
        for v in vectors:
            parts = [np.empty(shape, self.dtype) for shape in self.shapes]
            self.inverse_into(basis, dens, v, parts)
            out.append(tuple(tf.constant(p) for p in parts))
        return out

    def stacked(self, basis, dens, vectors):
        """The inverse-HVPs of ``vectors`` (a list of T Vecs) stacked (a Vec with a leading axis T),
        written in place: the only full-size arrays are the T results (no per-vector copies).
        ``vectors`` is emptied as each is solved, so the caller's test gradients are freed on the way."""
        t = len(vectors)
        stacked = [np.empty((t,) + shape, self.dtype) for shape in self.shapes]
        for j in range(t):
            v = vectors[j]
            vectors[j] = None
            self.inverse_into(basis, dens, v, [s[j] for s in stacked])
            del v
        out = []
        while stacked:          # one part at a time into TensorFlow, so at most one part is held twice
            out.append(tf.constant(stacked.pop(0)))
        return tuple(out)
