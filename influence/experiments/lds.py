"""Linear datamodeling score (LDS; TRAK, Park et al. 2023; kronfluence): ``python -m influence.validate --panels lds``.

For ``M`` random half-subsets ``S_m`` of the demo's ``n`` training digits, the demo CNN is retrained on
``S_m`` with the demo's recipe (30 epochs, Adam 3e-3, batch 32) under several seeds; the *actual* test
loss ``L_t(m)`` is the mean over the seeds (cross-entropy in float64 from the logits). The *predicted*
change of test image ``t``'s loss is the sum over the REMOVED images of ``score(i, t) / n``
(``score ≈ n × change of the loss when i is removed``, positive = useful). Then::

    LDS_t = Spearman over m of (predicted_t(m), L_t(m))

reported as the mean over the test images and over the misclassified ones (by the base model: the demo
CNN trained on all ``n`` images, seed 0). The *noise ceiling* is the Spearman over ``m`` between the
losses of two seeds (mean over the test images and seed pairs): how well one retraining predicts
another. (The LDS compares with the MEAN over the seeds, which is less noisy than one seed, so a solver
can in principle pass the ceiling.)

Scores come from the real ``calculate.py`` job (:func:`influence.engine.calculate`) on the demo's
archives with the base model, timed from scratch (no curvature cache). Two baselines:

* gradient dot product ``g_tᵀ g_i`` (identity curvature, no damping, no solve), computed with the
  engine's own :class:`~influence.model.derivatives.Derivatives` and :class:`~influence.scoring.Scorer` — the
  same pass over the training set that scores ``(H + λI)⁻¹ g_t``, with ``g_t`` itself;
* random scores (seeded standard normal): LDS ≈ 0 up to noise.

The *right-sign rate*: for each test image's top-5 harmful (most negative score) training images, how
often the mean actual loss over the subsets WITHOUT the image is lower than over the subsets WITH it
(removing a harmful image should lower the loss), and for the top-5 useful ones how often it is higher.

Everything expensive is cached under ``--lds-cache`` (default ``lds_cache/``): the demo folders and
archives, the base model, and ``retrain.npz`` with the masks, the seeds, the recipe, the test-set keys
and the per-run test losses, written atomically after every run (an interrupted run resumes, a finished
one is reused; asking for more subsets or seeds later trains only the new runs: the masks are
prefix-stable). Re-scoring every solver then takes seconds to minutes.

The parts: :mod:`~influence.calibration.lds_metrics` (the pure numbers),
:mod:`~influence.experiments.lds_models` (archives, base models, recipes, one retraining),
:mod:`~influence.experiments.lds_retrain` (the cache); this module scores the solvers and reports.
"""
import dataclasses
import itertools
import json
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np


log = logging.getLogger(__name__)

#: (name shown, calculate.py options) of the solvers compared; damping, hessian etc. are calculate.py's
#: defaults (damping auto, hessian ggn) unless given; cg is capped at 50 iterations (the LDS does not move
#: past a residual of about 1e-2 on the demo CNN: docs/DESIGN.md "Damping and the matrix"), the old defaults kept as rows
SOLVERS = (
    ("auto (default)", []),
    ("krylov, rank 50", ["--solver", "krylov", "--rank", "50"]),
    ("krylov, rank 100", ["--solver", "krylov", "--rank", "100"]),
    ("krylov, rank 200", ["--solver", "krylov", "--rank", "200"]),
    ("dpcg", ["--solver", "dpcg"]),
    ("ekfac", ["--solver", "ekfac"]),
    ("ekfac sampled Fisher", ["--solver", "ekfac", "--fisher", "sampled"]),
    ("ekfac sampled Fisher, λ 0.01", ["--solver", "ekfac", "--fisher", "sampled", "--damping", "0.01"]),
    ("cg", ["--solver", "cg", "--cg-maxiter", "50"]),
    ("cg full Hessian", ["--solver", "cg", "--hessian", "full", "--damping", "0.01", "--cg-maxiter", "50"]),
    ("lissa", ["--solver", "lissa", "-i", "300", "-b", "32"]),
)
#: ``--lds-solvers grid`` (issue 30's table): the default, then krylov and ekfac over a damping grid (calculate.py's
#: ``--damping`` in its relative form, ``f x`` = f × the curvature's mean eigenvalue: influence/curvature/damping.py)
GRID_KRYLOV = ("0.1x", "1x", "3x", "10x", "30x", "optimizer")
GRID_EKFAC = ("0.1x", "1x", "optimizer")
GRID = ((("auto (default)", []),)
        + tuple((f"krylov, λ {d}", ["--solver", "krylov", "--damping", d]) for d in GRID_KRYLOV)
        + tuple((f"ekfac, λ {d}", ["--solver", "ekfac", "--damping", d]) for d in GRID_EKFAC))
