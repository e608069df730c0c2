"""The bundled UCI hand-written digits (1797 images, 8x8, values 0..16) for the demo and tests.

The data ship with the package as ``influence/data/digits.npz`` (see ``influence/data/README.md``
for source and licence), so nothing here needs scikit-learn or a network.
"""
from pathlib import Path

import numpy as np
from PIL import Image

DATA_FILE = Path(__file__).resolve().parent / "digits.npz"
N_CLASSES = 10
MAX_VALUE = 16


def load_digits(path=DATA_FILE):
    """Return ``(images, target)``: uint8 (1797, 8, 8) with values 0..16, and int64 (1797,) in 0..9.

    Ink is high (16), background is 0, as in scikit-learn's ``load_digits``.
    """
    with np.load(path, allow_pickle=False) as data:
        images = np.asarray(data["images"], dtype=np.uint8)
        target = np.asarray(data["target"]).astype(np.int64)
    return images, target


def to_rgb(images, size=32, resample="bilinear"):
    """Map (N, 8, 8) values 0..16 to uint8 RGB (N, size, size, 3) in 0..255, upscaled with PIL.

    Bright ink on a dark background (like the source data). ``resample`` is "bilinear" (smooth
    strokes) or "nearest" (the original 8x8 blocks).
    """
    images = np.asarray(images)
    if images.ndim != 3:
        raise ValueError(f"expected (N, H, W) images, got shape {images.shape}")
    method = {"bilinear": Image.BILINEAR, "nearest": Image.NEAREST}[resample]
    grey = np.rint(images.astype(np.float64) * (255.0 / MAX_VALUE)).clip(0, 255).astype(np.uint8)
    out = np.empty((len(grey), size, size, 3), dtype=np.uint8)
    for k, img in enumerate(grey):
        big = np.asarray(Image.fromarray(img, mode="L").resize((size, size), method))
        out[k] = big[:, :, None]
    return out


def split(target=None, seed=0, n_test=297):
    """Seeded, class-balanced split: ``(train_idx, test_idx)``, int64 index arrays, disjoint.

    Within each class the images are shuffled with ``seed``; the test set takes the first image of
    every class, then the second of every class, and so on, until it holds ``n_test``. So
    ``test_idx[:10 * k]`` holds exactly ``k`` images of each class (in class order 0..9 per round).
    ``train_idx`` is sorted. ``target`` defaults to the bundled labels.
    """
    if target is None:
        target = load_digits()[1]
    target = np.asarray(target)
    if not 0 <= n_test <= len(target):
        raise ValueError(f"n_test must be in 0..{len(target)}, got {n_test}")
    rng = np.random.default_rng(seed)
    rank = np.empty(len(target), dtype=np.int64)
    for c in np.unique(target):
        members = np.flatnonzero(target == c)
        rank[rng.permutation(members)] = np.arange(len(members))
    order = np.lexsort((target, rank))  # by rank within class, then by class
    test_idx = order[:n_test].astype(np.int64)
    train_idx = np.sort(order[n_test:]).astype(np.int64)
    return train_idx, test_idx
