"""The ``calculate.py`` job: for every test image, score every training image and write the outputs.

Order of work (docs/DESIGN.md, "The calculate job"):

1. checks: archives, model, labels, resume (settings and archive fingerprints in run.json);
2. predictions of every test folder (``<folder>_preds.csv``) and the list of test images to do;
3. curvature: the solver's training-set work, loaded from the curvature cache or fitted and saved;
4. the test images of ALL folders and labels in as few groups as ``--memory-budget`` allows: per
   group their gradients, their inverse-HVPs, then ONE pass over the training archive scoring the
   whole group, then the output files of each image.

Numbers do not depend on the grouping: every solver treats each test vector on its own (LiSSA's
random stream is seeded by the test image's folder, label and number).
"""
import dataclasses
import errno
import json
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np
from tqdm.contrib.logging import logging_redirect_tqdm

from influence import __version__, distributed
from influence.data.archives import TestArchive, TrainArchive, check_same_classes
from influence.data.classes import ClassMap, imagenet_classes
from influence.errors import UserError
from influence.progress import progress
from influence.settings import MATH_SETTINGS, Settings  # noqa: F401  (Settings: the job's input)
from influence.io import atomic_write
from influence.outputs.report import outputs_complete, write_predictions_csv, write_test_outputs

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
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
    check_same_classes(train, test, classmap)
    return train, test, classmap


def check_compatible(clf, train, test, folders):
    """Image size = model input size; every label < number of outputs."""
    want = clf.input_shape
    have = tuple(train.image_shape)
    if len(want) == 3 and want[2] is not None and want[2] != have[2]:
        raise UserError(f"the model takes {want[2]}-channel images but the archives hold {have[2]}-channel (RGB) "
                        f"images: give a model with {have[2]} input channels")
    if len(want) != 3 or any(w is not None and w != h for w, h in zip(want, have)):
        shown = "x".join("?" if w is None else str(w) for w in want)
        raise UserError(f"the archives hold {have[0]}x{have[1]}x{have[2]} images but the model takes {shown}: "
                        f"run prepare_data.py again with --size {want[0]} {want[1]}")
    k = clf.num_classes
    _check_labels("train", train.labels(), k)
    for f in folders:
        _check_labels(f"test folder {f}", test.labels(f), k)


def _check_labels(what, y, k):
    """Every label in 0..k-1, before any work (a GPU would turn a bad one into silent NaN)."""
    if not len(y):
        return
    lo, hi = int(y.min()), int(y.max())
    if lo < 0:
        raise UserError(f"{what}: label {lo} is negative; labels are class indices 0..{k - 1}")
    if hi >= k:
        raise UserError(f"{what}: label {hi} does not exist in a model with {k} outputs (0..{k - 1})")


def class_namer(classmap, num_classes):
    """index -> human name: labels.json first, ImageNet names for 1000-way models, else the index."""
    if classmap is not None:
        return classmap.human
    if num_classes == 1000:
        return NameList([human for _, human in imagenet_classes()])
    return str


class NameList:
    """index -> ``names[index]`` (the index as text outside the list); picklable for the writer processes."""

    def __init__(self, names):
        self.names = list(names)

    def __call__(self, i):
        i = int(i)
        return self.names[i] if 0 <= i < len(self.names) else str(i)


def data_fingerprints(train, test, folders, previous=None):
    """Content fingerprints: ``{"train": hex, "test": {folder: hex}}`` (see TrainArchive.fingerprint).

    Only ``folders`` (this run's) are fingerprinted anew; the other folders keep the digests in
    ``previous`` (an earlier run.json's), which describe the results they hold.
    """
    tests = dict((previous or {}).get("test", {}))
    tests.update({f: test.fingerprint(prefix=f"test_{f}_") for f in folders})
    return {"train": train.fingerprint(), "test": tests}


def previous_run(out):
    """The ``run.json`` of an earlier run into ``out`` as a dict, or None."""
    path = Path(out) / RUN_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError):
        return None


