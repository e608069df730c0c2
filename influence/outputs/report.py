"""Output files of calculate.py: figures, CSV files and score dicts for one test image.

Sign convention (see docs/DESIGN.md)::

    score(i, t) = grad L(z_t)^T (H + lambda I)^-1 grad L(z_i)

Positive = useful (removing training image i would RAISE the test loss), negative = harmful
(removing it would LOWER the test loss). "Top harmful" = the most negative scores, most negative
first; "top useful" = the most positive scores, most positive first.

For the n-th test image of a label folder (numbered from 1: the first test image writes
``harmful_1.pdf``, ``1.npy``, ...), :func:`write_test_outputs` writes into
``<out>/<test_folder>/<label>/``:

============================  =====================================================================
``harmful_<n>.<fmt>``         figure: the test image, then the ``top`` most harmful training images
``useful_<n>.<fmt>``          figure: the test image, then the ``top`` most useful training images
``harmful_<n>.csv``           ``rank,key,file,label,class_name,score`` for the same images
``useful_<n>.csv``            idem
``<n>.npy``                   the original tool's dict (pickled object array, ``np.save``):
                              ``{"{batch}_{index}": {layer: share, ..., "total": score}}``, ordered
                              by ascending total (most harmful first), as the original sorted it
``<n>_scores.npy``            float32 (N,) totals in archive order (no pickle needed)
``<n>_layerwise.csv``         ``layer,key,share,file,label,class_name``: per layer, the training
                              image with the largest (most positive) share in that layer
``<n>_summary.<fmt>``         figure: the influence summed by training class and by layer
                              (the numbers: :func:`influence.outputs.summary.summarize`)
============================  =====================================================================

With ``figures=False`` (``--no-figures``) the three figures are left out. The figures are drawn by
:mod:`influence.outputs.strips` and :mod:`influence.outputs.summary`, laid out once per process and
kept in a :class:`~influence.outputs.figure_book.FigureBook`.

Every file is written atomically (:func:`influence.io.atomic_write`): a crash never leaves a half-written file
under a final name, so :func:`outputs_complete` can be trusted when a run is resumed.

This module does not import TensorFlow and never prints; the figures use matplotlib's object-oriented
API with the Agg canvas (no pyplot, no global state).
"""
import csv
import dataclasses
import logging
import pathlib

import numpy as np

from influence.io import atomic_write
from influence.outputs.figure_book import FigureBook
from influence.outputs.figure_style import check_format
from influence.outputs.ranking import layer_leaders, top_indices
from influence.outputs.summary import rows_of, summarize

log = logging.getLogger(__name__)

#: Header of the harmful/useful CSV files.
TOP_CSV_HEADER = ("rank", "key", "file", "label", "class_name", "score")

#: Header of ``<n>_layerwise.csv``: the original's three columns, then where the image is.
LAYERWISE_CSV_HEADER = ("layer", "key", "share", "file", "label", "class_name")

#: Header of ``<folder>_preds.csv``.
PREDICTIONS_CSV_HEADER = ("file", "label", "class_name", "prediction", "prediction_name", "confidence")

#: Key of the full score in each entry of the ``<n>.npy`` dict.
TOTAL_KEY = "total"


# ----------------------------------------------------------------------------- file names

def expected_outputs(folder_dir, n, fmt, figures=True):
    """The files :func:`write_test_outputs` writes for test image ``n``, in its return order.

    ``[harmful_<n>.<fmt>, useful_<n>.<fmt>, harmful_<n>.csv, useful_<n>.csv, <n>.npy,
    <n>_scores.npy, <n>_layerwise.csv, <n>_summary.<fmt>]``, all inside ``folder_dir``; without
    ``figures`` the five that are not figures. ``n`` is the test image's number within its label
    folder, from 1.
    """
    check_format(fmt)
    d = pathlib.Path(folder_dir)
    paths = [
        d / f"harmful_{n}.{fmt}",
        d / f"useful_{n}.{fmt}",
        d / f"harmful_{n}.csv",
        d / f"useful_{n}.csv",
        d / f"{n}.npy",
        d / f"{n}_scores.npy",
        d / f"{n}_layerwise.csv",
        d / f"{n}_summary.{fmt}",
    ]
    return paths if figures else [p for p in paths if p.suffix != f".{fmt}"]


def outputs_complete(folder_dir, n, fmt, figures=True):
    """True when every file of :func:`expected_outputs` exists (they are written atomically)."""
    return all(p.is_file() for p in expected_outputs(folder_dir, n, fmt, figures))


