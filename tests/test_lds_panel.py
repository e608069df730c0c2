"""The LDS panel's briefly trained models (issue 30) and its damping grid: parameter counts, step counts,
``--lds-model`` / ``--lds-solvers`` choices, and the grid's shared curvature cache. Nothing is trained."""
import json
import re

import numpy as np
import pytest

from influence.experiments import lds, lds_models

#: name -> (trainable parameters, optimizer steps on all 1500 images, on a half-subset of 750)
NEW = {"mlp-brief": (38_890, 329, 168), "bn-brief": (7_186, 480, 240), "wide": (659_267, 329, 168),
       "mlp-large": (324_010, 329, 168)}


@pytest.mark.parametrize("name", sorted(NEW))
def test_new_models_build_with_their_parameter_counts(name):
    import keras

    recipe = lds_models.MODELS[name]
    model = lds_models.BUILDERS[recipe["model"]](0)
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert trainable == NEW[name][0]
    assert model.output_shape == (None, 10) and model.input_shape == (None, 32, 32, 3)
    assert recipe["l2"] == 1e-4 and recipe["optimizer"] == f"Adam({recipe['lr']:.0e})".replace("e-0", "e-")
    # the L2 of the recipe is the model's: every kernel carries L2(1e-4)
    kernels = [layer for layer in model.layers if hasattr(layer, "kernel_regularizer") and layer.kernel_regularizer]
    assert kernels and all(float(k.kernel_regularizer.l2) == pytest.approx(1e-4) for k in kernels)
    keras.backend.clear_session()


