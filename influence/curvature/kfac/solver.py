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

The solver classes here compose parts with explicit inputs and outputs, one module per job::

    plan ──> passes (float64 sums) ──> KroneckerFit ──> solve / self-influence (+ damping)
                                            └──> to_arrays() / from_arrays(): the curvature cache

* :mod:`influence.curvature.kfac.plan` -- the plan, a value (:func:`make_plan`): which layers get a
  Kronecker or a diagonal block, splitting of large factors (``ekfac_max_block``), the regularisers,
  and the memory estimates refused above ``memory_budget``;
* :mod:`influence.curvature.kfac.signals` -- :class:`LayerSignals`: one chunk through the tapped model,
  each layer's inputs and backward signals, and the labels of the Fisher (``fisher``: sampled, true,
  empirical, top:K);
* :mod:`influence.curvature.kfac.passes` -- :class:`FittingPasses`: the two TensorFlow passes (factors;
  EK-FAC's eigenvalues in a given eigenbasis) as float64 sums over any range of images (sharded by
  :mod:`influence.backends.ray_driver`);
* :mod:`influence.curvature.kfac.state` -- :class:`KroneckerFit`, the fitted state as one value: the
  eigendecompositions of the summed factors (:func:`fit_factors`), ``Λ``, ``ρ``, the diagonal blocks,
  its array form for the cache and its compaction;
* :mod:`influence.curvature.kfac.solve` -- :func:`damped_eigenvalues` (``Λ + ρ + λ`` of a fit for a
  damping) and :class:`KroneckerSolve`, the numpy solve per test vector given the eigenvectors and those;
* :mod:`influence.curvature.kfac.self_influence` -- :class:`SelfInfluenceGraph`: ``gᵢᵀ (F + R + λI)⁻¹ gᵢ``
  for a fit and a damping, in one graph per chunk.

