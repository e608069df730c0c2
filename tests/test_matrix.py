"""Every registered ``--solver`` × every kind of model, end to end through calculate.py's entry point.

Each cell runs ``calculate.py ... --solver S --self-influence`` in-process on a tiny project (64
training images of 8×8, 3 test images) and checks:

* the outputs of every test image are complete and finite, ``self_influence.csv`` and ``index.html``
  are written;
* the scores agree with a dense float64 reference to the solver's tolerance: ``gᵢᵀ (M + λI)⁻¹ g_t``
  with per-image float64 gradients, where ``M`` is the dense matrix calculate.py takes by default
  (``--hessian ggn``: the Gauss-Newton matrix; ``exact``, ``cg``, ``lissa``, ``pcg``, ``dpcg``: the same
  reference as the exact solver's) or, for a Kronecker-factored or low-rank method, its own fitted
  matrix applied by the solver loaded from the run's curvature cache (that matrix is checked against a
  hand-built dense Fisher or dense eigenpairs in tests/test_curvature_contract.py);
* the self-influence values agree with ``gᵢᵀ (M + λI)⁻¹ gᵢ``; for a method whose whole-set route is its
  fitted part's (``dpcg``: the krylov basis, no CG per image), ``M`` is that part's matrix, checked as the
  part's own cell checks it.

The cells come from the solver registry: a new method joins by registering. One with an unknown
``approximates`` fails until its reference is added here (as in the contract test).
"""
import csv

import keras
import numpy as np
import pytest

from engine_helpers import layer_blocks, per_example_gradients, to_vec, write_test_archive, write_train_archive
from influence.calculate_cli import build_parser, job
from influence.cli import main
from influence.curvature import REGISTRY, make_solver
from influence.curvature.cache import CurvatureCache, curvature_key
from influence.data.archive_reader import TrainArchive
from influence.model.derivatives import Derivatives
from influence.model.objective import TrainingObjective
from influence.model.vectors import vec_to_numpy
from influence.model.models import load_classifier
from influence.outputs.report import expected_outputs
from influence.scoring.self_influence import fast_solvers
from influence.settings import Settings

#: every cell runs calculate.py end to end (minutes in all): the whole matrix is in `make test` only
pytestmark = pytest.mark.slow

SIZE, CLASSES, N_TRAIN, N_TEST = 8, 3, 64, 2
#: images held per training archive member (several members: the batching is exercised)
BATCH = 24


def _conv_bn_pool(dtype_policy=None):
    """Conv -> BatchNorm -> ReLU -> MaxPool -> Conv -> AvgPool -> Dense."""
    return [keras.layers.Conv2D(4, 3, name="conv1", dtype=dtype_policy),
            keras.layers.BatchNormalization(name="bn", dtype=dtype_policy),
            keras.layers.Activation("relu", dtype=dtype_policy),
            keras.layers.MaxPooling2D(2, dtype=dtype_policy),
            keras.layers.Conv2D(5, 2, activation="tanh", padding="same", name="conv2", dtype=dtype_policy),
            keras.layers.AveragePooling2D(3, dtype=dtype_policy),
            keras.layers.Flatten(dtype=dtype_policy),
            keras.layers.Dense(CLASSES, name="out", dtype=dtype_policy)]


#: name -> layers after the input (float32 unless the layers say otherwise)
MODELS = {
    "dense": lambda: [keras.layers.Flatten(), keras.layers.Dense(3, activation="tanh", name="hidden"),
                      keras.layers.Dense(CLASSES, name="out")],
    "conv_maxpool": lambda: [keras.layers.Conv2D(4, 3, activation="relu", name="conv"), keras.layers.MaxPooling2D(2),
                             keras.layers.Flatten(), keras.layers.Dense(CLASSES, name="out")],
    "conv_bn_pool": _conv_bn_pool,
    "final_softmax": lambda: [keras.layers.Conv2D(3, 3, activation="tanh", name="conv"), keras.layers.Flatten(),
                              keras.layers.Dense(CLASSES, name="out"), keras.layers.Softmax()],
    # the conv_bn_pool weights under a mixed_float16 policy (16-bit compute, float32 weights)
    "mixed_float16": lambda: _conv_bn_pool("mixed_float16"),
}

#: extra flags per solver (defaults for any other) and the relative error allowed against the reference
FLAGS = {"lissa": ["-i", "120", "-b", str(N_TRAIN)], "cg": ["--cg-tol", "1e-9"], "pcg": ["--cg-tol", "1e-9"],
         "dpcg": ["--cg-tol", "1e-9"]}
TOLERANCE = {"exact": 2e-4, "cg": 2e-4, "pcg": 2e-4, "lissa": 0.08, "kfac": 2e-4, "ekfac": 2e-4,
             "store": 2e-3}      # the store's rows are float16