#: ``--lds-solvers store`` (issue 31): the gradient store at two dimensions, each over a damping grid (its structure
#: ``auto``) and each structure (``--store-curvature``) at damping ``optimizer``
STORE_DIMS = (1024, 4096)
STORE_DAMPING = ("0.1x", "1x", "10x", "optimizer")
STORE_STRUCTURES = ("blocks", "dense")
STORE = tuple(row for dim in STORE_DIMS for row in          # each dimension's rows together: one fit each
              [(f"store, D {dim}, λ {d}", ["--solver", "store", "--store-dim", str(dim), "--damping", d])
               for d in STORE_DAMPING]
              + [(f"store, D {dim}, {structure}, λ optimizer",
                  ["--solver", "store", "--store-dim", str(dim), "--store-curvature", structure,
                   "--damping", "optimizer"])
                 for structure in STORE_STRUCTURES])
#: ``--lds-solvers``: the named sets of solver rows; ``panel`` (the default) is :data:`SOLVERS`
SOLVER_SETS = {"panel": SOLVERS, "grid": GRID, "store": STORE}
#: the sets whose rows share one curvature cache (calculate.py's ``--cache``): the damping is applied after the
#: cache, so each (solver, fit settings) is fitted once, by its first row, and every other damping loads it
SHARED_CACHE_SETS = ("grid", "store")
SHARED_CACHE_NOTE = "(curvature from the shared cache)"
GRAD_DOT, RANDOM = "gradient dot product", "random"
from influence.calibration.lds_metrics import (TOP, lds, nanmean, noise_ceiling,  # noqa: F401  (the panel's API)
                                               predicted_changes, right_sign_rate, subset_masks)
from influence.experiments.lds_models import (BASE_SEED, BN_RECIPE, MODELS, QUICK_RECIPE, RECIPE,  # noqa: F401
                                              DemoData, build_bn_model, prepare_demo, prepare_model, test_items,
                                              test_losses, train_and_evaluate, train_model)
from influence.experiments.lds_retrain import RETRAIN_FILE, load_cache, retrain, save_cache  # noqa: F401


# ----------------------------------------------------------------------------- scoring

def calculate_settings(data, out, options, folders, model=None):
    """Settings of ``calculate.py --data DATA --model MODEL --preprocess unit OPTIONS`` (the demo's line;
    ``model`` defaults to ``DATA/model.keras``)."""
    from influence.calculate_cli import build_parser
    from influence.settings import Settings

    model = Path(data) / "model.keras" if model is None else model
    argv = ["--data", str(data), "--model", str(model), "--preprocess", "unit",
            "-sf", "png", "--out", str(out), "--folders", *folders, "--overwrite", *options]
    return Settings.from_args(build_parser().parse_args(argv))


#: calculate.py's timings (run.json) that make the scores; the rest is loading and writing the output files
COMPUTE_TIMINGS = ("curvature_s", "test_gradients_s", "inverse_hvp_s", "scoring_s")