# ----------------------------------------------------------------------------- main entry

@dataclasses.dataclass
class TestImage:
    """The test image a set of output files explains: ``image`` uint8 (H, W, 3); its true ``label``
    and predicted ``pred`` class indices; ``conf`` the prediction's probability in [0, 1] (or None);
    ``file`` its file name."""

    __test__ = False

    image: np.ndarray
    label: int
    pred: int
    conf: float
    file: str


def write_test_outputs(folder_dir, n, *, scores, shares, layer_names, catalogue, test, fetch_image, top=5,
                       fmt="pdf", figures=True, book=None):
    """Write the eight output files of test image ``n`` into ``folder_dir`` (created if missing).

    Args:
      folder_dir: ``<out>/<test_folder>/<label>``.
      n: number of the test image within its label folder, from 1 (1, 2, 3, ...); it only
        names the files.
      scores: (N,) float, the total score of every training image, in archive order.
      shares: (N, L) float, per-layer split of the scores; each row sums to ``scores``.
      layer_names: L str, the names of the share columns (unique, not ``"total"``).
      catalogue: the training images (:class:`influence.catalogue.TrainCatalogue`): ``keys`` N str
        ``"{batch}_{index}"``, ``files`` (N,) str, ``labels`` (N,) int class indices, ``namer``
        callable int -> str.
      test: the test image (:class:`TestImage`).
      fetch_image: callable(global_index: int) -> uint8 (H, W, 3); called only for the at most
        ``2 * top`` displayed training images.
      top: number of training images per figure and CSV (clipped to N).
      fmt: figure format, one of :data:`influence.outputs.figure_style.FIGURE_FORMATS`.
      figures: False writes the five files that are not figures (``fetch_image`` is not called).
      book: the :class:`~influence.outputs.figure_book.FigureBook` whose laid-out figures to reuse
        (a writer keeps one for all its test images); None lays out new ones.

    Returns:
      The paths written, in the order of :func:`expected_outputs`.
    """
    check_format(fmt)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    n_train = scores.size
    shares = np.asarray(shares, dtype=np.float64)
    layer_names = [str(name) for name in layer_names]
    if shares.ndim != 2 or shares.shape != (n_train, len(layer_names)):
        raise ValueError(f"shares must have shape (N, L) = ({n_train}, {len(layer_names)}), "
                         f"got {shares.shape}")
    if len(set(layer_names)) != len(layer_names) or TOTAL_KEY in layer_names:
        raise ValueError(f"layer names must be unique and not {TOTAL_KEY!r}: {layer_names}")
    keys, train_files, train_labels, class_name = catalogue.keys, catalogue.files, catalogue.labels, catalogue.namer
    for name, arr in (("keys", keys), ("files", train_files), ("labels", train_labels)):
        if len(arr) != n_train:
            raise ValueError(f"the catalogue's {name} has {len(arr)} entries, scores has {n_train}")
    if n_train and not np.allclose(shares.sum(axis=1), scores, rtol=1e-3,
                                   atol=1e-6 * float(np.max(np.abs(scores)))):
        log.warning("test image %s: per-layer shares do not add up to the scores (max gap %.3g)",
                    test.file, float(np.max(np.abs(shares.sum(axis=1) - scores))))

    folder_dir = pathlib.Path(folder_dir)
    folder_dir.mkdir(parents=True, exist_ok=True)
    paths = expected_outputs(folder_dir, n, fmt)
    (fig_harmful, fig_useful, csv_harmful, csv_useful, dict_path, scores_path, layerwise_path,
     summary_path) = paths
    harmful, useful = top_indices(scores, top)

    save_score_dict(dict_path, keys, layer_names, shares, scores)
    with atomic_write(scores_path) as tmp:
        np.save(tmp, scores.astype(np.float32), allow_pickle=False)
    for path, idx in ((csv_harmful, harmful), (csv_useful, useful)):
        _write_top_csv(path, idx, keys, train_files, train_labels, scores, class_name)
    _write_layerwise_csv(layerwise_path, layer_names, shares, keys, train_files, train_labels,
                         class_name)
    if not figures:
        log.debug("wrote the numbers of test image %s into %s (no figures)", test.file, folder_dir)
        return expected_outputs(folder_dir, n, fmt, figures=False)

    book = FigureBook() if book is None else book
    images = {}                      # the displayed training images, each fetched once
    for i in np.concatenate([harmful, useful]).tolist():
        if i not in images:
            images[i] = fetch_image(i)
    test_info = {
        "image": test.image, "label": test.label, "pred": test.pred, "conf": test.conf,
        "file": test.file, "class_name": class_name,
    }
    for path, kind, idx in ((fig_harmful, "harmful", harmful), (fig_useful, "useful", useful)):
        panels = [
            {"image": images[i], "rank": r, "score": float(scores[i]),
             "class": class_name(int(train_labels[i])), "file": str(train_files[i])}
            for r, i in enumerate(idx.tolist(), start=1)
        ]
        book.strip(kind, len(panels)).render(test_info, panels, path, fmt)
    keep = [c for c in (test.label, test.pred) if c is not None]
    summary = summarize(scores, shares, train_labels, layer_names, keep_classes=keep)
    book.summary(rows_of(summary), catalogue, layer_names).render(summary, test_info, summary_path, fmt)
    log.debug("wrote %d files for test image %s into %s", len(paths), test.file, folder_dir)
    return paths


