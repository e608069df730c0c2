"""Self-influence gᵢᵀ(H + λI)⁻¹gᵢ against dense float64 references (tiny conv/BN/dense model, float64)."""
import csv

import numpy as np
import pytest

from engine_helpers import dense_hessian, per_example_gradients
from influence.catalogue import TrainCatalogue
from influence.curvature import make_solver
from influence.errors import UserError
from influence.outputs.self_influence import CSV_HEADER, write_self_influence
from influence.scoring.self_influence import SelfInfluence, check_solver, self_influence
from test_ekfac import SEED, dense_fisher, tiny_setup

N = 40


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    clf, d, obj, archive, x, y = tiny_setup(tmp_path_factory.mktemp("selfinf"), n=N)
    h = dense_hessian(d, x, y)
    lam = max(0.5, 0.5 - float(np.linalg.eigvalsh(h)[0]))      # H + λI positive definite (CG applies)
    grads = per_example_gradients(d, x, y)                       # true labels, (N, P)
    exact = make_solver("exact", obj, lam, progress=False)
    exact.load_state({"hessian": h})      # as from the curvature cache (tests/test_curvature_contract.py: = fit)
    ekfac = make_solver("ekfac", obj, 0.05, seed=SEED, fisher="sampled", progress=False)
    ekfac.fit()
    return dict(clf=clf, d=d, obj=obj, archive=archive, x=x, y=y, H=h, lam=lam, G=grads, exact=exact,
                exact_result=self_influence(exact, d, archive, batch=16, progress=False), ekfac=ekfac)


def dense_values(matrix, lam, grads):
    """gᵢᵀ(M + λI)⁻¹gᵢ for each row of grads, by np.linalg.solve."""
    sol = np.linalg.solve(matrix + lam * np.eye(len(matrix)), grads.T).T
    return np.einsum("np,np->n", grads, sol)


