"""Self-influence ``gᵢᵀ (F + R + λI)⁻¹ gᵢ`` of training images from a fitted K-FAC / EK-FAC, in one
TensorFlow graph per chunk of images, without forming any inverse-HVP.

The matrix is block-diagonal, so the score is a sum over layers. A Kronecker layer's share is
``Σ_jk [(Q_Aᵀ G_i Q_S)_jk]² / (Λ + ρ + λ)_jk`` with ``G_i`` the image's ``(K1, C)`` weight gradient
(its own, true label); on a flat Dense input ``G_i = a_i δ_iᵀ``, so it is ``(ã_i²)ᵀ D⁻¹ (δ̃_i²)``
with ``ã = Q_Aᵀa``, ``δ̃ = Q_Sᵀδ`` (no per-image matrix); conv layers form ``G̃_i`` in micro-batches of
``MICRO_BYTES``. A diagonal layer's share is ``Σ_k g_ik² / (d_k + r_k + λ)``. The graph works in
float64 whatever the model's dtype (influence.scoring.self_influence drives it).

:class:`SelfInfluenceGraph` is built from its inputs -- the layer signals, a
:class:`~influence.curvature.kfac.state.KroneckerFit` (float64, not compacted) and a damping -- and is
valid for that pair only; the solver builds a new one when either changes.
"""
import numpy as np
import tensorflow as tf

from influence.curvature.kfac.passes import MICRO_BYTES
from influence.curvature.kfac.plan import DiagBlock, KronBlock
from influence.curvature.kfac.signals import kron_inputs, rotate_last
from influence.curvature.kfac.solve import block_added


class SelfInfluenceGraph:
    """``gᵢᵀ (F + R + λI)⁻¹ gᵢ`` of training images for one fitted state and one damping.

    Args:
      signals: a :class:`~influence.curvature.kfac.signals.LayerSignals` (the tapped model; the labels
        here are the images' own).
      fit: a :class:`~influence.curvature.kfac.state.KroneckerFit` with its float64 eigenvectors and
        eigenvalues (RuntimeError when compacted).
      spec: the damping (influence.curvature.damping): ``λ`` per block from the fit's ``Λ + ρ``.
      diagonal: with damping ``optimizer``, its ``D`` per variable (:func:`~influence.curvature.kfac.solve.block_added`).
      x_spec, y_spec: the TensorSpecs of a batch of images and of their labels.

    Holds ``1 / (Λ + ρ + λ)`` and the eigenvectors as float64 TensorFlow variables and one compiled graph.
    """

    def __init__(self, signals, fit, spec, x_spec, y_spec, name="kfac", diagonal=None):
        if fit.compacted:
            raise RuntimeError(f"{name}: self-influence after compact(); run it before compacting")
        self.signals = signals
        self.plan = fit.plan
        self.vars = {}
        for b in self.plan:
            # this graph works in float64 whatever the model's dtype: 1 / (Λ + ρ + λ) from the float64
            # eigenvalues, not from the solve's copy in the model's dtype
            den = fit.undamped(b)
            den += block_added(b, spec, den, diagonal, fit.eig)
            parts = {"inv": tf.Variable(1.0 / den, trainable=False)}
            if isinstance(b, KronBlock):
                eig = fit.eig[b.name]
                parts["QA"] = [tf.Variable(q, trainable=False) for q in eig["QA"]]
                parts["QS"] = [tf.Variable(q, trainable=False) for q in eig["QS"]]
            self.vars[b.name] = parts
        self.fn = tf.function(self.graph, input_signature=[x_spec, y_spec])

    def __call__(self, x, y):
        """``gᵢᵀ (F + R + λI)⁻¹ gᵢ`` of each image with its TRUE label, without forming the inverse-HVP.

        Args:
          x: (N, H, W, C) images (``x_spec``); y: int64 (N,) their labels.

        Returns:
          float64 (N,). The matrix is block-diagonal, so this is a sum over layers. Kronecker layer:
          ``Σ_ij [(Q_Aᵀ G_i Q_S)_ij]² / (Λ + ρ + λ)_ij``; on a flat Dense input ``G_i = a_i δ_iᵀ``, so it
          is ``(ã_i²)ᵀ D⁻¹ (δ̃_i²)`` with ``ã = Q_Aᵀa``, ``δ̃ = Q_Sᵀδ`` (no per-image matrix); conv layers
          form ``G̃_i`` in micro-batches. Diagonal layer: ``Σ_k g_ik² / (d_k + r_k + λ)``.
        """
        return self.fn(x, np.asarray(y, np.int64)).numpy()

    def graph(self, x, y):
        """The traced body of :meth:`__call__`: (N, ...) images, (N,) int64 labels -> (N,) float64."""
        grouped = self.signals.signals(x, y, None, true_labels=True)
        total = tf.zeros(tf.shape(y), tf.float64)
        for b in self.plan:
            recs = grouped.get(id(b.layer))
            if not recs:
                continue
            v = self.vars[b.name]
            if isinstance(b, DiagBlock):
                g = tf.concat([tf.reshape(t, [tf.shape(t)[0], -1])
                               for t in self.signals.per_image_grads(b, recs)], 1)
                total += tf.reduce_sum(tf.square(g) * v["inv"], axis=1)
                continue
            a, dl, flat = kron_inputs(b, recs)
            at = rotate_last(a, v["QA"], b.a_bounds)      # (N, P, K1)
            dt = rotate_last(dl, v["QS"], b.s_bounds)     # (N, P, C)
            if flat:
                total += tf.reduce_sum(tf.matmul(tf.square(at[:, 0]), v["inv"]) * tf.square(dt[:, 0]), axis=1)
                continue
            m = max(1, MICRO_BYTES // (8 * b.k1 * b.c_out))
            n = tf.shape(at)[0]

            def body(i, out, at=at, dt=dt, m=m, inv=v["inv"]):
                g = tf.matmul(at[i:i + m], dt[i:i + m], transpose_a=True)      # (m, K1, C)
                return i + m, out.write(i // m, tf.reduce_sum(tf.square(g) * inv, axis=[1, 2]))

            _, out = tf.while_loop(lambda i, out: i < n, body,
                                   (tf.constant(0), tf.TensorArray(tf.float64, size=0, dynamic_size=True,
                                                                   infer_shape=False)))
            total += out.concat()
        return total
