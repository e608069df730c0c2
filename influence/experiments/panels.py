"""One leave-one-out panel: score, retrain without the chosen images, compare, and draw (Koh & Liang Fig. 2).

A panel takes a problem (:mod:`influence.experiments.problems`) and a solver, removes the ``top``
most influential training images of each test image (largest ``|score|``) and ``random`` others,
and compares the predicted change of the test loss (``score / n``) with the retrained one.
"""
import dataclasses
import logging
import math
import time

import numpy as np

from influence.calibration.stats import pearson, spearman

log = logging.getLogger(__name__)

#: goals of a panel's Pearson of predicted against actual changes (panels not named here have none)
GOALS = {"convex": 0.99, "lissa": 0.95, "cnn": 0.86, "ekfac": 0.93}
#: goals of a panel's Pearson against the scores of its reference solver
REFERENCE_GOALS = {"ekfac": 0.88}


@dataclasses.dataclass
class PanelResult:
    """One panel's removals, R rows: each array below is (R,); Pearson, Spearman and goals follow from them."""

    name: str
    settings: str
    predicted: np.ndarray   # score / n
    actual: np.ndarray      # retrained test loss − base test loss
    test: np.ndarray        # which test image (0..T-1)
    train: np.ndarray       # which training image was removed
    kind: np.ndarray        # "top" or "random"
    seconds: float
    pearson: float = float("nan")
    spearman: float = float("nan")
    goal: float = float("nan")
    reference: str = ""                      # the solver whose scores these are compared with, if any
    reference_pearson: float = float("nan")  # Pearson of all scores against that solver's scores
    reference_goal: float = float("nan")

    def __post_init__(self):
        self.pearson = pearson(self.predicted, self.actual)
        self.spearman = spearman(self.predicted, self.actual)
        self.goal = GOALS.get(self.name, float("nan"))
        self.reference_goal = REFERENCE_GOALS.get(self.name, float("nan"))

    @property
    def ok(self):
        """The goals that are set are met (a panel without a goal is reported only)."""
        main = math.isnan(self.goal) or self.pearson >= self.goal
        ref = math.isnan(self.reference_goal) or self.reference_pearson >= self.reference_goal
        return bool(main and ref)


def choose_removals(scores, top, random, rng):
    """Training indices for one test image's scores (n,): the ``top`` largest |score| and ``random`` others.

    ``rng``: a numpy Generator (seeded). Returns ``(indices int64 (k,), kinds)`` with ``kinds`` a list of
    ``k`` strings, "top" or "random", ``k = top + min(random, n - top)``.
    """
    order = np.argsort(-np.abs(scores), kind="mergesort")
    chosen = order[:top]
    rest = order[top:]
    extra = rng.choice(rest, size=min(random, len(rest)), replace=False) if random > 0 else np.array([], int)
    return np.concatenate([chosen, extra]).astype(np.int64), ["top"] * len(chosen) + ["random"] * len(extra)


def run_panel(name, problem, solver, top, random, seed=0, settings="", scored=None):
    """Score, retrain without the chosen images, and compare. Returns a :class:`PanelResult`.

    ``scored``: ``problem.scores(solver)`` (scores (T, n), s vectors) when the caller has it already.
    The result holds ``T * (top + random)`` removals.
    """
    start = time.perf_counter()
    scores, s = scored if scored is not None else problem.scores(solver)
    rng = np.random.default_rng(seed)
    rows = []
    for t in range(scores.shape[0]):
        idx, kinds = choose_removals(scores[t], top, random, rng)
        for i, kind in zip(idx, kinds):
            rows.append((t, int(i), kind, scores[t, i] / problem.n))
    for k, (t, i, kind, pred) in enumerate(rows):
        problem.actual_change(i)
        if (k + 1) % 10 == 0 or k + 1 == len(rows):
            log.info("%s: retrained %d/%d", name, k + 1, len(rows))
    actual = np.array([problem.actual_change(i)[t] for t, i, _, _ in rows])
    result = PanelResult(
        name=name, settings=settings,
        predicted=np.array([r[3] for r in rows]), actual=actual,
        test=np.array([r[0] for r in rows]), train=np.array([r[1] for r in rows]),
        kind=np.array([r[2] for r in rows]), seconds=time.perf_counter() - start,
    )
    offset = problem.regulariser_offset(s)
    spread = float(np.std(result.predicted)) or 1.0
    log.info("%s: a mean over n-1 images would add %s to the actual changes (%.2g%% of the spread of the "
             "predictions); not used", name, np.array2string(offset, precision=3),
             100 * float(np.max(np.abs(offset))) / spread)
    for t in range(scores.shape[0]):
        m = result.test == t
        log.info("%s: test #%d: Pearson %.3f over %d removals", name, t, pearson(result.predicted[m],
                                                                                  result.actual[m]), int(m.sum()))
    rnd = result.kind == "random"
    if rnd.sum() >= 3:
        log.info("%s: random removals only: Pearson %.3f, median |actual| %.2g", name,
                 pearson(result.predicted[rnd], result.actual[rnd]), float(np.median(np.abs(result.actual[rnd]))))
    log.info("%s: Pearson %.4f, Spearman %.4f over %d removals (%.1f s)", name, result.pearson,
             result.spearman, len(rows), result.seconds)
    return result


