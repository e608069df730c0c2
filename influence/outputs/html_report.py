"""The offline HTML report of a calculate.py run: ``<out>/index.html`` and, for large runs, folder pages.

The pages open from the file system (no server, no internet, no external script or font): plain
HTML and CSS, one small inline script that sorts the tables on the index. Every path in them is
relative and URL-quoted (the output folder may be moved); every text is HTML-escaped.

Layout under ``<out>``::

    index.html                      the run: settings, every test folder (accuracy, progress),
                                    self-influence (when given), and -- while the run has at most
                                    ``page_size`` scored test images -- every test image inline
    <folder>/report.html            otherwise: the test images of one folder, ``page_size`` a page
    <folder>/report_<k>.html        (k = 2, 3, ...)
    thumbs/train_<fingerprint>/<key>.png       one small PNG per training image shown
    thumbs/test/<folder>/<label>_<n>.png       one per test image shown

Per test image: its thumbnail, file, true and predicted class with confidence, the top harmful and
useful training images (thumbnail, score, class, file), and links to every output file of that
image that exists (figures, CSVs, ``.npy``; ``<n>_layerwise.csv`` and the ``<n>_summary.<fmt>``
figure too, the latter shown inline when a browser can draw it). Misclassified images come first;
a checkbox hides the others (CSS only).

Global training images: a training image in the top harmful or useful lists of many test images
(the rule: :data:`GLOBAL_MIN_TESTS`, :data:`GLOBAL_MIN_LISTS`, :data:`GLOBAL_SHARE`) is listed in
the section "Training images in many top lists" of the index, and each of its thumbnails in a
test image's strip carries a badge, so that it is not read as evidence specific to that
prediction (such images are typically gradient-norm outliers). The counts are derived from the
test images the report holds, so a report rebuilt by :meth:`RunReport.scan` has the same ones.

Use (what the engine does)::

    report = RunReport.scan(out, train, namer, summary, fmt, test_archive=test)  # start / resume
    report.write()
    report.add_folder(folder, y, preds)               # after <folder>_preds.csv is written
    report.add(folder, label, n, x[i], files[i], y[i], preds[i], confs[i], harmful, useful)
    report.write()                                     # after every finished test image

Writes are atomic (temporary name, then ``os.replace``); a page is rewritten only when its text
changed. The module never prints.
"""
import csv
import dataclasses
import html
import logging
import math
import os
import pathlib
import re
import urllib.parse
from collections.abc import Mapping

import numpy as np
from PIL import Image

from influence.io import atomic_write
from influence.outputs.figure_style import format_score
from influence.outputs.report import expected_outputs, outputs_complete

log = logging.getLogger(__name__)

INDEX = "index.html"
THUMBS = "thumbs"
#: columns of :meth:`RunReport.add_self_influence` rows, in order (also the keys of mapping rows)
SELF_INFLUENCE_COLUMNS = ("rank", "key", "file", "label", "class_name", "prediction", "confidence",
                          "self_influence", "loss")
_PAGE_FILE = re.compile(r"report(_\d+)?\.html")   # folder pages (see _page_name)
_BROWSER_FORMATS = ("png", "svg", "jpg")     # figure formats shown inline; pdf is a link
_SHOWN_PX = 64                               # displayed thumbnail box, CSS pixels
#: a training image is "global" when the report has at least GLOBAL_MIN_TESTS test images and it
#: is in the top harmful or useful list of at least max(GLOBAL_MIN_LISTS, ceil(GLOBAL_SHARE * N))
#: of the report's N test images (a test image counts once even if both its lists hold it)
GLOBAL_MIN_TESTS = 5
GLOBAL_MIN_LISTS = 3
GLOBAL_SHARE = 0.2

