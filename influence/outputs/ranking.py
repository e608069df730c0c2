"""Which training images a test image's outputs show: the top harmful and useful ones, and each layer's
leader. Pure numpy, no matplotlib (the API ranks scores without drawing anything)."""
from dataclasses import dataclass

import numpy as np


@dataclass
class Ranked:
    """One training image in a top list: archive ``index``, ``key`` (``"<batch>_<i>"``), ``file``,
    ``label`` and its ``score``."""

    index: int
    key: str
    file: str
    label: int
    score: float


def ranked(scores, catalogue, k=5):
    """The ``k`` most harmful (most negative) and most useful (most positive) training images of each row
    of ``scores`` (T, N), named by ``catalogue`` (:class:`influence.catalogue.TrainCatalogue`) -> list of
    ``{"harmful": [Ranked], "useful": [Ranked]}``."""
    scores = np.atleast_2d(np.asarray(scores))
    out = []
    for row in scores:
        harmful, useful = top_indices(row, int(k))
        out.append({name: [Ranked(int(i), catalogue.keys[i], str(catalogue.files[i]), int(catalogue.labels[i]),
                                  float(row[i])) for i in idx]
                    for name, idx in (("harmful", harmful), ("useful", useful))})
    return out


def top_indices(scores, k):
    """Indices of the ``k`` most harmful and ``k`` most useful training images.

    Args:
      scores: (N,) float, influence scores (positive = useful, negative = harmful).
      k: int >= 0; clipped to N.

    Returns:
      (harmful_idx, useful_idx): two int64 arrays of shape (min(k, N),). ``harmful_idx`` orders the
      most negative score first (ascending scores), ``useful_idx`` the most positive first
      (descending scores). Ties are broken by the lower index first in both lists (stable).
      NaN scores are never ranked ahead of finite ones.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    k = min(int(k), scores.size)
    index = np.arange(scores.size)
    finite = np.where(np.isnan(scores), np.inf, scores)
    harmful = np.lexsort((index, finite))[:k]            # ascending score, then index
    finite = np.where(np.isnan(scores), np.inf, -scores)
    useful = np.lexsort((index, finite))[:k]             # descending score, then index
    return harmful.astype(np.int64), useful.astype(np.int64)


def layer_leaders(shares):
    """Per layer, the training image with the largest (most positive) share.

    Args:
      shares: (N, L) float, N >= 1.

    Returns:
      int64 (L,): row index of the largest value of each column; the lowest index on ties. NaN
      shares never win over finite ones.
    """
    shares = np.asarray(shares, dtype=np.float64)
    if shares.ndim != 2 or shares.shape[0] == 0:
        raise ValueError(f"shares must have shape (N, L) with N >= 1, got {shares.shape}")
    return np.argmax(np.where(np.isnan(shares), -np.inf, shares), axis=0).astype(np.int64)
