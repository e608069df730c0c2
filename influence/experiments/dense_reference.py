"""The dense float64 Gauss–Newton reference of the LDS panel: what the curvature itself can give.

For a small model (at most :data:`MAX_PARAMS` selected parameters) the whole matrix is built in float64
from per-image logit Jacobians ``J_i = ∂z_i/∂θ`` (K, P)::

    G = (1/n) Σ_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i + ∇²Ω

-- the very matrix ``solver="exact", hessian="ggn"`` builds column by column from Gauss–Newton
products (:meth:`influence.model.derivatives.Derivatives._ggn_vp`, mean over the training images, the
regulariser's exact Hessian added once), over the same parameters in the same order
(``classifier.variables``, i.e. ``classifier.groups``). ``p_i = softmax(z_i)``. The data term is
accumulated as ``Σ_i R_iᵀ R_i`` with the factor rows ``R_i[k] = √p_k (J_i[k] − p_iᵀ J_i)`` (K, P), since
``R_iᵀ R_i = J_iᵀ (diag p_i − p_i p_iᵀ) J_i`` when ``Σ_k p_k = 1``; it is positive semi-definite by
construction. ``∇²Ω`` is the diagonal ``2c`` of each Keras ``L2(c)`` regulariser on a selected variable
(:func:`influence.curvature.kfac.plan.l2_hessian`; biases only where they carry one, as Keras and the
tool's ``exact`` solver do).

Scores follow the tool's convention (docs/DESIGN.md, "What is computed"), positive = useful::

    score[t, i] = g_tᵀ (G + λI)⁻¹ g_i

with ``g`` the per-image cross-entropy gradient ``J_iᵀ (p_i − e_y)``, whose true-class entry is taken
as ``−Σ_{c≠y} p_c`` (no cancellation for a confident image, as :func:`influence.model.derivatives.cross_entropy`).
One ``eigh`` of ``G`` serves every damping.
"""
import contextlib
import logging

import numpy as np
import tensorflow as tf

from influence.errors import SettingError, UserError

#: the most selected parameters :func:`dense_ggn` accepts by default (G is P² float64: 1.2 GB at 12 000)
MAX_PARAMS = 12_000


def check_size(clf, max_params=MAX_PARAMS):
    """``P``, the number of selected parameters of ``clf``; SettingError above ``max_params``."""
    p = int(clf.num_params)
    if p > int(max_params):
        raise SettingError("max_params", f"the dense Gauss-Newton reference needs a {p}x{p} float64 matrix: "
                                         f"{p} parameters is above the limit of {int(max_params)} (raise it, "
                                         f"or choose fewer parameters)")
    return p


def regulariser_hessian(clf):
    """float64 ``(P,)``: the diagonal of ``∇²Ω`` over ``clf.variables`` (``2c`` per entry of a variable with a
    Keras ``L2(c)`` regulariser, 0 without one). Any other regulariser is a UserError naming its layer."""
    from influence.curvature.kfac.plan import l2_hessian

    parts = []
    for group in clf.groups:
        for v in group.variables:
            try:
                value = l2_hessian(v, group.name, strict=True)
            except UserError:
                raise UserError(f"layer {group.name!r} has a {type(v.regularizer).__name__} regulariser on "
                                f"{v.path}: the dense Gauss-Newton reference adds only the Hessian of Keras L2 "
                                f"weight regularisers") from None
            parts.append(np.full(int(np.prod(v.shape)), value, dtype=np.float64))
    return np.concatenate(parts)


def _jacobian_fn(clf):
    """A compiled ``x uint8 (B, H, W, C) -> (logits (B, K), [∂logits_b/∂v (B, K, *v.shape) per variable])``.

    One image per Jacobian, vectorised over the batch (``tf.vectorized_map``): a Jacobian of the whole
    batch's logits would run each of its B·K backward passes over all B images (B times the work; on
    the demo CNN 67 ms an image at B = 50 against 1.2 ms this way). Images are independent (the model
    runs in inference mode), so the two agree.
    """
    variables = clf.variables

    def one(image):
        primals = [v.value for v in variables]
        with tf.GradientTape() as tape:
            tape.watch(primals)
            logits = clf.image_logits(image[None])[0]
        return logits, tape.jacobian(logits, primals, unconnected_gradients=tf.UnconnectedGradients.ZERO)

    @tf.function
    def jac(x):
        return tf.vectorized_map(one, x)

    return jac


class _DropPforLoopNotes(logging.Filter):
    """Drops TensorFlow's "<Op> uses a while_loop. Fix that!" (pfor vectorises e.g. Conv2DBackpropFilter
    with an inner loop; the numbers are right, only the speed is TensorFlow's business)."""

    def filter(self, record):
        return "uses a while_loop" not in str(record.msg)


@contextlib.contextmanager
def _quiet_pfor():
    logger, note = logging.getLogger("tensorflow"), _DropPforLoopNotes()
    logger.addFilter(note)
    try:
        yield
    finally:
        logger.removeFilter(note)


