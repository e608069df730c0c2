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
                              (the numbers: :func:`summarize`)
============================  =====================================================================

Every file is written atomically (:func:`influence.io.atomic_write`): a crash never leaves a half-written file
under a final name, so :func:`outputs_complete` can be trusted when a run is resumed.

This module does not import TensorFlow and never prints; figures use matplotlib's object-oriented
API with the Agg canvas (no pyplot, no global state).
"""
import csv
import dataclasses
import logging
import pathlib

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from influence.io import atomic_write

log = logging.getLogger(__name__)

#: Figure formats calculate.py can write.
FIGURE_FORMATS = ("pdf", "png", "svg", "jpg")

#: Header of the harmful/useful CSV files.
TOP_CSV_HEADER = ("rank", "key", "file", "label", "class_name", "score")

#: Header of ``<n>_layerwise.csv``: the original's three columns, then where the image is.
LAYERWISE_CSV_HEADER = ("layer", "key", "share", "file", "label", "class_name")

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

_SUMMARY_ROW_H = 0.27      # inches per bar row of the summary figure
_SUMMARY_MAX_LAYERS = 30   # layer rows of the summary figure before the smallest are lumped together

_COLOURS = {"harmful": "#c0392b", "useful": "#1e8449", "test": "#1f4e79"}
_CAPTIONS = {
    "harmful": "harmful = removing it would lower the test loss (score < 0)",
    "useful": "useful = removing it would raise the test loss (score > 0)",
}
_HEADINGS = {"harmful": "Most harmful", "useful": "Most useful"}


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
    """The eight files :func:`write_test_outputs` writes for test image ``n``, in its return order.

    ``[harmful_<n>.<fmt>, useful_<n>.<fmt>, harmful_<n>.csv, useful_<n>.csv, <n>.npy,
    <n>_scores.npy, <n>_layerwise.csv, <n>_summary.<fmt>]``, all inside ``folder_dir``. ``n`` is
    the test image's number within its label folder, from 1.
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
        d / f"{n}_layerwise.csv",
        d / f"{n}_summary.{fmt}",
    ]


def outputs_complete(folder_dir, n, fmt):
    """True when every file of :func:`expected_outputs` exists (they are written atomically)."""
    return all(p.is_file() for p in expected_outputs(folder_dir, n, fmt))


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
                       fmt="pdf"):
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
    keys = [str(key) for key in np.asarray(catalogue.keys).tolist()]
    train_files = np.asarray(catalogue.files).reshape(-1)
    train_labels = np.asarray(catalogue.labels).reshape(-1)
    class_name = catalogue.namer
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

    _save_score_dict(dict_path, keys, layer_names, shares, scores)
    with atomic_write(scores_path) as tmp:
        np.save(tmp, scores.astype(np.float32), allow_pickle=False)
    for path, idx in ((csv_harmful, harmful), (csv_useful, useful)):
        _write_top_csv(path, idx, keys, train_files, train_labels, scores, class_name)
    _write_layerwise_csv(layerwise_path, layer_names, shares, keys, train_files, train_labels,
                         class_name)

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
        _save_figure(_build_figure(kind, test_info, panels), path, fmt)
    keep = [c for c in (test.label, test.pred) if c is not None]
    summary = summarize(scores, shares, train_labels, layer_names, keep_classes=keep)
    _save_figure(_build_summary_figure(summary, test_info), summary_path, fmt)
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


def layer_leaders(shares):
    """Per layer, the training image with the largest (most positive) share.

    Args:
      shares: (N, L) float, N >= 1.

    Returns:
      int64 (L,): row index of the largest value of each column; the lowest index on ties. NaN
      shares never win over finite ones.
    """
    shares = np.asarray(shares, dtype=np.float64)
    if shares.ndim != 2 or shares.shape[0] == 0:
        raise ValueError(f"shares must have shape (N, L) with N >= 1, got {shares.shape}")
    return np.argmax(np.where(np.isnan(shares), -np.inf, shares), axis=0).astype(np.int64)


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


def _verdict(test, true_width, pred_width):
    """(true class, predicted class, " (73.4%)") of the test image as title text; "?" when unknown."""
    name = test["class_name"]
    true = "?" if test["label"] is None else _short_class(name(int(test["label"])), true_width)
    pred = "?" if test["pred"] is None else _short_class(name(int(test["pred"])), pred_width)
    conf = "" if test["conf"] is None else f" ({100 * float(test['conf']):.1f}%)"
    return true, pred, conf


