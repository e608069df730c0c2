"""Scoring the (solver, λ) grid of ``--calibrate`` on the model's own training set.

Each solver is fitted ONCE (or loaded from the curvature cache, which the run then loads too); a damping
changes only the per-test formula of the fitted state (each method's
:meth:`~influence.curvature.base.InverseHVP.set_damping`): EK-FAC/K-FAC re-form ``Λ + ρ + λ``
(:func:`influence.curvature.kfac.solve.damped_eigenvalues`, per layer for a relative damping), krylov keeps
its basis and re-reads its rank for the new λ (``--rank auto``), exact keeps its dense matrix, cg/pcg/dpcg
keep their fit and solve again. LiSSA's fitted scale depends on λ, so it is fitted per damping. The
inverse-HVPs of all of a solver's dampings are scored together, in as few passes over the training set as
the memory plan allows (:meth:`influence.Influence.plan`). The gradient store scores from its own rows
(:meth:`~influence.store.solver.StoreSolver.store_scores`): no pass, and the numbers its run would give.
"""
import logging

import numpy as np

from influence.errors import UserError
from influence.calibration.lds_metrics import predicted_changes

log = logging.getLogger(__name__)

#: solvers whose fitted state depends on λ: one fit per damping
REFIT_PER_DAMPING = frozenset({"lissa"})


def _resolved(solver):
    """The λ in use: a float (one λ), or ``{layer: λ}`` for a per-layer method."""
    lam = solver.damping
    if lam is None:
        return dict(solver.info.get("damping_per_layer", {}))
    return float(lam)


def _concat(parts):
    """Stack Vecs with leading axes (tuples of tensors) along axis 0."""
    import tensorflow as tf

    return tuple(tf.concat([p[i] for p in parts], axis=0) for i in range(len(parts[0])))


def score_solver(sibling, cells, grads, masks, show=True):
    """Predicted test-loss changes of each of ``cells`` (all of one solver): ``{cell: float64 (M, T)}`` and
    ``{cell: λ resolved}``.

    ``sibling``: an :class:`influence.Influence` with that solver (fitted here, or loaded from its cache);
    ``grads``: the T test gradients (Vecs); ``masks`` bool ``(M, N)``. The (cell, test image) pairs are
    scored in chunks of the memory plan's group size: per chunk each cell's inverse-HVPs, then ONE pass over
    the training set for all of them.
    """
    sibling.fit()
    solver = sibling.solver
    if hasattr(solver, "store_scores"):
        return score_from_store(solver, cells, grads, masks)
    t_count = len(grads)
    pairs = [(c, t) for c in range(len(cells)) for t in range(t_count)]
    plan = sibling.plan(len(pairs), solver=solver)
    predicted = {cell: np.zeros((masks.shape[0], t_count)) for cell in cells}
    lams = {}
    for start in range(0, len(pairs), plan.vectors):
        chunk = pairs[start:start + plan.vectors]
        stacks, where = [], []
        for c in dict.fromkeys(c for c, _ in chunk):
            ts = [t for cc, t in chunk if cc == c]
            solver.set_damping(cells[c].damping)
            stacks.append(solver.solve_stacked([grads[t] for t in ts], ids=[("calibrate", t) for t in ts]))
            lams[cells[c]] = _resolved(solver)
            where.extend((c, t) for t in ts)
        stacked = stacks[0] if len(stacks) == 1 else _concat(stacks)
        del stacks
        shares = sibling.score_stacked(stacked, score_batch=plan.score_batch,
                                       desc=f"calibrate: scoring {len(where)} (λ, test image) pair(s) "
                                            f"with {sibling.solver_name}")
        scores = np.asarray(shares, np.float64).sum(axis=2)          # (pairs, N)
        del stacked, shares
        change = predicted_changes(scores, masks)                     # (M, pairs)
        for j, (c, t) in enumerate(where):
            predicted[cells[c]][:, t] = change[:, j]
    return predicted, lams


def score_from_store(solver, cells, grads, masks):
    """:func:`score_solver` for the gradient store: each cell's scores are products with the stored rows
    (``solver.store_scores``, float32 (T, N)), no pass over the training set -> the same two dicts."""
    predicted, lams = {}, {}
    for cell in cells:
        solver.set_damping(cell.damping)
        scores = np.asarray(solver.store_scores(grads), np.float64)              # (T, N)
        predicted[cell] = predicted_changes(scores, masks)                        # (M, T)
        lams[cell] = _resolved(solver)
    return predicted, lams


def score_cells(inf, cells, grads, masks, show=True):
    """Every cell of the grid -> ``({cell: (M, T)}, {cell: λ}, {cell: reason it was skipped})``.

    Cells are grouped by solver and variant, each fitted once (:func:`score_solver`; LiSSA once per damping; the
    store's two structures share one fit, ``with_solver(share=...)``, each inverting its own ``C``). A
    solver other than the run's that cannot run on this model (a setting it refuses: e.g. ekfac on a
    subclassed model) is skipped with its reason; the run's own solver's errors propagate.
    """
    predicted, lams, skipped = {}, {}, {}
    by_solver = {}
    for cell in cells:
        by_solver.setdefault((cell.solver, cell.options), []).append(cell)
    fitted = {}              # solver name -> its first fitted sibling, whose fit a variant may share
    for (name, options), group in by_solver.items():
        batches = [[c] for c in group] if name in REFIT_PER_DAMPING else [group]
        for batch in batches:
            try:
                sibling = inf.with_solver(name, damping=batch[0].damping, share=fitted.get(name), **dict(options))
                fitted.setdefault(name, sibling)
                got, lam = score_solver(sibling, batch, grads, masks, show)
            except UserError as exc:
                if any(c.run for c in batch):
                    raise
                log.warning("calibrate: %s skipped: %s", batch[0].label, exc)
                skipped.update({c: str(exc) for c in batch})
                continue
            predicted.update(got)
            lams.update(lam)
    return predicted, lams, skipped
