"""prepare_data.py / prepare_only_test.py end to end, decoding, bad input, interruption, memory."""
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest
from PIL import Image

import influence.data.images
from influence.data.archive_reader import TestArchive, TrainArchive, check_same_classes
from influence.data.archive_writer import ArchiveWriter
from influence.data.classes import ClassMap
from influence.cli import run_main
from influence.errors import UserError
from influence.data.images import BadImage, decode_image
from influence.locking import folder_lock
from influence.data.prepare import check_test_folders, prepare_data, prepare_only_test
from influence.prepare_cli import build_prepare_data_parser, build_prepare_only_test_parser

from conftest import REPO, random_tree, save_image

RGB = (200, 30, 90)


def solid(shape, colour, dtype=np.uint8):
    return np.broadcast_to(np.asarray(colour, dtype), shape).copy()


def run_prepare(*argv):
    return prepare_data(build_prepare_data_parser().parse_args([str(a) for a in argv]))


def run_only_test(*argv):
    return prepare_only_test(build_prepare_only_test_parser().parse_args([str(a) for a in argv]))


def mixed_tree(root):
    """Three classes, several formats, sizes and modes; returns {relative path: class}."""
    rng = np.random.default_rng(7)
    made = {}

    def put(cls, name, arr, mode=None, fmt=None):
        save_image(os.path.join(root, cls, name), arr, mode, fmt)
        made[f"{cls}/{name}"] = cls

    for i in range(5):
        put("apple", f"a{i}.png", rng.integers(0, 256, (12 + i, 16, 3), dtype=np.uint8))
        put("bird", f"b{i}.jpg", rng.integers(0, 256, (20, 9 + 3 * i, 3), dtype=np.uint8))
    put("cat", "gray.png", solid((10, 10), 77))
    put("cat", "rgba.png", solid((7, 9, 4), (*RGB, 128)))
    put("cat", "rgb.png", solid((5, 30, 3), RGB))
    put("cat", "cmyk.jpg", solid((16, 16, 3), RGB), mode="CMYK")
    put("cat", "sub/deep.png", solid((6, 6, 3), RGB))
    put("cat", "wide16.png", solid((9, 11), 128 * 257, np.uint16))
    pal = Image.fromarray(solid((8, 8, 3), RGB)).convert("P", palette=Image.ADAPTIVE)
    pal.save(os.path.join(root, "cat", "pal.png"), transparency=3)
    made["cat/pal.png"] = "cat"
    return made


# ---------------------------------------------------------------------------- decoding


def test_decode_modes_and_pixels(tmp_path):
    cases = {
        "rgb.png": (solid((5, 30, 3), RGB), None, RGB, 0),
        "gray.png": (solid((10, 10), 77), None, (77, 77, 77), 0),
        "rgba.png": (solid((7, 9, 4), (*RGB, 10)), None, RGB, 0),
        "cmyk.jpg": (solid((16, 16, 3), RGB), "CMYK", RGB, 3),
        "half16.png": (solid((9, 11), 128 * 257, np.uint16), None, (128, 128, 128), 0),
        "full16.png": (solid((9, 11), 65535, np.uint16), None, (255, 255, 255), 0),
        "low16.png": (solid((9, 11), 2570, np.uint16), None, (10, 10, 10), 0),
    }
    for name, (arr, mode, colour, tol) in cases.items():
        path = save_image(str(tmp_path / name), arr, mode)
        out = decode_image(path, (8, 12))
        assert out.dtype == np.uint8 and out.shape == (8, 12, 3), name
        np.testing.assert_allclose(out.reshape(-1, 3), solid((96, 3), colour), atol=tol,
                                   err_msg=name)
    with Image.open(tmp_path / "half16.png") as img:
        assert img.mode.startswith("I")  # really a 16-bit image
    pal = Image.fromarray(solid((8, 8, 3), RGB)).convert("P", palette=Image.ADAPTIVE)
    pal.save(tmp_path / "pal.png", transparency=3)
    assert decode_image(str(tmp_path / "pal.png"), (4, 4))[0, 0].tolist() == list(RGB)