def check_resume(out, settings, fingerprints=None):
    """Refuse to mix results of other math settings or other archives in one --out folder.

    ``fingerprints``: :func:`data_fingerprints` of this run. The training archive must be the
    same; a test folder that already has results must be the same (new folders are fine).
    """
    old_run = previous_run(out)
    if settings.overwrite or old_run is None or not any(Path(out).rglob("*_scores.npy")):
        return
    old = old_run.get("settings", {})
    mine = dataclasses.asdict(settings)
    diff = [k for k in MATH_SETTINGS if k in old and str(old[k]) != str(mine[k])]
    if diff:
        changes = ", ".join(f"{k} {old[k]} -> {mine[k]}" for k in diff)
        raise UserError(f"{out} holds results computed with other settings ({changes}): "
                        f"use another --out, or --overwrite to redo them")
    old_fp = old_run.get("fingerprints")
    if not fingerprints or not old_fp:
        return
    if old_fp.get("train") != fingerprints["train"]:
        raise UserError(f"{out} holds results computed on another training archive (train.npz changed: "
                        f"{old_fp.get('train')} -> {fingerprints['train']}): use another --out, or --overwrite "
                        f"to redo them")
    for folder, digest in fingerprints["test"].items():
        before = old_fp.get("test", {}).get(folder)
        if before is not None and before != digest and (Path(out) / folder).is_dir():
            raise UserError(f"{out} holds results for test folder {folder} computed on other test images "
                            f"(test.npz changed: {before} -> {digest}): use another --out, or --overwrite "
                            f"to redo them")


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
        """Add ``seconds`` to phase ``key``; ``peak_rss_gib[key]`` is this process's peak RSS so far."""
        self.data["timings"][key] = round(self.data["timings"].get(key, 0.0) + seconds, 4)
        peak = peak_rss_bytes()
        if peak:
            self.data.setdefault("peak_rss_gib", {})[key] = round(peak / 2**30, 3)

    def save(self, **extra):
        self.data.update(extra)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(self.path) as tmp:
            Path(tmp).write_text(json.dumps(self.data, indent=2, default=str))



# ----------------------------------------------------------------------------- memory plan

def layer_shapes(clf):
    """Per selected layer ``(positions P, kernel inputs K, output channels C, activation floats)``.

    Read from the Keras graph; a layer whose shapes are unknown counts as 100 000 floats of
    activations and no patches.
    """
    out = []
    for g in clf.groups:
        try:
            shape = [d for d in g.layer.output.shape[1:]]
            act = int(np.prod([d for d in shape if d is not None]))
            positions = int(np.prod([d for d in shape[:-1] if d is not None])) if len(shape) > 1 else 1
        except (AttributeError, ValueError, TypeError):
            act, positions = 100_000, 1
        kernel = getattr(g.layer, "kernel", None)
        if kernel is not None and len(kernel.shape) >= 2:
            k, c = int(np.prod(kernel.shape[:-1])), int(kernel.shape[-1])
        else:
            k, c = 0, 0
        out.append((positions, k, c, max(act, 1)))
    return out


