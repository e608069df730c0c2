"""The models the LDS panel retrains (:mod:`influence.experiments.lds`): the demo's archives and base
models, their recipes, one retraining and its test losses.

The panel (:data:`MODELS`, ``--lds-model``): ``demo`` (the demo CNN, 30 epochs, Adam 3e-3), ``bn`` (BatchNorm
CNN, 8 epochs, Adam 3e-3), ``mlp`` (ReLU MLP, 40 epochs, Adam 3e-3), and issue 30's models trained briefly (a
few hundred optimizer steps, as a fine-tuning run is) with Adam 1e-3 and L2 1e-4 on the kernels. Their steps are
``epochs × ceil(n / batch_size)`` (:func:`recipe_steps`), counted on the FULL training set (n = 1500): the base
model that is scored, whose ``.keras`` file saves them as the optimizer's ``iterations``. Each retraining on a
half-subset (n = 750) takes about half as many:

* ``mlp-brief`` (:func:`build_mlp_brief_model`, 38 890 parameters): 7 epochs × 47 batches of 32 = 329 steps
  (half-subsets: 7 × 24 = 168 steps);
* ``bn-brief`` (:func:`build_bn_model`, the ``bn`` architecture, 7 186 trainable parameters): 8 epochs × 60
  batches of 25 = 480 steps (half-subsets: 8 × 30 = 240 steps);
* ``wide`` (:func:`build_wide_model`, 659 267 parameters): 7 epochs × 47 batches of 32 = 329 steps
  (half-subsets: 7 × 24 = 168 steps);
* ``mlp-large`` (:func:`build_mlp_large_model`, 324 010 parameters, Adam 3e-4 as a fine-tuning rate): 7 epochs ×
  47 batches of 32 = 329 steps (half-subsets: 7 × 24 = 168 steps). Its ``-fixed`` twin is the panel's model of
  at least 300 k parameters whose noise ceiling reaches 0.3 (``wide-fixed``'s is 0.23).
"""
import dataclasses
import logging
import math
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

#: the seed of the base models (the demo's)
BASE_SEED = 0
#: the demo recipe (influence.demo.train_model), recorded with the runs
RECIPE = {"epochs": 30, "batch_size": 32, "optimizer": "Adam(3e-3)", "n_train": 1500, "size": 32}
QUICK_RECIPE = {"epochs": 8, "batch_size": 32, "optimizer": "Adam(3e-3)", "n_train": 500, "size": 32}
#: the second model (:func:`build_bn_model`): BatchNorm, max-pooling, a final softmax, 8 epochs -- less
#: confident than the demo CNN, so its curvature is not hidden under the damping
BN_RECIPE = {"model": "bn_cnn", "epochs": 8, "batch_size": 32, "optimizer": "Adam(3e-3)", "n_train": 1500,
             "size": 32}
#: the third model (:func:`build_mlp_model`): a ReLU MLP with L2, another family than the two CNNs, trained
#: to convergence, small enough (7 562 parameters) for the dense reference
MLP_RECIPE = {"model": "mlp", "epochs": 40, "batch_size": 32, "optimizer": "Adam(3e-3)", "n_train": 1500,
              "size": 32}
#: issue 30's briefly trained models: the module docstring gives their steps (tests/test_lds_panel.py checks it)
MLP_BRIEF_RECIPE = {"model": "mlp_brief", "epochs": 7, "batch_size": 32, "optimizer": "Adam(1e-3)", "lr": 1e-3,
                    "l2": 1e-4, "n_train": 1500, "size": 32}
BN_BRIEF_RECIPE = {"model": "bn_cnn", "epochs": 8, "batch_size": 25, "optimizer": "Adam(1e-3)", "lr": 1e-3,
                   "l2": 1e-4, "n_train": 1500, "size": 32}
WIDE_RECIPE = {"model": "wide", "epochs": 7, "batch_size": 32, "optimizer": "Adam(1e-3)", "lr": 1e-3,
               "l2": 1e-4, "n_train": 1500, "size": 32}
#: the large MLP at a fine-tuning rate: probed from one initialisation over 24 subsets × 2 seeds, its noise ceiling
#: was 0.41 at Adam 3e-4 against 0.32 at 1e-3 (0.23 at 10 epochs, 0.12 at 20: longer training is noisier here)
MLP_LARGE_RECIPE = {"model": "mlp_large", "epochs": 7, "batch_size": 32, "optimizer": "Adam(3e-4)", "lr": 3e-4,
                    "l2": 1e-4, "n_train": 1500, "size": 32}
