"""The ``calculate.py`` job: for every test image, score every training image and write the outputs.

Order of work, per test folder and per label: the test images of one label share the work -- their
gradients, then their inverse-HVPs (one solver call), then ONE pass over the training archive that
scores all of them at once (chunked by ``--memory-budget``).
"""
import dataclasses
import json
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from influence import __version__
from influence.archives import TestArchive, TrainArchive
from influence.classes import ClassMap, imagenet_classes
from influence.errors import UserError
from influence.report import atomic_write, outputs_complete, write_predictions_csv, write_test_outputs

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
#: settings that change the numbers: a resumed run must agree on them
MATH_SETTINGS = ("model", "weights", "preprocess", "params", "solver", "damping", "scale", "iter", "bsize",
                 "repeats", "seed", "cg_tol", "cg_maxiter")


@dataclasses.dataclass
class Settings:
    """Every setting of a run (saved in run.json). Field names match calculate.py's options."""

    data: str = "."
    out: str = "calc_output"
    model: str = "vgg16"
    weights: str = "imagenet"
    preprocess: str = "auto"
    params: str = "all"
    solver: str = "lissa"
    iter: int = 1000
    bsize: int = 10
    repeats: int = 1
    damping: float = 0.01
    scale: str = "auto"
    seed: int = 0
    cg_tol: float = 1e-6
    cg_maxiter: int = 200
    max_exact_params: int = 10_000
    top: int = 5
    save_format: str = "pdf"
    folders: list = None
    limit: int = 0
    overwrite: bool = False
    memory_budget: float = 2.0
    score_batch: int = 256

    @classmethod
    def from_args(cls, args):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})

    def scale_value(self):
        """None for ``auto``, else the number."""
        if str(self.scale).lower() == "auto":
            return None
        try:
            value = float(self.scale)
        except ValueError:
            raise UserError(f"--scale must be a number or 'auto', got {self.scale!r}") from None
        if not value > 0:
            raise UserError(f"--scale must be > 0, got {self.scale}")
        return value


# ----------------------------------------------------------------------------- checks

def open_archives(settings):
    data = Path(settings.data)
    if not data.is_dir():
        raise UserError(f"--data folder not found: {data} (run prepare_data.py first)")
    train = TrainArchive(data / "train.npz")
    test = TestArchive(data / "test.npz")
    if tuple(train.image_shape) != tuple(test.image_shape):
        raise UserError(f"train images are {train.image_shape} but test images are {test.image_shape}: "
                        f"run prepare_data.py (or prepare_only_test.py) again with the same --size")
    labels = data / "labels.json"
    classmap = ClassMap.load(labels) if labels.exists() else None
    return train, test, classmap


def check_compatible(clf, train, test, folders):
    """Image size = model input size; every label < number of outputs."""
    want = clf.input_shape
    have = tuple(train.image_shape)
    if len(want) != 3 or any(w is not None and w != h for w, h in zip(want, have)):
        shown = "x".join("?" if w is None else str(w) for w in want)
        raise UserError(f"the archives hold {have[0]}x{have[1]}x{have[2]} images but the model takes {shown}: "
                        f"run prepare_data.py again with --size {want[0]} {want[1]}")
    k = clf.num_classes
    top = int(train.labels().max())
    if top >= k:
        raise UserError(f"train label {top} does not exist in a model with {k} outputs")
    for f in folders:
        y = test.labels(f)
        if len(y) and int(y.max()) >= k:
            raise UserError(f"test folder {f}: label {int(y.max())} does not exist in a model with {k} outputs")


def class_namer(classmap, num_classes):
    """index -> human name: labels.json first, ImageNet names for 1000-way models, else the index."""
    if classmap is not None:
        return classmap.human
    if num_classes == 1000:
        names = [human for _, human in imagenet_classes()]
        return lambda i: names[int(i)] if 0 <= int(i) < 1000 else str(i)
    return str


def check_resume(out, settings):
    """Refuse to mix results computed with different math settings in one --out folder."""
    path = Path(out) / RUN_FILE
    if settings.overwrite or not path.exists() or not any(Path(out).rglob("*_scores.npy")):
        return
    try:
        old = json.loads(path.read_text())["settings"]
    except (ValueError, KeyError, OSError):
        return
    mine = dataclasses.asdict(settings)
    diff = [k for k in MATH_SETTINGS if k in old and str(old[k]) != str(mine[k])]
    if diff:
        changes = ", ".join(f"{k} {old[k]} -> {mine[k]}" for k in diff)
        raise UserError(f"{out} holds results computed with other settings ({changes}): "
                        f"use another --out, or --overwrite to redo them")


