"""What ``--damping`` means: an absolute ``λ``, or a factor of the fitted spectrum's scale.

A fixed ``λ`` serves no two models: on the demo CNN the Fisher's eigenvalues are at most 1.3e-3
(``λ = 0.01`` flattens 99 % of the curvature into ``I/λ``), on a less confident BatchNorm CNN the
best ``λ`` is 0.1 (issue 17's measurements, docs/DESIGN.md "Damping"). A relative damping follows
the curvature instead: for a Kronecker-factored method, ``λ_b = f × mean(Λ_b + ρ_b)`` for each block
``b`` (each layer's own eigenvalues; kronfluence's heuristic is ``f = 0.1``).

Accepted values (a number or text, as on the command line):

* ``0.01``  -- absolute: every solver solves ``(H + λI) x = v``;
* ``auto``  -- relative with the default factor :data:`AUTO_FACTOR`;
* ``0.3x``  -- relative with factor 0.3.
"""
from dataclasses import dataclass

from influence.errors import UserError

#: the factor of ``auto``: λ_b = AUTO_FACTOR × mean eigenvalue of block b
AUTO_FACTOR = 0.1


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