@pytest.mark.slow
def test_exact_equals_dense_hessian_reference(tiny):
    res = tiny["exact_result"]
    np.testing.assert_array_equal(res.indices, np.arange(N))
    want = dense_values(tiny["H"], tiny["lam"], tiny["G"])
    assert want.min() > 0 and want.max() > 3 * want.min()       # positive definite, and not all alike
    np.testing.assert_allclose(res.values, want, rtol=1e-8)
    # losses and predictions of the images with their true labels
    d, x, y = tiny["d"], tiny["x"], tiny["y"]
    probs = d.predict(x).numpy()
    np.testing.assert_allclose(res.losses, -np.log(probs[np.arange(N), y]), rtol=1e-10)
    np.testing.assert_array_equal(res.preds, probs.argmax(1))
    np.testing.assert_allclose(res.confs, probs.max(1), rtol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("max_block", [4096, 10])
def test_ekfac_route_equals_dense_ekfac_reference(tiny, max_block):
    """The Fisher uses sampled labels (as the solver); the gradients gᵢ use the true labels.
    ``max_block`` 10 splits every factor into blocks (block-diagonal eigenbases)."""
    method, lam = "ekfac", 0.05
    if max_block == 4096:
        solver = tiny["ekfac"]
    else:
        solver = make_solver(method, tiny["obj"], lam, seed=SEED, fisher="sampled", ekfac_max_block=max_block, progress=False)
        solver.fit()
    res = self_influence(solver, tiny["d"], tiny["archive"], batch=16, progress=False)
    f = dense_fisher(tiny["clf"], tiny["d"], tiny["x"], tiny["y"], method, seed=SEED, max_block=max_block)
    want = dense_values(f, lam, tiny["G"])
    np.testing.assert_allclose(res.values, want, rtol=1e-8)
    # and it is the solver's own inverse applied to each gradient
    x, y = tiny["x"][:3], tiny["y"][:3]
    own = [float(tiny["G"][i] @ np.concatenate([np.ravel(t) for t in s]))
           for i, s in enumerate(solver.solve([tiny["d"].gradient(x[i:i + 1], y[i:i + 1]) for i in range(3)]))]
    np.testing.assert_allclose(solver.self_influence_batch(x, y), own, rtol=1e-9)


@pytest.mark.slow
def test_results_do_not_depend_on_batch_size(tiny):
    solver = tiny["ekfac"]
    a = self_influence(solver, tiny["d"], tiny["archive"], batch=N, progress=False)
    b = self_influence(solver, tiny["d"], tiny["archive"], batch=7, progress=False)
    np.testing.assert_allclose(b.values, a.values, rtol=1e-11)
    np.testing.assert_allclose(b.losses, a.losses, rtol=1e-12)
    c = self_influence(tiny["exact"], tiny["d"], tiny["archive"], batch=3, progress=False)
    np.testing.assert_allclose(c.values, tiny["exact_result"].values, rtol=1e-10)
    # a new damping takes effect (the per-solver compiled state is keyed on it)
    try:
        solver.damping = 1.0
        assert np.all(self_influence(solver, tiny["d"], tiny["archive"], batch=N, progress=False).values < a.values)
    finally:
        solver.damping = 0.05


@pytest.mark.slow
def test_limit_with_cg_scores_the_highest_loss_images_like_exact(tiny):
    exact = tiny["exact_result"]
    limit = 6
    cg = make_solver("cg", tiny["obj"], tiny["lam"], cg_tol=1e-10, cg_maxiter=500, progress=False)
    res = self_influence(cg, tiny["d"], tiny["archive"], batch=4, limit=limit, progress=False)
    want = np.argsort(-exact.losses, kind="stable")[:limit]
    np.testing.assert_array_equal(res.indices, want)
    np.testing.assert_allclose(res.losses, exact.losses[want], rtol=1e-12)
    np.testing.assert_allclose(res.values, exact.values[want], rtol=1e-6)
    # the exact route honours the limit too
    lim = self_influence(tiny["exact"], tiny["d"], tiny["archive"], batch=4, limit=limit, progress=False)
    np.testing.assert_array_equal(lim.indices, want)
    np.testing.assert_allclose(lim.values, exact.values[want], rtol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lissa", "cg", "pcg"])
def test_per_image_solvers_without_limit_are_refused(tiny, name):
    solver = make_solver(name, tiny["obj"], tiny["lam"], progress=False)
    with pytest.raises(UserError) as err:
        self_influence(solver, tiny["d"], tiny["archive"], batch=16, progress=False)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"self_influence: with solver {name} ")
    assert "solver ekfac" in msg and "self_influence_limit N" in msg and f"({N} here)" in msg and "--" not in msg
    check_solver(name, 5)                       # a limit makes it fine
    for fast in ("exact", "kfac", "ekfac"):
        check_solver(fast, None)
    with pytest.raises(UserError, match="^self_influence_limit: must be >= 1"):
        check_solver("ekfac", -1)


@pytest.mark.slow
def test_csv_is_sorted_with_the_columns_and_the_figure_is_written(tiny, tmp_path):
    res, x, y = tiny["exact_result"], tiny["x"], tiny["y"]
    keys = [f"{i // 16}_{i % 16}" for i in range(N)]
    files = tiny["archive"].files()
    fetched = []

    def fetch(i):
        fetched.append(i)
        return x[i]

    names = ["zero", "one", "two", "three"]
    paths = write_self_influence(tmp_path / "out", res, TrainCatalogue(keys, files, y, lambda k: names[k]), fetch,
                                 top=4, fmt="png")
    assert [p.name for p in paths] == ["self_influence.csv", "self_influence.png"]
    with open(paths[0], newline="") as fh:
        rows = list(csv.reader(fh))
    assert tuple(rows[0]) == CSV_HEADER
    body = [dict(zip(rows[0], r)) for r in rows[1:]]
    assert len(body) == N and [int(r["rank"]) for r in body] == list(range(1, N + 1))
    values = np.array([float(r["self_influence"]) for r in body])
    assert np.all(np.diff(values) <= 0)
    top = int(np.argmax(res.values))
    assert body[0]["key"] == keys[top] and body[0]["file"] == files[top]
    assert int(body[0]["label"]) == y[top] and body[0]["class_name"] == names[y[top]]
    assert int(body[0]["prediction"]) == res.preds[top] and body[0]["prediction_name"] == names[res.preds[top]]
    assert float(body[0]["loss"]) == res.losses[top] and float(body[0]["confidence"]) == res.confs[top]
    np.testing.assert_array_equal(sorted(fetched), sorted(np.argsort(-res.values)[:4]))
    assert paths[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "out").glob(".*tmp*"))          # atomic: no temporary files left


