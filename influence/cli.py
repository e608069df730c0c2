"""Shared pieces of the command-line scripts: logging set-up and the entry wrapper.

Scripts stay thin: they build an ``argparse`` parser, then call :func:`run_main` with a function
that does the job. Library code never prints; it logs through ``logging`` and shows progress
through tqdm.
"""
import argparse
import logging
import sys

from influence.errors import SettingError, UserError
from influence.tf_import import import_tensorflow_quietly, quiet_tensorflow  # noqa: F401  (the scripts' names)

EXIT_USAGE = 2


def setup_logging(verbose=False):
    """Plain messages on stderr, the way a command-line tool speaks."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("tensorflow", "absl", "h5py", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_main(job, args, flags=None):
    """Run ``job(args)``; a :class:`UserError` becomes one line on stderr and exit code 2.

    A :class:`SettingError` names its setting by the flag that sets it (``flags``: setting -> flag,
    :func:`flag_names`). Ctrl-C exits with 130 and a short line; anything else is a bug and keeps
    its traceback. Returns the process exit code (``job``'s return value, or 0).
    """
    try:
        code = job(args)
    except SettingError as exc:
        print(f"error: {exc.for_flags(flags or {})}", file=sys.stderr)
        return EXIT_USAGE
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted: nothing half-written was left under a final name", file=sys.stderr)
        return 130
    return 0 if code is None else int(code)


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr (exit code 2), like a UserError; ``options`` keeps
    every argument as it is added, its argument groups' too (argparse lists them only privately)."""

    def __init__(self, *args, **kwargs):
        self.options = []               # before argparse adds --help
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        return self._keep(super().add_argument(*args, **kwargs))

    def add_argument_group(self, *args, **kwargs):
        group = super().add_argument_group(*args, **kwargs)
        add = group.add_argument
        group.add_argument = lambda *a, **k: self._keep(add(*a, **k))
        return group

    def _keep(self, action):
        self.options.append(action)
        return action

    def error(self, message):
        self.exit(EXIT_USAGE, f"error: {message} (see {self.prog} --help)\n")


def flag_names(parser):
    """setting (an option's ``dest``) -> its longest flag, e.g. ``{"damping": "--damping", "iter": "--iter"}``;
    ``parser``: a :class:`Parser`."""
    return {a.dest: max(a.option_strings, key=len) for a in parser.options if a.option_strings}


def main(parser_factory, job, argv=None):
    """Entry of the scripts: parse, set up logging, run the job; returns the exit code."""
    parser = parser_factory()
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "verbose", False))
    return run_main(job, args, flag_names(parser))
