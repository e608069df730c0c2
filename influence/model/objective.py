"""The training objective ``R(θ) = mean_i L(z_i) + Ω`` over a training set: its Hessian-vector products
(full Hessian or Gauss–Newton matrix), over the whole set or a minibatch, in chunks (docs/DESIGN.md)."""
import numpy as np
import tensorflow as tf

from influence.settings import HESSIANS




class TrainingObjective:
    """HVPs of ``R(θ) = mean_i L(z_i) + Ω`` over a training archive, whole or by minibatch.

    ``archive`` is a :class:`influence.data.archive_reader.TrainArchive`; ``chunk`` bounds the images per call.
    ``hessian``: which matrix every product takes (:data:`HESSIANS`): ``"full"`` ∇²R, or ``"ggn"``
    the Gauss–Newton matrix ``mean_i J_iᵀ H_i J_i + ∇²Ω`` (:meth:`influence.model.derivatives.Derivatives.ggn_vp`).
    """

    def __init__(self, derivs, archive, chunk=256, hessian="full"):
        if hessian not in HESSIANS:
            raise ValueError(f"hessian must be one of {', '.join(HESSIANS)}, got {hessian!r}")
        self.d = derivs
        self.archive = archive
        self.n = len(archive)
        self.chunk = int(chunk)
        self.dtype = derivs.dtype
        self.hessian = hessian
        #: the product, compiled (``vp``) and as a graph function to call inside another tf.function
        self.vp = derivs.hvp if hessian == "full" else derivs.ggn_vp
        self.vp_graph = derivs.hvp_graph if hessian == "full" else derivs.ggn_vp_graph

    def scalar(self, value):
        """``value`` as a scalar tensor of the model's dtype (the products' weights)."""
        return tf.constant(value, self.dtype)

    def hvp_full(self, v, indices=None):
        """(H + 0)·v with H = ∇²R over all training images (or over ``indices`` as the data term)."""
        if indices is None:
            return self.hvp_share(v)
        idx = np.asarray(indices)
        total = None
        weight = self.scalar(1.0 / len(idx))
        for start in range(0, len(idx), self.chunk):
            x, y = self.archive.take(idx[start:start + self.chunk])
            part = self.vp(x, y.astype(np.int64), v, weight, self.scalar(1.0 if start == 0 else 0.0))
            total = part if total is None else tuple(a + b for a, b in zip(total, part))
        return total

    def hvp_share(self, v, start=0, stop=None):
        """Images ``[start, stop)``'s share of the whole-set product :meth:`hvp_full`: the sum over their
        chunks (``chunk`` images each, counted from ``start``) of ``∇²(Σ L / n) v``, Ω's term on the chunk
        at image 0; in the model's dtype. Shares of runs of whole chunks, added in order, are
        ``hvp_full(v)`` bit for bit (a Ray fit's shards: :mod:`influence.backends.ray_driver`)."""
        stop = self.n if stop is None else int(stop)
        weight = self.scalar(1.0 / self.n)
        total = None
        for at in range(int(start), stop, self.chunk):
            x, y = self.archive.take(np.arange(at, min(at + self.chunk, stop)))
            part = self.vp(x, y.astype(np.int64), v, weight, self.scalar(1.0 if at == 0 else 0.0))
            total = part if total is None else tuple(a + b for a, b in zip(total, part))
        return total

    def hvp_minibatch(self, v, x, y):
        """H̃ v for one minibatch: ∇²(mean over the batch of L + Ω) v."""
        return self.vp(x, y, v, self.scalar(1.0 / len(y)), self.scalar(1.0))