def _build_figure(kind, test, panels):
    """The figure: test image first, then the ranked training images (wrapped after 5 a row)."""
    n_panels = len(panels)
    n_cols = min(max(n_panels, 1), _MAX_COLS) + 1
    n_rows = max(1, -(-n_panels // _MAX_COLS))
    fig = Figure(figsize=(_PANEL_W * n_cols, _PANEL_H * n_rows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(n_rows, n_cols)

    ax = fig.add_subplot(grid[0, 0])
    _show(ax, test["image"], _COLOURS["test"])
    true, pred, conf = _verdict(test, 20, 16)
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


def _save_figure(fig, path, fmt):
    """Save ``fig`` atomically in ``fmt`` (raster formats at :data:`_RASTER_DPI`)."""
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format=fmt, **({} if fmt in ("pdf", "svg") else {"dpi": _RASTER_DPI}))


# ----------------------------------------------------------------------------- summary

def summarize(scores, shares, train_labels, layer_names, top_classes=12, keep_classes=()):
    """The numbers behind ``<n>_summary.<fmt>``: the influence summed by training class and by layer.

    Args:
      scores: (N,) float, total score of every training image.
      shares: (N, L) float, per-layer split of the scores (rows sum to ``scores``).
      train_labels: (N,) int >= 0, training class indices.
      layer_names: L str, the share columns.
      top_classes: int >= 0, how many classes (by Σ|score|) are shown by name; the rest are
        lumped into one "other" row.
      keep_classes: class indices shown by name as well, when they have training images (the
        test image's true and predicted class).

    Returns:
      dict of numpy arrays and floats:

      * ``class_index`` int64 (C,): every class with training images, by descending Σ|score|
        (lower index first on ties);
      * ``class_pos``, ``class_neg`` float64 (C,): Σ of the positive (useful) and of the
        negative (harmful, <= 0) scores of the class; ``class_count`` int64 (C,): its images;
      * ``shown`` bool (C,): the classes drawn by name (the first ``top_classes`` + ``keep_classes``);
      * ``other_pos``, ``other_neg`` float, ``other_classes`` int: the sums over the rest;
      * ``layer_names`` list (L,); ``layer_pos``, ``layer_neg`` float64 (L,): Σ over training
        images of each layer's share, positive and negative parts;
      * ``total``, ``total_pos``, ``total_neg`` float: Σ scores, Σ of its positive / negative parts.

      Σ class_pos + Σ class_neg = Σ scores, and Σ layer_pos + Σ layer_neg = Σ shares (= Σ scores
      when the shares add up).
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    shares = np.asarray(shares, dtype=np.float64)
    labels = np.asarray(train_labels).reshape(-1).astype(np.int64)
    layer_names = [str(name) for name in layer_names]
    if shares.shape != (scores.size, len(layer_names)) or labels.size != scores.size:
        raise ValueError(f"scores (N,), shares (N, L) and train_labels (N,) disagree: {scores.shape}, "
                         f"{shares.shape}, {labels.shape} with L = {len(layer_names)}")
    if top_classes < 0:
        raise ValueError(f"top_classes must be >= 0, got {top_classes}")
    pos, neg = np.maximum(scores, 0.0), np.minimum(scores, 0.0)
    present, inverse = np.unique(labels, return_inverse=True)
    class_pos = np.bincount(inverse, weights=pos, minlength=present.size)
    class_neg = np.bincount(inverse, weights=neg, minlength=present.size)
    class_count = np.bincount(inverse, minlength=present.size).astype(np.int64)
    order = np.lexsort((present, -(class_pos - class_neg)))       # Σ|score| descending, then index
    present, class_pos, class_neg, class_count = (a[order] for a in (present, class_pos, class_neg, class_count))
    shown = np.arange(present.size) < top_classes
    shown |= np.isin(present, np.asarray(list(keep_classes), dtype=np.int64))
    return {
        "class_index": present.astype(np.int64),
        "class_pos": class_pos,
        "class_neg": class_neg,
        "class_count": class_count,
        "shown": shown,
        "other_pos": float(class_pos[~shown].sum()),
        "other_neg": float(class_neg[~shown].sum()),
        "other_classes": int((~shown).sum()),
        "layer_names": layer_names,
        "layer_pos": np.maximum(shares, 0.0).sum(axis=0),
        "layer_neg": np.minimum(shares, 0.0).sum(axis=0),
        "total": float(scores.sum()),
        "total_pos": float(pos.sum()),
        "total_neg": float(neg.sum()),
    }


def _lump_layers(names, pos, neg, max_rows=_SUMMARY_MAX_LAYERS):
    """Layer rows for the figure: all of them in model order, or -- above ``max_rows`` -- the
    ``max_rows - 1`` largest by Σ|share| (still in model order) and one "other (K layers)" row."""
    names, pos, neg = list(names), np.asarray(pos), np.asarray(neg)
    if len(names) <= max_rows:
        return names, pos, neg
    keep = np.sort(np.lexsort((np.arange(len(names)), -(pos - neg)))[:max_rows - 1])
    rest = np.setdiff1d(np.arange(len(names)), keep)
    return ([names[i] for i in keep] + [f"other ({rest.size} layers)"],
            np.append(pos[keep], pos[rest].sum()), np.append(neg[keep], neg[rest].sum()))


def _diverging_bars(ax, labels, pos, neg, title, scale_rows=None, slots=0):
    """Horizontal bars: the positive sum to the right (green), the negative one to the left (red),
    a black diamond at their sum; the first row on top, x limits symmetric about 0.

    The x range fits the rows ``scale_rows`` (all by default); a bar that reaches past it is cut
    at the edge and carries its value as text (the "other" row of 1000 classes would otherwise
    flatten every named class). ``slots``: rows of space to reserve, so that two panels side by
    side draw bars of the same thickness.
    """
    y = np.arange(len(labels))
    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    rows = slice(None) if scale_rows is None else scale_rows
    reach = float(np.nanmax(np.abs(np.concatenate([pos[rows], neg[rows], [0.0]]))))
    reach = 1.08 * reach if np.isfinite(reach) and reach > 0 else 1.0
    ax.barh(y, pos, height=0.7, color=_COLOURS["useful"], label="Σ positive scores (useful)")
    ax.barh(y, neg, height=0.7, color=_COLOURS["harmful"], label="Σ negative scores (harmful)")
    ax.plot(pos + neg, y, linestyle="none", marker="D", markersize=4, color="black", label="net (their sum)")
    ax.axvline(0.0, color="0.3", linewidth=0.8)
    ax.set_xlim(-reach, reach)
    for row, value in [(r, v) for r, v in enumerate(pos) if v > reach] + [(r, v) for r, v in enumerate(neg) if v < -reach]:
        ax.text(np.sign(value) * 0.98 * reach, row, format_score(value), ha="right" if value > 0 else "left",
                va="center", fontsize=7, fontweight="bold", color="white")
    ax.set_ylim(max(len(labels), slots) - 0.5, -0.5)
    ax.set_yticks(y, labels, fontsize=8 if len(labels) <= 20 else 7)
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(axis="x", color="0.9", linewidth=0.6)
    ax.set_axisbelow(True)
    ax.set_title(title, fontsize=10, fontweight="bold")


def _build_summary_figure(summary, test):
    """Two panels: influence by training class (top classes + "other") and by layer."""
    name = test["class_name"]
    shown = summary["shown"]
    marks = {}
    for key, word in (("label", "true"), ("pred", "predicted")):
        if test[key] is not None:
            marks.setdefault(int(test[key]), []).append(word)
    class_labels, class_colours = [], []
    for c, count in zip(summary["class_index"][shown].tolist(), summary["class_count"][shown].tolist()):
        mark = marks.get(c)
        class_labels.append(f"{_short_class(name(c))} ({count})" + (f"  [{' = '.join(mark)}]" if mark else ""))
        wrong = mark == ["predicted"]
        class_colours.append(None if not mark else "#b03a2e" if wrong else _COLOURS["test"])
    class_pos = summary["class_pos"][shown]
    class_neg = summary["class_neg"][shown]
    if summary["other_classes"]:
        class_labels.append(f"other ({summary['other_classes']} classes)")
        class_colours.append(None)
        class_pos = np.append(class_pos, summary["other_pos"])
        class_neg = np.append(class_neg, summary["other_neg"])
    layers, layer_pos, layer_neg = _lump_layers(
        [_shorten(layer) for layer in summary["layer_names"]], summary["layer_pos"], summary["layer_neg"])
    lumped = len(layers) < len(summary["layer_names"])

    rows = max(len(class_labels), len(layers), 4)
    fig = Figure(figsize=(13.0, _SUMMARY_ROW_H * rows + 1.9), layout="constrained")
    FigureCanvasAgg(fig)
    ax_class, ax_layer = fig.subplots(1, 2)
    n_images = int(summary["class_count"].sum())
    named = int(shown.sum())
    _diverging_bars(ax_class, class_labels, class_pos, class_neg,
                    f"by training class ({n_images} images, {summary['class_index'].size} classes)",
                    scale_rows=slice(0, named) if named else None, slots=rows)
    for tick, colour in zip(ax_class.get_yticklabels(), class_colours):
        if colour is not None:
            tick.set_color(colour)
            tick.set_fontweight("bold")
    _diverging_bars(ax_layer, layers, layer_pos, layer_neg, f"by layer ({len(summary['layer_names'])} layers)",
                    scale_rows=slice(0, -1) if lumped else None, slots=rows)
    for ax in (ax_class, ax_layer):
        ax.set_xlabel("sum of scores (positive = useful, negative = harmful)", fontsize=9)
    handles, texts = ax_layer.get_legend_handles_labels()
    order = sorted(range(len(texts)), key=lambda j: texts[j].startswith("net"))     # the bars first
    fig.legend([handles[j] for j in order], [texts[j] for j in order], loc="outside lower center", ncols=3,
               fontsize=9, frameon=False)

    true, pred, conf = _verdict(test, 30, 30)
    fig.suptitle(f"Influence summary for {_shorten(pathlib.PurePath(str(test['file'])).name, 60)}: "
                 f"true {true}, predicted {pred}{conf}\n"
                 f"all training images: Σ scores = {format_score(summary['total'])} "
                 f"(Σ positive {format_score(summary['total_pos'])}, Σ negative {format_score(summary['total_neg'])})",
                 fontsize=11, fontweight="bold")
    return fig
