"""Batched influence scores with a per-layer split.

For training images ``z_i`` (a batch of N) and T inverse-HVPs ``s_t``, the score is
``∇L(z_i)·s_t`` (docs/DESIGN.md). Layer ``l`` with input ``x_l`` and output ``h_l`` takes the share::

    share_l(i, t) = ⟨∂L_i/∂h_l , J_{θ_l} h_l [s_{t,l}]⟩

the backward signal at the layer's output (one backward pass for the batch, shared by every test
image) against the layer's own weight-direction tangent with its input held fixed. The shares add
up to the full directional derivative. Layers whose output is linear in their weights before the
activation (Dense, Conv*) are handled in one call for all T test images: the T tangent kernels are
stacked along the output channels, so the cost per extra test image is about one layer forward.
Other layers (BatchNorm, ...) fall back to a forward-mode JVP of the layer per test image.

Two routes for a Dense/Conv layer, chosen per layer by cost (docs/DESIGN.md, "Scoring"):

* tangent route: the T tangent kernels stacked along the output channels, one layer forward of
  the fixed input per test vector: ``T·P·K·C`` per image (P output positions, K = kernel inputs,
  C = output channels); a Dense layer on a flat input (P = 1) takes ``x_n ΔW_t`` as one broadcast
  batched product instead, which reads the T kernels in place;
* per-image-gradient route: ``G_n = Σ_p a_{n,p} δ_{n,p}ᵀ`` formed once (``P·K·C``), then contracted
  with all T vectors (``T·K·C``: the parameter count, the floor).

The gradient route is cheaper whenever ``(T - 1)(P - 1) > 1``: every conv layer once T ≥ 2, never
a Dense layer on flat input (P = 1). Each route gives the same numbers (tests check it).
"""
import numpy as np
import tensorflow as tf

from influence.model.vectors import vec_stack
from influence.model.taps import Tap, linear, linear_kind, patch_support, per_image_weight_grads


