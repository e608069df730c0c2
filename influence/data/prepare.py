"""The jobs behind ``prepare_data.py`` and ``prepare_only_test.py``.

``prepare_data``: image folders -> ``train.npz``, ``test.npz`` and ``labels.json`` in ``--out``.
``prepare_only_test``: test folders -> ``test.npz``, reusing ``labels.json`` (and the image size
of ``train.npz``) from an earlier ``prepare_data`` run when present.

Images are decoded in a process pool and streamed into the archives batch by batch, so memory
stays flat however many images there are. Unreadable files are skipped with a warning. Outputs
appear under their final names only when everything succeeded, and only one run at a time writes
into one ``--out`` folder (:func:`influence.locking.folder_lock`). Both archives record the class
map's digest (``meta_classes``) so that a ``test.npz`` packed for other classes is caught.
"""
import logging
import os
import re
from dataclasses import dataclass, field

import numpy as np
from tqdm.contrib.logging import logging_redirect_tqdm

from influence.data.archive_reader import TestArchive, TrainArchive, is_plain_name
from influence.data.archive_writer import ArchiveWriter
from influence.data.classes import ClassMap, order_conflicts, test_subfolder_index
from influence.errors import SettingError, UserError
from influence.data.images import Decoder, default_workers, list_files, list_subfolders, require_folder
from influence.locking import folder_lock
from influence.progress import progress

log = logging.getLogger(__name__)

DEFAULT_SIZE = 224
DEFAULT_BATCH = 200
DEFAULT_SEED = 282
MAX_SIZE = 16384
TRAIN_NAME, TEST_NAME, LABELS_NAME = "train.npz", "test.npz", "labels.json"
# temporaries of this module's writers (ArchiveWriter, its streams, ClassMap.save), also the
# older ``.<name>.partial`` form: removed under the folder lock when a killed run left them
_LEFTOVER = re.compile(r"^\.(train\.npz|test\.npz|labels\.json)(\.\d+\.[0-9a-f]+)?\.partial$"
                       r"|^\.(train|test)_.+\.raw\.partial$")


def _int_arg(setting, value, minimum, maximum=None):
    """``value`` (a string or int) as an int in ``minimum..maximum``; a :class:`SettingError` names ``setting``."""
    try:
        number = int(str(value).strip())
    except ValueError:
        raise SettingError(setting, f"must be an integer, got {value!r}") from None
    if number < minimum or (maximum is not None and number > maximum):
        bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise SettingError(setting, f"must be {bound}, got {number}")
    return number


def parse_size(values):
    """``None`` -> ``None``; ``["224"]`` -> ``(224, 224)``; ``["120", "160"]`` -> ``(120, 160)``."""
    if values is None:
        return None
    if isinstance(values, (str, int)):
        values = [values]
    if len(values) not in (1, 2):
        raise SettingError("size", f"takes one number (square) or two (H W), got {len(values)}")
    sizes = [_int_arg("size", v, 1, MAX_SIZE) for v in values]
    return (sizes[0], sizes[0]) if len(sizes) == 1 else (sizes[0], sizes[1])


def _workers(value):
    return default_workers() if value is None else _int_arg("workers", value, 1, 256)


def check_class_order(names, order):
    """Log how integer class folder names are numbered when the two orders disagree.

    ``names``: train subfolder names; ``order``: ``numeric`` (warns) or ``keras`` (informs).
    """
    conflicts = order_conflicts(names)
    if not conflicts:
        return
    conflicts = sorted(conflicts, key=lambda row: row[2])  # text order: 10 comes first
    shown = ", ".join(f"{n} -> {k}" for n, _, k in conflicts[:4])
    more = f", and {len(conflicts) - 4} more" if len(conflicts) > 4 else ""
    if order == "numeric":
        log.warning("class folders are integers: each one's index is its value (class_order "
                    "numeric), but Keras' image_dataset_from_directory numbers them in text order "
                    "(folder -> Keras index: %s%s); if your model was trained that way, run "
                    "again with class_order keras", shown, more)
    else:
        log.info("class_order keras: class folders numbered in text order (folder -> index: "
                 "%s%s)", shown, more)


