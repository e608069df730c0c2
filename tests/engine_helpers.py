"""Tiny models, archives and float64 dense references for the engine tests."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from influence.data.archive_reader import TrainArchive  # noqa: E402
from influence.data.archive_writer import ArchiveWriter  # noqa: E402
from influence.model.derivatives import Derivatives  # noqa: E402
from influence.model.objective import TrainingObjective
from influence.model.vectors import numpy_to_vec, vec_to_numpy
from influence.model.models import Classifier, make_preprocess, select_params, strip_softmax  # noqa: E402

IMAGE = (6, 6, 3)
CLASSES = 4


def tiny_model(seed=0, dtype="float64", softmax=True, batchnorm=True):
    """Conv(3, tanh, L2) [-> BatchNorm] -> Flatten -> Dense(4[, softmax], L2): a few hundred parameters."""
    keras.utils.set_random_seed(seed)
    reg = keras.regularizers.L2(1e-3)
    layers = [keras.Input(IMAGE),
              keras.layers.Conv2D(3, 3, activation="tanh", kernel_regularizer=reg, dtype=dtype, name="conv")]
    if batchnorm:
        layers.append(keras.layers.BatchNormalization(dtype=dtype, name="bn"))
    layers += [keras.layers.Flatten(dtype=dtype),
               keras.layers.Dense(CLASSES, activation="softmax" if softmax else None, kernel_regularizer=reg,
                                  dtype=dtype, name="dense")]
    model = keras.Sequential(layers)
    if batchnorm:
        bn = model.get_layer("bn")
        rng = np.random.default_rng(seed)
        bn.moving_mean.assign(rng.uniform(-0.2, 0.2, 3))
        bn.moving_variance.assign(rng.uniform(0.5, 1.5, 3))
    return model


def classifier(model, params="all"):
    model, _ = strip_softmax(model)
    return Classifier(model, make_preprocess("unit"), select_params(model, params))


def random_data(n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n,) + IMAGE).astype(np.uint8)
    y = rng.integers(0, CLASSES, n).astype(np.int64)
    return x, y


def write_train_archive(path, x, y, batch):
    """train.npz with the prepare_data.py layout, ``batch`` images per member."""
    with ArchiveWriter(path) as w:
        for b, s in enumerate(range(0, len(y), batch)):
            w.add(f"train_x_{b}", x[s:s + batch])
            w.add(f"train_y_{b}", y[s:s + batch].reshape(-1, 1))
            w.add(f"train_files_{b}", np.array([f"{int(c)}/img{s + i:03d}.png" for i, c in enumerate(y[s:s + batch])]))
        w.add("meta_size", np.array(x.shape[1:3], np.int64))
    return TrainArchive(path)


def write_test_archive(path, folders):
    """test.npz from ``{folder: (x, y)}``."""
    with ArchiveWriter(path) as w:
        for name, (x, y) in folders.items():
            w.add(f"test_{name}_x", x)
            w.add(f"test_{name}_y", y.reshape(-1, 1))
            w.add(f"test_{name}_files", np.array([f"{int(c)}/t{i:03d}.png" for i, c in enumerate(y)]))
        w.add("meta_size", np.array(next(iter(folders.values()))[0].shape[1:3], np.int64))


def setup(tmp_path, n=40, batch=16, seed=0, params="all", **model_kw):
    """(classifier, derivatives, objective, archive, x, y) on a fresh tiny model and archive."""
    x, y = random_data(n, seed)
    archive = write_train_archive(tmp_path / "train.npz", x, y, batch)
    clf = classifier(tiny_model(seed, **model_kw), params)
    d = Derivatives(clf, IMAGE)
    return clf, d, TrainingObjective(d, archive, chunk=16), archive, x, y


def dense_hessian(d, x, y):
    """float64 (P, P) Hessian of mean_i L(z_i) + Ω by nested tapes (the reference)."""
    prim = [v.value for v in d.variables]
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            obj = tf.reduce_mean(d._losses(x, y)) + d.regularization()
        flat = tf.concat([tf.reshape(g, [-1]) for g in inner.gradient(obj, prim)], 0)
    jac = outer.jacobian(flat, prim, experimental_use_pfor=False)
    return np.concatenate([tf.reshape(j, [flat.shape[0], -1]).numpy() for j in jac], axis=1).astype(np.float64)


def per_example_gradients(d, x, y):
    """(N, P) float64: one gradient per image, the slow loop the batched scorer must match."""
    return np.stack([vec_to_numpy(d.gradient(x[i:i + 1], y[i:i + 1])) for i in range(len(y))])


def layer_edges(clf):
    """(L + 1,) where each layer of ``clf.groups`` starts in the flat parameter vector (a layer's parameters are
    contiguous), and P last."""
    return np.concatenate([[0], np.cumsum([sum(int(np.prod(v.shape)) for v in g.variables) for g in clf.groups])])


def layer_blocks(matrix, clf):
    """(P, P) float64 -> the same with every cross-layer block zeroed: the per-layer blocks of ``clf.groups``,
    what ``--solver store`` inverts at D = P."""
    edges = layer_edges(clf)
    assert edges[-1] == len(matrix)
    out = np.zeros_like(matrix)
    for start, stop in zip(edges, edges[1:]):
        out[start:stop, start:stop] = matrix[start:stop, start:stop]
    return out


def to_vec(flat, d):
    return numpy_to_vec(flat, d.variables)


def write_project(root, n_train, batch, test_sizes, batchnorm=False):
    """``root`` with train.npz (``n_train`` images, seed 3), test.npz (folder -> size, seeds 4, 5, ...)
    and model.keras (the tiny float64 model, seed 1): what calculate.py reads. Returns ``root``."""
    x, y = random_data(n_train, seed=3)
    write_train_archive(root / "train.npz", x, y, batch=batch)
    write_test_archive(root / "test.npz", {name: random_data(size, seed=4 + i)
                                           for i, (name, size) in enumerate(test_sizes.items())})
    tiny_model(seed=1, dtype="float64", batchnorm=batchnorm).save(root / "model.keras")
    return root


def calc_settings(data, out, **kw):
    """influence.settings.Settings for a :func:`write_project` folder: exact solver, png, top 2."""
    from influence.settings import Settings

    base = dict(data=str(data), out=str(out), model=str(data / "model.keras"), preprocess="unit", solver="exact",
                save_format="png", top=2)
    base.update(kw)
    return Settings(**base)
