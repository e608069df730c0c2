"""The one interface every inverse-HVP method implements, and the registry that lists them.

A method is a subclass of :class:`InverseHVP` with a ``name``; defining the class registers it
(``__init_subclass__``), so adding a method touches one module and this base never imports its
subclasses. ``influence.curvature`` imports every method module and builds ``--solver`` from
:data:`REGISTRY`.

Life of a solver (docs/DESIGN.md, "Curvature")::

    solver = cls(objective, damping, **options)
    solver.fit()                  # training-set work, done once ...
    state = solver.state()        # ... and cached (influence.curvature.cache) ...
    solver.load_state(state)      # ... or loaded instead of fit() on a rerun
    solver.solve(vectors, ids)    # (H + λI)⁻¹ v for each test vector
"""
import logging
import zlib

import numpy as np

from influence.curvature.damping import TRACE_PROBES, TRACE_SAMPLE, hutchinson_trace, parse_damping
from influence.errors import SettingError
from influence.model.vectors import numpy_to_vec, vec_axpy, vec_size, vec_stack, vec_to_numpy

log = logging.getLogger(__name__)

#: name -> class of every registered method, in definition order
REGISTRY = {}


class TrainingSums:
    """The sums over the training set that a fit takes, computed in this process; a solver's
    ``fit(sums=...)`` takes another object with these methods to have them computed elsewhere (Ray
    shards: :class:`influence.backends.ray_driver.RaySums`), the same numbers added in the same order.

    * ``product(obj)`` -> ``v -> A v`` over the whole training set of the objective ``obj`` (its matrix;
      krylov's Lanczos, dpcg's basis);
    * ``factor_sums(kfac)`` / ``eigen_sums(kfac)``: a K-FAC-family method's pass 1 and pass 2 float64
      sums over the whole training set (pass 2 in its :meth:`eigenbasis`);
    * ``store_pass(store_solver, store, first, add, bar)``: the gradient store's shards ``first``.. written
      (:meth:`influence.store.solver.StoreSolver.write_shard`), ``add(k, gram)`` called in shard order with each
      shard's (D, D) Gram sum, ``bar`` updated by images written.
    """

    def product(self, obj):
        return obj.hvp_full

    def factor_sums(self, kfac):
        return kfac.factor_sums()

    def eigen_sums(self, kfac):
        return kfac.eigen_sums()

    def store_pass(self, store_solver, store, first, add, bar):
        for k in range(first, store.shards):
            add(k, store_solver.write_shard(store, k, bar))


