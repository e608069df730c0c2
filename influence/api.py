"""The Python face of the package: influence scores as arrays, for notebooks and scripts.

    import influence
    inf = influence.Influence("demo/model.keras", train=(x_train, y_train), preprocess="unit")   # or "train.npz"
    scores = inf.scores(images, labels)        # float32 (tests, train): positive = useful, negative = harmful
    inf.top(scores, k=5)                       # the most harmful / useful training images of each test image
    inf.self_influence()                       # which training images look mislabelled

The same numbers as ``calculate.py`` with the same settings, by the same path (:meth:`Influence.score_groups`;
docs/DESIGN.md, "What is computed"):
``score[t, i] = ∇L(z_t)ᵀ (H + λI)⁻¹ ∇L(z_i)``. The curvature is fitted on the first call that needs
it (or :meth:`Influence.fit`), and kept in ``cache`` (a folder, the same cache calculate.py uses) when
one is given. Errors are :class:`influence.errors.UserError` with one line naming the setting.

``Influence(model, train, settings=None, *, chunk, progress, backend, given, check, **overrides)``

Args:
  model: a ``.keras``/``.h5`` file, a ``keras.applications`` name (``"vgg16"``), a Keras model
    object (a final softmax is stripped in memory; a mixed-precision model computes in float32), or
    a loaded :class:`influence.model.models.Classifier`.
  train: the training set: a ``train.npz`` written by ``prepare_data.py`` (path) or a ``TrainArchive``;
    ``(x, y)`` arrays in memory (:class:`influence.data.arrays.ArrayTrainSet`); or any object with
    ``len(train)`` batches and ``train[b] -> (x, y)`` (a ``keras.utils.PyDataset`` qualifies). Images
    uint8, or float: with ``preprocess="none"`` (or ``auto`` on a model file or object) float images are
    the model's input as they are, any finite values (normalised, augmented), and the derivatives take
    float input; with another ``preprocess`` float images must be pixel levels (``k / 255`` for ``unit``,
    whole numbers otherwise), read as the uint8 image (:mod:`influence.data.arrays`).
  settings: a :class:`influence.settings.Settings` (default ``Settings()``: calculate.py's defaults).
    Each setting an Influence takes (:data:`influence.settings.API_SETTINGS`) can be given as a keyword
    instead, over ``settings``; they are:
  solver: ``"auto"`` (default: :mod:`influence.curvature.choice`: lissa when ``iter``, ``bsize``, ``scale``
    or ``repeats`` is passed, else krylov when ``memory_budget`` holds its basis over the model's
    parameters, else ekfac; :attr:`solver_name` and :attr:`solver_choice` say which and why) or a
    registered method (``influence.curvature.REGISTRY``): ekfac, kfac, cg, pcg, lissa, exact, krylov, dpcg.
  damping: λ, or ``"auto"`` / ``"0.3x"``: relative to the curvature's scale (each layer's mean
    eigenvalue for kfac/ekfac, the mean eigenvalue trace(H)/P for the Hessian methods). Default
    ``"auto"`` (0.1x), chosen by the LDS panel (README, "Is it right?").
  hessian: ``"ggn"`` (default: the Gauss-Newton matrix, positive semi-definite) or ``"full"`` (the
    Hessian, as Koh & Liang) for exact, cg, lissa, pcg; kfac/ekfac fit the Fisher either way.
  preprocess: ``auto``, ``none``, ``caffe``, ``tf``, ``torch``, ``unit`` (x/255) -- what the model expects
    (``none``: the arrays are what the model eats).
  params: ``all``, ``last:N`` or layer names: the parameters the influence is taken over.
  weights: for a ``keras.applications`` name: ``imagenet``, a file, or ``none``.
  cache: a folder for the fitted curvature (reused while model, archive and settings agree).
  score_batch: training images per scoring step, at most; chunk: training images per HVP / fitting
    step (default: the memory plan's, as calculate.py).
  memory_budget: GB for everything scoring holds at once (:meth:`Influence.plan`): :meth:`Influence.scores` scores the
    test images in groups whose inverse-HVPs fit it, as calculate.py does.
  progress: show progress bars.
  backend: where the training-set passes run (:mod:`influence.backends`): None for this process,
    a backend object, or ``backend(inf)`` -> one, built once the solver is: Ray is
    ``lambda inf: influence.backends.backend_for(inf, workers=2)`` (its workers rebuild the model and
    solver from :meth:`Influence.worker_spec`: it needs a model file or name and a ``train.npz`` archive).
  the solver's options: ``iter``, ``bsize``, ``cg_tol``, ``fisher``, ``seed``, ``rank``, ...; one given
    that the solver does not take is refused, named (the solver takes every solver option of the
    settings, :meth:`influence.settings.Settings.solver_options`).
  given, check: for :meth:`Influence.from_settings` (the settings given explicitly, which ``solver auto`` reads;
    a check of the loaded model in place of the training set's).

Test images (:meth:`Influence.scores`, ``predict``): (T, H, W, C) of the training images' size (one
(H, W, C) image is T = 1), read as the training images are: uint8 pixels, or float -- with float training
images and preprocess ``none``, the model's input as it is (any finite values, cast to the model's dtype);
otherwise pixel levels as ``preprocess`` says (``unit``: ``k / 255``; else whole numbers 0..255). Labels:
(T,) their classes, the label the loss is taken with (the true one, or the prediction to explain). ``ids``:
names of the test images for stochastic solvers (:func:`influence.scoring.groups.score_groups`).

The training images must be the model's input size and their labels its class indices
(:func:`influence.model.models.check_training_set`, the check calculate.py runs): a one-line
:class:`~influence.errors.SettingError` naming ``train`` otherwise (calculate.py's names ``data``).

:meth:`Influence.from_settings` builds one from a calculate run's :class:`influence.settings.Settings` (the
calculate job is a client of this class: it scores with :meth:`Influence.score_groups`, the loop of
:meth:`Influence.scores`, and adds only the output folder, the lock, resuming and the files). The defaults are
calculate.py's: both come from :class:`influence.settings.Settings`.
"""
import copy
import dataclasses
import logging
from pathlib import Path

