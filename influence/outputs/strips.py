"""The harmful and useful figures (``harmful_<n>.<fmt>``, ``useful_<n>.<fmt>``): the test image, then the
ranked training images, five a row.

A :class:`StripFigure` is laid out once, for placeholder titles of the longest lines the titles can
have, and then only swaps its pictures and texts per test image: building the axes and running the
constrained layout cost most of a figure, and neither depends on the test image. So one test image
gives the same pixels whether its strip is the first a template draws or the hundredth (a test).
"""
import pathlib

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from influence.outputs.figure_style import (COLOURS, RASTER_DPI, TEXT_WIDTH, fit_axes, format_score, is_wrong,
                                            put_image, save_figure, short_class, short_file, shorten, show, verdict)
from influence.outputs.raster import RASTER_FORMATS, save_raster

PANEL_W = 2.3             # inches per image panel
PANEL_H = 2.85            # inches per panel row, titles included
MAX_COLS = 5              # training images per row before wrapping

CAPTIONS = {
    "harmful": "harmful = removing it would lower the test loss (score < 0)",
    "useful": "useful = removing it would raise the test loss (score > 0)",
}
HEADINGS = {"harmful": "Most harmful", "useful": "Most useful"}

_LINE = "n" * TEXT_WIDTH                  # a title line of typical glyphs at full width (layout only)
_PLACEHOLDER = np.zeros((8, 8, 3), np.uint8)


def test_title(test):
    """The test panel's title: ``TEST IMAGE``, true and predicted class (with confidence), file."""
    true, pred, conf = verdict(test, 20, 16)
    return f"TEST IMAGE\ntrue: {true}\npred: {pred}{conf}\n{short_file(test['file'])}"


def panel_title(panel):
    """A training image's title: rank and score, class, file."""
    return (f"#{panel['rank']}  score {format_score(panel['score'])}\n"
            f"{short_class(panel['class'])}\n{short_file(panel['file'])}")


def heading(kind, test):
    return f"{HEADINGS[kind]} training images for {shorten(pathlib.PurePath(str(test['file'])).name, 60)}"


class StripFigure:
    """The ``kind`` ("harmful" or "useful") figure with ``n_panels`` training images, laid out once.

    ``render(test, panels, path, fmt)`` draws one test image's strip and saves it atomically:
    ``test`` a dict (``image`` uint8 (H, W, 3), ``label``, ``pred``, ``conf``, ``file``, ``class_name``),
    ``panels`` ``n_panels`` dicts (``image``, ``rank``, ``score``, ``class`` name, ``file``).
    """

    def __init__(self, kind, n_panels):
        if kind not in HEADINGS:
            raise ValueError(f"kind must be 'harmful' or 'useful', got {kind!r}")
        self.kind, self.n_panels = kind, int(n_panels)
        n_cols = min(max(self.n_panels, 1), MAX_COLS) + 1
        n_rows = max(1, -(-self.n_panels // MAX_COLS))
        fig = Figure(figsize=(PANEL_W * n_cols, PANEL_H * n_rows + 0.6), dpi=RASTER_DPI, layout="constrained")
        FigureCanvasAgg(fig)
        grid = fig.add_gridspec(n_rows, n_cols)

        self.test_ax = fig.add_subplot(grid[0, 0])
        show(self.test_ax, _PLACEHOLDER, COLOURS["test"])
        self.test_ax.set_title(f"TEST IMAGE\ntrue: {_LINE}\npred: {_LINE}\n{_LINE}", fontsize=9, fontweight="bold",
                               y=1.0)       # where matplotlib puts it (no ticks above), without looking again each draw
        self.axes = []
        for j in range(self.n_panels):
            ax = fig.add_subplot(grid[j // MAX_COLS, 1 + j % MAX_COLS])
            show(ax, _PLACEHOLDER, COLOURS[kind])
            ax.set_title(f"{_LINE}\n{_LINE}\n{_LINE}", fontsize=9, y=1.0)
            self.axes.append(ax)
        if not self.axes:
            ax = fig.add_subplot(grid[0, 1])
            ax.set_axis_off()
            ax.text(0.5, 0.5, "no training images", ha="center", va="center", fontsize=10)
        self.title = fig.suptitle(f"{HEADINGS[kind]} training images for {'n' * 60}", fontsize=12, fontweight="bold")
        fig.supxlabel(CAPTIONS[kind], fontsize=9, style="italic", color="0.35")
        fig.draw_without_rendering()          # the constrained layout, once ...
        fig.set_layout_engine(None)           # ... and kept for every test image
        self.fig = fig

    def _texts(self, test, panels):
        if len(panels) != self.n_panels:
            raise ValueError(f"this figure has {self.n_panels} training images, got {len(panels)}")
        self.test_ax.title.set_text(test_title(test))
        self.test_ax.title.set_color(COLOURS["wrong"] if is_wrong(test) else "black")
        for ax, panel in zip(self.axes, panels):
            ax.title.set_text(panel_title(panel))
        self.title.set_text(heading(self.kind, test))
        return [(self.test_ax, test["image"])] + [(ax, panel["image"]) for ax, panel in zip(self.axes, panels)]

    def update(self, test, panels):
        """Put one test image's pictures and texts into the figure; return the figure."""
        for ax, picture in self._texts(test, panels):
            put_image(ax.images[0], picture)
        return self.fig

    def render(self, test, panels, path, fmt):
        """png and jpg: the pictures pasted in, resampled once (:mod:`influence.outputs.raster`); pdf and svg:
        drawn by matplotlib."""
        if fmt not in RASTER_FORMATS:
            save_figure(self.update(test, panels), path, fmt)
            return
        tiles = self._texts(test, panels)
        for ax, picture in tiles:
            fit_axes(ax, picture)
        save_raster(self.fig, path, fmt, tiles)
