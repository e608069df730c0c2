"""Output files of calculate.py: figures, CSV files and score dicts for one test image.

Sign convention (see DESIGN.md)::

    score(i, t) = grad L(z_t)^T (H + lambda I)^-1 grad L(z_i)

Positive = useful (removing training image i would RAISE the test loss), negative = harmful
(removing it would LOWER the test loss). "Top harmful" = the most negative scores, most negative
first; "top useful" = the most positive scores, most positive first.

For the n-th test image of a label folder, :func:`write_test_outputs` writes into
``<out>/<test_folder>/<label>/``:

============================  =====================================================================
``harmful_<n>.<fmt>``         figure: the test image, then the ``top`` most harmful training images
``useful_<n>.<fmt>``          figure: the test image, then the ``top`` most useful training images
``harmful_<n>.csv``           ``rank,key,file,label,class_name,score`` for the same images
``useful_<n>.csv``            idem
``<n>.npy``                   the original tool's dict (pickled object array, ``np.save``):
                              ``{"{batch}_{index}": {layer: share, ..., "total": score}}``
``<n>_scores.npy``            float32 (N,) totals in archive order (no pickle needed)
============================  =====================================================================

Every file is written atomically (:func:`atomic_write`): a crash never leaves a half-written file
under a final name, so :func:`outputs_complete` can be trusted when a run is resumed.

This module does not import TensorFlow and never prints; figures use matplotlib's object-oriented
API with the Agg canvas (no pyplot, no global state).
"""
import contextlib
import csv
import logging
import os
import pathlib

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

log = logging.getLogger(__name__)

#: Figure formats calculate.py can write.
FIGURE_FORMATS = ("pdf", "png", "svg", "jpg")

#: Header of the harmful/useful CSV files.
TOP_CSV_HEADER = ("rank", "key", "file", "label", "class_name", "score")

#: Header of ``<folder>_preds.csv``.
PREDICTIONS_CSV_HEADER = ("file", "label", "class_name", "prediction", "prediction_name", "confidence")

#: Key of the full score in each entry of the ``<n>.npy`` dict.
TOTAL_KEY = "total"

_RASTER_DPI = 110          # png / jpg resolution
_PANEL_W = 2.3             # inches per image panel
_PANEL_H = 2.85            # inches per panel row, titles included
_MAX_COLS = 5              # training images per row before wrapping
_SMALL_IMAGE = 128         # images up to this many pixels a side are drawn with "nearest"
_TEXT_WIDTH = 26           # characters per title line before shortening

_COLOURS = {"harmful": "#c0392b", "useful": "#1e8449", "test": "#1f4e79"}
_CAPTIONS = {
    "harmful": "harmful = removing it would lower the test loss (score < 0)",
    "useful": "useful = removing it would raise the test loss (score > 0)",
}
_HEADINGS = {"harmful": "Most harmful", "useful": "Most useful"}


# ----------------------------------------------------------------------------- atomic writing

@contextlib.contextmanager
def atomic_write(path):
    """Write ``path`` atomically: yield a temporary path in the same folder, then ``os.replace``.

    The temporary name is ``.<stem>.tmp-<pid><suffix>`` (the extension is kept, so writers that
    pick or append an extension -- matplotlib, ``np.save`` -- write exactly there). The body must
    create and close the file at the yielded path. On an exception in the body the temporary file
    is deleted and the exception propagates; the final path is left untouched.

    Example::

        with atomic_write(out / "a.csv") as tmp:
            tmp.write_text("x\\n")
    """
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _fsync(path):
    """Flush a closed file's data to disk, so the rename never exposes an empty file after a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- ranking

def top_indices(scores, k):
    """Indices of the ``k`` most harmful and ``k`` most useful training images.

    Args:
      scores: (N,) float, influence scores (positive = useful, negative = harmful).
      k: int >= 0; clipped to N.

    Returns:
      (harmful_idx, useful_idx): two int64 arrays of shape (min(k, N),). ``harmful_idx`` orders the
      most negative score first (ascending scores), ``useful_idx`` the most positive first
      (descending scores). Ties are broken by the lower index first in both lists (stable).
      NaN scores are never ranked ahead of finite ones.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    k = min(int(k), scores.size)
    index = np.arange(scores.size)
    finite = np.where(np.isnan(scores), np.inf, scores)
    harmful = np.lexsort((index, finite))[:k]            # ascending score, then index
    finite = np.where(np.isnan(scores), np.inf, -scores)
    useful = np.lexsort((index, finite))[:k]             # descending score, then index
    return harmful.astype(np.int64), useful.astype(np.int64)


# ----------------------------------------------------------------------------- file names

def _check_fmt(fmt):
    if fmt not in FIGURE_FORMATS:
        raise ValueError(f"figure format must be one of {', '.join(FIGURE_FORMATS)}, got {fmt!r}")