def _out_folder(path):
    if os.path.exists(path) and not os.path.isdir(path):
        raise SettingError("out", f"{path!r} is not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise SettingError("out", f"cannot create folder {path!r}: {exc.strerror}") from None
    return path


# --------------------------------------------------------------------------------------------
# packing


@dataclass
class Stats:
    """Counts for the summary line."""
    train: int = 0
    batches: int = 0
    test: dict = field(default_factory=dict)
    skipped: int = 0


@dataclass
class TestImageFolder:
    """A validated test folder: its archive name and ``{subfolder: class index}``."""
    path: str
    name: str
    indices: dict

    __test__ = False


def _warn_skip(root, rel, reason, stats):
    stats.skipped += 1
    log.warning("skipping %s: %s", os.path.join(root, rel), reason)


def list_train_files(root, classmap):
    """Sorted ``(class folder, relative path)`` pairs of the train folder (UserError if none)."""
    entries = list_files(root, classmap.names(), desc="parsing train")
    if not entries:
        raise UserError(f"no files in the class subfolders of train folder {root!r}")
    return entries


def pack_train(writer, root, entries, classmap, size, batch_size, seed, decoder, stats):
    """Shuffle ``entries`` with ``seed`` and write full batches ``train_{x,y,files}_{b}``, then
    ``meta_size`` and ``meta_classes``. The image buffer is ``uint8 (min(batch_size, len(entries)),
    H, W, 3)``: a batch size beyond the image count costs nothing."""
    order = np.random.default_rng(seed).permutation(len(entries))
    height, width = size
    buf_x = np.empty((min(batch_size, len(entries)), height, width, 3), np.uint8)
    buf_y, buf_f = [], []

    def flush():
        n = len(buf_y)
        writer.add(f"train_x_{stats.batches}", buf_x[:n])
        writer.add(f"train_y_{stats.batches}", np.asarray(buf_y, np.int64).reshape(n, 1))
        writer.add(f"train_files_{stats.batches}", np.asarray(buf_f, dtype=str))
        stats.batches += 1
        stats.train += n
        buf_y.clear()
        buf_f.clear()

    with progress(total=len(entries), desc="packing train", unit="img", smoothing=0.1) as bar:
        for start in range(0, len(entries), batch_size):
            block = [entries[i] for i in order[start:start + batch_size]]
            results = decoder.decode([os.path.join(root, rel) for _, rel in block])
            for (sub, rel), (arr, err) in zip(block, results):
                bar.update(1)
                if arr is None:
                    _warn_skip(root, rel, err, stats)
                    continue
                buf_x[len(buf_y)] = arr
                buf_y.append(classmap.index_of(sub))
                buf_f.append(rel)
                if len(buf_y) == batch_size:
                    flush()
        if buf_y:
            flush()
    if stats.train == 0:
        raise UserError(f"no readable images in train folder {root!r}")
    writer.add("meta_size", np.asarray(size, np.int64))
    writer.add("meta_classes", np.asarray(classmap.digest()))


def check_test_folders(paths, classmap):
    """Validate test folders before anything is written; returns a list of :class:`TestImageFolder`."""
    folders, seen = [], {}
    for path in paths:
        require_folder(path, "test folder")
        name = os.path.basename(os.path.normpath(os.path.abspath(path)))
        if not is_plain_name(name):  # basenames always are; results are written under this name
            raise UserError(f"test folder {path!r}: {name!r} cannot name a result folder")
        if name in seen:
            raise UserError(f"test folders {seen[name]!r} and {path!r} have the same name "
                            f"{name!r}; archive keys need distinct names")
        seen[name] = path
        subs = list_subfolders(path, "test folder")
        if not subs:
            raise UserError(f"test folder {path!r} has no class subfolders "
                            "(name them by class index 0, 1, ... or by train class name)")
        indices = {s: test_subfolder_index(classmap, s) for s in subs}
        folders.append(TestImageFolder(path, name, indices))
    return folders


def pack_test(writer, folder, size, block_size, decoder, stats):
    """Write ``test_{name}_x`` (streamed), ``test_{name}_y`` and ``test_{name}_files``."""
    entries = list_files(folder.path, sorted(folder.indices), desc=f"parsing {folder.name}")
    ys, files = [], []
    with writer.stream(f"test_{folder.name}_x", np.uint8, (*size, 3)) as xs, \
            progress(total=len(entries), desc=f"packing {folder.name}", unit="img") as bar:
        for start in range(0, len(entries), block_size):
            block = entries[start:start + block_size]
            results = decoder.decode([os.path.join(folder.path, rel) for _, rel in block])
            rows = []
            for (sub, rel), (arr, err) in zip(block, results):
                bar.update(1)
                if arr is None:
                    _warn_skip(folder.path, rel, err, stats)
                    continue
                rows.append(arr)
                ys.append(folder.indices[sub])
                files.append(rel)
            if rows:
                xs.append(np.stack(rows))
    if not ys:
        log.warning("test folder %s has no readable images", folder.path)
    writer.add(f"test_{folder.name}_y", np.asarray(ys, np.int64).reshape(len(ys), 1))
    writer.add(f"test_{folder.name}_files", np.asarray(files, dtype=str).reshape(len(files)))
    stats.test[folder.name] = len(ys)


def write_test_archive(path, folders, size, block_size, decoder, stats, classmap=None):
    """All test folders into one archive at ``path`` (atomic); ``meta_classes`` records
    ``classmap.digest()`` when the labels came from a class map (not when ``classmap`` is None)."""
    with ArchiveWriter(path) as writer:
        for folder in folders:
            pack_test(writer, folder, size, block_size, decoder, stats)
        writer.add("meta_size", np.asarray(size, np.int64))
        if classmap is not None:
            writer.add("meta_classes", np.asarray(classmap.digest()))


def remove_leftovers(out):
    """Delete temporaries that a killed run of this module left in ``out`` (call under the
    folder lock: no other run can be writing them). Returns how many were removed."""
    removed = 0
    for entry in os.scandir(out):
        if entry.is_file(follow_symlinks=False) and _LEFTOVER.match(entry.name):
            try:
                os.unlink(entry.path)
                removed += 1
            except FileNotFoundError:
                pass
    if removed:
        log.info("removed %d temporary file%s left in %s by an interrupted run", removed,
                 "s" if removed != 1 else "", out)
    return removed


def warn_stale_test(out, classmap):
    """Warn when ``out``'s existing test.npz (not rewritten by this run) was packed for another
    class map than ``classmap``; says how to rebuild it."""
    path = os.path.join(out, TEST_NAME)
    if not os.path.isfile(path):
        return
    try:
        with TestArchive(path) as test:
            digest, folders = test.classes_digest, test.folders
    except UserError:
        return  # calculate.py reports an unreadable test.npz itself
    if digest is not None and digest != classmap.digest():
        log.warning("%s was packed for other classes than this train folder: its label numbers "
                    "now mean other classes; rebuild it with prepare_only_test.py -ts <test "
                    "folders: %s> --out %s", path, " ".join(folders), out)


def _mb(path):
    return os.path.getsize(path) / 1e6


def _summary(stats, classmap, out, wrote):
    parts = []
    if stats.batches:
        parts.append(f"{stats.train} train images in {stats.batches} "
                     f"batch{'es' if stats.batches != 1 else ''}")
    if stats.test:
        total = sum(stats.test.values())
        detail = ", ".join(f"{k} {v}" for k, v in stats.test.items())
        parts.append(f"{total} test images ({detail})")
    parts.append(f"{stats.skipped} skipped")
    if classmap is not None:
        parts.append(f"{len(classmap)} classes ({classmap.kind})")
    sizes = ", ".join(f"{name} {_mb(os.path.join(out, name)):.1f} MB" for name in wrote)
    log.info("done: %s; %s in %s", ", ".join(parts), sizes, out)


def _io_guard(func, *args):
    try:
        return func(*args)
    except OSError as exc:
        if exc.strerror is None:
            raise
        raise UserError(f"cannot write archive: {exc.strerror} ({exc.filename or ''})") from None


# --------------------------------------------------------------------------------------------
# jobs


def prepare_data(args):
    """Job of ``prepare_data.py``: train folder (+ test folders) -> archives + labels.json."""
    size = parse_size(args.size) or (DEFAULT_SIZE, DEFAULT_SIZE)
    batch_size = _int_arg("batch_size", args.batch_size, 1, 1 << 20)
    seed = _int_arg("seed", args.seed, 0)
    workers = _workers(args.workers)
    names = list_subfolders(args.train, "train folder")
    classmap = ClassMap.from_train_folder_names(names, args.class_order)
    check_class_order(names, args.class_order)
    tests = check_test_folders(args.test, classmap)
    out = _out_folder(args.out)
    with folder_lock(out, "prepare_data.py"):
        remove_leftovers(out)
        entries = list_train_files(args.train, classmap)
        log.info("train folder %s: %d files in %d classes (%s); size %dx%d, batch %d, seed %d, "
                 "%d worker%s", args.train, len(entries), len(classmap), classmap.kind, size[0],
                 size[1], batch_size, seed, workers, "s" if workers != 1 else "")
        stats = Stats()
        with logging_redirect_tqdm(), Decoder(size, workers, args.resample) as decoder:
            def work():
                with ArchiveWriter(os.path.join(out, TRAIN_NAME)) as train_writer:
                    pack_train(train_writer, args.train, entries, classmap, size, batch_size,
                               seed, decoder, stats)
                    if tests:  # the train archive is renamed only after the test one is complete
                        write_test_archive(os.path.join(out, TEST_NAME), tests, size, batch_size,
                                           decoder, stats, classmap)
                classmap.save(os.path.join(out, LABELS_NAME))
            _io_guard(work)
        if not tests:
            warn_stale_test(out, classmap)
    wrote = [TRAIN_NAME] + ([TEST_NAME] if tests else [])
    _summary(stats, classmap, out, wrote)
    return 0


def prepare_only_test(args):
    """Job of ``prepare_only_test.py``: test folders -> test.npz, reusing labels.json."""
    size = parse_size(args.size)
    block = _int_arg("batch_size", args.batch_size, 1, 1 << 20)
    workers = _workers(args.workers)
    out = args.out
    labels_path = args.labels or os.path.join(out, LABELS_NAME)
    if args.labels or os.path.isfile(labels_path):
        classmap = ClassMap.load(labels_path)
        log.info("classes from %s: %d (%s)", labels_path, len(classmap), classmap.kind)
    else:
        classmap = None
        log.info("no %s: test subfolders must be class indices", labels_path)
    if size is None:
        train_path = os.path.join(out, TRAIN_NAME)
        if os.path.isfile(train_path):
            with TrainArchive(train_path) as train:
                size = train.image_shape[:2]
            log.info("image size %dx%d from %s", size[0], size[1], train_path)
        else:
            size = (DEFAULT_SIZE, DEFAULT_SIZE)
    tests = check_test_folders(args.test, classmap)
    out = _out_folder(out)
    stats = Stats()
    with folder_lock(out, "prepare_only_test.py"):
        remove_leftovers(out)
        with logging_redirect_tqdm(), Decoder(size, workers, args.resample) as decoder:
            _io_guard(write_test_archive, os.path.join(out, TEST_NAME), tests, size, block,
                      decoder, stats, classmap)
    _summary(stats, classmap, out, [TEST_NAME])
    return 0
