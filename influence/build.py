"""One builder of what scores, for the driver and a Ray worker alike: the classifier (from a file, a
``keras.applications`` name or a model object), the training set as the derivatives read it, and from
them the derivatives and the training objective (:func:`build`), on which a solver is made
(:func:`influence.curvature.make_solver`).

:class:`influence.Influence` builds with it in the driver, and a Ray worker
(:func:`influence.backends.ray_worker.context`) from its :class:`~influence.backends.ray_worker.WorkerSpec`,
so both hold the same objects made the same way.
"""
import dataclasses
from pathlib import Path

from influence.errors import UserError
from influence.settings import DEFAULTS


@dataclasses.dataclass
class Built:
    """What :func:`build` makes: the classifier, the training set, the derivatives and the objective."""

    clf: object
    train: object
    derivs: object
    objective: object


def build(clf, train, *, hessian, chunk):
    """The derivatives of ``clf`` on ``train``'s images (float input when the training set is float:
    preprocess ``none``) and the objective over ``train`` in ``hessian``'s matrix, ``chunk`` images per
    call -> :class:`Built`."""
    from influence.model.derivatives import Derivatives
    from influence.model.objective import TrainingObjective

    derivs = Derivatives(clf, train.image_shape, float_input=getattr(train, "float_dtype", None) is not None)
    return Built(clf, train, derivs, TrainingObjective(derivs, train, chunk=max(1, int(chunk)), hessian=hessian))


def load(model, train, settings, check=None):
    """The classifier of ``model`` and the training set as the derivatives read it (``weights``,
    ``preprocess``, ``params`` of ``settings``), checked -> ``(clf, train)``: ``check(clf)`` when given
    (calculate.py's check of the model against its archives, ``engine.check_compatible``: the same check of
    the training set naming ``data``, and the test folders), else the training set against the model
    (:func:`influence.model.models.check_training_set`, naming ``train``)."""
    clf = classifier(model, settings.weights, settings.preprocess, settings.params)
    train = train_data(train, settings.preprocess, clf)
    if check is not None:
        check(clf)
    else:
        from influence.model.models import check_training_set

        check_training_set(clf, train, "train")
    return clf, train


def classifier(model, weights=DEFAULTS["weights"], preprocess=DEFAULTS["preprocess"], params=DEFAULTS["params"]):
    """A :class:`influence.model.models.Classifier` from a path/name or a Keras model object."""
    from influence.model import models

    if isinstance(model, (str, Path)):
        return models.load_classifier(str(model), weights, preprocess, params)
    if isinstance(model, models.Classifier):
        return model
    source = model
    model, _ = models.at_least_float32(model)
    model, note = models.strip_softmax(model)
    mode = "none" if preprocess == "auto" else preprocess
    clf = models.Classifier(model, models.make_preprocess(mode), models.select_params(model, params),
                            description=f"{model.name} ({note})", mode=mode)
    clf.source = source         # the user's object: damping optimizer reads its optimizer state there
    models.check_classifier(clf)
    return clf


def train_data(train, preprocess=DEFAULTS["preprocess"], classifier=None):
    """What :class:`influence.Influence` reads the training set through: a ``TrainArchive`` as it is (uint8); a path:
    the archive there; ``(x, y)`` arrays: an :class:`influence.data.arrays.ArrayTrainSet`; any object of
    the batch protocol (``len(data)`` batches, ``data[b] -> (x, y)``, e.g. a ``keras.utils.PyDataset``)
    adapted by :class:`influence.data.arrays.TrainSet` (float images read by ``preprocess``: as the model's
    input, in its dtype, when the loaded ``classifier`` takes float input -- preprocess ``none`` -- and the
    first batch is float; else as pixel levels)."""
    from influence.data.archive_reader import TrainArchive
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
