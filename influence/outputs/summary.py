"""``<n>_summary.<fmt>``: the influence of every training image summed by training class and by layer.

:func:`summarize` computes the numbers; a :class:`SummaryFigure` draws them. Like the strips
(:mod:`influence.outputs.strips`), the figure is laid out once -- for the widest row labels the run can
have, which the caller passes as ``class_hint`` and ``layer_hint`` -- and then only its bars, limits
and texts change per test image, so a test image gives the same pixels from a new figure or a used one.
"""
import pathlib

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from influence.outputs.figure_style import (COLOURS, RASTER_DPI, format_score, save_figure, short_class, shorten,
                                            verdict)
from influence.outputs.raster import RASTER_FORMATS, save_raster

ROW_H = 0.27               # inches per bar row
MAX_LAYERS = 30            # layer rows before the smallest are lumped together
TOP_CLASSES = 12           # classes drawn by name (by Σ|score|), besides the test image's true and predicted
MARKS = "  [true = predicted]"   # the longest mark a class row can carry


def summarize(scores, shares, train_labels, layer_names, top_classes=TOP_CLASSES, keep_classes=()):
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


def lump_layers(names, pos, neg, max_rows=MAX_LAYERS):
    """Layer rows for the figure: all of them in model order, or -- above ``max_rows`` -- the
    ``max_rows - 1`` largest by Σ|share| (still in model order) and one "other (K layers)" row."""
    names, pos, neg = list(names), np.asarray(pos), np.asarray(neg)
    if len(names) <= max_rows:
        return names, pos, neg
    keep = np.sort(np.lexsort((np.arange(len(names)), -(pos - neg)))[:max_rows - 1])
    rest = np.setdiff1d(np.arange(len(names)), keep)
    return ([names[i] for i in keep] + [f"other ({rest.size} layers)"],
            np.append(pos[keep], pos[rest].sum()), np.append(neg[keep], neg[rest].sum()))


def class_rows(summary, class_name, label, pred):
    """The class panel's rows: (labels, colours (None = default), Σ positive, Σ negative, named rows)."""
    shown = summary["shown"]
    marks = {}
    for c, word in ((label, "true"), (pred, "predicted")):
        if c is not None:
            marks.setdefault(int(c), []).append(word)
    labels, colours = [], []
    for c, count in zip(summary["class_index"][shown].tolist(), summary["class_count"][shown].tolist()):
        mark = marks.get(c)
        labels.append(f"{short_class(class_name(c))} ({count})" + (f"  [{' = '.join(mark)}]" if mark else ""))
        colours.append(None if not mark else COLOURS["wrong"] if mark == ["predicted"] else COLOURS["test"])
    pos, neg = summary["class_pos"][shown], summary["class_neg"][shown]
    if summary["other_classes"]:
        labels.append(f"other ({summary['other_classes']} classes)")
        colours.append(None)
        pos, neg = np.append(pos, summary["other_pos"]), np.append(neg, summary["other_neg"])
    return labels, colours, pos, neg, int(shown.sum())


def widest_class_label(class_name, labels):
    """The longest class row label a run with these training ``labels`` (int, (N,)) can draw, in characters."""
    present, counts = np.unique(np.asarray(labels).reshape(-1).astype(np.int64), return_counts=True)
    rows = [f"{short_class(class_name(int(c)))} ({int(k)})" for c, k in zip(present.tolist(), counts.tolist())]
    rows.append(f"other ({present.size} classes)")
    return max(rows, key=len) + MARKS


def widest_layer_label(layer_names):
    """The longest layer row label, shortened as drawn (or "other (L layers)")."""
    names = [shorten(name) for name in layer_names]
    lumped = [f"other ({len(names)} layers)"] if len(names) > MAX_LAYERS else []
    return max(names + lumped + [""], key=len)


def pin_label(axis):
    """Keep ``axis``'s label where it is now: matplotlib would otherwise measure every tick label at each draw
    to place it (a fifth of the summary's draw), though the tick labels' height does not change."""
    label = axis.label
    where = label.get_transform().transform(label.get_position())
    axis.set_label_coords(*axis.axes.transAxes.inverted().transform(where))


