"""Mislabelled training images (Koh & Liang 2017, Fig. 6): ``python -m influence.validate --panels mislabel``.

Flip the labels of 10 % of the demo's 1500 training digits (seeded; each to another class drawn
uniformly), train the demo CNN on them with the demo's recipe, then check the training images in
the order of self-influence (the default ``--solver auto``'s choice for this model, krylov, and
``--solver ekfac`` beside it), of training loss, and at random. Goal: at 10 % checked, self-influence
(the default's) finds at least as many as the loss ranking and at least 3x random.
"""
import dataclasses
import logging
import time

import numpy as np

from influence.experiments.arrays import ArrayArchive, digit_arrays

log = logging.getLogger(__name__)

#: fractions of the training set checked at which the mislabel panel reports what it found
CHECKED = (0.05, 0.10, 0.20)


def flip_labels(y, fraction, classes, seed):
    """Seeded label noise: ``round(fraction·N)`` images get another class, uniform over the other ones.

    Args:
      y: (N,) int labels in 0..classes-1; fraction in [0, 1]; classes >= 2; seed: int.

    Returns:
      ``(noisy (N,) int64, flipped (N,) bool)``; ``noisy != y`` exactly where ``flipped``.
    """
    y = np.asarray(y, np.int64)
    rng = np.random.default_rng(seed)
    count = int(round(fraction * len(y)))
    idx = rng.choice(len(y), size=count, replace=False)
    noisy = y.copy()
    noisy[idx] = (y[idx] + rng.integers(1, classes, size=count)) % classes
    flipped = np.zeros(len(y), bool)
    flipped[idx] = True
    return noisy, flipped


def fraction_found(order, flipped):
    """(N+1,) float: the fraction of all flipped images among the first ``k`` of ``order`` (N,), k = 0..N.

    ``flipped``: (N,) bool over the training images; ``order``: a permutation of 0..N-1 (checked first
    to last).
    """
    flipped = np.asarray(flipped, bool)
    hits = flipped[np.asarray(order)]
    return np.concatenate([[0.0], np.cumsum(hits)]) / max(int(flipped.sum()), 1)


def found_at(curve, fraction):
    """``curve[k]`` at ``k = round(fraction·N)`` checked images (``curve``: (N+1,) from :func:`fraction_found`)."""
    n = len(curve) - 1
    return float(curve[int(round(fraction * n))])


@dataclasses.dataclass
class MislabelResult:
    """Fraction of the flipped images found against the fraction checked, per ranking."""

    name: str
    settings: str
    curves: dict            # ranking name -> (N+1,) fraction found after checking k = 0..N images
    seconds: float
    n: int
    flipped: int
    memorised: float        # fraction of flipped images the model predicts as their (wrong) label

    def at(self, ranking, fraction):
        """Fraction found by ``ranking`` (a key of ``curves``, or "random (expected)") at ``fraction`` checked."""
        if ranking == "random (expected)":
            return float(fraction)
        return found_at(self.curves[ranking], fraction)

    @property
    def ok(self):
        """The goal: at 10 % checked, self-influence finds >= the loss ranking and >= 3x random."""
        si, loss = self.at("self-influence", 0.10), self.at("loss", 0.10)
        return bool(si >= loss and si >= 3 * 0.10)


