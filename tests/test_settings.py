"""Settings said once (influence.settings): the name lists, the defaults and the damping value come from
the fields of :class:`influence.settings.Settings` and their metadata, for calculate.py and the API alike."""
import ast
import dataclasses
import inspect
import json
from pathlib import Path

import pytest

from influence.errors import SettingError
from influence.settings import (API_SETTINGS, GROUPS, LISSA_SETTINGS, MATH_SETTINGS, NAMES, SOLVER_OPTIONS, Damping,
                                Settings, _setting, names, parse_damping, same_setting)

ROOT = Path(__file__).resolve().parents[1]


def test_the_api_defaults_are_calculates():
    from influence.api import Influence
    from influence.calculate_cli import build_parser
    from influence.curvature import REGISTRY, solver_options

    calc = Settings.from_args(build_parser().parse_args([]))        # calculate.py with no flags
    assert calc == Settings()
    # the API takes a Settings (default Settings()) and its fields as keywords: no default of its own
    params = inspect.signature(Influence.__init__).parameters
    assert params["settings"].default is None and not set(params) & set(NAMES) - {"model"}
    assert {"solver", "damping", "hessian", "preprocess", "params", "weights", "cache", "score_batch",
            "memory_budget"} <= set(API_SETTINGS) and "model" not in API_SETTINGS
    # the solver takes every solver option of the settings: each method's own default is calculate.py's
    options = calc.solver_options()
    for method, cls in REGISTRY.items():
        params = inspect.signature(cls.__init__).parameters
        for option in solver_options(cls) & set(SOLVER_OPTIONS):
            assert params[option].default == options[option], (method, option)


def test_the_name_lists_are_derived_from_the_fields():
    from influence.curvature import REGISTRY, solver_options
    from influence.curvature.choice import LISSA_SETTINGS as choice_lissa

    fields = dataclasses.fields(Settings)
    assert MATH_SETTINGS == tuple(f.name for f in fields if f.metadata["math"])
    assert SOLVER_OPTIONS == tuple(f.name for f in fields if f.metadata["solver"])
    assert choice_lissa is LISSA_SETTINGS
    assert set(LISSA_SETTINGS) == {"iter", "bsize", "scale", "repeats"}
    # the math settings of every run so far (run.json's resume check), whatever their order
    assert set(MATH_SETTINGS) == {"model", "weights", "preprocess", "params", "solver", "hessian", "damping", "scale",
                                  "iter", "bsize", "repeats", "seed", "cg_tol", "cg_maxiter", "fisher",
                                  "ekfac_max_block", "rank", "store_dim", "store_projection",
                                  "store_curvature"}
    # every solver option is one some method takes, and every setting a method takes is a solver option
    taken = set().union(*(solver_options(c) for c in REGISTRY.values()))
    assert set(SOLVER_OPTIONS) <= taken and taken & set(NAMES) == set(SOLVER_OPTIONS)
    # a field added with a flag shows up in the derived list
    more = dataclasses.make_dataclass("More", [("extra", int, _setting(0, GROUPS[2], "a new option", math=True,
                                                                         solver=True))], bases=(Settings,))
    assert names(more, math=True) == MATH_SETTINGS + ("extra",)
    assert names(more, solver=True) == SOLVER_OPTIONS + ("extra",)


#: modules that once kept lists of setting names by hand
DERIVED = ("influence/api.py", "influence/backends/ray_worker.py", "influence/backends/ray_driver.py",
           "influence/run_record.py", "influence/calculate_cli.py",
           "influence/curvature/choice.py", "influence/curvature/base.py", "influence/settings.py",
           "tests/test_curvature_contract.py")


