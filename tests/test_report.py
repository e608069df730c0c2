"""Tests of influence/report.py: ranking, the six output files per test image, atomic writes."""
import csv
import os
import pathlib
import sys
import time

import numpy as np
import pytest
from PIL import Image

from influence import report

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
         "German shepherd, German shepherd dog, German police dog, alsatian"]
LAYERS = ["conv2d", "dense", "logits"]


def class_name(c):
    return NAMES[c]


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


# ----------------------------------------------------------------------------- top_indices

def test_top_indices_orders_most_negative_and_most_positive_first():
    scores = np.array([0.5, -2.0, 3.0, -0.1, 1.0, -5.0, 0.0])
    harmful, useful = report.top_indices(scores, 3)
    np.testing.assert_array_equal(harmful, [5, 1, 3])
    np.testing.assert_array_equal(useful, [2, 4, 0])
    assert harmful.dtype.kind == "i" and useful.dtype.kind == "i"


def test_top_indices_breaks_ties_by_index():
    scores = np.array([1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 0.0])
    harmful, useful = report.top_indices(scores, 4)
    np.testing.assert_array_equal(harmful, [1, 3, 5, 6])
    np.testing.assert_array_equal(useful, [0, 2, 4, 6])


def test_top_indices_clips_k_to_n_and_handles_empty():
    scores = np.array([0.3, -0.2])
    harmful, useful = report.top_indices(scores, 10)
    np.testing.assert_array_equal(harmful, [1, 0])
    np.testing.assert_array_equal(useful, [0, 1])
    h0, u0 = report.top_indices(np.zeros(0), 5)
    assert h0.shape == (0,) and u0.shape == (0,)
    h, u = report.top_indices(scores, 0)
    assert h.size == 0 and u.size == 0
    with pytest.raises(ValueError):
        report.top_indices(scores, -1)


def test_top_indices_matches_full_sort_on_random_scores():
    rng = np.random.default_rng(3)
    scores = rng.normal(size=1000)
    harmful, useful = report.top_indices(scores, 7)
    np.testing.assert_array_equal(harmful, np.argsort(scores)[:7])
    np.testing.assert_array_equal(useful, np.argsort(-scores)[:7])


def test_top_indices_never_ranks_nan_first():
    harmful, useful = report.top_indices(np.array([np.nan, 1.0, -1.0]), 2)
    np.testing.assert_array_equal(harmful, [2, 1])
    np.testing.assert_array_equal(useful, [1, 2])


# ----------------------------------------------------------------------------- write_test_outputs

def make_case(size, n_train=50, n_layers=3, seed=0):
    rng = np.random.default_rng(seed)
    shares = rng.normal(scale=1e-2, size=(n_train, n_layers))
    scores = shares.sum(axis=1)
    if n_train > 11:                                       # a tie at the harmful top
        scores[7] = scores[11] = scores.min() - 1.0
        shares[7, 0] += scores[7] - shares[7].sum()
        shares[11, 0] += scores[11] - shares[11].sum()
    small = rng.integers(0, 256, size=(n_train + 1, 8, 8, 3), dtype=np.uint8)
    factor = size // 8
    fetched = []

    def fetch_image(i):
        fetched.append(i)
        return np.kron(small[i], np.ones((factor, factor, 1), np.uint8))

    kwargs = dict(
        scores=scores, shares=shares, layer_names=LAYERS,
        keys=np.array([f"{i // 16}_{i % 16}" for i in range(n_train)]),
        train_files=np.array([f"train/{i % 10}/image_{i:05d}.png" for i in range(n_train)]),
        train_labels=np.arange(n_train) % 10, class_name=class_name, fetch_image=fetch_image,
        test_image=np.kron(small[n_train], np.ones((factor, factor, 1), np.uint8)),
        test_label=3, test_pred=8, test_conf=0.734, test_file="test/3/a_test_image.png",
    )
    return kwargs, fetched