_CSS = """
body{font:14px/1.35 system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
main{padding:0 1rem 2rem}
.bar{position:sticky;top:0;z-index:1;background:#1f4e79;color:#fff;padding:.4rem 1rem;display:block}
.bar a{color:#fff}
#ow:checked~main article.ok{display:none}
#ow{position:absolute;left:-9999px}
#ow:checked+.bar .box::before{content:"\\2611 "} .bar .box::before{content:"\\2610 "}
table{border-collapse:collapse;margin:.5rem 0}
td,th{border:1px solid #ccc;padding:.15rem .5rem;text-align:left;vertical-align:top}
th{background:#eee} table.sortable th{cursor:pointer}
article{display:flex;flex-wrap:wrap;gap:.6rem;background:#fff;border:1px solid #ddd;border-left:5px solid #1e8449;
margin:.4rem 0;padding:.4rem;content-visibility:auto;contain-intrinsic-size:auto 200px}
article.bad{border-left-color:#c0392b}
.test{width:15rem}
.test p{margin:.2rem 0;overflow-wrap:anywhere}
.pred{font-weight:bold} article.bad .pred{color:#c0392b}
.links a{margin-right:.35rem;font-size:12px}
.strip{display:flex;align-items:flex-start;gap:.3rem}
.strip>b{writing-mode:vertical-rl;transform:rotate(180deg);font-size:12px}
.harmful>b{color:#c0392b} .useful>b{color:#1e8449}
figure{margin:0;width:84px;font-size:11px}
figcaption{white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
img.th{width:64px;height:64px;object-fit:contain;image-rendering:pixelated;background:#eee;display:block}
img.tt{width:80px;height:80px}
details.summary{flex-basis:100%} details.summary img{max-width:100%}
img.fig{max-width:100%}
.legend{color:#555;font-size:12px}
figure.global img.th{outline:2px solid #d68910;outline-offset:-2px}
.glob{display:block;background:#fdebd0;color:#7e5109;border-radius:3px;padding:0 .2rem;font-size:10px}
"""

_LEGEND = ('<p class="legend">score &asymp; n &times; (change of the test loss if that training image were '
           "removed). <b>harmful</b>: score &lt; 0, removing it would lower the test loss; "
           "<b>useful</b>: score &gt; 0, removing it would raise the test loss.</p>")

_SORT_JS = """
document.querySelectorAll("table.sortable th").forEach(function(th){th.addEventListener("click",function(){
var b=th.closest("table").tBodies[0],i=th.cellIndex,d=th.dataset.d=th.dataset.d==="1"?"-1":"1";
function v(r){var c=r.cells[i],s=c.dataset.v!==undefined?c.dataset.v:c.textContent,x=parseFloat(s);
return isNaN(x)?[1,s.toLowerCase()]:[0,x];}
Array.from(b.rows).sort(function(p,q){var a=v(p),c=v(q);return(a[0]-c[0]||(a[1]<c[1]?-1:a[1]>c[1]?1:0))*d;})
.forEach(function(r){b.appendChild(r);});});});
"""


@dataclasses.dataclass(frozen=True)
class _Train:
    """One training image of a harmful/useful list (a row of ``harmful_<n>.csv``)."""

    rank: int
    key: str
    file: str
    label: int
    class_name: str
    score: float
    thumb: str          # out-relative path, "" if there is none


@dataclasses.dataclass(frozen=True)
class ListCount:
    """In how many test images' top lists one training image is (see :meth:`RunReport.list_counts`)."""

    harmful: int        # test images whose harmful list holds it
    useful: int         # test images whose useful list holds it
    lists: int          # test images whose harmful or useful list holds it
    tests: int          # test images in the report
    train: _Train       # one of its rows (key, file, label, thumbnail; rank and score of that row)


@dataclasses.dataclass(frozen=True)
class _Test:
    """One scored test image."""

    folder: str
    label: int          # the label folder
    n: int
    file: str
    true: int
    true_name: str
    pred: int
    pred_name: str
    conf: float
    thumb: str
    harmful: tuple
    useful: tuple
    outputs: tuple      # out-relative paths of the output files that exist
    summary: str        # out-relative path of <n>_summary.<fmt>, "" if absent

    @property
    def wrong(self):
        return self.pred != self.true

    def order(self):
        """Misclassified first, then label and number."""
        return (not self.wrong, self.label, self.n)