@pytest.mark.parametrize("name", sorted(NEW))
def test_recipe_steps_are_what_the_docstring_says(name):
    recipe = lds_models.MODELS[name]
    _, full, half = NEW[name]
    assert lds_models.recipe_steps(recipe) == full
    assert lds_models.recipe_steps(recipe, recipe["n_train"] // 2) == half
    # the module docstring states both counts and how they are made
    doc = " ".join(lds_models.__doc__.split())
    entry = re.search(rf"``{re.escape(name)}`` \([^)]*\): (\d+) epochs × (\d+) batches of (\d+) = (\d+) steps "
                      rf"\(half-subsets: (\d+) × (\d+) = (\d+) steps\)", doc)
    assert entry, f"{name} is not described in lds_models' docstring"
    epochs, batches, batch, steps, epochs_half, batches_half, steps_half = map(int, entry.groups())
    assert (epochs, batch, steps) == (recipe["epochs"], recipe["batch_size"], full) and epochs * batches == steps
    assert (epochs_half, steps_half) == (recipe["epochs"], half) and epochs_half * batches_half == steps_half


def test_recipe_steps_by_hand():
    assert lds_models.recipe_steps({"epochs": 3, "batch_size": 10, "n_train": 21}) == 9
    assert lds_models.recipe_steps({"epochs": 3, "batch_size": 10, "n_train": 21}, 20) == 6


def test_old_recipes_unchanged():
    """The existing models' recipes are the keys of their retraining caches: unchanged, no ``lr`` (3e-3)."""
    assert lds_models.MODELS["demo"] is lds_models.RECIPE
    assert lds_models.MODELS["bn"] == {"model": "bn_cnn", "epochs": 8, "batch_size": 32, "optimizer": "Adam(3e-3)",
                                       "n_train": 1500, "size": 32}
    assert lds_models.MODELS["mlp"] == {"model": "mlp", "epochs": 40, "batch_size": 32, "optimizer": "Adam(3e-3)",
                                        "n_train": 1500, "size": 32}


def test_lds_model_and_solver_choices_come_from_the_registries():
    from influence.experiments import validate_cli

    parser = validate_cli.build_parser()
    actions = {a.dest: a for a in parser.options}
    assert tuple(actions["lds_model"].choices) == tuple(lds_models.MODELS)
    assert set(NEW) <= set(actions["lds_model"].choices)
    assert tuple(actions["lds_solvers"].choices) == tuple(lds.SOLVER_SETS)
    args = parser.parse_args(["--panels", "lds", "--lds-model", "wide", "--lds-solvers", "grid"])
    assert args.lds_model == "wide" and args.lds_solvers == "grid"
    assert parser.parse_args([]).lds_solvers == "panel" and parser.parse_args([]).lds_model == "demo"
    with pytest.raises(SystemExit):
        parser.parse_args(["--lds-model", "resnet"])


def test_the_grid_rows():
    names = [name for name, _ in lds.GRID]
    assert names[0] == "auto (default)" and lds.GRID[0][1] == []
    krylov = [opts[opts.index("--damping") + 1] for name, opts in lds.GRID if "krylov" in opts]
    ekfac = [opts[opts.index("--damping") + 1] for name, opts in lds.GRID if "ekfac" in opts]
    assert krylov == ["0.1x", "1x", "3x", "10x", "30x", "optimizer"] and ekfac == ["0.1x", "1x", "optimizer"]
    from influence.curvature.damping import parse_damping

    assert all(parse_damping(d).relative or parse_damping(d).optimizer for d in krylov + ekfac)
    assert lds.SOLVER_SETS["panel"] is lds.SOLVERS      # the default set is the old one


def test_grid_rows_share_one_curvature_cache(tmp_path, monkeypatch):
    """With ``share`` every job gets ``--cache <folder>/scores/_curvature`` (emptied first); the table shows the
    options without it, and the rows whose job loaded the cache say so."""
    seen = []
    stale = tmp_path / "scores" / "_curvature"
    stale.mkdir(parents=True)
    (stale / "krylov.npz").write_text("from an earlier run")

    def fake(root, out, options, folders, keys, tries=3, model=None):
        assert not (stale / "krylov.npz").exists()         # emptied before the first row
        seen.append(list(options))
        out.mkdir(parents=True, exist_ok=True)
        solver = options[options.index("--solver") + 1] if "--solver" in options else "krylov"
        loaded = solver in {o[o.index("--solver") + 1] if "--solver" in o else "krylov" for o in seen[:-1]}
        info = {"damping": 0.0125, "rank": 135} if solver == "krylov" else {"damping": [0.1, 0.2]}
        (out / "run.json").write_text(json.dumps({"curvature": {"loaded": loaded}, "solver_info": info}))
        scores = np.random.default_rng(len(seen)).normal(size=(len(keys), 6))
        return scores, 2.0, 1.0, list(options)

    monkeypatch.setattr(lds, "score_raising_damping", fake)
    data = lds.DemoData(tmp_path, None, None, None, None, None, None, model_file=tmp_path / "m.keras")
    keys = np.array(["orig/0/1", "orig/1/1"])
    masks = lds.subset_masks(6, 5)
    actual = np.random.default_rng(0).normal(size=(5, 2))
    rows = lds.score_rows(data, tmp_path, lds.GRID, ["orig"], keys, masks, actual, np.array([False, True]),
                          share=True)
    cache = str(tmp_path / "scores" / "_curvature")
    assert all(o[-2:] == ["--cache", cache] for o in seen) and len(seen) == len(lds.GRID)
    assert [r.name for r in rows] == [name for name, _ in lds.GRID]
    assert all("--cache" not in r.options for r in rows)
    loaded = [lds.SHARED_CACHE_NOTE in r.options for r in rows]
    # auto (fits krylov), krylov x6 (loaded), ekfac 0.1x (fits), ekfac 1x and optimizer (loaded)
    assert loaded == [False, True, True, True, True, True, True, False, True, True]
    # the λ and rank the job resolved, where run.json gives them as numbers (ekfac's are per block: not shown)
    assert "(λ = 0.0125, rank 135)" in rows[1].options and "λ =" not in rows[-1].options
    # a per-parameter damping is shown as its factor of D, not as a λ
    (tmp_path / "run.json").write_text(json.dumps({"solver_info": {"damping_rule": "optimizer:0.3", "rank": 60}}))
    assert lds.resolved(tmp_path) == "λ = 0.3 × D per parameter, rank 60"
    seen.clear()
    rows = lds.score_rows(data, tmp_path, lds.GRID[:2], ["orig"], keys, masks, actual, np.array([False, True]))
    assert all("--cache" not in o for o in seen) and not any(lds.SHARED_CACHE_NOTE in r.options for r in rows)


def test_run_refuses_an_unknown_solver_set(tmp_path):
    from influence.errors import SettingError

    with pytest.raises(SettingError, match="lds_solvers"):
        lds.run(cache=tmp_path, out=tmp_path, solvers="everything")


def test_caption_names_the_recipe_and_the_shared_cache():
    row = lds.LdsRow("krylov, λ 1x", f"--solver krylov --damping 1x {lds.SHARED_CACHE_NOTE}", np.array([0.2]), 0.2,
                     np.nan, 0.5, 0.5, 1.0, 0.5)
    result = lds.LdsResult("lds", [row], 0.5, np.nan, 8, [0, 1], 1500, ["orig/0/1"], 0, 1.0, 0, model="wide",
                           recipe=lds_models.MODELS["wide"])
    table = lds.markdown(result)
    assert "329 optimizer steps on all 1500 images" in table and "168 on each half-subset" in table
    assert "their seconds leave out the fit" in table
    assert lds.to_json(result)["recipe"]["lr"] == 1e-3


@pytest.mark.slow
def test_fixed_initialisation_recipes_start_every_run_from_one_init_and_order_the_data_by_seed():
    """``init: fixed``: seeds 0 and 1 give the same initial weights (0 epochs) but other trained ones (the data
    order differs); without it the seed changes the initial weights too."""
    import keras

    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 8)

    def weights(name, seed, epochs):
        recipe = dict(lds_models.MODELS[name], epochs=epochs, batch_size=2)
        out = [np.asarray(w) for w in lds_models.train_model(x, y, recipe, seed).get_weights()]
        keras.backend.clear_session()
        return out

    assert lds_models.MODELS["mlp-brief-fixed"] == dict(lds_models.MODELS["mlp-brief"], init="fixed")
    same = [np.array_equal(a, b) for a, b in zip(weights("mlp-brief-fixed", 0, 0), weights("mlp-brief-fixed", 1, 0))]
    assert all(same)
    assert not all(np.array_equal(a, b) for a, b in zip(weights("mlp-brief", 0, 0), weights("mlp-brief", 1, 0)))
    assert not all(np.array_equal(a, b) for a, b in zip(weights("mlp-brief-fixed", 0, 1),
                                                        weights("mlp-brief-fixed", 1, 1)))