@pytest.mark.parametrize("fmt,size", [("png", 8), ("png", 32), ("pdf", 32), ("pdf", 8)])
def test_write_test_outputs_files_and_contents(tmp_path, fmt, size):
    kwargs, fetched = make_case(size)
    folder = tmp_path / "out" / "test" / "3"
    paths = report.write_test_outputs(folder, 2, top=5, fmt=fmt, **kwargs)

    assert paths == report.expected_outputs(folder, 2, fmt)
    assert [p.name for p in paths] == [f"harmful_2.{fmt}", f"useful_2.{fmt}", "harmful_2.csv",
                                       "useful_2.csv", "2.npy", "2_scores.npy"]
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    assert sorted(os.listdir(folder)) == sorted(p.name for p in paths)    # no temp files left
    assert report.outputs_complete(folder, 2, fmt)
    assert not report.outputs_complete(folder, 3, fmt)
    assert sorted(set(fetched)) == sorted(fetched)                       # each image fetched once
    assert len(fetched) <= 10

    scores = kwargs["scores"]
    harmful, useful = report.top_indices(scores, 5)
    assert harmful[0] == 7 and harmful[1] == 11                          # the tie, by index
    assert set(fetched) == set(harmful.tolist()) | set(useful.tolist())
    for path, idx in ((paths[2], harmful), (paths[3], useful)):
        rows = read_csv(path)
        assert rows[0] == ["rank", "key", "file", "label", "class_name", "score"]
        assert len(rows) == 6
        for rank, (row, i) in enumerate(zip(rows[1:], idx), start=1):
            assert row[0] == str(rank)
            assert row[1] == kwargs["keys"][i]
            assert row[2] == kwargs["train_files"][i]
            assert row[3] == str(i % 10)
            assert row[4] == NAMES[i % 10]
            assert float(row[5]) == scores[i]                            # repr: exact round trip
    harmful_scores = [float(r[5]) for r in read_csv(paths[2])[1:]]
    useful_scores = [float(r[5]) for r in read_csv(paths[3])[1:]]
    assert harmful_scores == sorted(harmful_scores) and max(harmful_scores) < 0
    assert useful_scores == sorted(useful_scores, reverse=True) and min(useful_scores) > 0

    table = np.load(paths[4], allow_pickle=True).item()
    assert isinstance(table, dict) and len(table) == 50
    assert list(table) == list(kwargs["keys"])
    for i, key in enumerate(kwargs["keys"]):
        entry = table[key]
        assert list(entry) == LAYERS + ["total"]
        assert all(type(v) is float for v in entry.values())
        assert entry["total"] == scores[i]
        np.testing.assert_allclose(sum(entry[name] for name in LAYERS), entry["total"],
                                   rtol=1e-12, atol=1e-15)

    totals = np.load(paths[5], allow_pickle=False)
    assert totals.dtype == np.float32 and totals.shape == (50,)
    np.testing.assert_allclose(totals, scores, rtol=1e-6)

    paths[1].unlink()
    assert not report.outputs_complete(folder, 2, fmt)


def test_png_figure_has_sensible_size(tmp_path):
    kwargs, _ = make_case(32)
    paths = report.write_test_outputs(tmp_path, 0, top=5, fmt="png", **kwargs)
    for path in paths[:2]:
        with Image.open(path) as img:
            width, height = img.size
            assert img.format == "PNG"
            assert 800 <= width <= 2500 and 250 <= height <= 800
            assert width > 2.5 * height                          # one row of 6 panels
            pixels = np.asarray(img.convert("L"))
            assert pixels.std() > 10                             # not a blank canvas


def test_pdf_and_svg_and_jpg_are_real_files(tmp_path):
    kwargs, _ = make_case(8)
    pdf = report.write_test_outputs(tmp_path, 0, top=3, fmt="pdf", **kwargs)[0]
    assert pdf.read_bytes().startswith(b"%PDF")
    svg = report.write_test_outputs(tmp_path, 0, top=3, fmt="svg", **kwargs)[0]
    assert b"<svg" in svg.read_bytes()[:2000]
    jpg = report.write_test_outputs(tmp_path, 0, top=3, fmt="jpg", **kwargs)[0]
    with Image.open(jpg) as img:
        assert img.format == "JPEG"
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_top_larger_than_n_and_wrapping(tmp_path):
    kwargs, fetched = make_case(8, n_train=4)
    paths = report.write_test_outputs(tmp_path, 0, top=10, fmt="png", **kwargs)
    assert len(read_csv(paths[2])) == 1 + 4 and len(read_csv(paths[3])) == 1 + 4
    assert sorted(fetched) == [0, 1, 2, 3]                    # overlapping lists fetched once
    kwargs, _ = make_case(32, n_train=30)
    paths = report.write_test_outputs(tmp_path, 1, top=12, fmt="png", **kwargs)
    with Image.open(paths[0]) as img:
        assert img.size[1] > 2 * 250                          # 12 images wrap onto 3 rows


def test_large_224_images_and_grayscale(tmp_path):
    kwargs, _ = make_case(8, n_train=6)
    rng = np.random.default_rng(1)
    kwargs["fetch_image"] = lambda i: rng.integers(0, 256, size=(224, 224, 3), dtype=np.uint8)
    kwargs["test_image"] = rng.integers(0, 256, size=(224, 224), dtype=np.uint8)
    kwargs["train_labels"] = np.full(6, 9)                    # the long ImageNet-style name
    paths = report.write_test_outputs(tmp_path, 0, top=2, fmt="png", **kwargs)
    assert report.outputs_complete(tmp_path, 0, "png")
    assert read_csv(paths[2])[1][4] == NAMES[9]               # the CSV keeps the full name