class InverseHVP:
    """Base class: ``solve(vectors, ids) -> list`` of Vecs, ``(H + λI)⁻¹ v`` for each ``v``.

    Class attributes of a method:
      name: the ``--solver`` value (registers the class).
      summary: one line for ``--solver``'s help.
      cache_name: which cache entry holds its fitted state (methods sharing a fit share it).
    """

    name = None
    summary = ""
    cache_name = None
    #: how it takes a relative damping (``auto``, ``0.3x``: influence.curvature.damping): ``"blocks"``
    #: (λ per fitted block from its own eigenvalues: kfac, ekfac), ``"trace"`` (one λ from the mean
    #: eigenvalue trace(H)/P: :meth:`mean_eigenvalue`), or None (refused)
    relative_damping = None
    #: a method that scores the whole training set against itself without one inverse-HVP per image
    #: names its route here and implements ``self_influence_batch(x, y) -> (N,) float64``
    #: (``gᵢᵀ (H + λI)⁻¹ gᵢ`` with each image's own label; influence.scoring.self_influence)
    self_influence_route = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if name:
            if cls.__dict__.get("cache_name") is None:
                cls.cache_name = name
            REGISTRY[name] = cls

    #: takes ``damping optimizer``: a per-parameter damping ``c·D`` (:mod:`influence.model.training_state`),
    #: solved as ``(H + c·D)⁻¹`` with ``D`` of :meth:`response_diagonal`
    takes_diagonal = False
    #: a Kronecker-factored method (kfac, ekfac): ``damping auto`` follows its own rules (curvature/choice.py)
    kronecker = False

    @classmethod
    def check_damping(cls, damping):
        """``damping`` as a :class:`Damping` (parsed by :func:`parse_damping`, the setting's one parser, when
        it is text or a number; a Damping, what calculate.py and the API give, as it is); SettingError when
        this method cannot take it."""
        spec = parse_damping(damping)
        if spec.optimizer and not cls.takes_diagonal:
            able = ", ".join(n for n, c in REGISTRY.items() if c.takes_diagonal)
            raise SettingError("damping", f"{damping} is a per-parameter damping from the training run, which only "
                                          f"{able} take; give solver {cls.name} a number (e.g. 0.01) or a factor "
                                          f"(e.g. 0.1x)")
        if spec.relative and not cls.relative_damping:
            able = ", ".join(n for n, c in REGISTRY.items() if c.relative_damping)
            raise SettingError("damping", f"{damping} is relative to the curvature's scale, which only {able} "
                                          f"take; give solver {cls.name} a number (e.g. 0.01)")
        return spec

    @property
    def damping(self):
        """λ (a float). A relative damping: None for a per-block method (resolved per block after its
        fit); for a ``"trace"`` method ``factor × trace(H)/P``, estimated on first use and kept."""
        spec = self.damping_spec
        if not spec.relative:
            return spec.value
        if self.relative_damping != "trace":
            return None
        if self._resolved is None:
            mean, error, probes = self.mean_eigenvalue()
            self._resolved = spec.value * mean
            self.info.update(damping=self._resolved, damping_rule=str(spec), mean_eigenvalue=mean,
                             mean_eigenvalue_error=error, trace_probes=probes)
            log.info("%s: damping %s -> λ = %.3g (%s x the mean eigenvalue %.3g ± %.1g%s)", self.name, spec,
                     self._resolved, f"{spec.value:g}", mean, error,
                     f", {probes} Hutchinson probes" if probes else "")
        return self._resolved

    @damping.setter
    def damping(self, value):
        self.damping_spec = self.check_damping(value)
        self._resolved = None

    def response_diagonal(self):
        """``D`` float64 ``(P,)`` of ``damping optimizer`` (read once from the model's training state,
        :func:`influence.model.training_state.response_diagonal`), or None for any other damping. With it the
        method solves ``(H + c·D)⁻¹``, ``c`` = :attr:`damping`."""
        if not self.damping_spec.optimizer:
            return None
        if getattr(self, "_response", None) is None:
            from influence.model.training_state import response_diagonal

            self._response = response_diagonal(self.obj.d.clf)
            facts = self._response.facts
            self.info.update(damping_rule=str(self.damping_spec), response=facts)
            log.info("%s: damping %s -> per parameter %g x D, D = (sqrt(v) + eps) / sum of the learning rates "
                     "(%s, %d steps, sum of the learning rates %.3g): mean %.3g, median %.3g", self.name,
                     self.damping_spec, self.damping_spec.value, facts["optimizer"], facts["steps"],
                     facts["lr_sum"], facts["mean"], facts["median"])
        return self._response.diagonal

    def attach(self, cache, key):
        """Where the run keeps its curvature cache (a folder or None) and the fitted state's key, given before the
        fit: a method that keeps more on disk than its state (the gradient store) names its files by them."""

    def set_damping(self, damping):
        """Another damping for the fitted (or loaded) state, without fitting again: what the method fixed
        from λ when it was fitted is formed anew (a krylov rank, exact's ``H + λI``). The result equals a
        solver built with that damping and fitted (tests/test_calibrate.py checks every method);
        ``--calibrate`` scores a grid of dampings on one fit this way."""
        self.damping = damping

    def mean_eigenvalue(self):
        """``(trace(H)/P, its standard error, probes)`` of the matrix the method solves with, without
        damping: Hutchinson's estimate from :data:`TRACE_PROBES` products over the training set (a method
        holding its dense matrix overrides it with the exact trace and 0 probes). Each product is taken
        over the same random sample of at most :data:`TRACE_SAMPLE` training images (all when fewer)."""
        like = self.obj.d.variables
        size = vec_size(like)
        n = self.obj.n
        sample = None if n <= TRACE_SAMPLE else np.sort(np.random.default_rng(0).choice(n, TRACE_SAMPLE, replace=False))
        trace, error = hutchinson_trace(lambda z: vec_to_numpy(self.obj.hvp_full(numpy_to_vec(z, like), sample)),
                                        size, TRACE_PROBES)
        return trace / size, error / size, TRACE_PROBES

    def __init__(self, objective, damping, progress=True):
        self.damping_spec = self.check_damping(damping)
        self._resolved = None
        self.obj = objective
        self.progress = progress
        self.info = {"solver": self.name,
                     "damping": str(self.damping_spec) if self.damping_spec.relative else self.damping}
        if getattr(type(self), "approximates", None) == "hessian":
            self.info["hessian"] = getattr(objective, "hessian", "full")

    # --- training-set work (cached) ----------------------------------------------------------------
    def cache_key(self):
        """Settings (beyond the model, --params and the training archive) the fitted state depends on."""
        return {}

    def matrix_key(self):
        """``{"hessian": "ggn"}`` when the objective's products are Gauss–Newton ones, else ``{}``: the full
        Hessian is the matrix a key names when it names none, so caches written before the choice existed
        still match."""
        kind = getattr(self.obj, "hessian", "full")
        return {} if kind == "full" else {"hessian": kind}

    def fit(self, sums=None):
        """Learn what the method needs from the training set (nothing by default). ``sums``: where the
        sums over the training set a fit takes come from (:class:`TrainingSums`; None: this process)."""

    def state(self):
        """The fitted state as ``{name: numpy array}`` (plus JSON-able ``info``), or None: nothing to cache."""
        return None

    def load_state(self, arrays):
        """Take a state from :meth:`state` instead of calling :meth:`fit`."""

    # --- per test image --------------------------------------------------------------------------
    def solve(self, vectors, ids=None):  # pragma: no cover - interface
        """``[(H + λI)⁻¹ v for v in vectors]``; ``ids`` name each vector (seeds of stochastic methods)."""
        raise NotImplementedError

    def solve_stacked(self, vectors, ids=None):
        """The solutions as one Vec with a leading axis T (what the scorer takes)."""
        return vec_stack(self.solve(vectors, ids=ids))

    # --- memory ------------------------------------------------------------------------------------
    #: bytes the fitted state holds while test vectors are solved and scored (after :meth:`compact`)
    resident_bytes = 0
    #: parameter-sized arrays held per test vector of a group: its gradient, its solution and the
    #: stacked copy the scorer takes
    copies_per_vector = 3
    #: parameter-sized temporaries of solving one vector at a time (CG: x, r, p, Ap)
    workspace_vectors = 0

    @property
    def workspace_bytes(self):
        """Transient bytes of solving one test vector beyond what ``copies_per_vector`` counts."""
        d = self.obj.d
        return self.workspace_vectors * vec_size(d.variables) * d.dtype.size

    def compact(self):
        """Drop what only fitting and caching needed (called once the state is cached)."""

    def self_influence_ready(self):
        """False when :meth:`compact` dropped what self-influence needs (the caller fits again)."""
        return True

    def apply(self, v):
        """(H + λI) v over the whole training set (``(H + c·D) v`` with damping ``optimizer``)."""
        return self.damped_product(v, self.obj.hvp_full(v))

    def damped_product(self, v, hv):
        """``hv + λ v``, or ``hv + c·D ⊙ v`` with damping ``optimizer`` (:meth:`response_diagonal`): Vecs."""
        if not self.damping_spec.optimizer:
            return vec_axpy(self.damping, v, hv)
        key = str(self.damping_spec)
        if getattr(self, "_scaled_diagonal", (None,))[0] != key:
            from influence.model.vectors import numpy_to_vec

            scaled = numpy_to_vec(self.damping_spec.value * self.response_diagonal(), self.obj.d.variables)
            self._scaled_diagonal = (key, scaled)
        return tuple(h + d * x for h, d, x in zip(hv, self._scaled_diagonal[1], v))

    # --- for methods that hold their matrix as numpy arrays ----------------------------------------------
    def solve_rows(self, solve_numpy, vectors):
        """``vectors`` (Vecs) solved by a numpy function: stacked as the rows of a float64 (T, P) array,
        ``solve_numpy`` ((T, P) -> (T, P)) applied once, each row returned as a Vec shaped like the model's
        variables. ``[]`` for no vectors (``solve_numpy`` is not called)."""
        vectors = list(vectors)
        if not vectors:
            return []
        like = self.obj.d.variables
        rows = solve_numpy(np.stack([vec_to_numpy(v) for v in vectors]))
        return [numpy_to_vec(row, like) for row in rows]

    def image_gradients(self, x, y):
        """Each image's training-loss gradient with its own label, one tape per image: images (N, H, W, C),
        labels (N,) -> float64 (N, P); (0, P) for no image."""
        d = self.obj.d
        y = np.asarray(y, np.int64)
        if not len(y):
            return np.zeros((0, vec_size(d.variables)))
        return np.stack([vec_to_numpy(d.gradient(x[i:i + 1], y[i:i + 1])) for i in range(len(y))])


def stable_seed(seed, ident):
    """A list of ints for ``numpy.random.default_rng`` from the run seed and a vector's id.

    ``ident`` is any tuple of str/int (test folder, label, index): the stream of a test image is
    the same whichever other images are in the run, so results do not depend on --folders,
    --limit, --memory-budget or a resume.
    """
    parts = ident if isinstance(ident, (tuple, list)) else (ident,)
    out = [int(seed) & 0xFFFFFFFF]
    for p in parts:
        out.append(zlib.crc32(p.encode()) if isinstance(p, str) else int(p) & 0xFFFFFFFF)
    return out