class RunReport:
    """State of the report of one run; :meth:`write` renders it.

    Args:
      out_dir: the run's ``--out`` folder.
      train_archive: :class:`influence.data.archives.TrainArchive` (thumbnails, keys and files of the
        training images).
      class_name: callable int -> str.
      settings_summary: dict shown as a table on the index (None: no table).
      fmt: the figure format of the run (``png``, ``pdf``, ...).
      figures: whether the run draws each test image's figures (``--no-figures``: it does not; a test
        image is then complete without them).
      page_size: while the run has at most this many scored test images they all sit on the
        index; beyond, every folder gets its own pages of at most ``page_size`` images.
      thumb_px: longest side of a thumbnail file, in pixels (smaller images are kept as they are).
    """

    def __init__(self, out_dir, train_archive, class_name, settings_summary, fmt, *, figures=True, page_size=200,
                 thumb_px=96):
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1, got {page_size}")
        self.out = pathlib.Path(out_dir)
        self.train = train_archive
        self.class_name = class_name
        self.settings = dict(settings_summary or {})
        self.fmt = fmt
        self.figures = bool(figures)
        self.page_size = int(page_size)
        self.thumb_px = int(thumb_px)
        self._train_dir = f"{THUMBS}/train_{train_archive.fingerprint()}"
        self._starts = np.cumsum([0] + [train_archive.batch_len(b) for b in train_archive.batches])
        self._folders = {}          # folder -> (labels total, misclassified) or None; insertion order
        self._images = {}           # (folder, label, n) -> _Test
        self._self_influence = None
        self._cards = {}            # (key, root) -> (global marks of its training images, html)
        self._global = {}           # training key -> ListCount of the global ones, set by pages()
        self._written = {}          # path -> text last written by this object

    # ------------------------------------------------------------------------- building the state

    def add_folder(self, folder, labels, preds):
        """Register a test folder with the predictions of ALL its images (for its accuracy)."""
        labels = np.asarray(labels).reshape(-1)
        preds = np.asarray(preds).reshape(-1)
        if labels.shape != preds.shape:
            raise ValueError(f"labels and preds differ in length: {labels.size}, {preds.size}")
        self._folders[str(folder)] = (int(labels.size), int(np.sum(labels != preds)))

    def add(self, folder, label, n, test, harmful, useful):
        """Add (or replace) test image ``n`` of ``<folder>/<label>``; call after its files are written.

        Args:
          test: a :class:`influence.outputs.report.TestImage`: ``image`` uint8 (H, W, 3) or None (its
            thumbnail is (re)written), ``file`` str, ``label``, ``pred`` int class indices, ``conf``
            float in [0, 1] or None.
          harmful, useful: lists of ``(train_index, score)``, rank order (index in archive order).
        """
        rows = [[self._train_row(rank, int(i), float(s)) for rank, (i, s) in enumerate(pairs, start=1)]
                for pairs in (harmful, useful)]
        thumb = self._test_thumb(folder, label, n, test.image, replace=True)
        facts = (str(test.file), int(test.label), self.class_name(int(test.label)), int(test.pred),
                 self.class_name(int(test.pred)), test.conf)
        self._put((folder, label, n), facts, thumb, rows)

    def add_self_influence(self, rows, figure_path=None):
        """Set the self-influence section: ``rows`` of :data:`SELF_INFLUENCE_COLUMNS` (sequences in
        that order, or mappings with those keys), ``figure_path`` absolute or relative to ``out_dir``."""
        rows = [tuple(r[c] for c in SELF_INFLUENCE_COLUMNS) if isinstance(r, Mapping) else tuple(r)
                for r in rows]
        if any(len(r) != len(SELF_INFLUENCE_COLUMNS) for r in rows):
            raise ValueError(f"self-influence rows need {len(SELF_INFLUENCE_COLUMNS)} values: "
                             f"{', '.join(SELF_INFLUENCE_COLUMNS)}")
        figure = ""
        if figure_path is not None:
            path = pathlib.Path(figure_path)
            figure = pathlib.Path(os.path.relpath(path if path.is_absolute() else self.out / path,
                                                  self.out)).as_posix()
        thumbs = [self._train_thumb(str(r[1])) for r in rows]
        self._self_influence = (rows, thumbs, figure)

    @classmethod
    def scan(cls, out_dir, train_archive, class_name, settings_summary, fmt, *, test_archive=None,
             first_n=1, **kwargs):
        """A report of what ``out_dir`` already holds: every ``<folder>/<folder>_preds.csv`` and every
        test image whose outputs are complete. The n-th image of a label (``n`` counted from
        ``first_n``) is that label's n-th row of the predictions CSV. ``test_archive`` (a
        :class:`TestArchive`) supplies test thumbnails that are missing; folders follow its order."""
        report = cls(out_dir, train_archive, class_name, settings_summary, fmt, **kwargs)
        out = report.out
        found = sorted(p.parent.name for p in out.glob("*/*_preds.csv") if p.name == f"{p.parent.name}_preds.csv")
        order = [f for f in (test_archive.folders if test_archive is not None else ()) if f in found]
        for folder in order + [f for f in found if f not in order]:
            try:
                preds = _read_csv(out / folder / f"{folder}_preds.csv")
                labels = np.array([int(r["label"]) for r in preds], np.int64)
                report.add_folder(folder, labels, [int(r["prediction"]) for r in preds])
            except (OSError, KeyError, ValueError) as exc:
                log.warning("report: %s/%s_preds.csv not read (%s): folder left out", folder, folder, exc)
                continue
            images = []         # the folder's test images, read at the first missing thumbnail

            def test_image(i, folder=folder, images=images):
                if test_archive is None or folder not in test_archive.folders:
                    return None
                if not images:
                    images.append(test_archive.read(folder)[0])
                return images[0][i] if len(images[0]) == len(labels) else None

            for label in sorted(set(labels.tolist())):
                label_dir = out / folder / str(label)
                for j, i in enumerate(np.nonzero(labels == label)[0].tolist()):
                    n = first_n + j
                    if not outputs_complete(label_dir, n, fmt, report.figures):
                        continue
                    try:
                        rows = [[report._csv_row(r) for r in _read_csv(label_dir / f"{kind}_{n}.csv")]
                                for kind in ("harmful", "useful")]
                        row = preds[i]
                        facts = (row["file"], label, row["class_name"], int(row["prediction"]),
                                 row["prediction_name"], float(row["confidence"]))
                    except (OSError, KeyError, ValueError) as exc:
                        log.warning("report: test image %d of %s/%d left out (%s)", n, folder, label, exc)
                        continue
                    image = None if _has(out / _test_thumb_path(folder, label, n)) else test_image(i)
                    report._put((folder, label, n), facts, report._test_thumb(folder, label, n, image, replace=False),
                                rows)
        return report

    def _put(self, where, facts, thumb, rows):
        """``where``: (folder, label, n); ``facts``: (file, true, true name, prediction, prediction name,
        confidence); ``rows``: the harmful and useful training rows."""
        folder, label, n = where
        file, true, true_name, pred, pred_name, conf = facts
        harmful, useful = rows
        folder = str(folder)
        label_dir = self.out / folder / str(label)
        extra = [label_dir / f"{n}_layerwise.csv", label_dir / f"{n}_summary.{self.fmt}"]
        listed = expected_outputs(label_dir, n, self.fmt)
        outputs = tuple(self._rel(p) for p in listed + [e for e in extra if e not in listed] if p.is_file())
        summary = self._rel(extra[1]) if extra[1].is_file() else ""
        key = (folder, int(label), int(n))
        self._folders.setdefault(folder, None)
        self._images[key] = _Test(folder, int(label), int(n), file, int(true), true_name, int(pred), pred_name,
                                  None if conf is None else float(conf), thumb, tuple(harmful), tuple(useful),
                                  outputs, summary)
        for root in ("", "../"):
            self._cards.pop((key, root), None)

    # ------------------------------------------------------------------------- global training images

    def list_counts(self):
        """``{training key: ListCount}``: in how many of the report's test images' top harmful /
        useful lists each training image is. Derived from the test images the report holds (so the
        same after :meth:`scan`); largest ``lists`` first, then key."""
        harmful, useful, lists, rows = {}, {}, {}, {}
        for rec in self._images.values():
            h = {t.key for t in rec.harmful}
            u = {t.key for t in rec.useful}
            for keys, count in ((h, harmful), (u, useful), (h | u, lists)):
                for k in keys:
                    count[k] = count.get(k, 0) + 1
            for t in rec.harmful + rec.useful:
                rows.setdefault(t.key, t)
        tests = len(self._images)
        order = sorted(lists, key=lambda k: (-lists[k], k))
        return {k: ListCount(harmful.get(k, 0), useful.get(k, 0), lists[k], tests, rows[k]) for k in order}

    def global_training_images(self):
        """The :meth:`list_counts` entries of the "global" training images (rule: :func:`global_threshold`)."""
        need = global_threshold(len(self._images))
        return {} if need is None else {k: c for k, c in self.list_counts().items() if c.lists >= need}

    # ------------------------------------------------------------------------- training rows, thumbnails

    def _train_row(self, rank, index, score):
        p = int(np.searchsorted(self._starts, index, side="right")) - 1
        if not 0 <= index < self._starts[-1]:
            raise IndexError(f"training index {index} out of range for {self._starts[-1]} images")
        key = f"{self.train.batches[p]}_{index - int(self._starts[p])}"
        image, label, file = self.train.lookup(key)
        return _Train(rank, key, file, label, self.class_name(label), score, self._train_thumb(key, image))

    def _csv_row(self, row):
        return _Train(int(row["rank"]), row["key"], row["file"], int(row["label"]), row["class_name"],
                      float(row["score"]), self._train_thumb(row["key"]))

    def _train_thumb(self, key, image=None):
        """Out-relative path of the thumbnail of training image ``key`` (written if missing)."""
        rel = f"{self._train_dir}/{key}.png"
        if not _has(self.out / rel):
            if image is None:
                try:
                    image = self.train.lookup(key)[0]
                except KeyError:
                    return ""
            self._save_thumb(rel, image)
        return rel

    def _test_thumb(self, folder, label, n, image, replace):
        rel = _test_thumb_path(folder, label, n)
        if image is not None and (replace or not _has(self.out / rel)):
            self._save_thumb(rel, image)
        return rel if _has(self.out / rel) else ""

    def _save_thumb(self, rel, image):
        """Write a thumbnail under a temporary name, then rename it. No fsync (it costs more than the
        PNG): a thumbnail left empty by a power cut counts as missing (:func:`_has`) and is redone."""
        img = np.asarray(image, np.uint8)
        img = Image.fromarray(img[:, :, 0] if img.ndim == 3 and img.shape[2] == 1 else img)
        if max(img.size) > self.thumb_px:
            img.thumbnail((self.thumb_px, self.thumb_px), Image.Resampling.LANCZOS)
        path = self.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
        try:
            img.save(tmp, format="PNG")
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _rel(self, path):
        return pathlib.Path(path).relative_to(self.out).as_posix()

    # ------------------------------------------------------------------------- rendering

    def pages(self):
        """``{out-relative path: html}`` of every page of the current state."""
        by_folder = {f: [] for f in self._folders}
        for rec in self._images.values():
            by_folder[rec.folder].append(rec)
        for recs in by_folder.values():
            recs.sort(key=_Test.order)
        paged = len(self._images) > self.page_size
        self._global = self.global_training_images()
        pages, chunks = {}, {}
        for folder, recs in by_folder.items():
            chunks[folder] = [recs[s:s + self.page_size] for s in range(0, len(recs), self.page_size)] if paged else []
            names = [_page_name(folder, k) for k in range(len(chunks[folder]))]
            for k, chunk in enumerate(chunks[folder]):
                pages[names[k]] = self._folder_page(folder, chunk, k, names)
        pages[INDEX] = self._index(by_folder, chunks, paged)
        return pages

    def write(self):
        """Rewrite the pages whose text changed (atomically); remove folder pages no longer used.

        Returns the list of paths written."""
        pages = self.pages()
        if not self._written:     # first write: forget folder pages of an earlier run's layout
            self._written = {f"{f}/{p.name}": None for f in self._folders
                             for p in (self.out / f).glob("report*.html") if _PAGE_FILE.fullmatch(p.name)}
        written = []
        for rel, text in pages.items():
            if self._written.get(rel) != text:
                path = self.out / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_write(path) as tmp:
                    tmp.write_text(text, encoding="utf-8")
                written.append(path)
        for rel in set(self._written) - set(pages):
            (self.out / rel).unlink(missing_ok=True)
        self._written = dict(pages)
        return written

    def _index(self, by_folder, chunks, paged):
        root = ""
        parts = ["<h1>Influence report</h1>", _LEGEND]
        if (self.out / "run.json").is_file():
            parts.append(f'<p>Settings, versions and timings: {_link(root, "run.json", "run.json")}</p>')
        if self.settings:
            rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(_text(v))}</td></tr>" for k, v in self.settings.items())
            parts.append(f'<section id="settings"><h2>Settings</h2><table>{rows}</table></section>')
        parts.append(self._folder_table(by_folder, chunks, paged))
        parts.append(self._global_section(root))
        parts.append(self._self_influence_section(root))
        if not paged:
            for folder, recs in by_folder.items():
                if recs:
                    parts.append(f'<section id="{_esc(_anchor(folder))}"><h2>{_esc(folder)}</h2>'
                                 + "".join(self._card(r, root) for r in recs) + "</section>")
        return _page("Influence report", root, "".join(parts), script=True, filter=not paged)

    def _folder_table(self, by_folder, chunks, paged):
        head = ("<tr><th>folder</th><th>scored</th><th>test images</th><th>accuracy</th>"
                "<th>misclassified</th><th>misclassified scored</th><th>files</th></tr>")
        rows = []
        for folder, recs in by_folder.items():
            counts = self._folders[folder]
            total, wrong = counts if counts else (None, None)
            acc = "" if not total else f"{100.0 * (total - wrong) / total:.1f}%"
            if paged:
                pages = " ".join(_link("", _page_name(folder, k), "images" if k == 0 else str(k + 1))
                                 for k in range(len(chunks[folder])))
            else:
                pages = f'<a href="#{_esc(urllib.parse.quote(_anchor(folder)))}">images</a>' if recs else ""
            preds = f"{folder}/{folder}_preds.csv"
            if (self.out / preds).is_file():
                pages += " " + _link("", preds, "predictions.csv")
            rows.append(f"<tr><td>{_esc(folder)}</td><td>{len(recs)}</td><td>{_text(total)}</td>"
                        f'<td data-v="{acc[:-1]}">{acc}</td><td>{_text(wrong)}</td>'
                        f"<td>{sum(r.wrong for r in recs)}</td><td>{pages}</td></tr>")
        return (f'<section id="folders"><h2>Test folders</h2><table class="sortable"><thead>{head}</thead>'
                f'<tbody>{"".join(rows)}</tbody></table></section>')

    def _folder_page(self, folder, recs, k, names):
        root = "../"
        nav = " ".join(f"<b>{j + 1}</b>" if j == k else _link(root, name, str(j + 1)) for j, name in enumerate(names))
        body = (f'<p>{_link(root, INDEX, "&larr; run index", raw=True)} &middot; pages: {nav}</p>'
                f'<h1>{_esc(folder)}</h1>{_LEGEND}<section id="{_esc(_anchor(folder))}">'
                + "".join(self._card(r, root) for r in recs) + "</section>")
        return _page(f"{folder} - influence report", root, body)

    def _card(self, rec, root):
        key = (rec.folder, rec.label, rec.n)
        marks = tuple((t.key, self._global[t.key].lists, self._global[t.key].tests)
                      for t in rec.harmful + rec.useful if t.key in self._global)
        cached = self._cards.get((key, root))
        if cached is None or cached[0] != marks:
            cached = self._cards[(key, root)] = (marks, self._render_card(rec, root))
        return cached[1]

    def _render_card(self, rec, root):
        conf = "" if rec.conf is None else f" ({100 * rec.conf:.1f}%)"
        test_img = _img(root, rec.thumb, "test image", "th tt")
        links = " ".join(_link(root, p, p.rsplit("/", 1)[-1]) for p in rec.outputs)
        strips = "".join(
            f'<div class="strip {kind}"><b>{kind}</b>'
            + "".join(_train_figure(root, t, self._global.get(t.key)) for t in rows) + "</div>"
            for kind, rows in (("harmful", rec.harmful), ("useful", rec.useful)))
        # hook: the per-image summary figure (<n>_summary.<fmt>), shown when the run wrote it
        summary = ""
        if rec.summary:
            inner = (_img(root, rec.summary, "summary figure", "fig") if self.fmt in _BROWSER_FORMATS
                     else _link(root, rec.summary, rec.summary.rsplit("/", 1)[-1]))
            summary = f'<details class="summary"><summary>summary</summary>{inner}</details>'
        ident = f"t-{rec.folder}-{rec.label}-{rec.n}"
        return (f'<article class="{"bad" if rec.wrong else "ok"}" id="{_esc(ident)}" '
                f'data-test="{_esc(f"{rec.folder}/{rec.label}/{rec.n}")}">'
                f'<div class="test">{test_img}<p><b>{_esc(rec.file or "(no file name)")}</b></p>'
                f"<p>true: {_esc(rec.true_name)}<br>predicted: <span class=\"pred\">{_esc(rec.pred_name)}</span>"
                f'{conf}</p><p class="links">{links}</p></div>{strips}{summary}</article>')

    def _global_section(self, root):
        """The section "Training images in many top lists" (empty when no training image is global)."""
        if not self._global:
            return ""
        tests = len(self._images)
        need = global_threshold(tests)
        head = ("<tr><th>key</th><th>image</th><th>file</th><th>class</th><th>harmful lists</th>"
                "<th>useful lists</th><th>lists (either)</th></tr>")
        body = "".join(
            f"<tr><td>{_esc(k)}</td><td>{_img(root, c.train.thumb, k, 'th')}</td><td>{_esc(c.train.file)}</td>"
            f'<td>{_esc(c.train.class_name)}</td><td data-v="{c.harmful}">{c.harmful} of {tests}</td>'
            f'<td data-v="{c.useful}">{c.useful} of {tests}</td><td data-v="{c.lists}">{c.lists} of {tests}</td></tr>'
            for k, c in self._global.items())
        note = (f'<p class="legend">These training images are in the top harmful or useful lists of at least '
                f"{need} of the {tests} test images (at least {GLOBAL_MIN_LISTS} and {100 * GLOBAL_SHARE:g}%): "
                "they sway most test losses (typically images with a large gradient), so their place in one "
                "test image's list is not evidence specific to that prediction. Their thumbnails below carry "
                'a <span class="glob" style="display:inline">badge</span>.</p>')
        return (f'<section id="global"><h2>Training images in many top lists</h2>{note}<table class="sortable">'
                f'<thead>{head}</thead><tbody>{body}</tbody></table></section>')

    def _self_influence_section(self, root):
        """Hook: the self-influence section, rendered once :meth:`add_self_influence` gave it rows."""
        if self._self_influence is None:
            return ""
        rows, thumbs, figure = self._self_influence
        head = "".join(f"<th>{_esc(c.replace('_', ' '))}</th>" for c in SELF_INFLUENCE_COLUMNS[:2])
        head += "<th>image</th>" + "".join(f"<th>{_esc(c.replace('_', ' '))}</th>" for c in SELF_INFLUENCE_COLUMNS[2:])
        body = []
        for row, thumb in zip(rows, thumbs):
            rank, key, file, label, name, pred, conf, self_inf, loss = row
            if isinstance(pred, (int, np.integer)) or (isinstance(pred, str) and pred.isdigit()):
                pred = self.class_name(int(pred))
            cells = [_esc(_text(rank)), _esc(key), _img(root, thumb, "training image", "th"), _esc(file),
                     _esc(_text(label)), _esc(name), _esc(_text(pred)), _num(conf, lambda c: f"{100 * c:.1f}%"),
                     _num(self_inf, format_score), _num(loss, format_score)]
            body.append("<tr>" + "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in cells) + "</tr>")
        fig = ""
        if figure:
            fig = (_img(root, figure, "self-influence figure", "fig") if figure.rsplit(".", 1)[-1] in _BROWSER_FORMATS
                   else _link(root, figure, figure))
            fig = f"<p>{fig}</p>"
        return (f'<section id="self-influence"><h2>Self-influence</h2>{fig}<table class="sortable">'
                f'<thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></section>')


# ----------------------------------------------------------------------------- helpers

def global_threshold(tests):
    """Lists a training image must be in to be global among ``tests`` test images; None below
    :data:`GLOBAL_MIN_TESTS` (nothing is flagged then)."""
    if tests < GLOBAL_MIN_TESTS:
        return None
    return max(GLOBAL_MIN_LISTS, math.ceil(GLOBAL_SHARE * tests - 1e-9))    # 1e-9: 0.2 * 15 > 3.0


def _test_thumb_path(folder, label, n):
    return f"{THUMBS}/test/{folder}/{label}_{n}.png"


def _has(path):
    """A file that exists and is not empty."""
    try:
        return path.stat().st_size > 0
    except OSError:
        return False


def _esc(text):
    return html.escape(str(text), quote=True)


def _text(value):
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


def _num(value, fmt):
    try:
        x = float(value)
    except (TypeError, ValueError):
        return f"<td>{_esc(_text(value))}</td>"
    return f'<td data-v="{x!r}">{_esc(fmt(x))}</td>'


def _url(root, rel):
    return _esc(urllib.parse.quote(root + rel, safe="/"))


def _link(root, rel, text, raw=False):
    return f'<a href="{_url(root, rel)}">{text if raw else _esc(text)}</a>'


def _img(root, rel, alt, cls):
    if not rel:
        return f'<span class="{cls}" title="no thumbnail"></span>'
    size = "" if cls == "fig" else f' width="{_SHOWN_PX}" height="{_SHOWN_PX}"'
    return f'<img class="{cls}" src="{_url(root, rel)}"{size} loading="lazy" decoding="async" alt="{_esc(alt)}">'


def _train_figure(root, t, glob=None):
    """One training thumbnail of a strip; ``glob`` (a :class:`ListCount`) marks a global one."""
    title = f"#{t.rank} {t.key}: {t.file} ({t.class_name}), score {t.score!r}"
    cls, badge = "", ""
    if glob is not None:
        title += (f"\nappears in the top lists of {glob.lists} of {glob.tests} test images: likely a global "
                  "(high-gradient) image, not evidence specific to this prediction")
        cls = ' class="global"'
        badge = f'<span class="glob">in {glob.lists} of {glob.tests} lists</span>'
    return (f'<figure{cls} title="{_esc(title)}">{_img(root, t.thumb, t.key, "th")}{badge}'
            f"<figcaption>{_esc(format_score(t.score))}<br>{_esc(t.class_name)}<br>{_esc(t.file or t.key)}"
            "</figcaption></figure>")


def _anchor(folder):
    return f"f-{folder}"


def _page_name(folder, k):
    return f"{folder}/report.html" if k == 0 else f"{folder}/report_{k + 1}.html"


def _page(title, root, body, script=False, filter=True):
    js = f"<script>{_SORT_JS}</script>" if script else ""
    bar = ('<input type="checkbox" id="ow"><label for="ow" class="bar"><span class="box"></span>'
           "show only misclassified test images</label>") if filter else ""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>{bar}"
            f"<main>{body}</main>{js}</body></html>\n")


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


__all__ = ["RunReport", "ListCount", "SELF_INFLUENCE_COLUMNS", "INDEX", "THUMBS", "GLOBAL_MIN_TESTS",
           "GLOBAL_MIN_LISTS", "GLOBAL_SHARE", "global_threshold"]
