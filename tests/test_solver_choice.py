"""``--solver auto``: the rule (influence.curvature.choice), what the parser tells it, the API default and
what a calculate run records."""
import contextlib
import inspect
import io
import json

import pytest

import influence
from engine_helpers import write_project
from influence.curvature.choice import choose_solver
from influence.errors import SettingError, UserError

VGG16 = 138_357_544
VGG16_LAST = 4_097_000          # --params last:1 (predictions: 4096 x 1000 + 1000)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_project(tmp_path_factory.mktemp("choice"), 12, 6, {"a": 1})


# ----------------------------------------------------------------------------- the rule

@pytest.mark.parametrize("flag", ["iter", "bsize", "scale", "repeats"])
def test_any_lissa_setting_given_picks_lissa(flag):
    name, reason = choose_solver("auto", {flag, "save_format"}, VGG16_LAST, 4, 8)
    assert name == "lissa" and reason == f"auto: lissa ({flag} given: the original tool's LiSSA)"
    assert choose_solver("auto", ["iter", "bsize"], 100, 4, 2)[1].startswith("auto: lissa (iter, bsize given")


def test_a_batchnorm_model_takes_ekfac_unless_lissa_or_a_solver_is_asked():
    import keras

    from influence.curvature.choice import batch_norm_layers

    inner = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization(name="inner_bn")], name="inner")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4), keras.layers.BatchNormalization(name="bn1"),
                              inner, keras.layers.Dense(2)])
    assert batch_norm_layers(model) == ["bn1", "inner_bn"]
    assert batch_norm_layers(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])) == []
    name, reason = choose_solver("auto", (), 7_186, 4, 2, ["bn1", "bn2"])
    assert name == "ekfac" and reason.startswith("auto: ekfac (the model normalises by batch statistics (bn1, bn2)")
    assert choose_solver("auto", ("iter",), 7_186, 4, 2, ["bn1"])[0] == "lissa"
    assert choose_solver("krylov", (), 7_186, 4, 2, ["bn1"])[0] == "krylov"


def test_a_batchnorm_model_under_auto_gets_ekfac_at_1x_and_an_explicit_damping_stays(tmp_path):
    """Through the API: solver auto and damping auto on a BatchNorm CNN -> ekfac at 1x, both said in solver_choice;
    an explicit 0.1x stays; krylov asked keeps its auto damping (no optimizer state here: 0.1x)."""
    import keras
    import numpy as np

    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8), rng.integers(0, 3, 16)
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(2, 3, use_bias=False),
                              keras.layers.BatchNormalization(name="bn"), keras.layers.Flatten(),
                              keras.layers.Dense(3)])
    model.save(tmp_path / "m.keras")
    inf = influence.Influence(str(tmp_path / "m.keras"), train=(x, y), preprocess="unit", progress=False)
    assert inf.solver_name == "ekfac" and str(inf.settings.damping) == "1x"
    assert "normalises by batch statistics (bn)" in inf.solver_choice and "damping auto: 1x" in inf.solver_choice
    asked = influence.Influence(str(tmp_path / "m.keras"), train=(x, y), preprocess="unit", progress=False,
                                damping="0.1x")
    assert asked.solver_name == "ekfac" and str(asked.settings.damping) == "0.1x"
    krylov = influence.Influence(str(tmp_path / "m.keras"), train=(x, y), preprocess="unit", progress=False,
                                 solver="krylov")
    assert str(krylov.settings.damping) == "0.1x"