class Scorer:
    """``shares(x, y, stacked) -> (T, N, L)`` per-layer scores of a batch of training images.

    ``stacked``: a Vec whose parts have a leading axis T (see :func:`influence.model.vectors.vec_stack`).
    Layer order is ``classifier.groups``; ``layer_names`` names the L columns.
    """

    def __init__(self, derivs):
        self.d = derivs
        clf = derivs.clf
        self.clf = clf
        self.layer_names = [g.name for g in clf.groups]
        self.split = clf.supports_tap
        self._kinds = {id(g.layer): linear_kind(g.layer) for g in clf.groups}
        self._group_of = {id(g.layer): i for i, g in enumerate(clf.groups)}
        # the position of each group's variables inside the flat variable list
        self._slices, at = [], 0
        for g in clf.groups:
            self._slices.append(slice(at, at + len(g.variables)))
            at += len(g.variables)
        stacked_spec = tuple(tf.TensorSpec((None,) + tuple(s.shape), s.dtype) for s in derivs.vec_spec)
        signature = [derivs.x_spec, derivs.y_spec, stacked_spec]
        if self.split:
            # one compiled variant per route policy: T = 1 (tangent everywhere) and T >= 2
            self._compiled = {many: tf.function(lambda x, y, s, many=many: self._shares_fn(x, y, s, many),
                                                input_signature=signature) for many in (False, True)}
        else:
            total = tf.function(self._totals_fn, input_signature=signature)
            self._compiled = {False: total, True: total}
        #: (layer name, route) pairs chosen at the last trace, for the log and the tests
        self.routes = {}

    def shares(self, x, y, stacked):
        """(T, N, L) float array; with a non-functional model L = 1 (the total only)."""
        stacked = tuple(stacked)
        many = int(stacked[0].shape[0]) >= 2
        return self._compiled[many](x, y, stacked).numpy()

    def shares_for(self, x, y, vecs):
        return self.shares(x, y, vec_stack(vecs))

    # --- graph functions ------------------------------------------------------------------------
    def _totals_fn(self, x, y, stacked):
        t = tf.shape(stacked[0])[0]
        out = tf.map_fn(lambda v: self.d.jvp_losses_graph(x, y, v), stacked,
                        fn_output_signature=tf.TensorSpec((None,), self.d.dtype))
        return tf.reshape(out, [t, -1, 1])

    def _shares_fn(self, x, y, stacked, many=False):
        with tf.GradientTape(persistent=False) as tape:
            tap = Tap(tape, self._kinds)
            logits = self.clf.image_logits(x, tap=tap)
            loss = tf.reduce_sum(self.d.per_example_loss(logits, y))
        outs = [r[3] for r in tap.records]
        deltas = tape.gradient(loss, outs, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        per_layer = {}
        for (layer, kind, x_l, _), delta in zip(tap.records, deltas):
            g_index = self._group_of[id(layer)]
            tangents = stacked[self._slices[g_index]]
            if kind is not None and many and self._gradient_route_pays(layer, kind, delta):
                self.routes[layer.name] = "gradient"
                share = self._gradient_share(layer, kind, x_l, delta, tangents)
            elif kind is not None:
                self.routes[layer.name] = "tangent"
                share = self._linear_share(layer, kind, x_l, delta, tangents)
            else:
                self.routes[layer.name] = "jvp"
                share = self._generic_share(layer, x_l, delta, tangents)
            per_layer[g_index] = share if g_index not in per_layer else per_layer[g_index] + share
        t = tf.shape(stacked[0])[0]
        n = tf.shape(y)[0]
        cols = [per_layer.get(i, tf.zeros([t, n], self.d.dtype)) for i in range(len(self.clf.groups))]
        return tf.stack(cols, axis=-1)

    @staticmethod
    def _gradient_route_pays(layer, kind, delta):
        """Per-image gradients beat the tangent route when (T-1)(P-1) > 1: here T >= 2, so P >= 3
        output positions (read from the backward signal's static shape)."""
        if not patch_support(layer, kind) or delta.shape.rank is None:
            return False
        dims = delta.shape[1:-1]
        if any(d is None for d in dims):
            return False
        positions = 1
        for d in dims:
            positions *= int(d)
        return positions >= 3

    @staticmethod
    def _gradient_share(layer, kind, x, delta, tangents):
        """(T, N): ⟨G_n, ΔW_t⟩ + ⟨Σ_p δ_{n,p}, Δb_t⟩ from per-image weight gradients G_n (N, K, C)."""
        g = per_image_weight_grads(layer, kind, x, delta)
        n = tf.shape(g)[0]
        dw = tangents[0]
        t = tf.shape(dw)[0]
        share = tf.matmul(tf.reshape(dw, [t, -1]), tf.reshape(g, [n, -1]), transpose_b=True)   # (T, N)
        return share + Scorer._bias_share(delta, tangents)

    @staticmethod
    def _bias_share(delta, tangents):
        """(T, N): ⟨Σ_p δ_{n,p}, Δb_t⟩, or 0 for a layer without a bias (``tangents`` = (ΔW,))."""
        if len(tangents) < 2:
            return tf.zeros([], delta.dtype)
        d_sum = tf.reduce_sum(delta, axis=list(range(1, delta.shape.rank - 1)))     # (N, C_out)
        return tf.matmul(tangents[1], d_sum, transpose_b=True)

    @staticmethod
    def _linear_share(layer, kind, x, delta, tangents):
        """(T, N): ⟨δ, linear(x; ΔW_t) + Δb_t⟩ for all t in one call.

        x: layer input (N, ..., C_in); delta: ∂L/∂z at the pre-activation (N, ..., C_out);
        tangents: (ΔW (T, ..., C_in, C_out), [Δb (T, C_out)]).
        """
        dw = tangents[0]
        if kind == "dense" and x.shape.rank == 2:
            # flat input: ⟨δ_n, x_n ΔW_t⟩ from one broadcast batched product (T, N, C); ΔW is read in
            # place (stacking the kernels along the outputs would copy all T of them: VGG16 fc1 411 MB each)
            z = tf.matmul(tf.expand_dims(x, 0), dw)
            share = tf.reduce_sum(z * tf.expand_dims(delta, 0), axis=2)                  # (T, N)
            return share + Scorer._bias_share(delta, tangents)
        rank = dw.shape.rank
        t = tf.shape(dw)[0]
        c_out = tf.shape(dw)[-1]
        # (T, ..., C_in, C_out) -> (..., C_in, T, C_out) -> (..., C_in, T*C_out)
        perm = list(range(1, rank - 1)) + [0, rank - 1]
        k = tf.transpose(dw, perm)
        k = tf.reshape(k, tf.concat([tf.shape(k)[:-2], [t * c_out]], axis=0))
        z = linear(layer, kind, x, k, None)                       # (N, ..., T*C_out)
        z = tf.reshape(z, tf.concat([tf.shape(z)[:-1], [t, c_out]], axis=0))  # (N, ..., T, C_out)
        prod = z * tf.expand_dims(delta, -2)
        axes = list(range(1, prod.shape.rank - 2)) + [prod.shape.rank - 1]
        share = tf.transpose(tf.reduce_sum(prod, axis=axes))            # (T, N)
        return share + Scorer._bias_share(delta, tangents)

    @staticmethod
    def _generic_share(layer, call, delta, tangents):
        """(T, N) by a forward-mode JVP of the layer (input fixed) per test image."""
        args, kwargs = call
        primals = [v.value for v in layer.trainable_weights]

        def one(tangent):
            with tf.autodiff.ForwardAccumulator(primals, list(tangent)) as acc:
                out = layer(*args, **kwargs)
            jv = acc.jvp(out, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            return tf.reduce_sum(tf.reshape(jv * delta, [tf.shape(delta)[0], -1]), axis=1)

        return tf.map_fn(one, tuple(tangents), fn_output_signature=tf.TensorSpec((None,), delta.dtype))


def score_batches(scorer, train, stacked, score_batch, batches=None, bar=None):
    """Shares of the training images of archive ``batches`` (default: all): float32 (T, N, L), in order.

    Args:
      scorer: a :class:`Scorer`; train: the training archive; stacked: a Vec whose parts have a leading
        axis T (or a list of T Vecs); score_batch: images per scoring call; bar: a progress bar (update(n)).

    Batch by batch, ``score_batch`` images per call: the one loop of a single-process run and of every
    Ray shard (influence.backends.ray_worker), so each call sees the same images whoever runs it and the numbers
    do not depend on the sharding.
    """
    if isinstance(stacked, list):
        stacked = vec_stack(stacked)
    stacked = tuple(stacked)
    batches = list(train.batches) if batches is None else list(batches)
    t = int(stacked[0].shape[0])
    out = np.empty((t, sum(train.batch_len(b) for b in batches), len(scorer.layer_names) if scorer.split else 1),
                   np.float32)
    at = 0
    for b in batches:
        x, y, _ = train.read_batch(b)
        for s in range(0, len(y), score_batch):
            xc, yc = x[s:s + score_batch], y[s:s + score_batch].astype(np.int64)
            out[:, at:at + len(yc)] = scorer.shares(xc, yc, stacked)
            at += len(yc)
            if bar is not None:
                bar.update(len(yc))
    return out
