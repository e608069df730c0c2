"""Influence functions for image classifiers (Koh & Liang 2017) on TensorFlow 2 / Keras 3.

Sub-packages in the order the data flows through them; :mod:`influence.engine` drives them:
  data       -- image folders <-> npz archives: images, classes, archives, prepare; bundled digits
  model      -- the Keras classifier: models (loading, logits, --params), derivatives (gradients, HVPs),
                objective (the training set's products), vectors, taps
  curvature  -- inverse-HVP methods behind one registry: exact, cg, lissa, kfac/ekfac, pcg, krylov, dpcg;
                the choice of --solver auto; the cache
  scoring    -- scorer (batched influence scores with a per-layer split), self_influence
  calibration -- --calibrate / Influence.calibrate: the LDS of a (solver, damping) grid against the model
                retrained on random half-subsets (cached), the noise ceiling, the best cell
  outputs    -- report (CSV files, score dicts, figures), strips and summary (the figures, laid out once),
                writer (background writing), html_report

The Python API: :class:`influence.Influence` (:mod:`influence.api`) -- scores as arrays.

Top-level modules:
  engine     -- calculate.py job: ties the above together; worklist -- what a run scores, what is left to do
  build      -- the one builder of model, training set, derivatives and objective (driver and Ray worker)
  backends   -- where the training-set passes run: this process (local) or Ray (ray_runtime, ray_driver,
                ray_worker)
  cli, calculate_cli -- shared argparse pieces, the script entry wrapper, calculate.py's flags
  errors     -- UserError: the one-line, exit-code-2 kind of failure
  progress, locking -- progress bars / plain log lines; one writer per output folder
  demo, validate -- ``python -m influence.demo`` and ``python -m influence.validate``
"""
__version__ = "0.1.0"

from influence.api import Influence  # noqa: E402  (the Python API; heavy imports happen on first use)

__all__ = ["Influence", "__version__"]
