"""Archive writer and readers, class maps."""
import json
import os
import zipfile

import numpy as np
import pytest

from influence.archives import ArchiveWriter, TestArchive, TrainArchive
from influence.classes import ClassMap, imagenet_classes, test_subfolder_index
from influence.errors import UserError


def _leftovers(folder):
    return sorted(n for n in os.listdir(folder) if "partial" in n)


def write_train(path, batch_lengths, shape=(6, 5), seed=0, files=True, meta=True):
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    with ArchiveWriter(path) as w:
        for b, n in enumerate(batch_lengths):
            x = rng.integers(0, 256, (n, *shape, 3), dtype=np.uint8)
            y = rng.integers(0, 10, (n, 1)).astype(np.int64)
            w.add(f"train_x_{b}", x)
            w.add(f"train_y_{b}", y)
            if files:
                w.add(f"train_files_{b}", np.array([f"c/{b}_{i}.png" for i in range(n)]))
            xs.append(x)
            ys.append(y[:, 0])
        if meta:
            w.add("meta_size", np.array(shape, np.int64))
    return np.concatenate(xs), np.concatenate(ys)


# ---------------------------------------------------------------------------- writer


def test_writer_add_and_stream_round_trip(tmp_path):
    path = tmp_path / "a.npz"
    rng = np.random.default_rng(1)
    whole = rng.normal(size=(3, 4))
    blocks = [rng.integers(0, 256, (n, 4, 3, 3), dtype=np.uint8) for n in (2, 0, 5, 1)]
    with ArchiveWriter(path) as w:
        w.add("whole", whole)
        with w.stream("rows", np.uint8, (4, 3, 3)) as s:
            for blk in blocks:
                s.append(blk)
            s.append(blocks[0][0])  # a single row
        empty = w.stream("empty", np.int64, (2,))
        empty.close()
        w.add("names", np.array(["a", "bcd"]))
    with np.load(path, allow_pickle=False) as z:
        assert z.files == ["whole", "rows", "empty", "names"]
        np.testing.assert_array_equal(z["whole"], whole)
        np.testing.assert_array_equal(z["rows"], np.concatenate(blocks + [blocks[0][:1]]))
        assert z["empty"].shape == (0, 2) and z["empty"].dtype == np.int64
        assert z["names"].dtype.kind == "U"
    with zipfile.ZipFile(path) as zf:
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_STORED}
    assert _leftovers(tmp_path) == []


def test_writer_streams_left_open_are_finalised(tmp_path):
    with ArchiveWriter(tmp_path / "a.npz") as w:
        s = w.stream("x", np.float32, ())
        s.append(np.arange(4, dtype=np.float32))
    with np.load(tmp_path / "a.npz") as z:
        np.testing.assert_array_equal(z["x"], np.arange(4))


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_writer_failure_leaves_nothing(tmp_path, exc):
    path = tmp_path / "a.npz"
    with pytest.raises(exc):
        with ArchiveWriter(path) as w:
            w.add("a", np.zeros(3))
            s = w.stream("b", np.uint8, (2,))
            s.append(np.zeros((4, 2), np.uint8))
            assert len(os.listdir(tmp_path)) == 2  # archive and raw spool, both temporary
            raise exc()
    assert os.listdir(tmp_path) == []


def test_writer_failure_keeps_previous_archive(tmp_path):
    path = tmp_path / "a.npz"
    with ArchiveWriter(path) as w:
        w.add("old", np.ones(2))
    with pytest.raises(RuntimeError):
        with ArchiveWriter(path) as w:
            w.add("new", np.zeros(2))
            raise RuntimeError
    with np.load(path) as z:
        assert z.files == ["old"]
    assert _leftovers(tmp_path) == []


def test_writer_refuses_pickles_and_duplicates(tmp_path):
    with pytest.raises(ValueError):
        with ArchiveWriter(tmp_path / "a.npz") as w:
            w.add("o", np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError):
        with ArchiveWriter(tmp_path / "b.npz") as w:
            w.add("k", np.zeros(1))
            w.add("k", np.zeros(1))
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------- TrainArchive