def score_dict(keys, layer_names, shares, scores):
    """The original tool's dict ``{key: {layer_name: share, ..., "total": score}}`` (Python floats).

    Args: keys N str; layer_names L str; shares (N, L) float; scores (N,) float.
    The entries are ordered by ascending total -- most harmful first, as the original's
    ``sorted(..., key=total)`` -- ties (and NaN totals, last) in archive order.
    Fast for N = 100 000, L = 16: the rows are converted with one ``tolist()``.
    """
    names = [str(name) for name in layer_names] + [TOTAL_KEY]
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    order = np.argsort(scores, kind="stable")
    rows = np.column_stack([np.asarray(shares, dtype=np.float64).reshape(len(keys), -1)[order],
                            scores[order]]).tolist()
    return {keys[i]: dict(zip(names, row)) for i, row in zip(order.tolist(), rows)}


def save_score_dict(path, keys, layer_names, shares, scores):
    """Write :func:`score_dict` to ``path`` (``<n>.npy``, the original's pickled dict), atomically."""
    table = score_dict(keys, layer_names, shares, scores)
    with atomic_write(path) as tmp:
        np.save(tmp, table, allow_pickle=True)     # a 0-d object array: np.load(...).item()


def _write_top_csv(path, idx, keys, train_files, train_labels, scores, class_name):
    with atomic_write(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(TOP_CSV_HEADER)
            for rank, i in enumerate(idx.tolist(), start=1):
                label = int(train_labels[i])
                writer.writerow([rank, keys[i], str(train_files[i]), label, class_name(label),
                                 repr(float(scores[i]))])


def _write_layerwise_csv(path, layer_names, shares, keys, train_files, train_labels, class_name):
    """``<n>_layerwise.csv``: one row per layer (header only when there are no training images)."""
    leaders = layer_leaders(shares) if len(keys) else []
    with atomic_write(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(LAYERWISE_CSV_HEADER)
            for j, i in enumerate(np.asarray(leaders, dtype=np.int64).tolist()):
                label = int(train_labels[i])
                writer.writerow([layer_names[j], keys[i], repr(float(shares[i, j])),
                                 str(train_files[i]), label, class_name(label)])


def write_predictions_csv(path, files, labels, preds, confs, class_name):
    """Write ``<folder>_preds.csv``: ``file,label,class_name,prediction,prediction_name,confidence``.

    Args:
      path: the CSV path (its folder is created).
      files: (M,) str; labels, preds: (M,) int class indices; confs: (M,) float in [0, 1].
      class_name: callable int -> str.

    Returns:
      ``path`` as a :class:`pathlib.Path`.
    """
    path = pathlib.Path(path)
    files = [str(f) for f in np.asarray(files).reshape(-1).tolist()]
    labels = [int(v) for v in np.asarray(labels).reshape(-1).tolist()]
    preds = [int(v) for v in np.asarray(preds).reshape(-1).tolist()]
    confs = [float(v) for v in np.asarray(confs, dtype=np.float64).reshape(-1).tolist()]
    if not len(files) == len(labels) == len(preds) == len(confs):
        raise ValueError(f"files, labels, preds and confs differ in length: "
                         f"{len(files)}, {len(labels)}, {len(preds)}, {len(confs)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(PREDICTIONS_CSV_HEADER)
            for f, y, p, c in zip(files, labels, preds, confs):
                writer.writerow([f, y, class_name(y), p, class_name(p), repr(c)])
    return path
