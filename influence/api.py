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
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from influence.errors import SettingError, UserError
from influence.settings import DEFAULTS, check_setting, parse_setting

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
      **options: the solver's own settings (``iter``, ``bsize``, ``cg_tol``, ``fisher``, ``seed``, ``rank``,
        ...); an option the solver does not take is refused, named.
      given, check, all_options: for :meth:`from_settings` (the settings given explicitly, a check of the
        loaded model in place of the training set's, every solver option of a ``Settings``).

    The training images must be the model's input size and their labels its class indices
    (:func:`influence.model.models.check_training_set`, the check calculate.py runs): a one-line
    :class:`UserError` naming ``train`` otherwise.

    :meth:`from_settings` builds one from a calculate run's :class:`influence.settings.Settings` (the
    calculate job is a client of this class: it scores with :meth:`score_groups`, the loop of
    :meth:`scores`, and adds only the output folder, the lock, resuming and the files). The defaults of
    the settings calculate.py has too are its (:data:`influence.settings.DEFAULTS`); a solver option not
    given takes the solver's own default, which is calculate.py's as well (tests/test_settings.py).
    """

    def __init__(self, model, train, *, solver=DEFAULTS["solver"], damping=DEFAULTS["damping"],
                 hessian=DEFAULTS["hessian"], preprocess=DEFAULTS["preprocess"], params=DEFAULTS["params"],
                 weights=DEFAULTS["weights"], cache=DEFAULTS["cache"], score_batch=DEFAULTS["score_batch"], chunk=None,
                 memory_budget=DEFAULTS["memory_budget"], progress=True, backend=None, given=None, check=None,
                 all_options=None, **options):
        from influence.curvature.choice import AUTO, CANDIDATES, solver_choices

        if solver not in solver_choices():
            raise SettingError("solver", f"must be one of {', '.join(solver_choices())}, got {solver!r}")
        check_setting("hessian", hessian)
        damping = parse_setting("damping", damping)        # once: the solver takes the parsed value
        if solver == AUTO:                                   # before the model loads: a typo fails at once
            _check_options(CANDIDATES, options, f"'auto' ({', '.join(CANDIDATES)})")
        else:
            _check_options([solver], options, repr(solver))
        if int(score_batch) < 1 or (chunk is not None and int(chunk) < 1):
            raise UserError(f"score_batch and chunk must be at least 1, got {score_batch} and {chunk}")
        given, explicit = (options if given is None else given), dict(options)
        # all_options: a Settings' (each method takes its own); memory_budget: the plan's, and the solver's
        # when it takes it (krylov's rank, the K-FAC fit)
        options = {**(all_options or {}), **options, "memory_budget": check_setting("memory_budget", memory_budget)}
        budget = options["memory_budget"]
        name = model if isinstance(model, (str, Path)) else getattr(model, "name", "model")
        #: how a Ray worker loads the model (:meth:`worker_spec`): None for a model object
        self._model_source = ((str(model), weights, preprocess, params) if isinstance(model, (str, Path))
                              else None)
        #: the Keras model object given (None for a file or name): :meth:`calibrate` retrains it from its compile config
        self._model_object = None if isinstance(model, (str, Path)) else model
        clf = _classifier(model, weights, preprocess, params)
        train = train_data(train, preprocess, clf)
        if check is not None:
            check(clf)
        else:                           # calculate.py's check runs it with its own wording (engine)
            from influence.model.models import check_training_set

            check_training_set(clf, train, "train")
        #: GB: everything the scoring holds at once (:meth:`plan`); score_batch: training images per
        #: scoring step, at most (the plan may take fewer)
        self.memory_budget, self.score_batch = float(budget), int(score_batch)
        self._chunk_given = chunk is not None
        self._setup(clf, train, name, preprocess, hessian, chunk)
        self._set_solver(solver, damping, options, progress, given=given)
        if solver == AUTO:
            _check_options([self.solver_name], explicit, f"{self.solver_name!r} ({self.solver_choice})")
        self.cache = None if cache is None else Path(cache)
        self.solver                       # built now: a setting the solver refuses is an error here
        # after the solver: a Ray backend's worker spec (worker_spec) names the driver's solver
        self.backend = (backend(self) if callable(backend) and not hasattr(backend, "score")
                        else backend if backend is not None else _local())

    @classmethod
    def from_settings(cls, settings, train=None, *, check=None, given=()):
        """An Influence with the settings of a calculate run (:class:`influence.settings.Settings`).

        The model is ``settings.model`` (``weights``, ``preprocess``, ``params``); ``train`` (default:
        ``<data>/train.npz``); the solver (``auto`` resolved on the loaded model, :attr:`solver_name`)
        gets every option of the settings it takes, and is built on first use (:attr:`solver`); the cache
        is ``settings.cache`` or ``<out>/curvature``; the backend is Ray with ``workers`` /
        ``ray_address``, else this process. ``check(classifier)`` runs on the loaded model before anything
        is built on it. ``given``: names of the settings given explicitly (calculate.py's flags,
        :func:`influence.settings.given_settings`), which ``solver auto`` reads. The object is built by
        ``__init__`` like any other: the same checks, the same memory plan.
        """
        from influence.backends import backend_for

        return cls(settings.model, train if train is not None else Path(settings.data) / "train.npz",
                   solver=settings.solver, damping=settings.damping, hessian=settings.hessian,
                   preprocess=settings.preprocess, params=settings.params, weights=settings.weights,
                   cache=settings.cache or Path(settings.out) / "curvature", score_batch=settings.score_batch,
                   memory_budget=settings.memory_budget, progress=True, given=given, check=check,
                   all_options=settings.solver_options(),
                   backend=lambda inf: backend_for(inf, workers=settings.workers, address=settings.ray_address,
                                                   out=settings.out))

    def worker_spec(self, parts=None):
        """What a Ray worker rebuilds this object's model, derivatives, objective and solver from
        (:class:`influence.distributed.WorkerSpec`): the model file or name, weights, preprocess, params,
        hessian, the solver with its parsed damping and options (this object's own), the training
        archive's path, the fingerprints a worker checks, and ``parts``: the folder of the shard scores
        (default ``<cache>/parts``, or a folder under the system's temporary folder without a cache).
        Paths are absolute. A training set in memory, or a model object, has no path a worker could read:
        a one-line :class:`UserError`."""
        import tempfile

        from influence.data.archives import TrainArchive
        from influence.distributed import PARTS, WorkerSpec

        if not isinstance(self.train, TrainArchive):
            raise UserError(f"train: Ray needs a train.npz archive (its workers read it from disk), not a training "
                            f"set in memory ({type(self.train).__name__}): write one with prepare_data.py, or run "
                            f"without workers")
        if self._model_source is None:
            raise UserError(f"model: Ray needs a model file or keras.applications name (its workers load it), not a "
                            f"model object ({self.model_name}): save it as .keras, or run without workers")

        def absolute(value):
            return str(Path(value).resolve()) if value and Path(value).exists() else value

        model, weights, preprocess, params = self._model_source
        name, damping, options = self._solver_args
        if parts is None:
            parts = (self.cache / PARTS if self.cache is not None
                     else Path(tempfile.gettempdir()) / f"influence-{PARTS}")
        return WorkerSpec(model=absolute(model), weights=absolute(weights), preprocess=preprocess, params=params,
                          hessian=self.objective.hessian, solver=name, damping=damping,
                          options=tuple(sorted(options.items())), train=str(Path(self.train.path).resolve()),
                          train_fingerprint=self.train.fingerprint(),
                          weights_fingerprint=self.curvature_key["weights"], parts=str(Path(parts).resolve()),
                          chunk=int(self.objective.chunk))

    def _setup(self, clf, train, model_name, preprocess, hessian, chunk):
        from influence.model.derivatives import Derivatives
        from influence.model.objective import TrainingObjective
        from influence.scoring import Scorer

        self.train, self.clf, self.model_name, self.preprocess = train, clf, model_name, preprocess
        #: the float dtype test images are cast to when the training set is float input (preprocess none),
        #: else None: images are uint8 pixels (:func:`influence.data.arrays.user_images`)
        self._float_dtype = getattr(train, "float_dtype", None)
        self.derivs = Derivatives(self.clf, self.train.image_shape, float_input=self._float_dtype is not None)
        if chunk is None:                       # the memory plan's, before any solver is built
            chunk = self.plan().chunk
        self.objective = TrainingObjective(self.derivs, self.train, chunk=int(chunk), hessian=hessian)
        self.scorer = Scorer(self.derivs)
        self._fitted = False
        self._catalogue = None
        self._key = None
        #: after :meth:`fit`: True when the curvature came from the cache
        self.loaded = False

    def _set_solver(self, requested, damping, options, progress, given):
        """The method: ``requested``, or for ``auto`` the choice on the loaded model
        (:func:`influence.curvature.choice.choose_solver`, one log line) -> :attr:`solver_name`,
        :attr:`solver_choice` (why)."""
        from influence.curvature.choice import AUTO, choose_solver

        budget = options.get("memory_budget", DEFAULTS["memory_budget"])
        name, reason = choose_solver(requested, given, self.clf.num_params, self.clf.dtype.size, budget)
        if requested == AUTO:
            log.info("%s", reason)
        self.solver_name, self.solver_choice, self.progress = name, reason, progress
        self._solver = None
        self._solver_args = (name, damping, dict(options))

    @property
    def solver(self):
        """The inverse-HVP method (:mod:`influence.curvature`), built on first use."""
        if self._solver is None:
            from influence.curvature import make_solver

            name, damping, options = self._solver_args
            self._solver = make_solver(name, self.objective, damping, progress=self.progress, **options)
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

        if hasattr(solver, "attach"):          # the gradient store lives next to the cache, named by its key
            solver.attach(self.cache, self.curvature_key)
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
            if hasattr(self.solver, "store_shares"):      # the gradient store: one product, no training pass
                if work is not None:
                    work(start, stop)                     # named as every group is (the caller releases it)
                t2 = t1
                shares = self.solver.store_shares(grads)
                del grads
                note("scoring_s", clock() - t2)
                yield Scored(start, stop, shares)
                continue
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
        _, own_damping, own_options = self._solver_args
        other = copy.copy(self)
        other._set_solver(solver, parse_setting("damping", own_damping if damping is None else damping),
                          {**own_options, **options}, self.progress, given=())
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
    from influence.backends import LocalBackend

    return LocalBackend()


def train_data(train, preprocess=DEFAULTS["preprocess"], classifier=None):
    """What :class:`Influence` reads the training set through: a ``TrainArchive`` as it is (uint8); a path:
    the archive there; ``(x, y)`` arrays: an :class:`influence.data.arrays.ArrayTrainSet`; any object of
    the batch protocol (``len(data)`` batches, ``data[b] -> (x, y)``, e.g. a ``keras.utils.PyDataset``)
    adapted by :class:`influence.data.arrays.TrainSet` (float images read by ``preprocess``: as the model's
    input, in its dtype, when the loaded ``classifier`` takes float input -- preprocess ``none`` -- and the
    first batch is float; else as pixel levels)."""
    from influence.data.archives import TrainArchive
    from influence.data.arrays import ArrayTrainSet, TrainSet, is_batched

    if isinstance(train, (TrainArchive, TrainSet)):
        return train
    if isinstance(train, (str, Path)):
        return TrainArchive(Path(train))
    if isinstance(train, (tuple, list)) and len(train) == 2:
        train = ArrayTrainSet(*train)
    if is_batched(train):
        floats = classifier is not None and classifier.takes_float_input
        return TrainSet(train, preprocess == "unit", float_dtype=classifier.dtype.as_numpy_dtype if floats else None)
    raise UserError(f"train: a train.npz path, (x, y) arrays or an object with len() batches and data[b] -> (x, y); "
                    f"got {type(train).__name__}")


def _classifier(model, weights, preprocess, params):
    """A :class:`influence.model.models.Classifier` from a path/name or a Keras model object."""
    from influence.model import models

    if isinstance(model, (str, Path)):
        return models.load_classifier(str(model), weights, preprocess, params)
    if isinstance(model, models.Classifier):
        return model
    model, _ = models.at_least_float32(model)
    model, note = models.strip_softmax(model)
    mode = "none" if preprocess == "auto" else preprocess
    clf = models.Classifier(model, models.make_preprocess(mode), models.select_params(model, params),
                            description=f"{model.name} ({note})", mode=mode)
    models.check_classifier(clf)
    return clf