def test_decode_bad_files(tmp_path):
    good = save_image(str(tmp_path / "good.png"), solid((20, 20, 3), RGB))
    data = open(good, "rb").read()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "noise.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    (tmp_path / "notes.txt").write_text("hello")
    for name in ("trunc.png", "empty.jpg", "noise.jpg", "notes.txt"):
        with pytest.raises(BadImage):
            decode_image(str(tmp_path / name), (8, 8))


# ---------------------------------------------------------------------------- round trip


def test_round_trip_mixed_tree(tmp_path, run_script):
    made = mixed_tree(tmp_path / "train")
    out = tmp_path / "out"
    assert run_prepare("-tr", tmp_path / "train", "--size", 8, 12, "-bs", 4, "--out", out,
                       "--workers", 1) == 0
    assert sorted(os.listdir(out)) == ["labels.json", "train.npz"]
    labels = json.loads((out / "labels.json").read_text())
    digest = ClassMap.from_train_folder_names(["apple", "bird", "cat"]).digest()
    assert labels == {"kind": "folders", "digest": digest, "classes": [
        {"index": 0, "name": "apple", "human": "apple"},
        {"index": 1, "name": "bird", "human": "bird"},
        {"index": 2, "name": "cat", "human": "cat"}]}
    n = len(made)  # 17
    with np.load(out / "train.npz", allow_pickle=False) as z:
        nb = -(-n // 4)
        expected = {f"train_{k}_{b}" for k in ("x", "y", "files") for b in range(nb)}
        assert set(z.files) == expected | {"meta_size", "meta_classes"}
        assert z["meta_size"].tolist() == [8, 12] and z["meta_size"].dtype == np.int64
        assert str(z["meta_classes"]) == digest
        for b in range(nb):
            size = 4 if b < nb - 1 else n - 4 * (nb - 1)
            assert z[f"train_x_{b}"].dtype == np.uint8
            assert z[f"train_x_{b}"].shape == (size, 8, 12, 3)
            assert z[f"train_y_{b}"].dtype == np.int64 and z[f"train_y_{b}"].shape == (size, 1)
            assert z[f"train_files_{b}"].dtype.kind == "U"
            assert z[f"train_files_{b}"].shape == (size,)
    with TrainArchive(out / "train.npz") as t:
        files = t.files().tolist()
        # shuffled with default_rng(seed).permutation over the sorted file list
        ordered = sorted(made)
        perm = np.random.default_rng(282).permutation(len(ordered))
        assert files == [ordered[i] for i in perm]
        index = {"apple": 0, "bird": 1, "cat": 2}
        assert t.labels().tolist() == [index[made[f]] for f in files]
        x, _ = t.take([files.index(f) for f in ("cat/rgb.png", "cat/sub/deep.png",
                                                  "cat/pal.png", "cat/rgba.png")])
        assert (x.reshape(-1, 3) == RGB).all()
        gray = t.take([files.index("cat/gray.png")])[0]
        assert (gray == 77).all()
        assert (t.take([files.index("cat/wide16.png")])[0] == 128).all()
        cmyk = t.take([files.index("cat/cmyk.jpg")])[0].reshape(-1, 3).astype(int)
        assert np.abs(cmyk - RGB).max() <= 3
        x_all = np.concatenate([b[1] for b in t.iter_batches()])

    # same seed through the real script with a worker pool: identical archive contents
    out2 = tmp_path / "out2"
    res = run_script("prepare_data.py", "-tr", tmp_path / "train", "--size", 8, 12, "-bs", 4,
                     "--out", out2, "--workers", 2, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "done: 17 train images in 5 batches" in res.stderr and "0 skipped" in res.stderr
    with TrainArchive(out2 / "train.npz") as t2:
        assert t2.files().tolist() == files
        np.testing.assert_array_equal(np.concatenate([b[1] for b in t2.iter_batches()]), x_all)
    # another seed: another order, same content
    out3 = tmp_path / "out3"
    run_prepare("-tr", tmp_path / "train", "--size", 8, "-bs", 100, "--out", out3,
                "--seed", 5, "--workers", 1)
    with TrainArchive(out3 / "train.npz") as t3:
        assert t3.batches == [0] and t3.image_shape == (8, 8, 3)
        assert t3.files().tolist() != files and sorted(t3.files().tolist()) == sorted(files)


def test_imagenet_wnids_and_test_folders(tmp_path):
    random_tree(tmp_path / "train", ["n15075141", "n01440764"], 3)
    random_tree(tmp_path / "orig", ["0", "999", "5"], 2, seed=1)
    random_tree(tmp_path / "styled", ["n01440764", "n15075141"], 2, seed=2, ext="jpg")
    out = tmp_path / "out"
    run_prepare("-tr", tmp_path / "train", "-ts", tmp_path / "orig", tmp_path / "styled",
                "--size", 6, "--out", out, "--workers", 1)
    labels = json.loads((out / "labels.json").read_text())
    assert labels["kind"] == "imagenet"
    assert [(c["index"], c["name"], c["human"]) for c in labels["classes"]] == [
        (0, "n01440764", "tench"), (999, "n15075141", "toilet_tissue")]
    with TrainArchive(out / "train.npz") as t:
        y, f = t.labels(), t.files()
        assert sorted(y.tolist()) == [0, 0, 0, 999, 999, 999]
        assert all((lab == 0) == fn.startswith("n01440764/") for lab, fn in zip(y, f))
    with np.load(out / "test.npz", allow_pickle=False) as z:
        assert z.files == ["test_orig_x", "test_orig_y", "test_orig_files", "test_styled_x",
                           "test_styled_y", "test_styled_files", "meta_size", "meta_classes"]
        assert z["test_orig_x"].shape == (6, 6, 6, 3) and z["test_orig_x"].dtype == np.uint8
        assert z["test_orig_y"].shape == (6, 1) and z["test_orig_y"].dtype == np.int64
        assert z["test_orig_files"].dtype.kind == "U"
    with TestArchive(out / "test.npz") as s:
        assert s.folders == ["orig", "styled"] and s.image_shape == (6, 6, 3)
        _, y, files = s.read("orig")
        assert files.tolist() == ["0/img0000.png", "0/img0001.png", "5/img0000.png",
                                  "5/img0001.png", "999/img0000.png", "999/img0001.png"]
        assert y.tolist() == [0, 0, 5, 5, 999, 999]
        _, y, files = s.read("styled")
        assert y.tolist() == [0, 0, 999, 999] and files[0] == "n01440764/img0000.jpg"


def test_prepare_only_test_reuses_labels_and_size(tmp_path, run_script):
    random_tree(tmp_path / "train", ["cat", "dog"], 2)
    random_tree(tmp_path / "wb", ["dog", "0"], 2, seed=3)
    out = tmp_path / "out"
    run_prepare("-tr", tmp_path / "train", "--size", 5, 7, "--out", out, "--workers", 1)
    assert not (out / "test.npz").exists()
    assert run_only_test("-ts", tmp_path / "wb", "--out", out, "--workers", 1) == 0
    with TestArchive(out / "test.npz") as s:
        x, y, files = s.read("wb")
        assert x.shape == (4, 5, 7, 3) and y.tolist() == [0, 0, 1, 1]
        assert files.tolist()[2] == "dog/img0000.png"
    # without labels.json, class names are refused; indices work
    res = run_script("prepare_only_test.py", "-ts", tmp_path / "wb", "--out", tmp_path / "o2",
                     cwd=tmp_path)
    assert res.returncode == 2 and "'dog'" in res.stderr and "Traceback" not in res.stderr
    random_tree(tmp_path / "idx", ["3"], 2)
    res = run_script("prepare_only_test.py", "-ts", tmp_path / "idx", "--out", tmp_path / "o2",
                     "--size", 4, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    with TestArchive(tmp_path / "o2" / "test.npz") as s:
        assert s.read("idx")[1].tolist() == [3, 3] and s.image_shape == (4, 4, 3)
    res = run_script("prepare_only_test.py", "-ts", tmp_path / "idx", "--labels",
                     tmp_path / "nope.json", cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.startswith("error:")


# ---------------------------------------------------------------------------- bad input


def test_bad_files_are_skipped_with_warnings(tmp_path, run_script):
    random_tree(tmp_path / "train", ["cat", "dog"], 3)
    good = open(tmp_path / "train" / "cat" / "img0000.png", "rb").read()
    (tmp_path / "train" / "cat" / "trunc.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "train" / "cat" / "empty.jpg").write_bytes(b"")
    (tmp_path / "train" / "dog" / "noise.jpg").write_bytes(os.urandom(300))
    (tmp_path / "train" / "dog" / "readme.txt").write_text("not an image")
    (tmp_path / "train" / "dog" / ".DS_Store").write_bytes(b"\0\0")  # hidden: ignored
    random_tree(tmp_path / "orig", ["1"], 2)
    (tmp_path / "orig" / "1" / "bad.png").write_bytes(b"\x89PNG broken")
    res = run_script("prepare_data.py", "-tr", "train", "-ts", "orig", "--size", 8, "-bs", 4,
                     "--out", "out", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    for name in ("cat/trunc.png", "cat/empty.jpg", "dog/noise.jpg", "dog/readme.txt",
                 "1/bad.png"):
        assert f"skipping {os.path.join('train' if name[0] != '1' else 'orig', name)}" \
            in res.stderr, name
    assert ".DS_Store" not in res.stderr
    assert "done: 6 train images in 2 batches, 2 test images (orig 2), 5 skipped" in res.stderr
    with TrainArchive(tmp_path / "out" / "train.npz") as t:
        assert [t.batch_len(b) for b in t.batches] == [4, 2]  # full batches despite skips


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    random_tree(root / "train", ["cat", "dog"], 2)
    random_tree(root / "orig", ["0", "1"], 1)
    random_tree(root / "weird", ["0", "parrot"], 1)
    (root / "empty").mkdir()
    (root / "hollow" / "cat").mkdir(parents=True)
    (root / "afile").write_text("x")
    return root


@pytest.mark.parametrize("argv, needle", [
    (["-tr", "missing"], "does not exist"),
    (["-tr", "afile"], "not a folder"),
    (["-tr", "empty"], "no class subfolders"),
    (["-tr", "hollow"], "no files"),
    (["-tr", "train", "-ts", "weird"], "'parrot'"),
    (["-tr", "train", "-ts", "nothere"], "does not exist"),
    (["-tr", "train", "-ts", "orig", "orig"], "same name"),
    (["-tr", "train", "--size", "0"], "error: --size: must be between 1 and"),
    (["-tr", "train", "--size", "abc"], "error: --size: must be an integer, got 'abc'"),
    (["-tr", "train", "--size", "1", "2", "3"], "error: --size: takes one number (square) or two (H W), got 3"),
    (["-tr", "train", "-bs", "0"], "error: --batch-size: must be between 1 and"),
    (["-tr", "train", "-bs", "ten"], "error: --batch-size: must be an integer"),
    (["-tr", "train", "--workers", "0"], "error: --workers: must be between 1 and 256, got 0"),
    (["-tr", "train", "--seed", "-1"], "error: --seed: must be >= 0, got -1"),
    (["-tr", "train", "--out", "afile"], "error: --out: 'afile' is not a folder"),
    ([], "required"),
])
def test_bad_input_is_one_line_exit_2(small_tree, run_script, argv, needle):
    res = run_script("prepare_data.py", *argv, cwd=small_tree)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("error:") and res.stderr.count("\n") == 1, res.stderr
    assert needle in res.stderr and "Traceback" not in res.stderr
    assert not any(n.endswith(".npz") or n == "labels.json" or "partial" in n
                   for n in os.listdir(small_tree))


def test_bad_settings_name_the_setting_not_the_flag(tmp_path):
    """The library's errors name the setting (the parser's dest); only the scripts show the flag."""
    from influence.data.prepare import parse_size
    from influence.errors import SettingError

    with pytest.raises(SettingError) as err:
        parse_size(["1", "2", "3"])
    assert err.value.setting == "size" and str(err.value) == "size: takes one number (square) or two (H W), got 3"
    with pytest.raises(SettingError, match="^size: must be an integer, got 'x'$"):
        parse_size("x")
    random_tree(tmp_path / "train", ["cat"], 1)
    (tmp_path / "afile").write_text("")
    afile = str(tmp_path / "afile")
    for argv, setting, message in [(["-bs", "0"], "batch_size", "must be between 1 and 1048576, got 0"),
                                   (["--seed", "s"], "seed", "must be an integer, got 's'"),
                                   (["--workers", "999"], "workers", "must be between 1 and 256, got 999"),
                                   (["--out", afile], "out", f"{afile!r} is not a folder")]:
        with pytest.raises(SettingError) as err:
            run_prepare("-tr", tmp_path / "train", *argv)
        assert (err.value.setting, err.value.message) == (setting, message)
        assert str(err.value) == f"{setting}: {message}"


# ---------------------------------------------------------------------------- interruption


@pytest.mark.parametrize("stop_after", [6, 25])  # during train packing / during test packing
def test_interrupt_leaves_no_archive(tmp_path, monkeypatch, stop_after):
    random_tree(tmp_path / "train", ["a", "b"], 10)
    random_tree(tmp_path / "orig", ["0"], 10)
    out = tmp_path / "out"
    out.mkdir()
    real = influence.data.images.decode_image
    calls = []

    def flaky(path, size, *rest):
        calls.append(path)
        if len(calls) == stop_after:
            raise KeyboardInterrupt
        return real(path, size, *rest)

    monkeypatch.setattr(influence.data.images, "decode_image", flaky)
    args = build_prepare_data_parser().parse_args(
        ["-tr", str(tmp_path / "train"), "-ts", str(tmp_path / "orig"), "--size", "6",
         "-bs", "4", "--out", str(out), "--workers", "1"])
    assert run_main(prepare_data, args) == 130
    assert os.listdir(out) == []


@pytest.mark.slow
def test_killed_process_leaves_no_archive(tmp_path):
    # enough work (800 images resized to 224) that the signal lands mid-run on a fast machine too:
    # 300 images at 160 were packed within the 50 ms below on an idle machine
    random_tree(tmp_path / "train", ["a", "b"], 400, size=(48, 48))
    cmd = [sys.executable, os.path.join(REPO, "prepare_data.py"), "-tr", "train", "--size",
           "224", "-bs", "10", "--workers", "1", "--out", "out"]
    for sig in (signal.SIGINT, signal.SIGKILL):
        for attempt in range(3):
            # Ctrl-C as in a terminal: a pytest started in the background by a non-interactive shell
            # (`make test &`) ignores SIGINT, a child inherits that, and Python then installs no
            # KeyboardInterrupt handler, so the run would finish regardless
            proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
            deadline = time.time() + 60
            while (not list((tmp_path / "out").glob(".train.npz.*.partial")) and proc.poll() is None
                   and time.time() < deadline):
                time.sleep(0.005)
            time.sleep(0.05)
            assert proc.poll() is None, "finished before it could be interrupted"
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=60)
            if not (tmp_path / "out" / "train.npz").exists():
                break
            # on a starved machine the signal can land after the final rename: then the archive must be whole
            with TrainArchive(tmp_path / "out" / "train.npz") as done:
                assert len(done) == 800
            shutil.rmtree(tmp_path / "out")
        else:
            pytest.fail("the run finished before the signal three times")
        assert not (tmp_path / "out" / "labels.json").exists()
        if sig == signal.SIGINT:
            assert proc.returncode == 130 and "Traceback" not in err
            assert os.listdir(tmp_path / "out") == []


# ---------------------------------------------------------------------------- memory

_PEAK = """
import resource, runpy, sys
sys.path.insert(0, {repo!r})
sys.argv = ["prepare_data.py"] + sys.argv[1:]
try:
    runpy.run_path({script!r}, run_name="__main__")
except SystemExit as exc:
    assert not exc.code, exc.code
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_images(tmp_path):
    peaks = {}
    for n in (200, 1000):
        root = tmp_path / str(n)
        random_tree(root / "train", ["a", "b"], n // 2, size=(64, 64))
        random_tree(root / "orig", ["0"], n // 4, size=(64, 64), seed=1)
        code = _PEAK.format(repo=REPO, script=os.path.join(REPO, "prepare_data.py"))
        res = subprocess.run([sys.executable, "-c", code, "-tr", "train", "-ts", "orig",
                              "--size", "128", "-bs", "50", "--workers", "1", "--out", "out"],
                             cwd=root, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        peaks[n] = int(res.stdout.split()[-1])
        print(n, "images: peak RSS", peaks[n], "kB")
        with TrainArchive(root / "out" / "train.npz") as t:
            assert len(t) == n
    data_growth_kb = 1.25 * 800 * 128 * 128 * 3 / 1024  # what holding it all would add
    assert peaks[1000] / peaks[200] < 1.3, peaks
    assert peaks[1000] - peaks[200] < 0.25 * data_growth_kb, peaks


# ---------------------------------------------------------------------------- resampling


def _checker(shape=(9, 13)):
    """A pattern whose nearest and bilinear downsizings differ."""
    rng = np.random.default_rng(11)
    return rng.integers(0, 256, (*shape, 3), dtype=np.uint8)


def test_default_resampling_is_nearest_as_keras_load_img(tmp_path):
    path = save_image(str(tmp_path / "img.png"), _checker())
    size = (5, 7)
    with Image.open(path) as img:
        want = {name: np.asarray(img.convert("RGB").resize(size[::-1], getattr(Image.Resampling,
                                                                                name.upper())))
                for name in ("nearest", "bilinear", "bicubic", "lanczos")}
    assert not np.array_equal(want["nearest"], want["bilinear"])
    np.testing.assert_array_equal(decode_image(path, size), want["nearest"])
    for name in ("bilinear", "bicubic", "lanczos"):
        np.testing.assert_array_equal(decode_image(path, size, name), want[name])
    from keras.utils import load_img  # the original tool's loader, with its defaults

    np.testing.assert_array_equal(decode_image(path, size),
                                  np.asarray(load_img(path, target_size=size)))


def test_resample_flag(tmp_path):
    save_image(str(tmp_path / "train" / "a" / "img.png"), _checker())
    save_image(str(tmp_path / "orig" / "0" / "img.png"), _checker())
    assert build_prepare_data_parser().parse_args(["-tr", "t"]).resample == "nearest"
    assert build_prepare_only_test_parser().parse_args(["-ts", "t"]).resample == "nearest"
    got = {}
    for name in ("nearest", "bilinear"):
        out = tmp_path / name
        run_prepare("-tr", tmp_path / "train", "--size", 5, 7, "--out", out, "--workers", 1,
                    "--resample", name)
        run_only_test("-ts", tmp_path / "orig", "--out", out, "--workers", 1, "--resample", name)
        with TrainArchive(out / "train.npz") as t, TestArchive(out / "test.npz") as s:
            got[name] = t.take([0])[0][0]
            np.testing.assert_array_equal(s.read("orig")[0][0], got[name])
        np.testing.assert_array_equal(got[name], decode_image(
            str(tmp_path / "train" / "a" / "img.png"), (5, 7), name))
    assert not np.array_equal(got["nearest"], got["bilinear"])
    with pytest.raises(SystemExit):
        build_prepare_data_parser().parse_args(["-tr", "t", "--resample", "box"])


# ---------------------------------------------------------------------------- classes


def test_imagenet_test_class_missing_from_train(tmp_path):
    random_tree(tmp_path / "train", ["n01440764"], 2)
    # goldfish (index 1) is not a train class: by wnid and by number it is the same class
    random_tree(tmp_path / "orig", ["n01443537", "1"], 1, seed=1)
    out = tmp_path / "out"
    assert run_prepare("-tr", tmp_path / "train", "-ts", tmp_path / "orig", "--size", 4,
                       "--out", out, "--workers", 1) == 0
    with TestArchive(out / "test.npz") as s:
        _, y, files = s.read("orig")
    assert files.tolist() == ["1/img0000.png", "n01443537/img0000.png"]
    assert y.tolist() == [1, 1]


def test_integer_class_folders_warn_and_keras_order(tmp_path, caplog):
    names = [str(i) for i in range(11)]
    random_tree(tmp_path / "train", names, 1, size=(3, 3))
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="influence.data.prepare"):
        run_prepare("-tr", tmp_path / "train", "--size", 3, "--out", out, "--workers", 1)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "class_order keras" in warned[0] and "10 -> 2" in warned[0]
    with TrainArchive(out / "train.npz") as t:
        assert {f.split("/")[0]: y for f, y in zip(t.files(), t.labels())}["10"] == 10
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="influence.data.prepare"):
        run_prepare("-tr", tmp_path / "train", "--size", 3, "--out", out, "--workers", 1,
                    "--class-order", "keras")
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    with TrainArchive(out / "train.npz") as t:
        by_folder = {f.split("/")[0]: int(y) for f, y in zip(t.files(), t.labels())}
    assert by_folder == {n: i for i, n in enumerate(sorted(names))}  # 0 1 10 2 3 ...
    labels = json.loads((out / "labels.json").read_text())
    assert [c["name"] for c in labels["classes"]][:4] == ["0", "1", "10", "2"]
    # 0..9 only: both orders agree, no warning
    caplog.clear()
    random_tree(tmp_path / "ten", names[:10], 1, size=(3, 3))
    with caplog.at_level(logging.WARNING, logger="influence.data.prepare"):
        run_prepare("-tr", tmp_path / "ten", "--size", 3, "--out", tmp_path / "o10", "--workers", 1)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_stale_test_archive_is_caught(tmp_path, caplog):
    random_tree(tmp_path / "train", ["cat", "dog"], 1, size=(3, 3))
    random_tree(tmp_path / "orig", ["dog"], 1, size=(3, 3))
    out = tmp_path / "out"
    run_prepare("-tr", tmp_path / "train", "-ts", tmp_path / "orig", "--size", 3, "--out", out,
                "--workers", 1)

    def check():
        with TrainArchive(out / "train.npz") as t, TestArchive(out / "test.npz") as s:
            check_same_classes(t, s, ClassMap.load(out / "labels.json"))
            return s.read("orig")[1].tolist()

    assert check() == [1]
    random_tree(tmp_path / "train", ["bird"], 1, size=(3, 3))  # "dog" is 2 now
    with caplog.at_level(logging.WARNING, logger="influence.data.prepare"):
        run_prepare("-tr", tmp_path / "train", "--size", 3, "--out", out, "--workers", 1)
    assert any("prepare_only_test.py -ts <test folders: orig>" in r.getMessage()
               for r in caplog.records)
    with pytest.raises(UserError, match=f"prepare_only_test.py -ts .* --out {out}"):
        check()
    run_only_test("-ts", tmp_path / "orig", "--out", out, "--workers", 1)
    assert check() == [2]


# ---------------------------------------------------------------------------- safety


def test_test_folder_names_must_be_plain(tmp_path):
    with pytest.raises(UserError, match="cannot name a result folder"):
        check_test_folders(["/"], None)


def test_folder_lock(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    with folder_lock(folder, "first") as path:
        assert open(path).read() == f"{os.getpid()} first\n"
        with pytest.raises(UserError) as err:  # another open file: flock refuses it
            with folder_lock(folder):
                pass
        assert str(err.value) == (f"out: another run (pid {os.getpid()}) is writing into {folder}; "
                                  "wait for it or use another folder")
    assert os.listdir(folder) == []  # released and removed
    with folder_lock(folder):  # free again
        pass
    (folder / ".lock").write_text("999999 killed\n")  # left by a killed run: not locked
    with folder_lock(folder):
        pass


def test_second_run_into_one_folder_is_refused(tmp_path, run_script):
    random_tree(tmp_path / "train", ["a"], 2, size=(3, 3))
    random_tree(tmp_path / "orig", ["0"], 1, size=(3, 3))
    out = tmp_path / "out"
    out.mkdir()
    # a killed earlier run left its temporaries
    leftovers = [".train.npz.123.0badf00d.partial", ".train.npz.partial",
                 ".test_orig_x.k2j3.raw.partial"]
    for name in leftovers + ["keep.partial"]:
        (out / name).write_bytes(b"junk")
    with folder_lock(out, "prepare_data.py"):
        for script, args in (("prepare_data.py", ["-tr", "train"]),
                             ("prepare_only_test.py", ["-ts", "orig"])):
            res = run_script(script, *args, "--size", 3, "--out", out, cwd=tmp_path)
            assert res.returncode == 2
            assert res.stderr.splitlines()[-1] == (
                f"error: --out: another run (pid {os.getpid()}) is writing into {out}; wait for it or "
                "use another folder")
            assert "Traceback" not in res.stderr
        assert sorted(os.listdir(out)) == sorted(leftovers + ["keep.partial", ".lock"])
    res = run_script("prepare_data.py", "-tr", "train", "--size", 3, "--out", out, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert sorted(os.listdir(out)) == ["keep.partial", "labels.json", "train.npz"]


def test_temporary_names_are_unique(tmp_path):
    first, second = ArchiveWriter(tmp_path / "a.npz"), ArchiveWriter(tmp_path / "a.npz")
    assert first.tmp_path != second.tmp_path
    assert f".a.npz.{os.getpid()}." in first.tmp_path and first.tmp_path.endswith(".partial")


def test_batch_size_beyond_image_count_allocates_only_the_images(tmp_path):
    random_tree(tmp_path / "train", ["a", "b"], 2, size=(4, 4))
    tracemalloc.start()
    try:
        # a buffer of 1 << 20 images of 8x8x3 would be 192 MiB (224x224: 147 GiB)
        run_prepare("-tr", tmp_path / "train", "--size", 8, "-bs", 1 << 20, "--out",
                    tmp_path / "out", "--workers", 1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak
    with TrainArchive(tmp_path / "out" / "train.npz") as t:
        assert t.batches == [0] and t.batch_len(0) == 4


# ---------------------------------------------------------------------------- logs


def test_progress_in_a_log_file_has_no_carriage_returns(tmp_path, run_script):
    random_tree(tmp_path / "train", ["a", "b"], 3, size=(4, 4))
    random_tree(tmp_path / "orig", ["0"], 2, size=(4, 4))
    (tmp_path / "train" / "a" / "bad.png").write_bytes(b"broken")
    res = run_script("prepare_data.py", "-tr", "train", "-ts", "orig", "--size", 4, "--out",
                     "out", "--workers", 1, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "\r" not in res.stderr and "\r" not in res.stdout
    lines = res.stderr.splitlines()
    # whole lines, in order: the warning is not glued to a progress line
    assert lines[0].startswith("train folder train: 7 files")
    assert "packing train: started (7 img)" in lines
    assert f"skipping {os.path.join('train', 'a', 'bad.png')}: " in "\n".join(
        line[:len("skipping train/a/bad.png: ")] for line in lines)
    assert any(line.startswith("packing train: 7/7 img") and line.endswith("done") for line in lines)
    assert any(line.startswith("packing orig: 2/2 img") for line in lines)
    assert lines[-1].startswith("done: 6 train images")
