"""The png and jpg figures, drawn at the pace of the scores: matplotlib lays out and draws the lines and
bars, the image tiles are pasted in already resampled, the text is drawn by Pillow, and png is encoded here.

On a figure laid out once (:mod:`influence.outputs.strips`, :mod:`influence.outputs.summary`), what
still cost per test image was matplotlib resampling each image panel (3 ms a panel), rasterising every
glyph in Python (about 30 µs a glyph, 300 to 500 glyphs a figure) and Pillow's png encoder (7 to 10 ms).
:func:`save_raster` draws the figure with matplotlib (the lines, bars, frames and the place of every line
of text, from matplotlib's own layout), then:

* pastes each image panel's picture, resampled once to the panel's pixels (``nearest`` up to
  :data:`~influence.outputs.figure_style.SMALL_IMAGE` pixels a side, else Lanczos), and draws the
  panel's frame over it again;
* draws each line of text where matplotlib put it (its left end on its baseline) with Pillow, from the
  font file and size matplotlib chose; a line Pillow cannot draw the same (rotated, math, transparent,
  clipped, or with a character the font lacks) is left to matplotlib;
* encodes png with the "up" filter and zlib level 3 (:func:`png_bytes`: 4 ms instead of Pillow's
  7-10 ms, files as small), jpg with Pillow.

pdf and svg are not drawn here: they keep matplotlib's vector text and images (:func:`save_figure`).
"""
import functools
import struct
import zlib

import numpy as np
from matplotlib import font_manager
from PIL import Image, ImageDraw, ImageFont

from influence.io import atomic_write
from influence.outputs.figure_style import SMALL_IMAGE

#: formats drawn here (the others by matplotlib's savefig)
RASTER_FORMATS = ("png", "jpg")

#: zlib level of the png files: with the "up" filter, as small as Pillow's level 1 in half its time
PNG_LEVEL = 3


# ----------------------------------------------------------------------------- pictures

