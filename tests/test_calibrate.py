"""--calibrate (influence.calibration): LDS against retraining on half-subsets, its cache, its refusal, and
calculate.py's step end to end. Tiny models and data: each test takes seconds."""
import contextlib
import io
import json
import subprocess

import numpy as np
import pytest

keras = pytest.importorskip("keras")

SIZE, K, N, T = 8, 4, 96, 5


def _images(rng, n):
    """uint8 (n, 8, 8, 3) whose colour depends on the class (learnable), int64 labels (n,)."""
    y = rng.integers(0, K, n)
    x = rng.normal(70, 45, (n, SIZE, SIZE, 3)) + 35.0 * y[:, None, None, None]
    x[..., 1] += 60.0 * (y % 2)[:, None, None]
    return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)


def _build(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((SIZE, SIZE, 3)), keras.layers.Conv2D(2, 3, activation="relu", name="conv"),
                             keras.layers.Flatten(), keras.layers.Dense(K, activation="softmax", name="dense")])


def _save_model(path, x, y, compiled=True, epochs=2):
    model = _build()
    if compiled:
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=keras.losses.SparseCategoricalCrossentropy())
        model.fit(x / 255.0, y, epochs=epochs, batch_size=32, verbose=0)
    model.save(path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cal")
    rng = np.random.default_rng(0)
    x, y = _images(rng, N)
    xt, yt = _images(rng, T)
    return root, _save_model(root / "model.keras", x, y), x, y, xt, yt


def _influence(tiny, **kw):
    import influence

    _, model, x, y, _, _ = tiny
    return influence.Influence(str(model), train=(x, y), preprocess="unit", progress=False,
                               **{"solver": "exact", "damping": "1x", **kw})


# --- pure-Python Spearman: the LDS by hand ------------------------------------------------------------------

def _ranks(values):
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _spearman(a, b):
    ra, rb = _ranks(list(a)), _ranks(list(b))
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((p - ma) * (q - mb) for p, q in zip(ra, rb))
    den = (sum((p - ma) ** 2 for p in ra) * sum((q - mb) ** 2 for q in rb)) ** 0.5
    return cov / den if den else float("nan")


@pytest.mark.slow
def test_lds_equals_a_spearman_by_hand_on_the_same_numbers(tiny, tmp_path):
    inf = _influence(tiny, cache=str(tmp_path))         # the grid's fits are cached: scores() below loads them
    xt, yt = tiny[4], tiny[5]
    result = inf.calibrate(xt, yt, subsets=6, seeds=2, epochs=1, solvers=["ekfac"], dampings=["0.1x", "1x"])
    assert result.facts["cache"].startswith(str(tmp_path / "calibration" / "retrain-"))
    names = [c.name for c in result.cells]
    assert names == ["exact 1x", "exact 0.1x", "ekfac 0.1x", "ekfac 1x"] and result.cells[0].run
    with np.load(result.facts["cache"]) as z:
        masks, losses = z["masks"][:6], z["losses"][:2, :6]
    assert masks.shape == (6, N) and (masks.sum(axis=1) == N // 2).all() and np.isfinite(losses).all()
    actual = losses.mean(axis=0)                                  # (M, T): the seed mean
    for i, cell in enumerate(result.cells):
        # the scores by another path: the API's own scores() with that solver and damping
        scores = inf.with_solver(cell.solver, damping=cell.damping).scores(xt, yt).astype(np.float64)   # (T, N)
        for t in range(T):
            predicted = [sum(float(scores[t, j]) for j in range(N) if not masks[m, j]) / N for m in range(6)]
            want = _spearman(predicted, list(actual[:, t]))
            assert result.lds[i, t] == pytest.approx(want, abs=1e-9), (cell.name, t)
    ceiling = np.mean([_spearman(list(losses[0, :, t]), list(losses[1, :, t])) for t in range(T)])
    assert result.ceiling == pytest.approx(ceiling, abs=1e-12)
    means = [float(np.nanmean(row)) for row in result.lds]
    assert result.best == int(np.nanargmax(means))
    assert f"LDS {means[result.best]:.2f} (noise ceiling {ceiling:.2f}) with {names[result.best]}" in result.verdict()
    # the dampings really differ: exact 1x and 0.1x give other scores (not one fit's λ reused)
    assert not np.allclose(inf.with_solver("exact", damping="1x").scores(xt, yt),
                           inf.with_solver("exact", damping="0.1x").scores(xt, yt))


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["exact", "krylov", "kfac", "ekfac", "cg", "pcg", "dpcg", "store"])
def test_changing_the_damping_of_a_fitted_solver_equals_a_fresh_fit(tiny, solver):
    """calibrate fits each solver once and varies λ (InverseHVP.set_damping): the same as fitting at that λ."""
    from influence.settings import parse_damping

    inf = _influence(tiny)
    grads = inf.test_gradients(tiny[4][:2], tiny[5][:2])
    first = inf.with_solver(solver, damping="0.1x")
    first.fit()
    first.solver.solve(grads)                     # used once at 0.1x
    first.solver.set_damping(parse_damping("3x"))
    got = [np.concatenate([np.ravel(p) for p in v]) for v in first.solver.solve(grads)]
    fresh = inf.with_solver(solver, damping="3x")
    fresh.fit()
    want = [np.concatenate([np.ravel(p) for p in v]) for v in fresh.solver.solve(grads)]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6 * np.abs(w).max())


