"""In-memory training images for the experiments: the bundled digits as arrays, and an archive over them."""
import numpy as np


class ArrayArchive:
    """In-memory training images with the ``len`` / ``take`` interface of a TrainArchive.

    ``x``: images (N, H, W, C) (uint8 as the archives hold them); ``y``: int labels (N,), kept as int64.
    """

    def __init__(self, x, y):
        self.x = np.asarray(x)
        self.y = np.asarray(y, dtype=np.int64)

    def __len__(self):
        return len(self.y)

    def take(self, indices):
        """``(x[indices], y[indices])`` for int indices (B,): images (B, H, W, C) and labels int64 (B,)."""
        idx = np.asarray(indices)
        return self.x[idx], self.y[idx]


def digit_arrays(size, channels, n_train, seed=0, resample="nearest"):
    """Bundled digits as uint8 (N, size, size, channels): ``(x_train, y_train, x_held, y_held)``.

    ``n_train`` images in the seeded, class-balanced split of :func:`influence.data.digits.split`
    (labels int64 (n_train,)); the other ``1797 - n_train`` are held out.
    """
    from influence.data import digits

    images, target = digits.load_digits()
    train_idx, held_idx = digits.split(target, seed=seed, n_test=len(target) - n_train)
    rgb = digits.to_rgb(images, size, resample=resample)[..., :channels]
    return rgb[train_idx], target[train_idx], rgb[held_idx], target[held_idx]
