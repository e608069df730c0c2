"""The figures one process draws, laid out once and reused for every test image it writes.

A :class:`FigureBook` keeps a :class:`~influence.outputs.strips.StripFigure` per (kind, number of
training images) and a :class:`~influence.outputs.summary.SummaryFigure` per row count and row-label
width. Handed to the writer processes, each process gets an empty book and fills its own (figures are
not pickled).
"""
import numpy as np

from influence.outputs.strips import StripFigure
from influence.outputs.summary import MAX_LAYERS, TOP_CLASSES, SummaryFigure, widest_class_label, widest_layer_label

#: figures kept at most (a run needs 2 strips and one summary per row count: a handful)
MAX_KEPT = 8


class FigureBook:
    """``strip(kind, n)``, ``summary(rows, catalogue, layer_names)``: a laid-out figure, made at first use."""

    def __init__(self):
        self._figures = {}
        self._hints = {}         # id(catalogue) -> (catalogue, its widest class label): the catalogue kept alive

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()

    def __len__(self):
        """Figures kept."""
        return len(self._figures)

    def _get(self, key, make):
        figure = self._figures.get(key)
        if figure is None:
            if len(self._figures) >= MAX_KEPT:
                self._figures.pop(next(iter(self._figures)))
            figure = self._figures[key] = make()
        return figure

    def strip(self, kind, n_panels):
        return self._get(("strip", kind, int(n_panels)), lambda: StripFigure(kind, n_panels))

    def summary(self, rows, catalogue, layer_names):
        """The summary figure for ``rows`` = (class rows, layer rows), laid out for the widest labels of
        ``catalogue`` (:class:`influence.catalogue.TrainCatalogue`) and ``layer_names``."""
        kept = self._hints.get(id(catalogue))
        if kept is None or kept[0] is not catalogue:
            kept = self._hints[id(catalogue)] = (catalogue, widest_class_label(catalogue.namer, catalogue.labels))
        class_hint, layer_hint = kept[1], widest_layer_label(layer_names)
        return self._get(("summary", tuple(rows), class_hint, layer_hint),
                         lambda: SummaryFigure(*rows, class_hint, layer_hint))


def warm_up(*, book, catalogue, layer_names, top, figures=True, **_):
    """Lay out the figures a run will draw first, in ``book``: the two strips of ``top`` training images and,
    when every class is drawn by name (at most :data:`~influence.outputs.summary.TOP_CLASSES` classes), the
    summary. A writer process runs it as it starts (:class:`influence.outputs.writer.OutputWriter`)."""
    if not figures:
        return
    n = min(int(top), len(catalogue))
    book.strip("harmful", n)
    book.strip("useful", n)
    classes = np.unique(catalogue.labels).size
    if classes <= TOP_CLASSES:
        book.summary((classes, min(len(layer_names), MAX_LAYERS)), catalogue, layer_names)