def expected_outputs(folder_dir, n, fmt):
    """The six files :func:`write_test_outputs` writes for test image ``n``, in its return order.

    ``[harmful_<n>.<fmt>, useful_<n>.<fmt>, harmful_<n>.csv, useful_<n>.csv, <n>.npy,
    <n>_scores.npy]``, all inside ``folder_dir``.
    """
    _check_fmt(fmt)
    d = pathlib.Path(folder_dir)
    return [
        d / f"harmful_{n}.{fmt}",
        d / f"useful_{n}.{fmt}",
        d / f"harmful_{n}.csv",
        d / f"useful_{n}.csv",
        d / f"{n}.npy",
        d / f"{n}_scores.npy",
    ]


def outputs_complete(folder_dir, n, fmt):
    """True when every file of :func:`expected_outputs` exists (they are written atomically)."""
    return all(p.is_file() for p in expected_outputs(folder_dir, n, fmt))


# ----------------------------------------------------------------------------- main entry

def write_test_outputs(folder_dir, n, *, scores, shares, layer_names, keys, train_files,
                       train_labels, class_name, fetch_image, test_image, test_label, test_pred,
                       test_conf, test_file, top=5, fmt="pdf"):
    """Write the six output files of test image ``n`` into ``folder_dir`` (created if missing).

    Args:
      folder_dir: ``<out>/<test_folder>/<label>``.
      n: index of the test image within its label folder (0, 1, 2, ...).
      scores: (N,) float, the total score of every training image, in archive order.
      shares: (N, L) float, per-layer split of the scores; each row sums to ``scores``.
      layer_names: L str, the names of the share columns (unique, not ``"total"``).
      keys: N str, ``"{batch}_{index}"`` of every training image.
      train_files: (N,) str, training file names.
      train_labels: (N,) int, training class indices.
      class_name: callable int -> str.
      fetch_image: callable(global_index: int) -> uint8 (H, W, 3); called only for the at most
        ``2 * top`` displayed training images.
      test_image: uint8 (H, W, 3).
      test_label, test_pred: int class indices; test_conf: float in [0, 1] (or None);
      test_file: str, the test image's file name.
      top: number of training images per figure and CSV (clipped to N).
      fmt: figure format, one of :data:`FIGURE_FORMATS`.

    Returns:
      The paths written, in the order of :func:`expected_outputs`.
    """
    _check_fmt(fmt)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    n_train = scores.size
    shares = np.asarray(shares, dtype=np.float64)
    layer_names = [str(name) for name in layer_names]
    if shares.ndim != 2 or shares.shape != (n_train, len(layer_names)):
        raise ValueError(f"shares must have shape (N, L) = ({n_train}, {len(layer_names)}), "
                         f"got {shares.shape}")
    if len(set(layer_names)) != len(layer_names) or TOTAL_KEY in layer_names:
        raise ValueError(f"layer names must be unique and not {TOTAL_KEY!r}: {layer_names}")
    keys = [str(key) for key in np.asarray(keys).tolist()]
    train_files = np.asarray(train_files).reshape(-1)
    train_labels = np.asarray(train_labels).reshape(-1)
    for name, arr in (("keys", keys), ("train_files", train_files), ("train_labels", train_labels)):
        if len(arr) != n_train:
            raise ValueError(f"{name} has {len(arr)} entries, scores has {n_train}")
    if n_train and not np.allclose(shares.sum(axis=1), scores, rtol=1e-3,
                                   atol=1e-6 * float(np.max(np.abs(scores)))):
        log.warning("test image %s: per-layer shares do not add up to the scores (max gap %.3g)",
                    test_file, float(np.max(np.abs(shares.sum(axis=1) - scores))))

    folder_dir = pathlib.Path(folder_dir)
    folder_dir.mkdir(parents=True, exist_ok=True)
    paths = expected_outputs(folder_dir, n, fmt)
    fig_harmful, fig_useful, csv_harmful, csv_useful, dict_path, scores_path = paths
    harmful, useful = top_indices(scores, top)

    _save_score_dict(dict_path, keys, layer_names, shares, scores)
    with atomic_write(scores_path) as tmp:
        np.save(tmp, scores.astype(np.float32), allow_pickle=False)
    for path, idx in ((csv_harmful, harmful), (csv_useful, useful)):
        _write_top_csv(path, idx, keys, train_files, train_labels, scores, class_name)

    images = {}                      # the displayed training images, each fetched once
    for i in np.concatenate([harmful, useful]).tolist():
        if i not in images:
            images[i] = fetch_image(i)
    test_info = {
        "image": test_image, "label": test_label, "pred": test_pred, "conf": test_conf,
        "file": test_file, "class_name": class_name,
    }
    for path, kind, idx in ((fig_harmful, "harmful", harmful), (fig_useful, "useful", useful)):
        panels = [
            {"image": images[i], "rank": r, "score": float(scores[i]),
             "class": class_name(int(train_labels[i])), "file": str(train_files[i])}
            for r, i in enumerate(idx.tolist(), start=1)
        ]
        fig = _build_figure(kind, test_info, panels)
        with atomic_write(path) as tmp:
            fig.savefig(tmp, format=fmt, **({} if fmt in ("pdf", "svg") else {"dpi": _RASTER_DPI}))
    log.debug("wrote %d files for test image %s into %s", len(paths), test_file, folder_dir)
    return paths