def test_the_store_scores_its_cells_from_its_rows_with_no_pass_over_the_training_set(tiny, tmp_path, monkeypatch):
    """calibrate's store cells are products with the stored rows: the numbers the run gives at each damping, and no
    training image is read once the store is written."""
    from influence.calibration.grid import Cell
    from influence.calibration.lds_metrics import predicted_changes, subset_masks
    from influence.calibration.scoring import score_solver
    from influence.data.arrays import TrainSet
    from influence.settings import parse_damping

    _, _, x, y, xt, yt = tiny
    masks = subset_masks(N, 6)
    runs = {d: _influence(tiny, solver="store", damping=d, cache=tmp_path / "cache") for d in ("0.1x", "10x")}
    want = {d: predicted_changes(np.asarray(inf.scores(xt, yt), np.float64), masks) for d, inf in runs.items()}
    sibling = _influence(tiny, solver="store", damping="0.1x", cache=tmp_path / "cache")
    grads = sibling.test_gradients(xt, yt)
    sibling.fit()
    for name in ("take", "read_batch"):
        monkeypatch.setattr(TrainSet, name, lambda *a, **k: pytest.fail("a training image was read"))
    cells = [Cell("store", parse_damping(d)) for d in ("0.1x", "10x")]
    got, lams = score_solver(sibling, cells, grads, masks)
    for cell, d in zip(cells, ("0.1x", "10x")):
        np.testing.assert_allclose(got[cell], want[d], rtol=1e-5, atol=1e-6 * np.abs(want[d]).max())
        assert set(lams[cell]) == {"conv", "dense"}                   # {layer: λ}, as EK-FAC's
    assert not np.allclose(got[cells[0]], got[cells[1]])


def test_the_store_s_two_structures_are_scored_from_one_fit_as_runs_that_asked_for_each(tiny, monkeypatch):
    """score_cells fits the store once (no cache: the second structure takes the first's fit, so K-FAC's and the
    store's passes run once) and each structure's cell equals a run that asked for it."""
    from influence.calibration.grid import grid_cells
    from influence.calibration.lds_metrics import predicted_changes, subset_masks
    from influence.calibration.scoring import score_cells
    from influence.store.solver import StoreSolver

    _, _, x, y, xt, yt = tiny
    masks = subset_masks(N, 6)
    want = {s: predicted_changes(np.asarray(_influence(tiny, solver="store", damping="1x", store_curvature=s)
                                            .scores(xt, yt), np.float64), masks) for s in ("blocks", "dense")}
    inf = _influence(tiny, solver="store", damping="1x")
    fits = []
    original = StoreSolver.fit
    monkeypatch.setattr(StoreSolver, "fit",
                        lambda self, *a, **k: (fits.append(self.structure), original(self, *a, **k)))
    cells = grid_cells("store", "1x", ["store"], ["1x"], run_options=(("store_curvature", inf.solver.structure),))
    assert [c.label for c in cells] == ["store " + inf.solver.structure, "store " +
                                        ({"blocks", "dense"} - {inf.solver.structure}).pop()]
    predicted, lams, skipped = score_cells(inf, cells, inf.test_gradients(xt, yt), masks)
    assert len(fits) == 1 and not skipped
    for cell in cells:
        got = predicted[cell]
        want_cell = want[dict(cell.options)["store_curvature"]]
        np.testing.assert_allclose(got, want_cell, rtol=1e-5, atol=1e-6 * np.abs(want_cell).max())
    assert not np.allclose(predicted[cells[0]], predicted[cells[1]])


