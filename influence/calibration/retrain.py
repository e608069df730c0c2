"""The retrainings of ``--calibrate``: the model trained from scratch on ``M`` random half-subsets of the
training set under ``S`` seeds, and each retrained model's test losses; cached and resumable.

A retraining is ``run(indices, seed) -> float64 (T,)``: train on the training images ``indices`` with
``seed``, return the cross-entropy (from logits, float64) of each test image. :class:`Trainer` makes one
from the model's own compile config (:func:`compiled_fit`) or a user's ``train_fn(x, y) -> model``.

The cache (:func:`retrain`) is one ``.npz`` per content key (model weights and compile config, training
set, test images, epochs, batch size, subset seed, trainer), named by the key's digest, written atomically
(:func:`influence.io.atomic_write`) after every run: a rerun reuses every finished run, an interrupted one
resumes, and asking for more subsets or seeds later trains only the new runs (the masks are prefix-stable,
:func:`influence.calibration.lds_metrics.subset_masks`). After the idea of
:mod:`influence.experiments.lds_retrain`.
"""
import hashlib
import inspect
import json
import logging
import time
from pathlib import Path

import numpy as np

from influence.errors import SettingError, UserError
from influence.calibration.lds_metrics import subset_masks
from influence.io import atomic_write
from influence.progress import progress

log = logging.getLogger(__name__)

#: retraining cache files are ``retrain-<digest>.npz``
PREFIX = "retrain-"
#: the retraining's batch size unless given (Keras' ``fit`` default)
DEFAULT_BATCH_SIZE = 32


def cross_entropy(logits, labels):
    """Per-image softmax cross-entropy from logits, float64: ``(T, K)``, ``(T,)`` -> ``(T,)``."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    shift = z.max(axis=1, keepdims=True)
    lse = shift[:, 0] + np.log(np.exp(z - shift).sum(axis=1))
    return lse - z[np.arange(len(y)), y]


def default_epochs(iterations, batch_size, n_train):
    """Epochs that repeat the saved training's length: ``round(iterations × batch_size / n_train)``, at least
    1, assuming the model was trained on this training set with this batch size; None without steps."""
    iterations = int(iterations or 0)
    if iterations <= 0:
        return None
    return max(1, int(round(iterations * int(batch_size) / int(n_train))))


def compile_config(model):
    """The Keras model's compile config (a dict), or None when it was never compiled (or saved without)."""
    get = getattr(model, "get_compile_config", None)
    config = get() if get is not None else None
    return config or None


def optimizer_steps(model):
    """The optimizer's ``iterations`` saved with the model (0 when none)."""
    opt = getattr(model, "optimizer", None)
    try:
        steps = opt.iterations if opt is not None else 0
        return int(steps.numpy() if hasattr(steps, "numpy") else steps)
    except (AttributeError, TypeError, ValueError):
        return 0


#: ``init fixed``: every run's weights are drawn under this seed, and its data order under this offset + its seed
FIXED_INIT_SEED, FIXED_ORDER_OFFSET = 0, 1000


def compiled_fit(model, config, epochs, batch_size):
    """``fit(x, y, order_seed=None) -> model``: a clone of ``model`` with fresh weights (its layers' own
    initialisers, under the seed set by the caller), compiled from ``config`` (the file's optimizer, loss and
    metrics), trained ``epochs`` epochs of ``batch_size`` (shuffled; under ``order_seed`` when given, set after the
    weights are drawn)."""
    import keras

    def fit(x, y, order_seed=None):
        clone = keras.models.clone_model(model)
        if order_seed is not None:
            keras.utils.set_random_seed(int(order_seed))
        clone.compile_from_config(config)
        clone.fit(x, y, batch_size=int(batch_size), epochs=int(epochs), shuffle=True, verbose=0)
        return clone

    return fit


