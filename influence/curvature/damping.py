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
"""
import math
from dataclasses import dataclass

import numpy as np

from influence.errors import UserError

#: the factor of ``auto``: λ_b = AUTO_FACTOR × mean eigenvalue of block b
AUTO_FACTOR = 0.1
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


@dataclass(frozen=True)
class Damping:
    """``value`` is λ when ``relative`` is False, else the factor of the mean eigenvalue."""

    value: float
    relative: bool = False

    def __str__(self):
        return f"{self.value:g}x" if self.relative else f"{self.value:g}"

    def for_block(self, mean_eigenvalue):
        """λ of one block whose eigenvalues (``Λ + ρ``) have mean ``mean_eigenvalue``."""
        return self.value * float(mean_eigenvalue) if self.relative else self.value


def parse_damping(spec):
    """``0.01`` / ``"0.01"`` / ``"auto"`` / ``"0.3x"`` (or a :class:`Damping`) -> :class:`Damping`.

    Raises UserError (naming the setting ``damping``) for anything else or a negative value.
    """
    if isinstance(spec, Damping):
        return spec
    text = str(spec).strip().lower()
    relative = text == "auto" or text.endswith("x")
    try:
        value = AUTO_FACTOR if text == "auto" else float(text[:-1] if relative else text)
    except ValueError:
        raise UserError(f"damping must be a number (0.01), 'auto' ({AUTO_FACTOR:g} x each block's mean eigenvalue) "
                        f"or a factor like 0.3x, got {spec!r}") from None
    if not value >= 0 or (relative and value == 0):
        raise UserError(f"damping must be >= 0 (a factor > 0), got {spec!r}")
    return Damping(value, relative)
