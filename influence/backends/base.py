"""The backend interface, :class:`Work`, and :func:`backend_for`, which picks the backend.

A backend has three methods, and the calculate job and :class:`influence.Influence` call only them
(never a Ray branch of their own):

* ``fit(solver, archive, *, chunk, key)``: the solver's training-set work (``chunk`` images per call;
  ``key`` the curvature key, :func:`influence.curvature.cache.curvature_key`);
* ``score(scorer, archive, stacked, score_batch, *, key, work=None, desc)``: float32 (T, N, L) shares of
  every training image against the T stacked inverse-HVPs, in archive order. ``work``
  (:class:`Work`) names what is scored, for a backend that keeps resumable partial results;
* ``release(work)``: the partial results of ``work`` are no longer needed (its outputs are written);

and ``close()`` (also as a context manager): whatever it started (a Ray runtime) is shut down.
"""
import contextlib
import dataclasses
import os
import shutil
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Work:
    """What one scoring call scores: the test images (``items``, each with ``folder``, ``label``,
    ``n``, ``index``) and the fingerprints of the run's archives (``{"train": .., "test": {folder: ..}}``)."""

    items: tuple
    fingerprints: dict


def backend_for(inf, *, workers=0, address=None, out=None, runtime=None):
    """The backend of :class:`influence.Influence` ``inf``: Ray with ``workers``, ``address`` or a lent
    ``runtime`` (:class:`influence.backends.ray_driver.RayBackend`, its workers rebuilt from
    ``inf.worker_spec()`` alone, their shard scores under ``<out>/parts``), else this process
    (:class:`influence.backends.local.LocalBackend`).

    Pass it as ``Influence(..., backend=lambda inf: backend_for(inf, workers=2))``; calculate.py's job
    gets it from :meth:`influence.Influence.from_settings` (``workers``, ``ray_address``, ``out``, and the
    job's runtime, :func:`job_runtime`)."""
    if not (workers or address or runtime):
        from influence.backends.local import LocalBackend

        return LocalBackend()
    from influence.backends.ray_driver import PARTS, RayBackend

    parts = None if out is None else Path(out) / PARTS
    return RayBackend(inf.worker_spec(parts=parts), workers=workers, address=address, runtime=runtime)


@contextlib.contextmanager
def job_runtime(settings):
    """The Ray runtime of one calculate job (:class:`influence.backends.ray_runtime.RayRuntime`), lent to its
    backends and its calibration: None without ``workers`` / ``ray_address``; with them the settings are
    checked at once, the runtime connects on first use and is shut down at the end if it started, and on
    success the leftover ``<out>/parts`` (of groups no rerun will ask for) are removed."""
    from influence.backends import ray_runtime

    if not ray_runtime.enabled(settings):
        yield None
        return
    ray_runtime.check(settings)
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")   # the driver shares GPU 0 with a worker
    from influence.backends.ray_driver import PARTS

    with ray_runtime.RayRuntime(settings.workers, settings.ray_address) as runtime:
        yield runtime
        parts = Path(settings.out) / PARTS
        if parts.is_dir():
            shutil.rmtree(parts, ignore_errors=True)
