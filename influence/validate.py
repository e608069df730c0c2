"""``python -m influence.validate``: the leave-one-out check of the scores (Koh & Liang 2017, Fig. 2),
the mislabel panel and the LDS; the code lives in :mod:`influence.experiments` (its command line in
:mod:`influence.experiments.validate_cli`). Importing this module imports nothing else."""
import sys

if __name__ == "__main__":
    from influence.experiments.validate_cli import main

    sys.exit(main())
