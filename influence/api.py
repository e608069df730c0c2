"""The Python face of the package: influence scores as arrays, for notebooks and scripts.

    import influence
    inf = influence.Influence("demo/model.keras", train="demo/train.npz", solver="ekfac", preprocess="unit")
    scores = inf.scores(images, labels)        # float32 (tests, train): positive = useful, negative = harmful
    inf.top(scores, k=5)                       # the most harmful / useful training images of each test image
    inf.self_influence()                       # which training images look mislabelled

The same numbers as ``calculate.py`` with the same settings (docs/DESIGN.md, "What is computed"):
``score[t, i] = ∇L(z_t)ᵀ (H + λI)⁻¹ ∇L(z_i)``. The curvature is fitted on the first call that needs
it (or :meth:`Influence.fit`), and kept in ``cache`` (a folder, the same cache calculate.py uses) when
one is given. Errors are :class:`influence.errors.UserError` with one line naming the setting.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from influence.errors import UserError


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
      model: a ``.keras``/``.h5`` file, a ``keras.applications`` name (``"vgg16"``), or a Keras model
        object (a final softmax is stripped in memory; a mixed-precision model computes in float32).
      train: a training archive written by ``prepare_data.py`` (path) or a ``TrainArchive``.
      solver: a registered method (``influence.curvature.REGISTRY``): ekfac, kfac, cg, pcg, lissa, exact.
      damping: λ, or ``"auto"`` / ``"0.3x"`` (relative to each layer's eigenvalues; kfac, ekfac).
      hessian: ``"full"`` or ``"ggn"`` (exact, cg, lissa, pcg).
      preprocess: ``auto``, ``none``, ``caffe``, ``tf``, ``torch``, ``unit`` (x/255) -- what the model expects.
      params: ``all``, ``last:N`` or layer names: the parameters the influence is taken over.
      weights: for a ``keras.applications`` name: ``imagenet``, a file, or ``none``.
      cache: a folder for the fitted curvature (reused while model, archive and settings agree).
      score_batch: training images per scoring step; chunk: training images per HVP / fitting step.
      progress: show progress bars.
      **options: the solver's own settings (``iter``, ``bsize``, ``cg_tol``, ``fisher``, ``seed``, ...);
        an option the solver does not take is refused, named.
    """

    def __init__(self, model, train, *, solver="ekfac", damping=0.01, hessian="full", preprocess="auto",
                 params="all", weights="imagenet", cache=None, score_batch=256, chunk=256, progress=True,
                 **options):
        from influence.curvature import REGISTRY, make_solver, solver_options
        from influence.data.archives import TrainArchive
        from influence.model.hvp import HESSIANS, Derivatives, TrainingObjective
        from influence.scoring import Scorer

        if solver not in REGISTRY:
            raise UserError(f"solver must be one of {', '.join(REGISTRY)}, got {solver!r}")
        if hessian not in HESSIANS:
            raise UserError(f"hessian must be one of {', '.join(HESSIANS)}, got {hessian!r}")
        accepted = solver_options(REGISTRY[solver])
        unknown = sorted(set(options) - accepted)
        if unknown:
            raise UserError(f"solver {solver!r} takes no option {', '.join(unknown)}; it takes: "
                            f"{', '.join(sorted(accepted))}")
        if int(score_batch) < 1 or int(chunk) < 1:
            raise UserError(f"score_batch and chunk must be at least 1, got {score_batch} and {chunk}")
        self.train = train if isinstance(train, TrainArchive) else TrainArchive(Path(train))
        self.model_name = model if isinstance(model, (str, Path)) else getattr(model, "name", "model")
        self.preprocess = preprocess
        self.clf = _classifier(model, weights, preprocess, params)
        self.derivs = Derivatives(self.clf, self.train.image_shape)
        self.objective = TrainingObjective(self.derivs, self.train, chunk=int(chunk), hessian=hessian)
        self.solver = make_solver(solver, self.objective, damping, progress=progress, **options)
        self.scorer = Scorer(self.derivs)
        self.score_batch = int(score_batch)
        self.progress = progress
        self.cache = None if cache is None else Path(cache)
        self._fitted = False
        self._keys = None

    # --- curvature ------------------------------------------------------------------------------
    def fit(self):
        """Fit the solver's curvature on the training set (or load it from ``cache``); returns self."""
        if self._fitted:
            return self
        if self.cache is not None:
            from influence.curvature.cache import CurvatureCache, curvature_key

            key = curvature_key(self.clf, self.train, model=self.model_name, preprocess=self.preprocess,
                                solver=self.solver)
            CurvatureCache(self.cache).load_or_fit(self.solver, key)
        else:
            self.solver.fit()
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
        from influence.engine import score_archive

        x, y = self._test_arrays(images, labels)
        self.fit()
        grads = [self.derivs.gradient(x[t:t + 1], y[t:t + 1]) for t in range(len(y))]
        stacked = self.solver.solve_stacked(grads, ids=[("api", t) for t in range(len(y))])
        shares = score_archive(self.scorer, self.train, stacked, self.score_batch)
        if per_layer:
            return shares, list(self.scorer.layer_names if self.scorer.split else ["all"])
        return shares.sum(axis=2)

    def top(self, scores, k=5):
        """The ``k`` most harmful (most negative) and most useful (most positive) training images of
        each row of ``scores`` (T, N) -> list of ``{"harmful": [Ranked], "useful": [Ranked]}``."""
        from influence.outputs.report import top_indices

        scores = np.atleast_2d(np.asarray(scores))
        keys, files, labels = self._catalogue()
        out = []
        for row in scores:
            harmful, useful = top_indices(row, int(k))
            out.append({name: [Ranked(int(i), keys[i], str(files[i]), int(labels[i]), float(row[i])) for i in idx]
                        for name, idx in (("harmful", harmful), ("useful", useful))})
        return out

    def self_influence(self, limit=None):
        """``∇L(z_i)ᵀ (H + λI)⁻¹ ∇L(z_i)`` of every training image (or the ``limit`` of highest loss)
        -> :class:`influence.scoring.self_influence.SelfInfluence` (``values``, ``indices``, ``ranking()``)."""
        from influence.scoring.self_influence import self_influence

        self.fit()
        return self_influence(self.solver, self.derivs, self.train, batch=self.score_batch, limit=limit,
                              progress=self.progress)

    # --- helpers --------------------------------------------------------------------------------
    def _catalogue(self):
        if self._keys is None:
            self._keys = ([k for b in self.train.batches for k in self.train.keys(b)], self.train.files(),
                          self.train.labels())
        return self._keys

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


def _classifier(model, weights, preprocess, params):
    """A :class:`influence.model.models.Classifier` from a path/name or a Keras model object."""
    from influence.model import models

    if isinstance(model, (str, Path)):
        return models.load_classifier(str(model), weights, preprocess, params)
    model, _ = models.at_least_float32(model)
    model, note = models.strip_softmax(model)
    mode = "none" if preprocess == "auto" else preprocess
    clf = models.Classifier(model, models.make_preprocess(mode), models.select_params(model, params),
                            description=f"{model.name} ({note})")
    models.check_classifier(clf)
    return clf
