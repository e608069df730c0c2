"""Low-rank curvature with a floor: pure numpy (docs/DESIGN.md, "Low-rank curvature with a floor").

For a symmetric ``A`` (P, P) known only through products ``v ↦ A v``:

* :func:`lanczos` builds an orthonormal Krylov basis ``Q`` (m, P) and the tridiagonal ``T = Q A Qᵀ``,
  reorthogonalising every new vector against all of ``Q`` (twice), so ``m`` products give ``m`` usable
  directions;
* :func:`ritz_pairs` turns ``(T, Q)`` into approximate eigenpairs ``(σ_j, u_j)``, largest first, each with
  its residual ``‖A u_j − σ_j u_j‖ = |β_m s_mj|`` (no extra product);
* :func:`lowrank_inverse` applies ``(A + λI)⁻¹ ≈ U (Σ + λ)⁻¹ Uᵀ + (I − U Uᵀ) / (φ + λ)``, where ``φ`` is
  the *floor*: the curvature assumed for every direction the basis does not hold (``σ_{k+1}``);
* :func:`nystrom_precondition` applies ``P⁻¹ = (φ + λ) U (Σ + λ)⁻¹ Uᵀ + (I − U Uᵀ)`` (Frangella, Tropp &
  Udell 2023), which leaves CG on ``P⁻¹(A + λI)`` a condition number near ``(φ + λ)/λ``;
* :func:`self_quadratic` gives ``gᵀ(A + λI)⁻¹g`` for many ``g`` from ``Uᵀg`` and ``‖g‖²``.

Vectors are rows: ``U`` is (k, P), a block of vectors ``V`` is (T, P). Nothing here knows TensorFlow.
"""
import math

import numpy as np


def lanczos(apply, size, steps, *, dtype=np.float64, seed=0, start=None, check=None, every=10):
    """Lanczos with full reorthogonalisation.

    Args:
      apply: (P,) ``dtype`` -> (P,) array, ``A v`` for a symmetric ``A`` (one call per step).
      size: P.
      steps: the most products to take (m ≤ P).
      dtype: of the stored basis (the model's: float32 halves the memory of a large basis).
      seed, start: the start vector (default standard normal from ``seed``).
      check: optional ``(alpha, beta) -> bool`` called every ``every`` steps; True stops early.

    Returns:
      ``(alpha (m,), beta (m,), Q (m, P))`` with ``T = diag(alpha) + offdiag(beta[:-1])`` and ``beta[-1]``
      the norm of the last residual (0 when the Krylov space is invariant). When a step finds an invariant
      subspace before ``steps`` it continues from a fresh random vector orthogonal to ``Q`` with a zero
      coupling (``A`` symmetric keeps the complement invariant too), so ``m = steps`` unless ``Q`` spans
      everything (``m = P``).
    """
    steps = int(min(steps, size))
    rng = np.random.default_rng(seed)
    q = np.asarray(start, np.float64) if start is not None else rng.standard_normal(size)
    basis = np.zeros((steps, size), dtype)
    alpha = np.zeros(steps)
    beta = np.zeros(steps)
    q = q / np.linalg.norm(q)
    for j in range(steps):
        basis[j] = q
        w = np.asarray(apply(basis[j]), np.float64)
        alpha[j] = float(q @ w)
        for _ in range(2):              # twice is enough (Giraud, Langou & Rozložník)
            coef = basis[:j + 1] @ w.astype(dtype)
            w = w - np.asarray(coef, np.float64) @ basis[:j + 1]
        b = float(np.linalg.norm(w))
        beta[j] = b
        if j + 1 == steps:
            break
        scale = max(abs(alpha[:j + 1]).max(), 1e-300)
        if b <= 1e-10 * scale:          # invariant subspace: restart orthogonally, uncoupled
            beta[j] = 0.0
            w = rng.standard_normal(size)
            for _ in range(2):
                w = w - np.asarray(basis[:j + 1] @ w.astype(dtype), np.float64) @ basis[:j + 1]
            b = float(np.linalg.norm(w))
            if b <= 1e-8 * math.sqrt(size):
                return alpha[:j + 1], beta[:j + 1], basis[:j + 1]
        q = w / b
        if check is not None and (j + 1) % every == 0 and check(alpha[:j + 1], beta[:j + 1]):
            return alpha[:j + 1], beta[:j + 1], basis[:j + 1]
    return alpha, beta, basis


def tridiagonal(alpha, beta):
    """(m, m) dense ``T`` from the diagonal ``alpha`` (m,) and the couplings ``beta[:m-1]``."""
    m = len(alpha)
    t = np.diag(np.asarray(alpha, np.float64))
    if m > 1:
        off = np.asarray(beta[:m - 1], np.float64)
        t += np.diag(off, 1) + np.diag(off, -1)
    return t


def ritz_values(alpha, beta):
    """``(θ (m,), residual (m,))`` largest first: the eigenvalues of ``T`` and ``|β_m s_mj|``."""
    theta, s = np.linalg.eigh(tridiagonal(alpha, beta))
    order = np.argsort(theta)[::-1]
    return theta[order], np.abs(beta[len(alpha) - 1] * s[-1, order])


