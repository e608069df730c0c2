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
  engine's own :class:`~influence.model.hvp.Derivatives` and :class:`~influence.scoring.Scorer` — the
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

from influence.experiments.stats import spearman

log = logging.getLogger(__name__)

#: (name shown, calculate.py options) of the solvers compared; damping, hessian etc. are calculate.py's
#: defaults (damping auto, hessian ggn) unless given; cg is capped at 50 iterations (the LDS does not move
#: past a residual of about 1e-2 on the demo CNN: docs/DESIGN.md "Damping"), the old defaults kept as rows
SOLVERS = (
    ("ekfac", ["--solver", "ekfac"]),
    ("ekfac, λ 0.01", ["--solver", "ekfac", "--damping", "0.01"]),
    ("ekfac true Fisher", ["--solver", "ekfac", "--fisher", "true"]),
    ("cg", ["--solver", "cg", "--cg-maxiter", "50"]),
    ("cg full Hessian", ["--solver", "cg", "--hessian", "full", "--damping", "0.01", "--cg-maxiter", "50"]),
    ("lissa", ["--solver", "lissa", "-i", "300", "-b", "32"]),
)
GRAD_DOT, RANDOM = "gradient dot product", "random"
TOP = 5
RETRAIN_FILE = "retrain.npz"
#: the seed of the base models (the demo's)
BASE_SEED = 0
#: the demo recipe (influence.demo.train_model), recorded with the runs
RECIPE = {"epochs": 30, "batch_size": 32, "optimizer": "Adam(3e-3)", "n_train": 1500, "size": 32}
QUICK_RECIPE = {"epochs": 8, "batch_size": 32, "optimizer": "Adam(3e-3)", "n_train": 500, "size": 32}
#: the second model (:func:`build_bn_model`): BatchNorm, max-pooling, a final softmax, 8 epochs -- less
#: confident than the demo CNN, so its curvature is not hidden under the damping (issue 17)
BN_RECIPE = {"model": "bn_cnn", "epochs": 8, "batch_size": 32, "optimizer": "Adam(3e-3)", "n_train": 1500,
             "size": 32}
#: ``--lds-model``: the panel's models; the demo archives serve both, each model has its own cache folder
MODELS = {"demo": RECIPE, "bn": BN_RECIPE}


# ----------------------------------------------------------------------------- pure functions

