"""The memory plan of a calculate run: how ``memory_budget`` (GB) splits the work (docs/DESIGN.md, "Memory").

Between the fitted curvature, the inverse-HVPs held (and scored) together and one scoring / HVP /
fitting call; :func:`plan_memory` reads the layer shapes from the Keras graph.
"""
import dataclasses

import numpy as np

from influence.settings import bytes_to_gb, gb_to_bytes


def layer_shapes(clf):
    """Per selected layer ``(positions P, kernel inputs K, output channels C, activation floats)``.

    Read from the Keras graph; a layer whose shapes are unknown counts as 100 000 floats of
    activations and no patches.
    """
    out = []
    for g in clf.groups:
        try:
            shape = [d for d in g.layer.output.shape[1:]]
            act = int(np.prod([d for d in shape if d is not None]))
            positions = int(np.prod([d for d in shape[:-1] if d is not None])) if len(shape) > 1 else 1
        except (AttributeError, ValueError, TypeError):
            act, positions = 100_000, 1
        kernel = getattr(g.layer, "kernel", None)
        if kernel is not None and len(kernel.shape) >= 2:
            k, c = int(np.prod(kernel.shape[:-1])), int(kernel.shape[-1])
        else:
            k, c = 0, 0
        out.append((positions, k, c, max(act, 1)))
    return out


@dataclasses.dataclass(frozen=True)
class Budget:
    """What :func:`plan_memory` reads of a run's settings: ``memory_budget`` (GB) and ``score_batch``
    (training images per scoring step, at most). A :class:`influence.settings.Settings` serves as well."""

    memory_budget: float
    score_batch: int


@dataclasses.dataclass
class MemoryPlan:
    """How a run splits its work to stay within ``memory_budget`` (docs/DESIGN.md, "Memory").

    ``vectors``: test images whose inverse-HVPs are held (and scored) at once; ``score_batch``:
    training images per scoring call; ``chunk``: training images per HVP / curvature-fitting call;
    ``bytes_per_vector``: what one held test image costs; ``solver_bytes``: what the fitted
    curvature holds (and its per-vector workspace), taken off the budget first.
    """

    vectors: int
    score_batch: int
    chunk: int
    bytes_per_vector: int
    solver_bytes: int = 0


#: floats per activation that each backward-signal row past the first costs a K-FAC fit (measured 4.2 on
#: VGG16 with top:10; :func:`fit_image_bytes`)
ROW_FLOATS = 5


