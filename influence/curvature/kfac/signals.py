"""One chunk of training images through the tapped model: each layer's inputs and backward signals,
the raw material of both fitting passes (:mod:`influence.curvature.kfac.passes`) and of the
self-influence graph (:mod:`influence.curvature.kfac.self_influence`).

For image ``n`` a Kronecker layer sees input patches ``a_{n,p} = [patch_p, 1]`` (``P`` output
positions; ``P = 1`` for Dense on flat input) and backward signals ``δ_{n,p} = ∂L_n/∂z_p``
(:func:`kron_inputs`); a diagonal layer's per-image gradients come from its own vectorised tapes
(:meth:`LayerSignals.per_image_grads`).

Labels (``fisher``):

* ``"auto"`` (default): ``"true"`` for a model of at most :data:`AUTO_TRUE_CLASSES` classes, else
  ``"top:10"`` (:func:`resolve_fisher`) -- the expectation over the classes that carry the probability
  mass, at no more than 10 backward passes per image. On a confident model the one-sample estimate is
  nearly always the predicted class, whose gradient is near zero, so the sampled Fisher shrinks to the
  regulariser and EK-FAC scores like a gradient dot product (README, "LDS").
* ``"sampled"``: a one-sample estimate of the true Fisher. One label per training image
  drawn from the model's own softmax by inverse-CDF sampling with the uniform ``u_n`` of image ``n``
  (global archive index); all ``u`` come from ``numpy.random.default_rng(seed).random(n)`` drawn
  once, so the labels do not depend on chunking.
* ``"true"``: the exact expectation over the model's softmax, ``Σ_c p_c ∇L(c) ∇L(c)ᵀ`` per image:
  one backward pass per class (refused above ``MAX_TRUE_CLASSES`` classes). Every (image, class)
  pair counts as a row with backward signal ``√p_c ∂L(c)/∂z`` (``A`` is unchanged). On a confident
  model the one-sample estimate misses the rare classes, whose share of the Fisher is ``O(p_c)``
  while a sample of the likely class gives ``O(p_c²)``: on the demo CNN the ``"true"`` Fisher took
  EK-FAC's leave-one-out Pearson from 0.78 to 0.92 (influence.validate, panel cnn-ekfac).
* ``"top:K"``: the ``K`` most probable classes of each image, each weighted by its probability:
  ``Σ_{c ∈ top_K(n)} p_c ∇L(c) ∇L(c)ᵀ`` -- the true Fisher without the classes outside the top ``K``
  (whose share is their probability mass), at ``K`` backward passes per image instead of one per
  class: the Fisher for models with many classes (ImageNet's 1 000). Equal to ``"true"`` up to the
  order of summation when ``K`` is at least the number of classes. Deterministic: no seed.
* ``"empirical"``: the true labels.
"""
import tensorflow as tf

from influence.errors import SettingError
from influence.model.taps import Tap, flat_signal, linear, patches

FISHER_KINDS = ("auto", "sampled", "true", "empirical")
#: --fisher auto: the exact expectation ("true") up to this many classes, else the top 10 classes
AUTO_TRUE_CLASSES = 10
#: --fisher true runs one backward pass per class: refused above this many classes
MAX_TRUE_CLASSES = 100
_ZERO = tf.UnconnectedGradients.ZERO


def top_classes(fisher):
    """``K`` of a ``"top:K"`` Fisher, None for the other kinds; SettingError for a malformed K."""
    if not (isinstance(fisher, str) and fisher.startswith("top:")):
        return None
    try:
        k = int(fisher[4:])
    except ValueError:
        k = 0
    if k < 1:
        raise SettingError("fisher", f"top:K takes a whole number of classes K >= 1, got {fisher!r}")
    return k


def check_fisher(fisher, classes):
    """SettingError unless ``fisher`` is one of :data:`FISHER_KINDS` or ``"top:K"`` and, for ``"true"``,
    the model has at most :data:`MAX_TRUE_CLASSES` classes."""
    if fisher not in FISHER_KINDS and top_classes(fisher) is None:
        raise SettingError("fisher", f"must be one of {', '.join(FISHER_KINDS)} or top:K, got {fisher!r}")
    if fisher == "true" and classes > MAX_TRUE_CLASSES:
        raise SettingError("fisher", f"'true' runs one backward pass per class: {classes} classes is above "
                                     f"{MAX_TRUE_CLASSES}; use 'top:10' (the 10 most probable classes of "
                                     f"each image, weighted by their probability)")


