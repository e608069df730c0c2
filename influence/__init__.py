"""Influence functions for image classifiers (Koh & Liang 2017) on TensorFlow 2 / Keras 3.

The Python API is :class:`influence.Influence` (:mod:`influence.api`): scores as arrays. The package, one
line per sub-package and module, in the order the data flows through them (the same list as README.md's and
docs/DESIGN.md's; tests/test_layout.py checks them against each other and the files):

influence/                        the package: influence.Influence, the Python API (api.py)
  data/                           1. image folders <-> npz archives
    archive_reader.py             the npz format; TrainArchive, TestArchive (memory-mapped readers)
    archive_writer.py             ArchiveWriter: an archive member by member, atomically
    arrays.py                     data as a notebook has it: arrays, float or uint8, any batched training set
    classes.py                    class-name <-> index maps, labels.json; imagenet_classes.json beside it
    images.py                     walking folders, decoding and resizing with PIL
    prepare.py                    the prepare_data / prepare_only_test jobs
    digits.py                     the bundled demo digits (digits.npz beside it)
  model/                          2. the classifier and its derivatives
    keras_models.py               a Keras model by name: keras.applications or a model file
    models.py                     Classifier, load_classifier: preprocessing, logits without the softmax, --params
    derivatives.py                per-image losses, gradients, Hessian- and Gauss-Newton-vector products
    objective.py                  the training objective's products over a training set
    vectors.py                    parameter vectors (Vecs)
    taps.py                       capturing each selected layer's input and pre-activation output
    training_state.py             how the model was trained: the optimizer state --damping optimizer reads
    keras_private.py              every use of Keras's private API, each failing with one line if gone
  curvature/                      3. inverse-HVPs behind one registry (--solver)
    base.py                       InverseHVP, the interface, and REGISTRY
    damping.py                    what --damping means: absolute, or relative to the curvature's scale
    choice.py                     --solver auto and --damping auto
    cache.py                      the curvature cache: fitted states on disk, keyed
    exact.py                      exact: the dense Hessian in float64 (the reference)
    iterative/                    products over the training set per test vector
      cg.py                       cg: conjugate gradient
      lissa.py                    lissa: the stochastic recursion of Koh & Liang
      lockstep.py                 CG of a group's vectors in lockstep, preconditioned (pcg's and dpcg's)
      pcg.py                      pcg: CG preconditioned by EK-FAC
    kfac/                         kfac, ekfac: the Kronecker-factored Fisher, fitted once
      solver.py                   KFACSolver, EKFACSolver: the parts composed; the conventions
      plan.py                     the blocks, splitting, regularisers, memory
      signals.py                  layer inputs, backward signals, the Fisher's labels
      passes.py                   the two fitting passes (float64 sums)
      state.py                    KroneckerFit: the fitted state as one value (what the cache keeps)
      solve.py                    the damped eigenvalues and the solve per test vector
      self_influence.py           self-influence in the Kronecker eigenbasis
    lowrank/                      the top eigenpairs with a floor for the rest
      krylov.py                   krylov: Lanczos fit, rank rule, memory, self-influence
      linalg.py                   its pure numpy: Lanczos, Ritz pairs, the inverse, the Nystrom preconditioner
      dpcg.py                     dpcg: CG deflated by the krylov basis
  store/                          the gradient store: projected training gradients logged once, queried many
    damping.py                    the projected curvature damped (λ, per layer, or the run's D) and inverted whole or per layer
    projection.py                 each layer's gradient projected on both sides (K-FAC eigenvectors or seeded rows)
    shards.py                     the float16 shards on disk: content-keyed, atomic, resumable, memory-mapped
    solver.py                     --solver store: the projected Gauss-Newton matrix, inverted densely; one product a test
  scoring/                        4. scores
    scorer.py                     batched scores with the per-layer split, two routes chosen by cost
    groups.py                     the scoring loop: test images in groups that fit the memory budget
    self_influence.py             --self-influence: each training image scored against itself
  outputs/                        5. files on disk
    report.py                     a test image's files: CSVs, score dicts, figures (atomic writes)
    ranking.py                    which training images they show
    strips.py                     the harmful and useful figures
    summary.py                    the summary figure: influence by training class and by layer
    figure_book.py                the figures, laid out once per process and reused
    figure_style.py               the figures' shared look
    raster.py                     png and jpg figures: pictures pasted in, text drawn by Pillow
    writer.py                     writing in background processes, as many as the measured times call for
    self_influence.py             the self-influence CSV and figure
    html_scan.py                  what the offline report holds, built as the run goes or scanned from disk
    html_render.py                the report's pages as HTML text
    html_report.py                RunReport: the report, its pages written when they change
  calibration/                    --calibrate: the LDS of a (solver, damping) grid on the user's model
    grid.py                       the grid's numbers: LDS per cell, ceiling, choice, verdict
    retrain.py                    retraining on half-subsets, its cache
    scoring.py                    each solver fitted once, its dampings scored together
    core.py                       calibrate() and the Calibration result and its files
    job.py                        calculate.py's calibration step
    saved_choice.py               the table kept for later runs on the same model
    shards.py                     the retrainings as Ray tasks
    lds_metrics.py                the pure LDS numbers (the LDS panel's too)
    stats.py                      Pearson and Spearman correlations
  experiments/                    shipped experiments on top of the library (it never imports them)
    demo.py                       make demo (python -m influence.demo)
    validate_cli.py               python -m influence.validate: the leave-one-out check
    panels.py                     one leave-one-out panel: score, retrain, compare, draw
    problems.py                   the leave-one-out problems: trained model, data, retraining
    mislabel.py                   the mislabelled-images experiment
    arrays.py                     the bundled digits as in-memory training sets
    lds.py                        the LDS panel
    lds_models.py                 the models the LDS panel retrains
    lds_retrain.py                the LDS panel's retraining cache
    dense_reference.py            the LDS panel's dense Gauss-Newton reference
  api.py                          the Python API: influence.Influence
  settings.py                     a run's settings, each with its help text and check
  engine.py                       the calculate.py job, a client of the API
  build.py                        the one builder: model, training set, derivatives, objective (driver and Ray worker)
  worklist.py                     what a run scores and what is left to do
  backends/                       where the training-set passes run
    base.py                       the interface, Work, backend_for, the job's Ray runtime
    local.py                      LocalBackend: this process
    ray_runtime.py                RayRuntime: starting or joining the cluster, owned by one object
    ray_driver.py                 RayBackend: shard plans, sharded sums and scoring, the parts files
    ray_worker.py                 WorkerSpec and the tasks a worker runs
  memory.py                       the --memory-budget plan
  catalogue.py                    training keys, files, labels and class names
  run_record.py                   run.json and the resume check
  io.py                           atomic_write: nothing half-written under a final name
  errors.py                       UserError, SettingError
  cli.py                          argparse pieces and the script entry (exit code 2 on a UserError)
  calculate_cli.py                calculate.py's flags
  prepare_cli.py                  prepare_data.py's and prepare_only_test.py's flags
  progress.py                     progress bars, or plain log lines in a file
  locking.py                      one writer per output folder
  tf_import.py                    importing TensorFlow without its start-up lines
  demo.py                         python -m influence.demo (experiments/demo.py)
  validate.py                     python -m influence.validate (experiments/validate_cli.py)
"""
__version__ = "0.1.0"

from influence.api import Influence  # noqa: E402  (the Python API; heavy imports happen on first use)

__all__ = ["Influence", "__version__"]
