"""One path for the notebook and the command line (issue 23): ``Influence.scores`` and calculate.py's job
run the same plan and loop (:meth:`influence.Influence.score_groups`), so the same images give the same
numbers through both, for every registered solver; float images and in-memory training arrays give the
numbers of the uint8 archives."""
import json

import numpy as np
import pytest

import influence
from engine_helpers import calc_settings, write_project
from influence.curvature import REGISTRY
from influence.data.archive_reader import TestArchive, TrainArchive
from influence.data.arrays import ArrayTrainSet, user_pixels
from influence.engine import calculate
from influence.errors import UserError

DAMPING = 0.05
#: GB: small enough that the five test images are scored in several groups by both paths (krylov's
#: basis needs more)
BUDGET = 2e-5
#: few iterations and small bases: the tiny model needs no more, and the test stays quick
QUICK = dict(iter=20, bsize=4, repeats=1, cg_maxiter=8, rank=3)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_project(tmp_path_factory.mktemp("one_path"), 24, 10, {"a": 5})


def _job_scores(out, y):
    """calculate.py's ``<n>_scores.npy`` of test images with labels ``y``, in their order."""
    rows = []
    for t in range(len(y)):
        n = int(np.sum(y[:t + 1] == y[t]))
        rows.append(np.load(out / "a" / str(int(y[t])) / f"{n}_scores.npy"))
    return np.stack(rows)


def _ids(y, folder="a"):
    """calculate.py's id of each test image: (folder, label, n)."""
    return [(folder, int(y[t]), int(np.sum(y[:t + 1] == y[t]))) for t in range(len(y))]


@pytest.mark.slow
@pytest.mark.parametrize("solver", sorted(REGISTRY))
def test_the_api_and_calculate_give_the_same_numbers(data, tmp_path, solver):
    x, y, _ = TestArchive(data / "test.npz").read("a")
    options = {k: v for k, v in QUICK.items() if k in _options(solver)}
    # kfac-family budgets hold the Kronecker factors (the store's default projection fits them first)
    budget = {"krylov": 1e-4, "dpcg": 1e-4, "kfac": 2e-4, "ekfac": 2e-4, "pcg": 2e-4,
              "store": 2e-4}.get(solver, BUDGET)
    assert calculate(calc_settings(data, tmp_path / "out", solver=solver, damping=DAMPING, figures=False,
                                   memory_budget=budget, **options)) == 0
    inf = influence.Influence(str(data / "model.keras"), train=data / "train.npz", solver=solver, damping=DAMPING,
                              preprocess="unit", progress=False, memory_budget=budget,
                              **{k: v for k, v in options.items()})
    scores = inf.scores(x, y, ids=_ids(y))
    want = _job_scores(tmp_path / "out", y)
    diff = float(np.abs(scores - want).max())
    vectors = json.loads((tmp_path / "out" / "run.json").read_text())["memory_plan"]["vectors"]
    print(f"{solver}: max |api - calculate| = {diff:.3g} (scores up to {np.abs(want).max():.3g}; groups of {vectors})")
    np.testing.assert_allclose(scores, want, rtol=1e-6, atol=1e-9 * max(1.0, float(np.abs(want).max())))


def _options(solver):
    from influence.curvature import solver_options

    return solver_options(REGISTRY[solver])


@pytest.mark.slow
def test_memory_budget_groups_the_test_images(data):
    """A budget that holds one inverse-HVP at a time scores one test image per group; the numbers are
    those of one group of all."""
    x, y, _ = TestArchive(data / "test.npz").read("a")
    roomy = influence.Influence(str(data / "model.keras"), train=data / "train.npz", solver="exact",
                                damping=DAMPING, preprocess="unit", progress=False)
    assert roomy.plan(len(y), solver=roomy.fit().solver).vectors == len(y)
    tight = influence.Influence(str(data / "model.keras"), train=data / "train.npz", solver="exact",
                                damping=DAMPING, preprocess="unit", progress=False, memory_budget=1e-7)
    groups = [(g.start, g.stop) for g in tight.score_groups(x, y)]
    assert groups == [(t, t + 1) for t in range(len(y))]
    np.testing.assert_allclose(tight.scores(x, y), roomy.scores(x, y), rtol=1e-6, atol=1e-9)


@pytest.mark.slow
def test_float_images_and_in_memory_arrays_give_the_archive_numbers(data):
    x, y, _ = TestArchive(data / "test.npz").read("a")
    archive = TrainArchive(data / "train.npz")
    xt, yt = archive.take(np.arange(len(archive)))
    model = str(data / "model.keras")
    want = influence.Influence(model, train=data / "train.npz", solver="ekfac", damping=DAMPING, preprocess="unit",
                               progress=False).scores(x, y)
    # five lines: float arrays in, scores out
    inf = influence.Influence(model, train=(xt / 255.0, yt), solver="ekfac", damping=DAMPING, preprocess="unit",
                              progress=False)
    scores = inf.scores(x.astype(np.float32) / 255, y)
    np.testing.assert_allclose(scores, want, rtol=1e-6, atol=1e-9)
    # the batch protocol, with the archive's batches: the same bits
    same = influence.Influence(model, train=ArrayTrainSet(xt, yt.reshape(-1, 1), batch_size=10), solver="ekfac",
                               damping=DAMPING, preprocess="unit", progress=False)
    np.testing.assert_array_equal(same.scores(x, y), want)
    # scoring compacted the EK-FAC fit; self-influence takes the whole fit again (refitted)
    assert np.isfinite(same.self_influence().values).all()
    worst = int(np.argmin(want[0]))
    assert same.top(want, k=1)[0]["harmful"][0].key == f"{worst // 10}_{worst % 10}"     # the archive's keys


def test_the_pixel_rule():
    u = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    assert user_pixels(u, unit=True) is u
    np.testing.assert_array_equal(user_pixels(u / 255.0, unit=True), u)
    np.testing.assert_array_equal(user_pixels(u.astype(np.float32), unit=False), u)
    with pytest.raises(UserError, match=r"^images: float values 0\.\.255 outside 0\.\.1 \(preprocess 'unit'"):
        user_pixels(u.astype(np.float32), unit=True)
    with pytest.raises(UserError, match=r"^images: float values must be whole pixel levels.*preprocess='unit'"):
        user_pixels(u / 255.0, unit=False)
    with pytest.raises(UserError, match=r"^train: float values must be whole pixel levels \(k / 255"):
        user_pixels(np.full((1, 2, 2, 1), 0.5001), unit=True, what="train")


def test_data_mistakes_are_one_line_errors(data):
    model = str(data / "model.keras")
    x, y, _ = TestArchive(data / "test.npz").read("a")
    with pytest.raises(UserError, match="^train: a train.npz path, .x, y. arrays or an object"):
        influence.Influence(model, train=42, solver="exact", preprocess="unit")
    with pytest.raises(UserError, match="^train labels: must be integer class indices"):
        influence.Influence(model, train=(x, np.eye(4)[y]), solver="exact", preprocess="unit")
    inf = influence.Influence(model, train=(x, y), solver="exact", damping=DAMPING, preprocess="unit",
                              progress=False)
    with pytest.raises(UserError, match="^images: float values"):
        inf.scores(x * 1.0, y)
    with pytest.raises(UserError, match="^ids: 1 for 5 images"):
        inf.scores(x, y, ids=[0])