def test_bad_inputs_raise_before_writing(tmp_path):
    kwargs, _ = make_case(8)
    with pytest.raises(ValueError, match="format"):
        report.write_test_outputs(tmp_path / "a", 0, fmt="gif", **kwargs)
    bad = dict(kwargs, shares=kwargs["shares"][:, :2])
    with pytest.raises(ValueError, match="shape"):
        report.write_test_outputs(tmp_path / "b", 0, **bad)
    bad = dict(kwargs, layer_names=["a", "total", "c"])
    with pytest.raises(ValueError, match="total"):
        report.write_test_outputs(tmp_path / "c", 0, **bad)
    bad = dict(kwargs, keys=kwargs["keys"][:-1])
    with pytest.raises(ValueError, match="keys"):
        report.write_test_outputs(tmp_path / "d", 0, **bad)
    assert not any(tmp_path.iterdir())


def test_score_dict_is_fast_for_100k_images():
    n, layers = 100_000, 16
    rng = np.random.default_rng(0)
    shares = rng.normal(size=(n, layers))
    keys = [f"{i // 64}_{i % 64}" for i in range(n)]
    start = time.perf_counter()
    table = report.score_dict(keys, [f"layer{j}" for j in range(layers)], shares, shares.sum(1))
    elapsed = time.perf_counter() - start
    assert len(table) == n and type(table["3_5"]["layer4"]) is float
    assert table["3_5"]["layer4"] == shares[3 * 64 + 5, 4]
    assert elapsed < 5.0, f"score_dict took {elapsed:.2f} s"    # about 0.3 s on 2 cores


def test_format_score_is_compact():
    assert report.format_score(-0.0123456) == "-0.01235"
    assert report.format_score(-0.00123456) == "-1.23e-03"
    assert report.format_score(123.456) == "123.5"
    assert report.format_score(1.5e6) == "1.50e+06"
    assert report.format_score(0.0) == "0"


# ----------------------------------------------------------------------------- atomic_write

def test_atomic_write_replaces_and_keeps_extension(tmp_path):
    target = tmp_path / "harmful_0.pdf"
    target.write_text("old")
    with report.atomic_write(target) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".pdf" and tmp.name.startswith(".")
        assert str(os.getpid()) in tmp.name
        tmp.write_text("new")
        assert target.read_text() == "old"                     # untouched until the body ends
    assert target.read_text() == "new"
    assert os.listdir(tmp_path) == ["harmful_0.pdf"]


def test_atomic_write_np_save_lands_on_the_final_name(tmp_path):
    target = tmp_path / "0_scores.npy"
    with report.atomic_write(target) as tmp:
        np.save(tmp, np.arange(3, dtype=np.float32))
    np.testing.assert_array_equal(np.load(target), [0, 1, 2])
    assert os.listdir(tmp_path) == ["0_scores.npy"]


def test_atomic_write_leaves_nothing_when_the_body_raises(tmp_path):
    target = tmp_path / "useful_0.csv"
    with pytest.raises(RuntimeError):
        with report.atomic_write(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert not any(tmp_path.iterdir())
    target.write_text("complete")
    with pytest.raises(KeyboardInterrupt):
        with report.atomic_write(target) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == ["useful_0.csv"] and target.read_text() == "complete"


# ----------------------------------------------------------------------------- predictions CSV

def test_write_predictions_csv(tmp_path):
    path = tmp_path / "test" / "test_preds.csv"
    out = report.write_predictions_csv(path, ["3/a.png", "7/b.png"], np.array([3, 7]),
                                       np.array([8, 7]), np.array([0.734, 0.99], np.float32),
                                       class_name)
    assert out == path
    rows = read_csv(path)
    assert rows[0] == ["file", "label", "class_name", "prediction", "prediction_name", "confidence"]
    assert rows[1][:5] == ["3/a.png", "3", "three", "8", "eight"]
    assert rows[2][:5] == ["7/b.png", "7", "seven", "7", "seven"]
    assert float(rows[1][5]) == pytest.approx(0.734, rel=1e-6)
    assert float(rows[2][5]) == float(np.float32(0.99))
    assert os.listdir(path.parent) == ["test_preds.csv"]
    with pytest.raises(ValueError):
        report.write_predictions_csv(path, ["a"], [1, 2], [1], [0.5], class_name)


def test_report_does_not_import_tensorflow_or_pyplot():
    import subprocess
    code = ("import sys, influence.report; "
            "assert 'tensorflow' not in sys.modules and 'matplotlib.pyplot' not in sys.modules")
    root = pathlib.Path(report.__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
    assert "print(" not in pathlib.Path(report.__file__).read_text()


def test_shares_that_do_not_add_up_are_logged(tmp_path, caplog):
    kwargs, _ = make_case(8, n_train=6)
    kwargs["shares"] = kwargs["shares"] * 2.0
    with caplog.at_level("WARNING", logger="influence.report"):
        report.write_test_outputs(tmp_path, 0, top=2, fmt="png", **kwargs)
    assert "do not add up" in caplog.text
