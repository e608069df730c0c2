"""How the model was trained, read from its optimizer's saved state: the per-parameter damping of
``--damping optimizer`` (docs/DESIGN.md, "Damping from the training run").

A model trained for ``T`` steps of size ``η`` has moved along a direction of curvature ``σ`` by about
``(1 − (1 − ησ)^T)/σ`` per unit of gradient, not ``1/σ``: directions flatter than ``1/(ηT)`` were never
traversed, and inverting them fully over-predicts how retraining responds. The response is that of
``(H + D)⁻¹`` with ``D = 1/(ηT)``. With Adam (and RMSprop) each parameter ``j`` takes steps of size
``η / (√v̂_j + ε)``, so ``D_j = (√v̂_j + ε) / Σ_t η_t``: the second moments ``v`` the optimizer kept, bias
corrected (``v̂ = v / (1 − β₂^T)``, Adam), and the learning rates summed over the ``T`` steps (a schedule
summed step by step). With SGD ``D_j = (1 − momentum) / Σ_t η_t`` for every parameter.

All of it comes from the ``.keras`` file the user scores (its optimizer variables: ``iterations``, the
learning rate, the slots), or from the optimizer of a Keras model object given from Python. A model saved
without a trained optimizer has no such state: :func:`response_diagonal` raises a one-line error naming
``damping``.
"""
import dataclasses
import logging
import os

import numpy as np

from influence.errors import SettingError

log = logging.getLogger(__name__)

#: optimizers whose per-parameter step size the diagonal models: second-moment slots, bias-corrected or not
SECOND_MOMENT = {"Adam": True, "AdamW": True, "RMSprop": False}
PLAIN = ("SGD",)


class NoTrainingState(SettingError):
    """SettingError naming ``damping``, with ``short``: why, in a few words (``damping auto``'s log line)."""

    def __init__(self, short, message):
        super().__init__("damping", message)
        self.short = short


@dataclasses.dataclass(frozen=True)
class ResponseDiagonal:
    """``diagonal`` float64 ``(P,)`` over the selected parameters (``classifier.variables`` order) and the facts
    it was read from (``optimizer``, ``steps``, ``lr_sum``: Σ_t η_t, ``mean``, ``median``)."""

    diagonal: np.ndarray
    facts: dict

    def fingerprint(self):
        """16 hex digits of the diagonal's bytes (what a fitted state keyed on it depends on)."""
        import hashlib

        return hashlib.sha256(np.ascontiguousarray(self.diagonal, np.float64).tobytes()).hexdigest()[:16]


def _trained_optimizer(source):
    """The optimizer, with its variables, of a ``.keras`` file path or a Keras model object; None when there
    is none (a ``keras.applications`` name, a file saved uncompiled)."""
    import keras

    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source) or os.path.splitext(str(source))[1].lower() != ".keras":
            return None, None
        try:
            model = keras.models.load_model(source, compile=True)
        except Exception as exc:                      # Keras raises many kinds; the caller says it in one line
            log.info("damping optimizer: could not load the optimizer of %s (%s)", source, str(exc).splitlines()[0])
            return None, None
    else:
        model = source
    opt = getattr(model, "optimizer", None)
    if opt is None or not getattr(opt, "built", False):
        return None, model
    return opt, model


def _lr_sum(opt, steps):
    """Σ_t η_t over the ``steps`` the optimizer took (a schedule evaluated at every step)."""
    import keras

    from influence.model import keras_private

    lr = keras_private.learning_rate(opt)
    if isinstance(lr, keras.optimizers.schedules.LearningRateSchedule):
        return float(np.sum(np.asarray(lr(np.arange(steps, dtype=np.int64)), np.float64)))
    return float(np.asarray(lr, np.float64)) * steps


