"""What the HTML report of a run holds, and finding it on disk: :class:`ReportState`.

The state is built as the run goes (:meth:`ReportState.add_folder`, :meth:`~ReportState.add`,
:meth:`~ReportState.add_self_influence`) or scanned from what an output folder already holds
(:meth:`ReportState.scan`: every ``<folder>/<folder>_preds.csv`` and every test image whose outputs are
complete); the thumbnails it shows are written as it is built. Rendering is
:mod:`influence.outputs.html_render`'s, writing the pages :mod:`influence.outputs.html_report`'s (the
layout of the pages is described there).

Global training images: a training image in the top harmful or useful lists of many test images
(the rule: :data:`GLOBAL_MIN_TESTS`, :data:`GLOBAL_MIN_LISTS`, :data:`GLOBAL_SHARE`,
:func:`global_threshold`). The counts are derived from the test images the state holds, so a state
rebuilt by :meth:`ReportState.scan` has the same ones.
"""
import csv
import dataclasses
import logging
import math
import os
import pathlib
from collections.abc import Mapping

import numpy as np
from PIL import Image

from influence.outputs.report import expected_outputs, outputs_complete

log = logging.getLogger(__name__)

INDEX = "index.html"
THUMBS = "thumbs"
#: columns of :meth:`ReportState.add_self_influence` rows, in order (also the keys of mapping rows)
SELF_INFLUENCE_COLUMNS = ("rank", "key", "file", "label", "class_name", "prediction", "confidence",
                          "self_influence", "loss")
#: a training image is "global" when the report has at least GLOBAL_MIN_TESTS test images and it
#: is in the top harmful or useful list of at least max(GLOBAL_MIN_LISTS, ceil(GLOBAL_SHARE * N))
#: of the report's N test images (a test image counts once even if both its lists hold it)
GLOBAL_MIN_TESTS = 5
GLOBAL_MIN_LISTS = 3
GLOBAL_SHARE = 0.2


@dataclasses.dataclass(frozen=True)
class TrainRow:
    """One training image of a harmful/useful list (a row of ``harmful_<n>.csv``)."""

    rank: int
    key: str
    file: str
    label: int
    class_name: str
    score: float
    thumb: str          # out-relative path, "" if there is none


@dataclasses.dataclass(frozen=True)
class ListCount:
    """In how many test images' top lists one training image is (see :meth:`ReportState.list_counts`)."""

    harmful: int        # test images whose harmful list holds it
    useful: int         # test images whose useful list holds it
    lists: int          # test images whose harmful or useful list holds it
    tests: int          # test images in the report
    train: TrainRow     # one of its rows (key, file, label, thumbnail; rank and score of that row)


@dataclasses.dataclass(frozen=True)
class TestRecord:
    """One scored test image."""

    folder: str
    label: int          # the label folder
    n: int
    file: str
    true: int
    true_name: str
    pred: int
    pred_name: str
    conf: float
    thumb: str
    harmful: tuple
    useful: tuple
    outputs: tuple      # out-relative paths of the output files that exist
    summary: str        # out-relative path of <n>_summary.<fmt>, "" if absent

    @property
    def wrong(self):
        return self.pred != self.true

    def order(self):
        """Misclassified first, then label and number."""
        return (not self.wrong, self.label, self.n)