def test_train_archive_reads_and_take_matches_batches(tmp_path):
    path = tmp_path / "train.npz"
    x_all, y_all = write_train(path, [7, 7, 3])
    with TrainArchive(path) as t:
        assert t.batches == [0, 1, 2]
        assert len(t) == 17 and [t.batch_len(b) for b in t.batches] == [7, 7, 3]
        assert t.image_shape == (6, 5, 3)
        x, y, files = t.read_batch(1)
        assert x.dtype == np.uint8 and x.shape == (7, 6, 5, 3)
        assert y.dtype == np.int64 and y.shape == (7,)
        assert files[2] == "c/1_2.png"
        np.testing.assert_array_equal(t.labels(), y_all)
        assert t.labels().dtype == np.int64
        assert list(t.files()[:8]) == [f"c/0_{i}.png" for i in range(7)] + ["c/1_0.png"]
        got = list(t.iter_batches())
        assert [g[0] for g in got] == [0, 1, 2]
        np.testing.assert_array_equal(np.concatenate([g[1] for g in got]), x_all)

        idx = np.random.default_rng(3).integers(0, 17, 40)
        tx, ty = t.take(idx)
        assert tx.dtype == np.uint8 and tx.shape == (40, 6, 5, 3) and ty.dtype == np.int64
        np.testing.assert_array_equal(tx, x_all[idx])
        np.testing.assert_array_equal(ty, y_all[idx])
        # take is memory-mapped: it must equal read_batch slices exactly
        b1 = t.read_batch(1)
        np.testing.assert_array_equal(t.take([7, 8, 13])[0], b1[0][[0, 1, 6]])
        assert t.take([])[0].shape == (0, 6, 5, 3)
        with pytest.raises(IndexError):
            t.take([17])

        assert t.keys(2) == ["2_0", "2_1", "2_2"]
        img, label, file = t.lookup("2_1")
        np.testing.assert_array_equal(img, x_all[15])
        assert label == y_all[15] and file == "c/2_1.png"
        with pytest.raises(KeyError):
            t.lookup("2_3")
        with pytest.raises(KeyError):
            t.lookup("nope")


def test_original_format_archives_are_readable(tmp_path):
    rng = np.random.default_rng(0)
    x0 = rng.integers(0, 256, (4, 8, 12, 3), dtype=np.uint8)
    x1 = rng.integers(0, 256, (2, 8, 12, 3), dtype=np.uint8)
    y0 = np.array([[1], [2], [3], [4]], np.int16)
    y1 = np.array([[5], [6]], np.int32)
    for saver, name in ((np.savez, "plain.npz"), (np.savez_compressed, "zipped.npz")):
        saver(tmp_path / name, train_x_0=x0, train_y_0=y0, train_x_1=x1, train_y_1=y1)
        with TrainArchive(tmp_path / name) as t:
            assert t.image_shape == (8, 12, 3) and len(t) == 6
            x, y, files = t.read_batch(0)
            assert y.dtype == np.int64 and y.tolist() == [1, 2, 3, 4]
            assert files.tolist() == [""] * 4
            tx, ty = t.take([5, 0, 4])
            np.testing.assert_array_equal(tx, np.stack([x1[1], x0[0], x1[0]]))
            assert ty.tolist() == [6, 1, 5]
            assert t.lookup("1_1")[1:] == (6, "")
    np.savez(tmp_path / "test.npz", test_orig_x=x0, test_orig_y=y0, test_my_set_x=x1,
             test_my_set_y=y1)
    with TestArchive(tmp_path / "test.npz") as s:
        assert s.folders == ["orig", "my_set"] and s.image_shape == (8, 12, 3)
        x, y, files = s.read("my_set")
        np.testing.assert_array_equal(x, x1)
        assert y.tolist() == [5, 6] and y.dtype == np.int64 and files.tolist() == ["", ""]