def ritz_pairs(alpha, beta, basis, count):
    """The ``count`` largest Ritz pairs: ``(θ (m,), residual (m,), U (count, P))``.

    ``θ`` and ``residual`` cover all ``m`` Ritz values (largest first) so that the caller can take the
    floor ``θ[count]``; ``U = S[:, :count]ᵀ Q`` in ``basis``' dtype, orthonormal rows.
    """
    theta, s = np.linalg.eigh(tridiagonal(alpha, beta))
    order = np.argsort(theta)[::-1]
    theta, s = theta[order], s[:, order]
    residual = np.abs(beta[len(alpha) - 1] * s[-1])
    count = int(min(count, len(theta)))
    u = (s[:, :count].T.astype(basis.dtype)) @ basis
    return theta, residual, u


def converged(theta, residual, rtol):
    """(m,) bool: ``residual ≤ rtol · max(|θ|, 10⁻⁶ max|θ|)`` (Ritz pairs close to eigenpairs; a value
    near zero is judged against the top of the spectrum)."""
    theta = np.asarray(theta, np.float64)
    top = float(np.abs(theta).max()) if theta.size else 0.0
    return residual <= rtol * np.maximum(np.abs(theta), max(1e-6 * top, 1e-300))


def lowrank_inverse(u, sigma, floor, lam, v):
    """``(A + λI)⁻¹ v`` with ``A ≈ Uᵀ Σ U + φ (I − UᵀU)``.

    Shapes: ``u`` (k, P) orthonormal rows, ``sigma`` (k,), ``floor`` φ and ``lam`` λ scalars, ``v`` (T, P)
    -> (T, P) float64. Requires ``σ_j + λ > 0`` and ``φ + λ > 0``.
    """
    v = np.asarray(v, np.float64)
    c = np.asarray(v @ u.T.astype(np.float64) if u.dtype != np.float64 else v @ u.T)      # (T, k)
    inside = (c / (np.asarray(sigma, np.float64) + lam) - c / (floor + lam)) @ u
    return v / (floor + lam) + inside


def nystrom_precondition(u, sigma, floor, lam, v):
    """``P⁻¹ v = (φ + λ) U (Σ + λ)⁻¹ Uᵀ v + (I − UUᵀ) v``: (T, P) -> (T, P), same shapes as
    :func:`lowrank_inverse` (of which it is ``(φ + λ)`` times)."""
    return (floor + lam) * lowrank_inverse(u, sigma, floor, lam, v)


def self_quadratic(projections, norms2, sigma, floor, lam):
    """``gᵀ (A + λI)⁻¹ g`` of many vectors from ``c = U g`` (N, k) and ``‖g‖²`` (N,) -> (N,) float64:
    ``Σ_j c_j²/(σ_j + λ) + (‖g‖² − Σ_j c_j²)/(φ + λ)`` (the complement's share clipped at 0)."""
    c2 = np.asarray(projections, np.float64) ** 2
    inside = c2 @ (1.0 / (np.asarray(sigma, np.float64) + lam))
    rest = np.maximum(np.asarray(norms2, np.float64) - c2.sum(axis=1), 0.0)
    return inside + rest / (floor + lam)


def diagonal_woodbury(u, sigma, floor, diagonal):
    """The pieces of ``(A + D)⁻¹`` with ``A ≈ Uᵀ Σ U + φ (I − UᵀU) = Uᵀ (Σ − φ) U + φ I`` and a positive
    diagonal ``D``: ``E = D + φ`` and the k × k core ``C = (K⁻¹ + U E⁻¹ Uᵀ)⁻¹`` with ``K = Σ − φ``, written
    ``K^{1/2} (I + K^{1/2} U E⁻¹ Uᵀ K^{1/2})⁻¹ K^{1/2}`` (no ``K⁻¹``: a pair at the floor adds nothing).

    Shapes: ``u`` (k, P) orthonormal rows, ``sigma`` (k,) with ``σ_j ≥ φ``, ``floor`` φ ≥ 0, ``diagonal``
    (P,) > 0 -> ``(1/E (P,), C (k, k))``, both float64 (:func:`diagonal_inverse`, :func:`diagonal_quadratic`).
    """
    u = np.asarray(u, np.float64)
    inv_e = 1.0 / (np.asarray(diagonal, np.float64) + float(floor))
    root = np.sqrt(np.maximum(np.asarray(sigma, np.float64) - float(floor), 0.0))
    m = (u * inv_e) @ u.T                                           # U E⁻¹ Uᵀ (k, k)
    inner = np.eye(len(root)) + root[:, None] * m * root[None, :]
    core = root[:, None] * np.linalg.solve(inner, np.diag(root))
    return inv_e, 0.5 * (core + core.T)


def diagonal_inverse(u, pieces, v):
    """``(A + D)⁻¹ v = E⁻¹ v − E⁻¹ Uᵀ C U E⁻¹ v`` (Woodbury) from :func:`diagonal_woodbury`'s ``pieces``:
    ``u`` (k, P), ``v`` (T, P) -> (T, P) float64."""
    inv_e, core = pieces
    w = np.asarray(v, np.float64) * inv_e                           # E⁻¹ v (T, P)
    c = w @ np.asarray(u, np.float64).T                             # U E⁻¹ v (T, k)
    return w - ((c @ core) @ np.asarray(u, np.float64)) * inv_e


def diagonal_quadratic(u, pieces, g):
    """``gᵀ (A + D)⁻¹ g`` of each row of ``g`` (N, P) -> (N,) float64, from the same pieces."""
    inv_e, core = pieces
    g = np.asarray(g, np.float64)
    c = (g * inv_e) @ np.asarray(u, np.float64).T                   # U E⁻¹ g (N, k)
    return np.einsum("np,np->n", g * inv_e, g) - np.einsum("nk,kl,nl->n", c, core, c)
