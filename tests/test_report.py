"""Tests of influence/outputs/report.py: ranking, the eight output files per test image, atomic writes."""
import csv
import os
import pathlib
import sys
import time

import numpy as np
import pytest
from PIL import Image

from influence.catalogue import TrainCatalogue
from influence.outputs import report
from influence.outputs.figure_style import format_score
from influence.outputs.ranking import layer_leaders, top_indices
from influence.outputs.summary import summarize

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
    harmful, useful = top_indices(scores, 3)
    np.testing.assert_array_equal(harmful, [5, 1, 3])
    np.testing.assert_array_equal(useful, [2, 4, 0])
    assert harmful.dtype.kind == "i" and useful.dtype.kind == "i"


def test_top_indices_breaks_ties_by_index():
    scores = np.array([1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 0.0])
    harmful, useful = top_indices(scores, 4)
    np.testing.assert_array_equal(harmful, [1, 3, 5, 6])
    np.testing.assert_array_equal(useful, [0, 2, 4, 6])


def test_top_indices_clips_k_to_n_and_handles_empty():
    scores = np.array([0.3, -0.2])
    harmful, useful = top_indices(scores, 10)
    np.testing.assert_array_equal(harmful, [1, 0])
    np.testing.assert_array_equal(useful, [0, 1])
    h0, u0 = top_indices(np.zeros(0), 5)
    assert h0.shape == (0,) and u0.shape == (0,)
    h, u = top_indices(scores, 0)
    assert h.size == 0 and u.size == 0
    with pytest.raises(ValueError):
        top_indices(scores, -1)


def test_top_indices_matches_full_sort_on_random_scores():
    rng = np.random.default_rng(3)
    scores = rng.normal(size=1000)
    harmful, useful = top_indices(scores, 7)
    np.testing.assert_array_equal(harmful, np.argsort(scores)[:7])
    np.testing.assert_array_equal(useful, np.argsort(-scores)[:7])


def test_top_indices_never_ranks_nan_first():
    harmful, useful = top_indices(np.array([np.nan, 1.0, -1.0]), 2)
    np.testing.assert_array_equal(harmful, [2, 1])
    np.testing.assert_array_equal(useful, [1, 2])


# ----------------------------------------------------------------------------- write_test_outputs

def write(folder, n, *, keys, train_files, train_labels, class_name, test_image, test_label, test_pred, test_conf,
          test_file, **rest):
    """:func:`report.write_test_outputs` of a :func:`make_case` (its flat facts grouped as the writer takes them)."""
    return report.write_test_outputs(folder, n, catalogue=TrainCatalogue(keys, train_files, train_labels, class_name),
                                     test=report.TestImage(test_image, test_label, test_pred, test_conf, test_file),
                                     **rest)


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


