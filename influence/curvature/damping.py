"""What ``--damping`` means: an absolute ``λ``, or a factor of the curvature's own scale.

A fixed ``λ`` serves no two models: on the demo CNN the Gauss-Newton matrix's mean eigenvalue is
9.7e-4 and its best ``λ`` for the LDS 1e-4, on a less confident BatchNorm CNN they are 0.13 and 0.1
(docs/DESIGN.md "Damping and the matrix"). A relative damping follows the curvature instead:

* a Kronecker-factored method (kfac, ekfac): ``λ_b = f × mean(Λ_b + ρ_b)`` for each block ``b``
  (each layer's own eigenvalues; kronfluence's heuristic is ``f = 0.1``);
* a Hessian method (exact, cg, pcg, lissa): one ``λ = f × trace(H)/P``, the mean eigenvalue of the
  matrix it solves with (exact: the dense matrix's trace; the others: :func:`hutchinson_trace`,
  :data:`TRACE_PROBES` products over a fixed sample of at most :data:`TRACE_SAMPLE` training images,
  once per run).

Accepted values (a number or text, as on the command line):

* ``0.01``  -- absolute: every solver solves ``(H + λI) x = v``;
* ``auto``  -- relative with the default factor :data:`AUTO_FACTOR`;
* ``0.3x``  -- relative with factor 0.3.

:func:`parse_damping` turns any of them into a :class:`Damping` (``value`` and whether it is relative),
once: calculate.py's ``--damping``, :class:`influence.settings.Settings` and :class:`influence.Influence`
parse with it, and it returns a :class:`Damping` as it is, so a solver given one does not parse again.
"""
import math

import numpy as np

# the value and its one parser live with the setting (TensorFlow-free: calculate.py's flag and
# influence.settings.Settings parse with it before any model loads); the solvers take a Damping
from influence.settings import AUTO_FACTOR, Damping, parse_damping  # noqa: F401  (this module's names)

#: Rademacher probes of the trace estimate of a Hessian method's relative damping
TRACE_PROBES = 10
#: training images (a fixed random sample) each probe's product is taken over: the cost stays
#: 10 products over at most this many images, whatever the size of the training set
TRACE_SAMPLE = 2048


def hutchinson_trace(apply, size, probes=TRACE_PROBES, seed=0):
    """Hutchinson's estimate of ``trace(A)`` from products: ``mean_j z_jᵀ A z_j``, ``z_j`` ±1 at random.

    Args:
      apply: float64 (size,) -> float64 (size,), the product ``A z``.
      size: the dimension ``P``.
      probes: how many ``z`` (each costs one product).
      seed: of ``numpy.random.default_rng``: the same probes every run.

    Returns:
      ``(estimate, standard error)`` of the trace (the error 0.0 with one probe).
    """
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(int(probes)):
        z = rng.integers(0, 2, size).astype(np.float64) * 2.0 - 1.0
        values.append(float(z @ np.asarray(apply(z), dtype=np.float64)))
    values = np.asarray(values)
    error = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0
    return float(values.mean()), error