def peak_rss_bytes():
    """This process's peak resident set (``VmHWM``; ``ru_maxrss`` without /proc), or 0 if unknown."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (ImportError, OSError):
        return 0


@dataclasses.dataclass
class MemoryPlan:
    """How a run splits its work to stay within ``--memory-budget`` (docs/DESIGN.md, "Memory").

    ``vectors``: test images whose inverse-HVPs are held (and scored) at once; ``score_batch``:
    training images per scoring call; ``chunk``: training images per HVP / curvature-fitting call;
    ``bytes_per_vector``: what one held test image costs; ``solver_bytes``: what the fitted
    curvature holds (and its per-vector workspace), taken off the budget first.
    """

    vectors: int
    score_batch: int
    chunk: int
    bytes_per_vector: int
    solver_bytes: int = 0


def plan_memory(clf, settings, n_test, solver=None, fitting=False):
    """Split ``--memory-budget`` (GB) between the fitted curvature, the held test vectors and one call.

    The solver's resident state and workspace (``solver.resident_bytes``, ``workspace_bytes``; the
    EK-FAC eigenvectors and eigenvalues) come off first; the rest goes half to the inverse-HVPs held
    together, half to one scoring/HVP call. A held test vector costs ``solver.copies_per_vector``
    parameter-sized arrays (its gradient and its solution; more for iterative solvers). A scoring
    call costs, per training image, the activations and backward signals (4 floats per activation),
    the conv patches and per-image gradients of the gradient route, and the tangent route's T outputs.
    Without a solver (before the fit) only ``chunk`` is meaningful.

    ``fitting``: the plan of ``solver``'s fit: what the fit holds at its peak (``solver.fit_bytes``,
    EK-FAC: float64 factors, eigenbases and ``Λ`` with their copies in the model's dtype) comes off
    first, and ``chunk`` gets all the rest (no test vectors are held while fitting).
    """
    itemsize = np.dtype(clf.dtype.as_numpy_dtype).itemsize
    if solver is None:
        held = 0
    elif fitting:
        held = int(getattr(solver, "fit_bytes", 0) or 0)
    else:
        held = int(solver.resident_bytes + solver.workspace_bytes)
    budget = max(settings.memory_budget * 2**30 - held, 0.1 * settings.memory_budget * 2**30)
    copies = 2 if solver is None else solver.copies_per_vector
    per_vector = copies * clf.num_params * itemsize
    vectors = int(max(1, min(max(n_test, 1), (budget / 2) // per_vector)))
    shapes = layer_shapes(clf)
    act = sum(a for _, _, _, a in shapes)
    patches = sum(p * k + k * c for p, k, c, _ in shapes if p >= 3)
    tangent = sum(p * c for p, k, c, _ in shapes if p < 3)
    per_image_score = itemsize * (4 * act + patches + vectors * tangent)
    per_image_hvp = itemsize * (8 * act + patches)
    score_batch = int(max(1, min(settings.score_batch, (budget / 2) // per_image_score)))
    chunk = int(max(1, min(256, settings.score_batch, (budget if fitting else budget / 2) // per_image_hvp)))
    return MemoryPlan(vectors, score_batch, chunk, per_vector, held)


# ----------------------------------------------------------------------------- scoring pass

def score_archive(scorer, train, stacked, score_batch, progress_desc="scoring"):
    """Shares of every training image: float32 (T, N, L), in archive order, with a progress bar.

    ``stacked``: a Vec whose parts have a leading axis T (or a list of T Vecs). The loop is
    :func:`influence.scoring.scorer.score_batches`, the same as each Ray shard's.
    """
    from influence.scoring.scorer import score_batches

    with progress(total=len(train), desc=progress_desc, unit="img") as bar:
        return score_batches(scorer, train, stacked, score_batch, bar=bar)


# ----------------------------------------------------------------------------- the job

@dataclasses.dataclass
class TestItem:
    """One test image to score: ``n`` counts from 1 within its (folder, label), as the original did."""

    __test__ = False

    folder: str
    label: int
    n: int
    index: int           # position in the folder's arrays

    @property
    def ident(self):
        return (self.folder, self.label, self.n)


_WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)


def calculate(settings):
    """Run the whole job (see the module docstring). Returns the exit code.

    One run at a time writes into an ``--out`` folder (a lock; a second run exits with code 2).
    """
    from influence.locking import folder_lock

    with logging_redirect_tqdm():
        try:
            Path(settings.out).mkdir(parents=True, exist_ok=True)
            with folder_lock(settings.out, what="calculate.py"), distributed.runtime(settings):
                return _calculate(settings)
        except OSError as exc:
            if exc.errno not in _WRITE_ERRORS:
                raise
            where = exc.filename or settings.out
            raise UserError(f"cannot write {where}: {exc.strerror}; free some space or choose another --out "
                            f"(finished test images are kept: a rerun resumes)") from None


def _check_settings(settings):
    if settings.top < 1:
        raise UserError("--top must be at least 1")
    if settings.memory_budget <= 0:
        raise UserError("--memory-budget must be > 0 (GB)")
    if settings.score_batch < 1:
        raise UserError("--score-batch must be at least 1")
    if settings.limit < 0:
        raise UserError(f"--limit must be >= 0 (0 = all test images), got {settings.limit}")
    if settings.ekfac_max_block < 2:
        raise UserError(f"--ekfac-max-block must be at least 2, got {settings.ekfac_max_block}")
    from influence.curvature import REGISTRY

    if settings.solver in REGISTRY:
        REGISTRY[settings.solver].check_damping(settings.damping)
    if settings.self_influence_limit < 0:
        raise UserError(f"--self-influence-limit must be >= 0 (0 = every training image), "
                        f"got {settings.self_influence_limit}")
    return settings.scale_value()


def list_test_items(test, folders, settings):
    """Every test image of the run in folder, label, number order, and those still to do."""
    items, todo = [], []
    for folder in folders:
        y = test.labels(folder)
        for label in np.unique(y):
            members = np.nonzero(y == label)[0]
            if settings.limit:
                members = members[:settings.limit]
            label_dir = Path(settings.out) / folder / str(int(label))
            for n, i in enumerate(members, start=1):
                item = TestItem(folder, int(label), n, int(i))
                items.append(item)
                if settings.overwrite or not outputs_complete(label_dir, n, settings.save_format):
                    todo.append(item)
    return items, todo


def _calculate(settings):
    timer = time.perf_counter
    scale = _check_settings(settings)
    train, test, classmap = open_archives(settings)
    folders = settings.folders or list(test.folders)
    unknown = [f for f in folders if f not in test.folders]
    if unknown:
        raise UserError(f"no test folder {', '.join(unknown)} in {test.path}; it has: {', '.join(test.folders)}")
    if settings.self_influence:
        from influence.scoring.self_influence import check_solver

        check_solver(settings.solver, settings.self_influence_limit or None, len(train))
    old_run = previous_run(settings.out) if not settings.overwrite else None
    fingerprints = data_fingerprints(train, test, folders, (old_run or {}).get("fingerprints"))
    check_resume(settings.out, settings, fingerprints)

    t0 = timer()
    from influence.curvature import make_solver
    from influence.curvature.cache import CurvatureCache, curvature_key
    from influence.model.hvp import Derivatives, TrainingObjective
    from influence.model.models import load_classifier
    from influence.scoring import Scorer

    clf = load_classifier(settings.model, settings.weights, settings.preprocess, settings.params)
    check_compatible(clf, train, test, folders)
    record = RunRecord(settings.out, settings)
    record.add_time("load_model_s", timer() - t0)
    log.info("model %s: %d parameters over %d layers (--params %s); %d training images in %s",
             settings.model, clf.num_params, len(clf.groups), settings.params, len(train), train.path)
    items, todo = list_test_items(test, folders, settings)
    plan = plan_memory(clf, settings, len(todo))
    derivs = Derivatives(clf, train.image_shape)
    objective = TrainingObjective(derivs, train, chunk=plan.chunk, hessian=settings.hessian)
    scorer = Scorer(derivs)
    if not scorer.split:
        log.warning("the model is not functional/sequential: scores have no per-layer split (total only)")
    layer_names = scorer.layer_names if scorer.split else ["all"]
    namer = class_namer(classmap, clf.num_classes)
    keys = [k for b in train.batches for k in train.keys(b)]
    train_files, train_labels = train.files(), train.labels()
    solver_info = (old_run or {}).get("solver_info")
    record.save(num_params=clf.num_params, layers=layer_names, train_images=len(train), fingerprints=fingerprints,
                memory_plan=dataclasses.asdict(plan), solver_info=solver_info)
    page = _open_report(settings, train, test, namer, clf)

    # predictions of every folder; the images of folders with work left stay in memory
    images, preds, confs, files = {}, {}, {}, {}
    for folder in folders:
        x, y, f = test.read(folder)
        probs = np.concatenate([np.zeros((0, clf.num_classes))] +
                               [derivs.predict(x[s:s + 256]).numpy() for s in range(0, len(y), 256)])
        preds[folder], confs[folder], files[folder] = probs.argmax(axis=1), probs.max(axis=1), f
        csv_path = Path(settings.out) / folder / f"{folder}_preds.csv"
        write_predictions_csv(csv_path, f, y, preds[folder], confs[folder], namer)
        page.add_folder(folder, y, preds[folder])
        n_items = sum(1 for it in items if it.folder == folder)
        n_todo = sum(1 for it in todo if it.folder == folder)
        log.info("== test folder %s: %d images, %d labels, accuracy %.1f%%; %d to score%s -> %s", folder, len(y),
                 len(np.unique(y)), 100.0 * float(np.mean(preds[folder] == y)) if len(y) else 0.0, n_todo,
                 f" ({n_items - n_todo} already done)" if n_items > n_todo else "", csv_path)
        if n_todo:
            images[folder] = (np.asarray(x), y)
    record.data["counts"]["test_images_skipped"] = len(items) - len(todo)
    page.write()
    self_todo = settings.self_influence and not _self_influence_done(settings, page, train, namer)
    if not todo and not self_todo:
        return _finish(record, t0, solver_info)

    # curvature: fitted once, cached
    t1 = timer()
    solver = make_solver(settings.solver, objective, settings.damping, iter=settings.iter, bsize=settings.bsize,
                         repeats=settings.repeats, scale=scale, seed=settings.seed, cg_tol=settings.cg_tol,
                         cg_maxiter=settings.cg_maxiter, max_exact_params=settings.max_exact_params,
                         fisher=settings.fisher, ekfac_max_block=settings.ekfac_max_block,
                         memory_budget=settings.memory_budget)
    cache = CurvatureCache(settings.cache or Path(settings.out) / "curvature")
    key = curvature_key(clf, train, model=settings.model, preprocess=settings.preprocess, solver=solver)

    def fit():
        fit_chunk = plan.chunk
        if getattr(solver, "fit_bytes", None) is not None:
            # K-FAC/EK-FAC: the fit's chunk from what the fit itself leaves of --memory-budget
            fit_chunk = objective.chunk = plan_memory(clf, settings, len(todo), solver, fitting=True).chunk
            log.info("%s fit: %.2f GB of --memory-budget %g GB held at its peak; %d training image(s) per chunk",
                     solver.name, solver.fit_bytes / 2**30, settings.memory_budget, fit_chunk)
        if distributed.enabled(settings):
            distributed.fit(solver, settings, train, fit_chunk, key)
        else:
            solver.fit()

    loaded = cache.load_or_fit(solver, key, fit)
    record.add_time("curvature_s", timer() - t1)
    record.data["curvature"] = {"cache": str(cache.path(solver)), "loaded": loaded}
    record.save(solver_info=solver.info)
    if self_todo:
        t1 = timer()
        _run_self_influence(settings, solver, derivs, train, plan, keys, train_files, train_labels, namer, page)
        record.add_time("self_influence_s", timer() - t1)
        record.save(solver_info=solver.info)
    if not todo:
        return _finish(record, t0, solver.info)
    solver.compact()
    plan = plan_memory(clf, settings, len(todo), solver)
    objective.chunk = plan.chunk
    record.save(memory_plan=dataclasses.asdict(plan))
    log.info("scoring %d test image(s) in %d group(s) of at most %d (--memory-budget %g GB); %d training images "
             "per scoring step", len(todo), -(-len(todo) // plan.vectors), plan.vectors, settings.memory_budget,
             plan.score_batch)

    from influence.outputs.writer import OutputWriter, default_workers

    shared = dict(layer_names=layer_names, keys=keys, train_files=train_files, train_labels=train_labels,
                  class_name=namer, top=settings.top, fmt=settings.save_format)
    part_files = []      # (test images done when this group's outputs are written, its parts) with --workers
    with OutputWriter(default_workers(len(todo)), shared=shared) as writer:
        for start in range(0, len(todo), plan.vectors):
            group = todo[start:start + plan.vectors]
            t1 = timer()
            grads = [derivs.gradient(images[it.folder][0][it.index:it.index + 1],
                                     images[it.folder][1][it.index:it.index + 1].astype(np.int64)) for it in group]
            record.add_time("test_gradients_s", timer() - t1)
            t1 = timer()
            stacked = solver.solve_stacked(grads, ids=[it.ident for it in group])
            del grads
            record.add_time("inverse_hvp_s", timer() - t1)
            t1 = timer()
            if distributed.enabled(settings):
                parts = distributed.group_parts(settings, key, fingerprints, group, plan.score_batch)
                shares = distributed.score_archive(settings, train, stacked, plan.score_batch, parts, key,
                                                   progress_desc=f"scoring {len(group)} test image(s)")
                part_files.append((start + len(group), parts))
            else:
                shares = score_archive(scorer, train, stacked, plan.score_batch,
                                       progress_desc=f"scoring {len(group)} test image(s)")
            del stacked
            record.add_time("scoring_s", timer() - t1)
            t1 = timer()
            for j, it in enumerate(group):
                _submit_item(writer, settings, it, shares[j], images, preds, confs, files, train)
            _report_written(writer.collect(wait=False), record, keys, namer, page)
            _drop_finished_parts(part_files, record)
            record.add_time("writing_s", timer() - t1)
            record.save(solver_info=solver.info)
        t1 = timer()
        _report_written(writer.collect(wait=True), record, keys, namer, page)
        _drop_finished_parts(part_files, record)
        record.add_time("writing_s", timer() - t1)
    return _finish(record, t0, solver.info)


def _drop_finished_parts(part_files, record):
    """Remove the score parts of groups whose output files are all written (--workers runs).

    ``part_files`` holds (test images written once the group is, parts) in group order; this run's
    count of written images (``run.json``'s, which starts at 0) says which groups are finished.
    """
    done = record.data["counts"]["test_images_done"]
    while part_files and part_files[0][0] <= done:
        distributed.remove_parts(part_files.pop(0)[1])


def _submit_item(writer, settings, it, shares, images, preds, confs, files, train):
    """Hand one test image's output files to the writer (the displayed training images read here)."""
    from influence.outputs.report import top_indices
    from influence.outputs.writer import Prefetched

    x, y = images[it.folder]
    i = it.index
    scores = shares.sum(axis=1)
    harmful, useful = top_indices(scores, settings.top)
    shown = sorted(set(harmful.tolist()) | set(useful.tolist()))
    fetched = Prefetched(zip(shown, train.take(np.asarray(shown, np.int64))[0])) if shown else Prefetched({})
    label_dir = Path(settings.out) / it.folder / str(it.label)
    facts = dict(item=it, file=str(files[it.folder][i]), label=int(y[i]), pred=int(preds[it.folder][i]),
                 conf=float(confs[it.folder][i]), worst=int(np.argmin(scores)), best=int(np.argmax(scores)),
                 worst_score=float(scores.min()), best_score=float(scores.max()), dir=label_dir, image=x[i],
                 harmful=[(int(j), float(scores[j])) for j in harmful],
                 useful=[(int(j), float(scores[j])) for j in useful])
    writer.submit(facts, write_test_outputs, label_dir, it.n, scores=scores, shares=shares, fetch_image=fetched,
                  test_image=x[i], test_label=facts["label"], test_pred=facts["pred"], test_conf=facts["conf"],
                  test_file=facts["file"])


def _self_influence_done(settings, page, train, namer):
    """True when both self-influence files exist (a resume): the report gets its section back."""
    from influence.scoring.self_influence import expected_outputs

    csv_path, fig_path = expected_outputs(settings.out, settings.save_format)
    if settings.overwrite or not (csv_path.is_file() and fig_path.is_file()):
        return False
    import csv

    with open(csv_path, newline="", encoding="utf-8") as fh:
        rows = [r for _, r in zip(range(SELF_INFLUENCE_ROWS), csv.DictReader(fh))]
    page.add_self_influence([_self_row(r["rank"], r["key"], r["file"], r["label"], r["class_name"],
                                       r["prediction_name"], r["confidence"], r["self_influence"], r["loss"])
                             for r in rows], os.path.relpath(fig_path, settings.out))
    page.write()
    log.info("self-influence: %s exists (use --overwrite to redo it)", csv_path)
    return True


#: training images listed in the report's self-influence section
SELF_INFLUENCE_ROWS = 50


def _self_row(rank, key, file, label, class_name, prediction, confidence, value, loss):
    return (int(rank), str(key), str(file), int(label), str(class_name), str(prediction), float(confidence),
            float(value), float(loss))


def _run_self_influence(settings, solver, derivs, train, plan, keys, train_files, train_labels, namer, page):
    """``∇L(z_i)ᵀ(H + λI)⁻¹∇L(z_i)`` of every training image (or the --self-influence-limit
    highest-loss ones): ``self_influence.csv``, its figure and the report's section."""
    from influence.scoring.self_influence import self_influence, write_self_influence

    limit = settings.self_influence_limit or None
    log.info("self-influence of %s training images (%s solver): which look mislabelled?",
             f"the {limit} highest-loss" if limit else f"all {len(train)}", settings.solver)
    result = self_influence(solver, derivs, train, batch=plan.score_batch, limit=limit, vectors=plan.vectors)
    csv_path, fig_path = write_self_influence(settings.out, result, keys, train_files, train_labels, namer,
                                              lambda gi: train.take([gi])[0][0], settings.top,
                                              settings.save_format)
    order = result.ranking()
    rows = []
    for rank, j in enumerate(order[:SELF_INFLUENCE_ROWS].tolist(), start=1):
        i = int(result.indices[j])
        rows.append(_self_row(rank, keys[i], train_files[i], train_labels[i], namer(int(train_labels[i])),
                              namer(int(result.preds[j])), result.confs[j], result.values[j], result.losses[j]))
    page.add_self_influence(rows, os.path.relpath(fig_path, settings.out))   # the report takes it from --out
    page.write()
    if len(order):
        top = int(result.indices[order[0]])
        log.info("   highest self-influence: %s (%s, label %s, predicted %s); wrote %s and %s", keys[top],
                 train_files[top] or "?", namer(int(train_labels[top])), namer(int(result.preds[order[0]])),
                 csv_path, fig_path.name)


def _open_report(settings, train, test, namer, clf):
    """The HTML report (``<out>/index.html``), rebuilt from the files already there (resume)."""
    from influence.outputs.html_report import RunReport

    summary = {"model": settings.model, "params": f"{settings.params} ({clf.num_params:,} parameters)",
               "solver": settings.solver, "damping": settings.damping, "training images": len(train),
               "score": "grad L_test . (H + damping I)^-1 grad L_train; positive = useful, negative = harmful"}
    return RunReport.scan(settings.out, train, namer, summary, settings.save_format, test_archive=test, first_n=1)


def _report_written(done, record, keys, namer, page):
    """Log and count the test images whose files are written; add them to the HTML report."""
    for f, written in done:
        it = f["item"]
        log.info("   %s/%d [%d] %s: true %s, predicted %s (%.1f%%); most harmful %s (%.3g), most useful %s (%.3g)",
                 it.folder, it.label, it.n, f["file"] or f"#{it.index}", namer(f["label"]), namer(f["pred"]),
                 100 * f["conf"], keys[f["worst"]], f["worst_score"], keys[f["best"]], f["best_score"])
        log.info("       wrote %s/: %s", f["dir"], " ".join(p.name for p in written))
        record.data["counts"]["test_images_done"] += 1
        page.add(it.folder, it.label, it.n, f["image"], f["file"], f["label"], f["pred"], f["conf"], f["harmful"],
                 f["useful"])
    if done:
        page.write()


def _finish(record, t0, solver_info):
    log.info("the whole run in one page: %s", Path(record.path).parent / "index.html")
    record.data["timings"]["total_s"] = round(time.perf_counter() - t0, 3)
    record.save(status="complete", finished=time.strftime("%Y-%m-%d %H:%M:%S"), solver_info=solver_info)
    done = record.data["counts"]
    log.info("done: %d test image(s) scored, %d already complete; settings and timings in %s",
             done["test_images_done"], done["test_images_skipped"], record.path)
    return 0
