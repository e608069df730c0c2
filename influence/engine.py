"""The ``calculate.py`` job: for every test image, score every training image and write the outputs.

A client of the public API: the model, derivatives, training objective, solver, scorer, curvature
cache and backend (one process or Ray) all come from :meth:`influence.Influence.from_settings`, and
every number from its methods. The job is a pipeline of phases (docs/DESIGN.md, "The calculate job"),
each a function of small value objects:

1. **load** (:func:`load_inputs`, :func:`load_model`): checks of the settings, archives, model and
   labels; ``solver auto`` resolved on the loaded model (:mod:`influence.curvature.choice`: the job runs
   on settings naming the method chosen); the resume check (settings and archive fingerprints in
   run.json, :mod:`influence.run_record`);
2. **predict** (:func:`predict`): predictions of every test folder (``<folder>_preds.csv``) and the
   :class:`TestSet` still to do;
3. **fit** (:func:`fit_curvature`): the solver's training-set work, loaded from the curvature cache or
   fitted and saved; then **self-influence** (:func:`self_influence_phase`) when asked for;
4. the test images of ALL folders and labels still to do, scored by the API's own loop
   (:meth:`influence.Influence.score_groups`: as few groups as ``memory_budget`` allows, per group test
   gradients, inverse-HVPs, ONE scoring pass over the training archive), then **writing** each
   image's output files as its group comes.

The job adds only what a command line adds: the output folder and its lock, resuming (the work list,
run.json) and the files. Numbers do not depend on the grouping: every solver treats each test vector
on its own (LiSSA's random stream is seeded by the test image's id, here its folder, label and
number: ``Influence.scores(..., ids=...)`` with the same ids gives the same numbers).
"""
import dataclasses
import errno
import logging
import os
import time
from pathlib import Path

import numpy as np
from tqdm.contrib.logging import logging_redirect_tqdm

from influence.backends.base import Work, job_runtime
from influence.catalogue import TrainCatalogue, class_namer
from influence.data.archive_reader import TestArchive, TrainArchive, check_same_classes
from influence.data.classes import ClassMap
from influence.errors import SettingError, UserError
from influence.outputs.report import write_predictions_csv, write_test_outputs
from influence.run_record import RunRecord, check_resume, data_fingerprints, previous_run
from influence.settings import Settings
from influence.worklist import TestFolder, list_tests

log = logging.getLogger(__name__)
timer = time.perf_counter


# ----------------------------------------------------------------------------- value objects

@dataclasses.dataclass
class Inputs:
    """What the load phase opened: the archives, labels.json, this run's test folders, the content
    fingerprints and the earlier run.json (None with ``overwrite`` or none there)."""

    train: TrainArchive
    test: TestArchive
    classmap: object
    folders: list
    fingerprints: dict
    old_run: dict = None


@dataclasses.dataclass
class Job:
    """The run's settings, its ``run.json`` record, its HTML report and its start time."""

    settings: Settings
    record: RunRecord
    page: object
    t0: float


# ----------------------------------------------------------------------------- the job

_WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)


def calculate(settings, given=()):
    """Run the whole job (see the module docstring). Returns the exit code.

    ``given``: names of the settings given explicitly (calculate.py's flags,
    :func:`influence.settings.given_settings`), which ``solver auto`` reads. One run at a time writes
    into an ``out`` folder (a lock; a second run exits with code 2).
    """
    from influence.locking import folder_lock

    _check_settings(settings)             # every setting's own check, before any work (Ray included)
    with logging_redirect_tqdm():
        try:
            Path(settings.out).mkdir(parents=True, exist_ok=True)
            with folder_lock(settings.out, what="calculate.py"), job_runtime(settings) as runtime:
                return _calculate(settings, frozenset(given), runtime)
        except OSError as exc:
            if exc.errno not in _WRITE_ERRORS:
                raise
            where = exc.filename or settings.out
            raise UserError(f"cannot write {where}: {exc.strerror}; free some space or choose another out folder "
                            f"(finished test images are kept: a rerun resumes)") from None


