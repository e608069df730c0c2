"""The one scoring loop of both faces (:meth:`influence.Influence.scores` and calculate.py's job):
test images in groups under the memory budget, per group its test gradients, inverse-HVPs and ONE
pass over the training set (:func:`score_groups`); and how test images and labels are read
(:class:`TestImages`: as the training images are, checked in one line before any fit).
"""
import time
from dataclasses import dataclass

import numpy as np

from influence.errors import UserError


@dataclass
class Scored:
    """One group of :func:`score_groups`: test images ``start:stop`` and their float32 shares
    (stop - start, N, L)."""

    start: int
    stop: int
    shares: np.ndarray


class TestImages:
    """How test images and labels are read: images of the training images' ``image_shape`` as the
    derivatives take them (:func:`influence.data.arrays.user_images`: in ``float_dtype`` when the training
    set is float input, else uint8 pixels, ``unit`` for preprocess ``unit``), labels as class indices
    below ``num_classes``. ``takes_float_input``: the model takes float input (a refused float image then
    says why). Each mistake is a one-line :class:`UserError`."""

    __test__ = False

    def __init__(self, image_shape, num_classes, float_dtype=None, unit=False, takes_float_input=False):
        self.image_shape, self.num_classes = tuple(image_shape), int(num_classes)
        self.float_dtype, self.unit, self.takes_float_input = float_dtype, unit, takes_float_input

    def labels(self, labels, n):
        """int64 (n,) class indices."""
        y = np.asarray(labels).reshape(-1)
        if len(y) and not np.issubdtype(y.dtype, np.integer):
            raise UserError(f"labels must be integer class indices, got {y.dtype}")
        y = y.astype(np.int64)
        if len(y) != n:
            raise UserError(f"labels: {len(y)} for {n} images")
        k = self.num_classes
        if len(y) and (y.min() < 0 or y.max() >= k):
            raise UserError(f"labels must be class indices 0..{k - 1}, got {int(y.min())}..{int(y.max())}")
        return y

    def images(self, images):
        """(T, H, W, C) images as the derivatives take them."""
        from influence.data.arrays import user_images

        try:
            return user_images(images, self.float_dtype, self.unit, "images")
        except UserError as exc:
            if self.float_dtype is not None or not self.takes_float_input:
                raise
            raise UserError(f"{exc}; the training images are integer pixels, so test images are read as pixels "
                            f"too: give float training images to score float input as the model's") from None

    def arrays(self, images, labels):
        """``(x, y)``: images (T, H, W, C) (one (H, W, C) image is T = 1) and their labels, checked."""
        x = np.asarray(images)
        if x.ndim == 3:
            x = x[None]
        want = self.image_shape
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise UserError(f"images must be (T, {', '.join(map(str, want))}) like the training images, "
                            f"got {x.shape}")
        x = self.images(x)
        return x, self.labels(labels, len(x))


def gradients(derivs, x, y):
    """``∇L(z_t)`` of each test image of ``x`` (T, H, W, C) with label ``y`` (T,): a list of T Vecs, one
    image per call."""
    return [derivs.gradient(x[t:t + 1], y[t:t + 1]) for t in range(len(y))]


def score_groups(images, labels, ids=None, *, reader, derivs, solve, score, plan, work=None, timings=None,
                 direct=None):
    """Score test images group by group: yields a :class:`Scored` (``start``, ``stop``: the rows of
    ``images``; ``shares``: float32 (stop - start, N, L)) per group of at most ``plan.vectors`` images.

    Args:
      images: (T, H, W, C) arrays (checked and converted by ``reader``, a :class:`TestImages`, before
        ``plan`` is taken: before any fit), or any object with ``len`` whose slices ``images[a:b]`` are
        such arrays (read a group at a time);
      labels: (T,) classes (the label the loss is taken with);
      ids: one hashable per test image, naming it for the solvers that draw random numbers. Default
        ``("api", t)``;
      derivs: the model's derivatives (:func:`gradients`); solve: ``solve(grads, ids)`` -> the group's
        stacked inverse-HVPs; score: ``score(stacked, work, desc, score_batch)`` -> shares (T, N, L);
      plan: the :class:`influence.memory.MemoryPlan` (``vectors``, ``score_batch``), or ``plan(T)`` -> it
        (called once the images are checked);
      work: ``work(start, stop)`` -> what a resuming backend keys a group's partial results by;
      timings: ``timings(phase, seconds)`` (``test_gradients_s``, ``inverse_hvp_s``, ``scoring_s``);
      direct: ``direct(grads)`` -> shares, for a solver that scores without a pass over the training set (the
        gradient store, :mod:`influence.store`): used in place of ``solve`` and ``score``.
    """
    if isinstance(images, (np.ndarray, list, tuple)):   # arrays: checked and converted before any fit
        images, y_all = reader.arrays(images, labels)
    else:
        y_all = reader.labels(labels, len(images))
    ids = [("api", t) for t in range(len(y_all))] if ids is None else list(ids)
    if len(ids) != len(y_all):
        raise UserError(f"ids: {len(ids)} for {len(y_all)} images")
    plan = plan(len(y_all)) if callable(plan) else plan
    clock = time.perf_counter
    note = timings or (lambda phase, seconds: None)
    for start in range(0, len(y_all), plan.vectors):
        stop = min(start + plan.vectors, len(y_all))
        t0 = clock()
        x, y = reader.arrays(images[start:stop], y_all[start:stop])
        grads = gradients(derivs, x, y)
        t1 = clock()
        note("test_gradients_s", t1 - t0)
        if direct is not None:                       # the gradient store: one product, no training pass
            if work is not None:
                work(start, stop)                    # named as every group is (the caller releases it)
            shares = direct(grads)
            del grads
            note("scoring_s", clock() - t1)
            yield Scored(start, stop, shares)
            continue
        stacked = solve(grads, ids[start:stop])
        del grads
        t2 = clock()
        note("inverse_hvp_s", t2 - t1)
        shares = score(stacked, None if work is None else work(start, stop), f"scoring {stop - start} test image(s)",
                       plan.score_batch)
        del stacked
        note("scoring_s", clock() - t2)
        yield Scored(start, stop, shares)