@pytest.mark.slow
@pytest.mark.parametrize("fmt,size", [("png", 8), ("png", 32), ("pdf", 32), ("pdf", 8)])
def test_write_test_outputs_files_and_contents(tmp_path, fmt, size):
    kwargs, fetched = make_case(size)
    folder = tmp_path / "out" / "test" / "3"
    paths = write(folder, 2, top=5, fmt=fmt, **kwargs)

    assert paths == report.expected_outputs(folder, 2, fmt)
    assert [p.name for p in paths] == [f"harmful_2.{fmt}", f"useful_2.{fmt}", "harmful_2.csv",
                                       "useful_2.csv", "2.npy", "2_scores.npy", "2_layerwise.csv",
                                       f"2_summary.{fmt}"]
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    assert sorted(os.listdir(folder)) == sorted(p.name for p in paths)    # no temp files left
    assert report.outputs_complete(folder, 2, fmt)
    assert not report.outputs_complete(folder, 3, fmt)
    assert sorted(set(fetched)) == sorted(fetched)                       # each image fetched once
    assert len(fetched) <= 10

    scores = kwargs["scores"]
    harmful, useful = top_indices(scores, 5)
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
    # ordered by ascending total, as the original's sorted(..., key=total); the tie 7/11 by archive order
    order = np.argsort(scores, kind="stable")
    assert list(table) == [kwargs["keys"][i] for i in order]
    totals_in_order = [entry["total"] for entry in table.values()]
    assert totals_in_order == sorted(totals_in_order)
    assert list(table)[:2] == [kwargs["keys"][7], kwargs["keys"][11]]
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

    rows = read_csv(paths[6])
    assert rows[0] == ["layer", "key", "share", "file", "label", "class_name"]
    assert [r[0] for r in rows[1:]] == LAYERS
    for j, row in enumerate(rows[1:]):
        i = int(np.argmax(kwargs["shares"][:, j]))
        assert row[1:] == [kwargs["keys"][i], repr(float(kwargs["shares"][i, j])), kwargs["train_files"][i],
                           str(i % 10), NAMES[i % 10]]

    for path in (paths[1], paths[6], paths[7]):
        path.unlink()
        assert not report.outputs_complete(folder, 2, fmt)
        write(folder, 2, top=5, fmt=fmt, **kwargs)
        assert report.outputs_complete(folder, 2, fmt)


def test_png_figure_has_sensible_size(tmp_path):
    kwargs, _ = make_case(32)
    paths = write(tmp_path, 1, top=5, fmt="png", **kwargs)
    for path in paths[:2]:
        with Image.open(path) as img:
            width, height = img.size
            assert img.format == "PNG"
            assert 800 <= width <= 2500 and 250 <= height <= 800
            assert width > 2.5 * height                          # one row of 6 panels
            pixels = np.asarray(img.convert("L"))
            assert pixels.std() > 10                             # not a blank canvas


@pytest.mark.slow
def test_pdf_and_svg_and_jpg_are_real_files(tmp_path):
    kwargs, _ = make_case(8)
    pdf = write(tmp_path, 1, top=3, fmt="pdf", **kwargs)
    assert pdf[0].read_bytes().startswith(b"%PDF") and pdf[7].read_bytes().startswith(b"%PDF")
    svg = write(tmp_path, 1, top=3, fmt="svg", **kwargs)
    assert b"<svg" in svg[0].read_bytes()[:2000] and b"<svg" in svg[7].read_bytes()[:2000]
    jpg = write(tmp_path, 1, top=3, fmt="jpg", **kwargs)
    for path in (jpg[0], jpg[7]):
        with Image.open(path) as img:
            assert img.format == "JPEG"
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


@pytest.mark.slow
def test_top_larger_than_n_and_wrapping(tmp_path):
    kwargs, fetched = make_case(8, n_train=4)
    paths = write(tmp_path, 1, top=10, fmt="png", **kwargs)
    assert len(read_csv(paths[2])) == 1 + 4 and len(read_csv(paths[3])) == 1 + 4
    assert sorted(fetched) == [0, 1, 2, 3]                    # overlapping lists fetched once
    kwargs, _ = make_case(32, n_train=30)
    paths = write(tmp_path, 2, top=12, fmt="png", **kwargs)
    with Image.open(paths[0]) as img:
        assert img.size[1] > 2 * 250                          # 12 images wrap onto 3 rows


def test_large_224_images_and_grayscale(tmp_path):
    kwargs, _ = make_case(8, n_train=6)
    rng = np.random.default_rng(1)
    kwargs["fetch_image"] = lambda i: rng.integers(0, 256, size=(224, 224, 3), dtype=np.uint8)
    kwargs["test_image"] = rng.integers(0, 256, size=(224, 224), dtype=np.uint8)
    kwargs["train_labels"] = np.full(6, 9)                    # the long ImageNet-style name
    paths = write(tmp_path, 1, top=2, fmt="png", **kwargs)
    assert report.outputs_complete(tmp_path, 1, "png")
    assert read_csv(paths[2])[1][4] == NAMES[9]               # the CSV keeps the full name


