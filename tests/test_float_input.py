"""Float input from Python (issue 32): with ``preprocess="none"`` the arrays are what the model eats, any
values, and the derivatives take float input in the model's dtype end to end (test gradients, the objective's
products, every curvature fit, the scorer, self-influence). The same images as uint8 pixels through the
archive path (``preprocess="unit"``) give the same scores to float tolerance, for every registered solver,
whether fed as ``x / 255`` or normalised ``(x / 255 - mean) / std`` to a model that takes the affine map
back as its first (weightless) op; uint8 archives keep their uint8 path."""
import keras
import numpy as np
import pytest

import influence
from engine_helpers import IMAGE, tiny_model, write_project
from influence.curvature import REGISTRY, solver_options
from influence.data.archive_reader import TestArchive, TrainArchive
from influence.data.arrays import ArrayTrainSet, user_floats
from influence.errors import UserError

DAMPING = 0.05
QUICK = dict(iter=20, bsize=4, repeats=1, cg_maxiter=8, rank=3)
MEAN = np.array([0.45, 0.5, 0.55])
STD = np.array([0.2, 0.25, 0.3])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_project(tmp_path_factory.mktemp("float_input"), 24, 10, {"a": 4})


def normalise(u):
    """uint8 pixels -> ImageNet-style normalised float64 (negative values included)."""
    return (u / 255.0 - MEAN) / STD


def normalised_model(path):
    """The model file's weights behind a weightless first op that undoes :func:`normalise`: the same
    parameters (the influence is taken over the same weights), fed normalised arrays."""
    core = keras.models.load_model(path, compile=False)
    dtype = core.weights[0].dtype                       # the file's float64 layers
    return keras.Sequential([keras.Input(IMAGE, dtype=dtype), keras.layers.Rescaling(STD, MEAN, dtype=dtype), core])


def _quick(solver):
    return {k: v for k, v in QUICK.items() if k in solver_options(REGISTRY[solver])}


@pytest.mark.slow
@pytest.mark.parametrize("solver", sorted(REGISTRY))
def test_float_arrays_score_as_the_uint8_archive(data, solver):
    """uint8 archive + preprocess unit (calculate.py's path) == x / 255 floats with preprocess none == normalised
    floats into the model with the affine map baked in; self-influence too."""
    model = str(data / "model.keras")
    x, y, _ = TestArchive(data / "test.npz").read("a")
    xt, yt = TrainArchive(data / "train.npz").take(np.arange(24))
    kw = dict(solver=solver, damping=DAMPING, progress=False, **_quick(solver))
    ref = influence.Influence(model, train=data / "train.npz", preprocess="unit", **kw)
    want = ref.scores(x, y)
    assert ref.derivs.x_spec.dtype.name == "uint8"                 # the archive keeps its compact path
    unit = influence.Influence(model, train=(xt / 255.0, yt), preprocess="none", **kw)
    assert unit.derivs.x_spec.dtype.name == "float64"              # the model's dtype
    norm = influence.Influence(normalised_model(model), train=(normalise(xt), yt), preprocess="none", **kw)
    scale = float(np.abs(want).max())
    # the store keeps its training rows in float16 (3 digits): the last bit of a row may round either way
    tol = 2e-3 if solver == "store" else 1e-5
    for inf, images in ((unit, x / 255.0), (norm, normalise(x))):
        got = inf.scores(images, y)
        print(f"{solver}: max |float - uint8| = {np.abs(got - want).max():.3g} (scores up to {scale:.3g})")
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol / 10 * scale)
    if solver in ("exact", "krylov", "ekfac"):
        si = ref.self_influence().values
        np.testing.assert_allclose(norm.self_influence().values, si, rtol=1e-5, atol=1e-6 * float(np.abs(si).max()))


