"""Where the two heavy passes over the training archive run: one process, or shards over Ray.

* :mod:`~influence.backends.base`: the interface (``fit``, ``score``, ``release``, ``close``), :class:`Work`,
  :func:`backend_for` (which backend an :class:`influence.Influence` gets) and :func:`job_runtime`
  (calculate.py's Ray runtime, lent to its backends);
* :mod:`~influence.backends.local`: :class:`LocalBackend`, this process;
* Ray, one backend in three modules: :mod:`~influence.backends.ray_runtime` (starting or joining the
  cluster, owned by a ``RayRuntime``), :mod:`~influence.backends.ray_driver` (shard plans, the sharded
  fit's sums, sharded scoring and its parts files, ``RayBackend``) and :mod:`~influence.backends.ray_worker`
  (the ``WorkerSpec`` and the tasks a worker runs).

Both backends score with the one loop :func:`influence.scoring.scorer.score_batches` (each Ray shard
runs it over its batches), so the numbers are the same bits whichever runs. Ray is optional: it is
imported only when a Ray backend connects.
"""
from influence.backends.base import Work, backend_for, job_runtime
from influence.backends.local import LocalBackend

__all__ = ["Work", "backend_for", "job_runtime", "LocalBackend"]
