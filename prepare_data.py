#!/usr/bin/env python
"""Pack image folders into train.npz / test.npz (+ labels.json).

    python prepare_data.py -tr train -ts orig wb styled texture -bs 200
"""
import sys

from influence.cli import quiet_tensorflow

if __name__ == "__main__":
    quiet_tensorflow()
    from influence.data.prepare import prepare_data
    from influence.prepare_cli import build_prepare_data_parser
    from influence.cli import main

    sys.exit(main(build_prepare_data_parser, prepare_data))
