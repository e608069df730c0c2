#!/usr/bin/env python
"""Influence of every training image on every test image.

    python calculate.py -i 20 -b 10 -sf pdf
"""
import sys

from influence.cli import quiet_tensorflow

if __name__ == "__main__":
    quiet_tensorflow()
    from influence.calculate_cli import build_parser, job
    from influence.cli import main

    sys.exit(main(build_parser, job))
