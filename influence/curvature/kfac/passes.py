"""The two TensorFlow passes over the training archive that fit K-FAC / EK-FAC, as float64 sums over
any range of images (so :mod:`influence.backends.ray_driver` can shard them and add the shards up).

:class:`FittingPasses` takes its inputs explicitly -- the chunk's layer signals
(:class:`~influence.curvature.kfac.signals.LayerSignals`), the plan, the training objective (archive,
``n``, ``chunk``), the Fisher's seed -- and returns its sums; it keeps nothing of the fit.

Pass 1 (:meth:`FittingPasses.factor_sums`), with the patches ``a_{n,p}`` and signals ``δ_{n,p}`` of
:mod:`influence.curvature.kfac.signals`, sums per Kronecker layer (divided by ``n`` once all are in)::

    A = (1/n) Σ_n (1/P) Σ_p a_{n,p} a_{n,p}ᵀ          (K+1, K+1)
    S = (1/n) Σ_n       Σ_p δ_{n,p} δ_{n,p}ᵀ          (C_out, C_out)

block by block when split (:mod:`influence.curvature.kfac.plan`), and ``Σ_n g_n²`` per parameter of a
diagonal layer. Pass 2 (EK-FAC only, :meth:`FittingPasses.eigen_sums`) sums, in the eigenbases of
``A`` and ``S``, ``Λ_ij = (1/n) Σ_n [(Q_Aᵀ G_n Q_S)_ij]²`` with ``G_n = Σ_p a_{n,p} δ_{n,p}ᵀ`` the
per-image weight gradient ``(K+1, C_out)``.

Fitting streams the training archive in chunks of ``objective.chunk`` images: one pass for the
factors (float64 numpy sums of each chunk's products), float64 eigendecompositions one block at a
time (:mod:`influence.curvature.kfac.state`), and (EK-FAC) one more pass for ``Λ``. The products of a
chunk run in the model's dtype; the sums are numpy float64 arrays, not TensorFlow variables
(TensorFlow's CPU allocator keeps freed memory, so nothing large is summed inside TensorFlow).
"""
import gc

import numpy as np
import tensorflow as tf

from influence.curvature.kfac.plan import KronBlock
from influence.curvature.kfac.signals import image_of_rows, kron_inputs, rotate_last
from influence.progress import progress as progress_bar

#: bytes of the per-image rotated gradients held at once in the eigenvalue pass of a conv layer
MICRO_BYTES = 64 * 2**20