def subset_masks(n, count, seed=0):
    """bool ``(count, n)``: row ``m`` keeps ``n // 2`` of the ``n`` training images, drawn without replacement.

    Row ``m`` depends only on ``(n, seed, m)``, so ``subset_masks(n, k, s)`` is the first ``k`` rows of
    ``subset_masks(n, K, s)`` for any ``K >= k`` (a cache can grow).
    """
    masks = np.zeros((count, n), dtype=bool)
    for m in range(count):
        keep = np.random.default_rng([int(seed), m]).permutation(n)[: n // 2]
        masks[m, keep] = True
    return masks


def predicted_changes(scores, masks):
    """Predicted change of each test loss per subset: float64 ``(count, T)``.

    ``scores``: ``(T, N)``, ``score(i, t) ≈ N × (change of t's loss when i is removed)``;
    ``masks``: bool ``(count, N)``, True = kept. Entry ``[m, t] = Σ_{i ∉ S_m} scores[t, i] / N``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    removed = ~np.asarray(masks, dtype=bool)
    return removed.astype(np.float64) @ scores.T / scores.shape[1]


def lds(predicted, actual):
    """Per-test-image Spearman over the subsets: ``(T,)`` from ``predicted``, ``actual`` both ``(count, T)``.

    nan for a test image whose predicted or actual values are all equal.
    """
    predicted, actual = np.asarray(predicted), np.asarray(actual)
    if predicted.shape != actual.shape or predicted.ndim != 2:
        raise ValueError(f"predicted {predicted.shape} and actual {actual.shape} must both be (count, T)")
    return np.array([spearman(predicted[:, t], actual[:, t]) for t in range(actual.shape[1])])


def noise_ceiling(actual_by_seed):
    """Seed-to-seed Spearman over the subsets, ``(T,)``: mean over the seed pairs, per test image.

    ``actual_by_seed``: ``(S, count, T)`` test losses of each seed's retrained models, ``S >= 2``.
    """
    a = np.asarray(actual_by_seed, dtype=np.float64)
    if a.ndim != 3 or a.shape[0] < 2:
        raise ValueError(f"actual_by_seed must be (S >= 2, count, T), got {a.shape}")
    pairs = [lds(a[i], a[j]) for i, j in itertools.combinations(range(a.shape[0]), 2)]
    return np.mean(pairs, axis=0)


def right_sign_rate(scores, masks, actual, top=TOP):
    """How often the top-``top`` lists move the actual loss the predicted way: ``(harmful, useful)`` fractions.

    ``scores (T, N)``, ``masks`` bool ``(count, N)``, ``actual (count, T)``. For each test image ``t``:
    its ``top`` most negative-scored (harmful) images ``i`` count as right when the mean of
    ``actual[:, t]`` over the subsets without ``i`` is LOWER than over the subsets with ``i``; its
    ``top`` most positive (useful) ones when it is HIGHER. Images in all or no subsets are skipped.
    """
    scores, masks, actual = np.asarray(scores), np.asarray(masks, dtype=bool), np.asarray(actual, dtype=np.float64)
    right = {"harmful": [], "useful": []}
    for t in range(scores.shape[0]):
        order = np.argsort(scores[t], kind="mergesort")
        for kind, chosen in (("harmful", order[:top]), ("useful", order[::-1][:top])):
            for i in chosen:
                kept = masks[:, i]
                if kept.all() or not kept.any():
                    continue
                diff = actual[~kept, t].mean() - actual[kept, t].mean()   # removing i changes the loss by
                right[kind].append(diff < 0 if kind == "harmful" else diff > 0)
    return tuple(float(np.mean(right[k])) if right[k] else float("nan") for k in ("harmful", "useful"))


def nanmean(values):
    """Mean of the finite values (nan when none)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else float("nan")


# ----------------------------------------------------------------------------- data and base model

@dataclasses.dataclass
class DemoData:
    """The demo's archives, in the engine's order.

    ``x_train`` uint8 (N, 32, 32, 3) and ``y_train`` (N,) in ARCHIVE order (the order of the scores);
    ``train_ids`` (N,) the bundled digit ids; ``x_test``, ``y_test`` (T,) every image of every test
    folder, ``test_keys`` (T,) ``"<folder>/<label>/<n>"`` as calculate.py names its outputs.
    """

    root: Path
    x_train: np.ndarray
    y_train: np.ndarray
    train_ids: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    test_keys: np.ndarray
    model_file: Path = None     # the base model; default ``root/model.keras`` (the demo CNN)

    @property
    def model_path(self):
        return Path(self.model_file) if self.model_file is not None else self.root / "model.keras"


def test_items(test, folders):
    """The engine's test items of ``folders`` (folder, label, number order) -> list of TestItem."""
    from influence.engine import Settings, list_test_items

    items, _ = list_test_items(test, folders, Settings(out=str(Path("/nonexistent-lds"))))
    return items


def prepare_demo(root, recipe):
    """Demo folders, archives (prepare_data.py in-process, demo arguments) and base model under ``root``.

    Each step is skipped when its output exists. Returns :class:`DemoData`.
    """
    from influence.experiments import demo
    from influence.data.archives import TestArchive, TrainArchive
    from influence.data.prepare import prepare_data
    from influence.prepare_cli import build_prepare_data_parser

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    have_archives = (root / "train.npz").is_file() and (root / "test.npz").is_file()
    if not have_archives or not (root / "model.keras").is_file():
        log.info("lds: writing the demo folders (%d training digits) under %s", recipe["n_train"], root)
        data = demo.write_folders(root, n_train=recipe["n_train"])
        if not have_archives:
            argv = [a.replace("{root}", str(root)) for a in demo.COMMANDS[0][1:]] + ["--workers", "1"]
            log.info("lds: prepare_data.py %s", " ".join(argv))
            prepare_data(build_prepare_data_parser().parse_args(argv))
        if not (root / "model.keras").is_file():
            model, seconds = demo.train_model(*data["train"][:2], epochs=recipe["epochs"], seed=BASE_SEED)
            log.info("lds: base model (all %d images, seed %d) trained in %.1f s", recipe["n_train"], BASE_SEED,
                     seconds)
            model.save(root / "model.keras")
    with TrainArchive(root / "train.npz") as train:
        x_train, y_train = train.take(np.arange(len(train)))
        files = train.files()
    train_ids = np.array([int(Path(f).stem) for f in files], dtype=np.int64)
    xs, ys, keys = [], [], []
    with TestArchive(root / "test.npz") as test:
        folders = list(test.folders)
        arrays = {f: test.read(f) for f in folders}
        for it in test_items(test, folders):
            x, y, _ = arrays[it.folder]
            xs.append(x[it.index])
            ys.append(y[it.index])
            keys.append(f"{it.folder}/{it.label}/{it.n}")
    return DemoData(root, np.asarray(x_train), np.asarray(y_train, dtype=np.int64), train_ids, np.stack(xs),
                    np.asarray(ys, dtype=np.int64), np.asarray(keys))


def prepare_model(cache, name, quick=False):
    """:class:`DemoData` for panel model ``name`` (:data:`MODELS`) under the folder ``cache``.

    ``demo``: :func:`prepare_demo` in ``cache/demo``. Any other model reads the same archives and
    keeps its base model (trained on all images with seed 0) in ``cache/<name>/model.keras``.
    ``quick``: the demo's :data:`QUICK_RECIPE` archives (500 images). Returns ``(data, recipe,
    folder of its retraining cache and scores)``.
    """
    from influence.errors import SettingError

    if name not in MODELS:
        raise SettingError("lds_model", f"must be one of {', '.join(MODELS)}, got {name!r}")
    cache = Path(cache)
    demo_recipe = QUICK_RECIPE if quick else RECIPE
    data = prepare_demo(cache / "demo", demo_recipe)
    if name == "demo":
        return data, demo_recipe, cache
    recipe, folder = dict(MODELS[name], n_train=demo_recipe["n_train"]), cache / name
    folder.mkdir(parents=True, exist_ok=True)
    data.model_file = folder / "model.keras"
    if not data.model_file.is_file():
        from influence.io import atomic_write

        start = time.perf_counter()
        model = train_model(data.x_train, data.y_train, recipe, BASE_SEED)
        log.info("lds: base model %s (all %d images, seed %d) trained in %.1f s", name, len(data.y_train),
                 BASE_SEED, time.perf_counter() - start)
        with atomic_write(data.model_file) as tmp:
            model.save(tmp)
    return data, recipe, folder


def build_bn_model(seed):
    """The panel's second CNN: float (None, 32, 32, 3) in [0, 1] -> softmax probabilities (None, 10).

    Conv(8, no bias) -> BatchNorm -> ReLU -> MaxPool, Conv(16, no bias) -> BatchNorm -> ReLU -> MaxPool,
    Dense(10) -> Softmax; L2 1e-4 on the kernels. calculate.py strips the softmax in memory.
    """
    import keras

    from influence.data import digits

    keras.utils.set_random_seed(seed)
    l2 = keras.regularizers.L2(1e-4)
    layers = keras.layers
    return keras.Sequential([
        keras.Input((32, 32, 3)),
        layers.Conv2D(8, 3, use_bias=False, kernel_regularizer=l2, name="conv1"),
        layers.BatchNormalization(name="bn1"), layers.ReLU(), layers.MaxPooling2D(2),
        layers.Conv2D(16, 3, use_bias=False, kernel_regularizer=l2, name="conv2"),
        layers.BatchNormalization(name="bn2"), layers.ReLU(), layers.MaxPooling2D(2),
        layers.Flatten(),
        layers.Dense(digits.N_CLASSES, kernel_regularizer=l2, name="logits"),
        layers.Softmax(name="probs"),
    ], name="digits_bn_cnn")


def train_model(x, y, recipe, seed):
    """One model of ``recipe`` trained on uint8 images ``x`` (N, 32, 32, 3) and labels ``y`` (N,) -> Keras model."""
    import keras

    from influence.experiments import demo

    if recipe.get("model", "demo_cnn") == "demo_cnn":
        return demo.train_model(x, y, epochs=recipe["epochs"], seed=seed)[0]
    model = build_bn_model(seed)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss=keras.losses.SparseCategoricalCrossentropy())
    model.fit(x.astype(np.float32) / 255.0, np.asarray(y), batch_size=recipe["batch_size"],
              epochs=recipe["epochs"], shuffle=True, verbose=0)
    return model