#: the same three briefly trained models from ONE initialisation (``"init": "fixed"``): every retraining starts
#: from the base model's initial weights and its seed changes only the data order, as every fine-tuning run of
#: one pretrained model starts from the same weights. Two seeds then agree far more (noise ceiling 0.40 / 0.42
#: on bn / mlp over 12 subsets, against 0.17 with the seed in the initialisation too), so the panel can tell
#: solvers apart on briefly trained models (issue 30 asks a ceiling >= 0.3 of every panel model).
FIXED = {"init": "fixed"}
#: ``--lds-model``: the panel's models; the demo archives serve all, each model has its own cache folder
MODELS = {"demo": RECIPE, "bn": BN_RECIPE, "mlp": MLP_RECIPE, "mlp-brief": MLP_BRIEF_RECIPE,
          "bn-brief": BN_BRIEF_RECIPE, "wide": WIDE_RECIPE, "bn-fixed": dict(BN_RECIPE, **FIXED),
          "mlp-fixed": dict(MLP_RECIPE, **FIXED),
          "mlp-brief-fixed": dict(MLP_BRIEF_RECIPE, **FIXED), "bn-brief-fixed": dict(BN_BRIEF_RECIPE, **FIXED),
          "wide-fixed": dict(WIDE_RECIPE, **FIXED), "mlp-large": MLP_LARGE_RECIPE,
          "mlp-large-fixed": dict(MLP_LARGE_RECIPE, **FIXED)}


def recipe_steps(recipe, n=None):
    """Optimizer steps of one training with ``recipe``: ``epochs × ceil(n / batch_size)``; ``n`` defaults to
    the recipe's ``n_train`` (the base model's count; a half-subset retraining has ``n_train // 2``)."""
    n = recipe["n_train"] if n is None else int(n)
    return int(recipe["epochs"]) * math.ceil(n / int(recipe["batch_size"]))


@dataclasses.dataclass
class DemoData:
    """The demo's archives, in the engine's order.

    ``x_train`` uint8 (N, 32, 32, 3) and ``y_train`` (N,) in ARCHIVE order (the order of the scores);
    ``train_ids`` (N,) the bundled digit ids; ``x_test``, ``y_test`` (T,) every image of every test
    folder, ``test_keys`` (T,) ``"<folder>/<label>/<n>"`` as calculate.py names its outputs.
    """

    root: Path
    x_train: np.ndarray
    y_train: np.ndarray
    train_ids: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    test_keys: np.ndarray
    model_file: Path = None     # the base model; default ``root/model.keras`` (the demo CNN)

    @property
    def model_path(self):
        return Path(self.model_file) if self.model_file is not None else self.root / "model.keras"


def test_items(test, folders):
    """The engine's test items of ``folders`` (folder, label, number order) -> list of TestItem."""
    from influence.worklist import list_test_items
    from influence.settings import Settings

    items, _ = list_test_items(test, folders, Settings(out=str(Path("/nonexistent-lds"))))
    return items


def prepare_demo(root, recipe):
    """Demo folders, archives (prepare_data.py in-process, demo arguments) and base model under ``root``.

    Each step is skipped when its output exists. Returns :class:`DemoData`.
    """
    from influence.experiments import demo
    from influence.data.archive_reader import TestArchive, TrainArchive
    from influence.data.prepare import prepare_data
    from influence.prepare_cli import build_prepare_data_parser

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    have_archives = (root / "train.npz").is_file() and (root / "test.npz").is_file()
    if not have_archives or not (root / "model.keras").is_file():
        log.info("lds: writing the demo folders (%d training digits) under %s", recipe["n_train"], root)
        data = demo.write_folders(root, n_train=recipe["n_train"])
        if not have_archives:
            argv = [a.replace("{root}", str(root)) for a in demo.COMMANDS[0][1:]] + ["--workers", "1"]
            log.info("lds: prepare_data.py %s", " ".join(argv))
            prepare_data(build_prepare_data_parser().parse_args(argv))
        if not (root / "model.keras").is_file():
            model, seconds = demo.train_model(*data["train"][:2], epochs=recipe["epochs"], seed=BASE_SEED)
            log.info("lds: base model (all %d images, seed %d) trained in %.1f s", recipe["n_train"], BASE_SEED,
                     seconds)
            model.save(root / "model.keras")
    with TrainArchive(root / "train.npz") as train:
        x_train, y_train = train.take(np.arange(len(train)))
        files = train.files()
    train_ids = np.array([int(Path(f).stem) for f in files], dtype=np.int64)
    xs, ys, keys = [], [], []
    with TestArchive(root / "test.npz") as test:
        folders = list(test.folders)
        arrays = {f: test.read(f) for f in folders}
        for it in test_items(test, folders):
            x, y, _ = arrays[it.folder]
            xs.append(x[it.index])
            ys.append(y[it.index])
            keys.append(f"{it.folder}/{it.label}/{it.n}")
    return DemoData(root, np.asarray(x_train), np.asarray(y_train, dtype=np.int64), train_ids, np.stack(xs),
                    np.asarray(ys, dtype=np.int64), np.asarray(keys))


