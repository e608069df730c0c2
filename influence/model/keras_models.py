"""A Keras model by name: a ``keras.applications`` constructor (ImageNet, random or file weights) or a
``.keras``/``.h5`` file, with one-line errors (what :func:`influence.model.models.load_classifier` loads)."""
import logging
import os

import keras

from influence.errors import SettingError, UserError

log = logging.getLogger(__name__)

#: --weights none initialises a keras.applications model from this seed (reruns and workers agree)
RANDOM_WEIGHTS_SEED = 0


def application_names():
    """Lower-case name -> constructor for every model in ``keras.applications``."""
    apps = {}
    for name in dir(keras.applications):
        fn = getattr(keras.applications, name)
        if callable(fn) and name[:1].isupper():
            apps[name.lower()] = fn
    return apps


def _weights_hint(name):
    cache = os.path.join(os.path.expanduser("~"), ".keras", "models")
    return (
        f"could not get the ImageNet weights for {name} (no internet?): put the weights file in "
        f"{cache}/, give weights a file path (or none for random weights), "
        f"or give model a .keras file"
    )


def load_keras_model(name, weights="imagenet"):
    """Load ``name`` (a ``keras.applications`` name such as ``vgg16``, or a ``.keras``/``.h5`` path).

    ``weights``: ``imagenet`` (download, cached by Keras), ``none`` (random), or a file path.
    Returns ``(model, application_fn or None)``.
    """
    if os.path.splitext(name)[1].lower() in (".keras", ".h5", ".hdf5") or os.path.exists(name):
        if not os.path.exists(name):
            raise UserError(f"model file not found: {name}")
        try:
            model = keras.models.load_model(name, compile=False)
        except Exception as exc:  # Keras raises many kinds here; the user needs one line
            raise UserError(f"could not load model {name}: {str(exc).splitlines()[0]}") from None
        return model, None
    apps = application_names()
    fn = apps.get(name.lower())
    if fn is None:
        raise SettingError(
            "model", f"unknown {name!r}: give a .keras/.h5 file or a keras.applications name "
            f"(e.g. vgg16, resnet50, mobilenetv2)"
        )
    if weights is None or str(weights).lower() == "none":
        log.warning("using RANDOM weights for %s (weights none, seed %d: the same in every run): scores mean "
                    "nothing for a real model", name, RANDOM_WEIGHTS_SEED)
        # seeded, so that a rerun (and every Ray worker) builds the same weights and the curvature cache holds
        keras.utils.set_random_seed(RANDOM_WEIGHTS_SEED)
        return fn(weights=None), fn
    if weights != "imagenet" and not os.path.exists(weights):
        raise SettingError("weights", f"file not found: {weights}")
    try:
        return fn(weights=weights), fn
    except Exception as exc:
        if weights == "imagenet":
            raise SettingError("weights", _weights_hint(name)) from None
        raise UserError(f"could not load weights {weights} into {name}: {str(exc).splitlines()[0]}") from None