class Trainer:
    """One retraining as ``trainer(indices, seed) -> float64 (T,)`` test losses.

    Args:
      fit: ``fit(x, y) -> model``; ``x`` float32 ``(n, H, W, C)`` as the model takes them (after
        ``preprocess``), ``y`` int64 ``(n,)``; the returned Keras model outputs logits or probabilities
        (a final softmax is stripped as for scoring).
      train: the training set (``take(indices) -> (images, labels)``: a TrainArchive or TrainSet).
      x_test, y_test: ``(T, H, W, C)`` (uint8, or float on the float path), int ``(T,)``: the test images.
      preprocess: ``f(images) -> float tensor`` (the classifier's).
      init: ``fresh`` (the weights drawn under each run's seed) or ``fixed`` (every run's weights drawn under
        :data:`FIXED_INIT_SEED`, the data ordered under ``FIXED_ORDER_OFFSET + seed``: ``fit`` takes ``order_seed``).
    """

    def __init__(self, fit, train, x_test, y_test, preprocess, init="fresh"):
        self.fit, self.train, self.preprocess, self.init = fit, train, preprocess, init
        self.x_test = np.asarray(preprocess(np.asarray(x_test)), dtype=np.float32)
        self.y_test = np.asarray(y_test, dtype=np.int64).reshape(-1)

    def __call__(self, indices, seed):
        import keras

        from influence.model.models import strip_softmax

        x, y = self.train.take(np.asarray(indices, dtype=np.int64))
        x, y = np.asarray(self.preprocess(x), dtype=np.float32), np.asarray(y, dtype=np.int64)
        if self.init == "fixed":
            keras.utils.set_random_seed(FIXED_INIT_SEED)
            model = self.fit(x, y, order_seed=FIXED_ORDER_OFFSET + int(seed))
        else:
            keras.utils.set_random_seed(int(seed))
            model = self.fit(x, y)
        if model is None or not callable(model):
            raise UserError(f"train_fn must return the trained Keras model, got {type(model).__name__}")
        logits_model, _ = strip_softmax(model)
        logits = np.concatenate([np.asarray(logits_model(self.x_test[s:s + 256], training=False), np.float64)
                                 for s in range(0, len(self.y_test), 256)])
        if logits.ndim != 2 or len(logits) != len(self.y_test):
            raise UserError(f"the retrained model gives {logits.shape} outputs for {len(self.y_test)} test images")
        return cross_entropy(logits, self.y_test)


def function_identity(fn):
    """What names a user's ``train_fn`` in the cache key: its qualified name and a digest of its source (a
    changed body is another key); the name alone when the source cannot be read."""
    name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        return name
    return f"{name}:{hashlib.sha256(source.encode()).hexdigest()[:12]}"


def key_digest(key):
    """16 hex digits of the JSON of ``key`` (a dict of plain values)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def test_fingerprint(x_test, y_test):
    """16 hex digits of the test images and labels."""
    digest = hashlib.sha256(np.ascontiguousarray(x_test).tobytes())
    digest.update(np.asarray(y_test, dtype=np.int64).tobytes())
    digest.update(str(np.asarray(x_test).shape).encode())
    return digest.hexdigest()[:16]


def cache_path(folder, key):
    """``folder/retrain-<digest>.npz`` of ``key``."""
    return Path(folder) / f"{PREFIX}{key_digest(key)}.npz"


def load_cache(path, key):
    """The cached runs at ``path`` as a dict (``masks`` (M, N), ``seeds`` (S,), ``losses`` (S, M, T), ``done``
    (S, M), ``seconds`` (S, M)), or None: no file, another key, or unreadable (logged; retrained)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
        stored = json.loads(str(out.pop("key")))
    except (OSError, ValueError, KeyError, EOFError) as exc:
        log.warning("calibrate: %s is unreadable (%s): retraining", path, str(exc).splitlines()[0][:200])
        return None
    if stored != json.loads(json.dumps(key, default=str)):
        log.info("calibrate: %s holds retrainings of another key: retraining", path)
        return None
    return out


