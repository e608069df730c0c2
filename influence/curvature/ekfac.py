"""``--solver kfac`` / ``--solver ekfac``: the block-diagonal Kronecker-factored Fisher, fitted once.

Solves ``(F + Ω'' + λI)⁻¹ v`` where ``F`` is the Fisher of the mean training loss
``(1/n) Σ_n E[∇L_n ∇L_nᵀ]`` approximated block-diagonally, one block per selected layer
(Martens & Grosse 2015; George et al. 2018; Grosse et al. 2023; docs/DESIGN.md, "Curvature that is
fitted once"), ``Ω''`` the exact Hessian of the Keras L2 weight regularisers and ``λ`` = ``--damping``.

Labels (``fisher``):

* ``"sampled"`` (default): a one-sample estimate of the true Fisher. One label per training image
  drawn from the model's own softmax by inverse-CDF sampling with the uniform ``u_n`` of image ``n``
  (global archive index); all ``u`` come from ``numpy.random.default_rng(seed).random(n)`` drawn
  once, so the labels do not depend on chunking.
* ``"true"``: the exact expectation over the model's softmax, ``Σ_c p_c ∇L(c) ∇L(c)ᵀ`` per image:
  one backward pass per class (refused above ``MAX_TRUE_CLASSES`` classes). Every (image, class)
  pair counts as a row with backward signal ``√p_c ∂L(c)/∂z`` (``A`` is unchanged). On a confident
  model the one-sample estimate misses the rare classes, whose share of the Fisher is ``O(p_c)``
  while a sample of the likely class gives ``O(p_c²)``: on the demo CNN the ``"true"`` Fisher took
  EK-FAC's leave-one-out Pearson from 0.78 to 0.92 (influence.validate, panel cnn-ekfac).
* ``"empirical"``: the true labels.

Layers and conventions. Every matrix of a Dense/Conv layer is taken in the ``(K+1, C_out)``
orientation of the Keras kernel ``kernel.reshape(K, C_out)`` with the bias as one more row (the
parameter order of ``[kernel.ravel(), bias]``; no bias row when the layer has none). For image ``n``
with input patches ``a_{n,p} = [patch_p, 1]`` (``P`` output positions; ``P = 1`` for Dense on flat
input) and backward signals ``δ_{n,p} = ∂L_n/∂z_p``::

    G_n = Σ_p a_{n,p} δ_{n,p}ᵀ                        (K+1, C_out), the per-image weight gradient
    A   = (1/n) Σ_n (1/P) Σ_p a_{n,p} a_{n,p}ᵀ          (K+1, K+1)
    S   = (1/n) Σ_n       Σ_p δ_{n,p} δ_{n,p}ᵀ          (C_out, C_out)
    F_l ≈ A ⊗ S   (row-major vec of the (K+1, C_out) matrix: vec(a δᵀ) = a ⊗ δ)

For Dense on flat input with one training image this is exactly ``vec(G)vec(G)ᵀ``; for convolutions
it is the KFC convention (Grosse & Martens 2016: A averaged over positions, S summed). With
``A = Q_A diag(e_A) Q_Aᵀ`` and ``S = Q_S diag(e_S) Q_Sᵀ``:

    K-FAC:   Λ_ij = e_A,i · e_S,j
    EK-FAC:  Λ_ij = (1/n) Σ_n [(Q_Aᵀ G_n Q_S)_ij]²       (a second pass over the training set)
    (F_l + R_l + λI)⁻¹ V = Q_A [ (Q_Aᵀ V Q_S) ⊘ (Λ + ρ 1ᵀ + λ) ] Q_Sᵀ

Large factors: a factor larger than ``ekfac_max_block`` is split into near-equal diagonal blocks
of at most that size (``A`` becomes block-diagonal, i.e. the correlation between input features of
different blocks is dropped; each block is eigendecomposed on its own, so ``Q_A`` is block-diagonal).
The same rule applies to ``S``.

Regularisers. A Keras ``L2(c)`` on a weight adds ``2c`` to the Hessian on that weight (exact). On
a Kronecker layer this is ``R_l = diag(r) ⊗ I`` with ``r_k`` = 2c of the kernel on the kernel rows
and 2c of the bias on the bias row. Its diagonal in the Kronecker eigenbasis, ``ρ_i = Σ_k
Q_A[k,i]² r_k``, is added to every ``Λ_ij`` -- the diagonal of ``F + R`` in that basis, as EK-FAC
does for ``F``. It is exact (``R_l = 2c·I``) when kernel and bias carry the same L2 strength or the
layer has no bias; with the kernel regularised and the bias not (the Keras default), it spreads the
kernel's ``2c`` over the bias row's share of each eigenvector. Any other regulariser (L1, custom) is
a :class:`UserError` naming the layer.

Other layers with weights (BatchNorm, LayerNorm, Embedding, convs whose patches cannot be
unfolded, ...) get a diagonal block: ``E_n[g_n²]`` per parameter from per-image gradients, plus
``2c`` of their L2 regulariser. Which layers got one is logged.

Fitting streams the training archive in chunks of ``objective.chunk`` images: one pass for the
factors (float64 numpy sums of each chunk's products), float64 eigendecompositions one block at a
time, and (EK-FAC) one more pass for ``Λ``. The factor memory (factors + eigenbases + ``Λ``, float64,
``factor_bytes``) and the fit's peak with its copies and workspaces (``fit_bytes``) are estimated
first and refused with a :class:`UserError` when they exceed ``memory_budget``; ``engine.plan_memory``
gives the fit's chunk what is left (issue 16: TensorFlow's CPU allocator keeps freed memory, so
nothing large is summed inside TensorFlow).

Fitted state (``state()``; keys per layer name ``L``): ``L.QA.b`` / ``L.eA.b`` (eigenvectors and
eigenvalues of block ``b`` of ``A``), ``L.QS.b`` / ``L.eS.b`` (the same for ``S``), ``L.Lambda``
(EK-FAC: ``(K+1, C_out)``) and ``L.diag`` (diagonal layers: ``E[g²]`` over the layer's variables,
flattened in order). The damping is not in the state.
"""
import gc
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from influence.curvature.base import InverseHVP
from influence.errors import UserError
from influence.model.hvp import vec_to_numpy
from influence.progress import progress as progress_bar
from influence.model.taps import Tap, flat_signal, linear, linear_kind, patch_support, patches

