"""The Kronecker-factored Fisher (``--solver kfac`` / ``ekfac``), one module per part, fitted once:

plan (blocks, memory) -> signals (layer inputs, backward signals, the Fisher's labels) -> passes (the two
fitting passes, float64 sums) -> state (:class:`KroneckerFit`, what the cache keeps) -> solve /
self_influence; :mod:`influence.curvature.kfac.solver` holds the solver classes and the conventions.
"""