def test_losses(model, x, y):
    """Cross-entropy in float64 from the model's logits: ``(losses (T,), predictions (T,))``."""
    out = model(x.astype(np.float32) / 255.0, training=False)
    if model.layers and type(model.layers[-1]).__name__ == "Softmax":      # probabilities: back to logits
        out = np.log(np.maximum(np.asarray(out, dtype=np.float64), np.finfo(np.float64).tiny))
    logits = np.asarray(out, dtype=np.float64)
    shift = logits.max(axis=1, keepdims=True)
    lse = shift[:, 0] + np.log(np.exp(logits - shift).sum(axis=1))
    return lse - logits[np.arange(len(y)), y], np.argmax(logits, axis=1)


def train_and_evaluate(x, y, x_test, y_test, recipe, seed):
    """One retraining with ``recipe`` (:func:`train_model`) -> test losses float64 (T,)."""
    import keras

    model = train_model(x, y, recipe, seed)
    losses, _ = test_losses(model, x_test, y_test)
    del model
    keras.backend.clear_session()
    return losses


# ----------------------------------------------------------------------------- retraining cache

def _meta(recipe, train_ids, test_keys, mask_seed):
    return json.dumps({"recipe": recipe, "mask_seed": int(mask_seed), "train_ids": [int(i) for i in train_ids],
                       "test_keys": [str(k) for k in test_keys]}, sort_keys=True)


