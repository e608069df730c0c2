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

The parts: :mod:`influence.outputs.html_scan` (what the report holds, built as the run goes or
scanned from disk), :mod:`influence.outputs.html_render` (the pages as text), this module (writing
them).

Use (what the engine does)::

    report = RunReport.scan(out, train, namer, summary, fmt, test_archive=test)  # start / resume
    report.write()
    report.add_folder(folder, y, preds)               # after <folder>_preds.csv is written
    report.add(folder, label, n, x[i], files[i], y[i], preds[i], confs[i], harmful, useful)
    report.write()                                     # after every finished test image

Writes are atomic (temporary name, then ``os.replace``); a page is rewritten only when its text
changed. The module never prints.
"""
import re

from influence.io import atomic_write
from influence.outputs.html_render import ReportPages
from influence.outputs.html_scan import ReportState

_PAGE_FILE = re.compile(r"report(_\d+)?\.html")   # folder pages (html_render's page names)


class RunReport(ReportState):
    """The report of one run: its state (:class:`~influence.outputs.html_scan.ReportState`, the same
    arguments), :meth:`pages` renders it and :meth:`write` writes what changed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._pages = ReportPages(self)
        self._written = {}          # path -> text last written by this object

    def pages(self):
        """``{out-relative path: html}`` of every page of the current state."""
        return self._pages.pages()

    def write(self):
        """Rewrite the pages whose text changed (atomically); remove folder pages no longer used.

        Returns the list of paths written."""
        pages = self.pages()
        if not self._written:     # first write: forget folder pages of an earlier run's layout
            self._written = {f"{f}/{p.name}": None for f in self.folders
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


__all__ = ["RunReport"]
