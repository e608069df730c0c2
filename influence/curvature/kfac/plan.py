"""The plan of a K-FAC / EK-FAC fit: which layers get a Kronecker block and which a diagonal one, how
large factors are split, and the memory the fit will need (refused before any work when too much).

Kronecker blocks. Every Dense/Conv layer whose input patches can be unfolded
(:func:`influence.model.taps.patch_support`) gets a block ``A ⊗ S`` in the ``(K1, C_out)`` orientation
of its kernel ``kernel.reshape(K, C_out)``, the bias as one more row (``K1 = K + 1``; ``K1 = K`` without
a bias): :class:`KronBlock` (conventions in :mod:`influence.curvature.kfac.solver`).

Large factors: a factor larger than ``ekfac_max_block`` is split into near-equal diagonal blocks
of at most that size (``A`` becomes block-diagonal, i.e. the correlation between input features of
different blocks is dropped; each block is eigendecomposed on its own, so ``Q_A`` is block-diagonal).
The same rule applies to ``S`` (:func:`split_blocks`).

Regularisers. A Keras ``L2(c)`` on a weight adds ``2c`` to the Hessian on that weight (exact,
:func:`l2_hessian`). On a Kronecker layer this is ``R_l = diag(r) ⊗ I`` with ``r_k`` = 2c of the
kernel on the kernel rows and 2c of the bias on the bias row (``KronBlock.reg_rows``). Its diagonal in
the Kronecker eigenbasis, ``ρ_i = Σ_k Q_A[k,i]² r_k``, is added to every ``Λ_ij`` -- the diagonal of
``F + R`` in that basis, as EK-FAC does for ``F`` (formed once fitted, :mod:`influence.curvature.kfac.state`).
It is exact (``R_l = 2c·I``) when kernel and bias carry the same L2 strength or the layer has no bias;
with the kernel regularised and the bias not (the Keras default), it spreads the kernel's ``2c`` over
the bias row's share of each eigenvector. Any other regulariser (L1, custom) is a :class:`UserError`
naming the layer.

Other layers with weights (BatchNorm, LayerNorm, Embedding, convs whose patches cannot be
unfolded, ...) get a diagonal block: ``E_n[g_n²]`` per parameter from per-image gradients, plus
``2c`` of their L2 regulariser (:class:`DiagBlock`). Which layers got one is logged.

Memory. The factor memory (factors + eigenbases + ``Λ``, float64, :func:`kron_factor_bytes` summed:
``factor_bytes``) and the fit's peak with its copies and workspaces (:func:`fit_bytes`) are estimated
first and refused with a :class:`UserError` when they exceed ``memory_budget`` (:func:`check_budget`);
:func:`influence.memory.plan_memory` gives the fit's chunk what is left (TensorFlow's CPU allocator keeps freed
memory, so nothing large is summed inside TensorFlow).
"""
import logging
import math
from dataclasses import dataclass

import numpy as np

from influence.errors import SettingError, UserError
from influence.model.taps import patch_support
from influence.settings import bytes_to_gb, gb_to_bytes

log = logging.getLogger(__name__)

#: default largest factor block (--ekfac-max-block)
MAX_BLOCK = 4096


# ----------------------------------------------------------------------------- pure helpers

def split_blocks(size, max_block):
    """Near-equal contiguous blocks of at most ``max_block`` covering ``range(size)``.

    Returns a list of ``(start, stop)``; one block when ``size <= max_block``.
    """
    if max_block < 1:
        raise SettingError("ekfac_max_block", f"must be >= 1, got {max_block}")
    count = max(1, math.ceil(size / max_block))
    edges = [round(i * size / count) for i in range(count + 1)]
    return [(edges[i], edges[i + 1]) for i in range(count)]


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
                        "remove it, or use solver exact, cg or lissa")
    log.warning("%s: its Hessian is left out of the EK-FAC preconditioner", what)
    return 0.0


def format_gb(nbytes):
    return f"{bytes_to_gb(nbytes):.3g} GB"


# ----------------------------------------------------------------------------- the blocks

@dataclass
class KronBlock:
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

    @property
    def k1(self):
        return self.k_in + (self.bias_pos is not None)

    def bytes(self, corrected):
        return kron_factor_bytes(self.k1, self.c_out, self.a_bounds, self.s_bounds, corrected)


@dataclass
class DiagBlock:
    """A layer with a diagonal block ``E[g²]`` over its variables."""

    name: str
    layer: object
    positions: list           # indices in the flat variable list
    shapes: list
    reg: np.ndarray           # (size,) regulariser Hessian per parameter
    why: str = ""

    @property
    def size(self):
        return int(sum(int(np.prod(s)) for s in self.shapes))

    def bytes(self, corrected):
        return 8 * self.size


# ----------------------------------------------------------------------------- the plan

