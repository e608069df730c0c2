"""What every figure of the outputs shares: colours, sizes, the text of scores, class and file names,
how an image panel is drawn and how a figure is saved. matplotlib's object-oriented API only (no pyplot)."""
import pathlib

import numpy as np

from influence.io import atomic_write

#: Figure formats calculate.py can write.
FIGURE_FORMATS = ("pdf", "png", "svg", "jpg")

RASTER_DPI = 110           # png / jpg resolution
#: png files compressed by zlib level 1: half the time of Pillow's default level 6, 10 % larger files
#: (66 against 60 KiB for a summary figure), the same pixels
PNG_COMPRESSION = 1
SMALL_IMAGE = 128          # images up to this many pixels a side are drawn with "nearest"
TEXT_WIDTH = 26            # characters per title line before shortening

COLOURS = {"harmful": "#c0392b", "useful": "#1e8449", "test": "#1f4e79", "wrong": "#b03a2e"}


def check_format(fmt):
    if fmt not in FIGURE_FORMATS:
        raise ValueError(f"figure format must be one of {', '.join(FIGURE_FORMATS)}, got {fmt!r}")


def format_score(x):
    """Compact score text: 4 significant digits for 0.01 <= |x| < 10 000, else ``-1.23e-02``."""
    x = float(x)
    if x == 0.0 or not np.isfinite(x):
        return f"{x:g}"
    if 1e-2 <= abs(x) < 1e4:
        return f"{x:.4g}"
    return f"{x:.2e}"


def shorten(text, width=TEXT_WIDTH):
    """``text`` cut in the middle with an ellipsis when longer than ``width`` characters."""
    text = str(text)
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    tail = width - 1 - head
    return text[:head] + "\u2026" + text[-tail:]


def short_class(name, width=TEXT_WIDTH):
    """A class name that fits one title line (ImageNet names keep their first synonym)."""
    name = str(name)
    if len(name) > width and "," in name:
        name = name.split(",")[0]
    return name if len(name) <= width else name[: width - 1] + "\u2026"


def short_file(name, width=TEXT_WIDTH):
    """The base name of a file, shortened to ``width`` characters."""
    return shorten(pathlib.PurePath(str(name)).name or str(name), width)


def frame(ax, colour):
    """An image panel's axes: no ticks, a thick frame in ``colour``."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.xaxis.set_visible(False)      # nothing to draw without ticks: skip the axes' tick machinery at each draw
    ax.yaxis.set_visible(False)
    for spine in ax.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(3)


def image_style(image):
    """(the array to draw, imshow keyword arguments) of a uint8 (H, W, 3), (H, W, 1) or (H, W) image:
    "nearest" up to :data:`SMALL_IMAGE` pixels a side, else "antialiased"; grey images in grey."""
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    small = max(img.shape[:2]) <= SMALL_IMAGE
    kwargs = {"interpolation": "nearest" if small else "antialiased"}
    if img.ndim == 2:
        kwargs.update(cmap="gray", vmin=0, vmax=255)
    return img, kwargs


def show(ax, image, colour):
    """Draw one image without ticks, framed in ``colour``."""
    img, kwargs = image_style(image)
    ax.imshow(img, **kwargs)
    frame(ax, colour)


def fit_axes(ax, image):
    """Set the limits of an image panel made by :func:`show` to the size of ``image`` (the axes follow)."""
    h, w = np.shape(image)[:2]
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)


def put_image(artist, image):
    """Replace the picture of an ``AxesImage`` made by :func:`show` (any size; the axes follow)."""
    img, kwargs = image_style(image)
    artist.set_data(img)
    artist.set_interpolation(kwargs["interpolation"])
    artist.set_cmap(kwargs.get("cmap", "viridis"))
    artist.set_clim(kwargs.get("vmin", 0), kwargs.get("vmax", 255))
    h, w = img.shape[:2]
    artist.set_extent((-0.5, w - 0.5, h - 0.5, -0.5))
    fit_axes(artist.axes, img)


def verdict(test, true_width, pred_width):
    """(true class, predicted class, " (73.4%)") of the test image as title text; "?" when unknown.

    ``test``: dict with ``label``, ``pred`` (int or None), ``conf`` (float or None), ``class_name``."""
    name = test["class_name"]
    true = "?" if test["label"] is None else short_class(name(int(test["label"])), true_width)
    pred = "?" if test["pred"] is None else short_class(name(int(test["pred"])), pred_width)
    conf = "" if test["conf"] is None else f" ({100 * float(test['conf']):.1f}%)"
    return true, pred, conf


def is_wrong(test):
    """True when the test image's predicted class is known and is not its true class."""
    return test["pred"] is not None and test["label"] is not None and int(test["pred"]) != int(test["label"])


def save_figure(fig, path, fmt):
    """Save ``fig`` atomically in ``fmt`` (raster formats at :data:`RASTER_DPI`)."""
    kwargs = {} if fmt in ("pdf", "svg") else {"dpi": RASTER_DPI}
    if fmt == "png":
        kwargs["pil_kwargs"] = {"compress_level": PNG_COMPRESSION}
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format=fmt, **kwargs)
