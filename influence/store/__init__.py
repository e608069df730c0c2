"""The gradient store: log once, query many (issue 31; README, "The gradient store").

* :mod:`influence.store.projection` -- the per-layer projections (both sides of each Dense/Conv layer);
* :mod:`influence.store.shards` -- the store on disk: float16 memory-mapped shards, content-keyed, resumable;
* :mod:`influence.store.solver` -- ``--solver store``: the one training pass, the projected Gauss–Newton
  matrix, and each test image's scores as one product with the store.
"""
import influence.curvature  # noqa: F401,E402  (the registry first: it registers this package's solver)