DEFAULT_TOLERANCE = 2e-4
#: training images scored for self-influence by solvers without a whole-training-set route
SELF_LIMIT = 3


def build_model(kind):
    keras.utils.set_random_seed(7)
    model = keras.Sequential([keras.Input((SIZE, SIZE, 3))] + MODELS[kind]())
    bn = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    if bn:
        rng = np.random.default_rng(1)
        bn[0].moving_mean.assign(rng.uniform(-0.2, 0.2, bn[0].moving_mean.shape))
        bn[0].moving_variance.assign(rng.uniform(0.5, 1.5, bn[0].moving_variance.shape))
    if kind == "mixed_float16":     # the same numbers as the float32 conv_bn_pool model
        model.set_weights(build_model("conv_bn_pool").get_weights())
    return model


def tiny_images(n, seed):
    """Class-dependent images (a bright quadrant per class) with noise, so the model has signal."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % CLASSES
    x = rng.integers(0, 120, (n, SIZE, SIZE, 3))
    for i, c in enumerate(y):
        x[i, (c % 2) * 4:(c % 2) * 4 + 4, (c // 2) * 4:(c // 2) * 4 + 4, c] += 120
    return x.astype(np.uint8), y.astype(np.int64)


@pytest.fixture(scope="session")
def matrix_root(tmp_path_factory):
    return tmp_path_factory.mktemp("matrix")


_PROJECTS = {}


def project(kind, root):
    """The tiny project of model ``kind`` and its dense float64 references (built once per session)."""
    if kind in _PROJECTS:
        return _PROJECTS[kind]
    data = root / kind
    data.mkdir()
    x, y = tiny_images(N_TRAIN, seed=3)
    xt, yt = tiny_images(N_TEST, seed=4)
    write_train_archive(data / "train.npz", x, y, batch=BATCH)
    write_test_archive(data / "test.npz", {"t": (xt, yt)})
    model = build_model(kind)
    model.save(data / "model.keras")
    clf = load_classifier(str(data / "model.keras"), "imagenet", "unit", "all")
    assert clf.dtype == "float32"
    train = TrainArchive(data / "train.npz")
    d = Derivatives(clf, train.image_shape)
    obj = TrainingObjective(d, train, chunk=32, hessian=Settings().hessian)     # the matrix calculate.py takes
    exact = make_solver("exact", obj, 1.0, progress=False)     # the damping of the cells comes later
    exact.fit()
    cache = root / f"{kind}-cache"
    CurvatureCache(cache).save(exact, curvature_key(clf, train, model=str(data / "model.keras"), preprocess="unit",
                                                     solver=exact))
    h = exact.state()["hessian"]
    w = np.linalg.eigvalsh(h)
    # H + λI well conditioned and positive definite: every solver (CG, LiSSA) converges
    damping = float(np.format_float_positional(max(0.3 * np.abs(w).max(), 0.05 - 1.5 * w[0]), 2, fractional=False))
    g_train = per_example_gradients(d, x, y)                    # (N, P) float64
    g_test = per_example_gradients(d, xt, yt)                   # (T, P)
    inv = np.linalg.inv(h + damping * np.eye(len(h)))
    _PROJECTS[kind] = dict(data=data, cache=cache, clf=clf, d=d, obj=obj, train=train, damping=damping, H=h,
                           g_train=g_train, g_test=g_test, keys=[f"{c}/img{i:03d}.png" for i, c in enumerate(y)],
                           hessian_scores=g_test @ inv @ g_train.T, hessian_self=np.einsum("np,pq,nq->n", g_train,
                                                                                            inv, g_train))
    return _PROJECTS[kind]


def solver_reference(name, p, options):
    """(T, N) scores and (N,) self-influence of the dense reference for solver ``name``."""
    kind = getattr(REGISTRY[name], "approximates", None)
    if kind in ("ggn", "ggn-blocks"):        # the store's follows its structure (store_curvature auto: the model)
        kind = make_solver(name, p["obj"], p["damping"], progress=False, **options).approximates
    if kind == "hessian" or (kind == "ggn" and Settings().hessian == "ggn"):
        # "ggn": the Gauss-Newton matrix whatever --hessian
        return p["hessian_scores"], p["hessian_self"]
    if kind == "ggn-blocks" and Settings().hessian == "ggn":
        # its per-layer blocks (the store at D = P, calculate.py's store_dim auto)
        inv = np.linalg.inv(layer_blocks(p["H"], p["clf"]) + p["damping"] * np.eye(len(p["H"])))
        return p["g_test"] @ inv @ p["g_train"].T, np.einsum("np,pq,nq->n", p["g_train"], inv, p["g_train"])
    if kind in ("kfac", "ekfac", "lowrank"):
        solver = make_solver(name, p["obj"], p["damping"], progress=False, **options)
        key = curvature_key(p["clf"], p["train"], model=str(p["data"] / "model.keras"), preprocess="unit",
                            solver=solver)
        assert CurvatureCache(p["cache"]).load(solver, key), "the run did not cache its fitted state"
        d = p["d"]
        applied = np.stack([vec_to_numpy(v) for v in solver.solve([to_vec(g, d) for g in p["g_test"]])])
        own = np.stack([vec_to_numpy(v) for v in solver.solve([to_vec(g, d) for g in p["g_train"]])])
        return applied @ p["g_train"].T, np.einsum("np,np->n", p["g_train"], own)
    pytest.fail(f"--solver {name}: unknown approximates = {kind!r}; add its dense reference to tests/test_matrix.py")


def self_reference_solver(name, p, options):
    """The solver whose reference the self-influence of solver ``name`` is checked against: itself, or, when
    its whole-set route goes through its fitted part (dpcg's krylov basis), the part."""
    solver = make_solver(name, p["obj"], p["damping"], progress=False, **options)
    part = getattr(solver, "part", None) if solver.self_influence_route else None
    return name if part is None else part.name


def rel_err(got, want):
    return float(np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want))