log = logging.getLogger(__name__)

FISHER_KINDS = ("sampled", "true", "empirical")
#: --fisher true runs one backward pass per class: refused above this many classes
MAX_TRUE_CLASSES = 100
#: default largest factor block (--ekfac-max-block)
MAX_BLOCK = 4096
#: bytes of the per-image rotated gradients held at once in the eigenvalue pass of a conv layer
MICRO_BYTES = 64 * 2**20
#: a layer's F + R + λI counts as singular below this fraction of its largest eigenvalue
SINGULAR = 1e-12
#: layers with at least this many weights check a test vector for rank one before rotating it
RANK_ONE_MIN = 2**20
_ZERO = tf.UnconnectedGradients.ZERO


# ----------------------------------------------------------------------------- pure helpers

def split_blocks(size, max_block):
    """Near-equal contiguous blocks of at most ``max_block`` covering ``range(size)``.

    Returns a list of ``(start, stop)``; one block when ``size <= max_block``.
    """
    if max_block < 1:
        raise UserError(f"--ekfac-max-block must be >= 1, got {max_block}")
    count = max(1, math.ceil(size / max_block))
    edges = [round(i * size / count) for i in range(count + 1)]
    return [(edges[i], edges[i + 1]) for i in range(count)]


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


def block_entries(*bounds_lists):
    """``Σ b²`` over the diagonal blocks of every bounds list: the entries of the block matrices."""
    return sum((e - s) ** 2 for bounds in bounds_lists for s, e in bounds)


def kron_factor_bytes(k1, c_out, a_bounds, s_bounds, corrected):
    """float64 bytes of one Kronecker layer while fitting: the factor blocks and their eigenvectors
    (``2 Σ b²`` for A and S), eigenvalues, and ``Λ`` (``K1·C``) when ``corrected`` (EK-FAC)."""
    return 8 * (2 * block_entries(a_bounds, s_bounds) + (k1 * c_out if corrected else 0) + (k1 + c_out))


def l2_hessian(variable, layer_name, strict=True):
    """``2c`` for a Keras ``L2(c)`` (or ``L1L2`` with ``l1 = 0``) on ``variable``, 0 without one.

    Other regularisers raise a :class:`UserError` (``strict``) or count as 0 (a warning is logged).
    """
    reg = getattr(variable, "regularizer", None)
    if reg is None:
        return 0.0
    l1 = float(getattr(reg, "l1", 0.0) or 0.0)
    l2 = getattr(reg, "l2", None)
    if l2 is not None and l1 == 0.0 and type(reg).__name__ in ("L2", "L1L2"):
        return 2.0 * float(np.asarray(l2, dtype=np.dtype(variable.dtype)))
    what = f"layer {layer_name!r} has a {type(reg).__name__} regulariser on {variable.path}"
    if strict:
        raise UserError(f"{what}: K-FAC/EK-FAC only add the Hessian of Keras L2 weight regularisers; "
                        "remove it or use --solver exact/cg/lissa")
    log.warning("%s: its Hessian is left out of the EK-FAC preconditioner", what)
    return 0.0


# ----------------------------------------------------------------------------- the plan

@dataclass
class _Kron:
    """A Dense/Conv layer with a Kronecker block, matrices in the (K1, C) orientation."""

    name: str
    layer: object
    kernel_pos: int           # index of the kernel in the flat variable list
    bias_pos: object          # index of the bias, or None
    k_in: int                 # K = prod(kernel.shape[:-1])
    c_out: int
    kernel_shape: tuple
    a_bounds: list
    s_bounds: list
    reg_rows: np.ndarray      # (K1,) regulariser Hessian per row
    acc: dict = field(default_factory=dict)

    @property
    def k1(self):
        return self.k_in + (self.bias_pos is not None)

    def bytes(self, corrected):
        return kron_factor_bytes(self.k1, self.c_out, self.a_bounds, self.s_bounds, corrected)


@dataclass
class _Diag:
    """A layer with a diagonal block ``E[g²]`` over its variables."""

    name: str
    layer: object
    positions: list           # indices in the flat variable list
    shapes: list
    reg: np.ndarray           # (size,) regulariser Hessian per parameter
    why: str = ""
    acc: list = field(default_factory=list)

    @property
    def size(self):
        return int(sum(int(np.prod(s)) for s in self.shapes))

    def bytes(self, corrected):
        return 8 * self.size


def _format_gb(nbytes):
    return f"{nbytes / 2**30:.3g} GB"


# ----------------------------------------------------------------------------- solvers

