"""The pure numbers of ``--calibrate``: the (solver, λ) grid, the LDS of each cell, the noise ceiling, the
choice and the verdict. Arrays in, arrays out; shapes in each docstring. The LDS itself is the panel's
(:mod:`influence.calibration.lds_metrics`: :func:`predicted_changes`, :func:`lds`, :func:`noise_ceiling`).
"""
import dataclasses

import numpy as np

from influence.calibration.lds_metrics import lds, nanmean, noise_ceiling, predicted_changes  # noqa: F401
from influence.settings import Damping, parse_damping

#: the default grid: the run's solver and EK-FAC (block-diagonal: the other family of curvature), each at
#: three dampings a decade apart around the mean eigenvalue (the issue-30 measurements put the best λ of
#: four models between 0.1x and 10x), plus the run's own (solver, damping)
DEFAULT_SOLVERS = ("ekfac",)
DEFAULT_DAMPINGS = ("0.1x", "1x", "10x")
#: with the run's damping ``optimizer`` (any factor; and no dampings given), its solver's rows also take these
#: factors of the training run's ``D``: the range ``damping auto``'s factor is read in
#: (:func:`influence.model.training_state.response_factor`) and the factor of the theory
OPTIMIZER_FACTORS = ("optimizer:0.1", "optimizer:1", "optimizer:3")
#: the run's own cell is replaced only by a cell whose LDS gain over it, paired over the test images, exceeds this
#: many standard errors (:func:`choose`). Measured on the four windows of 16 of the 64 subsets of 11 LDS panel
#: models, each with its default as the run's cell (README, "--calibrate"): 40 of 44 windows picked within 0.01 of
#: the 64-subset best (the largest mean alone: 33; z = 1: 36; z = 2: 38), mean shortfall 0.0026 (0.0076); with
#: ``damping auto``'s factor of D in the defaults, 42 of 44 (the largest mean: 34)
SWITCH_Z = 1.5


#: the variants a solver's cells come in, ``{solver: (setting, values)}``: the store's structures (the whole projected
#: matrix or each layer's block) share one fit and one store, so the grid measures both at every damping
VARIANTS = {"store": ("store_curvature", ("blocks", "dense"))}


@dataclasses.dataclass(frozen=True)
class Cell:
    """One (solver, damping) of the grid; ``run``: the run's own setting; ``options``: ``((setting, value), ...)``
    of a solver's variant (:data:`VARIANTS`: the store's ``store_curvature``), empty for the others."""

    solver: str
    damping: Damping
    run: bool = False
    options: tuple = ()

    @property
    def label(self):
        """The solver and its variant: ``store blocks``, ``ekfac``."""
        return " ".join([self.solver, *(str(v) for _, v in self.options)])

    @property
    def name(self):
        return f"{self.label} {self.damping}"


def variants(name, run_solver, run_options):
    """The ``options`` of ``name``'s cells: one empty tuple, or one per value of :data:`VARIANTS` (the run's own
    first when ``name`` is the run's solver)."""
    if name not in VARIANTS:
        return [()]
    setting, values = VARIANTS[name]
    own = dict(run_options).get(setting) if name == run_solver else None
    return [((setting, v),) for v in ([own] if own in values else []) + [v for v in values if v != own]]


def grid_cells(run_solver, run_damping, solvers=None, dampings=None, run_options=()):
    """The cells to score, the run's own first: ``[Cell]``.

    ``solvers``: names (default: the run's and :data:`DEFAULT_SOLVERS`); ``dampings``: values or text
    (``0.01``, ``1x``; default :data:`DEFAULT_DAMPINGS`); the run's damping joins the run's solver's rows (each of
    its variants'), with :data:`OPTIMIZER_FACTORS` when it is ``optimizer`` and ``dampings`` are the default.
    ``run_options``: the run's variant (``(("store_curvature", "blocks"),)``); a solver of
    :data:`VARIANTS` gets a row per variant. Duplicates are dropped (``auto`` and ``0.1x`` are one).
    """
    run_damping = parse_damping(run_damping)
    run_options = tuple(run_options)
    names = [run_solver] + [s for s in (solvers if solvers else DEFAULT_SOLVERS)]
    values = [parse_damping(d) for d in (dampings if dampings else DEFAULT_DAMPINGS)]
    own = [run_damping] + ([parse_damping(d) for d in OPTIMIZER_FACTORS] if run_damping.optimizer and not dampings
                           else [])
    cells = [Cell(run_solver, run_damping, run=True, options=run_options)]
    seen = {(run_solver, run_options, run_damping)}
    for name in dict.fromkeys(names):
        for options in variants(name, run_solver, run_options):
            for value in (own if name == run_solver else []) + values:
                if (name, options, value) not in seen:
                    seen.add((name, options, value))
                    cells.append(Cell(name, value, options=options))
    return cells