def _calculate(settings, given, runtime=None):
    """The pipeline: load -> predict -> fit curvature -> self-influence -> per group of test images:
    test gradients -> inverse-HVPs -> score -> write. ``runtime``: the job's Ray runtime (None: this process)."""
    inputs = load_inputs(settings)
    job, inf = load_model(settings, inputs, given, runtime)
    settings = job.settings               # solver auto resolved
    tests = list_tests(inputs.test, inputs.folders, settings)
    plan = inf.plan(len(tests.todo))       # before the fit: what self-influence holds at once
    catalogue = TrainCatalogue.of(inputs.train, class_namer(inputs.classmap, inf.clf.num_classes))
    solver_info = (inputs.old_run or {}).get("solver_info")
    job.record.save(solver=inf.solver_name, solver_choice=inf.solver_choice,
                    num_params=inf.clf.num_params, layers=inf.layer_names, train_images=len(inputs.train),
                    fingerprints=inputs.fingerprints, memory_plan=dataclasses.asdict(plan), solver_info=solver_info)
    job.page = _open_report(settings, inputs, catalogue.namer, inf.clf)
    predict(job, inf, inputs, tests)
    self_todo = settings.self_influence and not _self_influence_done(job, catalogue)
    if not tests.todo and not self_todo:
        return _finish(job, solver_info)
    with _writer(settings, inf, catalogue, len(tests.todo)) as writer:    # its processes start during the fit
        fit_curvature(job, inf)
        if self_todo:
            self_influence_phase(job, inf, plan, catalogue)
        if tests.todo:
            score_and_write(job, inf, inputs, tests, catalogue, writer)
    return _finish(job, inf.solver.info)


def _writer(settings, inf, catalogue, n_todo):
    """The writer of the test images' files (:mod:`influence.outputs.writer`), made before the fit: its
    processes start, import matplotlib and lay out their figures while the curvature is fitted."""
    from influence.outputs.figure_book import FigureBook, warm_up
    from influence.outputs.writer import OutputWriter, default_workers

    shared = dict(layer_names=inf.layer_names, catalogue=catalogue, top=settings.top, fmt=settings.save_format,
                  figures=settings.figures, book=FigureBook())
    workers = default_workers(n_todo) if settings.figures else 0    # the numbers alone: written here
    return OutputWriter(workers, shared=shared, warm=warm_up)


def score_and_write(job, inf, inputs, tests, catalogue, writer):
    """The test images still to do, scored by the API's loop group by group (:meth:`Influence.score_groups`),
    each group's files handed to ``writer`` as it comes."""
    plan = plan_scoring(job, inf, len(tests.todo))
    pending = []      # (test images done once a group's outputs are written, its Work): kept results to release
    works = {}        # the Work of each group being scored (the backend keeps its results until released)
    groups = inf.score_groups(tests.view(tests.todo), tests.labels(tests.todo), [it.ident for it in tests.todo],
                              plan=plan, timings=job.record.add_time,
                              work=lambda a, b: works.setdefault(a, Work(tuple(tests.todo[a:b]), inputs.fingerprints)))
    t_group = timer()
    for scored in groups:
        start, group, shares = scored.start, tests.todo[scored.start:scored.stop], scored.shares
        pending.append((start + len(group), works.pop(start)))
        writer.expect(score_s=(timer() - t_group) / len(group), scoring_left=start + len(group) < len(tests.todo))
        write(job, writer, tests, group, shares, catalogue, inputs.train)
        _release_written(job, inf.backend, pending)
        job.record.save(solver_info=inf.solver.info)
        del shares, scored
        t_group = timer()
    t1 = timer()
    _report_written(job, catalogue, writer.collect(wait=True))
    _release_written(job, inf.backend, pending)
    job.record.add_time("writing_s", timer() - t1)


# ----------------------------------------------------------------------------- phase: load

def _check_settings(settings):
    """The settings' own limits, before any work (each error names its setting): each field's check
    (:meth:`Settings.check`), then the damping against the solver that will take it (for ``auto``,
    every method it may choose)."""
    settings.check()
    from influence.curvature import REGISTRY
    from influence.curvature.choice import AUTO, CANDIDATES

    for name in CANDIDATES if settings.solver == AUTO else [settings.solver]:
        if name in REGISTRY:
            REGISTRY[name].check_damping(settings.damping)


def load_inputs(settings):
    """Archives, labels.json, test folders, fingerprints -> :class:`Inputs` (the checks that need the
    solver: :func:`check_run`, once it is chosen)."""
    train, test, classmap = open_archives(settings)
    folders = settings.folders or list(test.folders)
    unknown = [f for f in folders if f not in test.folders]
    if unknown:
        raise SettingError("folders", f"no test folder {', '.join(unknown)} in {test.path}; it has: "
                                      f"{', '.join(test.folders)}")
    old_run = previous_run(settings.out) if not settings.overwrite else None
    fingerprints = data_fingerprints(train, test, folders, (old_run or {}).get("fingerprints"))
    return Inputs(train, test, classmap, folders, fingerprints, old_run)


