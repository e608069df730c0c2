"""The memory plan of a calculate run: how ``memory_budget`` (GB) splits the work (docs/DESIGN.md, "Memory").

Between the fitted curvature, the inverse-HVPs held (and scored) together and one scoring / HVP /
fitting call; :func:`plan_memory` reads the layer shapes from the Keras graph.
"""
import dataclasses

import numpy as np


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
    first, and ``chunk`` gets all the rest (no test vectors are held while fitting).
    """
    itemsize = np.dtype(clf.dtype.as_numpy_dtype).itemsize
    if solver is None:
        held = 0
    elif fitting:
        held = int(getattr(solver, "fit_bytes", 0) or 0)
    else:
        held = int(solver.resident_bytes + solver.workspace_bytes)
    budget = max(settings.memory_budget * 2**30 - held, 0.1 * settings.memory_budget * 2**30)
    copies = 2 if solver is None else solver.copies_per_vector
    per_vector = copies * clf.num_params * itemsize
    vectors = int(max(1, min(max(n_test, 1), (budget / 2) // per_vector)))
    shapes = layer_shapes(clf)
    act = sum(a for _, _, _, a in shapes)
    patches = sum(p * k + k * c for p, k, c, _ in shapes if p >= 3)
    tangent = sum(p * c for p, k, c, _ in shapes if p < 3)
    per_image_score = itemsize * (4 * act + patches + vectors * tangent)
    per_image_hvp = itemsize * (8 * act + patches)
    score_batch = int(max(1, min(settings.score_batch, (budget / 2) // per_image_score)))
    chunk = int(max(1, min(256, settings.score_batch, (budget if fitting else budget / 2) // per_image_hvp)))
    return MemoryPlan(vectors, score_batch, chunk, per_vector, held)