@pytest.mark.slow
def test_a_second_call_reuses_the_retrainings_and_an_interrupted_one_resumes(tiny, tmp_path):
    inf = _influence(tiny)
    xt, yt = tiny[4], tiny[5]
    calls, state = [], {"fail_after": None}

    def train_fn(x, y):
        if state["fail_after"] is not None and len(calls) >= state["fail_after"]:
            raise RuntimeError("killed")
        calls.append(len(y))
        model = _build()
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        model.fit(x, y, epochs=1, batch_size=32, verbose=0)
        return model

    kw = dict(train_fn=train_fn, seeds=1, solvers=["exact"], dampings=["1x"], cache=tmp_path)
    first = inf.calibrate(xt, yt, subsets=4, **kw)
    assert calls == [N // 2] * 4 and first.facts["runs_trained"] == 4
    assert first.ceiling is None and "noise ceiling not measured" in first.verdict()
    again = inf.calibrate(xt, yt, subsets=4, **kw)
    assert len(calls) == 4 and again.facts["runs_trained"] == 0 and again.facts["runs_reused"] == 4
    np.testing.assert_array_equal(first.lds, again.lds)
    state["fail_after"] = 5                     # more subsets: the 5th run finishes, the 6th is killed
    with pytest.raises(RuntimeError, match="killed"):
        inf.calibrate(xt, yt, subsets=6, **kw)
    assert len(calls) == 5
    state["fail_after"] = None
    resumed = inf.calibrate(xt, yt, subsets=6, **kw)
    assert len(calls) == 6 and resumed.facts["runs_trained"] == 1 and resumed.facts["runs_reused"] == 5
    # other epochs are another key: nothing reused
    other = inf.calibrate(xt, yt, subsets=2, **{**kw, "cache": tmp_path / "elsewhere"})
    assert other.facts["runs_trained"] == 2 and len(calls) == 8


def test_a_model_without_compile_config_is_refused_in_one_line(tiny, tmp_path):
    import influence
    from influence.errors import SettingError

    _, _, x, y, xt, yt = tiny
    path = _save_model(tmp_path / "bare.keras", x, y, compiled=False)
    inf = influence.Influence(str(path), train=(x, y), preprocess="unit", solver="exact", progress=False)
    with pytest.raises(SettingError, match=r"^calibrate: the model .* has no compile config .* train_fn"):
        inf.calibrate(xt, yt, subsets=2)


def test_the_explicit_flags_limit_what_calibrate_applies():
    from influence.calibration.grid import grid_cells
    from influence.calibration.job import allowed_cells

    cells = grid_cells("krylov", "0.1x", ["ekfac"], ["1x"])
    assert [c.name for c in cells] == ["krylov 0.1x", "krylov 1x", "ekfac 1x"]
    assert allowed_cells(cells, frozenset()) == [True, True, True]
    assert allowed_cells(cells, frozenset({"solver"})) == [True, True, False]
    assert allowed_cells(cells, frozenset({"damping"})) == [True, False, False]
    assert allowed_cells(cells, frozenset({"solver", "damping"})) == [True, False, False]


def test_a_run_at_damping_optimizer_also_measures_other_factors_of_it():
    """With the default grid a run at damping optimizer (any factor) also measures its solver at factors 0.1, 1 and 3
    of D (the range auto's factor is read in, and the theory's); a grid of dampings given keeps to them."""
    from influence.calibration.grid import grid_cells

    names = [c.name for c in grid_cells("krylov", "optimizer:0.14")]
    assert names == ["krylov optimizer:0.14", "krylov optimizer:0.1", "krylov optimizer", "krylov optimizer:3",
                     "krylov 0.1x", "krylov 1x", "krylov 10x", "ekfac 0.1x", "ekfac 1x", "ekfac 10x"]
    assert [c.name for c in grid_cells("krylov", "optimizer:3")][:4] == ["krylov optimizer:3", "krylov optimizer:0.1",
                                                                         "krylov optimizer", "krylov 0.1x"]
    assert [c.name for c in grid_cells("krylov", "optimizer", None, ["1x"])] == ["krylov optimizer", "krylov 1x",
                                                                                 "ekfac 1x"]
    assert [c.name for c in grid_cells("krylov", "0.1x")][:4] == ["krylov 0.1x", "krylov 1x", "krylov 10x",
                                                                    "ekfac 0.1x"]


def test_the_store_s_cells_come_in_both_structures_the_run_s_first():
    """The store's two structures share one fit, so the grid has a row of each at every damping (the run's damping
    included); an explicit store_curvature keeps its own structure's cells only."""
    from influence.calibration.grid import grid_cells
    from influence.calibration.job import allowed_cells

    cells = grid_cells("store", "optimizer", None, ["1x"], run_options=(("store_curvature", "blocks"),))
    assert [c.name for c in cells] == ["store blocks optimizer", "store blocks 1x", "store dense optimizer",
                                       "store dense 1x", "ekfac 1x"]
    assert cells[0].run and cells[0].label == "store blocks" and dict(cells[2].options) == {"store_curvature": "dense"}
    assert allowed_cells(cells, frozenset()) == [True] * 5
    assert allowed_cells(cells, frozenset({"store_curvature"})) == [True, True, False, False, True]
    assert allowed_cells(cells, frozenset({"solver", "store_curvature"})) == [True, True, False, False, False]
    dense_run = grid_cells("store", "1x", ["store"], ["1x", "10x"], run_options=(("store_curvature", "dense"),))
    assert [c.name for c in dense_run] == ["store dense 1x", "store dense 10x", "store blocks 1x", "store blocks 10x"]
    assert [c.name for c in grid_cells("krylov", "1x", ["store"], ["1x"])] == ["krylov 1x", "store blocks 1x",
                                                                               "store dense 1x"]


# --- calculate.py --calibrate, in-process -------------------------------------------------------------------

@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny):
    from influence.data.prepare import prepare_data
    from influence.prepare_cli import build_prepare_data_parser
    from conftest import save_image

    root = tmp_path_factory.mktemp("calproj")
    rng = np.random.default_rng(1)
    x, y = _images(rng, 48)
    for i, (img, label) in enumerate(zip(x, y)):
        save_image(str(root / "train" / str(label) / f"{i:03d}.png"), img)
    xt, yt = _images(rng, 4)
    for i, (img, label) in enumerate(zip(xt, yt)):
        save_image(str(root / "orig" / str(label) / f"{i:03d}.png"), img)
    prepare_data(build_prepare_data_parser().parse_args(
        ["-tr", str(root / "train"), "-ts", str(root / "orig"), "-bs", "20", "--size", str(SIZE), "--out",
         str(root / "data"), "--workers", "1"]))
    from influence.data.archive_reader import TrainArchive

    with TrainArchive(root / "data" / "train.npz") as train:
        xa, ya = train.take(np.arange(len(train)))
    _save_model(root / "model.keras", xa, ya, epochs=3)
    _save_model(root / "bare.keras", xa, ya, compiled=False)
    return root