import numpy as np

from influence.build import build, load
from influence.errors import SettingError, UserError
from influence.model.training_state import mean_training_loss
from influence.settings import (API_SETTINGS, NAMES, SOLVER_OPTIONS, Settings, bytes_to_gb, check_setting,
                                group_of)

#: the settings an Influence takes as its own: the model's, the resources' and the inverse-HVP settings that
#: are not a solver's option (a solver option given is checked against the solver: :func:`_check_options`)
_OWN = tuple(n for n in API_SETTINGS if not (n in SOLVER_OPTIONS and group_of(n) == group_of("solver")))

log = logging.getLogger(__name__)


class Influence:
    """Influence of every training image of ``train`` on predictions of ``model``: the arguments are the
    module's (:mod:`influence.api`); :meth:`scores` is the main call; :meth:`close` shuts down a Ray
    runtime its backend started."""

    def __init__(self, model, train, settings=None, *, chunk=None, progress=True, backend=None, given=None,
                 check=None, **overrides):
        from influence.curvature.choice import AUTO
        from influence.scoring import Scorer
        from influence.scoring.groups import TestImages

        s, options = _settings(model, settings, overrides)
        if chunk is not None and int(chunk) < 1:
            raise UserError(f"chunk must be at least 1, got {chunk}")
        #: the settings this object runs on (``solver``: the method chosen; ``model``: as given when a file
        #: or name); the solver takes every solver option of them, and the options no setting names
        self.settings, self._extra = s, {k: v for k, v in options.items() if k not in NAMES}
        #: the Keras model object given (None for a file or name): :meth:`calibrate` retrains it from its compile config
        self.model_object = None if isinstance(model, (str, Path)) else model
        #: ``(model, weights, preprocess, params)`` a Ray worker loads the model from; None for a model object
        self.model_source = (s.model, s.weights, s.preprocess, s.params) if self.model_object is None else None
        self.model_name = model if isinstance(model, (str, Path)) else getattr(model, "name", "model")
        self.clf, self.train = clf, train = load(model, train, s, check)
        #: GB: everything the scoring holds at once (:meth:`plan`); training images per scoring step, at most
        self.memory_budget, self.score_batch = float(s.memory_budget), int(s.score_batch)
        self._chunk_given = chunk is not None
        #: how test images and labels are read: as the training images are (:class:`~influence.scoring.groups.TestImages`)
        self.reader = TestImages(train.image_shape, clf.num_classes, getattr(train, "float_dtype", None),
                                 s.preprocess == "unit", clf.takes_float_input)
        built = build(clf, train, hessian=s.hessian, chunk=self.plan().chunk if chunk is None else chunk)
        self.derivs, self.objective, self.scorer = built.derivs, built.objective, Scorer(built.derivs)
        self._catalogue, self.cache = None, None if s.cache is None else Path(s.cache)
        self._set_solver(s.solver, progress, given=options if given is None else given)
        if s.solver == AUTO:
            _check_options([self.solver_name], options, f"{self.solver_name!r} ({self.solver_choice})")
        self.solver                       # built now: a setting the solver refuses is an error here
        # after the solver: a Ray backend's worker spec (worker_spec) names the driver's solver
        self.backend = (backend(self) if callable(backend) and not hasattr(backend, "score")
                        else backend if backend is not None else _local())

    @classmethod
    def from_settings(cls, settings, train=None, *, check=None, given=(), runtime=None):
        """An Influence with the settings of a calculate run: ``train`` (default ``<data>/train.npz``), the
        cache ``settings.cache`` or ``<out>/curvature``, the backend Ray with ``workers`` / ``ray_address``
        (on calculate.py's ``runtime``: :func:`influence.backends.base.job_runtime`), else this process."""
        from influence.backends.base import backend_for

        return cls(settings.model, train if train is not None else Path(settings.data) / "train.npz", settings,
                   cache=settings.cache or str(Path(settings.out) / "curvature"), given=given, check=check,
                   backend=lambda inf: backend_for(inf, workers=settings.workers, address=settings.ray_address,
                                                   out=settings.out, runtime=runtime))

    def solver_options(self):
        """``{option: value}`` the solver is built with: the settings' solver options and those no setting names."""
        return {**self.settings.solver_options(), **self._extra}

    def worker_spec(self, parts=None):
        """What a Ray worker rebuilds this object from (:func:`influence.backends.ray_driver.spec_of`)."""
        from influence.backends import ray_driver

        return ray_driver.spec_of(self, parts)

    def _set_solver(self, requested, progress, given):
        """The solver (``auto`` chosen) and damping (``auto`` resolved) on the model: :func:`~.choice.choose_method`."""
        from influence.curvature.choice import choose_method

        name, damping, reason, say = choose_method(requested, given, self.clf, self.memory_budget, self.settings.damping,
                                                   loss=lambda: mean_training_loss(self.derivs, self.train))
        if say:
            log.info("%s", reason)
        self.solver_name, self.solver_choice, self.progress = name, reason, progress
        self.settings = dataclasses.replace(self.settings, solver=name, damping=damping)
        #: after :meth:`fit`: ``loaded`` True when the curvature came from the cache
        self._solver, self._fitted, self.loaded, self._key = None, False, False, None

    @property
    def solver(self):
        """The inverse-HVP method (:mod:`influence.curvature`), built on first use."""
        if self._solver is None:
            from influence.curvature import make_solver

            self._solver = make_solver(self.solver_name, self.objective, self.settings.damping,
                                       progress=self.progress, **self.solver_options())
        return self._solver

    @property
    def layer_names(self):
        """Names of the per-layer score columns (``["all"]`` when the model gives no split)."""
        return list(self.scorer.layer_names if self.scorer.split else ["all"])

    @property
    def curvature_key(self):
        """What the fitted curvature depends on (:func:`influence.curvature.cache.curvature_key`)."""
        if self._key is None:
            from influence.curvature.cache import curvature_key

            self._key = curvature_key(self.clf, self.train, model=self.model_name, preprocess=self.settings.preprocess,
                                      solver=self.solver)
        return self._key

    def cache_path(self):
        """The curvature cache file of this solver, or None without a cache."""
        from influence.curvature.cache import CurvatureCache

        return None if self.cache is None else CurvatureCache(self.cache).path(self.solver)

    def plan(self, n_test=1, *, solver=None, fitting=False):
        """How ``memory_budget`` splits the work for ``n_test`` test images (:func:`influence.memory.plan_memory`:
        without ``solver`` only ``chunk`` is meaningful; ``fitting``: the fit's chunk) -> a ``MemoryPlan``."""
        from influence.memory import Budget, plan_memory

        return plan_memory(self.clf, Budget(self.memory_budget, self.score_batch), n_test, solver, fitting=fitting)

    def fit(self, before_fit=None):
        """Fit (or load from ``cache``) on the backend, in chunks of what ``fit_bytes`` leaves of the budget -> self."""
        if self._fitted:
            return self
        solver = self.solver

        def fit():
            if getattr(solver, "fit_bytes", None) is not None and not self._chunk_given:
                self.objective.chunk = self.plan(solver=solver, fitting=True).chunk
                log.info("%s fit: %.2f GB of the %g GB memory budget held at its peak; %d training image(s) per "
                         "chunk", solver.name, bytes_to_gb(solver.fit_bytes), self.memory_budget, self.objective.chunk)
            if before_fit is not None:
                before_fit(solver)
            self.backend.fit(solver, self.train, chunk=self.objective.chunk, key=self.curvature_key)

        solver.attach(self.cache, self.curvature_key)     # (the gradient store lives next to the cache)
        if self.cache is not None:
            from influence.curvature.cache import CurvatureCache

            self.loaded = CurvatureCache(self.cache).load_or_fit(solver, self.curvature_key, fit)
        else:
            fit()
        self._fitted = True
        return self

    def prepare(self, n_test):
        """Fitted, the solver compacted, the HVPs' ``chunk`` from the plan -> the ``MemoryPlan`` of the scoring
        groups of ``n_test`` test images that :meth:`score_groups` follows."""
        self.fit()
        self.solver.compact()
        plan = self.plan(n_test, solver=self.solver)
        if not self._chunk_given:
            self.objective.chunk = plan.chunk
        log.info("scoring %d test image(s) in %d group(s) of at most %d (memory budget %g GB); %d training images per "
                 "scoring step", n_test, -(-n_test // plan.vectors), plan.vectors, self.memory_budget, plan.score_batch)
        return plan

    def score_groups(self, images, labels, ids=None, *, plan=None, work=None, timings=None):
        """The one scoring loop (:func:`influence.scoring.groups.score_groups`), which :meth:`scores` collects and
        calculate.py's job writes group by group. ``plan``: of :meth:`prepare` (default: prepared once the
        images are checked); ``work(start, stop)`` -> a group's :class:`influence.backends.base.Work`."""
        from influence.scoring.groups import score_groups

        yield from score_groups(
            images, labels, ids, reader=self.reader, derivs=self.derivs, plan=self.prepare if plan is None else plan,
            solve=lambda grads, ids: self.solver.solve_stacked(grads, ids=ids), work=work, timings=timings,
            score=lambda stacked, work, desc, batch: self.score_stacked(stacked, work=work, desc=desc,
                                                                        score_batch=batch),
            direct=getattr(self.solver, "store_shares", None))

    def scores(self, images, labels, per_layer=False, ids=None):
        """Influence of every training image on each of ``images`` (T, H, W, C) with ``labels`` (T,) (the
        module's "Test images"), by :meth:`score_groups` -> float32 (T, N) in training-set order; with
        ``per_layer``, (T, N, L) and the layer names."""
        if np.asarray(images).ndim == 3:
            images = np.asarray(images)[None]
        parts = [g.shares for g in self.score_groups(images, labels, ids)]
        width = len(self.layer_names)
        shares = np.concatenate(parts) if parts else np.zeros((0, len(self.train), width), np.float32)
        return (shares, self.layer_names) if per_layer else shares.sum(axis=2)

    def predict(self, images, batch=256):
        """Class probabilities (T, classes) of ``images`` (as :meth:`scores` reads them), ``batch`` at a time."""
        x = self.reader.images(images)
        return np.concatenate([np.zeros((0, self.clf.num_classes))] +
                              [self.derivs.predict(x[s:s + batch]).numpy() for s in range(0, len(x), batch)])

    def test_gradients(self, images, labels):
        """``∇L(z_t)`` of each test image (a list of T Vecs; ``calibrate`` scores its grid from them)."""
        from influence.scoring.groups import gradients

        return gradients(self.derivs, *self.reader.arrays(images, labels))

    def score_stacked(self, stacked, *, work=None, desc="scoring", score_batch=None):
        """Shares float32 (T, N, L) of every training image against stacked inverse-HVPs, on the backend
        (``work``: :class:`influence.backends.base.Work`, for a backend that resumes)."""
        return self.backend.score(self.scorer, self.train, stacked, int(score_batch or self.score_batch),
                                  key=self.curvature_key, work=work, desc=desc)

    def top(self, scores, k=5):
        """The ``k`` most harmful and most useful training images of each row of ``scores`` (T, N) (``ranked``)."""
        from influence.outputs.ranking import ranked

        return ranked(scores, self.catalogue(), k)

    def self_influence(self, limit=None, *, batch=None, vectors=None):
        """``∇L(z_i)ᵀ (H + λI)⁻¹ ∇L(z_i)`` of every training image (or the ``limit`` of highest loss), ``batch``
        per step, ``vectors`` held at once -> :class:`influence.scoring.self_influence.SelfInfluence`."""
        from influence.scoring.self_influence import self_influence

        if self._fitted and not self.solver.self_influence_ready():
            # scoring compacted the fit to what solving needs; self-influence needs the whole of it
            log.info("self-influence: the %s curvature again (scoring compacted it)", self.solver_name)
            self._solver, self._fitted = None, False
        self.fit()
        return self_influence(self.solver, self.derivs, self.train, batch=batch or self.score_batch, limit=limit,
                              vectors=vectors, progress=self.progress)

    def with_solver(self, solver, damping=None, share=None, **options):
        """This Influence with another registered ``solver``, ``damping`` (default: this one's) and ``options``, in
        this process, nothing reloaded; its own fit (the cache's), or fitted ``share``'s where the solver takes it."""
        from influence.curvature import REGISTRY

        if solver not in REGISTRY:
            raise SettingError("solver", f"must be one of {', '.join(REGISTRY)}, got {solver!r}")
        _check_options([solver], options, repr(solver))
        other = copy.copy(self)
        other.settings = dataclasses.replace(self.settings, damping=self.settings.damping if damping is None
                                             else damping, **{k: v for k, v in options.items() if k in NAMES})
        other._extra = {**self._extra, **{k: v for k, v in options.items() if k not in NAMES}}
        other._set_solver(solver, self.progress, given=())
        other.backend = _local()
        if share is not None and share._fitted and hasattr(other.solver, "share_fit"):
            other._fitted = other.solver.share_fit(share.solver)
        return other

    def calibrate(self, test_images, test_labels, train_fn=None, subsets=16, seeds=2, epochs="auto",
                  batch_size=32, solvers=None, dampings=None, cache=None, init="fresh"):
        """How far the scores can be trusted on this model: the LDS of a (solver, damping) grid against the model
        retrained on random half-subsets (:func:`influence.calibration.calibrate`; default ``cache``: this one's)."""
        from influence.calibration import calibrate

        return calibrate(self, test_images, test_labels, train_fn=train_fn, subsets=subsets, seeds=seeds,
                         init=init, epochs=epochs, batch_size=batch_size, solvers=solvers, dampings=dampings,
                         cache=self.cache if cache is None else cache)

    def catalogue(self):
        """The training images' keys, files and labels (:class:`influence.catalogue.TrainCatalogue`)."""
        if self._catalogue is None:
            from influence.catalogue import TrainCatalogue

            self._catalogue = TrainCatalogue.of(self.train)
        return self._catalogue

    def close(self):
        """Shut down what the backend started (a Ray runtime it owns)."""
        self.backend.close()


def _settings(model, settings, overrides):
    """``(settings, options)``: ``settings`` (default ``Settings()``) with the ``overrides`` of its fields
    (each parsed and checked by its field), and the solver's options among them, checked against the
    solver (for ``auto``, every method it may choose) before the model loads: a typo fails at once."""
    from influence.curvature.choice import AUTO, CANDIDATES, solver_choices

    base = Settings() if settings is None else settings
    solver = overrides.get("solver", base.solver)
    if solver not in solver_choices():
        raise SettingError("solver", f"must be one of {', '.join(solver_choices())}, got {solver!r}")
    options = {k: v for k, v in overrides.items() if k not in _OWN}
    if solver == AUTO:
        _check_options(CANDIDATES, options, f"'auto' ({', '.join(CANDIDATES)})")
    else:
        _check_options([solver], options, repr(solver))
    fields = {k: v for k, v in overrides.items() if k in NAMES}
    if isinstance(model, (str, Path)):
        fields["model"] = str(model)
    s = dataclasses.replace(base, **fields)             # damping parsed here, once (its field's parser)
    for name in fields:
        check_setting(name, getattr(s, name))
    return s, options


def _check_options(names, options, shown):
    """UserError naming the ``options`` that none of the methods ``names`` takes (``shown``: the solver
    as the message names it)."""
    from influence.curvature import REGISTRY, solver_options

    accepted = set().union(*(solver_options(REGISTRY[n]) for n in names))
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise UserError(f"solver {shown} takes no option {', '.join(unknown)}; it takes: "
                        f"{', '.join(sorted(accepted))}")


def _local():
    from influence.backends.local import LocalBackend

    return LocalBackend()
