"""Self-influence: which training images look mislabelled? (``calculate.py --self-influence``)

Every training image scored against itself, with its own (possibly wrong) label::

    self(i) = ∇L(z_i)ᵀ (H + λI)⁻¹ ∇L(z_i)

(``H`` and ``λ`` as in every other score, docs/DESIGN.md; ``H`` is the solver's matrix: the dense
Hessian for ``exact``, the K-FAC / EK-FAC Fisher for ``kfac`` / ``ekfac``). It is ``n`` times the
first-order change of the image's own training loss when it is left out: an image the rest of the
training set argues against (a wrong label, an odd example) scores high. Koh & Liang 2017, §5.4.

Routes, by solver (a method offers a whole-set route by its ``self_influence_route`` and
``self_influence_batch``; :func:`fast_solvers` lists them):

* ``ekfac`` / ``kfac``: per-image gradients in the Kronecker eigenbasis, squared and divided by
  the damped eigenvalues (:meth:`influence.curvature.kfac.solver.KFACSolver.self_influence_batch`): one
  forward and backward pass per training batch, no inverse-HVP at all;
* ``exact``: per-image gradients ``G`` (one tape per image) against ``(H + λI)⁻¹`` (inverted once,
  :meth:`influence.curvature.exact.ExactSolver.self_influence_batch`): ``Σ_k (G M)_ik G_ik`` per batch;
* ``krylov`` / ``dpcg``: per-image gradients projected on the low-rank basis, with the floor for the rest
  (:meth:`influence.curvature.lowrank.krylov.KrylovSolver.self_influence_batch`; dpcg takes its preconditioner's
  basis, so its self-influence is krylov's low-rank number, not CG's exact one);
* anything else (``lissa``, ``cg``, ``pcg``): one inverse-HVP per image, allowed only for the
  ``limit`` highest-loss training images (``--self-influence-limit N``).

With ``limit`` every route scores only the ``limit`` training images of highest loss (ties: lower
archive index first). The numbers only; their files (``self_influence.csv``, every scored image
highest first, and the figure of the top ``k``) are written by :mod:`influence.outputs.self_influence`.
"""
import dataclasses
import logging

import numpy as np

from influence.errors import SettingError
from influence.progress import progress as progress_bar

log = logging.getLogger(__name__)

def fast_solvers():
    """The registered methods with a route that scores the whole training set without one
    inverse-HVP per image (their ``self_influence_route``)."""
    from influence.curvature import REGISTRY

    return [name for name, cls in REGISTRY.items() if cls.self_influence_route]


@dataclasses.dataclass
class SelfInfluence:
    """Self-influence of the scored training images, all arrays (M,) in the same order.

    ``indices``: archive positions (all N in archive order, or the ``limit`` highest-loss ones,
    highest loss first); ``values``: ∇L(z_i)ᵀ(H + λI)⁻¹∇L(z_i); ``losses``: the training loss with
    the true label; ``preds`` / ``confs``: the model's class and its softmax probability.
    """

    indices: np.ndarray
    values: np.ndarray
    losses: np.ndarray
    preds: np.ndarray
    confs: np.ndarray
    method: str = ""

    def ranking(self):
        """(M,) positions into these arrays, highest self-influence first (ties: lower index; NaN last)."""
        return rank_descending(self.values, self.indices)


def rank_descending(values, indices):
    """(M,) order of ``values`` (M,) descending, ties by ``indices`` (M,) ascending, NaN last."""
    v = np.asarray(values, np.float64)
    return np.lexsort((np.asarray(indices), np.where(np.isnan(v), np.inf, -v))).astype(np.int64)


# ----------------------------------------------------------------------------- checks

def check_solver(name, limit, n_train=None):
    """Raise a one-line :class:`SettingError` when solver ``name`` cannot score every training image.

    ``limit``: the ``self_influence_limit`` setting (None or 0: all images). Call it before any heavy work.
    """
    if limit is not None and int(limit) < 0:
        raise SettingError("self_influence_limit", f"must be >= 1 (0 = every training image), got {limit}")
    if name in fast_solvers() or limit:
        return
    many = f" ({n_train} here)" if n_train is not None else ""
    raise SettingError("self_influence", f"with solver {name} needs one inverse-HVP per training image{many}: "
                                          f"use solver ekfac (or exact for small models), or self_influence_limit N to "
                                          f"score only the N highest-loss training images")