def load_cache(path):
    """The retraining cache as a dict of arrays (``meta`` as a dict), or None when there is none."""
    path = Path(path)
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        out = {k: z[k] for k in z.files}
    out["meta"] = json.loads(str(out["meta"]))
    return out


def save_cache(path, masks, seeds, losses, done, meta, base_losses, base_preds):
    """Write the retraining cache atomically (``atomic_write``)."""
    from influence.outputs.report import atomic_write

    with atomic_write(path) as tmp:
        np.savez(tmp, masks=masks, seeds=np.asarray(seeds, dtype=np.int64), losses=losses, done=done,
                 meta=np.asarray(meta), base_losses=base_losses, base_preds=base_preds)


def retrain(cache_path, x_train, y_train, x_test, y_test, *, subsets, seeds, recipe, train_ids, test_keys,
            base_losses, base_preds, mask_seed=0):
    """Retrain on every (seed, subset) not in the cache yet, saving after each run; returns the cache dict.

    Masks over the ``N`` training images in archive order (:func:`subset_masks` with ``mask_seed``).
    The returned ``masks`` are ``(subsets, N)``, ``losses`` ``(len(seeds), subsets, T)`` (float64, the
    test losses of each retrained model), ``seeds`` as given. A cache with other recipe / images /
    test keys is refused (UserError); one with fewer subsets or seeds is extended, and runs already
    there beyond what is asked are kept in the file.
    """
    from influence.errors import UserError

    cache_path = Path(cache_path)
    n, t_count = len(y_train), len(y_test)
    meta = _meta(recipe, train_ids, test_keys, mask_seed)
    old = load_cache(cache_path)
    all_seeds = [int(s) for s in seeds]
    count = int(subsets)
    if old is not None:
        if json.dumps(old["meta"], sort_keys=True) != meta:
            raise UserError(f"{cache_path} holds retraining runs of another recipe, training set or test set: "
                            f"use another --lds-cache or delete it")
        all_seeds = [int(s) for s in old["seeds"]] + [s for s in all_seeds if s not in set(old["seeds"].tolist())]
        count = max(count, old["masks"].shape[0])
    masks = subset_masks(n, count, mask_seed)
    losses = np.full((len(all_seeds), count, t_count), np.nan)
    done = np.zeros((len(all_seeds), count), dtype=bool)
    if old is not None:
        m_old = old["masks"].shape[0]
        if not np.array_equal(old["masks"], masks[:m_old]):
            raise UserError(f"{cache_path}: its subset masks differ from subset_masks(); delete it")
        k = len(old["seeds"])
        losses[:k, :m_old] = old["losses"]
        done[:k, :m_old] = old["done"]
    wanted = [all_seeds.index(int(s)) for s in seeds]
    todo = [(si, m) for m in range(int(subsets)) for si in wanted if not done[si, m]]
    log.info("lds: %d subsets x %d seeds asked; %d runs in %s, %d to train", subsets, len(seeds),
             int(sum(done[si, :subsets].sum() for si in wanted)), cache_path, len(todo))
    start = time.perf_counter()
    for k, (si, m) in enumerate(todo, start=1):
        keep = masks[m]
        losses[si, m] = train_and_evaluate(x_train[keep], y_train[keep], x_test, y_test, recipe, all_seeds[si])
        done[si, m] = True
        save_cache(cache_path, masks, all_seeds, losses, done, meta, base_losses, base_preds)
        elapsed = time.perf_counter() - start
        log.info("lds: run %d/%d (subset %d, seed %d) done; %.0f s, about %.0f s left", k, len(todo), m,
                 all_seeds[si], elapsed, elapsed / k * (len(todo) - k))
    if not todo and old is None:
        save_cache(cache_path, masks, all_seeds, losses, done, meta, base_losses, base_preds)
    return {"masks": masks[:subsets], "seeds": np.asarray(seeds, dtype=np.int64),
            "losses": losses[wanted, :subsets], "base_losses": base_losses, "base_preds": base_preds,
            "seconds": time.perf_counter() - start, "trained": len(todo)}


