"""The gradient store's damping in its projected space (``--solver store``, :mod:`influence.store.solver`).

What is added to the projected curvature ``C`` (D, D) before it is inverted:

* a number ``λ``: ``λI`` (the eigendecomposition of ``C`` serves every λ: no inverse is formed);
* a relative damping ``f``: per layer, as EK-FAC's, ``f × trace(C_ll)/D_l`` on layer ``l``'s coordinates;
* ``optimizer`` (per parameter, ``c·D`` from the training run): ``c·R diag(D) Rᵀ``, ``D`` projected as the
  curvature is (:meth:`~influence.store.projection.Projection.projected_diagonal`), exact at ``D = P``.

:class:`DampedCurvature` is the store solver's part that owns this: what a damping needs of ``C`` (formed once,
kept with ``C`` in the curvature cache) and the preconditioned test gradients.

What is inverted is ``C`` as the ``store_curvature`` setting says: ``blocks`` keeps each layer's diagonal block
``C_ll`` and leaves the cross-layer blocks out, ``dense`` keeps ``C`` whole (``auto``:
:func:`influence.curvature.choice.per_layer_structure`). Both come from the same cached ``C`` (the structure is
applied after the cache, as the damping is), and a block-diagonal ``C + Λ`` is inverted (or eigendecomposed) block
by block (docs/DESIGN.md, "The gradient store").
"""
import numpy as np

from influence.model.vectors import split_flat


def per_layer_damping(curvature, offsets, factor):
    """``f × trace(C_ll)/D_l`` of each layer: ``curvature`` (D, D), ``offsets`` (L + 1,) where each layer's
    coordinates start -> list of L floats."""
    diag = np.diag(curvature)
    return [factor * float(diag[offsets[l]:offsets[l + 1]].mean()) for l in range(len(offsets) - 1)]


def structure_bounds(structure, offsets):
    """The ``(start, stop)`` coordinate ranges inverted apart: each layer's (``offsets`` (L + 1,): where each
    layer's coordinates start) for ``blocks``, the whole ``[0, D)`` for ``dense``."""
    if structure == "dense":
        return [(0, int(offsets[-1]))]
    return [(int(offsets[l]), int(offsets[l + 1])) for l in range(len(offsets) - 1)]


def damped_inverse(curvature, added, bounds):
    """``(C + added)⁻¹`` symmetrised, of the diagonal blocks ``bounds`` (:func:`structure_bounds`; zero across
    them): (D, D), (D, D) -> (D, D) float64."""
    if len(bounds) == 1:
        inv = np.linalg.inv(np.asarray(curvature, np.float64) + added)
        return 0.5 * (inv + inv.T)
    inv = np.zeros(curvature.shape)
    for s, e in bounds:
        block = np.linalg.inv(np.asarray(curvature[s:e, s:e], np.float64) + added[s:e, s:e])
        inv[s:e, s:e] = 0.5 * (block + block.T)
    return inv


def block_eigh(curvature, bounds):
    """``(w, v)``: the eigendecomposition of ``C``'s diagonal blocks ``bounds`` (zero across them): (D, D) ->
    (D,), (D, D) float64 (``v`` block-diagonal: each block's eigenvectors in its own rows and columns)."""
    if len(bounds) == 1:
        return np.linalg.eigh(curvature)
    w, v = np.empty(len(curvature)), np.zeros(curvature.shape)
    for s, e in bounds:
        w[s:e], v[s:e, s:e] = np.linalg.eigh(curvature[s:e, s:e])
    return w, v