def prepare_model(cache, name, quick=False):
    """:class:`DemoData` for panel model ``name`` (:data:`MODELS`) under the folder ``cache``.

    ``demo``: :func:`prepare_demo` in ``cache/demo``. Any other model reads the same archives and
    keeps its base model (trained on all images with seed 0) in ``cache/<name>/model.keras``.
    ``quick``: the demo's :data:`QUICK_RECIPE` archives (500 images). Returns ``(data, recipe,
    folder of its retraining cache and scores)``.
    """
    from influence.errors import SettingError

    if name not in MODELS:
        raise SettingError("lds_model", f"must be one of {', '.join(MODELS)}, got {name!r}")
    cache = Path(cache)
    demo_recipe = QUICK_RECIPE if quick else RECIPE
    data = prepare_demo(cache / "demo", demo_recipe)
    if name == "demo":
        return data, demo_recipe, cache
    recipe, folder = dict(MODELS[name], n_train=demo_recipe["n_train"]), cache / name
    folder.mkdir(parents=True, exist_ok=True)
    data.model_file = folder / "model.keras"
    if not data.model_file.is_file():
        from influence.io import atomic_write

        start = time.perf_counter()
        model = train_model(data.x_train, data.y_train, recipe, BASE_SEED)
        log.info("lds: base model %s (all %d images, seed %d) trained in %.1f s", name, len(data.y_train),
                 BASE_SEED, time.perf_counter() - start)
        with atomic_write(data.model_file) as tmp:
            model.save(tmp)
    return data, recipe, folder


def build_bn_model(seed):
    """The panel's second CNN: float (None, 32, 32, 3) in [0, 1] -> softmax probabilities (None, 10).

    Conv(8, no bias) -> BatchNorm -> ReLU -> MaxPool, Conv(16, no bias) -> BatchNorm -> ReLU -> MaxPool,
    Dense(10) -> Softmax; L2 1e-4 on the kernels. calculate.py strips the softmax in memory.
    """
    import keras

    from influence.data import digits

    keras.utils.set_random_seed(seed)
    l2 = keras.regularizers.L2(1e-4)
    layers = keras.layers
    return keras.Sequential([
        keras.Input((32, 32, 3)),
        layers.Conv2D(8, 3, use_bias=False, kernel_regularizer=l2, name="conv1"),
        layers.BatchNormalization(name="bn1"), layers.ReLU(), layers.MaxPooling2D(2),
        layers.Conv2D(16, 3, use_bias=False, kernel_regularizer=l2, name="conv2"),
        layers.BatchNormalization(name="bn2"), layers.ReLU(), layers.MaxPooling2D(2),
        layers.Flatten(),
        layers.Dense(digits.N_CLASSES, kernel_regularizer=l2, name="logits"),
        layers.Softmax(name="probs"),
    ], name="digits_bn_cnn")


def build_mlp_model(seed, width=32, name="digits_mlp", pool=4):
    """The panel's third model: float (None, 32, 32, 3) in [0, 1] -> softmax probabilities (None, 10).

    AveragePool(pool) -> Flatten (3 × (32 / pool)², 192 at pool 4) -> Dense(width, ReLU) -> Dense(width, ReLU) ->
    Dense(10) -> Softmax; L2 1e-4 on the kernels (``width`` 32: 7 562 parameters).
    """
    import keras

    from influence.data import digits

    keras.utils.set_random_seed(seed)
    l2 = keras.regularizers.L2(1e-4)
    layers = keras.layers
    return keras.Sequential([
        keras.Input((32, 32, 3)),
        layers.AveragePooling2D(pool), layers.Flatten(),
        layers.Dense(width, activation="relu", kernel_regularizer=l2, name="hidden1"),
        layers.Dense(width, activation="relu", kernel_regularizer=l2, name="hidden2"),
        layers.Dense(digits.N_CLASSES, kernel_regularizer=l2, name="logits"),
        layers.Softmax(name="probs"),
    ], name=name)


