"""The pure numbers of the LDS: subsets, predictions, scores, ceilings (``--calibrate`` and the LDS panel, :mod:`influence.experiments.lds`).

Everything here takes arrays and returns arrays; shapes in each docstring.
"""
import itertools

import numpy as np

from influence.calibration.stats import spearman

#: the length of the top lists whose right-sign rate is reported
TOP = 5

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