def check_run(settings, inputs, solver=None):
    """The checks that need the solver (``settings.solver`` a method, not ``auto``): self-influence
    with it, and the resume check against an earlier run in ``out`` (with what ``solver`` resolved from auto)."""
    if settings.self_influence:
        from influence.scoring.self_influence import check_solver

        check_solver(settings.solver, settings.self_influence_limit or None, len(inputs.train))
    resolved = solver.resolved_facts() if hasattr(solver, "resolved_facts") else None
    check_resume(settings.out, settings, inputs.fingerprints, resolved)


def load_model(settings, inputs, given=(), runtime=None):
    """The model checked against the archives, as an :class:`influence.Influence` (``solver auto``
    resolved on it, ``given`` the settings given explicitly, its backend on the job's Ray ``runtime``
    when there is one), and the run checked (:func:`check_run`) -> (:class:`Job` with the resolved
    settings, it)."""
    from influence.api import Influence

    t0 = timer()

    def build(s):
        return Influence.from_settings(s, inputs.train, given=given, runtime=runtime,
                                       check=lambda clf: check_compatible(clf, inputs.train, inputs.test,
                                                                          inputs.folders))

    inf = build(settings)
    settings = dataclasses.replace(settings, solver=inf.solver_name, damping=inf.settings.damping)
    calibration, used, t_load = None, None, timer() - t0
    if settings.calibrate:               # --calibrate: may change the solver and damping the run uses
        from influence.calibration.job import calibrate_run

        settings, inf, calibration = calibrate_run(settings, inputs, inf, frozenset(given), build, runtime)
    else:                                # a calibration kept from an earlier --calibrate on this model
        from influence.calibration.job import use_saved

        settings, inf, used = use_saved(settings, inf, frozenset(given), build)
    check_run(settings, inputs, inf.solver)
    job = Job(settings, RunRecord(settings.out, settings), None, t0)
    job.record.add_time("load_model_s", t_load)
    if calibration is not None:
        job.record.data["calibration"] = calibration
        job.record.add_time("calibrate_s", calibration["seconds"])
    if used is not None:
        job.record.data["calibration_used"] = used
    log.info("model %s: %d parameters over %d layers (params %s); %d training images in %s",
             settings.model, inf.clf.num_params, len(inf.clf.groups), settings.params, len(inputs.train),
             inputs.train.path)
    if not inf.scorer.split:
        log.warning("the model is not functional/sequential: scores have no per-layer split (total only)")
    return job, inf


def open_archives(settings):
    data = Path(settings.data)
    if not data.is_dir():
        raise SettingError("data", f"folder not found: {data} (run prepare_data.py first)")
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
    """Image size = model input size; every label < number of outputs: the training set's check, the one the
    Python API runs (:func:`influence.model.models.check_training_set`, naming ``data`` here), and the test
    folders' labels; a SettingError naming ``data``."""
    from influence.model.models import check_training_set, label_problem

    check_training_set(clf, train, "data")
    for f in folders:
        message = label_problem("label", test.labels(f), clf.num_classes)
        if message:
            raise SettingError("data", f"test folder {f}: {message}")


# ----------------------------------------------------------------------------- phase: predict

def predict(job, inf, inputs, tests):
    """Predictions of every folder -> ``<folder>_preds.csv`` and the report; ``tests.folders`` filled
    (the images of folders with work left stay in memory)."""
    settings, page, namer = job.settings, job.page, job.page.class_name
    for folder in inputs.folders:
        x, y, f = inputs.test.read(folder)
        probs = inf.predict(x)
        preds, confs = probs.argmax(axis=1), probs.max(axis=1)
        csv_path = Path(settings.out) / folder / f"{folder}_preds.csv"
        write_predictions_csv(csv_path, f, y, preds, confs, namer)
        page.add_folder(folder, y, preds)
        n_items = sum(1 for it in tests.items if it.folder == folder)
        n_todo = sum(1 for it in tests.todo if it.folder == folder)
        log.info("== test folder %s: %d images, %d labels, accuracy %.1f%%; %d to score%s -> %s", folder, len(y),
                 len(np.unique(y)), 100.0 * float(np.mean(preds == y)) if len(y) else 0.0, n_todo,
                 f" ({n_items - n_todo} already done)" if n_items > n_todo else "", csv_path)
        tests.folders[folder] = TestFolder(y, preds, confs, f, np.asarray(x) if n_todo else None)
    job.record.data["counts"]["test_images_skipped"] = len(tests.items) - len(tests.todo)
    page.write()


