"""The backend of one process: ``solver.fit()`` and one scoring loop over the archive."""
from influence.progress import progress


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

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
