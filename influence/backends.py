"""Where the two heavy passes over the training archive run: one process, or shards over Ray.

A backend has three methods, and the calculate job and :class:`influence.Influence` call only them
(never a Ray branch of their own):

* ``fit(solver, archive, *, chunk, key)``: the solver's training-set work (``chunk`` images per call;
  ``key`` the curvature key, :func:`influence.curvature.cache.curvature_key`);
* ``score(scorer, archive, stacked, score_batch, *, key, work=None, desc)``: float32 (T, N, L) shares of
  every training image against the T stacked inverse-HVPs, in archive order. ``work``
  (:class:`Work`) names what is scored, for a backend that keeps resumable partial results;
* ``release(work)``: the partial results of ``work`` are no longer needed (its outputs are written).

:class:`LocalBackend` runs both in this process; :class:`influence.distributed.RayBackend` shards them
over Ray workers, which rebuild the model and solver from the :class:`influence.distributed.WorkerSpec`
that :meth:`influence.Influence.worker_spec` makes (:func:`backend_for`). Both score with the one loop :func:`influence.scoring.scorer.score_batches` (each
Ray shard runs it over its batches), so the numbers are the same bits whichever runs.
"""
import dataclasses

from influence.progress import progress


@dataclasses.dataclass(frozen=True)
class Work:
    """What one scoring call scores: the test images (``items``, each with ``folder``, ``label``,
    ``n``, ``index``) and the fingerprints of the run's archives (``{"train": .., "test": {folder: ..}}``)."""

    items: tuple
    fingerprints: dict


def score_archive(scorer, train, stacked, score_batch, progress_desc="scoring"):
    """Shares of every training image: float32 (T, N, L), in archive order, with a progress bar.

    ``stacked``: a Vec whose parts have a leading axis T (or a list of T Vecs). The loop is
    :func:`influence.scoring.scorer.score_batches`, the same as each Ray shard's.
    """
    from influence.scoring.scorer import score_batches

    with progress(total=len(train), desc=progress_desc, unit="img") as bar:
        return score_batches(scorer, train, stacked, score_batch, bar=bar)


class LocalBackend:
    """Everything in this process: ``solver.fit()`` and one scoring loop over the archive."""

    name = "local"

    def fit(self, solver, archive, *, chunk, key):
        solver.fit()

    def score(self, scorer, archive, stacked, score_batch, *, key, work=None, desc="scoring"):
        return score_archive(scorer, archive, stacked, score_batch, progress_desc=desc)

    def release(self, work):
        pass


def backend_for(inf, *, workers=0, address=None, out=None):
    """The backend of :class:`influence.Influence` ``inf``: Ray with ``workers`` or ``address``
    (:class:`influence.distributed.RayBackend`, its workers rebuilt from ``inf.worker_spec()`` alone,
    their shard scores under ``<out>/parts``), else this process (:class:`LocalBackend`).

    Pass it as ``Influence(..., backend=lambda inf: backend_for(inf, workers=2))``; calculate.py's job
    gets it from :meth:`influence.Influence.from_settings` (``workers``, ``ray_address``, ``out``)."""
    if not (workers or address):
        return LocalBackend()
    from pathlib import Path

    from influence import distributed

    parts = None if out is None else Path(out) / distributed.PARTS
    return distributed.RayBackend(inf.worker_spec(parts=parts), workers=workers, address=address)