# ----------------------------------------------------------------------------- run record

class RunRecord:
    """run.json: every setting, versions, solver facts (λ_max, scale) and timings."""

    def __init__(self, out, settings):
        import keras
        import tensorflow as tf

        self.path = Path(out) / RUN_FILE
        self.data = {
            "settings": dataclasses.asdict(settings),
            "versions": {"influence": __version__, "tensorflow": tf.__version__, "keras": keras.__version__,
                         "numpy": np.__version__, "python": platform.python_version()},
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "status": "running",
            "timings": {},
            "counts": {"test_images_done": 0, "test_images_skipped": 0},
        }

    def add_time(self, key, seconds):
        self.data["timings"][key] = round(self.data["timings"].get(key, 0.0) + seconds, 4)

    def save(self, **extra):
        self.data.update(extra)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(self.path) as tmp:
            Path(tmp).write_text(json.dumps(self.data, indent=2, default=str))


# ----------------------------------------------------------------------------- scoring pass

def activation_size(clf):
    """Rough number of floats per image that the scorer keeps per test vector (for chunking)."""
    total = 0
    for g in clf.groups:
        try:
            total += int(np.prod([d for d in g.layer.output.shape[1:] if d is not None]))
        except (AttributeError, ValueError, TypeError):
            total += 100_000
    return max(total, 1)


def score_archive(scorer, train, vecs, score_batch, progress_desc="scoring"):
    """Shares of every training image: float32 (T, N, L), in archive order."""
    from influence.hvp import vec_stack

    out = np.empty((len(vecs), len(train), len(scorer.layer_names) if scorer.split else 1), np.float32)
    stacked = vec_stack(vecs)
    at = 0
    with tqdm(total=len(train), desc=progress_desc, unit="img", leave=False) as bar:
        for _, x, y, _ in train.iter_batches():
            for s in range(0, len(y), score_batch):
                xc, yc = x[s:s + score_batch], y[s:s + score_batch].astype(np.int64)
                out[:, at:at + len(yc)] = scorer.shares(xc, yc, stacked)
                at += len(yc)
                bar.update(len(yc))
    return out


# ----------------------------------------------------------------------------- the job

def calculate(settings):
    """Run the whole job (see the module docstring). Returns the exit code."""
    with logging_redirect_tqdm():
        return _calculate(settings)