def score_with_calculate(data, out, options, folders, keys, model=None):
    """Run the calculate job from scratch (``out`` removed first: no curvature cache).

    Returns ``(scores (T, N), seconds of the whole job, seconds of the computing phases)``: the latter is
    the sum of run.json's ``COMPUTE_TIMINGS`` (curvature fit, test gradients, inverse-HVPs, scoring pass),
    without loading the model and writing the figures and CSVs.

    ``keys``: ``"<folder>/<label>/<n>"`` of the rows wanted, read from ``out/<folder>/<label>/<n>_scores.npy``.
    """
    from influence.engine import calculate

    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    settings = calculate_settings(data, out, options, folders, model)
    start = time.perf_counter()
    code = calculate(settings)
    seconds = time.perf_counter() - start
    if code:
        raise RuntimeError(f"calculate {' '.join(options)} exited with {code}")
    rows = []
    for key in keys:
        folder, label, n = key.split("/")
        rows.append(np.load(out / folder / label / f"{n}_scores.npy"))
    timings = json.loads((out / "run.json").read_text()).get("timings", {})
    compute = sum(float(timings.get(k, 0.0)) for k in COMPUTE_TIMINGS)
    return np.stack(rows).astype(np.float64), seconds, compute


def score_raising_damping(data, out, options, folders, keys, tries=3, model=None):
    """:func:`score_with_calculate`; when the solver meets negative curvature (cg on the demo CNN, which is not
    at a minimum, at calculate.py's default λ = 0.01), retry with ``--damping`` ×10, at most ``tries`` times.

    Returns ``(scores, seconds, compute seconds of the run that worked, its options + a note of the failed λ)``;
    scores None and nan seconds when every try failed (the table shows the row as failed).
    """
    from influence.settings import Settings
    from influence.errors import UserError

    from influence.curvature.damping import Damping, parse_damping

    options, failed = list(options), []
    damping = parse_damping(options[options.index("--damping") + 1] if "--damping" in options else Settings().damping)
    for attempt in range(tries + 1):
        log.info("lds: scoring with calculate %s", " ".join(options))
        try:
            scores, seconds, compute = score_with_calculate(data, out, options, folders, keys, model)
            if failed:
                options = options + [f"(λ = {', '.join(failed)}: negative curvature)"]
            return scores, seconds, compute, options
        except UserError as exc:
            if "negative curvature" not in str(exc):
                raise
            failed.append(str(damping))
            if attempt == tries:
                log.warning("lds: %s; giving up on %s", exc, " ".join(options))
                return None, math.nan, math.nan, options + [f"(FAILED at λ = {', '.join(failed)}: {exc})"]
            if "--damping" in options:
                at = options.index("--damping") + 1
                damping = parse_damping(options[at])
                del options[at - 1:at + 1]
            damping = Damping(damping.value * 10, damping.relative)
            log.warning("lds: %s; retrying with --damping %s", exc, damping)
            options += ["--damping", str(damping)]


def gradient_dot_scores(data, idx, chunk=256):
    """``g_tᵀ g_i`` for the test images ``idx`` and every training image (archive order) -> (scores (T, N), seconds).

    The engine's Derivatives and Scorer, with the test gradients as the vectors (identity curvature).
    """
    from influence.model.derivatives import Derivatives
    from influence.model.models import load_classifier
    from influence.scoring import Scorer

    start = time.perf_counter()
    clf = load_classifier(str(data.model_path), preprocess="unit")
    derivs = Derivatives(clf, data.x_train.shape[1:])
    x_t, y_t = data.x_test[idx], data.y_test[idx]
    grads = [derivs.gradient(x_t[k:k + 1], y_t[k:k + 1]) for k in range(len(idx))]
    scorer = Scorer(derivs)
    parts = [scorer.shares_for(data.x_train[s:s + chunk], data.y_train[s:s + chunk], grads).sum(axis=-1)
             for s in range(0, len(data.y_train), chunk)]
    return np.concatenate(parts, axis=1).astype(np.float64), time.perf_counter() - start


def curvature_loaded(out):
    """Whether the calculate job in ``out`` loaded its curvature from the cache (run.json ``curvature.loaded``)."""
    try:
        record = json.loads((Path(out) / "run.json").read_text())
    except (OSError, ValueError):
        return False
    return bool((record.get("curvature") or {}).get("loaded"))