:class:`KFACSolver` holds the parts and the current :class:`KroneckerFit` (``fitted``), and implements
the :class:`~influence.curvature.base.InverseHVP` interface by calling them.
"""
import gc
import logging

import numpy as np

from influence.curvature.base import InverseHVP, TrainingSums
from influence.curvature.kfac.passes import FittingPasses
from influence.curvature.kfac.plan import MAX_BLOCK, check_budget, describe_block, fit_bytes, format_gb, make_plan
from influence.curvature.kfac.self_influence import SelfInfluenceGraph
from influence.curvature.kfac.signals import LayerSignals, check_fisher, resolve_fisher, signal_rows
from influence.curvature.kfac.solve import KroneckerSolve, damped_eigenvalues, split_like
from influence.curvature.kfac.state import KroneckerFit, fit_factors, resident_bytes
from influence.errors import SettingError, UserError
from influence.model.taps import linear_kind
from influence.settings import MEMORY_BUDGET_GB

log = logging.getLogger(__name__)


class KFACSolver(InverseHVP):
    """K-FAC: ``(A ⊗ S + R + λI)⁻¹`` per layer with ``Λ = e_A e_Sᵀ`` (see the module docstring).

    Args (beyond objective, damping, progress):
      fisher: "sampled" (a label drawn from the model's softmax), "true" (the expectation over all
        classes), "empirical" (the true labels), "top:K" or "auto".
      seed: seed of the sampled labels.
      ekfac_max_block: largest factor block; larger factors are split block-diagonally.
      memory_budget: GB allowed for the factors (float64 while fitting); None: no limit.

    Parts: ``plan`` (the blocks), ``signals`` (:class:`LayerSignals`), ``passes``
    (:class:`FittingPasses`), ``kron_solve`` (:class:`KroneckerSolve`); ``fitted``: the current
    :class:`KroneckerFit` (None before :meth:`fit` / :meth:`load_state`).
    """

    name = "kfac"
    summary = "Kronecker-factored Fisher (K-FAC), fitted once; an approximation, no HVPs per test image"
    approximates = "kfac"
    relative_damping = "blocks"  # λ per layer from its own eigenvalues (damping auto / 0.3x)
    self_influence_route = "Kronecker eigenbasis"     # self_influence_batch: no inverse-HVP per image
    corrected = False        # EK-FAC: eigenvalues corrected by a second pass
    #: damping optimizer: ``D`` per eigen-direction of each layer (kfac.solve.projected_diagonal)
    takes_diagonal = True
    kronecker = True
    strict_regularisers = True
    #: solve_stacked writes each solution into its slot of the stacked result: gradient + solution
    copies_per_vector = 2

    def __init__(self, objective, damping, fisher="auto", seed=0, ekfac_max_block=MAX_BLOCK,
                 memory_budget=MEMORY_BUDGET_GB, progress=True):
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
        kinds = {id(g.layer): linear_kind(g.layer) for g in d.clf.groups}
        self.plan = make_plan(d.clf.groups, kinds, self.max_block, self.strict_regularisers, self.name)
        self.factor_bytes = sum(b.bytes(self.corrected) for b in self.plan)
        self.fit_bytes = fit_bytes(self.plan, kinds, self.corrected, np.dtype(d.dtype.as_numpy_dtype).itemsize)
        check_budget(self.plan, self.name, self.corrected, self.factor_bytes, self.fit_bytes, self.memory_budget,
                     self.max_block)
        #: numpy dtype of the solve and of the compacted state: the model's
        self.dtype = np.dtype(d.dtype.as_numpy_dtype)
        self.signals = LayerSignals(d, kinds, self.variables, self.fisher)
        self.passes = FittingPasses(self.signals, self.plan, objective, self.seed, self.name, progress)
        self.kron_solve = KroneckerSolve(self.plan, self.variables, self.dtype)
        self.fitted = None        # the KroneckerFit solved with
        self._pass1 = None        # the K-FAC fit of pass 1 while an EK-FAC fit waits for pass 2
        self._dens = None         # (damping, {layer: Λ + ρ + λ}) of `fitted` once formed
        self._self = None         # (damping, SelfInfluenceGraph) of `fitted` once built
        self.info.update(fisher=self.fisher, ekfac_max_block=self.max_block,
                         factor_bytes=int(self.factor_bytes), fit_bytes=int(self.fit_bytes),
                         layers={b.name: describe_block(b) for b in self.plan})

    @property
    def signal_rows(self):
        """Backward signals per training image the fit holds (:func:`signal_rows`: 10 for ``top:10``);
        :func:`influence.memory.plan_memory` sizes the fit's chunk by them."""
        return signal_rows(self.fisher, self.obj.d.clf.num_classes)

    def cache_key(self):
        key = {"fisher": self.fisher, "ekfac_max_block": self.max_block}
        if self.fisher == "sampled":
            key["seed"] = self.seed
        return key

    # --- fitting -----------------------------------------------------------------------------------------
    def fit(self, sums=None):
        """Pass 1, the eigendecompositions and (EK-FAC) pass 2 (:meth:`fit_from`), the passes' sums from
        ``sums`` (:class:`influence.curvature.base.TrainingSums`; default: this process)."""
        n = self.obj.n
        if n < 1:
            raise UserError("the training archive is empty")
        log.info("%s: fitting on %d training images (%s Fisher), factors %s", self.name, n, self.fisher,
                 format_gb(self.factor_bytes))
        sums = TrainingSums() if sums is None else sums
        self.fit_from(lambda: sums.factor_sums(self), lambda: sums.eigen_sums(self))

    def factor_sums(self, start=0, stop=None, keep=False):
        """Pass 1's float64 sums over images ``[start, stop)`` (:meth:`FittingPasses.factor_sums`)."""
        return self.passes.factor_sums(start, stop, keep)

    def eigen_sums(self, start=0, stop=None, basis=None, keep=False):
        """Pass 2's float64 sums over images ``[start, stop)`` in ``basis`` (default: this solver's
        :meth:`eigenbasis`; :meth:`FittingPasses.eigen_sums`)."""
        return self.passes.eigen_sums(start, stop, self.eigenbasis() if basis is None else basis, keep)

    def set_factors(self, sums, n=None):
        """Eigendecompose pass 1's ``sums`` over ``n`` images (default: the archive's; consumed): K-FAC's
        fit, adopted at once; EK-FAC waits for :meth:`set_lambda`."""
        fit = fit_factors(self.plan, sums, self.obj.n if n is None else n)
        if self.corrected:
            self._pass1 = fit
        else:
            self._adopt(fit)

    def set_lambda(self, sums, n=None):
        """EK-FAC: the corrected eigenvalues from pass 2's ``sums`` over ``n`` images (default: all;
        consumed) on the fit of :meth:`set_factors`, adopted."""
        fit, self._pass1 = self._pass1, None
        self._adopt(fit.with_lambda(sums, self.obj.n if n is None else n))

    def eigenbasis(self):
        """``{layer: {"QA": [...], "QS": [...]}}`` of pass 1 (after :meth:`set_factors`): what pass 2 needs."""
        fit = self._pass1 or self.fitted
        if fit is None:
            raise RuntimeError(f"{self.name}: eigenbasis() before set_factors()")
        return fit.eigenbasis()

    def fit_from(self, factor_sums, eigen_sums):
        """Fit from summed statistics, however they were summed (one process, or Ray shards).

        ``factor_sums()`` -> pass 1's ``{key: float64 array}`` (as :meth:`factor_sums`); then the float64
        eigendecompositions, one block at a time; ``eigen_sums()`` -> pass 2's sums in this solver's
        eigenbasis (as :meth:`eigen_sums`; :meth:`eigenbasis` gives it to other processes), EK-FAC only.
        """
        self.set_factors(factor_sums())
        if self.corrected:
            self.set_lambda(eigen_sums())

    def _adopt(self, fit):
        """Make ``fit`` the solver's state: the damped eigenvalues and the self-influence graph of the
        previous one are dropped; ``info`` gets the range of ``Λ + ρ``."""
        self.fitted = fit
        self._dens = None
        self._self = None
        low, high = fit.undamped_range()
        self.info.update(fisher_min=low, fisher_max=high)

    def _fit(self):
        """The fitted state, fitting first if there is none."""
        if self.fitted is None:
            self.fit()
        return self.fitted

    # --- cache -------------------------------------------------------------------------------------------
    def state(self):
        fit = self._fit()
        if fit.compacted:
            raise RuntimeError(f"{self.name}: state() after compact(); cache the state before compacting")
        return fit.to_arrays()

    def load_state(self, arrays):
        self._adopt(KroneckerFit.from_arrays(self.plan, arrays, self.corrected, self.name))

    def kronecker_factors(self):
        """{layer name: (A (K1, K1), S (C, C))} dense float64, block-diagonal when split (after fit)."""
        return self.fitted.kronecker_factors()

    @property
    def resident_bytes(self):
        """Bytes held between test vectors after :meth:`compact`: eigenvectors and ``Λ + ρ + λ`` in
        the model's dtype."""
        return resident_bytes(self.plan, self.dtype.itemsize)

    def compact(self):
        """Keep only what :meth:`solve` needs: the eigenvectors and ``Λ + ρ + λ`` in the model's dtype.

        Frees the float64 eigenvectors (VGG16 ``--params all``: 1.8 GB), ``Λ`` and the eigenvalues;
        call it once the state is cached. :meth:`state` and self-influence are refused afterwards.
        """
        if self.fitted is None or self.fitted.compacted:
            return
        self._self = None
        # the eigenvectors first, one block at a time (float64 freed as its copy is made), then Λ + ρ + λ
        # from Λ and the eigenvalues, then those: the float64 eigenvectors and Λ are never held together
        # with the damped copy and its float64 temporary
        self.fitted.compact(self.dtype, self.damped)
        gc.collect()

    def self_influence_ready(self):
        """False once compacted: :meth:`self_influence_batch` needs the float64 eigenvalues."""
        return self.fitted is None or not self.fitted.compacted

    # --- solving -----------------------------------------------------------------------------------------
    def undamped(self, b):
        """``Λ + ρ`` of block ``b`` of the fitted state, float64 (fits first if needed)."""
        return self._fit().undamped(b)


    def damped(self):
        """{layer name: Λ + ρ + λ} in the model's dtype (Kronecker: (K1, C); diagonal: (size,)), formed
        once per damping; fits first if needed."""
        fit = self._fit()
        key = str(self.damping_spec)
        if self._dens is not None and self._dens[0] == key:
            return self._dens[1]
        diagonal = split_like(self.response_diagonal(), self.variables)        # damping optimizer's D, or None
        dens, lams = damped_eigenvalues(fit, self.damping_spec, self.dtype, self.name, diagonal)
        if self.damping_spec.relative or self.damping_spec.optimizer:
            self.info["damping_per_layer"] = {name: float(f"{lam:.6g}") for name, lam in lams.items()}
            log.info("%s: damping %s -> per layer %s%s", self.name, self.damping_spec,
                     ", ".join(f"{name} {lam:.3g}" for name, lam in lams.items()),
                     " (the mean over each layer's eigen-directions)" if self.damping_spec.optimizer else "")
        self._dens = (key, dens)
        return dens

    @property
    def workspace_bytes(self):
        """Transient bytes of one :meth:`solve_stacked` vector: three (K1, C) matrices of the largest layer."""
        return self.kron_solve.workspace_bytes

    def solve(self, vectors, ids=None):
        vectors = list(vectors)
        if not vectors:
            return []
        dens = self.damped()
        return self.kron_solve.inverse(self.fitted.eig, dens, vectors)

    def solve_stacked(self, vectors, ids=None):
        """The inverse-HVPs of ``vectors`` stacked (a Vec with a leading axis T), written in place: the
        only full-size arrays are the T results (no per-vector copies). ``vectors`` is emptied as each
        is solved, so the caller's test gradients are freed on the way."""
        if not isinstance(vectors, list):
            vectors = list(vectors)
        if not vectors:
            return self.kron_solve.stacked(None, None, vectors)
        dens = self.damped()
        return self.kron_solve.stacked(self.fitted.eig, dens, vectors)

    def precondition(self, vec):
        """``(F + R + λI)⁻¹ vec`` for one Vec (the same as one :meth:`solve`)."""
        return self.solve([vec])[0]

    # --- self-influence ----------------------------------------------------------------------------------
    def self_influence_batch(self, x, y):
        """``gᵢᵀ (F + R + λI)⁻¹ gᵢ`` of each image with its TRUE label, without forming the inverse-HVP
        (:class:`SelfInfluenceGraph`, rebuilt when the fit or the damping changes).

        Args:
          x: (N, H, W, C) images (``x_spec``); y: int64 (N,) their labels.

        Returns:
          float64 (N,).
        """
        self.damped()      # fits first if needed; refuses a singular F + λI
        key = str(self.damping_spec)
        if self._self is None or self._self[0] != key:
            d = self.obj.d
            diagonal = split_like(self.response_diagonal(), self.variables)
            self._self = (key, SelfInfluenceGraph(self.signals, self.fitted, self.damping_spec, d.x_spec,
                                                  d.y_spec, self.name, diagonal))
        return self._self[1](x, y)


class EKFACSolver(KFACSolver):
    """EK-FAC: K-FAC's Kronecker eigenbasis with eigenvalues ``Λ_ij = E_n[(Q_Aᵀ G_n Q_S)_ij²]``."""

    name = "ekfac"
    summary = ("eigenvalue-corrected K-FAC Fisher (EK-FAC), fitted once (two passes); an approximation, "
               "no HVPs per test image")
    approximates = "ekfac"
    corrected = True