def _calculate(settings):
    timer = time.perf_counter
    if settings.top < 1:
        raise UserError("--top must be at least 1")
    if settings.memory_budget <= 0:
        raise UserError("--memory-budget must be > 0 (GB)")
    if settings.score_batch < 1:
        raise UserError("--score-batch must be at least 1")
    scale = settings.scale_value()
    train, test, classmap = open_archives(settings)
    folders = settings.folders or list(test.folders)
    unknown = [f for f in folders if f not in test.folders]
    if unknown:
        raise UserError(f"no test folder {', '.join(unknown)} in {test.path}; it has: {', '.join(test.folders)}")
    check_resume(settings.out, settings)

    t0 = timer()
    from influence.hvp import Derivatives, TrainingObjective
    from influence.models import load_classifier
    from influence.scoring import Scorer
    from influence.curvature import make_solver

    clf = load_classifier(settings.model, settings.weights, settings.preprocess, settings.params)
    check_compatible(clf, train, test, folders)
    record = RunRecord(settings.out, settings)
    record.add_time("load_model_s", timer() - t0)
    log.info("model %s: %d parameters over %d layers (--params %s); %d training images in %s",
             settings.model, clf.num_params, len(clf.groups), settings.params, len(train), train.path)
    derivs = Derivatives(clf, train.image_shape)
    objective = TrainingObjective(derivs, train, chunk=min(settings.score_batch, 256))
    scorer = Scorer(derivs)
    if not scorer.split:
        log.warning("the model is not functional/sequential: scores have no per-layer split (total only)")
    layer_names = scorer.layer_names if scorer.split else ["all"]
    namer = class_namer(classmap, clf.num_classes)
    itemsize = np.dtype(derivs.dtype.as_numpy_dtype).itemsize
    budget = settings.memory_budget * 2**30
    max_vecs = max(1, int(budget // (4 * clf.num_params * itemsize)))
    score_batch = int(min(settings.score_batch,
                          max(1, budget // (4 * activation_size(clf) * itemsize * max(1, min(max_vecs, 8))))))
    keys = [k for b in train.batches for k in train.keys(b)]
    train_files, train_labels = train.files(), train.labels()
    solver = None
    record.save(num_params=clf.num_params, layers=layer_names, train_images=len(train))

    for folder in folders:
        x, y, files = test.read(folder)
        folder_dir = Path(settings.out) / folder
        log.info("== test folder %s: %d images, %d labels", folder, len(y), len(np.unique(y)))
        probs = np.concatenate([np.zeros((0, clf.num_classes))] +
                               [derivs.predict(x[s:s + 256]).numpy() for s in range(0, len(y), 256)])
        preds, confs = probs.argmax(axis=1), probs.max(axis=1)
        write_predictions_csv(folder_dir / f"{folder}_preds.csv", files, y, preds, confs, namer)
        log.info("   accuracy %.1f%% -> %s", 100.0 * float(np.mean(preds == y)) if len(y) else 0.0,
                 folder_dir / f"{folder}_preds.csv")
        for label in np.unique(y):
            members = np.nonzero(y == label)[0]
            if settings.limit:
                members = members[:settings.limit]
            label_dir = folder_dir / str(int(label))
            todo = [n for n in range(len(members))
                    if settings.overwrite or not outputs_complete(label_dir, n, settings.save_format)]
            skipped = len(members) - len(todo)
            record.data["counts"]["test_images_skipped"] += skipped
            log.info("-- %s / class %d (%s): %d test image(s)%s", folder, label, namer(int(label)), len(members),
                     f", {skipped} already done" if skipped else "")
            if not todo:
                continue
            if solver is None:
                t1 = timer()
                solver = make_solver(settings.solver, objective, settings.damping, iter=settings.iter,
                                     bsize=settings.bsize, repeats=settings.repeats, scale=scale,
                                     seed=settings.seed, cg_tol=settings.cg_tol, cg_maxiter=settings.cg_maxiter,
                                     max_exact_params=settings.max_exact_params)
                solver.fit()
                record.add_time("solver_setup_s", timer() - t1)
            for start in range(0, len(todo), max_vecs):
                chunk = todo[start:start + max_vecs]
                idx = members[chunk]
                t1 = timer()
                grads = [derivs.gradient(x[i:i + 1], y[i:i + 1].astype(np.int64)) for i in idx]
                record.add_time("test_gradients_s", timer() - t1)
                t1 = timer()
                ihvps = solver.solve(grads)
                record.add_time("inverse_hvp_s", timer() - t1)
                t1 = timer()
                shares = score_archive(scorer, train, ihvps, score_batch,
                                       progress_desc=f"scoring {folder}/{int(label)} x{len(chunk)}")
                record.add_time("scoring_s", timer() - t1)
                t1 = timer()
                for j, (n, i) in enumerate(zip(chunk, idx)):
                    scores = shares[j].sum(axis=1)
                    written = write_test_outputs(
                        label_dir, n, scores=scores, shares=shares[j], layer_names=layer_names, keys=keys,
                        train_files=train_files, train_labels=train_labels, class_name=namer,
                        fetch_image=lambda gi: train.take([gi])[0][0], test_image=x[i], test_label=int(y[i]),
                        test_pred=int(preds[i]), test_conf=float(confs[i]), test_file=str(files[i]),
                        top=settings.top, fmt=settings.save_format)
                    log.info("   [%d] %s: true %s, predicted %s (%.1f%%); most harmful %s (%.3g), most useful %s (%.3g)",
                             n, files[i] or f"#{i}", namer(int(y[i])), namer(int(preds[i])), 100 * confs[i],
                             keys[int(np.argmin(scores))], float(scores.min()),
                             keys[int(np.argmax(scores))], float(scores.max()))
                    log.info("       wrote %s/: %s", label_dir, " ".join(p.name for p in written))
                    record.data["counts"]["test_images_done"] += 1
                record.add_time("writing_s", timer() - t1)
            record.save(solver_info=solver.info)
    record.data["timings"]["total_s"] = round(timer() - t0, 3)
    record.save(status="complete", finished=time.strftime("%Y-%m-%d %H:%M:%S"),
                solver_info=solver.info if solver else None)
    done = record.data["counts"]
    log.info("done: %d test image(s) scored, %d already complete; settings and timings in %s",
             done["test_images_done"], done["test_images_skipped"], record.path)
    return 0