def resolved(out):
    """What the calculate job in ``out`` resolved (run.json ``solver_info``): ``"λ = 1.86e-04, rank 200"``, the
    rank only for a low-rank solver; "" when run.json does not say."""
    try:
        info = json.loads((Path(out) / "run.json").read_text()).get("solver_info") or {}
    except (OSError, ValueError):
        return ""
    parts = []
    if str(info.get("damping_rule", "")).startswith("optimizer"):      # a factor of D, not a λ
        from influence.settings import parse_damping

        parts.append(f"λ = {parse_damping(info['damping_rule']).value:g} × D per parameter")
    elif isinstance(info.get("damping"), (int, float)):
        parts.append(f"λ = {info['damping']:.3g}")
    if isinstance(info.get("rank"), int):
        parts.append(f"rank {info['rank']}")
    return ", ".join(parts)


def without_cache(options):
    """``options`` without a ``--cache DIR`` pair (the table shows the solver's options, not the folder)."""
    options = list(options)
    if "--cache" in options:
        at = options.index("--cache")
        del options[at:at + 2]
    return options


#: dampings of the dense Gauss-Newton reference rows
DENSE_DAMPINGS = (1e-4, 1e-3, 1e-2)
DENSE = "dense GGN (reference)"


def dense_rows(data, idx, masks, actual, wrong, dampings=DENSE_DAMPINGS):
    """Rows of the dense float64 Gauss-Newton reference (:mod:`influence.experiments.dense_reference`):
    ``g_tᵀ (G + Ω'' + λI)⁻¹ g_i`` with the whole matrix, one eigendecomposition, one row per λ -- what the
    curvature could give, the yardstick of the solvers. None (a log line) above its parameter limit."""
    from influence.errors import UserError
    from influence.experiments import dense_reference
    from influence.model.models import load_classifier

    start = time.perf_counter()
    clf = load_classifier(str(data.model_path), preprocess="unit")
    try:
        G, g_train = dense_reference.dense_ggn(clf, data.x_train, data.y_train)
    except UserError as exc:
        log.info("lds: no dense reference row: %s", exc)
        return []
    g_test = dense_reference.loss_gradients(clf, data.x_test[idx], data.y_test[idx])
    by_damping = dense_reference.reference_scores(G, g_test, g_train, dampings)
    seconds = time.perf_counter() - start
    log.info("lds: dense GGN reference (%d parameters) in %.0f s", len(G), seconds)
    return [evaluate(DENSE, f"λ = {lam:g} (float64, eigendecomposition of the {len(G)}² matrix)", scores, masks,
                     actual, wrong, seconds) for lam, scores in by_damping.items()]


# ----------------------------------------------------------------------------- the panel

@dataclasses.dataclass
class LdsRow:
    name: str
    options: str
    lds: np.ndarray          # (T,)
    lds_mean: float
    lds_wrong: float         # mean over the misclassified test images
    harmful_right: float
    useful_right: float
    seconds: float           # the whole calculate job (with writing its output files)
    compute: float           # curvature + test gradients + inverse-HVPs + scoring pass


@dataclasses.dataclass
class LdsResult:
    """What ``--panels lds`` reports; ``ok`` is always True (reported, not promised)."""

    name: str
    rows: list
    ceiling: float
    ceiling_wrong: float
    subsets: int
    seeds: list
    n: int
    test_keys: list
    wrong: int
    retrain_seconds: float
    trained: int
    model: str = "demo"
    recipe: dict = None
    markdown: str = ""
    figures: list = dataclasses.field(default_factory=list)
    ok: bool = True