def response_diagonal(clf, factor=1.0):
    """``factor × D`` (module docstring) over ``clf.variables`` -> :class:`ResponseDiagonal`.

    ``clf.source`` is where the model came from (a file path, or a Keras model object). SettingError naming
    ``damping`` when there is no trained optimizer state to read, or an optimizer the rule does not model.
    """
    from influence.model import keras_private

    kept = getattr(clf, "training_response", None)          # read once per loaded model (the file loads again)
    if kept is not None:
        return kept if factor == 1.0 else ResponseDiagonal(float(factor) * kept.diagonal,
                                                           {**kept.facts, "factor": float(factor)})
    source = getattr(clf, "source", None)
    opt, model = _trained_optimizer(source) if source is not None else (None, None)
    steps = 0 if opt is None else int(np.asarray(opt.iterations))
    if opt is None or steps == 0:
        raise NoTrainingState("the model holds no trained optimizer state",
                              f"optimizer reads the training run from the model's saved optimizer state, and "
                              f"{clf.description or 'this model'} has none (saved before training or without "
                              f"compile): give a damping (e.g. 0.1x)")
    kind = type(opt).__name__
    if kind not in SECOND_MOMENT and kind not in PLAIN:
        raise NoTrainingState(f"trained with {kind}, which the rule does not model",
                              f"optimizer models Adam, AdamW, RMSprop and SGD; the model was trained with {kind}: "
                              f"give a damping (e.g. 0.1x)")
    lr_sum = _lr_sum(opt, steps)
    variables = {v.path: v for v in model.trainable_variables}
    parts = []
    for v in clf.variables:
        trained = variables.get(v.path)
        if trained is None or tuple(trained.shape) != tuple(v.shape):
            raise NoTrainingState(f"the saved optimizer has no state for {v.path}",
                                  f"optimizer: the saved optimizer has no state for {v.path}: give a damping")
        if kind in PLAIN:
            momentum = float(getattr(opt, "momentum", 0.0) or 0.0)
            parts.append(np.full(int(np.prod(v.shape)), 1.0 - momentum))
            continue
        v_hat = np.asarray(keras_private.optimizer_slot(opt, trained, "_velocities"), np.float64).ravel()
        if SECOND_MOMENT[kind]:
            v_hat = v_hat / (1.0 - float(opt.beta_2) ** steps)
        parts.append(np.sqrt(np.maximum(v_hat, 0.0)) + float(opt.epsilon))
    diagonal = np.concatenate(parts) / lr_sum
    facts = {"optimizer": kind, "steps": steps, "lr_sum": lr_sum, "factor": 1.0,
             "mean": float(diagonal.mean()), "median": float(np.median(diagonal))}
    clf.training_response = ResponseDiagonal(diagonal, facts)
    return response_diagonal(clf, factor)


#: ``damping auto``'s factor of ``D`` (krylov, exact, store): ``sqrt(mean training loss / RESPONSE_LOSS)``, within
#: :data:`RESPONSE_BOUNDS` (:func:`response_factor`)
RESPONSE_LOSS = 0.01
RESPONSE_BOUNDS = (0.1, 3.0)
#: training images the mean loss is taken over: a fixed random sample, so the cost stays one forward pass over at
#: most this many images whatever the size of the training set
RESPONSE_SAMPLE = 2048


def response_factor(mean_loss):
    """The factor ``c`` of ``damping auto`` = ``optimizer:c`` from the model's mean training cross-entropy:
    ``sqrt(mean_loss / RESPONSE_LOSS)`` within :data:`RESPONSE_BOUNDS`, two significant digits (float).

    ``D`` counts what training left unfinished; a model trained far past fitting its training set has a
    Gauss–Newton matrix shrunk with its losses (a confident example weighs ``p(1 − p) ≈ its loss``) while the
    optimizer's second moments remember the larger gradients of the steps before, so ``D`` overstates what is
    unfinished there; a briefly trained one is unfinished indeed (and the LDS's half-subset retrainings take half
    its steps, ``2 D``). Measured on the LDS panel's seven models where krylov is the default (README, "Damping from
    the training run"): the best factor of 0.1 / 0.3 / 1 / 3 was 0.1 at a mean loss of 2e-4 (the demo CNN), 0.3–3
    (flat) at 0.007–0.009 (the two MLPs trained 40 epochs), 3 at 0.07–0.11 (the four trained a few hundred steps);
    the rule's factors 0.14, 0.95, 0.85, 2.7–3 scored within 0.004 of each model's best.
    """
    low, high = RESPONSE_BOUNDS
    c = min(high, max(low, float(np.sqrt(max(float(mean_loss), 0.0) / RESPONSE_LOSS))))
    return float(f"{c:.2g}")


def mean_training_loss(derivs, train, sample=RESPONSE_SAMPLE, batch=256, seed=0):
    """The mean cross-entropy of the model on at most ``sample`` training images (a seeded random sample, read in
    archive order), each with its own label -> float. ``derivs``: :class:`influence.model.derivatives.Derivatives`;
    ``train``: ``len`` and ``take(indices) -> (x, y)``."""
    n = len(train)
    idx = np.arange(n) if n <= sample else np.sort(np.random.default_rng(seed).choice(n, sample, replace=False))
    total = 0.0
    for start in range(0, len(idx), batch):
        x, y = train.take(idx[start:start + batch])
        total += float(np.sum(derivs.losses(x, np.asarray(y, np.int64)).numpy()))
    return total / max(len(idx), 1)
