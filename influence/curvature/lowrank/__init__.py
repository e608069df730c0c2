"""The low-rank curvature: the top eigenpairs by Lanczos with a floor for the rest (``--solver krylov``),
its pure numpy (linalg), and CG deflated by the same basis (``--solver dpcg``)."""