def run_mislabel_panel(n_train=1500, epochs=30, fraction=0.10, damping="auto", seed=0, solvers=("auto", "ekfac")):
    """Koh & Liang Fig. 6 on the demo digits (module docstring). Returns a :class:`MislabelResult`.

    ``n_train`` digits, ``round(fraction * n_train)`` of them flipped; ``damping``: the solvers' λ (a
    number, or relative: ``auto``, ``0.3x``, as calculate.py's default). ``solvers``: the first gives the
    ``self-influence`` curve (``auto``: :func:`influence.curvature.choice.choose_solver` as calculate.py
    with no LiSSA flag), each other one a ``self-influence (NAME)`` curve. The result's curves are
    (n_train + 1,) each.
    """
    from influence.experiments import demo
    from influence.curvature import make_solver
    from influence.curvature.choice import choose_solver
    from influence.model.derivatives import Derivatives
    from influence.model.objective import TrainingObjective
    from influence.model.models import Classifier, make_preprocess, select_params
    from influence.scoring.self_influence import self_influence

    start = time.perf_counter()
    x, y, _, _ = digit_arrays(demo.SIZE, 3, n_train, seed, resample="bilinear")
    noisy, flipped = flip_labels(y, fraction, 10, seed)
    model, train_seconds = demo.train_model(x, noisy, epochs=epochs, seed=seed)
    clf = Classifier(model, make_preprocess("unit"), select_params(model, "all"), description="demo CNN")
    archive = ArrayArchive(x, noisy)
    derivs = Derivatives(clf, (demo.SIZE, demo.SIZE, 3))
    objective = TrainingObjective(derivs, archive, chunk=512)
    rankings, names = {}, []
    t0 = time.perf_counter()
    for k, name in enumerate(solvers):
        name, _ = choose_solver(name, (), clf.num_params, derivs.dtype.size, 2.0)
        solver = make_solver(name, objective, damping, seed=seed, progress=False)
        solver.fit()
        res = self_influence(solver, derivs, archive, batch=512, progress=False)
        rankings["self-influence" if k == 0 else f"self-influence ({name})"] = res.ranking()
        names.append(name)
    score_seconds = time.perf_counter() - t0
    memorised = float(np.mean(res.preds[flipped] == noisy[flipped]))
    log.info("mislabel: %d of %d training labels flipped (seed %d); demo CNN trained %d epochs in %.1f s; training "
             "accuracy on the given labels %.1f%% (clean %.1f%%, flipped %.1f%% = memorised); %s fit + self-influence "
             "%.1f s", int(flipped.sum()), len(y), seed, epochs, train_seconds, 100 * np.mean(res.preds == noisy),
             100 * np.mean(res.preds[~flipped] == noisy[~flipped]), 100 * memorised, " and ".join(names),
             score_seconds)
    rng = np.random.default_rng(seed)
    curves = {**{name: fraction_found(order, flipped) for name, order in rankings.items()},
              "loss": fraction_found(np.lexsort((np.arange(len(y)), -res.losses)), flipped),
              "random (seeded)": fraction_found(rng.permutation(len(y)), flipped)}
    result = MislabelResult(name="mislabel", settings=f"self-influence by {names[0]}, λ={damping}, n={len(y)}, "
                            f"{int(flipped.sum())} flipped, {epochs} epochs", curves=curves,
                            seconds=time.perf_counter() - start, n=len(y), flipped=int(flipped.sum()),
                            memorised=memorised)
    for name in list(curves) + ["random (expected)"]:
        log.info("mislabel: %-17s finds %s", name, ", ".join(f"{100 * result.at(name, f):.1f}% at {100 * f:.0f}%"
                                                             for f in CHECKED))
    return result


def plot_mislabel(result, path):
    """Fraction of flipped labels found (y) against the fraction of the training set checked (x) of a
    :class:`MislabelResult`; written to ``path`` (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.2, 5.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    checked = np.arange(result.n + 1) / result.n
    styles = {"self-influence": ("#c0392b", "-"), "loss": ("#1f4e79", "-"), "random (seeded)": ("0.5", "-"),
              "self-influence (ekfac)": ("#e67e22", "--")}
    for name, curve in result.curves.items():
        colour, ls = styles.get(name, ("k", "-"))
        at = ", ".join(f"{100 * result.at(name, f):.0f}%" for f in CHECKED)
        ax.plot(checked, curve, color=colour, ls=ls, lw=1.8, label=f"{name} ({at})")
    ax.plot([0, 1], [0, 1], color="0.5", ls="--", lw=1, label="random (expected)")
    for f in CHECKED:
        ax.axvline(f, color="0.8", lw=0.8, zorder=0)
    ax.set_xlim(0, 0.5)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("fraction of the training set checked")
    ax.set_ylabel("fraction of the flipped labels found")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right", title="found at " + " / ".join(f"{100 * f:.0f}%" for f in CHECKED),
              title_fontsize=8)
    ax.set_title(f"mislabelled training images (Koh & Liang Fig. 6)\n{result.settings}", fontsize=9)
    fig.savefig(path, dpi=130)