def test_bad_inputs_raise_before_writing(tmp_path):
    kwargs, _ = make_case(8)
    with pytest.raises(ValueError, match="format"):
        write(tmp_path / "a", 1, fmt="gif", **kwargs)
    bad = dict(kwargs, shares=kwargs["shares"][:, :2])
    with pytest.raises(ValueError, match="shape"):
        write(tmp_path / "b", 1, **bad)
    bad = dict(kwargs, layer_names=["a", "total", "c"])
    with pytest.raises(ValueError, match="total"):
        write(tmp_path / "c", 1, **bad)
    bad = dict(kwargs, keys=kwargs["keys"][:-1])
    with pytest.raises(ValueError, match="keys"):
        write(tmp_path / "d", 1, **bad)
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
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


def test_score_dict_is_ordered_by_ascending_total_ties_in_archive_order():
    scores = np.array([0.5, -2.0, 0.5, 3.0, -2.0, np.nan, -7.0])
    shares = np.column_stack([scores - 1.0, np.ones_like(scores)])
    keys = [f"0_{i}" for i in range(7)]
    table = report.score_dict(keys, ["a", "b"], shares, scores)
    assert list(table) == ["0_6", "0_1", "0_4", "0_0", "0_2", "0_3", "0_5"]     # NaN last
    assert table["0_3"] == {"a": 2.0, "b": 1.0, "total": 3.0}


def test_layer_leaders_take_the_largest_share_first_index_on_ties_never_nan():
    shares = np.array([[1.0, -3.0, np.nan],
                       [5.0, -1.0, -2.0],
                       [5.0, -2.0, np.nan]])
    np.testing.assert_array_equal(layer_leaders(shares), [1, 1, 1])
    assert layer_leaders(shares).dtype == np.int64
    with pytest.raises(ValueError):
        layer_leaders(np.zeros((0, 3)))


def test_layerwise_csv_without_training_images_is_header_only(tmp_path):
    path = tmp_path / "1_layerwise.csv"
    report._write_layerwise_csv(path, LAYERS, np.zeros((0, 3)), [], [], [], class_name)
    assert read_csv(path) == [["layer", "key", "share", "file", "label", "class_name"]]