def resolve_fisher(fisher, classes):
    """The Fisher a run uses: ``"auto"`` -> ``"true"`` for at most :data:`AUTO_TRUE_CLASSES` classes, else
    ``"top:10"``; any other kind as given."""
    if fisher != "auto":
        return fisher
    return "true" if classes <= AUTO_TRUE_CLASSES else f"top:{AUTO_TRUE_CLASSES}"


def sample_labels(probs, uniforms):
    """Inverse-CDF sampling: the first class ``k`` with ``u < Σ_{j≤k} p_j``.

    Args:
      probs: (N, K) class probabilities (rows sum to 1), float64.
      uniforms: (N,) float64 in [0, 1).

    Returns:
      (N,) int64 labels (clipped to K-1 against rounding of the cumulative sum).
    """
    cum = tf.cumsum(probs, axis=1)
    k = tf.reduce_sum(tf.cast(cum <= uniforms[:, None], tf.int64), axis=1)
    return tf.minimum(k, tf.cast(tf.shape(probs)[1] - 1, tf.int64))


def signal_rows(fisher, classes):
    """Backward-signal rows per image that a fit with ``fisher`` (resolved) holds for a model of
    ``classes`` classes: ``classes`` for "true", ``min(K, classes)`` for "top:K", else 1."""
    if fisher == "true":
        return int(classes)
    k = top_classes(fisher)
    return 1 if k is None else min(k, int(classes))


def image_of_rows(rows, n):
    """Image index ``r mod n`` of each signal row ``r`` (rows are class- or rank-major): (R·N,) int32."""
    return tf.math.floormod(tf.range(rows), n)


def repeat_inputs(kind, x_l, delta):
    """A layer's input record repeated to the rows of ``delta`` (``R·N`` rows against the input's N):
    what a per-image gradient of every (class, image) row needs. The same record when ``R = 1``."""
    def rows(t):
        return tf.gather(t, image_of_rows(tf.shape(delta)[0], tf.shape(t)[0]))

    if kind is None:
        args, kwargs = x_l
        return tuple(rows(a) if tf.is_tensor(a) else a for a in args), kwargs
    return rows(x_l)


def kron_inputs(b, recs, dtype=tf.float64):
    """``(a, δ, flat)`` of a Kronecker block ``b`` from its records ``recs`` (:meth:`LayerSignals.signals`):
    ``a`` (N, P, K1) with the bias column, one row per image, and ``δ`` (R·N, P, C), ``R`` rows per image
    (row ``r`` is image ``r mod N``), both cast to ``dtype``; ``flat``: P = 1 statically (a Dense layer
    on a flat input)."""
    flat = len(recs) == 1 and recs[0][0] == "dense" and recs[0][1].shape.rank == 2
    if flat:
        a = recs[0][1][:, None, :]
        dl = recs[0][2][:, None, :]
    else:
        a = tf.concat([patches(b.layer, kind, x_l) for kind, x_l, _ in recs], axis=1)
        dl = tf.concat([flat_signal(delta) for _, _, delta in recs], axis=1)
    a = tf.cast(a, dtype)
    if b.bias_pos is not None:
        a = tf.concat([a, tf.ones_like(a[..., :1])], axis=-1)
    return a, tf.cast(dl, dtype), flat


def rotate_last(t, qs, bounds):
    """``t @ blockdiag(qs)``: (…, D) -> (…, D), ``qs`` the (b, b) blocks covering ``bounds`` [(start, stop)]."""
    return tf.concat([tf.tensordot(t[..., s:e], q, axes=[[t.shape.rank - 1], [0]])
                      for (s, e), q in zip(bounds, qs)], axis=-1)


