"""Tests of influence/outputs/html_report.py (html_scan.py, html_render.py): the offline HTML report of a run, built incrementally and from disk."""
import csv
import html.parser
import pathlib
import re
import shutil
import types
import urllib.parse

import numpy as np
import pytest
from PIL import Image

from engine_helpers import IMAGE, random_data, write_train_archive
from influence.catalogue import TrainCatalogue
from influence.outputs import report as outputs
from influence.outputs.figure_style import format_score
from influence.outputs.report import TestImage
from influence.data.archive_reader import TestArchive
from influence.data.archive_writer import ArchiveWriter
from influence.outputs.html_report import RunReport
from influence.outputs.html_scan import GLOBAL_MIN_TESTS, INDEX, SELF_INFLUENCE_COLUMNS, global_threshold

NAMES = ["zero", "one <b>", "two & co", "three"]
ODD = 'odd #1 & <x> "q"'                        # a test folder name that needs quoting and escaping
TOP = 3
SETTINGS = {"model": "tiny.keras", "solver": "lissa", "damping": 0.01, "params": ["conv", "dense"]}


def class_name(c):
    return NAMES[int(c)]


# ----------------------------------------------------------------------------- a fake run


def _test_archive(path, folders):
    with ArchiveWriter(path) as w:
        for name, (x, y, files) in folders.items():
            w.add(f"test_{name}_x", x)
            w.add(f"test_{name}_y", y.reshape(-1, 1))
            w.add(f"test_{name}_files", np.array(files))
        w.add("meta_size", np.array(IMAGE[:2], np.int64))
    return TestArchive(path)


def _run_engine(out, train, test, fmt="png", first_n=1, **report_kw):
    """What calculate.py does, without a model: random scores, the real output writers, the report."""
    rng = np.random.default_rng(5)
    report = RunReport(out, train, class_name, SETTINGS, fmt, **report_kw)
    catalogue = TrainCatalogue.of(train, class_name)
    expected, wrong = set(), set()
    for folder in test.folders:
        x, y, files = test.read(folder)
        preds = np.where(np.arange(len(y)) % 3 == 0, (y + 1) % len(NAMES), y)     # every third one wrong
        confs = rng.uniform(0.3, 1.0, len(y))
        outputs.write_predictions_csv(out / folder / f"{folder}_preds.csv", files, y, preds, confs, class_name)
        report.add_folder(folder, y, preds)
        for label in np.unique(y):
            for j, i in enumerate(np.nonzero(y == label)[0]):
                n = first_n + j
                image = outputs.TestImage(x[i], int(y[i]), int(preds[i]), float(confs[i]), str(files[i]))
                label_dir = out / folder / str(int(label))
                scores = rng.normal(size=len(train)) * 10.0 ** rng.integers(-6, 3)
                outputs.write_test_outputs(
                    label_dir, n, scores=scores, shares=np.column_stack([0.25 * scores, 0.75 * scores]),
                    layer_names=["conv", "dense"], catalogue=catalogue, fetch_image=lambda gi: train.take([gi])[0][0],
                    test=image, top=TOP, fmt=fmt)
                harmful, useful = outputs.top_indices(scores, TOP)
                report.add(folder, int(label), n, image, [(h, scores[h]) for h in harmful],
                           [(u, scores[u]) for u in useful])
                report.write()
                expected.add((folder, int(label), n))
                if preds[i] != y[i]:
                    wrong.add((folder, int(label), n))
    return report, expected, wrong


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("html")
    x, y = random_data(30, seed=1)
    train = write_train_archive(root / "train.npz", x, y, batch=8)
    tx, ty = random_data(11, seed=2)
    files = [f"{int(c)}/t{i:02d}.png" for i, c in enumerate(ty)]
    files[4] = '2/<img src=x onerror=alert(1)> & "quoted" #?.png'
    test = _test_archive(root / "test.npz", {"orig": (tx[:7], ty[:7], files[:7]), ODD: (tx[7:], ty[7:], files[7:])})
    out = root / "out"
    out.mkdir()
    (out / "run.json").write_text("{}")
    report, expected, wrong = _run_engine(out, train, test, page_size=100)
    assert wrong and expected - wrong
    return types.SimpleNamespace(root=root, out=out, train=train, test=test, report=report,
                                 expected=expected, wrong=wrong)


