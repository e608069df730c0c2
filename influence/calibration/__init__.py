"""``--calibrate``: how far can the scores be trusted on this model? (issue 30)

The model is retrained from scratch on ``M`` random half-subsets of its training set (its own compiled
optimizer and loss, or a user's ``train_fn``), and each (solver, damping) of a small grid is scored by the
LDS (linear datamodeling score: Spearman over the subsets of the predicted against the actual change of
each test image's loss), against the noise ceiling of two training seeds. calculate.py then uses the best
cell unless its solver or damping was given (:mod:`~influence.calibration.job`).

  grid      -- the pure numbers: the grid, LDS per cell, ceiling, choice, verdict
  retrain   -- the retrainings and their cache (atomic, keyed by content, resumable)
  scoring   -- each solver fitted once, its dampings scored in shared passes over the training set
  core      -- :func:`calibrate` and its result :class:`Calibration` (table, verdict, files)
  job       -- calculate.py's step: settings in, the run's solver and damping out, run.json and files
  saved_choice -- the table kept in the curvature cache: later runs on the same model take its best cell
  shards    -- with calculate.py's workers / ray_address: each retraining a Ray task
  lds_metrics, stats -- the pure LDS numbers (subsets, predicted changes, LDS, ceiling) and rank
                statistics, which the LDS panel (influence.experiments.lds) imports too
"""
from influence.calibration.core import Calibration, calibrate  # noqa: F401

__all__ = ["Calibration", "calibrate"]
