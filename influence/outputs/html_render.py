"""How the HTML report looks: the pages of a :class:`~influence.outputs.html_scan.ReportState` as text.

:class:`ReportPages` renders ``{out-relative path: html}`` from the state (the index, and folder pages
when the run has more than ``page_size`` scored test images); a test image's card is rendered once and
kept while its record and its global marks stay the same. Plain HTML and CSS, one small inline script
that sorts the tables; every path relative and URL-quoted, every text HTML-escaped. The module never
writes a file.
"""
import html
import urllib.parse

import numpy as np

from influence.outputs.figure_style import format_score
from influence.outputs.html_scan import (GLOBAL_MIN_LISTS, GLOBAL_SHARE, INDEX, SELF_INFLUENCE_COLUMNS, TestRecord,
                                         global_threshold)

_BROWSER_FORMATS = ("png", "svg", "jpg")     # figure formats shown inline; pdf is a link
_SHOWN_PX = 64                               # displayed thumbnail box, CSS pixels

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


class ReportPages:
    """The pages of ``state`` (a :class:`~influence.outputs.html_scan.ReportState`), rendered on each
    :meth:`pages` call from its current contents."""

    def __init__(self, state):
        self.state = state
        self._cards = {}            # (key, root) -> (record, global marks of its training images, html)
        self._global = {}           # training key -> ListCount of the global ones, set by pages()

    def pages(self):
        """``{out-relative path: html}`` of every page of the current state."""
        by_folder = {f: [] for f in self.state.folders}
        for rec in self.state.images.values():
            by_folder[rec.folder].append(rec)
        for recs in by_folder.values():
            recs.sort(key=TestRecord.order)
        paged = len(self.state.images) > self.state.page_size
        self._global = self.state.global_training_images()
        pages, chunks = {}, {}
        for folder, recs in by_folder.items():
            chunks[folder] = [recs[s:s + self.state.page_size] for s in range(0, len(recs), self.state.page_size)] if paged else []
            names = [_page_name(folder, k) for k in range(len(chunks[folder]))]
            for k, chunk in enumerate(chunks[folder]):
                pages[names[k]] = self._folder_page(folder, chunk, k, names)
        pages[INDEX] = self._index(by_folder, chunks, paged)
        return pages

    def _index(self, by_folder, chunks, paged):
        root = ""
        parts = ["<h1>Influence report</h1>", _LEGEND]
        if (self.state.out / "run.json").is_file():
            parts.append(f'<p>Settings, versions and timings: {_link(root, "run.json", "run.json")}</p>')
        if self.state.settings:
            rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(_text(v))}</td></tr>" for k, v in self.state.settings.items())
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
            counts = self.state.folders[folder]
            total, wrong = counts if counts else (None, None)
            acc = "" if not total else f"{100.0 * (total - wrong) / total:.1f}%"
            if paged:
                pages = " ".join(_link("", _page_name(folder, k), "images" if k == 0 else str(k + 1))
                                 for k in range(len(chunks[folder])))
            else:
                pages = f'<a href="#{_esc(urllib.parse.quote(_anchor(folder)))}">images</a>' if recs else ""
            preds = f"{folder}/{folder}_preds.csv"
            if (self.state.out / preds).is_file():
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
        if cached is None or cached[0] is not rec or cached[1] != marks:     # a record replaced by add()
            cached = self._cards[(key, root)] = (rec, marks, self._render_card(rec, root))
        return cached[2]

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
            inner = (_img(root, rec.summary, "summary figure", "fig") if self.state.fmt in _BROWSER_FORMATS
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
        tests = len(self.state.images)
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
        """Hook: the self-influence section, rendered once the state has self-influence rows."""
        if self.state.self_influence is None:
            return ""
        rows, thumbs, figure = self.state.self_influence
        head = "".join(f"<th>{_esc(c.replace('_', ' '))}</th>" for c in SELF_INFLUENCE_COLUMNS[:2])
        head += "<th>image</th>" + "".join(f"<th>{_esc(c.replace('_', ' '))}</th>" for c in SELF_INFLUENCE_COLUMNS[2:])
        body = []
        for row, thumb in zip(rows, thumbs):
            rank, key, file, label, name, pred, conf, self_inf, loss = row
            if isinstance(pred, (int, np.integer)) or (isinstance(pred, str) and pred.isdigit()):
                pred = self.state.class_name(int(pred))
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