@pytest.mark.parametrize("path", DERIVED)
def test_no_list_of_setting_names_is_kept_by_hand(path):
    """No tuple, list or set literal of three or more setting names (a dict literal of test values is fine)."""
    tree = ast.parse((ROOT / path).read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            words = [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
            hits = [w for w in words if w in NAMES]
            assert len(hits) < 3, f"{path}:{node.lineno} lists settings by hand: {hits}"


@pytest.mark.parametrize("text, value", [("0.1x", Damping(0.1, relative=True)),
                                         ("auto", Damping(0.1, relative=True)), ("0.05", Damping(0.05))])
def test_damping_is_parsed_once_to_one_value(text, value):
    from influence.calculate_cli import build_parser
    from influence.curvature.base import InverseHVP

    args = build_parser().parse_args(["--damping", text])
    spec = args.damping
    assert spec == value and isinstance(spec, Damping)                  # calculate.py's flag parses it
    settings = Settings.from_args(args).check()
    assert settings.damping is spec                                      # Settings takes the parsed value as is
    assert dataclasses.replace(settings, solver="exact").damping is spec
    assert Settings(damping=text).damping == value                       # the API / a script give text: the same
    assert parse_damping(spec) is spec

    class Probe(InverseHVP):                                             # no name: not registered
        relative_damping = "blocks"

    solver = Probe(object(), spec, progress=False)
    assert solver.damping_spec is spec and Probe.check_damping(spec) is spec
    # run.json records it as calculate.py spells it, and a resumed run compares the value
    recorded = json.loads(json.dumps(settings.recorded()))["damping"]
    assert recorded == (str(value) if value.relative else value.value)
    assert same_setting("damping", recorded, spec) and same_setting("damping", text, spec)


def test_a_resumed_run_compares_old_run_json_values():
    assert same_setting("damping", "auto", Damping(0.1, relative=True))       # an old run's default
    assert same_setting("damping", 0.1, Damping(0.1)) and same_setting("damping", "0.3x", parse_damping("0.3X"))
    assert not same_setting("damping", 0.1, Damping(0.5)) and not same_setting("damping", "0.1", Damping(0.1, True))
    assert not same_setting("damping", "garbage", Damping(0.1))
    assert same_setting("scale", "auto", "auto") and same_setting("iter", 1000, 1000)
    assert not same_setting("hessian", "ggn", "full")
    json.dumps(Settings(damping=0.01).recorded())


def test_hessian_has_one_check():
    from influence.calculate_cli import build_parser
    from influence.settings import check_setting

    with pytest.raises(SettingError, match="^hessian: must be one of full, ggn, got 'fisher'"):
        Settings(hessian="fisher").check()
    with pytest.raises(SettingError, match="^hessian: must be one of"):
        check_setting("hessian", "fisher")
    assert build_parser().parse_args(["--hessian", "full"]).hessian == "full"
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--hessian", "fisher"])
    assert exc.value.code == 2


@pytest.mark.parametrize("setting", ["store_dim", "rank", "epochs"])
def test_auto_or_a_count_is_one_parser_naming_its_setting(setting):
    """store_dim, rank and epochs: one parser (settings.auto_or_count), each error naming its own setting."""
    import pickle

    from influence import settings

    parse = Settings.__dataclass_fields__[setting].metadata["parse"]
    assert parse is getattr(settings, f"parse_{setting}") and pickle.loads(pickle.dumps(parse)) is parse
    assert parse.__code__ is settings.parse_rank.__code__                 # the same function body
    assert parse(" Auto ") == "auto" and parse("12") == 12 and parse(3) == 3 and parse(2.0) == 2
    assert Settings(**{setting: "7"}).values()[setting] == 7
    for bad in ("many", 0, -2, 2.5, "2.5", None, float("inf")):
        with pytest.raises(SettingError, match=f"^{setting}: must be a positive integer or auto, got "):
            parse(bad)


def test_settings_round_trip_through_their_values_and_give_the_solver_options():
    # (a Ray worker rebuilds its solver from the API's WorkerSpec: tests/test_distributed.py)
    settings = Settings(damping="0.3x", scale="2.5", fisher="sampled", iter=7)
    again = Settings(**settings.values())
    assert again == settings and again.damping is settings.damping
    assert again.solver_options() == settings.solver_options()
    assert again.solver_options()["scale"] == 2.5 and Settings().solver_options()["scale"] is None