class _Batches:
    """A batch source of the protocol without ``rows``: ``take`` gathers from its batches."""

    def __init__(self, x, y, size):
        self.x, self.y, self.size = x, y, size

    def __len__(self):
        return -(-len(self.x) // self.size)

    def __getitem__(self, b):
        return self.x[b * self.size:(b + 1) * self.size], self.y[b * self.size:(b + 1) * self.size]


@pytest.mark.slow
def test_negative_floats_are_taken_as_they_are():
    """Arbitrary floats (normal noise, negative) in a float32 model with preprocess none: the float path, finite
    scores and self-influence for a fitted (ekfac), a basis (krylov) and a minibatch (lissa) solver, from arrays
    and from a batch source; the numbers depend on the float values (not rounded to pixels)."""
    rng = np.random.default_rng(0)
    x = rng.normal(0, 2, (20,) + IMAGE)
    y = rng.integers(0, 4, 20)
    xs, ys = rng.normal(0, 2, (3,) + IMAGE).astype(np.float32), rng.integers(0, 4, 3)
    model = tiny_model(seed=2, dtype="float32")
    for solver, train in (("ekfac", (x, y)), ("krylov", ArrayTrainSet(x, y, batch_size=7)),
                          ("lissa", _Batches(x, y, 6))):
        inf = influence.Influence(model, train=train, preprocess="none", solver=solver, damping=DAMPING,
                                  progress=False, **_quick(solver))
        assert inf.derivs.x_spec.dtype.name == "float32" and inf.train.input_dtype == np.float32
        scores = inf.scores(xs, ys)
        assert scores.shape == (3, 20) and np.isfinite(scores).all() and np.abs(scores).max() > 0
        if solver != "lissa":
            assert np.isfinite(inf.self_influence().values).all()
    # a nudge below a pixel level changes the numbers: the floats are not rounded anywhere
    nudged = inf.scores(xs + np.float32(1e-2), ys)
    assert not np.allclose(nudged, scores, rtol=1e-6, atol=0)


def test_what_the_model_cannot_take_is_one_line(data):
    """A dtype that is not a number, NaN, the wrong shape: one line naming the argument, before any fit; float
    test images against uint8 training images say why they are read as pixels."""
    model = str(data / "model.keras")
    x, y, _ = TestArchive(data / "test.npz").read("a")
    xt, yt = TrainArchive(data / "train.npz").take(np.arange(24))
    inf = influence.Influence(model, train=(normalise(xt), yt), preprocess="none", solver="exact", progress=False)
    cases = [(x.astype(np.complex64), r"^images: images must be float \(or integer\) arrays, got complex64$"),
             (x.astype(bool), r"^images: images must be float \(or integer\) arrays, got bool$"),
             (x.astype(str), r"^images: images must be float \(or integer\) arrays, got <U"),
             (np.where(x > 100, np.nan, normalise(x)), r"^images: images hold NaN or infinite values$"),
             (normalise(x)[:, :5], r"^images must be \(T, 6, 6, 3\) like the training images, got \(4, 5, 6, 3\)$")]
    for images, message in cases:
        with pytest.raises(UserError, match=message) as err:
            inf.scores(images, y)
        assert "\n" not in str(err.value)
    assert not inf._fitted                               # refused before the curvature was fitted
    with pytest.raises(UserError, match=r"^images: images hold values beyond float32's range$"):
        user_floats(np.full((1, 2, 2, 3), 1e300), np.float32)
    with pytest.raises(UserError, match=r"^train: images hold NaN or infinite values$"):
        influence.Influence(model, train=(np.full((24,) + IMAGE, np.inf), yt), preprocess="none", solver="exact")
    with pytest.raises(UserError, match=r"^train: the training images are 5x6x3 but the model takes 6x6x3"):
        influence.Influence(model, train=(normalise(xt)[:, :5], yt), preprocess="none", solver="exact")
    # uint8 training images keep the uint8 path: float test images must then be pixels, and the error says why
    pixels = influence.Influence(model, train=(xt, yt), preprocess="none", solver="exact", progress=False)
    assert pixels.derivs.x_spec.dtype.name == "uint8"
    with pytest.raises(UserError, match=r"^images: float values .* give float training images") as err:
        pixels.scores(normalise(x), y)
    assert "\n" not in str(err.value)
    # another preprocess keeps the pixel rule for float training images
    with pytest.raises(UserError, match=r"^train: float values .* outside 0\.\.1"):
        influence.Influence(model, train=(normalise(xt), yt), preprocess="unit", solver="exact")


def test_the_input_spec_follows_the_data(data):
    """uint8 data -> a uint8 signature (the archive's and uint8 arrays'), float data with preprocess none -> the
    model's float dtype (float64 arrays into a float32 model are cast), integer batch 0 -> pixels."""
    xt, yt = TrainArchive(data / "train.npz").take(np.arange(24))
    model32 = tiny_model(seed=1, dtype="float32", batchnorm=False)
    for train, preprocess, want in ((data / "train.npz", "none", "uint8"), ((xt, yt), "none", "uint8"),
                                    ((xt / 255.0, yt), "unit", "uint8"), ((xt / 255.0, yt), "none", "float32"),
                                    ((xt / 255.0, yt), "auto", "float32")):
        inf = influence.Influence(model32, train=train, preprocess=preprocess, solver="exact", progress=False)
        assert inf.derivs.x_spec.dtype.name == want, (train, preprocess)
        assert inf.predict(xt[:2] if want == "uint8" else xt[:2] / 255.0).shape == (2, 4)
