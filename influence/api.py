"""The Python face of the package: influence scores as arrays, for notebooks and scripts.

    import influence
    inf = influence.Influence("demo/model.keras", train="demo/train.npz", preprocess="unit")
    scores = inf.scores(images, labels)        # float32 (tests, train): positive = useful, negative = harmful
    inf.top(scores, k=5)                       # the most harmful / useful training images of each test image
    inf.self_influence()                       # which training images look mislabelled

The same numbers as ``calculate.py`` with the same settings (docs/DESIGN.md, "What is computed"):
``score[t, i] = ∇L(z_t)ᵀ (H + λI)⁻¹ ∇L(z_i)``. The curvature is fitted on the first call that needs
it (or :meth:`Influence.fit`), and kept in ``cache`` (a folder, the same cache calculate.py uses) when
one is given. Errors are :class:`influence.errors.UserError` with one line naming the setting.
"""
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from influence.errors import SettingError, UserError
from influence.settings import DEFAULTS, SOLVER_OPTIONS, check_setting, parse_setting

log = logging.getLogger(__name__)

#: the settings of a calculate run that are solver options (each solver takes those it knows): derived
#: from the fields' metadata (:data:`influence.settings.SOLVER_OPTIONS`)
SOLVER_SETTINGS = SOLVER_OPTIONS


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
      train: a training archive written by ``prepare_data.py`` (path) or a ``TrainArchive``.
      solver: ``"auto"`` (default: :mod:`influence.curvature.choice`: lissa when ``iter``, ``bsize``, ``scale``
        or ``repeats`` is passed, else krylov when ``memory_budget`` holds its basis over the model's
        parameters, else ekfac; :attr:`solver_name` and :attr:`solver_choice` say which and why) or a
        registered method (``influence.curvature.REGISTRY``): ekfac, kfac, cg, pcg, lissa, exact, krylov, dpcg.
      damping: λ, or ``"auto"`` / ``"0.3x"``: relative to the curvature's scale (each layer's mean
        eigenvalue for kfac/ekfac, the mean eigenvalue trace(H)/P for the Hessian methods). Default
        ``"auto"`` (0.1x), chosen by the LDS panel (README, "Is it right?").
      hessian: ``"ggn"`` (default: the Gauss-Newton matrix, positive semi-definite) or ``"full"`` (the
        Hessian, as Koh & Liang) for exact, cg, lissa, pcg; kfac/ekfac fit the Fisher either way.
      preprocess: ``auto``, ``none``, ``caffe``, ``tf``, ``torch``, ``unit`` (x/255) -- what the model expects.
      params: ``all``, ``last:N`` or layer names: the parameters the influence is taken over.
      weights: for a ``keras.applications`` name: ``imagenet``, a file, or ``none``.
      cache: a folder for the fitted curvature (reused while model, archive and settings agree).
      score_batch: training images per scoring step; chunk: training images per HVP / fitting step.
      progress: show progress bars.
      backend: where the training-set passes run (:mod:`influence.backends`): None for this process,
        or a backend object (``influence.distributed.RayBackend(settings)``).
      **options: the solver's own settings (``iter``, ``bsize``, ``cg_tol``, ``fisher``, ``seed``, ``rank``,
        ``memory_budget``, ...); an option the solver does not take is refused, named.

    :meth:`from_settings` builds one from a calculate run's :class:`influence.settings.Settings` (the
    calculate job is a client of this class). The defaults of the settings calculate.py has too are its
    (:data:`influence.settings.DEFAULTS`); a solver option not given takes the solver's own default, which
    is calculate.py's as well (tests/test_settings.py).
    """

    def __init__(self, model, train, *, solver=DEFAULTS["solver"], damping=DEFAULTS["damping"],
                 hessian=DEFAULTS["hessian"], preprocess=DEFAULTS["preprocess"], params=DEFAULTS["params"],
                 weights=DEFAULTS["weights"], cache=DEFAULTS["cache"], score_batch=DEFAULTS["score_batch"], chunk=256,
                 progress=True, backend=None, **options):
        from influence.curvature.choice import AUTO, CANDIDATES, solver_choices

        if solver not in solver_choices():
            raise SettingError("solver", f"must be one of {', '.join(solver_choices())}, got {solver!r}")
        check_setting("hessian", hessian)
        damping = parse_setting("damping", damping)        # once: the solver takes the parsed value
        if solver == AUTO:                                   # before the model loads: a typo fails at once
            _check_options(CANDIDATES, options, f"'auto' ({', '.join(CANDIDATES)})")
        else:
            _check_options([solver], options, repr(solver))
        if int(score_batch) < 1 or int(chunk) < 1:
            raise UserError(f"score_batch and chunk must be at least 1, got {score_batch} and {chunk}")
        name = model if isinstance(model, (str, Path)) else getattr(model, "name", "model")
        train = _train_archive(train)
        self._setup(_classifier(model, weights, preprocess, params), train, name, preprocess, hessian, chunk)
        self._set_solver(solver, damping, options, progress, given=options)
        if solver == AUTO:
            _check_options([self.solver_name], options, f"{self.solver_name!r} ({self.solver_choice})")
        self.cache = None if cache is None else Path(cache)
        self.score_batch = int(score_batch)
        self.backend = backend if backend is not None else _local()
        self.solver                       # built now: a setting the solver refuses is an error here

    @classmethod
    def from_settings(cls, settings, train=None, *, check=None, given=()):
        """An Influence with the settings of a calculate run (:class:`influence.settings.Settings`).

        The model is ``settings.model`` (``weights``, ``preprocess``, ``params``); ``train`` (default:
        ``<data>/train.npz``); the solver (``auto`` resolved on the loaded model, :attr:`solver_name`)
        gets every option of the settings it takes, and is built on first use (:attr:`solver`); the cache
        is ``settings.cache`` or ``<out>/curvature``; the backend is Ray with ``workers`` /
        ``ray_address``, else this process. ``check(classifier)`` runs on the loaded model before anything
        is built on it. ``given``: names of the settings given explicitly (calculate.py's flags,
        :func:`influence.settings.given_settings`), which ``solver auto`` reads.
        """
        from influence.backends import backend_for
        from influence.model.models import load_classifier

        clf = load_classifier(settings.model, settings.weights, settings.preprocess, settings.params)
        train = _train_archive(train if train is not None else Path(settings.data) / "train.npz")
        if check is not None:
            check(clf)
        self = cls.__new__(cls)
        self._setup(clf, train, settings.model, settings.preprocess, settings.hessian, 256)
        options = settings.solver_options()
        self._set_solver(settings.solver, settings.damping, options, True, given=given)
        self.cache = Path(settings.cache or Path(settings.out) / "curvature")
        self.score_batch = int(settings.score_batch)
        self.backend = backend_for(replace(settings, solver=self.solver_name))
        return self

    def _setup(self, clf, train, model_name, preprocess, hessian, chunk):
        from influence.model.hvp import Derivatives, TrainingObjective
        from influence.scoring import Scorer

        self.train, self.clf, self.model_name, self.preprocess = train, clf, model_name, preprocess
        self.derivs = Derivatives(self.clf, self.train.image_shape)
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

    # --- curvature ------------------------------------------------------------------------------
    def fit(self, before_fit=None):
        """Fit the solver's curvature on the training set (or load it from ``cache``); returns self.

        ``before_fit(solver)``: called before a fit (not before a cache load), e.g. to set the chunk.
        """
        if self._fitted:
            return self
        solver = self.solver

        def fit():
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

    # --- scores ---------------------------------------------------------------------------------
    def scores(self, images, labels, per_layer=False):
        """Influence of every training image on each test image.

        Args:
          images: uint8 (T, H, W, C) test images, the archives' size; labels: (T,) their classes (the
            label the loss is taken with: the true one, or the prediction to explain).
          per_layer: also split each score by layer.

        Returns:
          float32 (T, N) in training-archive order; with ``per_layer``, (T, N, L) and the layer names.
        """
        x, y = self._test_arrays(images, labels)
        self.fit()
        grads = self._gradients(x, y)
        stacked = self.inverse_hvps(grads, ids=[("api", t) for t in range(len(grads))])
        shares = self.score_stacked(stacked)
        if per_layer:
            return shares, self.layer_names
        return shares.sum(axis=2)

    def predict(self, images, batch=256):
        """Class probabilities (T, classes) of uint8 ``images``, ``batch`` at a time."""
        x = np.asarray(images)
        return np.concatenate([np.zeros((0, self.clf.num_classes))] +
                              [self.derivs.predict(x[s:s + batch]).numpy() for s in range(0, len(x), batch)])

    def test_gradients(self, images, labels):
        """``∇L(z_t)`` of each test image (a list of T Vecs), one image per call."""
        return self._gradients(*self._test_arrays(images, labels))

    def _gradients(self, x, y):
        return [self.derivs.gradient(x[t:t + 1], y[t:t + 1]) for t in range(len(y))]

    def inverse_hvps(self, grads, ids):
        """``(H + λI)⁻¹ ∇L(z_t)`` of each gradient, stacked (a Vec with leading axis T); ``ids`` name the
        vectors (LiSSA seeds its stream by them). Fits first."""
        self.fit()
        return self.solver.solve_stacked(grads, ids=ids)

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

        self.fit()
        return self_influence(self.solver, self.derivs, self.train, batch=batch or self.score_batch, limit=limit,
                              vectors=vectors, progress=self.progress)

    def catalogue(self):
        """The training images' keys, files and labels (:class:`influence.catalogue.TrainCatalogue`)."""
        if self._catalogue is None:
            from influence.catalogue import TrainCatalogue

            self._catalogue = TrainCatalogue.of(self.train)
        return self._catalogue

    # --- helpers --------------------------------------------------------------------------------
    def _test_arrays(self, images, labels):
        x = np.asarray(images)
        y = np.asarray(labels).reshape(-1).astype(np.int64)
        if x.ndim == 3:
            x = x[None]
        want = tuple(self.train.image_shape)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise UserError(f"images must be (T, {', '.join(map(str, want))}) like the training archive, "
                            f"got {x.shape}")
        if x.dtype != np.uint8:
            raise UserError(f"images must be uint8 pixels 0..255 (as the archives hold), got {x.dtype}")
        if len(y) != len(x):
            raise UserError(f"labels: {len(y)} for {len(x)} images")
        k = self.clf.num_classes
        if len(y) and (y.min() < 0 or y.max() >= k):
            raise UserError(f"labels must be class indices 0..{k - 1}, got {int(y.min())}..{int(y.max())}")
        return x, y


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


def _train_archive(train):
    from influence.data.archives import TrainArchive

    return train if isinstance(train, TrainArchive) else TrainArchive(Path(train))


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
                            description=f"{model.name} ({note})")
    models.check_classifier(clf)
    return clf
