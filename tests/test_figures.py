"""The per-test-image figures are laid out once and reused: a test image gives the same pixels from a
new figure as from one that drew other test images first, in every raster format, for any image size."""
import io

import numpy as np
import pytest
from PIL import Image

from influence.catalogue import TrainCatalogue
from influence.outputs.figure_book import FigureBook
from influence.outputs.strips import StripFigure
from influence.outputs.summary import (SummaryFigure, rows_of, summarize, widest_class_label,
                                       widest_layer_label)


def _test(rng, size, label, pred, name="test/3/a.png", grey=False):
    shape = (size, size) if grey else (size, size, 3)
    return {"image": rng.integers(0, 256, shape, dtype=np.uint8), "label": label, "pred": pred, "conf": 0.734,
            "file": name, "class_name": lambda c: f"class number {c}"}


def _panels(rng, n, size):
    return [{"image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "rank": r,
             "score": float(rng.normal() * 10.0 ** rng.integers(-9, 3)), "class": f"class {r}",
             "file": f"train/{r}/{'long_' * r}{r}.png"} for r in range(1, n + 1)]


def _pixels(path):
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


@pytest.mark.parametrize("fmt", ["png", "jpg"])
@pytest.mark.parametrize("n_panels", [0, 3, 7])
def test_a_used_strip_draws_the_same_pixels_as_a_new_one(tmp_path, fmt, n_panels):
    rng = np.random.default_rng(n_panels)
    first = (_test(rng, 224, 3, 8, "test/3/a_very_long_file_name_of_a_test_image_0001.png"),
             _panels(rng, n_panels, 224))
    second = (_test(rng, 16, 2, 2, grey=True), _panels(rng, n_panels, 32))
    used = StripFigure("harmful", n_panels)
    used.render(*first, tmp_path / f"first.{fmt}", fmt)
    used.render(*second, tmp_path / f"used.{fmt}", fmt)
    StripFigure("harmful", n_panels).render(*second, tmp_path / f"new.{fmt}", fmt)
    np.testing.assert_array_equal(_pixels(tmp_path / f"used.{fmt}"), _pixels(tmp_path / f"new.{fmt}"))
    assert not np.array_equal(_pixels(tmp_path / f"first.{fmt}"), _pixels(tmp_path / f"used.{fmt}"))
    with pytest.raises(ValueError, match="training images"):
        used.render(second[0], _panels(rng, n_panels + 1, 8), tmp_path / f"x.{fmt}", fmt)


def _summary(rng, n, n_layers, n_classes, label, pred):
    shares = rng.normal(size=(n, n_layers)) * 10.0 ** rng.integers(-8, 2)
    labels = np.arange(n) % n_classes
    return summarize(shares.sum(axis=1), shares, labels, [f"block{j}_conv" for j in range(n_layers)],
                     keep_classes=[label, pred]), labels


@pytest.mark.slow
@pytest.mark.parametrize("n_classes,n_layers", [(10, 3), (1000, 40)])
def test_a_used_summary_draws_the_same_pixels_as_a_new_one(tmp_path, n_classes, n_layers):
    rng = np.random.default_rng(n_layers)
    first, labels = _summary(rng, 2000, n_layers, n_classes, 3, 8)
    second, _ = _summary(rng, 2000, n_layers, n_classes, 5, 5)
    name = lambda c: f"class number {c}"        # noqa: E731
    if rows_of(first) != rows_of(second):       # with 1000 classes: 12 named + true + predicted + "other"
        second, _ = _summary(rng, 2000, n_layers, n_classes, 3, 8)
    class_hint = widest_class_label(name, labels)
    layer_hint = "block39_conv" if n_layers > 30 else "block2_conv"
    used = SummaryFigure(*rows_of(first), class_hint, layer_hint)
    used.render(first, _test(rng, 8, 3, 8), tmp_path / "first.png", "png")
    used.render(second, _test(rng, 8, 5, 5), tmp_path / "used.png", "png")
    SummaryFigure(*rows_of(second), class_hint, layer_hint).render(second, _test(rng, 8, 5, 5), tmp_path / "new.png",
                                                                   "png")
    np.testing.assert_array_equal(_pixels(tmp_path / "used.png"), _pixels(tmp_path / "new.png"))


@pytest.mark.slow
def test_new_figures_draw_something_and_the_book_keeps_a_few(tmp_path):
    rng = np.random.default_rng(0)
    summary, labels = _summary(rng, 50, 3, 10, 1, 2)
    test = _test(rng, 8, 1, 2)
    summary_figure = SummaryFigure(*rows_of(summary), widest_class_label(test["class_name"], labels),
                                   widest_layer_label(summary["layer_names"]))
    for fig in (StripFigure("useful", 2).update(_test(rng, 8, 1, 2), _panels(rng, 2, 8)),
                summary_figure.update(summary, test)):
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        assert np.asarray(Image.open(buffer).convert("L")).std() > 10
    book = FigureBook()
    catalogue = TrainCatalogue([str(i) for i in range(50)], np.array(["f"] * 50), np.arange(50) % 10, str)
    assert book.strip("harmful", 5) is book.strip("harmful", 5)
    assert book.strip("harmful", 5) is not book.strip("useful", 5)
    assert book.summary((10, 3), catalogue, ["a", "b", "c"]) is book.summary((10, 3), catalogue, ["a", "b", "c"])
    for n in range(20):
        book.strip("useful", n)
    assert len(book) <= 8
    import pickle
    assert len(pickle.loads(pickle.dumps(book))) == 0      # each writer process lays out its own


def test_warm_up_lays_out_the_first_figures():
    from influence.outputs.figure_book import warm_up

    book = FigureBook()
    catalogue = TrainCatalogue([str(i) for i in range(30)], np.array(["f"] * 30), np.arange(30) % 10, str)
    warm_up(book=book, catalogue=catalogue, layer_names=["a", "b"], top=5, fmt="png")
    assert len(book) == 3                              # two strips and the summary of 10 classes
    many = TrainCatalogue([str(i) for i in range(30)], np.array(["f"] * 30), np.arange(30), str)
    warm_up(book=FigureBook(), catalogue=many, layer_names=["a"], top=50, figures=False)   # nothing to draw
    other = FigureBook()
    warm_up(book=other, catalogue=many, layer_names=["a"], top=50)
    assert len(other) == 2 and other.strip("harmful", 30) is other.strip("harmful", 30)    # top clipped to N