def test_limited_result_keeps_archive_keys_and_ties_by_index(tmp_path):
    # 3 of 5 images scored; two tie on the value: the lower archive index ranks first
    res = SelfInfluence(indices=np.array([4, 1, 2]), values=np.array([1.0, 2.0, 2.0]), losses=np.array([3., 2., 1.]),
                        preds=np.array([0, 1, 0]), confs=np.array([0.5, 0.6, 0.7]))
    keys = [f"0_{i}" for i in range(5)]
    catalogue = TrainCatalogue(keys, [f"f{i}.png" for i in range(5)], [0, 1, 1, 0, 1], str)
    paths = write_self_influence(tmp_path, res, catalogue, lambda i: np.zeros((6, 6, 3), np.uint8), top=10, fmt="svg")
    with open(paths[0], newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["key"] for r in rows] == ["0_1", "0_2", "0_4"]
    assert [r["label"] for r in rows] == ["1", "1", "1"] and rows[1]["prediction"] == "0"
    assert paths[1].suffix == ".svg" and paths[1].stat().st_size > 0


# ----------------------------------------------------------------------------- the mislabel panel's machinery

def test_flip_labels_is_seeded_and_changes_exactly_the_chosen_fraction():
    from influence.experiments.mislabel import flip_labels

    y = np.arange(1000) % 10
    noisy, flipped = flip_labels(y, 0.1, 10, seed=4)
    assert flipped.sum() == 100 and noisy.dtype == np.int64
    np.testing.assert_array_equal(noisy != y, flipped)
    assert noisy.min() >= 0 and noisy.max() <= 9
    # each wrong label is drawn from the 9 other classes: all of them occur
    assert len(np.unique((noisy[flipped] - y[flipped]) % 10)) == 9
    again, same = flip_labels(y, 0.1, 10, seed=4)
    np.testing.assert_array_equal(again, noisy)
    assert not np.array_equal(flip_labels(y, 0.1, 10, seed=5)[1], flipped)


def test_fraction_found_curves_and_the_goal(tmp_path):
    from influence.experiments.mislabel import MislabelResult, fraction_found, found_at, plot_mislabel

    flipped = np.zeros(20, bool)
    flipped[[3, 7, 11, 19]] = True
    best = np.concatenate([np.flatnonzero(flipped), np.flatnonzero(~flipped)])
    curve = fraction_found(best, flipped)
    assert curve.shape == (21,) and curve[0] == 0 and curve[4] == 1 and curve[-1] == 1
    np.testing.assert_allclose(fraction_found(best[::-1], flipped)[:17], 0)
    assert found_at(curve, 0.10) == 0.5 and found_at(curve, 0.05) == 0.25
    order = [3, 0, 7, 1, 11, 2, 19] + [i for i in range(20) if i not in (3, 0, 7, 1, 11, 2, 19)]
    worse = fraction_found(np.array(order), flipped)
    res = MislabelResult("mislabel", "test", {"self-influence": curve, "loss": worse}, 1.0, 20, 4, 0.0)
    assert res.at("loss", 0.10) == 0.25 and res.at("random (expected)", 0.10) == 0.10 and res.ok
    assert not MislabelResult("mislabel", "t", {"self-influence": worse, "loss": curve}, 1.0, 20, 4, 0.0).ok
    plot_mislabel(res, tmp_path / "m.png")
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