class DampedCurvature:
    """The damped projected curvature of :class:`influence.store.solver.StoreSolver` (mixed into it): ``C``
    (``_curvature``, whole), the eigendecomposition (``_evals``, ``_evecs``) or the damped inverse (``_inverse_held``, formed at ``_inverse_of``) of its structure (``structure``: ``blocks``
    or ``dense``), each formed on first need; the solver gives ``structure``, ``damping_spec``,
    ``projection``, ``info``, ``_ready()`` and ``response_diagonal()``."""

    def _bounds(self):
        """The coordinate ranges inverted apart (:func:`structure_bounds` of ``structure``)."""
        return structure_bounds(self.structure, self.projection.offsets)

    def _set_curvature(self, c, decomposed=None):
        """Adopt ``C``; its eigendecomposition (``decomposed``: ``(w, v)``) only when given: it serves a number
        λ and is computed on first use (:meth:`_decomposition`), a relative or ``optimizer`` damping needs none."""
        self._curvature = c
        self._evals, self._evecs = (None, None) if decomposed is None else decomposed
        self._inverse_held, self._inverse_of = None, None
        self._trace = float(np.trace(c))

    def share_curvature(self, other):
        """Take ``other``'s fitted ``C`` (the same store, maybe another structure), not its decomposition or damped
        inverse, which are of its structure -> whether it had one."""
        if getattr(other, "_curvature", None) is None:
            return False
        self._set_curvature(other._curvature)
        return True

    def curvature_state(self):
        """``C`` (undamped) and what the damping it was fitted at needs, so that a rerun (a new test folder) forms
        nothing: the eigendecomposition of ``C``'s structure for a number λ (it serves every λ), the damped inverse
        with what it was damped by (:meth:`_inverse_tag`) for a relative or ``optimizer`` damping."""
        state = {"curvature": self._curvature}
        if self._evals is not None:
            state.update(eigenvalues=self._evals, eigenvectors=self._evecs,
                         eigen_of=np.frombuffer(self.structure.encode(), np.uint8))
        if self._inverse_held is not None:
            state.update(inverse=self._inverse_held, inverse_of=np.frombuffer(self._inverse_of.encode(), np.uint8))
        return state

    def adopt_curvature_state(self, arrays, dim):
        """The arrays of :meth:`curvature_state` (from the curvature cache), checked against ``dim``; ValueError
        when they do not fit. A decomposition of another structure than this run's is left out (formed on
        need); one cached before the structure was recorded is of the whole ``C``."""
        c = np.asarray(arrays["curvature"], np.float64)
        if c.shape != (dim, dim):
            raise ValueError(f"cached store curvature is {c.shape}, expected {(dim, dim)}")
        decomposed = None
        of = bytes(arrays["eigen_of"]).decode() if "eigen_of" in arrays else "dense"
        if "eigenvalues" in arrays and of == self.structure:
            decomposed = (np.asarray(arrays["eigenvalues"], np.float64), np.asarray(arrays["eigenvectors"], np.float64))
            if decomposed[1].shape != c.shape or decomposed[0].shape != c.shape[:1]:
                raise ValueError("cached store eigendecomposition does not match its curvature")
        self._set_curvature(c, decomposed)
        if "inverse" in arrays:
            inverse = np.asarray(arrays["inverse"], np.float64)
            if inverse.shape != c.shape:
                raise ValueError("cached store inverse does not match its curvature")
            self._inverse_held, self._inverse_of = inverse, bytes(arrays["inverse_of"]).decode()

    def _decomposition(self):
        """``(w, v)``: the eigendecomposition of ``C``'s structure (:func:`block_eigh`, float64), computed once."""
        if self._evals is None:          # a loaded one is of this structure (adopt_curvature_state)
            self._evals, self._evecs = block_eigh(self._curvature, self._bounds())
        return self._evals, self._evecs

    def layer_damping(self):
        """(D,) λ of each projected coordinate: a number everywhere, or for a relative damping
        :func:`per_layer_damping` (recorded in ``info`` as EK-FAC records its own: ``damping_per_layer``,
        ``{layer: λ}``)."""
        self._ready()
        spec, off = self.damping_spec, self.projection.offsets
        if not spec.relative:
            return np.full(self.projection.dim, float(spec.value))
        per_layer = per_layer_damping(self._curvature, off, spec.value)
        self.info.update(damping_per_layer={b.name: float(f"{lam:.6g}") for b, lam in zip(self.plan, per_layer)},
                         damping_rule=str(spec))
        return np.repeat(per_layer, np.diff(off))

    def _inverse_tag(self):
        """What the damped inverse depends on besides ``C``: the damping, for ``optimizer`` the fingerprint of the
        training run's diagonal ``D``, and the structure when it is ``blocks`` (a cached inverse is used only when its
        tag is this one; a tag without a structure is of the whole ``C``)."""
        spec = self.damping_spec
        tag = str(spec)
        if spec.optimizer:
            self.response_diagonal()                                    # read once
            tag = f"{spec}@{self._response.fingerprint()}"
        return tag if self.structure == "dense" else f"{tag} {self.structure}"

    def _inverse(self):
        """``(C + Λ)⁻¹`` for a per-layer damping, ``(C + c·R diag(D) Rᵀ)⁻¹`` for damping ``optimizer`` (module
        docstring; of the diagonal blocks of both with ``structure`` blocks), kept per damping (and cached with
        ``C``: :meth:`curvature_state`); None for one λ (the
        eigendecomposition serves it)."""
        spec = self.damping_spec
        if not (spec.relative or spec.optimizer):
            return None
        self._ready()
        tag = self._inverse_tag()
        if self._inverse_of != tag:
            if spec.optimizer and self._response_projected is None:      # R diag(D) Rᵀ, once
                self._response_projected = self.projection.projected_diagonal(
                    split_flat(self.response_diagonal(), self.obj.d.variables))
            added = spec.value * self._response_projected if spec.optimizer else np.diag(self.layer_damping())
            self._inverse_held, self._inverse_of = damped_inverse(self._curvature, added, self._bounds()), tag
        elif spec.relative and "damping_per_layer" not in self.info:
            self.layer_damping()         # recorded in info, as when the inverse is formed
        return self._inverse_held

    def preconditioned(self, projected):
        """(T, D) -> (T, D): ``(C + Λ)⁻¹ z`` of each projected row (``Λ``: :meth:`layer_damping`)."""
        self._ready()
        z = np.asarray(projected, np.float64)
        inv = self._inverse()
        if inv is not None:
            return z @ inv
        w, v = self._decomposition()
        return ((z @ v) / (w + self.damping)) @ v.T