def calc(root, *args):
    from influence.calculate_cli import build_parser, job
    from influence.cli import main

    err = io.StringIO()
    with contextlib.chdir(root), contextlib.redirect_stderr(err):
        try:
            code = main(build_parser, job, ["--data", "data", "--preprocess", "unit", "--no-figures", *map(str, args)])
        except SystemExit as exc:
            code = exc.code
    return subprocess.CompletedProcess([], code, "", err.getvalue())


CAL = ("--calibrate", "--calibrate-subsets", "4", "--calibrate-solvers", "kfac", "--calibrate-damping", "1x,10x")


@pytest.mark.slow
def test_calculate_calibrate_writes_its_files_and_run_json_and_a_rerun_reuses_them(project):
    from influence.calibration.retrain import default_epochs

    r = calc(project, "--model", "model.keras", *CAL, "--rank", "20", "--out", "out")
    assert r.returncode == 0, r.stderr
    out = project / "out"
    run = json.loads((out / "run.json").read_text())
    cal = run["calibration"]
    names = [f"{row['solver']} {row['damping']}" for row in cal["rows"]]
    own = run["calibration"]["run"]["damping"]                      # auto: optimizer:c, c from the training loss
    assert own.startswith("optimizer") and names == [f"krylov {own}", "krylov 1x", "krylov 10x", "kfac 1x", "kfac 10x"]
    assert cal["rows"][0]["run"] and sum(row["best"] for row in cal["rows"]) == 1
    assert cal["subsets"] == 4 and cal["seeds"] == [0, 1] and cal["runs_trained"] == 8
    model = keras.models.load_model(project / "model.keras")
    assert cal["epochs"] == default_epochs(int(model.optimizer.iterations), 32, 48) and cal["batch_size"] == 32
    best = next(row for row in cal["rows"] if row["best"])
    assert best["lds"] == max(row["lds"] for row in cal["rows"] if row["lds"] is not None)
    assert cal["noise_ceiling"] is not None and "scores on this model: LDS" in cal["verdict"]
    # neither solver nor damping given: the run uses the best cell whose gain over its own is beyond the noise
    # (grid.choose on the per-test LDS), and run.json says so
    from influence.calibration.grid import choose, nanmean

    per_test = np.array(json.loads((out / "calibration.json").read_text())["lds_per_test"], dtype=float)
    use = cal["rows"][choose(np.array([nanmean(row) for row in per_test]), per_test=per_test, own=0)]
    assert cal["applied"] == {"solver": use["solver"], "options": {}, "damping": use["damping"],
                              "changed": not use["run"]}
    assert run["settings"]["solver"] == use["solver"] and str(run["settings"]["damping"]) == use["damping"]
    assert "calibrate_s" in run["timings"] and cal["verdict"] in r.stderr
    lines = (out / "calibration.csv").read_text().splitlines()
    assert lines[0].startswith("solver,options,damping,lambda,lds") and len(lines) == 1 + len(names)
    assert json.loads((out / "calibration.json").read_text())["rows"] == cal["rows"]
    assert len(list((out / "curvature" / "calibration").glob("retrain-*.npz"))) == 1
    # a rerun: the retrainings come from the cache, the same choice, and the run resumes
    again = calc(project, "--model", "model.keras", *CAL, "--rank", "20", "--out", "out")
    assert again.returncode == 0, again.stderr
    cal2 = json.loads((out / "run.json").read_text())["calibration"]
    assert cal2["runs_trained"] == 0 and cal2["runs_reused"] == 8 and cal2["rows"] == cal["rows"]