def logit_jacobians(clf, x, chunk=50):
    """Yield ``(start, p, J)`` per chunk of ``chunk`` images of ``x`` (uint8 (N, H, W, C)):
    ``p`` float64 (B, K) softmax probabilities, ``J`` float64 (B, K, P) the logits' Jacobian over
    ``clf.variables`` (flattened and concatenated as :func:`influence.model.vectors.vec_to_numpy` does)."""
    jac = _jacobian_fn(clf)
    x = np.asarray(x)
    for start in range(0, len(x), int(chunk)):
        with _quiet_pfor():
            logits, parts = jac(tf.constant(x[start:start + int(chunk)]))
        z = np.asarray(logits, np.float64)
        b, k = z.shape
        j = np.concatenate([np.asarray(t, np.float64).reshape(b, k, -1) for t in parts], axis=2)
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        yield start, p, j


def loss_residuals(p, y):
    """float64 ``(B, K)``: ``∂L/∂z = p − e_y`` with the true-class entry ``−Σ_{c≠y} p_c`` (no cancellation).

    ``p``: (B, K) probabilities, ``y``: (B,) int labels."""
    y = np.asarray(y, np.int64)
    rows = np.arange(len(y))
    r = np.array(p, dtype=np.float64, copy=True)
    r[rows, y] = 0.0
    r[rows, y] = -r.sum(axis=1)
    return r


def loss_gradients(clf, x, y, chunk=50):
    """float64 ``(N, P)``: per-image cross-entropy gradients ``J_iᵀ (p_i − e_{y_i})`` (no regulariser) of uint8
    images ``x`` (N, H, W, C) with int labels ``y`` (N,) -- what the tool scores with (``Derivatives.gradient``)."""
    y = np.asarray(y, np.int64)
    out = np.empty((len(y), int(clf.num_params)))
    for start, p, j in logit_jacobians(clf, x, chunk):
        out[start:start + len(p)] = np.einsum("bk,bkp->bp", loss_residuals(p, y[start:start + len(p)]), j)
    return out


def dense_ggn(clf, x, y, chunk=50, max_params=MAX_PARAMS):
    """The dense Gauss–Newton matrix of the training objective and the training images' gradients.

    Args:
      clf: an :class:`influence.model.models.Classifier` (its selected parameters, ``P = clf.num_params``).
      x: uint8 (N, H, W, C) training images; y: int (N,) their labels.
      chunk: images per Jacobian call; max_params: refuse (SettingError) above this many parameters.

    Returns ``(G, grads)``: ``G`` float64 (P, P) ``(1/N) Σ_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i + ∇²Ω``,
    symmetric, without damping; ``grads`` float64 (N, P) per-image loss gradients (:func:`loss_gradients`).
    """
    p_count = check_size(clf, max_params)
    y = np.asarray(y, np.int64)
    n = len(y)
    if n == 0:
        raise UserError("dense_ggn needs at least one training image")
    g = np.zeros((p_count, p_count))
    grads = np.empty((n, p_count))
    for start, p, j in logit_jacobians(clf, x, chunk):
        b = len(p)
        grads[start:start + b] = np.einsum("bk,bkp->bp", loss_residuals(p, y[start:start + b]), j)
        mean_j = np.einsum("bk,bkp->bp", p, j)
        factor = (np.sqrt(p)[:, :, None] * (j - mean_j[:, None, :])).reshape(-1, p_count)
        g += factor.T @ factor
    g /= n
    g = 0.5 * (g + g.T)
    g[np.diag_indices(p_count)] += regulariser_hessian(clf)
    return g, grads


def reference_scores(G, g_test, g_train, dampings):
    """``score[t, i] = g_tᵀ (G + λI)⁻¹ g_i`` for each damping, from one ``eigh`` of ``G``.

    Args:
      G: float (P, P) symmetric positive semi-definite curvature without damping (:func:`dense_ggn`).
      g_test: (T, P) test gradients; g_train: (N, P) training gradients.
      dampings: iterable of λ > 0.

    Returns ``{λ: float64 (T, N)}`` (positive = useful, the tool's sign). SettingError for a damping that
    is not positive or leaves ``G + λI`` not positive definite.
    """
    dampings = [float(lam) for lam in dampings]
    bad = [lam for lam in dampings if not lam > 0]
    if bad:
        raise SettingError("dampings", f"every damping must be > 0, got {bad[0]}")
    g = np.asarray(G, dtype=np.float64)
    evals, evecs = np.linalg.eigh(0.5 * (g + g.T))
    low = [lam for lam in dampings if evals[0] + lam <= 0]
    if low:
        raise SettingError("dampings", f"G + λI is not positive definite at λ = {low[0]} (smallest eigenvalue "
                                       f"of G {evals[0]:.3g})")
    test_coords = np.asarray(g_test, dtype=np.float64) @ evecs          # (T, P)
    train_coords = np.asarray(g_train, dtype=np.float64) @ evecs        # (N, P)
    return {lam: (test_coords / (evals + lam)) @ train_coords.T for lam in dampings}
