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


def _solid_panels(n, size):
    colours = [(200, 30, 30), (30, 160, 40), (20, 40, 210), (250, 250, 0), (90, 90, 90), (0, 200, 200), (255, 0, 255)]
    return [{"image": np.full((size, size, 3), colours[r % len(colours)], np.uint8), "rank": r, "score": -0.5 * r,
             "class": f"class {r}", "file": f"train/{r}/{r}.png"} for r in range(1, n + 1)]


@pytest.mark.parametrize("size", [16, 300])
def test_a_raster_strip_looks_like_matplotlibs_own_drawing(tmp_path, size):
    """png pastes the pictures and draws the text with Pillow; it differs from matplotlib's savefig of the same
    figure only in the glyphs' rasterisation (and a picture's edge pixels)."""
    rng = np.random.default_rng(size)
    test, panels = _test(rng, size, 3, 8), _solid_panels(5, size)
    test["image"] = np.full((size, size, 3), (10, 20, 30), np.uint8)
    strip = StripFigure("useful", 5)
    strip.render(test, panels, tmp_path / "raster.png", "png")
    buffer = io.BytesIO()
    strip.update(test, panels).savefig(buffer, format="png", dpi=strip.fig.dpi)
    raster, own = _pixels(tmp_path / "raster.png").astype(int), np.asarray(Image.open(buffer).convert("RGB")).astype(int)
    assert raster.shape == own.shape
    assert np.abs(raster - own).mean() < 2.0
    for ax, panel in zip(strip.axes, panels):              # each picture where matplotlib draws it
        box = ax.get_window_extent()
        row, col = int(raster.shape[0] - (box.y0 + box.y1) / 2), int((box.x0 + box.x1) / 2)
        assert tuple(raster[row, col]) == tuple(panel["image"][0, 0])
    with Image.open(tmp_path / "raster.png") as img:
        assert round(img.info["dpi"][0]) == round(strip.fig.dpi)


@pytest.mark.filterwarnings("ignore:Glyph .* missing from font")
def test_lines_pillow_cannot_draw_are_left_to_matplotlib(tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from influence.outputs.raster import draw_raster, save_raster

    fig = Figure(figsize=(4, 2), dpi=100)
    FigureCanvasAgg(fig)
    texts = [fig.text(0.1, 0.8, "plain text"), fig.text(0.1, 0.5, "$x^2$ math"), fig.text(0.1, 0.2, "\u4e2d tofu"),
             fig.text(0.8, 0.2, "turned", rotation=90), fig.text(0.5, 0.8, "faint", alpha=0.5)]
    pixels = 255 - np.asarray(draw_raster(fig).convert("L")).astype(int)
    for text in texts:                                     # every line drawn, by Pillow or by matplotlib
        box = text.get_window_extent()
        assert pixels[int(200 - box.y1):int(200 - box.y0) + 1, int(box.x0):int(box.x1) + 1].max() > 60, text
    save_raster(fig, tmp_path / "a.jpg", "jpg")
    with Image.open(tmp_path / "a.jpg") as img:
        assert img.format == "JPEG" and img.size == (400, 200)
    with pytest.raises(ValueError, match="raster format"):
        save_raster(fig, tmp_path / "a.pdf", "pdf")


def test_png_bytes_round_trip():
    from influence.outputs.raster import png_bytes

    rgb = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    with Image.open(io.BytesIO(png_bytes(rgb, 110))) as img:
        np.testing.assert_array_equal(np.asarray(img), rgb)
        assert img.mode == "RGB" and round(img.info["dpi"][0]) == 110


def test_pdf_figures_keep_their_text_as_text(tmp_path):
    rng = np.random.default_rng(1)
    StripFigure("harmful", 2).render(_test(rng, 16, 1, 2), _panels(rng, 2, 16), tmp_path / "a.pdf", "pdf")
    data = (tmp_path / "a.pdf").read_bytes()
    assert data.startswith(b"%PDF") and b"/Font" in data