@pytest.mark.slow
def test_calculate_calibrate_keeps_an_explicit_solver_and_damping(project):
    r = calc(project, "--model", "model.keras", *CAL, "--calibrate-seeds", "1", "--solver", "kfac", "--damping",
             "10x", "--out", "kept")
    assert r.returncode == 0, r.stderr
    run = json.loads((project / "kept" / "run.json").read_text())
    assert run["settings"]["solver"] == "kfac" and run["settings"]["damping"] == "10x"
    assert run["calibration"]["applied"]["changed"] is False and run["calibration"]["noise_ceiling"] is None
    assert "noise ceiling not measured" in run["calibration"]["verdict"]


def test_calculate_calibrate_refuses_a_model_without_compile_config(project):
    r = calc(project, "--model", "bare.keras", *CAL, "--out", "bare")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --calibrate: the model bare.keras has no compile config"), last


@pytest.mark.slow
def test_calculate_calibrate_scores_with_the_cell_it_picks(project, monkeypatch):
    """The best cell is not the run's own: the run is rebuilt with its solver and damping, and its scores are
    that cell's (equal to a run that asked for it)."""
    from influence.calibration import grid

    names = ["krylov optimizer", "krylov 1x", "krylov 10x", "kfac 1x", "kfac 10x"]
    monkeypatch.setattr(grid, "choose", lambda means, allowed=None, per_test=None, own=None: names.index("kfac 10x"))
    r = calc(project, "--model", "model.keras", *CAL, "--calibrate-seeds", "1", "--rank", "20", "--out", "picked")
    assert r.returncode == 0, r.stderr
    run = json.loads((project / "picked" / "run.json").read_text())
    assert run["settings"]["solver"] == "kfac" and run["settings"]["damping"] == "10x"
    assert run["calibration"]["applied"] == {"solver": "kfac", "options": {}, "damping": "10x", "changed": True}
    assert run["solver_choice"].startswith("calibrate: kfac 10x") and run["solver_info"]["solver"] == "kfac"
    assert "this run uses kfac 10x" in r.stderr
    monkeypatch.undo()
    asked = calc(project, "--model", "model.keras", "--solver", "kfac", "--damping", "10x", "--out", "asked")
    assert asked.returncode == 0, asked.stderr
    files = sorted((project / "picked" / "orig").rglob("*_scores.npy"))
    assert len(files) == 4
    for got in files:
        np.testing.assert_array_equal(np.load(got), np.load(project / "asked" / got.relative_to(project / "picked")))