def evaluate(name, options, scores, masks, actual, wrong, seconds, compute=None):
    """One table row from scores (T, N), masks (M, N), seed-mean actual losses (M, T), misclassified (T,) bool."""
    per_test = lds(predicted_changes(scores, masks), actual)
    harmful, useful = right_sign_rate(scores, masks, actual)
    return LdsRow(name, options, per_test, nanmean(per_test), nanmean(per_test[wrong]) if wrong.any() else math.nan,
                  harmful, useful, seconds, seconds if compute is None else compute)


def markdown(result):
    """The table of :class:`LdsResult` as markdown."""
    wrong = f"LDS misclassified ({result.wrong})"
    lines = [f"| solver | calculate.py options | LDS all ({len(result.test_keys)}) | {wrong} | "
             f"right sign, top-{TOP} harmful | right sign, top-{TOP} useful | seconds computing | seconds, whole job |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    f = (lambda v: "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}")
    sec = (lambda v: "–" if math.isnan(v) else f"{v:.1f}")
    for r in result.rows:
        lines.append(f"| {r.name} | {r.options} | {f(r.lds_mean)} | {f(r.lds_wrong)} | {f(r.harmful_right)} | "
                     f"{f(r.useful_right)} | {sec(r.compute)} | {sec(r.seconds)} |")
    lines.append(f"| noise ceiling (seed vs seed) | | {f(result.ceiling)} | {f(result.ceiling_wrong)} | | | | |")
    lines.append("")
    model = "the demo CNN" if result.model == "demo" else f"panel model {result.model!r}"
    lines.append(f"{model}; {result.subsets} random half-subsets of the n = {result.n} training digits × {len(result.seeds)} "
                 f"seeds ({', '.join(map(str, result.seeds))}); test images: {len(result.test_keys)} "
                 f"({result.wrong} misclassified by the base model); {result.trained} retraining runs done in this "
                 f"call ({result.retrain_seconds:.0f} s), the rest from the cache.")
    if result.recipe:
        from influence.experiments.lds_models import recipe_steps

        r = result.recipe
        lines.append(f"Recipe: {r.get('model', 'demo_cnn')}, {r['epochs']} epochs, batch {r['batch_size']}, "
                     f"{r['optimizer']}: {recipe_steps(r)} optimizer steps on all {r['n_train']} images (the base "
                     f"model), {recipe_steps(r, r['n_train'] // 2)} on each half-subset.")
    if any(SHARED_CACHE_NOTE in r.options for r in result.rows):
        lines.append(f"Rows marked {SHARED_CACHE_NOTE} loaded the curvature the first row of their solver fitted "
                     f"(the damping is applied after the cache): their seconds leave out the fit.")
    return "\n".join(lines)


def to_json(result):
    """:class:`LdsResult` as plain JSON types (nan -> None)."""
    def clean(v):
        if isinstance(v, np.ndarray):
            return [clean(x) for x in v.tolist()]
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return v

    out = {k: clean(v) for k, v in dataclasses.asdict(result).items() if k not in ("rows", "markdown")}
    out["rows"] = [{k: clean(v) for k, v in dataclasses.asdict(r).items()} for r in result.rows]
    return out


#: (colour, marker) of the solver rows, in order: none repeats within 12 rows
STYLES = (("#c0392b", "o"), ("#e67e22", "s"), ("#d35400", "D"), ("#a04000", "^"), ("#8e44ad", "v"),
          ("#16a085", "P"), ("#27ae60", "X"), ("#82e0aa", "h"), ("#1f4e79", "D"), ("#5dade2", "<"),
          ("#7d3c98", ">"), ("#b7950b", "p"))