# ----------------------------------------------------------------------------- phase: fit curvature

def fit_curvature(job, inf):
    """The solver's curvature: loaded from the cache, or fitted (on the backend, in chunks of the memory
    plan: :meth:`influence.Influence.fit`) and saved."""
    t1 = timer()
    inf.fit()
    job.record.add_time("curvature_s", timer() - t1)
    job.record.data["curvature"] = {"cache": str(inf.cache_path()), "loaded": inf.loaded}
    job.record.save(solver_info=inf.solver.info)


def plan_scoring(job, inf, n_todo):
    """After the fit: the plan of the scoring groups (:meth:`influence.Influence.prepare`: the solver
    compacted, chunk and score_batch from the memory budget), recorded -> :class:`influence.memory.MemoryPlan`."""
    plan = inf.prepare(n_todo)
    job.record.save(memory_plan=dataclasses.asdict(plan))
    return plan


# ----------------------------------------------------------------------------- phases of a group

def write(job, writer, tests, group, shares, catalogue, train):
    """Hand each test image's output files to the writer; report and count those written."""
    t1 = timer()
    for j, it in enumerate(group):
        _submit_item(job, writer, tests, it, shares[j], train)
    _report_written(job, catalogue, writer.collect(wait=False))
    job.record.add_time("writing_s", timer() - t1)


def _submit_item(job, writer, tests, it, shares, train):
    """One test image's output files to the writer (the displayed training images read here)."""
    from influence.outputs.ranking import top_indices
    from influence.outputs.writer import Prefetched

    test = tests.test_image(it)
    scores = shares.sum(axis=1)
    harmful, useful = top_indices(scores, job.settings.top)
    shown = sorted(set(harmful.tolist()) | set(useful.tolist()))
    fetched = Prefetched(zip(shown, train.take(np.asarray(shown, np.int64))[0]) if shown and job.settings.figures
                         else {})
    label_dir = Path(job.settings.out) / it.folder / str(it.label)
    facts = dict(item=it, test=test, worst=int(np.argmin(scores)), best=int(np.argmax(scores)),
                 worst_score=float(scores.min()), best_score=float(scores.max()), dir=label_dir,
                 harmful=[(int(j), float(scores[j])) for j in harmful],
                 useful=[(int(j), float(scores[j])) for j in useful])
    writer.submit(facts, write_test_outputs, label_dir, it.n, scores=scores, shares=shares, test=test,
                  fetch_image=fetched)


def _release_written(job, backend, pending):
    """Let the backend drop the kept results of groups whose output files are all written.

    ``pending`` holds (test images written once the group is, its Work) in group order; this run's
    count of written images (``run.json``'s, which starts at 0) says which groups are finished.
    """
    done = job.record.data["counts"]["test_images_done"]
    while pending and pending[0][0] <= done:
        backend.release(pending.pop(0)[1])


def _report_written(job, catalogue, done):
    """Log and count the test images whose files are written; add them to the HTML report."""
    keys, namer = catalogue.keys, catalogue.namer
    for f, written in done:
        it, test = f["item"], f["test"]
        log.info("   %s/%d [%d] %s: true %s, predicted %s (%.1f%%); most harmful %s (%.3g), most useful %s (%.3g)",
                 it.folder, it.label, it.n, test.file or f"#{it.index}", namer(test.label), namer(test.pred),
                 100 * test.conf, keys[f["worst"]], f["worst_score"], keys[f["best"]], f["best_score"])
        log.info("       wrote %s/: %s", f["dir"], " ".join(p.name for p in written))
        job.record.data["counts"]["test_images_done"] += 1
        job.page.add(it.folder, it.label, it.n, test, f["harmful"], f["useful"])
    if done:
        job.page.write()


# ----------------------------------------------------------------------------- phase: self-influence

#: training images listed in the report's self-influence section
SELF_INFLUENCE_ROWS = 50


