"""Correlations: Pearson, ranks with ties averaged, and Spearman (no scipy), for the LDS and the experiments."""
import math

import numpy as np


def pearson(a, b):
    """Pearson correlation of two 1-D arrays (N,) -> float (nan when either is constant)."""
    a = np.asarray(a, dtype=np.float64) - np.mean(a)
    b = np.asarray(b, dtype=np.float64) - np.mean(b)
    den = math.sqrt(float(np.dot(a, a)) * float(np.dot(b, b)))
    return float(np.dot(a, b) / den) if den > 0 else float("nan")


def rankdata(a):
    """Ranks 1..N float64 (N,) of a 1-D array (N,), ties getting the mean of their ranks (like scipy's 'average')."""
    a = np.asarray(a)
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    # start of each run of equal values
    new = np.concatenate([[True], sorted_a[1:] != sorted_a[:-1]])
    run_id = np.cumsum(new) - 1
    starts = np.flatnonzero(new)
    ends = np.concatenate([starts[1:], [len(a)]])
    mean_rank = (starts + ends - 1) / 2.0 + 1.0  # ranks starts+1 .. ends, averaged
    ranks = np.empty(len(a), dtype=np.float64)
    ranks[order] = mean_rank[run_id]
    return ranks


def spearman(a, b):
    """Spearman rank correlation of two 1-D arrays (N,) -> float: Pearson of the (tie-averaged) ranks."""
    return pearson(rankdata(a), rankdata(b))
