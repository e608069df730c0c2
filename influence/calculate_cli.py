"""Command line of ``calculate.py`` (the original's -i/-b/-sf kept, long options added).

Every flag's default is None, so the parsed arguments tell a setting given from one left out
(:func:`influence.settings.given_settings`); the defaults live in :class:`influence.settings.Settings`
(shown in the help) and :meth:`Settings.from_args` fills them in. ``--solver auto`` reads which were given.
A setting's type function is its field's own parser and check (:func:`setting_arg`): ``--damping`` gives
the :class:`influence.settings.Damping` the run takes, parsed once.
"""
from influence.cli import Parser, import_tensorflow_quietly
from influence.outputs.figure_style import FIGURE_FORMATS
from influence.settings import (CALIBRATE_INITS, DEFAULTS, GROUPS, HESSIANS, STORE_CURVATURES, STORE_PROJECTIONS,
                                Settings, check_setting, given_settings, group_of, help_of, parse_setting)



def setting_arg(name):
    """The type function of setting ``name``'s flag: its field's parser (influence.settings) and its
    check, so a wrong value is a usage error before the model loads, with the message of the library."""
    import argparse

    from influence.errors import SettingError, UserError

    def parse(text):
        try:
            return check_setting(name, parse_setting(name, text))
        except SettingError as exc:
            raise argparse.ArgumentTypeError(exc.message) from None
        except UserError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = name
    return parse


#: ``--damping``: a :class:`influence.settings.Damping` (``influence.settings.parse_damping``)
damping_arg = setting_arg("damping")


def fisher_arg(text):
    """``--fisher``: auto, sampled, true, empirical or top:K (checked here, so a typo fails before the model loads)."""
    import argparse

    from influence.curvature.kfac.signals import check_fisher
    from influence.errors import SettingError

    try:
        check_fisher(text, classes=0)      # the number of classes is checked once the model is loaded
    except SettingError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None
    return text


def build_parser():
    import_tensorflow_quietly()  # the --solver registry imports the methods, and they import TensorFlow
    from influence.curvature import method_help
    from influence.curvature.choice import solver_choices

    p = Parser(prog="calculate.py",
               description="For every test image, score every training image by its influence "
                           "(score = grad L_test . (H + damping I)^-1 grad L_train; positive = useful, "
                           "negative = harmful) and write the top images, CSVs and score dicts.")
    groups = {name: p.add_argument_group(name) for name in GROUPS}

    def add(*flags, **kw):
        """One flag of a setting: its argument group, help text and default (shown, not set: the parsed
        value is None unless given) come from influence.settings."""
        name = flags[-1].lstrip("-").replace("-", "_")
        default = DEFAULTS[name]
        text = kw.pop("help", help_of(name))
        if kw.get("action") != "store_true" and "(default:" not in text:
            text += f" (default: {default})" if default is not None else ""
        groups[group_of(name)].add_argument(*flags, default=None, help=text, **kw)

    add("--data", metavar="DIR")
    add("--out", metavar="DIR")
    add("--folders", nargs="+", metavar="NAME")
    add("--limit", type=int, metavar="N")
    add("-sf", "--save-format", choices=FIGURE_FORMATS)
    add("--top", type=int, metavar="K")
    add("--overwrite", action="store_true")
    groups[group_of("figures")].add_argument("--no-figures", dest="figures", action="store_false", default=None,
                                             help=help_of("figures"))

    add("--model")
    add("--weights", metavar="imagenet|none|PATH")
    add("--preprocess", choices=("auto", "none", "caffe", "tf", "torch", "unit"))
    add("--params", metavar="all|last:N|NAMES")

    add("--solver", choices=solver_choices(), help=f"{help_of('solver')}; {method_help()}")
    add("--hessian", type=setting_arg("hessian"), metavar="{" + ",".join(HESSIANS) + "}")
    add("--damping", type=damping_arg, metavar="LAMBDA|auto|Fx")
    add("-i", "--iter", type=int, metavar="T")
    add("-b", "--bsize", type=int, metavar="B")
    add("--repeats", type=int, metavar="R")
    add("--scale", metavar="auto|S")
    add("--cg-tol", type=float, metavar="TOL")
    add("--cg-maxiter", type=int, metavar="N")
    add("--rank", type=setting_arg("rank"), metavar="auto|K")
    add("--max-exact-params", type=int, metavar="P")
    add("--fisher", type=fisher_arg, metavar="{sampled,true,top:K,empirical}")
    add("--ekfac-max-block", type=int, metavar="D")
    add("--store-dim", type=setting_arg("store_dim"), metavar="auto|D")
    add("--store-projection", choices=STORE_PROJECTIONS)
    add("--store-curvature", choices=STORE_CURVATURES)
    add("--cache", metavar="DIR")
    add("--seed", type=int, metavar="N")

    add("--self-influence", action="store_true")
    add("--self-influence-limit", type=int, metavar="N")

    add("--memory-budget", type=float, metavar="GB")
    add("--score-batch", type=int, metavar="N")
    add("--workers", type=int, metavar="N")
    add("--ray-address", metavar="ADDR")
    add("--calibrate", action="store_true")
    add("--calibrate-subsets", type=int, metavar="M")
    add("--calibrate-seeds", type=int, metavar="S")
    add("--calibrate-init", choices=CALIBRATE_INITS)
    add("--calibrate-solvers", metavar="NAME,...")
    add("--calibrate-damping", metavar="D,...")
    add("--epochs", type=setting_arg("epochs"), metavar="auto|E")
    add("--batch-size", type=int, metavar="B")
    p.add_argument("-v", "--verbose", action="store_true", help="more log messages")
    return p


def job(args):
    from influence.cli import import_tensorflow_quietly
    from influence.engine import calculate

    import_tensorflow_quietly()

    return calculate(Settings.from_args(args), given=set(given_settings(args)))