class ReportState:
    """What the report of one run holds: its test folders, scored test images, self-influence rows and
    the thumbnails they show, added as the run goes (:meth:`add`) or scanned from ``out_dir`` (:meth:`scan`);
    :class:`influence.outputs.html_report.RunReport` renders and writes it.

    Args:
      out_dir: the run's ``--out`` folder.
      train_archive: :class:`influence.data.archive_reader.TrainArchive` (thumbnails, keys and files of the
        training images).
      class_name: callable int -> str.
      settings_summary: dict shown as a table on the index (None: no table).
      fmt: the figure format of the run (``png``, ``pdf``, ...).
      figures: whether the run draws each test image's figures (``--no-figures``: it does not; a test
        image is then complete without them).
      page_size: while the run has at most this many scored test images they all sit on the
        index; beyond, every folder gets its own pages of at most ``page_size`` images.
      thumb_px: longest side of a thumbnail file, in pixels (smaller images are kept as they are).
    """

    def __init__(self, out_dir, train_archive, class_name, settings_summary, fmt, *, figures=True, page_size=200,
                 thumb_px=96):
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1, got {page_size}")
        self.out = pathlib.Path(out_dir)
        self.train = train_archive
        self.class_name = class_name
        self.settings = dict(settings_summary or {})
        self.fmt = fmt
        self.figures = bool(figures)
        self.page_size = int(page_size)
        self.thumb_px = int(thumb_px)
        self._train_dir = f"{THUMBS}/train_{train_archive.fingerprint()}"
        self._starts = np.cumsum([0] + [train_archive.batch_len(b) for b in train_archive.batches])
        self.folders = {}           # folder -> (labels total, misclassified) or None; insertion order
        self.images = {}            # (folder, label, n) -> TestRecord
        self.self_influence = None  # (rows, thumbnails, figure) once add_self_influence gave them

    # ------------------------------------------------------------------------- building the state

    def add_folder(self, folder, labels, preds):
        """Register a test folder with the predictions of ALL its images (for its accuracy)."""
        labels = np.asarray(labels).reshape(-1)
        preds = np.asarray(preds).reshape(-1)
        if labels.shape != preds.shape:
            raise ValueError(f"labels and preds differ in length: {labels.size}, {preds.size}")
        self.folders[str(folder)] = (int(labels.size), int(np.sum(labels != preds)))

    def add(self, folder, label, n, test, harmful, useful):
        """Add (or replace) test image ``n`` of ``<folder>/<label>``; call after its files are written.

        Args:
          test: a :class:`influence.outputs.report.TestImage`: ``image`` uint8 (H, W, 3) or None (its
            thumbnail is (re)written), ``file`` str, ``label``, ``pred`` int class indices, ``conf``
            float in [0, 1] or None.
          harmful, useful: lists of ``(train_index, score)``, rank order (index in archive order).
        """
        rows = [[self._train_row(rank, int(i), float(s)) for rank, (i, s) in enumerate(pairs, start=1)]
                for pairs in (harmful, useful)]
        thumb = self._test_thumb(folder, label, n, test.image, replace=True)
        facts = (str(test.file), int(test.label), self.class_name(int(test.label)), int(test.pred),
                 self.class_name(int(test.pred)), test.conf)
        self._put((folder, label, n), facts, thumb, rows)

    def add_self_influence(self, rows, figure_path=None):
        """Set the self-influence section: ``rows`` of :data:`SELF_INFLUENCE_COLUMNS` (sequences in
        that order, or mappings with those keys), ``figure_path`` absolute or relative to ``out_dir``."""
        rows = [tuple(r[c] for c in SELF_INFLUENCE_COLUMNS) if isinstance(r, Mapping) else tuple(r)
                for r in rows]
        if any(len(r) != len(SELF_INFLUENCE_COLUMNS) for r in rows):
            raise ValueError(f"self-influence rows need {len(SELF_INFLUENCE_COLUMNS)} values: "
                             f"{', '.join(SELF_INFLUENCE_COLUMNS)}")
        figure = ""
        if figure_path is not None:
            path = pathlib.Path(figure_path)
            figure = pathlib.Path(os.path.relpath(path if path.is_absolute() else self.out / path,
                                                  self.out)).as_posix()
        thumbs = [self._train_thumb(str(r[1])) for r in rows]
        self.self_influence = (rows, thumbs, figure)

    @classmethod
    def scan(cls, out_dir, train_archive, class_name, settings_summary, fmt, *, test_archive=None,
             first_n=1, **kwargs):
        """A report of what ``out_dir`` already holds: every ``<folder>/<folder>_preds.csv`` and every
        test image whose outputs are complete. The n-th image of a label (``n`` counted from
        ``first_n``) is that label's n-th row of the predictions CSV. ``test_archive`` (a
        :class:`TestArchive`) supplies test thumbnails that are missing; folders follow its order."""
        report = cls(out_dir, train_archive, class_name, settings_summary, fmt, **kwargs)
        out = report.out
        found = sorted(p.parent.name for p in out.glob("*/*_preds.csv") if p.name == f"{p.parent.name}_preds.csv")
        order = [f for f in (test_archive.folders if test_archive is not None else ()) if f in found]
        for folder in order + [f for f in found if f not in order]:
            try:
                preds = read_csv(out / folder / f"{folder}_preds.csv")
                labels = np.array([int(r["label"]) for r in preds], np.int64)
                report.add_folder(folder, labels, [int(r["prediction"]) for r in preds])
            except (OSError, KeyError, ValueError) as exc:
                log.warning("report: %s/%s_preds.csv not read (%s): folder left out", folder, folder, exc)
                continue
            images = []         # the folder's test images, read at the first missing thumbnail

            def test_image(i, folder=folder, images=images):
                if test_archive is None or folder not in test_archive.folders:
                    return None
                if not images:
                    images.append(test_archive.read(folder)[0])
                return images[0][i] if len(images[0]) == len(labels) else None

            for label in sorted(set(labels.tolist())):
                label_dir = out / folder / str(label)
                for j, i in enumerate(np.nonzero(labels == label)[0].tolist()):
                    n = first_n + j
                    if not outputs_complete(label_dir, n, fmt, report.figures):
                        continue
                    try:
                        rows = [[report._csv_row(r) for r in read_csv(label_dir / f"{kind}_{n}.csv")]
                                for kind in ("harmful", "useful")]
                        row = preds[i]
                        facts = (row["file"], label, row["class_name"], int(row["prediction"]),
                                 row["prediction_name"], float(row["confidence"]))
                    except (OSError, KeyError, ValueError) as exc:
                        log.warning("report: test image %d of %s/%d left out (%s)", n, folder, label, exc)
                        continue
                    image = None if has_file(out / test_thumb_path(folder, label, n)) else test_image(i)
                    report._put((folder, label, n), facts, report._test_thumb(folder, label, n, image, replace=False),
                                rows)
        return report

    def _put(self, where, facts, thumb, rows):
        """``where``: (folder, label, n); ``facts``: (file, true, true name, prediction, prediction name,
        confidence); ``rows``: the harmful and useful training rows."""
        folder, label, n = where
        file, true, true_name, pred, pred_name, conf = facts
        harmful, useful = rows
        folder = str(folder)
        label_dir = self.out / folder / str(label)
        extra = [label_dir / f"{n}_layerwise.csv", label_dir / f"{n}_summary.{self.fmt}"]
        listed = expected_outputs(label_dir, n, self.fmt)
        outputs = tuple(self._rel(p) for p in listed + [e for e in extra if e not in listed] if p.is_file())
        summary = self._rel(extra[1]) if extra[1].is_file() else ""
        key = (folder, int(label), int(n))
        self.folders.setdefault(folder, None)
        self.images[key] = TestRecord(folder, int(label), int(n), file, int(true), true_name, int(pred), pred_name,
                                  None if conf is None else float(conf), thumb, tuple(harmful), tuple(useful),
                                  outputs, summary)

    # ------------------------------------------------------------------------- global training images

    def list_counts(self):
        """``{training key: ListCount}``: in how many of the report's test images' top harmful /
        useful lists each training image is. Derived from the test images the report holds (so the
        same after :meth:`scan`); largest ``lists`` first, then key."""
        harmful, useful, lists, rows = {}, {}, {}, {}
        for rec in self.images.values():
            h = {t.key for t in rec.harmful}
            u = {t.key for t in rec.useful}
            for keys, count in ((h, harmful), (u, useful), (h | u, lists)):
                for k in keys:
                    count[k] = count.get(k, 0) + 1
            for t in rec.harmful + rec.useful:
                rows.setdefault(t.key, t)
        tests = len(self.images)
        order = sorted(lists, key=lambda k: (-lists[k], k))
        return {k: ListCount(harmful.get(k, 0), useful.get(k, 0), lists[k], tests, rows[k]) for k in order}

    def global_training_images(self):
        """The :meth:`list_counts` entries of the "global" training images (rule: :func:`global_threshold`)."""
        need = global_threshold(len(self.images))
        return {} if need is None else {k: c for k, c in self.list_counts().items() if c.lists >= need}

    # ------------------------------------------------------------------------- training rows, thumbnails

    def _train_row(self, rank, index, score):
        p = int(np.searchsorted(self._starts, index, side="right")) - 1
        if not 0 <= index < self._starts[-1]:
            raise IndexError(f"training index {index} out of range for {self._starts[-1]} images")
        key = f"{self.train.batches[p]}_{index - int(self._starts[p])}"
        image, label, file = self.train.lookup(key)
        return TrainRow(rank, key, file, label, self.class_name(label), score, self._train_thumb(key, image))

    def _csv_row(self, row):
        return TrainRow(int(row["rank"]), row["key"], row["file"], int(row["label"]), row["class_name"],
                      float(row["score"]), self._train_thumb(row["key"]))

    def _train_thumb(self, key, image=None):
        """Out-relative path of the thumbnail of training image ``key`` (written if missing)."""
        rel = f"{self._train_dir}/{key}.png"
        if not has_file(self.out / rel):
            if image is None:
                try:
                    image = self.train.lookup(key)[0]
                except KeyError:
                    return ""
            self._save_thumb(rel, image)
        return rel

    def _test_thumb(self, folder, label, n, image, replace):
        rel = test_thumb_path(folder, label, n)
        if image is not None and (replace or not has_file(self.out / rel)):
            self._save_thumb(rel, image)
        return rel if has_file(self.out / rel) else ""

    def _save_thumb(self, rel, image):
        """Write a thumbnail under a temporary name, then rename it. No fsync (it costs more than the
        PNG): a thumbnail left empty by a power cut counts as missing (:func:`has_file`) and is redone."""
        img = np.asarray(image, np.uint8)
        img = Image.fromarray(img[:, :, 0] if img.ndim == 3 and img.shape[2] == 1 else img)
        if max(img.size) > self.thumb_px:
            img.thumbnail((self.thumb_px, self.thumb_px), Image.Resampling.LANCZOS)
        path = self.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
        try:
            img.save(tmp, format="PNG")
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _rel(self, path):
        return pathlib.Path(path).relative_to(self.out).as_posix()


def global_threshold(tests):
    """Lists a training image must be in to be global among ``tests`` test images; None below
    :data:`GLOBAL_MIN_TESTS` (nothing is flagged then)."""
    if tests < GLOBAL_MIN_TESTS:
        return None
    return max(GLOBAL_MIN_LISTS, math.ceil(GLOBAL_SHARE * tests - 1e-9))    # 1e-9: 0.2 * 15 > 3.0


def test_thumb_path(folder, label, n):
    return f"{THUMBS}/test/{folder}/{label}_{n}.png"


def has_file(path):
    """A file that exists and is not empty."""
    try:
        return path.stat().st_size > 0
    except OSError:
        return False


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))