class FittingPasses:
    """Pass 1 and pass 2 over ranges of training images, as float64 sums.

    Args:
      signals: a :class:`~influence.curvature.kfac.signals.LayerSignals` (the tapped model and its Fisher).
      plan: the blocks (:func:`influence.curvature.kfac.plan.make_plan`).
      objective: the training objective: ``archive``, ``n``, ``chunk`` and ``d`` (the model's dtype
        and input specs).
      seed: seed of the sampled Fisher labels (read when ``signals.fisher`` is ``"sampled"``).
      name: prefix of the progress bars; progress: show them.

    It holds nothing of the fit; only, with ``keep=True``, the traced passes and the eigenvector
    variables of pass 2 for the next call.
    """

    def __init__(self, signals, plan, objective, seed, name, progress=True):
        self.signals = signals
        self.plan = plan
        self.obj = objective
        self.seed = int(seed)
        self.name = name
        self.progress = progress
        #: dtype of the per-chunk products: the model's (the sums are float64)
        self.compute_dtype = objective.d.dtype
        self._kept = {}           # traced passes and pass-2 variables kept between calls (keep=True)
        self._bases = {}          # {layer: {"QA": [tf.Variable], "QS": [...]}} while pass 2 runs

    def _factor_chunk(self, x, y, u):
        """Pass 1 on one chunk: ``{key: product}`` added by :meth:`factor_sums` to its float64 sums.

        Kronecker block ``L.A.b`` / ``L.S.b``: the chunk's ``aᵀa`` / ``δᵀδ`` in the model's dtype
        (float32 matmuls are about twice as fast on a CPU), ``L.P``: the positions ``P`` (A is divided
        by them in float64); diagonal ``L.diag.v``: ``Σ g²`` (float64). The sums are numpy arrays, not
        TensorFlow variables: TensorFlow's CPU allocator keeps what it once held (oneDNN's pool), so
        float64 sums inside it would stay resident next to their numpy copies for the rest of the run.
        """
        grouped = self.signals.signals(x, y, u)
        out, prev = {}, []
        for b in self.plan:
            recs = grouped.get(id(b.layer))
            if not recs:
                continue
            # one layer after another: the conv patches of one layer at a time (VGG16: up to 0.6 GB
            # per image each), whatever order the executor would pick
            with tf.control_dependencies(prev):
                mine = {}
                if isinstance(b, KronBlock):
                    a, dl, _ = kron_inputs(b, recs, self.compute_dtype)
                    mine[f"{b.name}.P"] = tf.cast(tf.shape(a)[1], tf.float64)
                    af = tf.reshape(a, [-1, b.k1])                 # A: each image once
                    df = tf.reshape(dl, [-1, b.c_out])             # S: every signal row
                    for i, (s, e) in enumerate(b.a_bounds):
                        mine[f"{b.name}.A.{i}"] = tf.matmul(af[:, s:e], af[:, s:e], transpose_a=True)
                    for i, (s, e) in enumerate(b.s_bounds):
                        mine[f"{b.name}.S.{i}"] = tf.matmul(df[:, s:e], df[:, s:e], transpose_a=True)
                else:
                    for i, g in enumerate(self.signals.per_image_grads(b, recs)):
                        mine[f"{b.name}.diag.{i}"] = tf.reduce_sum(tf.square(g), axis=0)
            out.update(mine)
            prev = list(mine.values())
        return out

    def _eigen_chunk(self, x, y, u):
        """Pass 2 on one chunk: ``{"L.Lambda": Σ_n (Q_Aᵀ G_n Q_S)²}`` of the chunk per Kronecker layer,
        added by :meth:`eigen_sums` to its float64 sum (the flat Dense product in the model's dtype;
        conv layers' micro-batch sums in float64). The eigenvectors are variables in the model's dtype
        (``_bases``, set by :meth:`eigen_sums`)."""
        grouped = self.signals.signals(x, y, u)
        out, prev = {}, []
        for b in self.plan:
            recs = grouped.get(id(b.layer))
            if not recs or not isinstance(b, KronBlock):
                continue
            with tf.control_dependencies(prev):        # one layer after another, as in pass 1
                out[f"{b.name}.Lambda"] = self._eigen_layer(b, recs)
            prev = [out[f"{b.name}.Lambda"]]
        return out

    def _eigen_layer(self, b, recs):
        """One Kronecker layer's ``Σ_n (Q_Aᵀ G_n Q_S)²`` over the chunk (see :meth:`_eigen_chunk`)."""
        dtype = self.compute_dtype
        a, dl, flat = kron_inputs(b, recs, dtype)
        basis = self._bases[b.name]
        at = rotate_last(a, basis["QA"], b.a_bounds)     # (N, P, K1): each image once
        dt = rotate_last(dl, basis["QS"], b.s_bounds)    # (R·N, P, C): every signal row
        images, rows = tf.shape(at)[0], tf.shape(dt)[0]
        if flat:   # G̃_r = ã_n(r) δ̃_rᵀ: Σ_r G̃_r² = (ã²)ᵀ (δ̃²), ã² repeated to the rows (K1 floats a row)
            a2 = tf.gather(tf.square(at[:, 0]), image_of_rows(rows, images))
            return tf.matmul(a2, tf.square(dt[:, 0]), transpose_a=True)
        m = max(1, MICRO_BYTES // (8 * b.k1 * b.c_out))

        def body(i, acc, at=at, dt=dt, m=m):
            rows_i = tf.range(i, tf.minimum(i + m, rows))
            g = tf.matmul(tf.gather(at, tf.math.floormod(rows_i, images)), dt[i:i + m], transpose_a=True)  # (m, K1, C)
            return i + m, acc + tf.cast(tf.reduce_sum(tf.square(g), axis=0), tf.float64)

        _, acc = tf.while_loop(lambda i, acc: i < rows, body,
                               (tf.constant(0), tf.zeros([b.k1, b.c_out], tf.float64)))
        return acc

    # --- passes ----------------------------------------------------------------------------------------
    def _uniforms(self):
        if self.signals.fisher == "sampled":
            return np.random.default_rng(self.seed).random(self.obj.n)
        return np.zeros(self.obj.n)

    def _stream(self, fn, desc, start=0, stop=None, keep=False, add=None):
        """Run ``fn`` on chunks of ``objective.chunk`` images of ``[start, stop)`` (default: all) and
        hand each chunk's outputs to ``add``; ``keep``: trace ``fn`` once and reuse it in later calls
        (the variables it reads must be kept too)."""
        d = self.obj.d
        compiled = self._kept.get(fn.__name__) if keep else None
        if compiled is None:
            compiled = tf.function(fn, input_signature=[d.x_spec, d.y_spec, tf.TensorSpec((None,), tf.float64)])
            if keep:
                self._kept[fn.__name__] = compiled
        u_all = self._uniforms()
        n, chunk = self.obj.n, self.obj.chunk
        stop = n if stop is None else int(stop)
        if not 0 <= start <= stop <= n:
            raise ValueError(f"image range [{start}, {stop}) is outside the archive's {n} images")
        with progress_bar(total=stop - start, desc=desc, unit="img", disable=not self.progress) as bar:
            for first in range(start, stop, chunk):
                idx = np.arange(first, min(first + chunk, stop))
                x, y = self.obj.archive.take(idx)
                out = compiled(x, np.asarray(y, np.int64), u_all[idx])
                if add is not None:
                    add(out)
                del out
                bar.update(len(idx))
        if not keep:
            # the traced pass captures the variables it reads (VGG16: GBs); free them now, not at some later GC
            del compiled
            gc.collect()

    # --- the two passes as sums over a range of training images (sharded by influence.backends.ray_driver) -----
    def factor_sums(self, start=0, stop=None, keep=False):
        """Pass 1 over images ``[start, stop)``: the float64 sums of the factors, not yet divided by n.

        Returns ``{key: array}``: ``L.A.b`` / ``L.S.b`` (block ``b`` of ``Σ_n (1/P) Σ_p a aᵀ`` and of
        ``Σ_n Σ_p δ δᵀ``) per Kronecker layer ``L``, ``L.diag.v`` (``Σ_n g_n²`` of variable ``v``) per
        diagonal layer. Sums over disjoint ranges add up to the sums over their union. ``keep``: keep
        the traced pass for the next call (a worker summing shard after shard).

        The sums are numpy float64 arrays, added to in place chunk by chunk (``sum + float64(product)``,
        the same operations as a float64 ``assign_add``); TensorFlow only holds one chunk's products.
        """
        sums = {}
        for b in self.plan:
            if isinstance(b, KronBlock):
                for which, bounds in (("A", b.a_bounds), ("S", b.s_bounds)):
                    for i, (s, e) in enumerate(bounds):
                        sums[f"{b.name}.{which}.{i}"] = np.zeros((e - s, e - s))
            else:
                for i, shape in enumerate(b.shapes):
                    sums[f"{b.name}.diag.{i}"] = np.zeros(shape)

        def add(out):
            positions = {key[:-2]: np.float64(t.numpy()) for key, t in out.items() if key.endswith(".P")}
            for key, t in out.items():
                if key.endswith(".P"):
                    continue
                prod = t.numpy()
                name, which = key.rsplit(".", 2)[:2]
                acc = sums[key]
                if which == "A":              # float64(aᵀa) / P, then added
                    tmp = prod.astype(np.float64)
                    tmp /= positions[name]
                    acc += tmp
                    del tmp
                else:                         # float64(δᵀδ) (exact cast) added; diagonal: float64 already
                    np.add(acc, prod, out=acc, dtype=np.float64)
                del prod

        self._stream(self._factor_chunk, f"{self.name} factors", start, stop, keep, add)
        return sums

    def eigen_sums(self, start=0, stop=None, basis=None, keep=False):
        """Pass 2 (EK-FAC) over images ``[start, stop)``: ``{"L.Lambda": Σ_n (Q_Aᵀ G_n Q_S)²}`` per
        Kronecker layer, ``(K1, C)`` float64, not yet divided by n. ``basis``: the eigenbasis of pass 1,
        ``{layer: {"QA": [(b, b), ...], "QS": [...]}}``
        (:meth:`influence.curvature.kfac.state.KroneckerFit.eigenbasis`); ``keep`` as in
        :meth:`factor_sums` (the eigenvector variables are kept too).

        TensorFlow holds the eigenvectors in the model's dtype (the pass's products run in it anyway)
        and one chunk's ``Λ`` products; the float64 sums are numpy arrays added to in place."""
        if basis is None:
            raise ValueError(f"{self.name}: pass 2 needs the eigenbasis of pass 1")
        dtype = self.compute_dtype.as_numpy_dtype
        kept = self._kept.get("eigen") if keep else None
        for b in self.plan:
            if isinstance(b, KronBlock):
                if kept is not None:
                    self._bases[b.name] = kept[b.name]
                    for which in ("QA", "QS"):
                        for var, q in zip(kept[b.name][which], basis[b.name][which]):
                            var.assign(q.astype(dtype, copy=False))
                    continue
                self._bases[b.name] = {which: [tf.Variable(q.astype(dtype, copy=False), trainable=False)
                                               for q in basis[b.name][which]] for which in ("QA", "QS")}
        if keep:
            self._kept["eigen"] = dict(self._bases)
        sums = {f"{b.name}.Lambda": np.zeros((b.k1, b.c_out)) for b in self.plan if isinstance(b, KronBlock)}

        def add(out):
            for key, t in out.items():
                prod = t.numpy()
                np.add(sums[key], prod, out=sums[key], dtype=np.float64)   # float64(product) added
                del prod

        try:
            self._stream(self._eigen_chunk, f"{self.name} eigenvalues", start, stop, keep, add)
        finally:
            if not keep:
                self._bases = {}
        return sums