def highest_loss(losses, limit):
    """(min(limit, N),) int64 indices of the largest ``losses`` (N,), largest first, ties by lower index."""
    losses = np.asarray(losses, np.float64)
    order = np.lexsort((np.arange(len(losses)), np.where(np.isnan(losses), np.inf, -losses)))
    return order[:int(limit)].astype(np.int64)


# ----------------------------------------------------------------------------- numbers

def _losses_and_predictions(derivs, train, batch, bar):
    """Over the whole archive: losses (N,) float64, predictions (N,) int64, confidences (N,) float64."""
    n = len(train)
    losses, preds, confs = np.empty(n), np.empty(n, np.int64), np.empty(n)
    for start in range(0, n, batch):
        idx = np.arange(start, min(start + batch, n))
        x, y = train.take(idx)
        y = np.asarray(y, np.int64)
        losses[idx] = derivs.losses(x, y).numpy()
        probs = derivs.predict(x).numpy()
        preds[idx] = probs.argmax(axis=1)
        confs[idx] = probs.max(axis=1)
        bar.update(len(idx))
    return losses, preds, confs


def self_influence(solver, derivs, train, *, batch, limit=None, vectors=None, progress=True):
    """Self-influence of every training image (or the ``limit`` highest-loss ones) -> :class:`SelfInfluence`.

    Args:
      solver: a fitted (or cache-loaded) solver of :mod:`influence.curvature` (fits on demand).
      derivs: the :class:`influence.model.derivatives.Derivatives` of the model.
      train: the training archive (``len`` and ``take(indices) -> (x, y)``), labels as trained.
      batch: training images per step.
      limit: None/0 for every image, else only the ``limit`` images of highest training loss.
      vectors: inverse-HVPs held at once on the one-per-image route (default ``batch``; the engine's
        ``MemoryPlan.vectors``).
      progress: show progress bars.

    Raises :class:`SettingError` (see :func:`check_solver`) for a solver without a fast route and no limit.
    """
    from influence.model.vectors import vec_dot

    name = getattr(solver, "name", type(solver).__name__)
    n = len(train)
    check_solver(name, limit, n)
    batch = max(1, int(batch))
    route = getattr(solver, "self_influence_route", None)
    fast = route is not None
    step_size = batch if fast or not vectors else max(1, min(batch, int(vectors)))
    with progress_bar(total=n, desc="self-influence: losses", unit="img", disable=not progress) as bar:
        losses, preds, confs = _losses_and_predictions(derivs, train, batch, bar)
    indices = highest_loss(losses, limit) if limit else np.arange(n, dtype=np.int64)
    values = np.empty(len(indices))
    if fast:
        method = f"{name} ({route})"

        def step(x, y, idx):
            return solver.self_influence_batch(x, y)
    else:
        method = f"{name} (one inverse-HVP per image, {len(indices)} highest-loss images)"

        def step(x, y, idx):
            y = np.asarray(y, np.int64)
            grads = [derivs.gradient(x[i:i + 1], y[i:i + 1]) for i in range(len(y))]
            sols = solver.solve(grads, ids=[("self-influence", int(j)) for j in idx])
            return np.array([vec_dot(g, s) for g, s in zip(grads, sols)])
    with progress_bar(total=len(indices), desc=f"self-influence ({name})", unit="img",
                      disable=not progress) as bar:
        for start in range(0, len(indices), step_size):
            current = indices[start:start + step_size]
            # read in archive order (memory-mapped batches), put back in the order of ``indices``
            order = np.argsort(current, kind="stable")
            x, y = train.take(current[order])
            vals = np.empty(len(current))
            vals[order] = step(x, y, current[order])
            values[start:start + len(current)] = vals
            bar.update(len(current))
    log.debug("self-influence: %d images by %s", len(indices), method)
    return SelfInfluence(indices=indices, values=values, losses=losses[indices], preds=preds[indices],
                         confs=confs[indices], method=method)
