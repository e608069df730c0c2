"""Shared test helpers: tiny image trees and running the real scripts."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def save_image(path, array, mode=None, fmt=None):
    """Write ``array`` (H, W[, C]) as an image file; ``mode`` converts first (e.g. "CMYK")."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = Image.fromarray(array)
    if mode is not None and img.mode != mode:
        img = img.convert(mode)
    img.save(path, format=fmt)
    return path


def random_tree(root, classes, per_class, size=(12, 16), seed=0, ext="png"):
    """``root/<class>/img<i>.<ext>`` with random RGB images; returns the list of paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for cls in classes:
        for i in range(per_class):
            arr = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            paths.append(save_image(os.path.join(root, cls, f"img{i:04d}.{ext}"), arr))
    return paths


@pytest.fixture
def run_script():
    """Run a repository script with this interpreter: ``run_script("prepare_data.py", *args,
    cwd=...)`` -> CompletedProcess (text, captured)."""

    def run(script, *args, cwd, timeout=120):
        return subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)],
                              cwd=cwd, capture_output=True, text=True, timeout=timeout)

    return run
