"""The LDS panel's retraining cache (:mod:`influence.experiments.lds`): every (seed, subset) model's test
losses with the masks, written atomically after each run, resumed and extended."""
import json
import logging
import time
from pathlib import Path

import numpy as np

from influence.calibration.lds_metrics import subset_masks
from influence.experiments.lds_models import train_and_evaluate

log = logging.getLogger(__name__)

RETRAIN_FILE = "retrain.npz"


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
