"""``Influence.calibrate`` / ``calculate.py --calibrate``: retrain, score the grid, compare, choose.

:func:`calibrate` ties :mod:`~influence.calibration.retrain` (the retrained models' test losses, cached),
:mod:`~influence.calibration.scoring` (each grid cell's predicted loss changes) and
:mod:`~influence.calibration.grid` (LDS, ceiling, choice, verdict) together and returns a
:class:`Calibration`.
"""
import csv
import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np

from influence.calibration import grid, retrain, scoring
from influence.errors import SettingError, UserError
from influence.io import atomic_write
from influence.settings import calibrate_init_problem

log = logging.getLogger(__name__)

CSV_FILE, JSON_FILE = "calibration.csv", "calibration.json"
#: where the retrainings are cached under a curvature cache folder
CACHE_FOLDER = "calibration"


@dataclasses.dataclass
class Calibration:
    """What :func:`calibrate` measured.

    ``cells``: the grid (:class:`~influence.calibration.grid.Cell`, the run's own first); ``lds``: float64
    ``(C, T)`` per cell and test image (nan: a constant prediction or loss, or a skipped cell); ``lams``: the
    λ each cell resolved to (a float, or ``{layer: λ}`` for EK-FAC/K-FAC); ``skipped``: ``{cell name:
    reason}``; ``ceiling``: the mean seed-to-seed Spearman (None with one seed) and ``ceiling_per_test``
    ``(T,)``; ``best``: index of the best cell (None when nothing scored); ``run``: index of the run's own;
    ``facts``: subsets, seeds, epochs, batch size, runs trained / reused, seconds, cache file.
    """

    cells: list
    lds: np.ndarray
    lams: dict
    skipped: dict
    ceiling: float
    ceiling_per_test: np.ndarray
    best: int
    run: int
    facts: dict

    @property
    def means(self):
        """Mean LDS over the test images of each cell: ``(C,)`` (nan where none is finite)."""
        return np.array([grid.nanmean(row) for row in self.lds])

    @property
    def best_cell(self):
        return None if self.best is None else self.cells[self.best]

    def rows(self):
        """One dict per cell: solver, options (its variant: ``{"store_curvature": "blocks"}``, else empty), damping,
        lambda, lds (mean), tests (finite per-test values), run, best, skipped (the reason, or empty)."""
        out = []
        for i, cell in enumerate(self.cells):
            lam = self.lams.get(cell)
            out.append({"solver": cell.solver, "options": dict(cell.options), "damping": str(cell.damping),
                        "lambda": (None if lam is None else lam if isinstance(lam, float)
                                   else {k: float(f"{v:.6g}") for k, v in lam.items()}),
                        "lds": _float(self.means[i]), "tests": int(np.isfinite(self.lds[i]).sum()),
                        "run": bool(cell.run), "best": i == self.best, "skipped": self.skipped.get(cell.name, "")})
        return out

    def chosen(self, allowed=None):
        """Index of the cell a run takes (:func:`influence.calibration.grid.choose`): the best of ``allowed`` (bool per
        cell, default all) when its gain over the run's own is beyond the noise, else the run's own; None when
        nothing scored."""
        return grid.choose(self.means, allowed, self.lds, self.run)

    def gain(self, index):
        """``(mean, standard error)`` of cell ``index``'s LDS gain over the run's own, paired over the test images."""
        return grid.paired_gain(self.lds[index], self.lds[self.run])

    def verdict(self):
        """The one line (:func:`influence.calibration.grid.verdict`), and when the best cell's gain over the run's
        own is within the noise, that the run keeps its own."""
        if self.best is None:
            return "scores on this model: no cell of the grid gave a finite LDS (constant test losses?)"
        line = grid.verdict(self.cells[self.best].name, self.means[self.best], self.ceiling,
                            self.cells[self.run].name, self.means[self.run])
        if self.best != self.run and self.chosen() == self.run:
            gain, error = self.gain(self.best)
            line += (f" (+{gain:.3f} ± {error:.3f} over the test images, within {grid.SWITCH_Z:g} standard errors: "
                     f"the run keeps its own)")
        return line

    def table(self):
        """The grid as text lines: solver, damping, λ, LDS, marks for the run's and the best cell."""
        width = max([8] + [len(c.label) for c in self.cells])
        lines = [f"{'solver':<{width}} {'damping':<8} {'lambda':>10} {'LDS':>6}"]
        for cell, row in zip(self.cells, self.rows()):
            lam = row["lambda"]
            shown = ("-" if lam is None else f"{lam:.3g}" if isinstance(lam, float)
                     else f"{float(np.mean(list(lam.values()))):.3g}*")
            lds = "-" if row["lds"] is None else f"{row['lds']:.3f}"
            marks = ", ".join(m for m, on in (("the run's", row["run"]), ("best", row["best"])) if on)
            note = f"  skipped: {row['skipped']}" if row["skipped"] else ""
            lines.append(f"{cell.label:<{width}} {row['damping']:<8} {shown:>10} {lds:>6}"
                         f"{'  <- ' + marks if marks else ''}{note}")
        if any(isinstance(self.lams.get(c), dict) for c in self.cells):
            lines.append("(* per-layer damping: the mean of the layers' λ)")
        ceiling = ("not measured (one seed)" if self.ceiling is None else f"{self.ceiling:.3f}")
        lines.append(f"noise ceiling (seed-to-seed Spearman): {ceiling}; {self.facts['subsets']} subsets x "
                     f"{len(self.facts['seeds'])} seed(s), mean over {self.lds.shape[1]} test image(s)")
        return lines

    def record(self):
        """The JSON of run.json's ``calibration`` entry and of ``calibration.json``."""
        best = self.best_cell
        return {"verdict": self.verdict(), "rows": self.rows(),
                "best": None if best is None else {"solver": best.solver, "options": dict(best.options),
                                                   "damping": str(best.damping), "lds": _float(self.means[self.best])},
                "run": {"solver": self.cells[self.run].solver, "options": dict(self.cells[self.run].options),
                        "damping": str(self.cells[self.run].damping), "lds": _float(self.means[self.run])},
                "noise_ceiling": _float(self.ceiling), **self.facts}

    def write(self, folder):
        """``calibration.csv`` (one row per cell) and ``calibration.json`` (everything, per-test LDS included)
        in ``folder``, atomically -> the two paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        rows = self.rows()
        with atomic_write(folder / CSV_FILE) as tmp:
            with open(tmp, "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["solver", "options", "damping", "lambda", "lds", "tests", "run", "best", "skipped"])
                for r in rows:
                    lam = r["lambda"]
                    w.writerow([r["solver"], " ".join(f"{k}={v}" for k, v in r["options"].items()), r["damping"],
                                "" if lam is None else lam if isinstance(lam, float) else json.dumps(lam),
                                "" if r["lds"] is None else f"{r['lds']:.6f}", r["tests"], int(r["run"]),
                                int(r["best"]), r["skipped"]])
        data = {**self.record(), "lds_per_test": [[_float(v) for v in row] for row in self.lds],
                "noise_ceiling_per_test": (None if self.ceiling_per_test is None
                                           else [_float(v) for v in self.ceiling_per_test])}
        with atomic_write(folder / JSON_FILE) as tmp:
            Path(tmp).write_text(json.dumps(data, indent=2, default=str))
        return folder / CSV_FILE, folder / JSON_FILE


def run_variant(inf):
    """The run's own variant (:data:`influence.calibration.grid.VARIANTS`): ``(("store_curvature", "blocks"),)``
    for the store (its ``auto`` as resolved), ``()`` for the other solvers."""
    if inf.solver_name not in grid.VARIANTS:
        return ()
    setting, _ = grid.VARIANTS[inf.solver_name]
    value = inf.solver.info.get(setting, getattr(inf.settings, setting, None))
    return ((setting, value),) if value is not None else ()


def _float(value):
    return None if value is None or not np.isfinite(value) else round(float(value), 6)


def trainer_for(inf, train_fn, epochs, batch_size):
    """``(fit(x, y) -> model, recipe)``: the user's ``train_fn``, or a clone of the model compiled from its
    own compile config; ``recipe`` names it in the cache key. One-line errors: no compile config and no
    ``train_fn`` (SettingError ``calibrate``), ``epochs auto`` without saved optimizer steps (``epochs``)."""
    if train_fn is not None:
        if not callable(train_fn):
            raise UserError(f"train_fn must be a function (x, y) -> trained model, got {type(train_fn).__name__}")
        return train_fn, {"train_fn": retrain.function_identity(train_fn)}
    model = _keras_model(inf)
    config = retrain.compile_config(model) if model is not None else None
    if config is None:
        raise SettingError("calibrate", f"the model {inf.model_name} has no compile config (optimizer and loss) to "
                                        f"retrain it with: save it after model.compile(...), or from Python pass "
                                        f"train_fn(x, y) -> model")
    steps = retrain.optimizer_steps(model)
    if str(epochs).lower() == "auto":
        epochs = retrain.default_epochs(steps, batch_size, len(inf.train))
        if epochs is None:
            raise SettingError("epochs", f"auto reads the training length from the optimizer's steps saved with "
                                         f"the model, and {inf.model_name} holds none: give the epochs")
        log.info("calibrate: %d epochs of batch %d (auto: the model's optimizer took %d steps; %d x %d / %d "
                 "training images)", epochs, batch_size, steps, steps, batch_size, len(inf.train))
    epochs = int(epochs)
    if epochs < 1:
        raise SettingError("epochs", f"must be at least 1, got {epochs}")
    recipe = {"compile_config": json.loads(json.dumps(config, default=str)), "epochs": epochs,
              "batch_size": int(batch_size), "optimizer_steps": steps}
    return retrain.compiled_fit(model, config, epochs, batch_size), recipe


def _keras_model(inf):
    """The model as given, with its compile config: the object, or the file loaded with compile=True; None
    for a ``keras.applications`` name (its constructor compiles nothing)."""
    if inf.model_object is not None:
        obj = inf.model_object
        return getattr(obj, "model", obj)          # a Classifier holds the Keras model
    source = inf.model_source
    if source is None or not Path(source[0]).is_file():
        return None
    import keras

    try:
        return keras.models.load_model(source[0], compile=True)
    except Exception as exc:           # Keras raises many kinds: the user needs one line
        raise UserError(f"calibrate: could not load the optimizer and loss of {source[0]} "
                        f"({str(exc).splitlines()[0][:200]}): from Python pass train_fn(x, y) -> model") from None


def calibrate(inf, test_images, test_labels, *, train_fn=None, subsets=16, seeds=2, init="fresh", epochs="auto",
              batch_size=retrain.DEFAULT_BATCH_SIZE, solvers=None, dampings=None, cache=None, mask_seed=0,
              show=True, runner=None):
    """How far the scores of ``inf`` can be trusted on its model -> :class:`Calibration`.

    1. retrain the model on ``subsets`` random half-subsets of the training set, under seeds ``0..seeds-1``
       each (:func:`influence.calibration.retrain.retrain`; cached under ``cache/calibration/`` when
       ``cache`` is a folder), and measure each retrained model's test losses on ``test_images``;
    2. score every cell of the grid (:func:`influence.calibration.grid.grid_cells`: ``inf``'s own solver and
       damping first, then ``solvers`` x ``dampings``, default the run's solver and ekfac x 0.1x, 1x, 10x);
    3. LDS of each cell (Spearman over the subsets of predicted against seed-mean actual test-loss change,
       mean over the test images), the noise ceiling (with two seeds or more), the best cell.

    ``test_images`` (T, H, W, C) uint8 or float as :meth:`influence.Influence.scores` takes them,
    ``test_labels`` (T,). ``train_fn(x, y) -> model`` (x float32 as the model takes them, y int64; called
    after ``keras.utils.set_random_seed(seed)``) replaces the model's own compile config; ``epochs`` (``auto``:
    the length of the saved training, :func:`influence.calibration.retrain.default_epochs`) and ``batch_size``
    are the compiled recipe's. ``init``: ``fresh`` (each run from the model's initialisers under its seed) or
    ``fixed`` (every run from one initialisation, the seed ordering the data only; the compiled recipe only:
    a ``train_fn`` chooses its own start). ``runner``: where the retrainings run (default this process; calculate.py's
    ``workers`` / ``ray_address``: :class:`influence.calibration.shards.RayRunner`).
    """
    seeds = int(seeds)
    if seeds < 1:
        raise SettingError("calibrate_seeds", f"must be at least 1, got {seeds}")
    x_test, y_test = inf.reader.arrays(test_images, test_labels)
    if not len(y_test):
        raise UserError("calibrate: no test images to measure the test loss on")
    fit, recipe = trainer_for(inf, train_fn, epochs, int(batch_size))
    problem = calibrate_init_problem(init)
    if problem:
        raise SettingError("calibrate_init", problem)
    if init == "fixed":
        if train_fn is not None:
            raise SettingError("calibrate_init", "fixed starts the compiled recipe's runs from one initialisation; a "
                                                 "train_fn chooses its own start (start it from one in your train_fn)")
        recipe["init"] = "fixed"          # in the cache key; a fresh recipe's key is as before
    key = {"weights": inf.curvature_key["weights"], "model": str(inf.model_name), "train": inf.train.fingerprint(),
           "train_images": len(inf.train), "test": retrain.test_fingerprint(x_test, y_test),
           "preprocess": str(inf.settings.preprocess), "mask_seed": int(mask_seed), **recipe}
    path = None if cache is None else retrain.cache_path(Path(cache) / CACHE_FOLDER, key)
    t0 = time.perf_counter()
    trainer = retrain.Trainer(fit, inf.train, x_test, y_test, inf.clf.preprocess, init=init)
    if runner is not None and hasattr(runner, "spec"):            # Ray: the workers rebuild the trainer
        from influence.calibration.shards import spec_for

        runner.spec = spec_for(inf, recipe, x_test, y_test)
    runs = retrain.retrain(trainer, len(inf.train), len(y_test), subsets=subsets, seeds=range(seeds), key=key,
                           path=path, mask_seed=mask_seed, show=show and inf.progress, runner=runner)
    t1 = time.perf_counter()
    run_damping = inf.settings.damping
    cells = grid.grid_cells(inf.solver_name, run_damping, solvers, dampings, run_options=run_variant(inf))
    log.info("calibrate: scoring %d (solver, damping) cell(s) on %d test image(s): %s", len(cells), len(y_test),
             ", ".join(c.name for c in cells))
    grads = inf.test_gradients(x_test, y_test)
    predicted, lams, skipped = scoring.score_cells(inf, cells, grads, runs["masks"], show)
    del grads
    actual = grid.actual_losses(runs["losses"])
    lds = np.full((len(cells), len(y_test)), np.nan)
    for i, cell in enumerate(cells):
        if cell in predicted:
            lds[i] = grid.lds(predicted[cell], actual)
    ceiling_per_test = (grid.noise_ceiling(runs["losses"]) if seeds >= 2 else None)
    means = np.array([grid.nanmean(row) for row in lds])
    facts = {"subsets": int(subsets), "seeds": [int(s) for s in runs["seeds"]], "mask_seed": int(mask_seed),
             "trainer": "train_fn" if train_fn is not None else "compile config", "init": init,
             "ray": runner is not None,
             "epochs": recipe.get("epochs"), "batch_size": recipe.get("batch_size"), "test_images": len(y_test),
             "runs_trained": runs["trained"], "runs_reused": runs["reused"],
             "retrain_s": round(runs["seconds"], 2), "retrain_now_s": round(t1 - t0, 2),
             "scoring_s": round(time.perf_counter() - t1, 2), "cache": runs["path"]}
    return Calibration(cells, lds, lams, {c.name: r for c, r in skipped.items()}, grid.ceiling(runs["losses"]),
                       ceiling_per_test, grid.choose(means), 0, facts)