@pytest.mark.slow
def test_calculate_calibrate_shards_the_retraining_over_two_ray_workers(project):
    """--workers 2: the retrainings run as Ray tasks and give the losses, the table and the choice of one
    process."""
    pytest.importorskip("ray", reason="Ray is optional: pip install -r requirements-distributed.txt")
    import os

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    args = ("--model", "model.keras", *CAL, "--calibrate-seeds", "1", "--solver", "kfac")
    local = calc(project, *args, "--out", "one")
    assert local.returncode == 0, local.stderr
    sharded = calc(project, *args, "--workers", "2", "--out", "ray")
    assert sharded.returncode == 0, sharded.stderr
    assert "calibrate: 4 retraining(s) as Ray tasks, 2 at once" in sharded.stderr
    one, ray = (json.loads((project / out / "run.json").read_text())["calibration"] for out in ("one", "ray"))
    assert ray["ray"] and not one["ray"] and ray["runs_trained"] == one["runs_trained"] == 4
    with np.load(project / one["cache"]) as a, np.load(project / ray["cache"]) as b:
        assert a["done"].all() and b["done"].all()
        np.testing.assert_allclose(b["losses"], a["losses"], rtol=1e-5)
    assert [r["lds"] for r in ray["rows"]] == pytest.approx([r["lds"] for r in one["rows"]], abs=1e-9)
    assert ray["best"] == one["best"] and ray["applied"] == one["applied"]


# --- a calibration kept for later runs (influence.calibration.saved_choice) -------------------------------------

def _rows(*cells):
    return [{"solver": s, "damping": d, "lds": v, "skipped": ""} for s, d, v in cells]


def test_a_kept_calibration_picks_the_best_cell_that_agrees_with_the_explicit_settings():
    from influence.calibration.saved_choice import pick

    record = {"rows": _rows(("krylov", "0.1x", 0.26), ("krylov", "10x", 0.43), ("ekfac", "0.1x", 0.30),
                            ("ekfac", "1x", 0.45), ("ekfac", "10x", None))}
    best, own, _ = pick(record, set(), "krylov", "auto")             # auto is 0.1x: measured, and not the best
    assert (best["solver"], best["damping"]) == ("ekfac", "1x") and own["lds"] == 0.26
    best, _, _ = pick(record, {"solver"}, "krylov", "auto")          # the solver given: its best damping
    assert (best["solver"], best["damping"]) == ("krylov", "10x")
    best, _, _ = pick(record, {"damping"}, "krylov", "0.1x")         # the damping given: the best solver at it
    assert (best["solver"], best["damping"]) == ("ekfac", "0.1x")
    assert pick(record, {"solver", "damping"}, "krylov", "0.1x") is None
    assert pick(record, {"iter", "bsize"}, "lissa", "auto") is None    # the original tool's LiSSA, as asked
    assert pick(record, {"solver"}, "cg", "auto") is None              # nothing measured for cg
    _, own, _ = pick(record, set(), "cg", "auto")
    assert own is None
    # the store's structures: the best row's structure is taken unless store_curvature is given
    store = {"rows": [{**r, "options": {"store_curvature": o}} for r, o in
                      zip(_rows(("store", "optimizer", 0.30), ("store", "optimizer", 0.36), ("store", "1x", 0.33)),
                          ("blocks", "dense", "blocks"))] + _rows(("ekfac", "1x", 0.20))}
    best, own, _ = pick(store, set(), "store", "optimizer", {"store_curvature": "blocks"})
    assert (best["damping"], best["options"], own["lds"]) == ("optimizer", {"store_curvature": "dense"}, 0.30)
    best, own, _ = pick(store, {"store_curvature"}, "store", "optimizer", {"store_curvature": "blocks"})
    assert (best["damping"], best["options"]) == ("1x", {"store_curvature": "blocks"})
    _, own, _ = pick(store, set(), "store", "optimizer", {"store_curvature": "dense"})
    assert own["lds"] == 0.36
    # with the per-test LDS kept, a best row within the noise of the run's own leaves the run its own
    noisy = {**record, "lds_per_test": [[0.05, 0.6, 0.13], [0.5, 0.1, 0.7], [0.3, 0.3, 0.3], [0.46, 0.44, 0.45],
                                        [None, None, None]]}
    chosen, own, best = pick(noisy, set(), "krylov", "auto")
    assert (best["solver"], best["damping"]) == ("ekfac", "1x") and chosen is own and own["damping"] == "0.1x"
    chosen, own, best = pick(noisy, set(), "krylov", "10x")          # krylov 10x: a gain of 0.02 ± 0.19, kept
    assert chosen is own and own["damping"] == "10x" and best["damping"] == "1x"