_SELF_ROW_TYPES = (int, str, str, int, str, str, float, float, float)


def _self_row(values):
    """A row of the report's self-influence section: (rank, key, file, label, class name, prediction
    name, confidence, self-influence, loss), each of its type."""
    return tuple(t(v) for t, v in zip(_SELF_ROW_TYPES, values))


def _self_influence_done(job, catalogue):
    """True when both self-influence files exist (a resume): the report gets its section back."""
    from influence.outputs.self_influence import expected_outputs

    settings = job.settings
    csv_path, fig_path = expected_outputs(settings.out, settings.save_format)
    if settings.overwrite or not (csv_path.is_file() and fig_path.is_file()):
        return False
    import csv

    with open(csv_path, newline="", encoding="utf-8") as fh:
        rows = [r for _, r in zip(range(SELF_INFLUENCE_ROWS), csv.DictReader(fh))]
    columns = ("rank", "key", "file", "label", "class_name", "prediction_name", "confidence", "self_influence", "loss")
    job.page.add_self_influence([_self_row([r[c] for c in columns]) for r in rows],
                                os.path.relpath(fig_path, settings.out))
    job.page.write()
    log.info("self-influence: %s exists (set overwrite to redo it)", csv_path)
    return True


def self_influence_phase(job, inf, plan, catalogue):
    """``∇L(z_i)ᵀ(H + λI)⁻¹∇L(z_i)`` of every training image (or the ``self_influence_limit``
    highest-loss ones): ``self_influence.csv``, its figure and the report's section."""
    from influence.outputs.self_influence import write_self_influence

    settings, t1 = job.settings, timer()
    limit = settings.self_influence_limit or None
    log.info("self-influence of %s training images (%s solver): which look mislabelled?",
             f"the {limit} highest-loss" if limit else f"all {len(inf.train)}", settings.solver)
    result = inf.self_influence(limit, batch=plan.score_batch, vectors=plan.vectors)
    train, cat = inf.train, catalogue
    csv_path, fig_path = write_self_influence(settings.out, result, cat, lambda gi: train.take([gi])[0][0],
                                              top=settings.top, fmt=settings.save_format)
    order = result.ranking()
    rows = []
    for rank, j in enumerate(order[:SELF_INFLUENCE_ROWS].tolist(), start=1):
        i = int(result.indices[j])
        rows.append(_self_row((rank, cat.keys[i], cat.files[i], cat.labels[i], cat.namer(int(cat.labels[i])),
                               cat.namer(int(result.preds[j])), result.confs[j], result.values[j], result.losses[j])))
    job.page.add_self_influence(rows, os.path.relpath(fig_path, settings.out))   # the report takes it from out
    job.page.write()
    if len(order):
        top = int(result.indices[order[0]])
        log.info("   highest self-influence: %s (%s, label %s, predicted %s); wrote %s and %s", cat.keys[top],
                 cat.files[top] or "?", cat.namer(int(cat.labels[top])), cat.namer(int(result.preds[order[0]])),
                 csv_path, fig_path.name)
    job.record.add_time("self_influence_s", timer() - t1)
    job.record.save(solver_info=inf.solver.info)


# ----------------------------------------------------------------------------- report and end

def _open_report(settings, inputs, namer, clf):
    """The HTML report (``<out>/index.html``), rebuilt from the files already there (resume)."""
    from influence.outputs.html_report import RunReport

    summary = {"model": settings.model, "params": f"{settings.params} ({clf.num_params:,} parameters)",
               "solver": settings.solver, "damping": settings.damping, "training images": len(inputs.train),
               "score": "grad L_test . (H + damping I)^-1 grad L_train; positive = useful, negative = harmful"}
    return RunReport.scan(settings.out, inputs.train, namer, summary, settings.save_format, figures=settings.figures,
                          test_archive=inputs.test, first_n=1)


def _finish(job, solver_info):
    record = job.record
    log.info("the whole run in one page: %s", Path(record.path).parent / "index.html")
    record.data["timings"]["total_s"] = round(timer() - job.t0, 3)
    record.save(status="complete", finished=time.strftime("%Y-%m-%d %H:%M:%S"), solver_info=solver_info)
    done = record.data["counts"]
    log.info("done: %d test image(s) scored, %d already complete; settings and timings in %s",
             done["test_images_done"], done["test_images_skipped"], record.path)
    return 0