def test_krylov_when_its_basis_fits_the_budget_and_is_not_too_thin_else_the_store():
    name, reason = choose_solver("auto", (), 38_890, 4, 2)
    assert name == "krylov", reason
    assert reason == "auto: krylov (its basis of up to 200 pairs over 38,890 parameters fits the 2 GB memory budget)"
    name, reason = choose_solver("auto", (), VGG16_LAST, 4, 8)          # 87 pairs fit, 47 092 parameters per pair
    assert name == "store" and reason.startswith("auto: store (krylov's basis would hold 87 pairs for 4,097,000 "
                                                 "parameters, 47,092 per pair, above 2800")
    assert "gradient store was truer than EK-FAC on one" in reason
    assert choose_solver("auto", (), 659_267, 4, 2)[0] == "store"              # the panel's wide model: 135 pairs
    assert choose_solver("auto", (), 324_010, 4, 2)[0] == "krylov"             # mlp-large-fixed: 200 pairs, 1 620 each
    assert choose_solver("auto", (), 560_000, 4, None)[0] == "krylov"          # no budget: 200 pairs, 2800 each
    assert choose_solver("auto", (), 560_001, 4, None)[0] == "store"
    name, reason = choose_solver("auto", (), VGG16, 4, 8)
    assert name == "store"
    assert reason.startswith("auto: store (a krylov basis of 64 pairs over 138,357,544 parameters needs 99 GB, "
                             "above 50% of memory_budget 8 GB") and "params (e.g. last:1) for krylov" in reason
    given = choose_solver("auto", {"params"}, VGG16_LAST, 4, 2)[1]         # params given: no example to repeat
    assert "choose fewer parameters with params for krylov" in given and "e.g." not in given
    assert choose_solver("auto", (), VGG16_LAST, 4, 2)[0] == "store"          # 21 pairs fit in 2 GB
    assert choose_solver("auto", (), VGG16_LAST, 8, 8)[0] == "store"          # float64: half as many
    assert "up to 200 pairs over 7,162" in choose_solver("auto", (), 7162, 4, 2)[1]
    assert "up to 100 pairs" in choose_solver("auto", (), 100, 4, 2)[1]
    assert choose_solver("auto", (), VGG16, 4, None)[0] == "store"            # no budget, but 200 pairs are thin
    # a model whose layers cannot be tapped (subclassed) cannot have the store: ekfac, and the reason says why
    name, reason = choose_solver("auto", (), VGG16, 4, 8, tappable=False)
    assert name == "ekfac" and reason.endswith("; the store needs a functional Keras model, this one cannot be tapped)")
    assert choose_solver("auto", (), 659_267, 4, 2, tappable=False)[0] == "ekfac"


def test_the_store_inverts_per_layer_blocks_where_auto_would_take_ekfac_else_the_whole_matrix():
    """store_curvature auto (influence.curvature.choice.per_layer_structure): blocks for a BatchNorm model and for one
    whose krylov basis would be too thin, dense elsewhere; the reason names the evidence."""
    import keras
    from types import SimpleNamespace

    import tensorflow as tf

    from influence.curvature.choice import per_layer_structure

    def clf(params, bn=False):
        norm = [keras.layers.BatchNormalization(name="bn")] if bn else []
        layers = [keras.Input((4,)), keras.layers.Dense(4)] + norm
        return SimpleNamespace(num_params=params, dtype=tf.float32, model=keras.Sequential(layers))

    structure, why = per_layer_structure(clf(7_186, bn=True), 2)
    assert structure == "blocks" and why.startswith("store_curvature auto: blocks, each layer alone (the model "
                                                    "normalises by batch statistics (bn)")
    structure, why = per_layer_structure(clf(659_267), 2)                      # the panel's wide model
    assert structure == "blocks" and "4,883 per pair, above 2800" in why
    assert per_layer_structure(clf(VGG16), 8)[0] == "blocks"
    structure, why = per_layer_structure(clf(324_010), 2)                      # mlp-large-fixed
    assert structure == "dense" and why.startswith("store_curvature auto: dense, across layers (solver auto would "
                                                   "take krylov: its basis of up to 200 pairs")
    assert per_layer_structure(clf(7_162), 2)[0] == "dense"                    # the demo CNN


def test_a_named_solver_is_kept_and_an_unknown_one_refused():
    assert choose_solver("exact", {"iter"}, VGG16, 4, 1) == ("exact", "exact, as asked")
    with pytest.raises(SettingError, match=r"^solver: must be one of auto, .*krylov.*got 'newton'"):
        choose_solver("newton", (), 10, 4, 1)


# ----------------------------------------------------------------------------- settings and parser

def test_settings_default_to_auto_and_check_rank():
    from influence.settings import MATH_SETTINGS, Settings, group_of

    assert Settings().solver == "auto" and Settings().rank == "auto" and "rank" in MATH_SETTINGS
    assert group_of("rank") == "inverse Hessian-vector product"
    Settings(rank=32).check()
    for bad in ("x", 0, "2.5"):
        with pytest.raises(SettingError) as err:
            Settings(rank=bad).check()
        assert err.value.setting == "rank" and "positive integer or auto" in err.value.message


