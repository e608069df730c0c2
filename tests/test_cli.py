"""The scripts' one boundary: a SettingError names the setting's flag, a UserError prints as is (exit 2)."""
import argparse
import runpy
import sys

import pytest

from influence.cli import Parser, flag_names, main
from influence.errors import SettingError, UserError


def _parser():
    p = Parser(prog="x")
    p.add_argument("-i", "--iter", type=int, default=1)
    p.add_argument("--max-exact-params", type=int, default=1)
    return p


def test_flag_names_takes_the_long_option():
    assert flag_names(_parser()) == {"help": "--help", "iter": "--iter", "max_exact_params": "--max-exact-params"}


def test_setting_error_reads_as_the_setting_in_python_and_as_the_flag_on_the_command_line(capsys):
    exc = SettingError("max_exact_params", "must be >= 1, got 0")
    assert str(exc) == "max_exact_params: must be >= 1, got 0"
    assert isinstance(exc, UserError)

    def job(args):
        raise SettingError("max_exact_params", f"must be >= 1, got {args.max_exact_params}")

    assert main(_parser, job, ["--max-exact-params", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --max-exact-params: must be >= 1, got 0"


def test_user_error_and_unknown_setting_print_unchanged(capsys):
    def job(args):
        raise SettingError("not_a_flag", "bad")

    assert main(_parser, job, []) == 2
    assert capsys.readouterr().err.strip() == "error: not_a_flag: bad"
    assert main(_parser, lambda a: (_ for _ in ()).throw(UserError("plain")), []) == 2
    assert capsys.readouterr().err.strip() == "error: plain"
    assert isinstance(_parser().parse_args([]), argparse.Namespace)


def test_calculate_fisher_flag_takes_top_k_and_refuses_typos_before_any_work(capsys):
    import pytest

    from influence.calculate_cli import build_parser

    assert build_parser().parse_args(["--fisher", "top:3"]).fisher == "top:3"
    assert build_parser().parse_args(["--fisher", "true"]).fisher == "true"
    for bad, says in (("top:0", "whole number of classes"), ("exact", "must be one of auto, sampled, true, empirical or top:K, got 'exact'")):
        with pytest.raises(SystemExit) as stop:
            build_parser().parse_args(["--fisher", bad])
        assert stop.value.code == 2 and says in capsys.readouterr().err


def test_every_setting_has_its_flag_group_and_help_from_one_place():
    """influence.settings holds each setting's concern, help and check; calculate.py's parser reads them."""
    import dataclasses

    from influence.calculate_cli import build_parser
    from influence.settings import GROUPS, Settings, group_of, help_of

    parser = build_parser()
    by_dest = {a.dest: a for a in parser.options if a.option_strings}
    groups = {a.dest: g.title for g in parser._action_groups for a in g._group_actions}
    for f in dataclasses.fields(Settings):
        assert f.name in by_dest, f"setting {f.name} has no flag"
        assert groups[f.name] == group_of(f.name) and group_of(f.name) in GROUPS
        assert by_dest[f.name].help.startswith(help_of(f.name))   # --solver's goes on with the registry
    assert set(vars(parser.parse_args([]))) - {f.name for f in dataclasses.fields(Settings)} == {"verbose"}


def test_settings_check_names_the_wrong_setting():
    import pytest

    from influence.settings import Settings

    assert Settings().check() == Settings()
    for bad, says in ((dict(top=0), "top: must be >= 1, got 0"), (dict(memory_budget=0), "memory_budget: must be > 0"),
                      (dict(limit=-1), "limit: must be >= 0 (0 = all test images)"),
                      (dict(ekfac_max_block=1), "ekfac_max_block: must be >= 2"),
                      (dict(cg_tol=0.0), "cg_tol: must be > 0"), (dict(scale="-1"), "scale: must be > 0"),
                      (dict(workers=-2), "workers: must be >= 0 (0 = no Ray)")):
        with pytest.raises(SettingError) as err:
            Settings(**bad).check()
        assert str(err.value).startswith(says)


@pytest.mark.parametrize("module, prog", [("influence.demo", "python -m influence.demo"),
                                          ("influence.validate", "python -m influence.validate")])
def test_the_python_m_shims_reach_their_command_lines(module, prog, monkeypatch, capsys):
    """``python -m influence.demo`` / ``influence.validate`` run the experiments' main (here its --help)."""
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {prog}")