def save_cache(path, key, masks, seeds, losses, done, seconds):
    """Write the runs atomically (a killed process leaves the previous file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, key=np.asarray(json.dumps(key, sort_keys=True, default=str)), masks=masks,
                     seeds=np.asarray(seeds, np.int64), losses=losses, done=done, seconds=seconds)


def run_locally(run):
    """The default runner of :func:`retrain`: ``runner(jobs, on_result)`` calling ``run(indices, seed)`` for
    each job ``(index, (indices, seed))`` in this process, ``on_result(index, (losses, seconds))`` after each."""
    def runner(jobs, on_result):
        for index, (indices, seed) in jobs:
            t0 = time.perf_counter()
            losses = run(indices, seed)
            on_result(index, (losses, time.perf_counter() - t0))

    return runner


def retrain(run, n_train, n_test, *, subsets, seeds, key, path=None, mask_seed=0, show=True, runner=None):
    """Every (seed, subset) run not cached yet, saved after each; returns the dict of :func:`load_cache` for
    the ``subsets`` and ``seeds`` asked, plus ``trained`` (runs done now), ``reused`` (runs read from the
    cache) and ``seconds`` (the retraining time of the runs asked, cached ones included).

    ``run(indices, seed) -> (T,)`` (a :class:`Trainer`); masks :func:`subset_masks` ``(n_train, subsets,
    mask_seed)``: subset ``m`` keeps ``n_train // 2`` images; ``seeds``: the training seeds (each subset is
    trained under every one); ``path``: the cache file (None: nothing cached). A cache with more subsets or
    seeds keeps them. ``runner``: where the runs train (default :func:`run_locally` with ``run``; Ray:
    :class:`influence.calibration.shards.RayRunner`), the cache written after each finished run either way.
    """
    count, seeds = int(subsets), [int(s) for s in seeds]
    if count < 2:
        raise SettingError("calibrate_subsets", f"must be at least 2 (a rank correlation over subsets), got {count}")
    old = load_cache(path, key) if path is not None else None
    all_seeds = list(seeds)
    if old is not None:
        all_seeds = [int(s) for s in old["seeds"]] + [s for s in seeds if s not in set(old["seeds"].tolist())]
        count = max(count, old["masks"].shape[0])
    masks = subset_masks(n_train, count, mask_seed)
    losses = np.full((len(all_seeds), count, n_test), np.nan)
    done = np.zeros((len(all_seeds), count), dtype=bool)
    seconds = np.zeros((len(all_seeds), count))
    if old is not None:
        k, m_old = old["done"].shape
        if old["masks"].shape != (m_old, n_train) or not np.array_equal(old["masks"], masks[:m_old]):
            log.warning("calibrate: %s: its subsets differ from this version's: retraining", path)
        else:
            losses[:k, :m_old], done[:k, :m_old], seconds[:k, :m_old] = old["losses"], old["done"], old["seconds"]
    rows = [all_seeds.index(s) for s in seeds]
    todo = [(si, m) for m in range(int(subsets)) for si in rows if not done[si, m]]
    reused = int(sum(done[si, :subsets].sum() for si in rows))
    log.info("calibrate: %d subsets x %d seed(s) of %d training images (each keeps %d): %d run(s) cached%s, "
             "%d to train", subsets, len(seeds), n_train, n_train // 2, reused,
             f" in {path}" if path is not None and reused else "", len(todo))
    with progress(total=len(todo), desc="calibrate: retraining", unit="run", disable=not show or not todo) as bar:
        def finished(index, value):
            si, m = todo[index]
            losses[si, m], seconds[si, m] = np.asarray(value[0], np.float64), float(value[1])
            done[si, m] = True
            if path is not None:
                save_cache(path, key, masks, all_seeds, losses, done, seconds)
            bar.update(1)

        (runner or run_locally(run))([(j, (np.flatnonzero(masks[m]), all_seeds[si]))
                                      for j, (si, m) in enumerate(todo)], finished)
    sub = np.ix_(rows, range(int(subsets)))
    return {"masks": masks[:subsets], "seeds": np.asarray(seeds, np.int64), "losses": losses[sub],
            "done": done[sub], "seconds": float(seconds[sub].sum()), "trained": len(todo), "reused": reused,
            "path": None if path is None else str(path)}
