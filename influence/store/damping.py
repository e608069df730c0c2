"""The gradient store's damping in its projected space (``--solver store``, :mod:`influence.store.solver`).

What is added to the projected curvature ``C`` (D, D) before it is inverted:

* a number ``λ``: ``λI`` (the eigendecomposition of ``C`` serves every λ: no inverse is formed);
* a relative damping ``f``: per layer, as EK-FAC's, ``f × trace(C_ll)/D_l`` on layer ``l``'s coordinates;
* ``optimizer`` (per parameter, ``c·D`` from the training run): ``c·R diag(D) Rᵀ``, ``D`` projected as the
  curvature is (:meth:`~influence.store.projection.Projection.projected_diagonal`), exact at ``D = P``.
"""
import numpy as np


def per_layer_damping(curvature, offsets, factor):
    """``f × trace(C_ll)/D_l`` of each layer: ``curvature`` (D, D), ``offsets`` (L + 1,) where each layer's
    coordinates start -> list of L floats."""
    diag = np.diag(curvature)
    return [factor * float(diag[offsets[l]:offsets[l + 1]].mean()) for l in range(len(offsets) - 1)]


def damped_inverse(curvature, added):
    """``(C + added)⁻¹`` symmetrised: (D, D), (D, D) -> (D, D) float64."""
    inv = np.linalg.inv(np.asarray(curvature, np.float64) + added)
    return 0.5 * (inv + inv.T)
