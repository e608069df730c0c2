"""The scripts' one boundary: a SettingError names the setting's flag, a UserError prints as is (exit 2)."""
import argparse

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
    for bad, says in (("top:0", "whole number of classes"), ("exact", "choose sampled, true, empirical or top:K")):
        with pytest.raises(SystemExit) as stop:
            build_parser().parse_args(["--fisher", bad])
        assert stop.value.code == 2 and says in capsys.readouterr().err