def test_summarize_sums_to_the_totals_by_class_and_by_layer():
    rng = np.random.default_rng(7)
    n, n_layers = 3000, 16
    shares = rng.standard_t(3, size=(n, n_layers)) * 1e-3
    scores = shares.sum(axis=1)
    labels = rng.integers(0, 1000, n)
    names = [f"layer{j}" for j in range(n_layers)]
    s = summarize(scores, shares, labels, names, top_classes=12, keep_classes=[999, 5000])
    present = np.unique(labels)
    assert sorted(s["class_index"].tolist()) == present.tolist()
    assert s["class_count"].sum() == n
    np.testing.assert_allclose(s["class_pos"].sum() + s["class_neg"].sum(), scores.sum(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(s["total"], scores.sum(), rtol=1e-12)
    assert (s["class_pos"] >= 0).all() and (s["class_neg"] <= 0).all()
    np.testing.assert_allclose(s["class_pos"].sum(), scores[scores > 0].sum(), rtol=1e-9)
    for c in (present[0], 999):
        mine = scores[labels == c]
        k = int(np.nonzero(s["class_index"] == c)[0][0])
        np.testing.assert_allclose([s["class_pos"][k], s["class_neg"][k]],
                                   [mine[mine > 0].sum(), mine[mine < 0].sum()], atol=1e-15)
    magnitude = s["class_pos"] - s["class_neg"]
    assert (np.diff(magnitude) <= 0).all()                                    # by Σ|score|, largest first
    assert s["shown"][:12].all() and s["shown"].sum() == 12 + (999 in present and
                                                                int(np.nonzero(s["class_index"] == 999)[0][0]) >= 12)
    assert s["shown"][s["class_index"] == 999].all()
    assert s["other_classes"] == len(present) - s["shown"].sum()
    np.testing.assert_allclose(s["class_pos"][s["shown"]].sum() + s["other_pos"], s["class_pos"].sum(), rtol=1e-12)
    np.testing.assert_allclose(s["class_neg"][s["shown"]].sum() + s["other_neg"], s["class_neg"].sum(), rtol=1e-12)

    assert s["layer_names"] == names and s["layer_pos"].shape == (n_layers,)
    np.testing.assert_allclose(s["layer_pos"] + s["layer_neg"], shares.sum(axis=0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(s["layer_pos"].sum() + s["layer_neg"].sum(), scores.sum(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(s["layer_pos"], np.where(shares > 0, shares, 0).sum(axis=0), rtol=1e-12)
    with pytest.raises(ValueError):
        summarize(scores, shares[:, :3], labels, names)


@pytest.mark.slow
def test_summary_figure_stays_readable_for_1000_classes_and_many_layers(tmp_path):
    rng = np.random.default_rng(0)
    n = 2000
    for n_layers, fmt in ((16, "png"), (60, "png")):
        kwargs, _ = make_case(8, n_train=n)
        shares = rng.normal(size=(n, n_layers))
        kwargs.update(shares=shares, scores=shares.sum(axis=1), layer_names=[f"layer_{j}" for j in range(n_layers)],
                      train_labels=rng.integers(0, 1000, n), class_name=lambda c: f"class {c}")
        summary = write(tmp_path / str(n_layers), 1, top=2, fmt=fmt, **kwargs)[7]
        with Image.open(summary) as img:
            width, height = img.size
            assert 1200 <= width <= 1600 and 400 <= height <= 1200     # 13 in wide; 30 rows at most
            assert np.asarray(img.convert("L")).std() > 10


def test_format_score_is_compact():
    assert format_score(-0.0123456) == "-0.01235"
    assert format_score(-0.00123456) == "-1.23e-03"
    assert format_score(123.456) == "123.5"
    assert format_score(1.5e6) == "1.50e+06"
    assert format_score(0.0) == "0"


# ----------------------------------------------------------------------------- atomic_write

def test_atomic_write_replaces_and_keeps_extension(tmp_path):
    target = tmp_path / "harmful_1.pdf"
    target.write_text("old")
    with report.atomic_write(target) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".pdf" and tmp.name.startswith(".")
        assert str(os.getpid()) in tmp.name
        tmp.write_text("new")
        assert target.read_text() == "old"                     # untouched until the body ends
    assert target.read_text() == "new"
    assert os.listdir(tmp_path) == ["harmful_1.pdf"]


def test_atomic_write_np_save_lands_on_the_final_name(tmp_path):
    target = tmp_path / "1_scores.npy"
    with report.atomic_write(target) as tmp:
        np.save(tmp, np.arange(3, dtype=np.float32))
    np.testing.assert_array_equal(np.load(target), [0, 1, 2])
    assert os.listdir(tmp_path) == ["1_scores.npy"]


def test_atomic_write_leaves_nothing_when_the_body_raises(tmp_path):
    target = tmp_path / "useful_1.csv"
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
    assert os.listdir(tmp_path) == ["useful_1.csv"] and target.read_text() == "complete"


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
    code = ("import sys, influence.outputs.report; "
            "assert 'tensorflow' not in sys.modules and 'matplotlib.pyplot' not in sys.modules")
    root = pathlib.Path(report.__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
    assert "print(" not in pathlib.Path(report.__file__).read_text()


def test_shares_that_do_not_add_up_are_logged(tmp_path, caplog):
    kwargs, _ = make_case(8, n_train=6)
    kwargs["shares"] = kwargs["shares"] * 2.0
    with caplog.at_level("WARNING", logger="influence.outputs.report"):
        write(tmp_path, 1, top=2, fmt="png", **kwargs)
    assert "do not add up" in caplog.text
