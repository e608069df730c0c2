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
"""
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from influence.build import build, classifier, train_data
from influence.errors import SettingError, UserError
from influence.settings import API_SETTINGS, NAMES, SOLVER_OPTIONS, Settings, check_setting, group_of

#: the settings an Influence takes as its own: the model's, the resources' and the inverse-HVP settings that
#: are not a solver's option (a solver option given is checked against the solver: :func:`_check_options`)
_OWN = tuple(n for n in API_SETTINGS if not (n in SOLVER_OPTIONS and group_of(n) == group_of("solver")))

log = logging.getLogger(__name__)


@dataclass
class Ranked:
    """One training image in a top list: archive ``index``, ``key`` (``"<batch>_<i>"``), ``file``,
    ``label`` and its ``score``."""

    index: int
    key: str
    file: str
    label: int
    score: float


class Influence:
    """Influence of every training image of ``train`` on predictions of ``model``.

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
      memory_budget: GB for everything scoring holds at once (:meth:`plan`): :meth:`scores` scores the
        test images in groups whose inverse-HVPs fit it, as calculate.py does.
      progress: show progress bars.
      backend: where the training-set passes run (:mod:`influence.backends`): None for this process,
        a backend object, or ``backend(inf)`` -> one, built once the solver is: Ray is
        ``lambda inf: influence.backends.backend_for(inf, workers=2)`` (its workers rebuild the model and
        solver from :meth:`worker_spec`: it needs a model file or name and a ``train.npz`` archive).
      the solver's options: ``iter``, ``bsize``, ``cg_tol``, ``fisher``, ``seed``, ``rank``, ...; one given
        that the solver does not take is refused, named (the solver takes every solver option of the
        settings, :meth:`influence.settings.Settings.solver_options`).
      given, check: for :meth:`from_settings` (the settings given explicitly, which ``solver auto`` reads;
        a check of the loaded model in place of the training set's).

    The training images must be the model's input size and their labels its class indices
    (:func:`influence.model.models.check_training_set`, the check calculate.py runs): a one-line
    :class:`UserError` naming ``train`` otherwise.

    :meth:`from_settings` builds one from a calculate run's :class:`influence.settings.Settings` (the
    calculate job is a client of this class: it scores with :meth:`score_groups`, the loop of
    :meth:`scores`, and adds only the output folder, the lock, resuming and the files). The defaults are
    calculate.py's: both come from :class:`influence.settings.Settings`.
    """

    def __init__(self, model, train, settings=None, *, chunk=None, progress=True, backend=None, given=None,
                 check=None, **overrides):
        from influence.curvature.choice import AUTO, CANDIDATES, solver_choices

        base = Settings() if settings is None else settings
        solver = overrides.get("solver", base.solver)
        if solver not in solver_choices():
            raise SettingError("solver", f"must be one of {', '.join(solver_choices())}, got {solver!r}")
        options = {k: v for k, v in overrides.items() if k not in _OWN}        # the solver's, given here
        if solver == AUTO:                                   # before the model loads: a typo fails at once
            _check_options(CANDIDATES, options, f"'auto' ({', '.join(CANDIDATES)})")
        else:
            _check_options([solver], options, repr(solver))
        fields = {k: v for k, v in overrides.items() if k in NAMES}
        if isinstance(model, (str, Path)):
            fields["model"] = str(model)
        s = dataclasses.replace(base, **fields)             # damping parsed here, once (its field's parser)
        for name in fields:
            check_setting(name, getattr(s, name))
        if chunk is not None and int(chunk) < 1:
            raise UserError(f"chunk must be at least 1, got {chunk}")
        #: the settings this object runs on (``solver``: the method chosen; ``model``: as given when a file
        #: or name); the solver takes every solver option of them (:meth:`Settings.solver_options`), and the
        #: options no setting names as given here
        self.settings = s
        self._extra = {k: v for k, v in options.items() if k not in NAMES}
        given, explicit = (options if given is None else given), dict(options)
        #: the Keras model object given (None for a file or name): :meth:`calibrate` retrains it from its compile config
        self.model_object = None if isinstance(model, (str, Path)) else model
        name = model if isinstance(model, (str, Path)) else getattr(model, "name", "model")
        clf = classifier(model, s.weights, s.preprocess, s.params)
        train = train_data(train, s.preprocess, clf)
        if check is not None:
            check(clf)
        else:                           # calculate.py's check runs it with its own wording (engine)
            from influence.model.models import check_training_set

            check_training_set(clf, train, "train")
        #: GB: everything the scoring holds at once (:meth:`plan`); score_batch: training images per
        #: scoring step, at most (the plan may take fewer)
        self.memory_budget, self.score_batch = float(s.memory_budget), int(s.score_batch)
        self._chunk_given = chunk is not None
        self._setup(clf, train, name, chunk)
        self._set_solver(solver, progress, given=given)
        if solver == AUTO:
            _check_options([self.solver_name], explicit, f"{self.solver_name!r} ({self.solver_choice})")
        self.cache = None if s.cache is None else Path(s.cache)
        self.solver                       # built now: a setting the solver refuses is an error here
        # after the solver: a Ray backend's worker spec (worker_spec) names the driver's solver
        self.backend = (backend(self) if callable(backend) and not hasattr(backend, "score")
                        else backend if backend is not None else _local())

    @classmethod
    def from_settings(cls, settings, train=None, *, check=None, given=(), runtime=None):
        """An Influence with the settings of a calculate run (:class:`influence.settings.Settings`).

        The model is ``settings.model``; ``train`` (default: ``<data>/train.npz``); the cache is
        ``settings.cache`` or ``<out>/curvature``; the backend is Ray with ``workers`` / ``ray_address``,
        else this process. ``check(classifier)`` runs on the loaded model before anything is built on it.
        ``given``: names of the settings given explicitly (calculate.py's flags,
        :func:`influence.settings.given_settings`), which ``solver auto`` reads. ``runtime``: a Ray runtime
        to lend the backend (calculate.py's job's, :func:`influence.backends.base.job_runtime`). The object
        is built by ``__init__`` like any other: the same checks, the same memory plan.
        """
        from influence.backends.base import backend_for

        return cls(settings.model, train if train is not None else Path(settings.data) / "train.npz", settings,
                   cache=settings.cache or str(Path(settings.out) / "curvature"), given=given, check=check,
                   backend=lambda inf: backend_for(inf, workers=settings.workers, address=settings.ray_address,
                                                   out=settings.out, runtime=runtime))

    @property
    def model_source(self):
        """``(model, weights, preprocess, params)``: how a worker loads the model (:meth:`worker_spec`), or
        None for a model object."""
        s = self.settings
        return None if self.model_object is not None else (s.model, s.weights, s.preprocess, s.params)

    @property
    def preprocess(self):
        return self.settings.preprocess

    def solver_options(self):
        """``{option: value}`` the solver is built with: the settings' solver options and those no setting names."""
        return {**self.settings.solver_options(), **self._extra}

    def worker_spec(self, parts=None):
        """What a Ray worker rebuilds this object's model, derivatives, objective and solver from
        (:class:`influence.backends.ray_worker.WorkerSpec`): the model file or name, weights, preprocess, params,
        hessian, the solver with its parsed damping and options (this object's own), the training
        archive's path, the fingerprints a worker checks, and ``parts``: the folder of the shard scores
        (default ``<cache>/parts``, or a folder under the system's temporary folder without a cache).
        Paths are absolute. A training set in memory, or a model object, has no path a worker could read:
        a one-line :class:`UserError`."""
        import tempfile

        from influence.backends.ray_driver import PARTS
        from influence.backends.ray_worker import WorkerSpec
        from influence.data.archives import TrainArchive

        if not isinstance(self.train, TrainArchive):
            raise UserError(f"train: Ray needs a train.npz archive (its workers read it from disk), not a training "
                            f"set in memory ({type(self.train).__name__}): write one with prepare_data.py, or run "
                            f"without workers")
        if self.model_source is None:
            raise UserError(f"model: Ray needs a model file or keras.applications name (its workers load it), not a "
                            f"model object ({self.model_name}): save it as .keras, or run without workers")

        def absolute(value):
            return str(Path(value).resolve()) if value and Path(value).exists() else value

        s = self.settings
        if parts is None:
            parts = (self.cache / PARTS if self.cache is not None
                     else Path(tempfile.gettempdir()) / f"influence-{PARTS}")
        return WorkerSpec(model=absolute(s.model), weights=absolute(s.weights), preprocess=s.preprocess,
                          params=s.params, hessian=s.hessian, solver=self.solver_name, damping=s.damping,
                          options=tuple(sorted(self.solver_options().items())),
                          train=str(Path(self.train.path).resolve()), train_fingerprint=self.train.fingerprint(),
                          weights_fingerprint=self.curvature_key["weights"], parts=str(Path(parts).resolve()),
                          chunk=int(self.objective.chunk))

    def _setup(self, clf, train, model_name, chunk):
        from influence.scoring import Scorer

        self.train, self.clf, self.model_name = train, clf, model_name
        #: the float dtype test images are cast to when the training set is float input (preprocess none),
        #: else None: images are uint8 pixels (:func:`influence.data.arrays.user_images`)
        self._float_dtype = getattr(train, "float_dtype", None)
        if chunk is None:                       # the memory plan's, before any solver is built
            chunk = self.plan().chunk
        built = build(clf, train, hessian=self.settings.hessian, chunk=chunk)
        self.derivs, self.objective = built.derivs, built.objective
        self.scorer = Scorer(self.derivs)
        self._fitted = False
        self._catalogue = None
        self._key = None
        #: after :meth:`fit`: True when the curvature came from the cache
        self.loaded = False

    def _set_solver(self, requested, progress, given):
        """The method: ``requested``, or for ``auto`` the choice on the loaded model
        (:func:`influence.curvature.choice.choose_solver`, one log line) -> :attr:`solver_name`,
        :attr:`solver_choice` (why)."""
        from influence.curvature.choice import AUTO, choose_solver

        name, reason = choose_solver(requested, given, self.clf.num_params, self.clf.dtype.size, self.memory_budget)
        if requested == AUTO:
            log.info("%s", reason)
        self.solver_name, self.solver_choice, self.progress = name, reason, progress
        self.settings = dataclasses.replace(self.settings, solver=name)
        self._solver = None

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

            self._key = curvature_key(self.clf, self.train, model=self.model_name, preprocess=self.preprocess,
                                      solver=self.solver)
        return self._key

    def cache_path(self):
        """The curvature cache file of this solver, or None without a cache."""
        from influence.curvature.cache import CurvatureCache

        return None if self.cache is None else CurvatureCache(self.cache).path(self.solver)

    # --- the memory plan ------------------------------------------------------------------------
    def plan(self, n_test=1, *, solver=None, fitting=False):
        """How ``memory_budget`` splits the work (:func:`influence.memory.plan_memory`) for ``n_test`` test
        images: without ``solver``, before any fit (only ``chunk`` is meaningful); with the fitted solver,
        the scoring groups (``vectors``), ``score_batch`` and ``chunk``; ``fitting``: the fit's chunk.
        -> :class:`influence.memory.MemoryPlan`."""
        from influence.memory import Budget, plan_memory

        return plan_memory(self.clf, Budget(self.memory_budget, self.score_batch), n_test, solver, fitting=fitting)

    # --- curvature ------------------------------------------------------------------------------
    def fit(self, before_fit=None):
        """Fit the solver's curvature on the training set (or load it from ``cache``); returns self.

        A solver whose fit holds large state (K-FAC/EK-FAC: ``fit_bytes``) fits in chunks of what the
        fit leaves of ``memory_budget``. ``before_fit(solver)``: called before a fit (not before a cache
        load).
        """
        if self._fitted:
            return self
        solver = self.solver

        def fit():
            if getattr(solver, "fit_bytes", None) is not None and not self._chunk_given:
                self.objective.chunk = self.plan(solver=solver, fitting=True).chunk
                log.info("%s fit: %.2f GB of the %g GB memory budget held at its peak; %d training image(s) per "
                         "chunk", solver.name, solver.fit_bytes / 2**30, self.memory_budget, self.objective.chunk)
            if before_fit is not None:
                before_fit(solver)
            self.backend.fit(solver, self.train, chunk=self.objective.chunk, key=self.curvature_key)

        if self.cache is not None:
            from influence.curvature.cache import CurvatureCache

            self.loaded = CurvatureCache(self.cache).load_or_fit(solver, self.curvature_key, fit)
        else:
            fit()
        self._fitted = True
        return self

    def prepare(self, n_test):
        """Ready to score ``n_test`` test images: fitted (or loaded), the solver compacted to what solving
        needs, the plan of the scoring groups taken (``chunk`` of the HVPs set from it) -> the
        :class:`influence.memory.MemoryPlan` that :meth:`score_groups` follows."""
        self.fit()
        self.solver.compact()
        plan = self.plan(n_test, solver=self.solver)
        if not self._chunk_given:
            self.objective.chunk = plan.chunk
        log.info("scoring %d test image(s) in %d group(s) of at most %d (memory budget %g GB); %d training images "
                 "per scoring step", n_test, -(-n_test // plan.vectors), plan.vectors, self.memory_budget,
                 plan.score_batch)
        return plan

    # --- scores ---------------------------------------------------------------------------------
    def score_groups(self, images, labels, ids=None, *, plan=None, work=None, timings=None):
        """Score test images group by group under ``memory_budget``: yields a :class:`Scored` (``start``,
        ``stop``: the rows of ``images``; ``shares``: float32 (stop - start, N, L)) per group.

        The one scoring loop of the package: :meth:`scores` collects it, calculate.py's job writes each
        group's files as it comes. A group holds at most ``plan.vectors`` inverse-HVPs (:meth:`prepare`):
        its test gradients, inverse-HVPs, then ONE pass over the training set.

        Args:
          images: (T, H, W, C) uint8 or float images (read as the training images are:
            :mod:`influence.data.arrays`; arrays are checked before any fit), or any object with ``len`` whose
            slices ``images[a:b]`` are such arrays (read a group at a time);
          labels: (T,) classes (the label the loss is taken with);
          ids: one hashable tuple/str/int per test image, naming it for the solvers that draw random
            numbers (LiSSA seeds each vector's stream by ``seed`` and its id): the same image with the
            same id gives the same numbers, whatever else is scored with it. Default ``("api", t)``;
            calculate.py's are ``(folder, label, n)``.
          plan: the plan of :meth:`prepare` (default: prepared here); work: ``work(start, stop)`` ->
            :class:`influence.backends.Work` of a group (a backend that resumes); timings:
            ``timings(phase, seconds)`` (``test_gradients_s``, ``inverse_hvp_s``, ``scoring_s``).
        """
        import time

        if isinstance(images, (np.ndarray, list, tuple)):   # arrays: checked and converted before any fit
            images, y_all = self._test_arrays(images, labels)
        else:
            y_all = self._labels(labels, len(images))
        ids = [("api", t) for t in range(len(y_all))] if ids is None else list(ids)
        if len(ids) != len(y_all):
            raise UserError(f"ids: {len(ids)} for {len(y_all)} images")
        plan = plan if plan is not None else self.prepare(len(y_all))
        clock = time.perf_counter
        note = timings or (lambda phase, seconds: None)
        for start in range(0, len(y_all), plan.vectors):
            stop = min(start + plan.vectors, len(y_all))
            t0 = clock()
            x, y = self._test_arrays(images[start:stop], y_all[start:stop])
            grads = self._gradients(x, y)
            t1 = clock()
            note("test_gradients_s", t1 - t0)
            stacked = self.solver.solve_stacked(grads, ids=ids[start:stop])
            del grads
            t2 = clock()
            note("inverse_hvp_s", t2 - t1)
            shares = self.score_stacked(stacked, work=None if work is None else work(start, stop),
                                        desc=f"scoring {stop - start} test image(s)", score_batch=plan.score_batch)
            del stacked
            note("scoring_s", clock() - t2)
            yield Scored(start, stop, shares)

    def scores(self, images, labels, per_layer=False, ids=None):
        """Influence of every training image on each test image.

        Args:
          images: (T, H, W, C) test images of the training set's size: uint8 pixels, or float -- with float
            training images and preprocess ``none``, the model's input as it is (any finite values, cast to
            the model's dtype); otherwise pixel levels as ``preprocess`` says (``unit``: ``k / 255``; else
            whole numbers 0..255; :mod:`influence.data.arrays`); labels: (T,) their classes (the label the
            loss is taken with: the true one, or the prediction to explain).
          per_layer: also split each score by layer.
          ids: names of the test images for stochastic solvers (:meth:`score_groups`).

        Scored in groups under ``memory_budget`` (:meth:`score_groups`, the loop calculate.py runs):
        at most a group's inverse-HVPs are held at once.

        Returns:
          float32 (T, N) in training-set order; with ``per_layer``, (T, N, L) and the layer names.
        """
        if np.asarray(images).ndim == 3:
            images = np.asarray(images)[None]
        parts = [g.shares for g in self.score_groups(images, labels, ids)]
        width = len(self.layer_names)
        shares = np.concatenate(parts) if parts else np.zeros((0, len(self.train), width), np.float32)
        if per_layer:
            return shares, self.layer_names
        return shares.sum(axis=2)

    def predict(self, images, batch=256):
        """Class probabilities (T, classes) of ``images`` (uint8 or float, as :meth:`scores`), ``batch`` at a time."""
        x = self._images(images)
        return np.concatenate([np.zeros((0, self.clf.num_classes))] +
                              [self.derivs.predict(x[s:s + batch]).numpy() for s in range(0, len(x), batch)])

    def test_gradients(self, images, labels):
        """``∇L(z_t)`` of each test image (a list of T Vecs), one image per call (``calibrate`` scores its
        grid from them)."""
        return self._gradients(*self._test_arrays(images, labels))

    def _gradients(self, x, y):
        return [self.derivs.gradient(x[t:t + 1], y[t:t + 1]) for t in range(len(y))]

    def score_stacked(self, stacked, *, work=None, desc="scoring", score_batch=None):
        """Shares float32 (T, N, L) of every training image against stacked inverse-HVPs, on the backend
        (``work``: :class:`influence.backends.Work`, what is scored, for a backend that resumes)."""
        return self.backend.score(self.scorer, self.train, stacked, int(score_batch or self.score_batch),
                                  key=self.curvature_key, work=work, desc=desc)

    def top(self, scores, k=5):
        """The ``k`` most harmful (most negative) and most useful (most positive) training images of
        each row of ``scores`` (T, N) -> list of ``{"harmful": [Ranked], "useful": [Ranked]}``."""
        from influence.outputs.ranking import top_indices

        scores = np.atleast_2d(np.asarray(scores))
        cat = self.catalogue()
        out = []
        for row in scores:
            harmful, useful = top_indices(row, int(k))
            out.append({name: [Ranked(int(i), cat.keys[i], str(cat.files[i]), int(cat.labels[i]), float(row[i]))
                               for i in idx]
                        for name, idx in (("harmful", harmful), ("useful", useful))})
        return out

    def self_influence(self, limit=None, *, batch=None, vectors=None):
        """``∇L(z_i)ᵀ (H + λI)⁻¹ ∇L(z_i)`` of every training image (or the ``limit`` of highest loss)
        -> :class:`influence.scoring.self_influence.SelfInfluence` (``values``, ``indices``, ``ranking()``).

        ``batch``: training images per step (default ``score_batch``); ``vectors``: inverse-HVPs held at
        once on the one-per-image route."""
        from influence.scoring.self_influence import self_influence

        if self._fitted and not self.solver.self_influence_ready():
            # scoring compacted the fit to what solving needs; self-influence needs the whole of it
            log.info("self-influence: the %s curvature again (scoring compacted it)", self.solver_name)
            self._solver, self._fitted = None, False
        self.fit()
        return self_influence(self.solver, self.derivs, self.train, batch=batch or self.score_batch, limit=limit,
                              vectors=vectors, progress=self.progress)

    # --- calibration (influence.calibration) ---------------------------------------------------------
    def with_solver(self, solver, damping=None, **options):
        """An Influence on the same model, training set, curvature cache and memory budget with another
        registered ``solver`` and ``damping`` (default: this one's); the solver options are this one's updated
        by ``options``. Nothing is reloaded; its fit is its own (loaded from the cache when there), in this
        process (no Ray backend)."""
        import copy

        from influence.curvature import REGISTRY

        if solver not in REGISTRY:
            raise SettingError("solver", f"must be one of {', '.join(REGISTRY)}, got {solver!r}")
        _check_options([solver], options, repr(solver))
        other = copy.copy(self)
        fields = {k: v for k, v in options.items() if k in NAMES}
        other.settings = dataclasses.replace(self.settings, damping=self.settings.damping if damping is None
                                             else damping, **fields)
        other._extra = {**self._extra, **{k: v for k, v in options.items() if k not in NAMES}}
        other._set_solver(solver, self.progress, given=())
        other._fitted, other.loaded, other._key = False, False, None
        other.backend = _local()
        return other

    def calibrate(self, test_images, test_labels, train_fn=None, subsets=16, seeds=2, epochs="auto",
                  batch_size=32, solvers=None, dampings=None, cache=None):
        """How far the scores can be trusted on this model: the LDS of a (solver, damping) grid against the
        model retrained from scratch on ``subsets`` random half-subsets of the training set (``seeds`` seeds
        each; 2 measure the noise ceiling) -> :class:`influence.calibration.Calibration` (``rows``, ``best``,
        ``ceiling``, ``verdict()``, ``table()``). ``train_fn(x, y) -> model`` trains one model (default: a
        fresh clone of the model compiled from its own compile config, ``epochs`` x ``batch_size``);
        ``cache``: a folder for the retrainings (default: this object's ``cache``; None: not kept).
        See :func:`influence.calibration.calibrate`."""
        from influence.calibration import calibrate

        return calibrate(self, test_images, test_labels, train_fn=train_fn, subsets=subsets, seeds=seeds,
                         epochs=epochs, batch_size=batch_size, solvers=solvers, dampings=dampings,
                         cache=self.cache if cache is None else cache)

    def close(self):
        """Shut down what the backend started (a Ray runtime it owns); also ``with Influence(...) as inf:``."""
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def catalogue(self):
        """The training images' keys, files and labels (:class:`influence.catalogue.TrainCatalogue`)."""
        if self._catalogue is None:
            from influence.catalogue import TrainCatalogue

            self._catalogue = TrainCatalogue.of(self.train)
        return self._catalogue

    # --- helpers --------------------------------------------------------------------------------
    @property
    def _unit(self):
        return self.preprocess == "unit"

    def _labels(self, labels, n):
        y = np.asarray(labels).reshape(-1)
        if len(y) and not np.issubdtype(y.dtype, np.integer):
            raise UserError(f"labels must be integer class indices, got {y.dtype}")
        y = y.astype(np.int64)
        if len(y) != n:
            raise UserError(f"labels: {len(y)} for {n} images")
        k = self.clf.num_classes
        if len(y) and (y.min() < 0 or y.max() >= k):
            raise UserError(f"labels must be class indices 0..{k - 1}, got {int(y.min())}..{int(y.max())}")
        return y

    def _images(self, images):
        """Test images as the derivatives take them (:func:`influence.data.arrays.user_images`)."""
        from influence.data.arrays import user_images

        try:
            return user_images(images, self._float_dtype, self._unit, "images")
        except UserError as exc:
            if self._float_dtype is not None or not self.clf.takes_float_input:
                raise
            raise UserError(f"{exc}; the training images are integer pixels, so test images are read as pixels "
                            f"too: give float training images to score float input as the model's") from None

    def _test_arrays(self, images, labels):
        x = np.asarray(images)
        if x.ndim == 3:
            x = x[None]
        want = tuple(self.train.image_shape)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise UserError(f"images must be (T, {', '.join(map(str, want))}) like the training images, "
                            f"got {x.shape}")
        x = self._images(x)
        return x, self._labels(labels, len(x))


@dataclass
class Scored:
    """One group of :meth:`Influence.score_groups`: test images ``start:stop`` and their float32 shares
    (stop - start, N, L)."""

    start: int
    stop: int
    shares: np.ndarray


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