class KFACSolver(InverseHVP):
    """K-FAC: ``(A ⊗ S + R + λI)⁻¹`` per layer with ``Λ = e_A e_Sᵀ`` (see the module docstring).

    Args (beyond objective, damping, progress):
      fisher: "sampled" (a label drawn from the model's softmax), "true" (the expectation over all
        classes) or "empirical" (the true labels).
      seed: seed of the sampled labels.
      ekfac_max_block: largest factor block; larger factors are split block-diagonally.
      memory_budget: GB allowed for the factors (float64 while fitting); None: no limit.
    """

    name = "kfac"
    summary = "Kronecker-factored Fisher (K-FAC), fitted once; an approximation, no HVPs per test image"
    approximates = "kfac"
    relative_damping = True  # λ per layer from its own eigenvalues (--damping auto / 0.3x)
    self_influence_route = "Kronecker eigenbasis"     # self_influence_batch: no inverse-HVP per image
    corrected = False        # EK-FAC: eigenvalues corrected by a second pass
    strict_regularisers = True

    def __init__(self, objective, damping, fisher="sampled", seed=0, ekfac_max_block=MAX_BLOCK,
                 memory_budget=2.0, progress=True):
        super().__init__(objective, damping, progress)
        if fisher not in FISHER_KINDS:
            raise UserError(f"--fisher must be one of {', '.join(FISHER_KINDS)}, got {fisher!r}")
        self.fisher = fisher
        classes = objective.d.clf.num_classes
        if fisher == "true" and classes > MAX_TRUE_CLASSES:
            raise UserError(f"--fisher true runs one backward pass per class: {classes} classes is above "
                            f"{MAX_TRUE_CLASSES}; use --fisher sampled")
        self.seed = int(seed)
        self.max_block = int(ekfac_max_block)
        self.memory_budget = None if memory_budget is None else float(memory_budget)
        d = objective.d
        self.variables = list(d.variables)
        if not d.clf.supports_tap:
            raise UserError(f"--solver {self.name} needs a functional or Sequential Keras model "
                            "(its layers are tapped); use --solver cg/lissa/exact for a subclassed model")
        self._kinds = {id(g.layer): linear_kind(g.layer) for g in d.clf.groups}
        self.plan = self._make_plan()
        self.factor_bytes = sum(b.bytes(self.corrected) for b in self.plan)
        self.fit_bytes = self._fit_bytes(np.dtype(objective.d.dtype.as_numpy_dtype).itemsize)
        self._check_budget()
        self._fitted = False
        self._compacted = False   # compact(): only what solving needs is left
        self._fits = 0            # fits and loads so far (keys the self-influence graph)
        self._dens = None         # (damping, {layer: Λ + ρ + λ}) once formed
        self._self_key = None     # (fits, damping) of the compiled self-influence graph
        #: dtype of the per-chunk products of the fitting passes: the model's (sums are float64)
        self._compute_dtype = objective.d.dtype
        self._kept = {}           # accumulators and compiled passes kept between calls (keep=True)
        self.info.update(fisher=self.fisher, ekfac_max_block=self.max_block,
                         factor_bytes=int(self.factor_bytes), fit_bytes=int(self.fit_bytes),
                         layers={b.name: self._describe(b) for b in self.plan})

    # --- plan --------------------------------------------------------------------------------------
    def _make_plan(self):
        plan, at = [], 0
        diag_names = []
        for g in self.obj.d.clf.groups:
            positions = list(range(at, at + len(g.variables)))
            at += len(g.variables)
            kind = self._kinds[id(g.layer)]
            layer = g.layer
            if kind is not None and patch_support(layer, kind):
                ids = [id(v) for v in g.variables]
                kpos = positions[ids.index(id(layer.kernel))]
                bpos = positions[ids.index(id(layer.bias))] if layer.bias is not None else None
                shape = tuple(int(s) for s in layer.kernel.shape)
                k_in, c_out = int(np.prod(shape[:-1])), shape[-1]
                k1 = k_in + (bpos is not None)
                rows = np.full(k1, l2_hessian(layer.kernel, g.name, self.strict_regularisers))
                if bpos is not None:
                    rows[-1] = l2_hessian(layer.bias, g.name, self.strict_regularisers)
                plan.append(_Kron(g.name, layer, kpos, bpos, k_in, c_out, shape,
                                  split_blocks(k1, self.max_block), split_blocks(c_out, self.max_block), rows))
            else:
                reg = np.concatenate([np.full(int(np.prod(v.shape)), l2_hessian(v, g.name, self.strict_regularisers))
                                      for v in g.variables])
                why = "not a Dense/Conv layer" if kind is None else "its conv patches cannot be unfolded"
                plan.append(_Diag(g.name, layer, positions, [tuple(int(s) for s in v.shape) for v in g.variables],
                                  reg, why))
                diag_names.append(f"{g.name} ({why})")
        if diag_names:
            log.info("%s: diagonal Fisher blocks for %s", self.name, ", ".join(diag_names))
        for b in plan:
            if isinstance(b, _Kron) and (len(b.a_bounds) > 1 or len(b.s_bounds) > 1):
                log.info("%s: layer %s: A (%d) split into %d blocks, S (%d) into %d (--ekfac-max-block %d)",
                         self.name, b.name, b.k1, len(b.a_bounds), b.c_out, len(b.s_bounds), self.max_block)
        return plan

    @staticmethod
    def _describe(b):
        if isinstance(b, _Kron):
            return (f"kron A {b.k1} ({len(b.a_bounds)} blocks) x S {b.c_out} ({len(b.s_bounds)} blocks)")
        return f"diag {b.size}"

    def _fit_bytes(self, item):
        """The most bytes the fit holds at once besides one chunk's activations (``objective.chunk``,
        planned by ``engine.plan_memory`` from what is left of the budget), by step:

        * pass 1: the float64 factor sums and one chunk's products (model dtype);
        * eigendecompositions: the sums or their eigenvectors (float64) and one block's transients
          (symmetrised copy, numpy's ``eigh`` copy, ``syevd``'s ``2 b²`` workspace, eigenvectors);
        * pass 2 (EK-FAC): the float64 eigenvectors and ``Λ`` sums, the eigenvectors in the model's dtype
          (TensorFlow variables) and one chunk's ``Λ`` products (model dtype for a flat Dense layer,
          float64 micro-batch sums otherwise: counted twice);
        * :meth:`compact`: the eigenvectors in the model's dtype next to the float64 ones, then (those
          freed) the damped ``Λ`` in the model's dtype and one float64 ``(K1, C)`` temporary.

        TensorFlow's CPU allocator keeps the memory of freed tensors for later ones, so the products
        of the passes stay resident but are reused, not added up.
        """
        kron = [b for b in self.plan if isinstance(b, _Kron)]
        entries = sum(block_entries(b.a_bounds, b.s_bounds) for b in kron)
        eig = sum(b.k1 + b.c_out for b in kron)
        diag = sum(b.size for b in self.plan if isinstance(b, _Diag))
        lam_all = sum(b.k1 * b.c_out for b in kron) + diag
        lam = lam_all - diag if self.corrected else 0
        big = max([b.k1 * b.c_out for b in kron] + [0])
        block = max([(e - s) ** 2 for b in kron for s, e in b.a_bounds + b.s_bounds] + [0])

        def flat(b):
            try:
                return self._kinds.get(id(b.layer)) == "dense" and len(b.layer.input.shape) == 2
            except (AttributeError, ValueError, TypeError):
                return False

        lam_out = sum((item if flat(b) else 16) * b.k1 * b.c_out for b in kron) if self.corrected else 0
        held = 8 * (entries + eig + diag)
        steps = [8 * entries + item * entries + 16 * diag,                       # pass 1
                 held + 8 * 5 * block,                                           # eigh, one block
                 held + 8 * lam + item * entries + lam_out,                      # pass 2
                 held + 8 * lam + 8 * big,                                       # _damped without compact
                 held + 8 * lam + item * entries,                                # compact: the eigenvectors
                 8 * (eig + diag + lam + big) + item * (entries + lam_all)]      # compact: the damped Λ
        return int(max(steps))

    def _check_budget(self):
        if self.memory_budget is None:
            return
        budget = self.memory_budget * 2**30
        if max(self.factor_bytes, self.fit_bytes) <= budget:
            return
        worst = sorted(self.plan, key=lambda b: -b.bytes(self.corrected))[:3]
        largest = ", ".join(f"{b.name} {_format_gb(b.bytes(self.corrected))}" for b in worst)
        raise UserError(
            f"--solver {self.name}: the Kronecker factors need {_format_gb(self.factor_bytes)} (float64"
            + (f"; {_format_gb(self.fit_bytes)} at the fit's peak" if self.fit_bytes > self.factor_bytes else "")
            + f"), over "
            f"--memory-budget {self.memory_budget:g} GB; largest layers: {largest}; choose fewer layers with "
            f"--params, a smaller --ekfac-max-block (now {self.max_block}) or a larger --memory-budget")

    def cache_key(self):
        key = {"fisher": self.fisher, "ekfac_max_block": self.max_block}
        if self.fisher == "sampled":
            key["seed"] = self.seed
        return key

    # --- one chunk: forward with taps, backward signals ---------------------------------------------
    def _signals(self, x, y, u, true_labels=False):
        """Records of one chunk grouped by layer: {id(layer): [(kind, input, δ), ...]}.

        Rows are images; for the "true" Fisher they are (class, image) pairs, class-major: the
        input repeated once per class and ``δ = √p_c ∂L(c)/∂z``. The first N rows of every input
        are the chunk's images. With ``true_labels`` (self-influence) δ is taken with the labels ``y``.
        """
        d = self.obj.d
        true = self.fisher == "true" and not true_labels
        with tf.GradientTape(persistent=true) as tape:
            tap = Tap(tape, self._kinds)
            logits = d.clf.image_logits(x, tap=tap)
            probs = tf.nn.softmax(tf.cast(tf.stop_gradient(logits), tf.float64))
            if true:
                losses = []
                for c in range(d.clf.num_classes):
                    label = tf.fill(tf.shape(y), tf.constant(c, tf.int64))
                    weight = tf.cast(tf.sqrt(probs[:, c]), logits.dtype)
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
            if reps > 1:
                if kind is None:
                    args, kwargs = x_l
                    x_l = (tuple(tf.concat([a] * reps, axis=0) if tf.is_tensor(a) else a for a in args), kwargs)
                else:
                    x_l = tf.concat([x_l] * reps, axis=0)
            grouped.setdefault(id(layer), []).append((kind, x_l, delta))
        return grouped

    @staticmethod
    def _kron_inputs(b, recs, dtype=tf.float64):
        """float64 ``a`` (N, P, K1) with the bias column and ``δ`` (N, P, C); ``flat``: P = 1 statically."""
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

    def _per_image_grads(self, b, recs):
        """Per-image gradients of a diagonal layer's variables: list of (N, *shape) float64."""
        weights = [self.variables[i] for i in b.positions]
        layer = b.layer
        total = None
        for kind, x_l, delta in recs:
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

    def _factor_chunk(self, x, y, u):
        """Pass 1 on one chunk: ``{key: product}`` added by :meth:`factor_sums` to its float64 sums.

        Kronecker block ``L.A.b`` / ``L.S.b``: the chunk's ``aᵀa`` / ``δᵀδ`` in the model's dtype
        (float32 matmuls are about twice as fast on a CPU), ``L.P``: the positions ``P`` (A is divided
        by them in float64); diagonal ``L.diag.v``: ``Σ g²`` (float64). The sums are numpy arrays, not
        TensorFlow variables: TensorFlow's CPU allocator keeps what it once held (oneDNN's pool), so
        float64 sums inside it would stay resident next to their numpy copies for the rest of the run.
        """
        grouped = self._signals(x, y, u)
        images = tf.shape(x)[0]
        out, prev = {}, []
        for b in self.plan:
            recs = grouped.get(id(b.layer))
            if not recs:
                continue
            # one layer after another: the conv patches of one layer at a time (VGG16: up to 0.6 GB
            # per image each), whatever order the executor would pick
            with tf.control_dependencies(prev):
                mine = {}
                if isinstance(b, _Kron):
                    a, dl, _ = self._kron_inputs(b, recs, self._compute_dtype)
                    mine[f"{b.name}.P"] = tf.cast(tf.shape(a)[1], tf.float64)
                    af = tf.reshape(a[:images], [-1, b.k1])        # A: each image once
                    df = tf.reshape(dl, [-1, b.c_out])
                    for i, (s, e) in enumerate(b.a_bounds):
                        mine[f"{b.name}.A.{i}"] = tf.matmul(af[:, s:e], af[:, s:e], transpose_a=True)
                    for i, (s, e) in enumerate(b.s_bounds):
                        mine[f"{b.name}.S.{i}"] = tf.matmul(df[:, s:e], df[:, s:e], transpose_a=True)
                else:
                    for i, g in enumerate(self._per_image_grads(b, recs)):
                        mine[f"{b.name}.diag.{i}"] = tf.reduce_sum(tf.square(g), axis=0)
            out.update(mine)
            prev = list(mine.values())
        return out

    @staticmethod
    def _rotate_last(t, qs, bounds):
        """(…, D) @ blockdiag(qs) -> (…, D)."""
        return tf.concat([tf.tensordot(t[..., s:e], q, axes=[[t.shape.rank - 1], [0]])
                          for (s, e), q in zip(bounds, qs)], axis=-1)

    def _eigen_chunk(self, x, y, u):
        """Pass 2 on one chunk: ``{"L.Lambda": Σ_n (Q_Aᵀ G_n Q_S)²}`` of the chunk per Kronecker layer,
        added by :meth:`eigen_sums` to its float64 sum (the flat Dense product in the model's dtype;
        conv layers' micro-batch sums in float64). The eigenvectors are variables in the model's dtype."""
        grouped = self._signals(x, y, u)
        out, prev = {}, []
        for b in self.plan:
            recs = grouped.get(id(b.layer))
            if not recs or not isinstance(b, _Kron):
                continue
            with tf.control_dependencies(prev):        # one layer after another, as in pass 1
                out[f"{b.name}.Lambda"] = self._eigen_layer(b, recs)
            prev = [out[f"{b.name}.Lambda"]]
        return out

    def _eigen_layer(self, b, recs):
        """One Kronecker layer's ``Σ_n (Q_Aᵀ G_n Q_S)²`` over the chunk (see :meth:`_eigen_chunk`)."""
        dtype = self._compute_dtype
        a, dl, flat = self._kron_inputs(b, recs, dtype)
        at = self._rotate_last(a, b.acc["QA"], b.a_bounds)     # (N, P, K1)
        dt = self._rotate_last(dl, b.acc["QS"], b.s_bounds)    # (N, P, C)
        if flat:   # G̃_n = ã_n δ̃_nᵀ: Σ_n G̃_n² = (ã²)ᵀ (δ̃²)
            return tf.matmul(tf.square(at[:, 0]), tf.square(dt[:, 0]), transpose_a=True)
        m = max(1, MICRO_BYTES // (8 * b.k1 * b.c_out))
        n = tf.shape(at)[0]

        def body(i, acc, at=at, dt=dt, m=m):
            g = tf.matmul(at[i:i + m], dt[i:i + m], transpose_a=True)      # (m, K1, C)
            return i + m, acc + tf.cast(tf.reduce_sum(tf.square(g), axis=0), tf.float64)

        _, acc = tf.while_loop(lambda i, acc: i < n, body,
                               (tf.constant(0), tf.zeros([b.k1, b.c_out], tf.float64)))
        return acc

    # --- passes ----------------------------------------------------------------------------------------
    def _uniforms(self):
        if self.fisher == "sampled":
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

    # --- the two passes as sums over a range of training images (sharded by influence.distributed) -----
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
            if isinstance(b, _Kron):
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

    def set_factors(self, sums, n=None):
        """Eigendecompose the factors from pass-1 ``sums`` (consumed: each is freed once used) over
        ``n`` images (default: the whole archive). Ends K-FAC's fit; EK-FAC needs :meth:`set_lambda`.

        One block at a time: the block's sum (scaled in place when writable), its symmetrised copy,
        numpy's ``eigh`` copy and workspace (``syevd``: about ``2 b²``) and the eigenvectors
        (:func:`eigh_workspace_bytes`).
        """
        n = self.obj.n if n is None else n
        self._eig = {}
        self._diag = {}
        for b in self.plan:
            if isinstance(b, _Kron):
                parts = {}
                for which, bounds in (("A", b.a_bounds), ("S", b.s_bounds)):
                    qs, es = [], []
                    for i in range(len(bounds)):
                        m = sums.pop(f"{b.name}.{which}.{i}")
                        if m.flags.writeable and m.dtype == np.float64:
                            m /= n
                        else:
                            m = m / n
                        sym = m + m.T
                        del m
                        sym *= 0.5
                        e, q = np.linalg.eigh(sym)
                        del sym
                        qs.append(q)
                        es.append(e)
                    parts[which] = (qs, es)
                self._eig[b.name] = {"QA": parts["A"][0], "eA": parts["A"][1],
                                     "QS": parts["S"][0], "eS": parts["S"][1]}
            else:
                self._diag[b.name] = np.concatenate([sums.pop(f"{b.name}.diag.{i}").ravel()
                                                     for i in range(len(b.shapes))]) / n
        self._lambda = {}

    def eigenbasis(self):
        """``{layer: {"QA": [...], "QS": [...]}}``: what pass 2 needs from pass 1 (after :meth:`set_factors`)."""
        return {b.name: {"QA": self._eig[b.name]["QA"], "QS": self._eig[b.name]["QS"]}
                for b in self.plan if isinstance(b, _Kron)}

    def eigen_sums(self, start=0, stop=None, basis=None, keep=False):
        """Pass 2 (EK-FAC) over images ``[start, stop)``: ``{"L.Lambda": Σ_n (Q_Aᵀ G_n Q_S)²}`` per
        Kronecker layer, float64, not yet divided by n. ``basis``: an :meth:`eigenbasis` (default: this
        solver's own, after :meth:`set_factors`); ``keep`` as in :meth:`factor_sums` (the eigenvector
        variables are kept too).

        TensorFlow holds the eigenvectors in the model's dtype (the pass's products run in it anyway)
        and one chunk's ``Λ`` products; the float64 sums are numpy arrays added to in place."""
        basis = self.eigenbasis() if basis is None else basis
        dtype = self._compute_dtype.as_numpy_dtype
        kept = self._kept.get("eigen") if keep else None
        for b in self.plan:
            if isinstance(b, _Kron):
                if kept is not None:
                    b.acc = kept[b.name]
                    for which in ("QA", "QS"):
                        for var, q in zip(b.acc[which], basis[b.name][which]):
                            var.assign(q.astype(dtype, copy=False))
                    continue
                b.acc = {which: [tf.Variable(q.astype(dtype, copy=False), trainable=False)
                                 for q in basis[b.name][which]] for which in ("QA", "QS")}
        if keep:
            self._kept["eigen"] = {b.name: b.acc for b in self.plan if isinstance(b, _Kron)}
        sums = {f"{b.name}.Lambda": np.zeros((b.k1, b.c_out)) for b in self.plan if isinstance(b, _Kron)}

        def add(out):
            for key, t in out.items():
                prod = t.numpy()
                np.add(sums[key], prod, out=sums[key], dtype=np.float64)   # float64(product) added
                del prod

        try:
            self._stream(self._eigen_chunk, f"{self.name} eigenvalues", start, stop, keep, add)
        finally:
            if not keep:
                for b in self.plan:
                    if isinstance(b, _Kron):
                        b.acc = {}
        return sums

    def set_lambda(self, sums, n=None):
        """EK-FAC's corrected eigenvalues from pass-2 ``sums`` over ``n`` images (default: all); the
        sums are consumed (divided in place when writable)."""
        n = self.obj.n if n is None else n
        self._lambda = {}
        for b in self.plan:
            if isinstance(b, _Kron):
                lam = sums.pop(f"{b.name}.Lambda")
                if lam.flags.writeable and lam.dtype == np.float64:
                    lam /= n
                else:
                    lam = lam / n
                self._lambda[b.name] = lam

    def fit(self):
        n = self.obj.n
        if n < 1:
            raise UserError("the training archive is empty")
        log.info("%s: fitting on %d training images (%s Fisher), factors %s", self.name, n, self.fisher,
                 _format_gb(self.factor_bytes))
        self.fit_from(self.factor_sums, self.eigen_sums)

    def fit_from(self, factor_sums, eigen_sums):
        """Fit from summed statistics, however they were summed (one process, or Ray shards).

        ``factor_sums()`` -> pass 1's ``{key: float64 array}`` (as :meth:`factor_sums`); then the float64
        eigendecompositions, one block at a time; ``eigen_sums()`` -> pass 2's sums in this solver's
        eigenbasis (as :meth:`eigen_sums`; :meth:`eigenbasis` gives it to other processes), EK-FAC only.
        """
        self.set_factors(factor_sums())
        if self.corrected:
            self.set_lambda(eigen_sums())
        self._finish()

    def _finish(self):
        """The regulariser's diagonal ``ρ`` per Kronecker layer, and the range of ``Λ + ρ`` for the log.

        ``Λ + ρ + λ`` itself is formed once per damping by :meth:`_damped`, in the model's dtype.
        """
        self._rho = {}
        low, high = math.inf, -math.inf
        for b in self.plan:
            if isinstance(b, _Kron):
                rho = np.empty(b.k1)
                for (s, e), q in zip(b.a_bounds, self._eig[b.name]["QA"]):
                    rho[s:e] = (q * q).T @ b.reg_rows[s:e]
                self._rho[b.name] = rho
            if isinstance(b, _Kron) and self.corrected:
                # in row blocks: no (K1, C) float64 temporary (fc1 of VGG16: 0.77 GiB) just for the log
                lam, rho = self._lambda[b.name], self._rho[b.name]
                for s in range(0, b.k1, 1024):
                    part = lam[s:s + 1024] + rho[s:s + 1024, None]
                    low, high = min(low, float(part.min())), max(high, float(part.max()))
                    del part
                continue
            den = self._undamped(b)
            low, high = min(low, float(den.min())), max(high, float(den.max()))
            del den
        self.info.update(fisher_min=low if self.plan else 0.0, fisher_max=high if self.plan else 0.0)
        self._dens = None
        self._fits += 1
        self._fitted = True

    def _undamped(self, b):
        """``Λ + ρ`` of block ``b``, float64 (Kronecker: (K1, C); diagonal: (size,)); a new array."""
        if isinstance(b, _Diag):
            return self._diag[b.name] + b.reg
        if self.corrected:
            return self._lambda[b.name] + self._rho[b.name][:, None]
        eig = self._eig[b.name]
        lam = np.outer(np.clip(np.concatenate(eig["eA"]), 0, None), np.clip(np.concatenate(eig["eS"]), 0, None))
        lam += self._rho[b.name][:, None]
        return lam

    # --- memory ------------------------------------------------------------------------------------
    #: solve_stacked writes each solution into its slot of the stacked result: gradient + solution
    copies_per_vector = 2

    @property
    def resident_bytes(self):
        """Bytes held between test vectors after :meth:`compact`: eigenvectors and ``Λ + ρ + λ`` in
        the model's dtype."""
        item = np.dtype(self._compute_dtype.as_numpy_dtype).itemsize
        total = 0
        for b in self.plan:
            if isinstance(b, _Kron):
                total += item * (block_entries(b.a_bounds, b.s_bounds) + b.k1 * b.c_out)
            else:
                total += item * b.size
        return total

    @property
    def workspace_bytes(self):
        """Transient bytes of one :meth:`solve_stacked` vector: three (K1, C) matrices of the largest layer."""
        item = np.dtype(self._compute_dtype.as_numpy_dtype).itemsize
        return 3 * item * max([b.k1 * b.c_out for b in self.plan if isinstance(b, _Kron)] + [0])

    def compact(self):
        """Keep only what :meth:`solve` needs: the eigenvectors and ``Λ + ρ + λ`` in the model's dtype.

        Frees the float64 eigenvectors (VGG16 ``--params all``: 1.8 GB), ``Λ`` and the eigenvalues;
        call it once the state is cached. :meth:`state` is refused afterwards.
        """
        if not self._fitted or self._compacted:
            return
        # the eigenvectors first, one block at a time (float64 freed as its copy is made), then Λ + ρ + λ
        # from Λ and the eigenvalues, then those: the float64 eigenvectors and Λ are never held together
        # with the damped copy and its float64 temporary
        dtype = self._compute_dtype.as_numpy_dtype
        for b in self.plan:
            if isinstance(b, _Kron):
                eig = self._eig[b.name]
                for key in ("QA", "QS"):
                    qs = eig[key]
                    for i in range(len(qs)):
                        qs[i] = np.ascontiguousarray(qs[i], dtype)
        self._compacted = True          # state() is refused from here on, whatever happens below
        self._damped()
        for b in self.plan:
            if isinstance(b, _Kron):
                self._eig[b.name] = {"QA": self._eig[b.name]["QA"], "QS": self._eig[b.name]["QS"]}
        self._lambda, self._diag = {}, {}
        self._self_vars, self._self_key, self._self_fn = None, None, None
        self._compacted = True
        gc.collect()

    # --- cache -----------------------------------------------------------------------------------------
    def state(self):
        if not self._fitted:
            self.fit()
        if self._compacted:
            raise RuntimeError(f"{self.name}: state() after compact(); cache the state before compacting")
        out = {}
        for b in self.plan:
            if isinstance(b, _Kron):
                eig = self._eig[b.name]
                for key in ("QA", "eA", "QS", "eS"):
                    for i, arr in enumerate(eig[key]):
                        out[f"{b.name}.{key}.{i}"] = arr
                if self.corrected:
                    out[f"{b.name}.Lambda"] = self._lambda[b.name]
            else:
                out[f"{b.name}.diag"] = self._diag[b.name]
        return out

    def load_state(self, arrays):
        self._eig, self._diag, self._lambda = {}, {}, {}
        self._compacted = False

        def get(key, shape):
            if key not in arrays:
                raise ValueError(f"cached {self.name} state has no {key}")
            arr = np.asarray(arrays[key], dtype=np.float64)
            if arr.shape != shape:
                raise ValueError(f"cached {key} is {arr.shape}, expected {shape}")
            return arr

        for b in self.plan:
            if isinstance(b, _Kron):
                eig = {}
                for key, bounds in (("QA", b.a_bounds), ("QS", b.s_bounds)):
                    eig[key] = [get(f"{b.name}.{key}.{i}", (e - s, e - s)) for i, (s, e) in enumerate(bounds)]
                    ek = "e" + key[1]
                    eig[ek] = [get(f"{b.name}.{ek}.{i}", (e - s,)) for i, (s, e) in enumerate(bounds)]
                self._eig[b.name] = eig
                if self.corrected:
                    self._lambda[b.name] = get(f"{b.name}.Lambda", (b.k1, b.c_out))
            else:
                self._diag[b.name] = get(f"{b.name}.diag", (b.size,))
        self._finish()

    # --- per test vector ---------------------------------------------------------------------------------
    def kronecker_factors(self):
        """{layer name: (A (K1, K1), S (C, C))} dense float64, block-diagonal when split (after fit)."""
        out = {}
        for b in self.plan:
            if isinstance(b, _Kron):
                eig = self._eig[b.name]
                mats = []
                for qk, ek, size, bounds in (("QA", "eA", b.k1, b.a_bounds), ("QS", "eS", b.c_out, b.s_bounds)):
                    m = np.zeros((size, size))
                    for (s, e), q, w in zip(bounds, eig[qk], eig[ek]):
                        m[s:e, s:e] = (q * w) @ q.T
                    mats.append(m)
                out[b.name] = tuple(mats)
        return out

    def _damped(self):
        """{layer name: Λ + ρ + λ} in the model's dtype (Kronecker: (K1, C); diagonal: (size,)), formed
        once per damping; fits first if needed."""
        if not self._fitted:
            self.fit()
        key = str(self.damping_spec)
        if self._dens is not None and self._dens[0] == key:
            return self._dens[1]
        dtype = self._compute_dtype.as_numpy_dtype
        dens, lams = {}, {}
        for b in self.plan:
            den = self._undamped(b)
            lams[b.name] = lam = self._block_damping(den)
            den += lam
            if den.min() <= SINGULAR * max(float(den.max()), 1e-300):
                raise UserError(f"--solver {self.name}: F + λI is singular in layer {b.name} (a Fisher eigenvalue "
                                f"is {float(den.min()) - lam:.3g}); use a --damping > 0")
            dens[b.name] = den.astype(dtype, copy=False)
            del den
        if self.damping_spec.relative:
            self.info["damping_per_layer"] = {name: float(f"{lam:.6g}") for name, lam in lams.items()}
            log.info("%s: damping %s -> per layer %s", self.name, self.damping_spec,
                     ", ".join(f"{name} {lam:.3g}" for name, lam in lams.items()))
        self._dens = (key, dens)
        return dens

    def _block_damping(self, undamped):
        """λ of one block from its ``Λ + ρ`` (float64 array): ``--damping`` itself, or the factor times
        their mean (influence.curvature.damping)."""
        return self.damping_spec.for_block(float(np.mean(undamped)) if undamped.size else 0.0)

    def _inverse_into(self, v, parts):
        """``(F + R + λI)⁻¹ v`` for one Vec ``v``, written into ``parts`` (numpy arrays shaped like the
        variables, one per variable; the products run in the model's dtype)."""
        dens = self._damped()
        dtype = self._compute_dtype.as_numpy_dtype
        for b in self.plan:
            den = dens[b.name]
            if isinstance(b, _Diag):
                flat = vec_to_numpy([v[i] for i in b.positions]).astype(dtype, copy=False) / den
                at = 0
                for i, shape in zip(b.positions, b.shapes):
                    size = int(np.prod(shape))
                    parts[i][...] = flat[at:at + size].reshape(shape)
                    at += size
                continue
            eig = self._eig[b.name]
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

    def _inverse(self, vectors):
        """[(F + R + λI)⁻¹ v] for Vecs ``v`` -> list of Vecs (dtype of the model)."""
        out = []
        for v in vectors:
            parts = [np.empty(tuple(var.shape), self._compute_dtype.as_numpy_dtype) for var in self.variables]
            self._inverse_into(v, parts)
            out.append(tuple(tf.constant(p) for p in parts))
        return out

    def solve(self, vectors, ids=None):
        return self._inverse(list(vectors))

    def solve_stacked(self, vectors, ids=None):
        """The inverse-HVPs of ``vectors`` stacked (a Vec with a leading axis T), written in place: the
        only full-size arrays are the T results (no per-vector copies). ``vectors`` is emptied as each
        is solved, so the caller's test gradients are freed on the way."""
        if not isinstance(vectors, list):
            vectors = list(vectors)
        t = len(vectors)
        dtype = self._compute_dtype.as_numpy_dtype
        stacked = [np.empty((t,) + tuple(var.shape), dtype) for var in self.variables]
        for j in range(t):
            v = vectors[j]
            vectors[j] = None
            self._inverse_into(v, [s[j] for s in stacked])
            del v
        out = []
        while stacked:          # one part at a time into TensorFlow, so at most one part is held twice
            out.append(tf.constant(stacked.pop(0)))
        return tuple(out)

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
                if isinstance(b, _Kron):
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
            if isinstance(b, _Diag):
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

    def precondition(self, vec):
        """``(F + R + λI)⁻¹ vec`` for one Vec (the same as one :meth:`solve`)."""
        return self._inverse([vec])[0]


class EKFACSolver(KFACSolver):
    """EK-FAC: K-FAC's Kronecker eigenbasis with eigenvalues ``Λ_ij = E_n[(Q_Aᵀ G_n Q_S)_ij²]``."""

    name = "ekfac"
    summary = ("eigenvalue-corrected K-FAC Fisher (EK-FAC), fitted once (two passes); an approximation, "
               "no HVPs per test image")
    approximates = "ekfac"
    corrected = True