def _copy(run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(run.out, out)
    return out


# ----------------------------------------------------------------------------- reading pages back


class _Page(html.parser.HTMLParser):
    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.urls, self.ids, self.tests, self.texts = [], set(), [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for name in ("href", "src"):
            if name in attrs:
                self.urls.append(attrs[name])
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "article":
            folder, label, n = attrs["data-test"].rsplit("/", 2)
            self.tests.append(((folder, int(label), int(n)), attrs["class"] == "bad"))

    def handle_data(self, data):
        self.texts.append(data)


def _pages(out):
    """{path: _Page} of the index and every folder page it links to, in link order."""
    index = (out / INDEX).resolve()
    pages = {index: _Page(index.read_text(encoding="utf-8"))}
    for url in pages[index].urls:
        path = (out / urllib.parse.unquote(url)).resolve()
        if path.name.startswith("report") and path.suffix == ".html" and path not in pages:
            pages[path] = _Page(path.read_text(encoding="utf-8"))
    return pages


def _check_links(out):
    for path, page in _pages(out).items():
        text = path.read_text(encoding="utf-8")
        assert "http:" not in text and "https:" not in text and "//" not in text, path
        assert page.urls, path
        for url in page.urls:
            assert not re.match(r"^[a-z]+:", url) and not url.startswith("/"), url
            target, _, fragment = url.partition("#")
            if not target:
                assert urllib.parse.unquote(fragment) in page.ids, url
                continue
            resolved = path.parent / urllib.parse.unquote(target)
            assert resolved.is_file(), (path, url)
            assert out.resolve() in resolved.resolve().parents, url


def _articles(out):
    return [t for page in _pages(out).values() for t in page.tests]


# ----------------------------------------------------------------------------- tests


@pytest.mark.slow
def test_links_resolve_and_nothing_is_external(run):
    _check_links(run.out)
    index = (run.out / INDEX).read_text(encoding="utf-8")
    assert 'loading="lazy"' in index and "<script" in index
    thumbs = list((run.out / "thumbs").rglob("*.png"))
    assert len([t for t in thumbs if t.parent.parent.name == "test"]) == len(run.expected)
    assert all(Image.open(t).size == IMAGE[:2] for t in thumbs)    # 6x6 images stay as they are


def test_every_test_image_once_misclassified_first(run):
    articles = _articles(run.out)
    assert sorted(t for t, _ in articles) == sorted(run.expected)
    for folder in ("orig", ODD):
        flags = [bad for (f, _, _), bad in articles if f == folder]
        assert flags == sorted(flags, reverse=True) and True in flags and False in flags
    assert {t for t, bad in articles if bad} == run.wrong


def test_card_shows_prediction_scores_and_links(run):
    index = _Page((run.out / INDEX).read_text(encoding="utf-8"))
    text = " ".join(index.texts)
    preds = list(csv.DictReader(open(run.out / "orig" / "orig_preds.csv", encoding="utf-8")))
    wrong = sum(r["label"] != r["prediction"] for r in preds)
    assert f"{100 * (len(preds) - wrong) / len(preds):.1f}%" in text
    # every training image of every harmful/useful CSV appears with its score and file
    for folder, label, n in run.expected:
        for kind in ("harmful", "useful"):
            for row in csv.DictReader(open(run.out / folder / str(label) / f"{kind}_{n}.csv", encoding="utf-8")):
                assert format_score(float(row["score"])) in text and row["file"] in text
                assert f"thumbs/train_{run.train.fingerprint()}/{row['key']}.png" in index.urls
        for p in outputs.expected_outputs(pathlib.Path(folder) / str(label), n, "png"):
            assert urllib.parse.quote(p.as_posix(), safe="/") in index.urls
    # user text is escaped, not markup: the odd file name comes back as text, never as a tag
    assert '2/<img src=x onerror=alert(1)> & "quoted" #?.png' in text and ODD in text
    assert "onerror" not in "".join(u for u in index.urls)


def test_summary_and_layerwise_hooks_link_the_files_that_exist(run):
    index = _Page((run.out / INDEX).read_text(encoding="utf-8"))
    summaries = [u for u in index.urls if u.endswith("_summary.png")]
    layerwise = [u for u in index.urls if u.endswith("_layerwise.csv")]
    want = sorted({urllib.parse.quote(f"{f}/{label}/{n}_summary.png", safe="/") for f, label, n in run.expected})
    assert sorted(set(summaries)) == want == sorted(u.replace("layerwise.csv", "summary.png") for u in layerwise)
    assert len(summaries) == 2 * len(want)                       # a link and the figure itself
    assert '<img class="fig" src="orig/' in (run.out / INDEX).read_text(encoding="utf-8")


def test_pdf_summary_is_a_link_not_an_image(tmp_path, run):
    out = tmp_path / "out"
    label_dir = out / "orig" / "0"
    label_dir.mkdir(parents=True)
    outputs.write_predictions_csv(out / "orig" / "orig_preds.csv", ["a.png"], [0], [1], [0.5], class_name)
    for p in outputs.expected_outputs(label_dir, 1, "pdf") + [label_dir / "1_summary.pdf"]:
        p.write_bytes(b"%PDF-1.4\n" if p.suffix == ".pdf" else b"")
    for kind in ("harmful", "useful"):
        (label_dir / f"{kind}_1.csv").write_text("rank,key,file,label,class_name,score\n1,0_3,f.png,2,two & co,-0.5\n")
    report = RunReport.scan(out, run.train, class_name, SETTINGS, "pdf")
    report.write()
    text = (out / INDEX).read_text(encoding="utf-8")
    assert '<a href="orig/0/1_summary.pdf">' in text and 'src="orig/0/1_summary.pdf"' not in text
    assert "two &amp; co" in text and "-0.5" in text
    _check_links(out)


def test_scan_rebuilds_the_incremental_pages(run, tmp_path):
    scanned = RunReport.scan(run.out, run.train, class_name, SETTINGS, "png", test_archive=run.test, page_size=100)
    assert scanned.pages() == run.report.pages()
    # without the test archive: the existing test thumbnails are reused, folders come in name order
    bare = _Page(RunReport.scan(run.out, run.train, class_name, SETTINGS, "png", page_size=100).pages()[INDEX])
    full = _Page(run.report.pages()[INDEX])
    assert sorted(bare.tests) == sorted(full.tests) and sorted(bare.urls) == sorted(full.urls)
    assert [t[0][0] for t in bare.tests][0] == ODD and [t[0][0] for t in full.tests][0] == "orig"
    # resume: outputs of one image incomplete -> it is left out, then added again as the engine redoes it
    out = _copy(run, tmp_path)
    folder, label, n = sorted(run.expected)[0]
    (out / folder / str(label) / f"useful_{n}.csv").unlink()
    partial = RunReport.scan(out, run.train, class_name, SETTINGS, "png", test_archive=run.test, page_size=100)
    partial.write()
    assert sorted(t for t, _ in _articles(out)) == sorted(run.expected - {(folder, label, n)})


def test_overwrite_replaces_an_image_instead_of_duplicating_it(run, tmp_path):
    out = _copy(run, tmp_path)
    report = RunReport.scan(out, run.train, class_name, SETTINGS, "png", test_archive=run.test, page_size=100)
    report.write()
    folder, label, n = sorted(run.wrong)[0]
    x, y, files = run.test.read(folder)
    i = np.nonzero(y == label)[0][n - 1]
    report.add(folder, label, n, TestImage(x[i], label, label, 0.99, files[i]), [(0, -1.0)], [(1, 2.0)])  # now right
    report.write()
    articles = _articles(out)
    assert sorted(t for t, _ in articles) == sorted(run.expected)
    assert {t for t, bad in articles if bad} == run.wrong - {(folder, label, n)}


def test_old_numbering_from_zero_is_scanned_with_first_n(tmp_path, run):
    out = _copy(run, tmp_path)
    for label_dir in (p for p in out.glob("*/*") if p.is_dir() and p.name.isdigit()):
        for path in sorted(label_dir.iterdir(), key=lambda p: int(re.search(r"\d+", p.name).group())):
            path.rename(path.with_name(re.sub(r"\d+", lambda m: str(int(m.group()) - 1), path.name, count=1)))
    RunReport.scan(out, run.train, class_name, SETTINGS, "png", test_archive=run.test, first_n=0).write()
    assert sorted(t for t, _ in _articles(out)) == sorted((f, label, n - 1) for f, label, n in run.expected)
    _check_links(out)


def test_large_runs_get_one_page_set_per_folder(run, tmp_path):
    out = _copy(run, tmp_path)
    report = RunReport.scan(out, run.train, class_name, SETTINGS, "png", test_archive=run.test, page_size=3)
    report.write()
    pages = _pages(out)
    index = pages[(out / INDEX).resolve()]
    assert not index.tests                                            # the index only links
    per_folder = {f: sum(1 for g, _, _ in run.expected if g == f) for f in ("orig", ODD)}
    for folder, count in per_folder.items():
        names = sorted(p.name for p in (out / folder).glob("report*.html"))
        assert len(names) == -(-count // 3) and "report.html" in names
    assert all(len(p.tests) <= 3 for p in pages.values())
    assert sorted(t for t, _ in _articles(out)) == sorted(run.expected)
    for folder in ("orig", ODD):                                     # misclassified first across pages
        flags = [bad for (f, _, _), bad in _articles(out) if f == folder]
        assert flags == sorted(flags, reverse=True)
    _check_links(out)
    # the run fits on the index again (larger page size): the folder pages are removed
    RunReport.scan(out, run.train, class_name, SETTINGS, "png", page_size=100).write()
    assert not list(out.glob("*/report*.html"))
    assert sorted(t for t, _ in _articles(out)) == sorted(run.expected)


def test_write_is_atomic_and_skips_unchanged_pages(run, tmp_path):
    out = _copy(run, tmp_path)
    report = RunReport.scan(out, run.train, class_name, SETTINGS, "png", page_size=100)
    assert report.write() == [out / INDEX]          # same text as before, but a new object writes once
    assert report.write() == []
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


def test_thumbnails_are_small_and_written_once(tmp_path):
    x, y = random_data(3, seed=3)
    big = np.random.default_rng(0).integers(0, 256, (3, 200, 150, 3), dtype=np.uint8)
    train = write_train_archive(tmp_path / "train.npz", big, y, batch=2)
    report = RunReport(tmp_path / "out", train, class_name, None, "png", thumb_px=48)
    report.add("f", 0, 1, TestImage(big[0], 0, 0, 0.9, "a.png"), [(2, -1.0)], [(1, 3.0)])
    thumbs = sorted((tmp_path / "out" / "thumbs").rglob("*.png"))
    assert sorted(t.relative_to(tmp_path / "out" / "thumbs").as_posix() for t in thumbs) == \
        ["test/f/0_1.png", f"train_{train.fingerprint()}/0_1.png", f"train_{train.fingerprint()}/1_0.png"]
    assert len(thumbs) == 3 and all(Image.open(t).size == (36, 48) for t in thumbs)
    train_thumb = tmp_path / "out" / f"thumbs/train_{train.fingerprint()}/1_0.png"
    assert train_thumb.is_file()
    train_thumb.write_bytes(b"kept")                                # an existing thumbnail is not redone
    report.add("f", 0, 2, TestImage(big[1], 0, 0, 0.9, "b.png"), [(2, -1.0)], [(1, 3.0)])
    assert train_thumb.read_bytes() == b"kept"
    with pytest.raises(IndexError):
        report.add("f", 0, 3, TestImage(big[1], 0, 0, 0.9, "c.png"), [(3, -1.0)], [])


def test_self_influence_section(run, tmp_path):
    out = _copy(run, tmp_path)
    report = RunReport.scan(out, run.train, class_name, SETTINGS, "png", page_size=100)
    Image.new("RGB", (40, 30), "blue").save(out / "self_influence.png")
    rows = [(1, "1_2", "3/img010.png", 3, "three", 1, 0.8, 12.5, 2.25),
            dict(zip(SELF_INFLUENCE_COLUMNS, (2, "0_0", "<b>x</b>.png", 0, "zero", "two & co", 0.4, 3.0, 0.5)))]
    report.add_self_influence(rows, out / "self_influence.png")
    report.write()
    text = (out / INDEX).read_text(encoding="utf-8")
    page = _Page(text)
    assert "self-influence" in page.ids and "self_influence.png" in page.urls
    assert f"thumbs/train_{run.train.fingerprint()}/1_2.png" in page.urls
    words = " ".join(page.texts)
    assert "<b>x</b>.png" in words and "one <b>" in words and "80.0%" in words and "12.5" in words
    assert 'data-v="12.5"' in text
    _check_links(out)
    report.add_self_influence(rows[:1], "figs/si.pdf")
    assert '<a href="figs/si.pdf">' in report.pages()[INDEX]
    with pytest.raises(ValueError):
        report.add_self_influence([(1, "0_0")])


def test_scan_leaves_out_what_it_cannot_read(run, tmp_path, caplog):
    out = _copy(run, tmp_path)
    folder, label, n = max(t for t in run.expected if t[0] == "orig")
    (out / folder / str(label) / f"harmful_{n}.csv").write_text("rank,key\n1,0_0\n")      # no score column
    (out / ODD / f"{ODD}_preds.csv").write_text("file\nx.png\n")                          # no labels
    (out / "orig" / "report_notes.html").write_text("mine")                               # not a report page
    with caplog.at_level("WARNING", logger="influence.outputs.html_scan"):
        report = RunReport.scan(out, run.train, class_name, SETTINGS, "png", test_archive=run.test, page_size=100)
    report.write()
    assert sorted(t for t, _ in _articles(out)) == sorted(
        t for t in run.expected - {(folder, label, n)} if t[0] != ODD)
    assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 2
    assert (out / "orig" / "report_notes.html").read_text() == "mine"
    _check_links(out)


# ----------------------------------------------------------------------------- global training images


def _train_key(train, index):
    starts = np.cumsum([0] + [train.batch_len(b) for b in train.batches])
    b = int(np.searchsorted(starts, index, side="right")) - 1
    return f"{train.batches[b]}_{index - int(starts[b])}"


def _report_with_lists(out, train, tests, common=5, once=7):
    """``tests`` test images added by hand: training image ``common`` is in the harmful list of all
    but the first, ``once`` only in the first's; every other entry is in one list only."""
    report = RunReport(out, train, class_name, None, "png")
    x, _ = random_data(tests, seed=4)
    for j in range(tests):
        harmful = [(once if j == 0 else common, -2.0), (10 + j, -1.0)]
        report.add("f", 0, j + 1, TestImage(x[j], 0, j % 2, 0.7, f"0/t{j}.png"), harmful, [(20 + j, 1.5)])
    return report


def test_global_rule():
    assert [global_threshold(n) for n in (1, 4, 5, 6, 15, 16, 30, 100)] == [None] * 2 + [3, 3, 3, 4, 6, 20]


def test_training_image_in_many_lists_is_flagged(run, tmp_path):
    report = _report_with_lists(tmp_path / "out", run.train, 6)
    common, once = _train_key(run.train, 5), _train_key(run.train, 7)
    counts = report.list_counts()
    assert (counts[common].harmful, counts[common].useful, counts[common].lists, counts[common].tests) == (5, 0, 5, 6)
    assert counts[once].lists == 1 and list(counts)[0] == common
    assert list(report.global_training_images()) == [common]
    report.write()
    text = (tmp_path / "out" / INDEX).read_text(encoding="utf-8")
    page = _Page(text)
    assert "global" in page.ids and "Training images in many top lists" in page.texts
    section = text[text.index('<section id="global">'):]
    section = section[:section.index("</section>")]
    assert common in section and once not in section and "5 of 6" in section and "0 of 6" in section
    assert text.count("in 5 of 6 lists") == 5 and text.count('<figure class="global"') == 5
    assert text.count("appears in the top lists of 5 of 6 test images") == 5
    assert f'title="#1 {once}:' in text                                       # its thumbnail is not marked
    _check_links(tmp_path / "out")
    # the flag follows the count: one more image without it (7 test images, still 5 >= 3)
    x, _ = random_data(1, seed=9)
    report.add("f", 1, 1, TestImage(x[0], 1, 1, 0.9, "1/u.png"), [(3, -1.0)], [(4, 1.0)])
    assert "in 5 of 7 lists" in report.pages()[INDEX]


def test_few_test_images_flag_nothing(run, tmp_path):
    report = _report_with_lists(tmp_path / "out", run.train, GLOBAL_MIN_TESTS - 1)
    assert report.list_counts()[_train_key(run.train, 5)].lists == GLOBAL_MIN_TESTS - 2
    assert report.global_training_images() == {}
    text = report.pages()[INDEX]
    assert 'id="global"' not in text and "lists</span>" not in text and 'class="global"' not in text


def test_global_flag_survives_a_rebuild_by_scan(run, tmp_path):
    out = _copy(run, tmp_path)
    key = _train_key(run.train, 29)
    _, label, file = run.train.lookup(key)
    for folder, lab, n in run.expected:                        # training image 29 tops every harmful list
        path = out / folder / str(lab) / f"harmful_{n}.csv"
        rows = list(csv.DictReader(open(path, encoding="utf-8")))
        rows = [r for r in rows if r["key"] != key][:TOP - 1]
        rows.insert(0, dict(rank=1, key=key, file=file, label=label, class_name=class_name(label), score=-99.0))
        with open(path, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=["rank", "key", "file", "label", "class_name", "score"])
            w.writeheader()
            w.writerows(dict(r, rank=i) for i, r in enumerate(rows, start=1))
    tests = len(run.expected)
    report = RunReport.scan(out, run.train, class_name, SETTINGS, "png", test_archive=run.test, page_size=100)
    counts = report.global_training_images()
    assert key in counts and counts[key].harmful == counts[key].lists == tests
    report.write()
    text = (out / INDEX).read_text(encoding="utf-8")
    assert text.count(f"in {tests} of {tests} lists") == tests and f"{tests} of {tests}</td>" in text
    _check_links(out)
    # large runs: the folder pages carry the marks, the index keeps the section
    paged = RunReport.scan(out, run.train, class_name, SETTINGS, "png", test_archive=run.test, page_size=3)
    pages = paged.pages()
    assert 'id="global"' in pages[INDEX] and "lists</span>" not in pages[INDEX]
    assert sum(t.count(f"in {tests} of {tests} lists") for t in pages.values()) == tests