def score_dict(keys, layer_names, shares, scores):
    """The original tool's dict ``{key: {layer_name: share, ..., "total": score}}`` (Python floats).

    Args: keys N str; layer_names L str; shares (N, L) float; scores (N,) float.
    Fast for N = 100 000, L = 16: the rows are converted with one ``tolist()``.
    """
    names = [str(name) for name in layer_names] + [TOTAL_KEY]
    rows = np.column_stack([np.asarray(shares, dtype=np.float64).reshape(len(keys), -1),
                            np.asarray(scores, dtype=np.float64).reshape(-1)]).tolist()
    return {key: dict(zip(names, row)) for key, row in zip(keys, rows)}


def _save_score_dict(path, keys, layer_names, shares, scores):
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


# ----------------------------------------------------------------------------- figures

def format_score(x):
    """Compact score text: 4 significant digits for 0.01 <= |x| < 10 000, else ``-1.23e-02``."""
    x = float(x)
    if x == 0.0 or not np.isfinite(x):
        return f"{x:g}"
    if 1e-2 <= abs(x) < 1e4:
        return f"{x:.4g}"
    return f"{x:.2e}"


def _shorten(text, width=_TEXT_WIDTH):
    """``text`` cut in the middle with an ellipsis when longer than ``width`` characters."""
    text = str(text)
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    tail = width - 1 - head
    return text[:head] + "\u2026" + text[-tail:]


def _short_class(name, width=_TEXT_WIDTH):
    """A class name that fits one title line (ImageNet names keep their first synonym)."""
    name = str(name)
    if len(name) > width and "," in name:
        name = name.split(",")[0]
    return name if len(name) <= width else name[: width - 1] + "\u2026"


def _short_file(name):
    return _shorten(pathlib.PurePath(str(name)).name or str(name))


def _show(ax, image, colour):
    """Draw one image without ticks, framed in ``colour``."""
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    small = max(img.shape[:2]) <= _SMALL_IMAGE
    kwargs = {"interpolation": "nearest" if small else "antialiased"}
    if img.ndim == 2:
        kwargs.update(cmap="gray", vmin=0, vmax=255)
    ax.imshow(img, **kwargs)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(3)


def _build_figure(kind, test, panels):
    """The figure: test image first, then the ranked training images (wrapped after 5 a row)."""
    n_panels = len(panels)
    n_cols = min(max(n_panels, 1), _MAX_COLS) + 1
    n_rows = max(1, -(-n_panels // _MAX_COLS))
    fig = Figure(figsize=(_PANEL_W * n_cols, _PANEL_H * n_rows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(n_rows, n_cols)

    name = test["class_name"]
    ax = fig.add_subplot(grid[0, 0])
    _show(ax, test["image"], _COLOURS["test"])
    true = "?" if test["label"] is None else _short_class(name(int(test["label"])), 20)
    pred = "?" if test["pred"] is None else _short_class(name(int(test["pred"])), 16)
    conf = "" if test["conf"] is None else f" ({100 * float(test['conf']):.1f}%)"
    wrong = test["pred"] is not None and test["label"] is not None and \
        int(test["pred"]) != int(test["label"])
    ax.set_title(f"TEST IMAGE\ntrue: {true}\npred: {pred}{conf}\n{_short_file(test['file'])}",
                 fontsize=9, color="#b03a2e" if wrong else "black", fontweight="bold")

    for j, panel in enumerate(panels):
        ax = fig.add_subplot(grid[j // _MAX_COLS, 1 + j % _MAX_COLS])
        _show(ax, panel["image"], _COLOURS[kind])
        ax.set_title(f"#{panel['rank']}  score {format_score(panel['score'])}\n"
                     f"{_short_class(panel['class'])}\n{_short_file(panel['file'])}", fontsize=9)
    if not panels:
        ax = fig.add_subplot(grid[0, 1])
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no training images", ha="center", va="center", fontsize=10)

    fig.suptitle(f"{_HEADINGS[kind]} training images for {_shorten(pathlib.PurePath(str(test['file'])).name, 60)}",
                 fontsize=12, fontweight="bold")
    fig.supxlabel(_CAPTIONS[kind], fontsize=9, style="italic", color="0.35")
    return fig
