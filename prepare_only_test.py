#!/usr/bin/env python
"""Pack test folders into test.npz, reusing labels.json from an earlier prepare_data.py run.

    python prepare_only_test.py -ts orig wb styled texture
"""
import sys

from influence.cli import quiet_tensorflow

if __name__ == "__main__":
    quiet_tensorflow()
    from influence.data.prepare import prepare_only_test
    from influence.prepare_cli import build_prepare_only_test_parser
    from influence.cli import main

    sys.exit(main(build_prepare_only_test_parser, prepare_only_test))
