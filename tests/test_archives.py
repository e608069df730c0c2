"""Archive writer and readers, class maps."""
import json
import os
import zipfile

import numpy as np
import pytest

from influence.data.archive_reader import TestArchive, TrainArchive, check_same_classes
from influence.data.archive_writer import ArchiveWriter
from influence.data.classes import ClassMap, imagenet_classes, order_conflicts, test_subfolder_index
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


def test_int16_archives_of_the_original_are_read_as_uint8(tmp_path):
    # the original wrote img_to_array(dtype=int16) pixels
    rng = np.random.default_rng(4)
    x0 = rng.integers(0, 256, (3, 5, 4, 3)).astype(np.int16)
    x1 = rng.integers(0, 256, (2, 5, 4, 3)).astype(np.int16)
    x0[0, 0, 0] = [0, 255, 128]
    y0, y1 = np.array([[1], [2], [3]]), np.array([[4], [5]])
    for saver, name in ((np.savez, "plain.npz"), (np.savez_compressed, "zipped.npz")):
        saver(tmp_path / name, train_x_0=x0, train_y_0=y0, train_x_1=x1, train_y_1=y1)
        with TrainArchive(tmp_path / name) as t:
            assert t.image_shape == (5, 4, 3) and len(t) == 5
            x, y, _ = t.read_batch(0)
            assert x.dtype == np.uint8 and np.array_equal(x, x0)
            tx, ty = t.take([4, 0, 3])
            assert tx.dtype == np.uint8 and ty.tolist() == [5, 1, 4]
            np.testing.assert_array_equal(tx, np.stack([x1[1], x0[0], x1[0]]))
            image = t.lookup("1_1")[0]
            assert image.dtype == np.uint8 and np.array_equal(image, x1[1])
            batches = list(t.iter_batches())
            assert all(b[1].dtype == np.uint8 for b in batches)
    np.savez(tmp_path / "test.npz", test_orig_x=x0, test_orig_y=y0)
    with TestArchive(tmp_path / "test.npz") as s:
        x, y, _ = s.read("orig")
        assert x.dtype == np.uint8 and np.array_equal(x, x0) and y.tolist() == [1, 2, 3]


def test_int16_pixels_outside_0_255_are_refused(tmp_path):
    good = np.full((2, 3, 3, 3), 7, np.int16)
    bad = good.copy()
    bad[1, 2, 2, 0] = 300
    neg = good.copy()
    neg[0, 0, 0, 1] = -1
    np.savez(tmp_path / "train.npz", train_x_0=good, train_y_0=np.zeros((2, 1)).astype(int),
             train_x_1=bad, train_y_1=np.zeros((2, 1)).astype(int))
    with TrainArchive(tmp_path / "train.npz") as t:  # the range is checked on what is read
        assert t.take([0, 1])[0].dtype == np.uint8
        assert t.take([2])[0].max() == 7  # row 0 of the bad batch is fine
        for read in (lambda: t.read_batch(1), lambda: t.take([0, 3]), lambda: t.lookup("1_1")):
            with pytest.raises(UserError, match=r"train_x_1: pixel values 7\.\.300 are outside") as err:
                read()
            assert "\n" not in str(err.value)
    np.savez(tmp_path / "test.npz", test_a_x=neg, test_a_y=np.zeros((2, 1), np.int64))
    with TestArchive(tmp_path / "test.npz") as s, pytest.raises(UserError, match="-1..7"):
        s.read("a")
    np.savez(tmp_path / "float.npz", train_x_0=good.astype(np.float32), train_y_0=np.zeros((2, 1)))
    with pytest.raises(UserError, match="float32"):
        TrainArchive(tmp_path / "float.npz")


@pytest.mark.parametrize("name", ["../../evil", "..", ".", "a/b", "a\\b", "/abs"])
def test_test_archive_refuses_folder_names_that_are_not_plain(tmp_path, name):
    x, y = np.zeros((1, 2, 2, 3), np.uint8), np.zeros((1, 1), np.int64)
    np.savez(tmp_path / "test.npz", test_fine_x=x, test_fine_y=y,
             **{f"test_{name}_x": x, f"test_{name}_y": y})
    with zipfile.ZipFile(tmp_path / "test.npz") as zf:  # the member really has that name
        assert f"test_{name}_x.npy" in zf.namelist()
    with pytest.raises(UserError, match="not a plain folder name") as err:
        TestArchive(tmp_path / "test.npz")
    assert repr(name) in str(err.value) and "\n" not in str(err.value)


