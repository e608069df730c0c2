"""``python -m influence.demo [--root demo] [--quick]``: the one-command demo on the bundled digits;
the code lives in :mod:`influence.experiments.demo`. Importing this module imports nothing else."""
import sys

if __name__ == "__main__":
    from influence.experiments.demo import main

    sys.exit(main())