def actual_losses(losses):
    """The retrained models' test losses averaged over the seeds: ``(S, M, T)`` -> float64 ``(M, T)``."""
    a = np.asarray(losses, dtype=np.float64)
    if a.ndim != 3:
        raise ValueError(f"losses must be (seeds, subsets, tests), got {a.shape}")
    return a.mean(axis=0)


def ceiling(losses):
    """Seed-to-seed Spearman over the subsets, mean over the test images (float), or None with one seed.

    ``losses``: ``(S, M, T)``. Comparing one seed's losses with another's, it bounds how well any score
    can predict a single retraining (the LDS compares with the mean over the seeds, so a cell may pass it).
    """
    a = np.asarray(losses, dtype=np.float64)
    if a.shape[0] < 2:
        return None
    return nanmean(noise_ceiling(a))


def paired_gain(cell, own):
    """How much a cell's LDS beats the run's own, paired over the test images -> ``(mean, standard error)`` of
    ``cell − own`` (each ``(T,)``, per test image; pairs with a nan left out); the error is inf with fewer than two
    pairs."""
    diff = np.asarray(cell, np.float64) - np.asarray(own, np.float64)
    diff = diff[np.isfinite(diff)]
    if len(diff) < 2:
        return (float(diff.mean()) if len(diff) else float("nan")), float("inf")
    return float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff)))


def choose(means, allowed=None, per_test=None, own=None, z=SWITCH_Z):
    """Index of the cell to use: the largest finite mean LDS among ``allowed`` (bool per cell, default all); ties go
    to the earlier cell (the run's own comes first). None when no allowed cell has a finite LDS.

    ``means``: ``(C,)`` floats (nan for a cell that could not be scored). With ``per_test`` (``(C, T)``, each cell's
    LDS per test image) and ``own`` (the run's own cell's index), only cells whose gain over the run's own
    (:func:`paired_gain`) exceeds ``z`` standard errors compete with it: a gain within the noise keeps the run's own
    setting, which the defaults chose on the LDS panel.
    """
    means = np.asarray(means, dtype=np.float64)
    ok = np.isfinite(means) & (np.ones(len(means), bool) if allowed is None else np.asarray(allowed, bool))
    if not ok.any():
        return None
    if per_test is not None and own is not None and np.isfinite(means[own]):
        for c in range(len(means)):
            if ok[c] and c != own:
                gain, error = paired_gain(per_test[c], per_test[own])
                ok[c] = gain > z * error
        ok[own] = True
    best = np.where(ok, means, -np.inf)
    return int(np.flatnonzero(best == best.max())[0])


def verdict(best_name, best_lds, ceiling_value, run_name, run_lds):
    """The one line: ``scores on this model: LDS 0.41 (noise ceiling 0.55) with ekfac 1x; the run used krylov
    0.1x: LDS 0.33`` (or ``... with krylov 0.1x, the run's own setting``)."""
    ceil = "noise ceiling not measured: one seed" if ceiling_value is None else f"noise ceiling {ceiling_value:.2f}"
    line = f"scores on this model: LDS {best_lds:.2f} ({ceil}) with {best_name}"
    if run_name == best_name:
        return line + ", the run's own setting"
    return line + f"; the run used {run_name}: LDS {run_lds:.2f}"
