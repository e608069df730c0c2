"""Methods that iterate on products with the whole training set per test vector: conjugate gradient
(``cg``), LiSSA's stochastic recursion (``lissa``), and CG in lockstep preconditioned by EK-FAC (``pcg``;
lockstep: what pcg and dpcg share)."""