def tile(image, height, width):
    """A uint8 (H, W), (H, W, 1) or (H, W, 3) picture as uint8 (height, width, 3): "nearest" up to
    :data:`SMALL_IMAGE` pixels a side (each pixel a block, as imshow draws it), else Lanczos."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    small = max(img.shape[:2]) <= SMALL_IMAGE
    pil = Image.fromarray(np.ascontiguousarray(img)).convert("RGB")
    if pil.size != (width, height):
        pil = pil.resize((width, height), Image.Resampling.NEAREST if small else Image.Resampling.LANCZOS)
    return np.asarray(pil)


def panel_box(ax, height):
    """The pixel rows and columns (top, bottom, left, right; top = 0) an image panel covers, its aspect applied,
    on a canvas ``height`` pixels high."""
    ax.apply_aspect()
    box = ax.get_window_extent()
    return (int(round(height - box.y1)), int(round(height - box.y0)), int(round(box.x0)), int(round(box.x1)))


# ----------------------------------------------------------------------------- text

@functools.lru_cache(maxsize=64)
def _pil_font(path, size_px):
    return ImageFont.truetype(path, size_px, layout_engine=ImageFont.Layout.BASIC)    # the widths matplotlib measures


@functools.lru_cache(maxsize=16)
def _charmap(path):
    return frozenset(font_manager.get_font(path).get_charmap())


@functools.lru_cache(maxsize=4096)
def _has_glyphs(path, text):
    return set(map(ord, text)) <= _charmap(path)


class _Lines:
    """While a figure is drawn, takes the lines of text that Pillow can draw from the renderer
    (``draw_text``, called once per line with its left end on the baseline) and keeps them for :meth:`paint`."""

    def __init__(self, renderer):
        self.renderer, self.lines = renderer, []
        self._draw = renderer.draw_text

    def __enter__(self):
        self.renderer.draw_text = self.take
        return self

    def __exit__(self, *exc):
        del self.renderer.draw_text           # the class's method again
        return False

    def take(self, gc, x, y, s, prop, angle, ismath=False, mtext=None):
        rgba = gc.get_rgb()
        alpha = gc.get_alpha() if len(rgba) == 3 or gc.get_forced_alpha() else rgba[3]
        path = font_manager.findfont(prop)
        if (angle or ismath or alpha != 1 or gc.get_clip_rectangle() is not None or not gc.get_antialiased()
                or not path.lower().endswith((".ttf", ".otf")) or not _has_glyphs(path, s)):
            return self._draw(gc, x, y, s, prop, angle, ismath=ismath, mtext=mtext)
        size = prop.get_size_in_points() * self.renderer.dpi / 72.0
        self.lines.append((x, y, s, path, size, tuple(int(round(255 * c)) for c in rgba[:3])))
        return None

    def paint(self, image):
        """Draw the lines kept onto the Pillow ``image``."""
        draw = ImageDraw.Draw(image)
        for x, y, s, path, size, colour in self.lines:
            draw.text((x, y), s, fill=colour, font=_pil_font(path, size), anchor="ls")


# ----------------------------------------------------------------------------- the figure

def draw_raster(fig, tiles=()):
    """``fig`` drawn at its dpi -> Pillow RGB image, with ``tiles`` = [(image axes, uint8 picture)] pasted into
    their panels (the axes' own images and frames are hidden while matplotlib draws, the frames drawn over
    the pictures after)."""
    renderer = fig.canvas.get_renderer()
    hidden = [artist for ax, _ in tiles for artist in [*ax.images, *ax.spines.values()] if artist.get_visible()]
    for artist in hidden:
        artist.set_visible(False)
    try:
        renderer.clear()
        with _Lines(renderer) as lines:
            fig.draw(renderer)
    finally:
        for artist in hidden:
            artist.set_visible(True)
    buffer = np.asarray(renderer.buffer_rgba())
    for ax, picture in tiles:
        top, bottom, left, right = panel_box(ax, buffer.shape[0])
        if bottom > top and right > left:
            buffer[top:bottom, left:right, :3] = tile(picture, bottom - top, right - left)
            buffer[top:bottom, left:right, 3] = 255
        for spine in ax.spines.values():
            spine.draw(renderer)
    image = Image.fromarray(buffer).convert("RGB")
    lines.paint(image)
    return image


def png_bytes(rgb, dpi):
    """A png file of the uint8 (H, W, 3) array ``rgb``: every row "up"-filtered, zlib level :data:`PNG_LEVEL`,
    the resolution ``dpi`` recorded (pHYs) as matplotlib's png files do."""
    height, width = np.shape(rgb)[:2]
    flat = np.asarray(rgb, dtype=np.uint8).reshape(height, width * 3)
    rows = np.empty((height, width * 3 + 1), np.uint8)
    rows[:, 0] = 2                                         # filter type 2: up
    rows[:1, 1:] = flat[:1]
    np.subtract(flat[1:], flat[:-1], out=rows[1:, 1:])     # uint8 arithmetic wraps, as PNG's filters do

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    per_metre = int(round(dpi / 0.0254))
    return b"".join([b"\x89PNG\r\n\x1a\n",
                     chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)),
                     chunk(b"pHYs", struct.pack(">IIB", per_metre, per_metre, 1)),
                     chunk(b"IDAT", zlib.compress(rows, PNG_LEVEL)),
                     chunk(b"IEND", b"")])


def save_raster(fig, path, fmt, tiles=()):
    """Draw ``fig`` (:func:`draw_raster`) and write it atomically to ``path`` as ``fmt`` ("png" or "jpg")."""
    if fmt not in RASTER_FORMATS:
        raise ValueError(f"raster format must be one of {', '.join(RASTER_FORMATS)}, got {fmt!r}")
    image = draw_raster(fig, tiles)
    with atomic_write(path) as tmp:
        if fmt == "png":
            with open(tmp, "wb") as fh:
                fh.write(png_bytes(np.frombuffer(image.tobytes(), np.uint8).reshape(image.height, image.width, 3),
                                   fig.dpi))
        else:
            image.save(tmp, format="jpeg", dpi=(fig.dpi, fig.dpi))