_RUNS = {}


def run_cell(solver, kind, root):
    """calculate.py --solver ``solver`` --self-influence on project ``kind`` (once per session): its --out."""
    if (solver, kind) in _RUNS:
        return _RUNS[solver, kind]
    p = project(kind, root)
    out = root / f"{kind}-{solver}-out"
    argv = ["--data", str(p["data"]), "--model", str(p["data"] / "model.keras"), "--preprocess", "unit",
            "--solver", solver, "--damping", str(p["damping"]), "--self-influence", "-sf", "png", "--top", "2",
            "--out", str(out), "--cache", str(p["cache"])] + FLAGS.get(solver, [])
    if needs_limit(solver):
        argv += ["--self-influence-limit", str(SELF_LIMIT)]
    assert main(build_parser, job, argv) == 0
    _RUNS[solver, kind] = out
    return out


def needs_limit(solver):
    return solver not in fast_solvers()


def run_scores(out):
    """(T, N) float32 scores of the run in ``out``."""
    return np.stack([np.load(out / "t" / str(label) / "1_scores.npy") for label in range(N_TEST)])


CELLS = [(solver, kind) for kind in MODELS for solver in REGISTRY]


@pytest.mark.parametrize("solver,kind", CELLS, ids=[f"{s}-{k}" for s, k in CELLS])
def test_solver_on_model_end_to_end(solver, kind, matrix_root):
    p = project(kind, matrix_root)
    out = run_cell(solver, kind, matrix_root)

    # outputs complete and finite, the report written
    assert (out / "index.html").is_file()
    for label in range(N_TEST):
        label_dir = out / "t" / str(label)
        assert all(f.is_file() for f in expected_outputs(label_dir, 1, "png")), label_dir
    scores = run_scores(out)
    assert scores.shape == (N_TEST, N_TRAIN) and np.isfinite(scores).all()
    with open(out / "self_influence.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == (SELF_LIMIT if needs_limit(solver) else N_TRAIN)
    assert (out / "self_influence.png").is_file()

    # the numbers: the dense reference of what this solver approximates
    options = dict(fisher="auto", seed=0, ekfac_max_block=4096, memory_budget=2.0, rank="auto")   # calculate.py's
    want_scores, want_self = solver_reference(solver, p, options)
    via = self_reference_solver(solver, p, options)
    if via != solver:
        want_self = solver_reference(via, p, options)[1]
    tol = TOLERANCE.get(solver, DEFAULT_TOLERANCE)
    assert rel_err(scores, want_scores) <= tol, (solver, kind, rel_err(scores, want_scores))
    index = {k: i for i, k in enumerate(p["keys"])}
    got = np.array([float(r["self_influence"]) for r in rows])
    want = want_self[[index[r["file"]] for r in rows]]
    assert np.isfinite(got).all()
    tol_self = TOLERANCE.get(via, DEFAULT_TOLERANCE)
    assert rel_err(got, want) <= tol_self, (solver, kind, rel_err(got, want))


@pytest.mark.parametrize("solver", ["exact", "ekfac"])
def test_mixed_precision_scores_equal_the_float32_models(solver, matrix_root):
    """A mixed_float16 model is scored in float32: the same numbers as its float32 twin."""
    mixed = run_scores(run_cell(solver, "mixed_float16", matrix_root))
    plain = run_scores(run_cell(solver, "conv_bn_pool", matrix_root))
    np.testing.assert_array_equal(mixed, plain)