def make_plan(groups, kinds, max_block, strict_regularisers, solver_name):
    """The blocks of a fit, one per layer of ``groups`` (the classifier's ParamGroups, in the order of
    the flat variable list): a :class:`KronBlock` per Dense/Conv layer whose patches unfold, a
    :class:`DiagBlock` per other layer. ``kinds``: ``{id(layer): linear_kind(layer)}``; ``solver_name``
    prefixes the log lines."""
    plan, at = [], 0
    diag_names = []
    for g in groups:
        positions = list(range(at, at + len(g.variables)))
        at += len(g.variables)
        kind = kinds[id(g.layer)]
        layer = g.layer
        if kind is not None and patch_support(layer, kind):
            ids = [id(v) for v in g.variables]
            kpos = positions[ids.index(id(layer.kernel))]
            bpos = positions[ids.index(id(layer.bias))] if layer.bias is not None else None
            shape = tuple(int(s) for s in layer.kernel.shape)
            k_in, c_out = int(np.prod(shape[:-1])), shape[-1]
            k1 = k_in + (bpos is not None)
            rows = np.full(k1, l2_hessian(layer.kernel, g.name, strict_regularisers))
            if bpos is not None:
                rows[-1] = l2_hessian(layer.bias, g.name, strict_regularisers)
            plan.append(KronBlock(g.name, layer, kpos, bpos, k_in, c_out, shape,
                                  split_blocks(k1, max_block), split_blocks(c_out, max_block), rows))
        else:
            reg = np.concatenate([np.full(int(np.prod(v.shape)), l2_hessian(v, g.name, strict_regularisers))
                                  for v in g.variables])
            why = "not a Dense/Conv layer" if kind is None else "its conv patches cannot be unfolded"
            plan.append(DiagBlock(g.name, layer, positions, [tuple(int(s) for s in v.shape) for v in g.variables],
                                  reg, why))
            diag_names.append(f"{g.name} ({why})")
    if diag_names:
        log.info("%s: diagonal Fisher blocks for %s", solver_name, ", ".join(diag_names))
    for b in plan:
        if isinstance(b, KronBlock) and (len(b.a_bounds) > 1 or len(b.s_bounds) > 1):
            log.info("%s: layer %s: A (%d) split into %d blocks, S (%d) into %d (ekfac_max_block %d)",
                     solver_name, b.name, b.k1, len(b.a_bounds), b.c_out, len(b.s_bounds), max_block)
    return plan


def describe_block(b):
    """One line for the run's info: ``kron A 28 (1 blocks) x S 4 (1 blocks)`` or ``diag 12``."""
    if isinstance(b, KronBlock):
        return (f"kron A {b.k1} ({len(b.a_bounds)} blocks) x S {b.c_out} ({len(b.s_bounds)} blocks)")
    return f"diag {b.size}"


def fit_bytes(plan, kinds, corrected, item):
    """The most bytes the fit holds at once besides one chunk's activations (``objective.chunk``,
    planned by :func:`influence.memory.plan_memory` from what is left of the budget), by step; ``item``: bytes of
    one number in the model's dtype, ``corrected``: EK-FAC (a pass 2 and ``Λ``):

    * pass 1: the float64 factor sums and one chunk's products (model dtype);
    * eigendecompositions: the sums or their eigenvectors (float64) and one block's transients
      (symmetrised copy, numpy's ``eigh`` copy, ``syevd``'s ``2 b²`` workspace, eigenvectors);
    * pass 2 (EK-FAC): the float64 eigenvectors and ``Λ`` sums, the eigenvectors in the model's dtype
      (TensorFlow variables) and one chunk's ``Λ`` products (model dtype for a flat Dense layer,
      float64 micro-batch sums otherwise: counted twice);
    * ``compact()``: the eigenvectors in the model's dtype next to the float64 ones, then (those
      freed) the damped ``Λ`` in the model's dtype and one float64 ``(K1, C)`` temporary.

    TensorFlow's CPU allocator keeps the memory of freed tensors for later ones, so the products
    of the passes stay resident but are reused, not added up.
    """
    kron = [b for b in plan if isinstance(b, KronBlock)]
    entries = sum(block_entries(b.a_bounds, b.s_bounds) for b in kron)
    eig = sum(b.k1 + b.c_out for b in kron)
    diag = sum(b.size for b in plan if isinstance(b, DiagBlock))
    lam_all = sum(b.k1 * b.c_out for b in kron) + diag
    lam = lam_all - diag if corrected else 0
    big = max([b.k1 * b.c_out for b in kron] + [0])
    block = max([(e - s) ** 2 for b in kron for s, e in b.a_bounds + b.s_bounds] + [0])

    def flat(b):
        try:
            return kinds.get(id(b.layer)) == "dense" and len(b.layer.input.shape) == 2
        except (AttributeError, ValueError, TypeError):
            return False

    lam_out = sum((item if flat(b) else 16) * b.k1 * b.c_out for b in kron) if corrected else 0
    held = 8 * (entries + eig + diag)
    steps = [8 * entries + item * entries + 16 * diag,                       # pass 1
             held + 8 * 5 * block,                                           # eigh, one block
             held + 8 * lam + item * entries + lam_out,                      # pass 2
             held + 8 * lam + 8 * big,                                       # damped without compact
             held + 8 * lam + item * entries,                                # compact: the eigenvectors
             8 * (eig + diag + lam + big) + item * (entries + lam_all)]      # compact: the damped Λ
    return int(max(steps))


def check_budget(plan, solver_name, corrected, factor_bytes, fit_bytes, memory_budget, max_block):
    """UserError naming the largest layers and the ways out when ``factor_bytes`` or ``fit_bytes``
    exceed ``memory_budget`` GB (None: no limit)."""
    if memory_budget is None:
        return
    budget = gb_to_bytes(memory_budget)
    if max(factor_bytes, fit_bytes) <= budget:
        return
    worst = sorted(plan, key=lambda b: -b.bytes(corrected))[:3]
    largest = ", ".join(f"{b.name} {format_gb(b.bytes(corrected))}" for b in worst)
    raise UserError(
        f"solver {solver_name}: the Kronecker factors need {format_gb(factor_bytes)} (float64"
        + (f"; {format_gb(fit_bytes)} at the fit's peak" if fit_bytes > factor_bytes else "")
        + f"), over "
        f"memory_budget {memory_budget:g} GB; largest layers: {largest}; choose fewer layers with "
        f"params, a smaller ekfac_max_block (now {max_block}) or a larger memory_budget")