def test_reader_errors(tmp_path):
    with pytest.raises(UserError, match="run prepare_data.py first"):
        TrainArchive(tmp_path / "missing.npz")
    with pytest.raises(UserError, match="prepare_only_test.py"):
        TestArchive(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"this is not a zip")
    with pytest.raises(UserError, match="not a valid train archive"):
        TrainArchive(tmp_path / "junk.npz")
    np.savez(tmp_path / "t.npz", test_a_x=np.zeros((1, 2, 2, 3), np.uint8),
             test_a_y=np.zeros((1, 1), np.int64))
    with pytest.raises(UserError, match="not a valid train archive"):
        TrainArchive(tmp_path / "t.npz")
    np.savez(tmp_path / "half.npz", train_x_0=np.zeros((1, 2, 2, 3), np.uint8))
    with pytest.raises(UserError, match="not a valid train archive"):
        TrainArchive(tmp_path / "half.npz")
    with pytest.raises(UserError, match="not a valid test archive"):
        TestArchive(tmp_path / "half.npz")
    with TestArchive(tmp_path / "t.npz") as s, pytest.raises(UserError, match="available: a"):
        s.read("b")


# ---------------------------------------------------------------------------- class maps


def test_imagenet_class_table():
    table = imagenet_classes()
    assert len(table) == 1000 and len({w for w, _ in table}) == 1000
    assert table[0] == ("n01440764", "tench") and table[999] == ("n15075141", "toilet_tissue")
    assert [w for w, _ in table] == sorted(w for w, _ in table)


def test_classmap_imagenet_partial(tmp_path):
    cm = ClassMap.from_train_folder_names(["n15075141", "n01440764"])
    assert cm.kind == "imagenet" and cm.indices() == [0, 999]
    assert cm.index_of("n15075141") == 999 and cm.name_of(0) == "n01440764"
    assert cm.human(999) == "toilet_tissue" and cm.human(1) == "goldfish"  # absent class too
    assert cm.name_of(1) == "n01443537"
    with pytest.raises(KeyError):
        cm.index_of("n01443537")
    cm.save(tmp_path / "labels.json")
    data = json.loads((tmp_path / "labels.json").read_text())
    assert data == {"kind": "imagenet", "classes": [
        {"index": 0, "name": "n01440764", "human": "tench"},
        {"index": 999, "name": "n15075141", "human": "toilet_tissue"}]}
    assert ClassMap.load(tmp_path / "labels.json") == cm
    assert _leftovers(tmp_path) == []


def test_classmap_folders():
    cm = ClassMap.from_train_folder_names(["dog", "cat", "n01440764"])
    assert cm.kind == "folders" and cm.names() == ["cat", "dog", "n01440764"]
    assert cm.index_of("dog") == 1 and cm.human(1) == "dog" and cm.human(7) == "7"
    with pytest.raises(KeyError):
        cm.name_of(7)
    numbered = ClassMap.from_train_folder_names(["2", "10", "0"])
    assert numbered.index_of("10") == 10 and numbered.index_of("2") == 2
    with pytest.raises(UserError):
        ClassMap.from_train_folder_names([])


def test_classmap_load_errors(tmp_path):
    with pytest.raises(UserError, match="run prepare_data.py first"):
        ClassMap.load(tmp_path / "labels.json")
    (tmp_path / "bad.json").write_text('{"kind": "imagenet"}')
    with pytest.raises(UserError, match="not a valid labels.json"):
        ClassMap.load(tmp_path / "bad.json")


def test_test_subfolder_index():
    cm = ClassMap.from_train_folder_names(["n01440764", "n15075141"])
    assert test_subfolder_index(cm, "0") == 0
    assert test_subfolder_index(cm, "17") == 17
    assert test_subfolder_index(cm, "n15075141") == 999
    assert test_subfolder_index(None, "5") == 5
    with pytest.raises(UserError, match="'cats'.*n01440764, n15075141"):
        test_subfolder_index(cm, "cats")
    with pytest.raises(UserError, match="0-999"):
        test_subfolder_index(cm, "1000")
    with pytest.raises(UserError, match="labels.json"):
        test_subfolder_index(None, "cats")
    folders = ClassMap.from_train_folder_names(["cat", "dog"])
    assert test_subfolder_index(folders, "dog") == 1 and test_subfolder_index(folders, "0") == 0