def ekfac_panel(name, problem, damping, top, rand, seed, fisher, reference=None, settings=""):
    """An ``--solver ekfac`` panel (``fisher``: sampled, true or empirical); ``reference``: (name, solver
    or its ``scores()``, i.e. scores (T, n) and s vectors) to compare all scores with (Pearson over
    every training image and test image). Returns a :class:`PanelResult`."""
    from influence.curvature import make_solver

    start = time.perf_counter()
    solver = make_solver("ekfac", problem.objective, damping, fisher=fisher, seed=seed, memory_budget=None,
                         progress=False)
    solver.fit()
    fit_seconds = time.perf_counter() - start
    scored = problem.scores(solver)
    res = run_panel(name, problem, solver, top, rand, seed, scored=scored,
                    settings=f"ekfac ({solver.fisher} Fisher) λ={damping:.3g}, n={problem.n}{settings}")
    res.seconds = time.perf_counter() - start
    if reference is not None:
        ref_name, ref = reference
        ref_scores = ref if isinstance(ref, tuple) else problem.scores(ref)
        res.reference = ref_name
        res.reference_pearson = pearson(scored[0].ravel(), ref_scores[0].ravel())
        per_test = [pearson(a, b) for a, b in zip(scored[0], ref_scores[0])]
        log.info("%s: Pearson of all scores against %s: %.4f (per test image %s)", name, ref_name,
                 res.reference_pearson, np.array2string(np.array(per_test), precision=3))
    log.info("%s: EK-FAC fit %.1f s (%s)", name, fit_seconds, solver.info["layers"])
    return res


def plot(results, path):
    """Koh & Liang Fig. 2 style: one scatter per :class:`PanelResult`, predicted on x, actual on y,
    the diagonal; written to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.6 * len(results), 5.2), squeeze=False)
    for ax, r in zip(axes[0], results):
        colours = plt.get_cmap("tab10")
        for t in np.unique(r.test):
            for kind, marker in (("top", "o"), ("random", "x")):
                m = (r.test == t) & (r.kind == kind)
                if m.any():
                    ax.scatter(r.predicted[m], r.actual[m], s=22, marker=marker, color=colours(int(t) % 10),
                               alpha=0.8, linewidths=1.2,
                               label=f"test {t}, {kind}" if len(np.unique(r.test)) <= 4 else None)
        lo = float(min(r.predicted.min(), r.actual.min()))
        hi = float(max(r.predicted.max(), r.actual.max()))
        pad = 0.05 * (hi - lo or 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.4", lw=1, ls="--", zorder=0)
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_aspect("equal")
        ax.ticklabel_format(style="sci", scilimits=(-2, 2))
        ax.set_title(f"{r.name}: {r.settings}\nPearson r = {r.pearson:.3f}, Spearman ρ = {r.spearman:.3f}",
                     fontsize=9)
        ax.set_xlabel("predicted Δ test loss (score / n)")
        ax.set_ylabel("actual Δ test loss (retrained without z_i)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("leave-one-out: predicted vs retrained\n(o: top |score|, x: random)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