def test_the_choice_replaces_the_run_s_cell_only_for_a_gain_beyond_the_noise():
    """choose: the largest mean, unless its gain over the run's own, paired over the test images, is within
    SWITCH_Z standard errors; a clear gain switches, a noisy one of the same mean does not."""
    from influence.calibration.grid import SWITCH_Z, choose, paired_gain

    own = np.array([0.30, 0.40, 0.35, 0.45, 0.38, 0.42])
    clear = own + 0.03 + np.array([0.001, -0.001, 0.002, -0.002, 0.0, 0.0])
    noisy = own + 0.04 + np.array([0.2, -0.2, 0.15, -0.15, 0.1, -0.1])
    per_test = np.stack([own, clear, noisy])
    means = per_test.mean(axis=1)
    assert choose(means) == 2 and choose(means, per_test=per_test, own=0) == 1     # the clear gain, not the noisy one
    assert paired_gain(noisy, own)[0] == pytest.approx(0.04) and paired_gain(noisy, own)[1] > 0.04 / SWITCH_Z
    assert choose(means, allowed=[True, False, True]) == 2                     # no per-test values: the largest mean
    assert choose(means, allowed=[True, False, True], per_test=per_test, own=0) == 0
    assert choose(np.array([np.nan, 0.1, 0.2]), per_test=per_test, own=0) == 2   # the run's own not scored


@pytest.mark.slow
def test_a_later_run_uses_the_kept_calibration_of_its_model_and_says_so(project):
    """--calibrate keeps its table in the curvature cache; a later run on the same model and training archive
    without --calibrate takes the best cell that agrees with its explicit settings, records why in run.json,
    and scores as a run that asked for that cell; another model's run finds nothing."""
    import shutil

    from influence.calibration import saved_choice

    r = calc(project, "--model", "model.keras", *CAL, "--calibrate-seeds", "1", "--rank", "20", "--cache", "kc",
             "--out", "kc_first")
    assert r.returncode == 0, r.stderr
    (path,) = (project / "kc" / "calibration").glob("choice-*.json")
    first = json.loads((project / "kc_first" / "run.json").read_text())["calibration"]
    assert str(path) in first["files"][-1] or first["files"][-1].endswith(path.name)
    data = json.loads(path.read_text())
    assert data["calibration"]["rows"] == first["rows"]
    # make the choice visible: kfac 10x the best cell, krylov 1x the best krylov
    own = first["run"]["damping"]
    lds = {f"krylov {own}": 0.1, "krylov 1x": 0.3, "krylov 10x": 0.2, "kfac 1x": 0.4, "kfac 10x": 0.5}
    for row in data["calibration"]["rows"]:
        row["lds"] = lds[f"{row['solver']} {row['damping']}"]
    data["calibration"]["lds_per_test"] = [[row["lds"]] * 4 for row in data["calibration"]["rows"]]   # noiseless
    path.write_text(json.dumps(data))

    def run(out, *args):
        res = calc(project, "--model", "model.keras", "--rank", "20", "--cache", "kc", "--out", out, *args)
        assert res.returncode == 0, res.stderr
        return json.loads((project / out / "run.json").read_text()), res.stderr

    later, err = run("kc_later")
    assert later["settings"]["solver"] == "kfac" and later["settings"]["damping"] == "10x"
    used = later["calibration_used"]
    assert used["changed"] and (used["solver"], used["damping"], used["lds"]) == ("kfac", "10x", 0.5)
    assert used["own"] == {"solver": "krylov", "options": {}, "damping": own, "lds": 0.1}
    assert later["solver_choice"].startswith("calibration kept: kfac 10x") and "calibration kept: kfac 10x" in err
    asked, _ = run("kc_asked", "--solver", "kfac", "--damping", "10x")
    assert "calibration_used" not in asked
    for got in sorted((project / "kc_later" / "orig").rglob("*_scores.npy")):
        np.testing.assert_array_equal(np.load(got), np.load(project / "kc_asked" / got.relative_to(project / "kc_later")))
    krylov, _ = run("kc_krylov", "--solver", "krylov")
    assert krylov["settings"]["damping"] == "1x" and krylov["calibration_used"]["solver"] == "krylov"
    lissa, _ = run("kc_lissa", "-i", "2", "-b", "4")
    assert lissa["settings"]["solver"] == "lissa" and "calibration_used" not in lissa
    # the same means, but each cell's gain over the run's own within the noise of its per-test values: kept
    rows = data["calibration"]["rows"]
    swing = np.array([1.0, -1.0, 1.0, -1.0])             # the run's own up where every other cell is down
    data["calibration"]["lds_per_test"] = [list(row["lds"] + (swing if row["run"] else -swing)) for row in rows]
    path.write_text(json.dumps(data))
    noisy, _ = run("kc_noisy")
    assert (noisy["settings"]["solver"], noisy["settings"]["damping"]) == ("krylov", own)
    assert noisy["calibration_used"]["changed"] is False and "within the noise" in noisy["solver_choice"]
    # the key holds the weights: another model's run finds no kept calibration
    shutil.copy(project / "model.keras", project / "other.keras")
    import keras

    other = keras.models.load_model(project / "other.keras")
    other.layers[-1].kernel.assign(other.layers[-1].kernel * 1.01)
    other.save(project / "other.keras")
    res = calc(project, "--model", "other.keras", "--rank", "20", "--cache", "kc", "--out", "kc_other")
    assert res.returncode == 0, res.stderr
    assert "calibration_used" not in json.loads((project / "kc_other" / "run.json").read_text())
    assert saved_choice.load(project / "kc", {"another": "key"}) is None