def test_the_parser_tells_given_from_default(data, capsys):
    from influence.calculate_cli import build_parser
    from influence.settings import Settings, given_settings

    parser = build_parser()
    assert given_settings(parser.parse_args([])) == {}
    assert Settings.from_args(parser.parse_args([])) == Settings()
    args = parser.parse_args(["-i", "20", "-b", "10", "-sf", "pdf"])
    assert given_settings(args) == {"iter": 20, "bsize": 10, "save_format": "pdf"}
    assert choose_solver("auto", given_settings(args), 280, 8, 2)[0] == "lissa"
    assert given_settings(parser.parse_args(["--iter", str(Settings().iter)])) == {"iter": 1000}  # given = default
    assert parser.parse_args(["--rank", "12"]).rank == 12 and parser.parse_args(["--rank", "AUTO"]).rank == "auto"
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(["--rank", "0"])
    assert stop.value.code == 2 and "positive integer or auto" in capsys.readouterr().err
    assert "auto" in next(a for a in parser.options if a.dest == "solver").choices

    # on the tiny model: no flag -> krylov; -i/-b -> lissa (resolved once the model is loaded)
    base = ["--data", str(data), "--model", str(data / "model.keras"), "--preprocess", "unit"]
    for argv, want in ((base, "krylov"), (base + ["-i", "20", "-b", "10"], "lissa")):
        args = parser.parse_args(argv)
        inf = influence.Influence.from_settings(Settings.from_args(args), given=given_settings(args))
        assert inf.solver_name == want and inf.solver_choice.startswith(f"auto: {want} (")
        assert inf.backend is not None and inf.solver.name == want


# ----------------------------------------------------------------------------- the API

def test_the_api_defaults_to_auto(data, caplog):
    from influence.settings import Settings

    assert inspect.signature(influence.Influence).parameters["settings"].default is None    # Settings()
    assert Settings().solver == "auto"
    kw = dict(train=data / "train.npz", preprocess="unit", progress=False)
    model = str(data / "model.keras")
    with caplog.at_level("INFO", logger="influence.api"):
        inf = influence.Influence(model, **kw)
    assert inf.solver_name == "krylov" and inf.solver.name == "krylov"
    assert [r.getMessage() for r in caplog.records if r.name == "influence.api"] == [inf.solver_choice]
    assert influence.Influence(model, **kw, iter=5, bsize=4).solver_name == "lissa"
    assert influence.Influence(model, **kw, memory_budget=5e-4).solver_name == "store"  # 39 pairs
    assert influence.Influence(model, **kw, solver="ekfac").solver_choice == "ekfac, as asked"
    with pytest.raises(UserError, match=r"solver 'krylov' \(auto: krylov .*\) takes no option fisher"):
        influence.Influence(model, **kw, fisher="true")
    with pytest.raises(UserError, match=r"solver 'auto' \(lissa, krylov, ekfac\) takes no option cg_tol"):
        influence.Influence(model, **kw, cg_tol=1e-3)


# ----------------------------------------------------------------------------- a calculate run

@pytest.mark.slow
def test_a_run_records_the_choice_and_its_reason(data, tmp_path):
    from influence.calculate_cli import build_parser, job
    from influence.cli import main

    out = tmp_path / "out"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(build_parser, job, ["--data", str(data), "--model", str(data / "model.keras"), "--preprocess",
                                        "unit", "--params", "dense", "-sf", "png", "--top", "2", "--out", str(out)])
    assert code == 0, err.getvalue()
    run = json.loads((out / "run.json").read_text())
    assert run["solver"] == run["settings"]["solver"] == run["solver_info"]["solver"] == "krylov"
    assert run["solver_choice"].startswith("auto: krylov (its basis of up to 196 pairs over 196 parameters")
    assert err.getvalue().count(run["solver_choice"]) == 1
    assert (out / "curvature" / "krylov.npz").is_file()
    assert not [p for p in out.rglob("*") if "auto" in p.name]
