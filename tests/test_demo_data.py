"""The bundled digits, their RGB rendering and split, the demo folders and the demo CNN."""
import hashlib
import os

import numpy as np
import pytest
from PIL import Image

from influence.experiments import demo
from influence.data import digits

IMAGES_SHA256 = "8f26b2bd9d135c256808f68f14fdabddde6d9c7f869ae419704b051f0f14b3b3"
TARGET_SHA256 = "8ba4f891220f5e4c9c819638d1602d74b83618f167043c6da52a2a247841ddf0"
CLASS_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def test_bundled_digits_load():
    images, target = digits.load_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8
    assert target.shape == (1797,) and target.dtype == np.int64
    assert images.min() == 0 and images.max() == 16
    assert np.bincount(target, minlength=10).tolist() == CLASS_COUNTS
    assert sum(CLASS_COUNTS) == 1797
    assert hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest() == IMAGES_SHA256
    assert hashlib.sha256(target.astype(np.uint8).tobytes()).hexdigest() == TARGET_SHA256


@pytest.mark.parametrize("resample", ["bilinear", "nearest"])
def test_to_rgb_shape_and_range(resample):
    images, _ = digits.load_digits()
    rgb = digits.to_rgb(images[:5], size=32, resample=resample)
    assert rgb.shape == (5, 32, 32, 3) and rgb.dtype == np.uint8
    assert rgb.min() == 0 and rgb.max() == 255
    assert np.array_equal(rgb[..., 0], rgb[..., 2])  # grey
    if resample == "nearest":  # 0..16 -> 0..255 exactly, each pixel a 4x4 block
        expect = np.rint(images[:5].astype(np.float64) * 255 / 16).astype(np.uint8).repeat(4, 1).repeat(4, 2)
        np.testing.assert_array_equal(rgb[..., 1], expect)
    assert digits.to_rgb(images[:2], size=16).shape == (2, 16, 16, 3)


def test_split_disjoint_balanced_and_deterministic():
    _, target = digits.load_digits()
    train, test = digits.split(target, seed=0, n_test=297)
    assert len(train) == 1500 and len(test) == 297
    assert not set(train) & set(test)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(1797))
    np.testing.assert_array_equal(target[test[:10]], np.arange(10))  # one per class first
    assert np.bincount(target[test[:30]]).tolist() == [3] * 10
    again = digits.split(target, seed=0, n_test=297)
    np.testing.assert_array_equal(train, again[0])
    np.testing.assert_array_equal(test, again[1])
    other = digits.split(target, seed=1, n_test=297)
    assert not np.array_equal(test, other[1])


def test_write_folders_tree(tmp_path):
    data = demo.write_folders(tmp_path, n_train=100, per_class=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inverted", "noisy", "orig", "train"]
    train_files = sorted(tmp_path.glob("train/*/*.png"))
    assert len(train_files) == 100
    for name in demo.TEST_FOLDERS:
        folder = tmp_path / name
        assert sorted(p.name for p in folder.iterdir()) == [str(c) for c in range(10)]
        files = sorted(folder.glob("*/*.png"))
        assert len(files) == 20
        for c in range(10):
            assert len(list((folder / str(c)).glob("*.png"))) == 2
    # same held-out ids in every test folder, none of them in train
    ids = {name: sorted(p.name for p in (tmp_path / name).glob("*/*.png")) for name in demo.TEST_FOLDERS}
    assert ids["orig"] == ids["noisy"] == ids["inverted"]
    assert not set(ids["orig"]) & {p.name for p in train_files}
    # PNGs are readable, 32x32 RGB, and hold exactly the arrays returned
    rgb, labels, idx = data["orig"]
    path = tmp_path / "orig" / str(labels[0]) / f"{idx[0]:04d}.png"
    with Image.open(path) as img:
        assert img.mode == "RGB" and img.size == (32, 32)
        np.testing.assert_array_equal(np.asarray(img), rgb[0])
    with Image.open(tmp_path / "inverted" / path.relative_to(tmp_path / "orig")) as img:
        np.testing.assert_array_equal(np.asarray(img), 255 - rgb[0])
    noisy = data["noisy"][0]
    assert noisy.shape == rgb.shape and not np.array_equal(noisy, rgb)
    # rewriting with fewer images leaves no stale PNGs behind
    demo.write_folders(tmp_path, n_train=50, per_class=1)
    assert len(list(tmp_path.glob("train/*/*.png"))) == 50
    assert len(list(tmp_path.glob("orig/*/*.png"))) == 10


@pytest.mark.slow
def test_quick_cnn_trains(tmp_path):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    images, target = digits.load_digits()
    train, test = digits.split(target, seed=0, n_test=1297)
    rgb = digits.to_rgb(images)
    model, seconds = demo.train_model(rgb[train], target[train], epochs=8)
    assert model.output_shape == (None, 10)
    assert model.layers[-1].activation.__name__ == "linear"  # logits, no softmax
    assert len(model.losses) == 3  # L2 on the two conv kernels and the dense kernel
    assert model.count_params() < 10_000
    assert seconds > 0             # timed in benchmarks, never asserted here (a loaded CI machine)
    assert demo.accuracy(model, rgb[test], target[test]) > 0.8
    path = tmp_path / "model.keras"
    model.save(path)
    import keras
    again = keras.models.load_model(path)
    x = rgb[test[:8]].astype(np.float32) / 255.0
    np.testing.assert_allclose(again.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5,
                               atol=1e-5)