def plot(result, path):
    """LDS (y) against seconds (x, log), one labelled point per solver (the krylov ranks joined by a line: LDS
    against rank and time), the dense reference as stars, the noise ceiling as a line; the legend beside."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.6, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    styles = itertools.cycle(STYLES)
    ranks = sorted((r.compute, r.lds_mean) for r in result.rows
                   if r.name.startswith("krylov, rank") and math.isfinite(r.lds_mean))
    if len(ranks) > 1:
        ax.plot(*zip(*ranks), color="#e67e22", lw=1, alpha=0.6, zorder=1)
    for r in result.rows:
        if not math.isfinite(r.lds_mean):      # a solver that failed has no point
            continue
        x = max(r.compute, 0.01)
        colour, marker = ("0.45", "X") if r.name == RANDOM else ("0.45", "o") if r.name == GRAD_DOT else \
            ("black", "*") if r.name == DENSE else next(styles)
        name = f"{r.name}, {r.options.split(' (')[0]}" if r.name == DENSE else r.name
        ax.plot([x], [r.lds_mean], marker, color=colour, ms=9 if r.name == DENSE else 8, ls="none", zorder=2,
                label=f"{name}: {r.lds_mean:.3f} in {r.compute:.1f} s")
    xs = [max(r.compute, 0.01) for r in result.rows if math.isfinite(r.compute)] or [1.0]
    ax.set_xlim(min(xs) / 2, max(xs) * 3)
    ax.axhline(result.ceiling, color="#1f4e79", ls="--", lw=1.2, label=f"noise ceiling (seed vs seed) {result.ceiling:.3f}")
    ax.axhline(0.0, color="0.7", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("seconds computing, from scratch (curvature fit + solves + scoring pass)\n"
                  "random scores drawn at 0.01 s")
    ax.set_ylabel(f"LDS (mean over {len(result.test_keys)} test images)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="LDS (mean) in seconds computing",
              title_fontsize=8, frameon=False)
    ax.set_title(f"linear datamodeling score ({result.model}): {result.subsets} half-subsets × {len(result.seeds)} "
                 f"seeds, n = {result.n}", fontsize=9)
    fig.savefig(path, dpi=130)


def score_rows(data, folder, solvers, folders, keys, masks, actual, wrong, share=False):
    """One :class:`LdsRow` per ``(name, calculate.py options)`` of ``solvers``, each job in
    ``folder/scores/<name>``. ``share``: every job gets ``--cache folder/scores/_curvature`` (emptied first, so
    the first row of each solver fits from scratch); a row that loaded its curvature from it says so
    (:data:`SHARED_CACHE_NOTE`), and its seconds leave out the fit."""
    rows = []
    shared = Path(folder) / "scores" / "_curvature"
    if share and shared.exists():
        shutil.rmtree(shared)
    for name, options in solvers:
        job = Path(folder) / "scores" / name.replace(" ", "_")
        extra = ["--cache", str(shared)] if share else []
        scores, seconds, compute, options = score_raising_damping(
            data.root, job, list(options) + extra, list(folders), keys, model=data.model_path)
        options = without_cache(options)
        if share and scores is not None:
            if resolved(job):
                options.append(f"({resolved(job)})")
            if curvature_loaded(job):
                options.append(SHARED_CACHE_NOTE)
        if scores is None:
            rows.append(LdsRow(name, " ".join(options), np.full(len(keys), np.nan), math.nan, math.nan, math.nan,
                               math.nan, seconds, compute))
            continue
        rows.append(evaluate(name, " ".join(options), scores, masks, actual, wrong, seconds, compute))
        log.info("lds: %s: LDS %.3f in %.1f s", name, rows[-1].lds_mean, seconds)
    return rows


def run(cache="lds_cache", out=".", subsets=64, seeds=2, folders=("orig",), quick=False, mask_seed=0,
        solvers=SOLVERS, model="demo", dense=True):
    """The whole panel (module docstring) for panel model ``model`` (:data:`MODELS`): retrain (cached),
    score every solver, write ``out/lds.md``, ``lds.png`` and ``lds.json`` (``lds_<model>.*`` for a model
    other than the demo CNN). Returns :class:`LdsResult`.

    ``solvers``: ``(name, calculate.py options)`` rows, or the name of a set in :data:`SOLVER_SETS`; the rows of
    a set in :data:`SHARED_CACHE_SETS` share one curvature cache (``--cache``, emptied first, so each solver's
    first row fits from scratch and the others load its fit).
    """
    from influence.errors import SettingError, UserError

    share = False
    if isinstance(solvers, str):
        if solvers not in SOLVER_SETS:
            raise SettingError("lds_solvers", f"must be one of {', '.join(SOLVER_SETS)}, got {solvers!r}")
        share = solvers in SHARED_CACHE_SETS
        solvers = SOLVER_SETS[solvers]
    if subsets < 3:
        raise SettingError("lds_subsets", f"must be >= 3, got {subsets}")
    if seeds < 2:
        raise SettingError("lds_seeds", f"must be >= 2 (the noise ceiling compares seeds), got {seeds}")
    data, recipe, folder = prepare_model(cache, model, quick)
    import keras

    base = keras.models.load_model(data.model_path)
    base_losses, base_preds = test_losses(base, data.x_test, data.y_test)
    del base
    retrained = retrain(folder / RETRAIN_FILE, data.x_train, data.y_train, data.x_test, data.y_test,
                        subsets=subsets, seeds=list(range(seeds)), recipe=recipe, train_ids=data.train_ids,
                        test_keys=data.test_keys, base_losses=base_losses, base_preds=base_preds,
                        mask_seed=mask_seed)
    idx = np.array([k for k, key in enumerate(data.test_keys) if key.split("/")[0] in folders])
    if not len(idx):
        raise SettingError("lds_folders", f"none of {', '.join(folders)} in the demo's test folders")
    keys = data.test_keys[idx]
    masks = retrained["masks"]
    by_seed = retrained["losses"][:, :, idx]
    actual = by_seed.mean(axis=0)
    wrong = base_preds[idx] != data.y_test[idx]
    rows = score_rows(data, folder, solvers, list(folders), keys, masks, actual, wrong, share)
    if dense:
        rows.extend(dense_rows(data, idx, masks, actual, wrong))
    scores, seconds = gradient_dot_scores(data, idx)
    rows.append(evaluate(GRAD_DOT, "g_tᵀ g_i (Derivatives + Scorer)", scores, masks, actual, wrong, seconds))
    start = time.perf_counter()
    scores = np.random.default_rng(mask_seed).standard_normal((len(idx), len(data.y_train)))
    rows.append(evaluate(RANDOM, "standard normal", scores, masks, actual, wrong, time.perf_counter() - start))
    ceiling = noise_ceiling(by_seed)
    result = LdsResult("lds", rows, nanmean(ceiling), nanmean(ceiling[wrong]) if wrong.any() else math.nan,
                       subsets, list(range(seeds)), len(data.y_train), keys.tolist(), int(wrong.sum()),
                       retrained["seconds"], retrained["trained"], model=model, recipe=recipe)
    result.markdown = markdown(result)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from influence.io import atomic_write

    stem = "lds" if model == "demo" else f"lds_{model}"
    with atomic_write(out / f"{stem}.md") as tmp:
        tmp.write_text(result.markdown + "\n")
    with atomic_write(out / f"{stem}.png") as tmp:
        plot(result, tmp)
    with atomic_write(out / f"{stem}.json") as tmp:     # the numbers behind the table, per test image too
        tmp.write_text(json.dumps(to_json(result), indent=1))
    result.figures = [str(out / f"{stem}.{ext}") for ext in ("png", "md", "json")]
    return result


def run_from_args(args):
    """``--panels lds`` of :mod:`influence.validate`: its ``--lds-*`` options, ``--quick`` and ``--out``'s folder."""
    quick = args.quick
    subsets = args.lds_subsets if args.lds_subsets is not None else (6 if quick else 64)
    cache = args.lds_cache or ("lds_cache/quick" if quick else "lds_cache")
    folders = [f.strip() for f in args.lds_folders.split(",") if f.strip()]
    result = run(cache=cache, out=Path(args.out).parent, subsets=subsets, seeds=args.lds_seeds, folders=folders,
                 quick=quick, mask_seed=args.seed, model=getattr(args, "lds_model", "demo"),
                 dense=not getattr(args, "no_lds_dense", False), solvers=getattr(args, "lds_solvers", "panel"))
    print(result.markdown)
    return result