def test_calculate_records_damping_optimizer_and_a_rerun_resumes(project):
    """damping auto on the Adam-trained model: run.json's settings say optimizer:c (c read from the training loss,
    not the relative factor), and a rerun into the same folder agrees with them and resumes."""
    first = calc(project, "--model", "model.keras", "--rank", "20", "--out", "opt")
    assert first.returncode == 0, first.stderr
    run = json.loads((project / "opt" / "run.json").read_text())
    assert run["settings"]["damping"].startswith("optimizer") and run["solver_info"]["response"]["optimizer"] == "Adam"
    again = calc(project, "--model", "model.keras", "--rank", "20", "--out", "opt")
    assert again.returncode == 0, again.stderr
    assert "0 to score" in again.stderr


def test_init_fixed_starts_every_retraining_from_one_initialisation(tiny):
    """calibrate_init fixed: two seeds give the same untrained model (0 epochs) but other trained ones (the data
    order); fresh draws the weights under each seed. A train_fn with fixed is refused in one line; calculate.py
    takes --calibrate-init."""
    import influence
    from influence.calibration import retrain
    from influence.data.arrays import TrainSet
    from influence.errors import SettingError
    from influence.model.models import make_preprocess

    root, model_path, x, y, xt, yt = tiny
    model = keras.models.load_model(model_path)
    config = retrain.compile_config(model)
    train = TrainSet([(x, y)], unit=True)

    def losses(init, seed, epochs):
        fit = retrain.compiled_fit(model, config, epochs, 8)
        return retrain.Trainer(fit, train, xt, yt, make_preprocess("unit"), init=init)(np.arange(32), seed)

    np.testing.assert_array_equal(losses("fixed", 0, 0), losses("fixed", 1, 0))
    assert not np.allclose(losses("fresh", 0, 0), losses("fresh", 1, 0))
    assert not np.allclose(losses("fixed", 0, 1), losses("fixed", 1, 1))
    inf = influence.Influence(str(model_path), train=(x, y), preprocess="unit", progress=False, solver="exact")
    with pytest.raises(SettingError, match="^calibrate_init: fixed starts the compiled recipe's runs"):
        inf.calibrate(xt, yt, train_fn=lambda a, b: model, subsets=2, seeds=1, init="fixed")
    with pytest.raises(SettingError, match="^calibrate_init: must be one of fresh, fixed"):
        inf.calibrate(xt, yt, subsets=2, seeds=1, init="warm")
    from influence.calculate_cli import build_parser

    assert build_parser().parse_args(["--calibrate-init", "fixed"]).calibrate_init == "fixed"