class _Bars:
    """One panel of horizontal bars laid out for ``n_rows`` rows: the positive sum to the right (green),
    the negative one to the left (red), a black diamond at their sum; the first row on top."""

    def __init__(self, ax, n_rows, slots, hint):
        self.ax, self.n_rows = ax, n_rows
        y = np.arange(n_rows)
        zeros = np.zeros(n_rows)
        self.pos = ax.barh(y, zeros, height=0.7, color=COLOURS["useful"], label="Σ positive scores (useful)")
        self.neg = ax.barh(y, zeros, height=0.7, color=COLOURS["harmful"], label="Σ negative scores (harmful)")
        (self.net,) = ax.plot(zeros, y, linestyle="none", marker="D", markersize=4, color="black",
                              label="net (their sum)")
        ax.axvline(0.0, color="0.3", linewidth=0.8)
        ax.set_xlim(-1.0, 1.0)
        ax.set_ylim(max(n_rows, slots) - 0.5, -0.5)
        self.fontsize = 8 if n_rows <= 20 else 7
        ax.set_yticks(y, [hint] * n_rows, fontsize=self.fontsize)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="x", color="0.9", linewidth=0.6)
        ax.set_axisbelow(True)
        ax.set_xlabel("sum of scores (positive = useful, negative = harmful)", fontsize=9)
        self.cut = []

    def update(self, labels, pos, neg, colours=None, scale_rows=None):
        """New rows. The x range (symmetric about 0) fits the rows ``scale_rows`` (all by default); a bar
        that reaches past it is cut at the edge and carries its value as text (the "other" row of 1000
        classes would otherwise flatten every named class)."""
        ax = self.ax
        pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
        if len(labels) != self.n_rows or pos.shape != (self.n_rows,) or neg.shape != (self.n_rows,):
            raise ValueError(f"this panel has {self.n_rows} rows, got {len(labels)} labels, {pos.shape}, {neg.shape}")
        rows = slice(None) if scale_rows is None else scale_rows
        reach = float(np.nanmax(np.abs(np.concatenate([pos[rows], neg[rows], [0.0]]))))
        reach = 1.08 * reach if np.isfinite(reach) and reach > 0 else 1.0
        for bars, values in ((self.pos, pos), (self.neg, neg)):
            for rect, value in zip(bars.patches, values.tolist()):
                rect.set_width(value)
        self.net.set_xdata(pos + neg)
        ax.set_xlim(-reach, reach)
        for text in self.cut:
            text.remove()
        self.cut = [ax.text(np.sign(v) * 0.98 * reach, r, format_score(v), ha="right" if v > 0 else "left",
                            va="center", fontsize=7, fontweight="bold", color="white")
                    for r, v in [(r, v) for r, v in enumerate(pos) if v > reach]
                    + [(r, v) for r, v in enumerate(neg) if v < -reach]]
        ax.set_yticks(np.arange(self.n_rows), labels, fontsize=self.fontsize)
        for tick, colour in zip(ax.get_yticklabels(), colours or [None] * self.n_rows):
            tick.set_color("black" if colour is None else colour)
            tick.set_fontweight("normal" if colour is None else "bold")


class SummaryFigure:
    """The summary figure for ``class_rows`` class rows and ``layer_rows`` layer rows, laid out once with
    ``class_hint`` / ``layer_hint`` (:func:`widest_class_label`, :func:`widest_layer_label`) as row labels.

    ``render(summary, test, path, fmt)`` draws one test image's :func:`summarize` and saves it;
    ``test`` is a dict with ``label``, ``pred``, ``conf``, ``file`` and ``class_name``.
    """

    def __init__(self, class_rows, layer_rows, class_hint, layer_hint):
        self.class_rows, self.layer_rows = int(class_rows), int(layer_rows)
        rows = max(self.class_rows, self.layer_rows, 4)
        fig = Figure(figsize=(13.0, ROW_H * rows + 1.9), dpi=RASTER_DPI, layout="constrained")
        FigureCanvasAgg(fig)
        ax_class, ax_layer = fig.subplots(1, 2)
        self.classes = _Bars(ax_class, self.class_rows, rows, class_hint)
        self.layers = _Bars(ax_layer, self.layer_rows, rows, layer_hint)
        ax_class.set_title("n" * 60, fontsize=10, fontweight="bold", y=1.0)    # y: no ticks above to look for
        ax_layer.set_title("n" * 60, fontsize=10, fontweight="bold", y=1.0)
        handles, texts = ax_layer.get_legend_handles_labels()
        order = sorted(range(len(texts)), key=lambda j: texts[j].startswith("net"))     # the bars first
        fig.legend([handles[j] for j in order], [texts[j] for j in order], loc="outside lower center", ncols=3,
                   fontsize=9, frameon=False)
        self.title = fig.suptitle(f"{'n' * 90}\n{'n' * 90}", fontsize=11, fontweight="bold")
        fig.draw_without_rendering()          # the constrained layout, once ...
        fig.set_layout_engine(None)           # ... and kept for every test image
        for axis in (ax_class.xaxis, ax_class.yaxis, ax_layer.xaxis, ax_layer.yaxis):
            pin_label(axis)
        self.fig = fig

    def update(self, summary, test):
        """Put one test image's numbers and texts into the figure; return the figure."""
        labels, colours, pos, neg, named = class_rows(summary, test["class_name"], test["label"], test["pred"])
        self.classes.update(labels, pos, neg, colours, scale_rows=slice(0, named) if named else None)
        layers, layer_pos, layer_neg = lump_layers([shorten(layer) for layer in summary["layer_names"]],
                                                   summary["layer_pos"], summary["layer_neg"])
        lumped = len(layers) < len(summary["layer_names"])
        self.layers.update(layers, layer_pos, layer_neg, scale_rows=slice(0, -1) if lumped else None)
        n_images = int(summary["class_count"].sum())
        self.classes.ax.title.set_text(f"by training class ({n_images} images, {summary['class_index'].size} classes)")
        self.layers.ax.title.set_text(f"by layer ({len(summary['layer_names'])} layers)")
        true, pred, conf = verdict(test, 30, 30)
        self.title.set_text(
            f"Influence summary for {shorten(pathlib.PurePath(str(test['file'])).name, 60)}: "
            f"true {true}, predicted {pred}{conf}\n"
            f"all training images: Σ scores = {format_score(summary['total'])} "
            f"(Σ positive {format_score(summary['total_pos'])}, Σ negative {format_score(summary['total_neg'])})")
        return self.fig

    def render(self, summary, test, path, fmt):
        """png and jpg: text drawn by Pillow (:mod:`influence.outputs.raster`); pdf and svg: by matplotlib."""
        if fmt in RASTER_FORMATS:
            save_raster(self.update(summary, test), path, fmt)
        else:
            save_figure(self.update(summary, test), path, fmt)


def rows_of(summary):
    """(class rows, layer rows) a summary draws: the figure to use for it."""
    return (int(summary["shown"].sum()) + (1 if summary["other_classes"] else 0),
            min(len(summary["layer_names"]), MAX_LAYERS))

