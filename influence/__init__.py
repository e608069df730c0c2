"""Influence functions for image classifiers (Koh & Liang 2017) on TensorFlow 2 / Keras 3.

Modules, one job each:
  errors    -- UserError: the one-line, exit-code-2 kind of failure
  cli       -- shared argparse pieces and the script entry wrapper
  classes   -- class-name <-> index maps (ImageNet wnids, folder names), labels.json
  images    -- walking image folders, decoding and resizing with PIL
  archives  -- the .npz archive format: streaming writer and readers
  prepare   -- prepare_data.py / prepare_only_test.py jobs
  models    -- loading Keras models, preprocessing, logits, parameter selection
  hvp       -- losses, gradients and Hessian-vector products
  solvers   -- inverse-HVP solvers: exact, cg, lissa; lambda_max
  scoring   -- batched influence scores with a per-layer split
  report    -- figures, CSV files and score dicts
  engine    -- calculate.py job: ties the above together
"""
__version__ = "0.1.0"
