"""Self-influence ``gᵢᵀ (F + R + λI)⁻¹ gᵢ`` of training images from a fitted K-FAC / EK-FAC, in one
TensorFlow graph per chunk of images, without forming any inverse-HVP.

The matrix is block-diagonal, so the score is a sum over layers. A Kronecker layer's share is
``Σ_jk [(Q_Aᵀ G_i Q_S)_jk]² / (Λ + ρ + λ)_jk`` with ``G_i`` the image's ``(K1, C)`` weight gradient
(its own, true label); on a flat Dense input ``G_i = a_i δ_iᵀ``, so it is ``(ã_i²)ᵀ D⁻¹ (δ̃_i²)``
with ``ã = Q_Aᵀa``, ``δ̃ = Q_Sᵀδ`` (no per-image matrix); conv layers form ``G̃_i`` in micro-batches of
``MICRO_BYTES``. A diagonal layer's share is ``Σ_k g_ik² / (d_k + r_k + λ)``. The graph works in
float64 whatever the model's dtype (influence.scoring.self_influence drives it).
"""
import numpy as np
import tensorflow as tf

from influence.curvature.kfac_passes import MICRO_BYTES
from influence.curvature.kfac_plan import DiagBlock, KronBlock


class SelfInfluence:
    """Mixin of :class:`influence.curvature.ekfac.KFACSolver`: :meth:`self_influence_batch`.

    Reads from the solver: ``obj``, ``plan``, ``name``, ``damping_spec``, ``_fits``, ``_compacted``,
    ``_eig``, ``_undamped``, ``_block_damping``, ``_damped`` and the
    :class:`~influence.curvature.kfac_signals.LayerSignals` methods; keeps its compiled graph and
    its float64 variables in ``_self_fn``, ``_self_vars`` (keyed by ``_self_key``).
    """

    def self_influence_batch(self, x, y):
        """``gᵢᵀ (F + R + λI)⁻¹ gᵢ`` of each image with its TRUE label, without forming the inverse-HVP.

        Args:
          x: uint8 (N, H, W, C) images; y: int64 (N,) their labels.

        Returns:
          float64 (N,). The matrix is block-diagonal, so this is a sum over layers. Kronecker layer:
          ``Σ_ij [(Q_Aᵀ G_i Q_S)_ij]² / (Λ + ρ + λ)_ij``; on a flat Dense input ``G_i = a_i δ_iᵀ``, so it
          is ``(ã_i²)ᵀ D⁻¹ (δ̃_i²)`` with ``ã = Q_Aᵀa``, ``δ̃ = Q_Sᵀδ`` (no per-image matrix); conv layers
          form ``G̃_i`` in micro-batches. Diagonal layer: ``Σ_k g_ik² / (d_k + r_k + λ)``.
        """
        self._damped()      # fits first if needed; refuses a singular F + λI
        key = (self._fits, str(self.damping_spec))
        if self._self_key != key:
            if self._compacted:
                raise RuntimeError(f"{self.name}: self-influence after compact(); run it before compacting")
            self._self_vars = {}
            for b in self.plan:
                # this graph works in float64 whatever the model's dtype: 1 / (Λ + ρ + λ) from the float64
                # eigenvalues, not from the solve's copy in the model's dtype
                den = self._undamped(b)
                den += self._block_damping(den)
                parts = {"inv": tf.Variable(1.0 / den, trainable=False)}
                if isinstance(b, KronBlock):
                    eig = self._eig[b.name]
                    parts["QA"] = [tf.Variable(q, trainable=False) for q in eig["QA"]]
                    parts["QS"] = [tf.Variable(q, trainable=False) for q in eig["QS"]]
                self._self_vars[b.name] = parts
            d = self.obj.d
            self._self_fn = tf.function(self._self_influence_graph, input_signature=[d.x_spec, d.y_spec])
            self._self_key = key
        return self._self_fn(x, np.asarray(y, np.int64)).numpy()

    def _self_influence_graph(self, x, y):
        grouped = self._signals(x, y, None, true_labels=True)
        total = tf.zeros(tf.shape(y), tf.float64)
        for b in self.plan:
            recs = grouped.get(id(b.layer))
            if not recs:
                continue
            v = self._self_vars[b.name]
            if isinstance(b, DiagBlock):
                g = tf.concat([tf.reshape(t, [tf.shape(t)[0], -1]) for t in self._per_image_grads(b, recs)], 1)
                total += tf.reduce_sum(tf.square(g) * v["inv"], axis=1)
                continue
            a, dl, flat = self._kron_inputs(b, recs)
            at = self._rotate_last(a, v["QA"], b.a_bounds)      # (N, P, K1)
            dt = self._rotate_last(dl, v["QS"], b.s_bounds)     # (N, P, C)
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
