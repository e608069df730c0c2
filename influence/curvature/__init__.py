"""Inverse-Hessian-vector products behind one interface: ``solve(V) -> [(H + λI)⁻¹ v for v in V]``.

Every method is one module, in a sub-package by family (``kfac/``, ``lowrank/``, ``iterative/``; ``exact``
and what all share at the top); defining its class registers it (:mod:`influence.curvature.base`).
``--solver``'s choices and help come from :data:`REGISTRY`:

* ``exact``  -- dense ``H``, float64 (small models; the reference);
* ``cg``     -- conjugate gradient on whole-training-set HVPs;
* ``lissa``  -- the stochastic recursion of Koh & Liang;
* ``kfac`` / ``ekfac`` -- Kronecker-factored (eigenvalue-corrected) Fisher, fitted once;
* ``pcg``    -- conjugate gradient preconditioned by EK-FAC (exact answer, few HVPs);
* ``krylov`` -- the top eigenpairs of the matrix (Lanczos, fitted once) with a floor for the rest;
* ``dpcg``   -- conjugate gradient preconditioned (deflated) by the krylov basis (exact answer);
* ``store``  -- projected training gradients stored once on disk, a dense projected Gauss–Newton matrix
  (:mod:`influence.store`).

Training-set work (a fitted state) is cached by :mod:`influence.curvature.cache`.
"""
import inspect

# the methods register themselves on import, in this order: the registry's, and --solver's choices and help
from influence.curvature.iterative import cg  # noqa: F401,I001
from influence.curvature.lowrank import krylov  # noqa: F401
from influence.curvature.kfac import solver  # noqa: F401  (kfac, ekfac)
from influence.curvature.iterative import pcg  # noqa: F401
from influence.curvature.lowrank import dpcg  # noqa: F401
from influence.curvature import exact  # noqa: F401
from influence.curvature.iterative import lissa  # noqa: F401
from influence.curvature.base import REGISTRY, InverseHVP, stable_seed  # noqa: F401
from influence.errors import SettingError, UserError
from influence.store import solver as _store  # noqa: F401,E402  (registers store; it builds on base and the K-FAC taps)


def method_help():
    """``name: summary`` for every method, for ``--solver``'s help."""
    return "; ".join(f"{name} = {cls.summary}" for name, cls in REGISTRY.items())


def solver_options(cls):
    """The option names a method class takes (its ``__init__`` parameters beyond objective and damping)."""
    return set(inspect.signature(cls.__init__).parameters) - {"self", "objective", "damping", "progress"}


def make_solver(name, objective, damping, progress=True, **options):
    """Build the ``--solver`` method ``name`` with the ``options`` it takes.

    ``options`` use calculate.py's setting names (``iter``, ``bsize``, ``repeats``, ``scale``, ``seed``,
    ``cg_tol``, ``cg_maxiter``, ``max_exact_params``, ``fisher``, ...). The job passes every method's
    settings to whichever method runs, so an option another registered method takes is left out; one
    that no method takes is a mistake (a typo) and raises UserError naming it.
    """
    cls = REGISTRY.get(name)
    if cls is None:
        raise SettingError("solver", f"must be one of {', '.join(REGISTRY)}, got {name!r}")
    known = set().union(*(solver_options(c) for c in REGISTRY.values()))
    unknown = sorted(set(options) - known)
    if unknown:
        raise UserError(f"no solver takes the option(s) {', '.join(unknown)}; options: {', '.join(sorted(known))}")
    accepted = solver_options(cls)
    kwargs = {k: v for k, v in options.items() if k in accepted}
    return cls(objective, damping, progress=progress, **kwargs)