class LayerSignals:
    """One chunk's per-layer records of a tapped model, for one Fisher.

    Args:
      derivs: the model's derivatives (:class:`influence.model.derivatives.Derivatives`: ``clf``,
        ``per_example_loss``).
      kinds: ``{id(layer): linear_kind(layer)}`` of the layers to tap.
      variables: the flat variable list (the plan's positions index it).
      fisher: the resolved Fisher kind (:func:`resolve_fisher`).
    """

    def __init__(self, derivs, kinds, variables, fisher):
        self.derivs = derivs
        self.kinds = kinds
        self.variables = list(variables)
        self.fisher = fisher

    def signals(self, x, y, u, true_labels=False):
        """Records of one chunk grouped by layer: {id(layer): [(kind, input, δ), ...]}.

        The input ``x_l`` has one row per image (N). The signals ``δ`` have ``R`` rows per image, ``R·N``
        in all: for the "true" Fisher (class, image) pairs, class-major, ``δ = √p_c
        ∂L(c)/∂z``; for "top:K" (rank, image) pairs, rank-major, the same with each image's ``K`` most
        probable classes; row ``r`` belongs to image ``r mod N`` (``R``: :func:`signal_rows`). The input
        is NOT repeated per class (VGG16's conv patches are 0.3 GB per image; ten copies of them were
        what killed a top:10 fit): :func:`kron_inputs` unfolds the patches once and :func:`image_of_rows`
        maps rows to images. With ``true_labels`` (self-influence) δ is taken with the labels ``y``
        (``R = 1``).
        """
        d = self.derivs
        true = self.fisher == "true" and not true_labels
        top = None if true_labels else top_classes(self.fisher)
        with tf.GradientTape(persistent=true or top is not None) as tape:
            tap = Tap(tape, self.kinds)
            logits = d.clf.image_logits(x, tap=tap)
            probs = tf.nn.softmax(tf.cast(tf.stop_gradient(logits), tf.float64))
            if true:
                losses = []
                for c in range(d.clf.num_classes):
                    label = tf.fill(tf.shape(y), tf.constant(c, tf.int64))
                    weight = tf.cast(tf.sqrt(probs[:, c]), logits.dtype)
                    losses.append(tf.reduce_sum(weight * d.per_example_loss(logits, label)))
            elif top is not None:
                best = tf.math.top_k(probs, k=min(top, d.clf.num_classes))
                losses = []
                for j in range(best.indices.shape[1]):
                    weight = tf.cast(tf.sqrt(best.values[:, j]), logits.dtype)
                    label = tf.cast(best.indices[:, j], tf.int64)
                    losses.append(tf.reduce_sum(weight * d.per_example_loss(logits, label)))
            else:
                labels = sample_labels(probs, u) if self.fisher == "sampled" and not true_labels else y
                losses = [tf.reduce_sum(d.per_example_loss(logits, labels))]
        outs = [r[3] for r in tap.records]
        per_loss = [tape.gradient(loss, outs, unconnected_gradients=_ZERO) for loss in losses]
        del tape
        reps = len(losses)
        grouped = {}
        for i, (layer, kind, x_l, _) in enumerate(tap.records):
            delta = per_loss[0][i] if reps == 1 else tf.concat([g[i] for g in per_loss], axis=0)
            grouped.setdefault(id(layer), []).append((kind, x_l, delta))
        return grouped

    def per_image_grads(self, b, recs):
        """Per-image gradients of a diagonal layer's variables, one per signal row: list of (R·N, *shape) float64."""
        weights = [self.variables[i] for i in b.positions]
        layer = b.layer
        total = None
        for kind, x_l, delta in recs:
            x_l = repeat_inputs(kind, x_l, delta)
            if kind is None:
                args, kwargs = x_l
                tens = [i for i, a in enumerate(args) if tf.is_tensor(a)]
                elems = (tuple(args[i] for i in tens), delta)

                def call(ts, args=args, kwargs=kwargs, tens=tens):
                    full = list(args)
                    for i, t in zip(tens, ts):
                        full[i] = t[None]
                    return layer(*full, **kwargs)
            else:
                elems = ((x_l,), delta)

                def call(ts, kind=kind):
                    return linear(layer, kind, ts[0][None], layer.kernel, layer.bias)

            def one(e, call=call):
                ts, di = e
                prims = [w.value for w in weights]
                with tf.GradientTape() as t:
                    t.watch(prims)
                    s = tf.reduce_sum(call(ts) * di[None])
                return tuple(t.gradient(s, prims, unconnected_gradients=_ZERO))

            g = tf.vectorized_map(one, elems)
            g = [tf.cast(gi, tf.float64) for gi in g]
            total = g if total is None else [p + q for p, q in zip(total, g)]
        return total