def plan_memory(clf, settings, n_test, solver=None, fitting=False):
    """Split ``memory_budget`` (GB) between the fitted curvature, the held test vectors and one call.

    ``settings``: a :class:`Budget` (or anything with ``memory_budget`` and ``score_batch``);
    :meth:`influence.Influence.plan` is the caller that runs.

    The solver's resident state and workspace (``solver.resident_bytes``, ``workspace_bytes``; the
    EK-FAC eigenvectors and eigenvalues) come off first; the rest goes half to the inverse-HVPs held
    together, half to one scoring/HVP call. A held test vector costs ``solver.copies_per_vector``
    parameter-sized arrays (its gradient and its solution; more for iterative solvers). A scoring
    call costs, per training image, the activations and backward signals (4 floats per activation),
    the conv patches and per-image gradients of the gradient route, and the tangent route's T outputs.
    Without a solver (before the fit) only ``chunk`` is meaningful.

    ``fitting``: the plan of ``solver``'s fit: what the fit holds at its peak (``solver.fit_bytes``,
    EK-FAC: float64 factors, eigenbases and ``Λ`` with their copies in the model's dtype) comes off
    first, and ``chunk`` gets all the rest (no test vectors are held while fitting), at
    :func:`fit_image_bytes` per training image: a K-FAC/EK-FAC fit holds ``solver.signal_rows``
    backward signals per image (10 for ``fisher top:10``). When not even one image fits, a
    :class:`~influence.errors.SettingError` names ``memory_budget`` and the settings that shrink the fit.
    """
    itemsize = np.dtype(clf.dtype.as_numpy_dtype).itemsize
    if solver is None:
        held = 0
    elif fitting:
        held = int(getattr(solver, "fit_bytes", 0) or 0)
    else:
        held = int(solver.resident_bytes + solver.workspace_bytes)
    budget = max(gb_to_bytes(settings.memory_budget) - held, 0.1 * gb_to_bytes(settings.memory_budget))
    copies = 2 if solver is None else solver.copies_per_vector
    per_vector = copies * clf.num_params * itemsize
    vectors = int(max(1, min(max(n_test, 1), (budget / 2) // per_vector)))
    shapes = layer_shapes(clf)
    act = sum(a for _, _, _, a in shapes)
    patches = sum(p * k + k * c for p, k, c, _ in shapes if p >= 3)
    tangent = sum(p * c for p, k, c, _ in shapes if p < 3)
    per_image_score = itemsize * (4 * act + patches + vectors * tangent)
    rows = int(getattr(solver, "signal_rows", 1) or 1) if fitting else 1
    per_image_hvp = fit_image_bytes(shapes, itemsize, rows)
    score_batch = int(max(1, min(settings.score_batch, (budget / 2) // per_image_score)))
    room = budget if fitting else budget / 2
    if fitting and held and gb_to_bytes(settings.memory_budget) - held < per_image_hvp:
        raise _no_room(solver, settings.memory_budget, held, per_image_hvp, rows)
    chunk = int(max(1, min(256, settings.score_batch, room // per_image_hvp)))
    return MemoryPlan(vectors, score_batch, chunk, per_vector, held)


def fit_image_bytes(shapes, itemsize, rows=1):
    """Bytes one training image costs in one HVP or curvature-fitting call.

    Args:
      shapes: :func:`layer_shapes` of the selected layers, ``(P, K, C, activation floats)`` each.
      itemsize: bytes of one number in the model's dtype.
      rows: backward signals per image (``R``): 1 for an HVP or a one-label Fisher, the classes taken
        for K-FAC/EK-FAC's ``fisher true`` / ``top:K`` (:func:`influence.curvature.kfac.signals.signal_rows`).

    Returns:
      ``itemsize × ((8 + ROW_FLOATS·(R − 1))·act + patches)``: the forward activations the tape keeps,
      the backward and tangent signals and their copies (8 floats per activation, the HVP's count),
      each further signal row :data:`ROW_FLOATS` more (its ``δ``, the copy that stacks the rows, its
      rotation into the eigenbasis in EK-FAC's second pass, and that class's own backward pass; the
      layer inputs and conv patches are NOT repeated per row), and the conv patches and per-image
      products of every layer. Measured on VGG16 (all parameters, EK-FAC, peak RSS at chunks of 1 and 2
      images): 0.79 GB per image for ``sampled`` (this gives 0.76), 2.85 GB for ``top:10`` (3.04).
    """
    act = sum(a for _, _, _, a in shapes)
    patches = sum(p * k + k * c for p, k, c, _ in shapes if p >= 3)
    return int(itemsize * ((8 + ROW_FLOATS * (max(int(rows), 1) - 1)) * act + patches))


def _no_room(solver, memory_budget, held, per_image, rows):
    """The SettingError of a fit whose state leaves no room for one training image."""
    from influence.errors import SettingError

    fisher = getattr(solver, "fisher", None)
    signals = (f" with fisher {fisher} ({rows} backward signals per image)" if rows > 1 else "")
    ways = ["raise memory_budget", "select fewer parameters with params (e.g. last:3)"]
    if rows > 1:
        ways.insert(1, "take fewer classes (fisher top:3, or sampled: 1 signal per image)")
    return SettingError("memory_budget", f"the {solver.name} fit{signals} holds {bytes_to_gb(held):.2f} GB at its peak and "
                                         f"one training image needs {bytes_to_gb(per_image):.2f} GB more: over memory_budget "
                                         f"{memory_budget:g} GB (needs at least {bytes_to_gb(held + per_image):.1f}); "
                                         + ", ".join(ways[:-1]) + " or " + ways[-1])