def test_check_same_classes(tmp_path):
    old = ClassMap.from_train_folder_names(["cat", "dog"])
    new = ClassMap.from_train_folder_names(["bird", "cat", "dog"])
    x, y = np.zeros((1, 2, 2, 3), np.uint8), np.zeros((1, 1), np.int64)

    def archive(name, kind, digest):
        with ArchiveWriter(tmp_path / name) as w:
            w.add(f"{kind}_x_0" if kind == "train" else f"test_{kind}_x", x)
            w.add(f"{kind}_y_0" if kind == "train" else f"test_{kind}_y", y)
            if digest is not None:
                w.add("meta_classes", np.asarray(digest))
        return (TrainArchive if kind == "train" else TestArchive)(tmp_path / name)

    train_new = archive("train.npz", "train", new.digest())
    train_old = archive("train_old.npz", "train", old.digest())
    train_none = archive("train_none.npz", "train", None)
    test_old = archive("test.npz", "orig", old.digest())
    test_none = archive("test_none.npz", "orig", None)
    assert test_old.classes_digest == old.digest() and test_none.classes_digest is None

    with pytest.raises(UserError) as err:
        check_same_classes(train_new, test_old)
    msg = str(err.value)
    assert "\n" not in msg and f"prepare_only_test.py -ts <test folders: orig> --out {tmp_path}" in msg
    with pytest.raises(UserError, match="prepare_only_test.py"):
        check_same_classes(train_none, test_old, new)  # labels.json alone says so
    with pytest.raises(UserError, match="prepare_data.py"):
        check_same_classes(train_new, test_old, old)  # train.npz and labels.json disagree
    assert check_same_classes(train_old, test_old) is None
    assert check_same_classes(train_old, test_old, old) is None
    # archives without the member (the original tool's, older ones) pass unchecked
    assert check_same_classes(train_none, test_old) is None
    assert check_same_classes(train_new, test_none, new) is None
    assert check_same_classes(train_none, test_none) is None
    for a in (train_new, train_old, train_none, test_old, test_none):
        a.close()


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
    assert data == {"kind": "imagenet", "digest": cm.digest(), "classes": [
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


def test_imagenet_wnid_absent_from_train_gets_its_canonical_index():
    cm = ClassMap.from_train_folder_names(["n01440764", "n15075141"])
    goldfish = "n01443537"  # index 1, not in the train folder
    assert goldfish not in cm
    assert test_subfolder_index(cm, goldfish) == 1 == test_subfolder_index(cm, "1")
    assert test_subfolder_index(None, goldfish) == 1
    folders = ClassMap.from_train_folder_names(["cat", "dog"])
    with pytest.raises(UserError, match=goldfish):  # not an ImageNet map: a wnid means nothing
        test_subfolder_index(folders, goldfish)
    with pytest.raises(UserError, match="'n99999999'"):
        test_subfolder_index(cm, "n99999999")


def test_class_map_digest():
    two = ClassMap.from_train_folder_names(["cat", "dog"])
    assert two.digest() == ClassMap.from_train_folder_names(["dog", "cat"]).digest()
    assert len(two.digest()) == 16 and int(two.digest(), 16) >= 0
    three = ClassMap.from_train_folder_names(["bird", "cat", "dog"])
    assert three.digest() != two.digest()  # "cat" was 0, is 1 now
    renamed = ClassMap.from_train_folder_names(["cat", "wolf"])
    assert renamed.digest() != two.digest()
    # ImageNet labels are canonical: adding a class changes no label's meaning
    few = ClassMap.from_train_folder_names(["n01440764"])
    more = ClassMap.from_train_folder_names(["n01440764", "n15075141"])
    assert few.digest() == more.digest() != two.digest()
    ints = [str(i) for i in range(12)]
    assert (ClassMap.from_train_folder_names(ints, "keras").digest()
            != ClassMap.from_train_folder_names(ints).digest())


def test_integer_class_folders_numeric_and_keras_order():
    names = [str(i) for i in range(12)]
    numeric = ClassMap.from_train_folder_names(names)
    keras = ClassMap.from_train_folder_names(names, order="keras")
    assert numeric.index_of("10") == 10 and numeric.index_of("2") == 2
    # Keras' image_dataset_from_directory: sorted as text, 0 1 10 11 2 3 ...
    assert keras.names() == ["0", "1", "10", "11", "2", "3", "4", "5", "6", "7", "8", "9"]
    assert keras.index_of("10") == 2 and keras.index_of("2") == 4 and keras.index_of("9") == 11
    assert order_conflicts(names)[:3] == [("2", 2, 4), ("3", 3, 5), ("4", 4, 6)]
    assert len(order_conflicts(names)) == 10
    assert order_conflicts([str(i) for i in range(10)]) == []  # 0..9: both orders agree
    assert order_conflicts(["1", "2"]) == [("1", 1, 0), ("2", 2, 1)]
    assert order_conflicts(["cat", "10", "2"]) == []  # not all integers: text order anyway
    words = ClassMap.from_train_folder_names(["dog", "cat"], order="keras")
    assert words == ClassMap.from_train_folder_names(["dog", "cat"])
