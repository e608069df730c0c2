"""``--solver kfac`` / ``--solver ekfac``: the block-diagonal Kronecker-factored Fisher, fitted once.

Solves ``(F + Ω'' + λI)⁻¹ v`` where ``F`` is the Fisher of the mean training loss
``(1/n) Σ_n E[∇L_n ∇L_nᵀ]`` approximated block-diagonally, one block per selected layer
(Martens & Grosse 2015; George et al. 2018; Grosse et al. 2023; docs/DESIGN.md, "Curvature that is
fitted once"), ``Ω''`` the exact Hessian of the Keras L2 weight regularisers and ``λ`` = ``--damping``.

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

where ``R_l`` is the layer's L2 regulariser Hessian and ``ρ`` its diagonal in the Kronecker eigenbasis.

The solver classes here compose one module per job:

* :mod:`influence.curvature.kfac_plan` -- which layers get a Kronecker or a diagonal block, splitting
  of large factors (``ekfac_max_block``), the regularisers, and the memory estimates refused above
  ``memory_budget``;
* :mod:`influence.curvature.kfac_signals` -- one chunk through the tapped model: each layer's inputs
  and backward signals, and the labels of the Fisher (``fisher``: sampled, true, empirical);
* :mod:`influence.curvature.kfac_passes` -- the two TensorFlow passes (factors; EK-FAC's eigenvalues)
  as float64 sums over any range of images (sharded by :mod:`influence.distributed`);
* :mod:`influence.curvature.kfac_state` -- eigendecompositions, ``Λ``, ``ρ``, the cached state and
  :meth:`compact`;
* :mod:`influence.curvature.kfac_solve` -- the numpy solve per test vector;
* :mod:`influence.curvature.kfac_self_influence` -- ``gᵢᵀ (F + R + λI)⁻¹ gᵢ`` in one graph per chunk.

The names those modules define that other code imports from here stay importable from here.
"""
import logging

import numpy as np

from influence.curvature.base import InverseHVP
from influence.curvature.kfac_passes import MICRO_BYTES, FittingPasses
from influence.curvature.kfac_plan import (MAX_BLOCK, block_entries, check_budget, describe_block, fit_bytes,
                                           format_gb, kron_factor_bytes, l2_hessian, make_plan, split_blocks)
from influence.curvature.kfac_self_influence import SelfInfluence
from influence.curvature.kfac_signals import (FISHER_KINDS, MAX_TRUE_CLASSES, LayerSignals, check_fisher,
                                              resolve_fisher, sample_labels)
from influence.curvature.kfac_solve import RANK_ONE_MIN, SINGULAR, KroneckerSolve, kron_rotate, rank_one
from influence.curvature.kfac_state import FittedState
from influence.errors import SettingError, UserError
from influence.model.taps import linear_kind

__all__ = ["KFACSolver", "EKFACSolver", "FISHER_KINDS", "MAX_TRUE_CLASSES", "MAX_BLOCK", "MICRO_BYTES", "SINGULAR",
           "RANK_ONE_MIN", "split_blocks", "sample_labels", "kron_rotate", "rank_one", "block_entries",
           "kron_factor_bytes", "l2_hessian"]

log = logging.getLogger(__name__)


class KFACSolver(LayerSignals, FittingPasses, FittedState, KroneckerSolve, SelfInfluence, InverseHVP):
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
    relative_damping = "blocks"  # λ per layer from its own eigenvalues (damping auto / 0.3x)
    self_influence_route = "Kronecker eigenbasis"     # self_influence_batch: no inverse-HVP per image
    corrected = False        # EK-FAC: eigenvalues corrected by a second pass
    strict_regularisers = True

    def __init__(self, objective, damping, fisher="auto", seed=0, ekfac_max_block=MAX_BLOCK,
                 memory_budget=2.0, progress=True):
        super().__init__(objective, damping, progress)
        check_fisher(fisher, objective.d.clf.num_classes)
        self.fisher = resolve_fisher(fisher, objective.d.clf.num_classes)
        self.seed = int(seed)
        self.max_block = int(ekfac_max_block)
        self.memory_budget = None if memory_budget is None else float(memory_budget)
        d = objective.d
        self.variables = list(d.variables)
        if not d.clf.supports_tap:
            raise SettingError("solver", f"{self.name} needs a functional or Sequential Keras model (its layers "
                                         "are tapped); use cg, lissa or exact for a subclassed model")
        self._kinds = {id(g.layer): linear_kind(g.layer) for g in d.clf.groups}
        self.plan = make_plan(d.clf.groups, self._kinds, self.max_block, self.strict_regularisers, self.name)
        self.factor_bytes = sum(b.bytes(self.corrected) for b in self.plan)
        self.fit_bytes = fit_bytes(self.plan, self._kinds, self.corrected,
                                   np.dtype(objective.d.dtype.as_numpy_dtype).itemsize)
        check_budget(self.plan, self.name, self.corrected, self.factor_bytes, self.fit_bytes, self.memory_budget,
                     self.max_block)
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
                         layers={b.name: describe_block(b) for b in self.plan})

    def cache_key(self):
        key = {"fisher": self.fisher, "ekfac_max_block": self.max_block}
        if self.fisher == "sampled":
            key["seed"] = self.seed
        return key

    def fit(self):
        """Pass 1, the eigendecompositions and (EK-FAC) pass 2 in this process (:meth:`fit_from`)."""
        n = self.obj.n
        if n < 1:
            raise UserError("the training archive is empty")
        log.info("%s: fitting on %d training images (%s Fisher), factors %s", self.name, n, self.fisher,
                 format_gb(self.factor_bytes))
        self.fit_from(self.factor_sums, self.eigen_sums)


class EKFACSolver(KFACSolver):
    """EK-FAC: K-FAC's Kronecker eigenbasis with eigenvalues ``Λ_ij = E_n[(Q_Aᵀ G_n Q_S)_ij²]``."""

    name = "ekfac"
    summary = ("eigenvalue-corrected K-FAC Fisher (EK-FAC), fitted once (two passes); an approximation, "
               "no HVPs per test image")
    approximates = "ekfac"
    corrected = True