def build_mlp_brief_model(seed):
    """``mlp-brief``: :func:`build_mlp_model` 120 wide, 38 890 parameters."""
    return build_mlp_model(seed, width=120, name="digits_mlp_brief")


def build_mlp_large_model(seed):
    """``mlp-large``: :func:`build_mlp_model` 300 wide on 2 × 2 average pooling (768 inputs), 324 010 parameters."""
    return build_mlp_model(seed, width=300, name="digits_mlp_large", pool=2)


def build_wide_model(seed):
    """``wide``: float (None, 32, 32, 3) in [0, 1] -> softmax probabilities (None, 10); 659 267 parameters.

    Conv(24, 3×3, same, ReLU) -> MaxPool(2) -> Flatten (6 144) -> Dense(107, ReLU) -> Dense(10) -> Softmax;
    L2 1e-4 on the kernels. 99.6 % of the parameters are the 6 144 × 107 dense kernel.
    """
    import keras

    from influence.data import digits

    keras.utils.set_random_seed(seed)
    l2 = keras.regularizers.L2(1e-4)
    layers = keras.layers
    return keras.Sequential([
        keras.Input((32, 32, 3)),
        layers.Conv2D(24, 3, padding="same", activation="relu", kernel_regularizer=l2, name="conv1"),
        layers.MaxPooling2D(2), layers.Flatten(),
        layers.Dense(107, activation="relu", kernel_regularizer=l2, name="hidden"),
        layers.Dense(digits.N_CLASSES, kernel_regularizer=l2, name="logits"),
        layers.Softmax(name="probs"),
    ], name="digits_wide")


#: a recipe's ``model`` -> its builder (seed -> uncompiled Keras model); the demo CNN is influence.demo's
BUILDERS = {"bn_cnn": build_bn_model, "mlp": build_mlp_model, "mlp_brief": build_mlp_brief_model,
            "wide": build_wide_model, "mlp_large": build_mlp_large_model}


def train_model(x, y, recipe, seed):
    """One model of ``recipe`` trained on uint8 images ``x`` (N, 32, 32, 3) and labels ``y`` (N,) -> Keras model."""
    import keras

    from influence.experiments import demo

    if recipe.get("model", "demo_cnn") == "demo_cnn":
        return demo.train_model(x, y, epochs=recipe["epochs"], seed=seed)[0]
    fixed = recipe.get("init") == "fixed"
    model = BUILDERS[recipe["model"]](BASE_SEED if fixed else seed)
    if fixed:                   # one initialisation for every run: the seed orders the data only
        from influence.calibration.retrain import FIXED_ORDER_OFFSET      # --calibrate-init fixed's offset

        keras.utils.set_random_seed(FIXED_ORDER_OFFSET + int(seed))
    # the recipes without "lr" (bn, mlp) were trained at 3e-3 before the key existed: their caches stay valid
    lr = float(recipe.get("lr", 3e-3))
    model.compile(optimizer=keras.optimizers.Adam(lr), loss=keras.losses.SparseCategoricalCrossentropy())
    model.fit(x.astype(np.float32) / 255.0, np.asarray(y), batch_size=recipe["batch_size"],
              epochs=recipe["epochs"], shuffle=True, verbose=0)
    return model


def test_losses(model, x, y):
    """Cross-entropy in float64 from the model's logits: ``(losses (T,), predictions (T,))``."""
    out = model(x.astype(np.float32) / 255.0, training=False)
    if model.layers and type(model.layers[-1]).__name__ == "Softmax":      # probabilities: back to logits
        out = np.log(np.maximum(np.asarray(out, dtype=np.float64), np.finfo(np.float64).tiny))
    from influence.calibration.retrain import cross_entropy

    logits = np.asarray(out, dtype=np.float64)
    return cross_entropy(logits, y), np.argmax(logits, axis=1)


def train_and_evaluate(x, y, x_test, y_test, recipe, seed):
    """One retraining with ``recipe`` (:func:`train_model`) -> test losses float64 (T,)."""
    import keras

    model = train_model(x, y, recipe, seed)
    losses, _ = test_losses(model, x_test, y_test)
    del model
    keras.backend.clear_session()
    return losses