# ----------------------------------------------------------------------------- scoring

def calculate_settings(data, out, options, folders, model=None):
    """Settings of ``calculate.py --data DATA --model MODEL --preprocess unit OPTIONS`` (the demo's line;
    ``model`` defaults to ``DATA/model.keras``)."""
    from influence.calculate_cli import build_parser
    from influence.engine import Settings

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
    from influence.engine import Settings
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
    from influence.model.hvp import Derivatives
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


def plot(result, path):
    """LDS (y) against seconds (x, log), one labelled point per solver, the noise ceiling as a line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    styles = itertools.cycle([("#c0392b", "o"), ("#e67e22", "s"), ("#1f4e79", "D"), ("#27ae60", "^"),
                              ("#8e44ad", "v"), ("#16a085", "P")])
    for r in result.rows:
        if not math.isfinite(r.lds_mean):      # a solver that failed has no point
            continue
        x = max(r.compute, 0.01)
        colour, marker = ("0.45", "X") if r.name == RANDOM else ("0.45", "o") if r.name == GRAD_DOT else \
            ("black", "*") if r.name == DENSE else next(styles)
        name = f"{r.name}, {r.options.split(' (')[0]}" if r.name == DENSE else r.name
        ax.plot([x], [r.lds_mean], marker, color=colour, ms=8, ls="none",
                label=f"{name}: {r.lds_mean:.3f} in {r.compute:.1f} s")
    xs = [max(r.compute, 0.01) for r in result.rows if math.isfinite(r.compute)] or [1.0]
    ax.set_xlim(min(xs) / 2, max(xs) * 6)
    ax.axhline(result.ceiling, color="#1f4e79", ls="--", lw=1.2, label=f"noise ceiling (seed vs seed) {result.ceiling:.3f}")
    ax.axhline(0.0, color="0.7", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("seconds computing, from scratch (curvature fit + solves + scoring pass)\n"
                  "random scores drawn at 0.01 s")
    ax.set_ylabel(f"LDS (mean over {len(result.test_keys)} test images)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="best", title="LDS (mean) in seconds computing", title_fontsize=8)
    ax.set_title(f"linear datamodeling score ({result.model}): {result.subsets} half-subsets × {len(result.seeds)} "
                 f"seeds, n = {result.n}", fontsize=9)
    fig.savefig(path, dpi=130)


def run(cache="lds_cache", out=".", subsets=64, seeds=2, folders=("orig",), quick=False, mask_seed=0,
        solvers=SOLVERS, model="demo", dense=True):
    """The whole panel (module docstring) for panel model ``model`` (:data:`MODELS`): retrain (cached),
    score every solver, write ``out/lds.md``, ``lds.png`` and ``lds.json`` (``lds_<model>.*`` for a model
    other than the demo CNN). Returns :class:`LdsResult`."""
    from influence.errors import SettingError, UserError

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
    rows = []
    for name, options in solvers:
        scores, seconds, compute, options = score_raising_damping(
            data.root, folder / "scores" / name.replace(" ", "_"), options, list(folders), keys, model=data.model_path)
        if scores is None:
            rows.append(LdsRow(name, " ".join(options), np.full(len(idx), np.nan), math.nan, math.nan, math.nan,
                               math.nan, seconds, compute))
            continue
        rows.append(evaluate(name, " ".join(options), scores, masks, actual, wrong, seconds, compute))
        log.info("lds: %s: LDS %.3f in %.1f s", name, rows[-1].lds_mean, seconds)
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
                       retrained["seconds"], retrained["trained"], model=model)
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
                 dense=not getattr(args, "no_lds_dense", False))
    print(result.markdown)
    return result
