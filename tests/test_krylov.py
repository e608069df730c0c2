"""The low-rank curvature (``--solver krylov``) and CG deflated by it (``--solver dpcg``) against dense float64
eigendecompositions: the pure numpy core (influence.curvature.lowrank.linalg), then the solvers on the tiny model's
Gauss–Newton matrix and full Hessian. (Full-rank exactness is in tests/test_curvature_contract.py.)"""
import logging

import numpy as np
import pytest

from engine_helpers import dense_hessian, per_example_gradients, to_vec
from influence.curvature.lowrank import krylov as krylov_module
from influence.curvature import make_solver
from influence.curvature.lowrank import linalg as lowrank
from influence.errors import SettingError, UserError
from influence.model.objective import TrainingObjective
from influence.model.vectors import vec_dot, vec_to_numpy
from influence.scoring.self_influence import check_solver, self_influence
from test_curvature_contract import dense_ggn
from test_ekfac import tiny_setup


def spectrum_matrix(p=240, top=40, floor=2e-4, seed=0):
    """A symmetric (P, P) matrix with ``top`` decaying eigenvalues above a noisy plateau at ``floor``."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((p, p)))
    w = np.concatenate([0.3 * np.exp(-np.arange(top) / 6.0), floor + rng.uniform(0, floor / 20, p - top)])
    return (q * w) @ q.T


def dense_lowrank(a, k, floor, lam, v):
    w, q = np.linalg.eigh(a)
    w, q = w[::-1][:k], q[:, ::-1][:, :k]
    c = v @ q
    return (v - c @ q.T) / (floor + lam) + (c / (w + lam)) @ q.T


# ----------------------------------------------------------------------------- the numpy core

def test_lanczos_finds_the_top_eigenpairs_in_at_most_two_products_per_pair():
    a = spectrum_matrix()
    k = 20
    calls = []
    alpha, beta, basis = lowrank.lanczos(lambda v: calls.append(1) or a @ v, len(a), 2 * k)
    assert len(calls) == len(alpha) == 2 * k
    np.testing.assert_allclose(basis @ basis.T, np.eye(2 * k), atol=1e-12)      # full reorthogonalisation
    theta, residual, u = lowrank.ritz_pairs(alpha, beta, basis, k)
    want = np.linalg.eigvalsh(a)[::-1]
    assert lowrank.converged(theta, residual, 1e-2)[:k].all()
    np.testing.assert_allclose(theta[:k], want[:k], rtol=1e-6)
    # the residual the tridiagonal promises is the true one
    true = np.linalg.norm(u @ a - theta[:k, None] * u, axis=1)
    np.testing.assert_allclose(residual[:k], true, rtol=1e-3, atol=1e-12)
    assert theta[-1] >= want[-1] - 1e-12 and theta[0] <= want[0] + 1e-12      # Ritz values interlace


def test_lanczos_crosses_an_invariant_subspace():
    """Three distinct eigenvalues: the Krylov space closes after 3 steps, then Lanczos restarts orthogonally."""
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((30, 30)))
    w = np.repeat([3.0, 2.0, 1.0], 10)
    a = (q * w) @ q.T
    alpha, beta, basis = lowrank.lanczos(lambda v: a @ v, 30, 30)
    assert len(alpha) == 30
    np.testing.assert_allclose(basis @ basis.T, np.eye(30), atol=1e-10)
    theta, _ = lowrank.ritz_values(alpha, beta)
    np.testing.assert_allclose(theta, np.sort(w)[::-1], atol=1e-10)


def test_lowrank_inverse_preconditioner_and_self_quadratic_match_dense_formulas():
    a = spectrum_matrix(p=80, top=10)
    rng = np.random.default_rng(2)
    v = rng.standard_normal((3, 80))
    w, q = np.linalg.eigh(a)
    u, sigma = q[:, ::-1][:, :10].T, w[::-1][:10]
    floor, lam = w[::-1][10], 1e-3
    got = lowrank.lowrank_inverse(u, sigma, floor, lam, v)
    np.testing.assert_allclose(got, dense_lowrank(a, 10, floor, lam, v), rtol=1e-10)
    # the whole spectrum kept: the exact inverse
    exact = lowrank.lowrank_inverse(q.T, w, 0.0, lam, v)
    np.testing.assert_allclose(exact, np.linalg.solve(a + lam * np.eye(80), v.T).T, rtol=1e-8)
    np.testing.assert_allclose(lowrank.nystrom_precondition(u, sigma, floor, lam, v), (floor + lam) * got)
    quad = lowrank.self_quadratic(v @ u.T, (v * v).sum(1), sigma, floor, lam)
    np.testing.assert_allclose(quad, (v * got).sum(1), rtol=1e-10)
    # the preconditioned matrix's spectrum is squeezed to [λ/(φ+λ)·..., 1]: condition about (φ+λ)/λ
    pinv = lowrank.nystrom_precondition(u, sigma, floor, lam, np.eye(80))
    ev = np.linalg.eigvals(pinv @ (a + lam * np.eye(80))).real
    assert ev.max() / ev.min() < 1.01 * (floor + lam) / lam + 1
    assert (w[-1] + lam) and np.linalg.cond(a + lam * np.eye(80)) > 50 * ev.max() / ev.min()


# ----------------------------------------------------------------------------- the solvers

@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The tiny model, its objectives and two vectors: what the tests without a dense matrix need."""
    clf, d, obj, archive, x, y = tiny_setup(tmp_path_factory.mktemp("krylov"), n=64)
    ggn = TrainingObjective(d, archive, chunk=obj.chunk, hessian="ggn")
    v = np.random.default_rng(5).standard_normal((2, clf.num_params))
    return dict(clf=clf, d=d, obj=obj, ggn_obj=ggn, archive=archive, x=x, y=y, V=v)


@pytest.fixture(scope="module")
def tiny(small):
    """``small`` with the dense float64 Gauss–Newton matrix and Hessian (the costly part)."""
    d, x, y = small["d"], small["x"], small["y"]
    return dict(small, GGN=dense_ggn(d, x, y), H=dense_hessian(d, x, y))


def counting(obj):
    """Wrap ``obj.hvp_full`` so that the products taken can be counted."""
    calls = []
    inner = obj.hvp_full

    def hvp_full(v, indices=None):
        calls.append(1)
        return inner(v, indices)
    obj.hvp_full = hvp_full
    return calls, lambda: setattr(obj, "hvp_full", inner)


@pytest.mark.slow
def test_krylov_on_the_gauss_newton_matrix_is_the_dense_top_k_with_a_floor(tiny):
    g, d, lam, k = tiny["GGN"], tiny["d"], 0.01, 12
    calls, restore = counting(tiny["ggn_obj"])
    try:
        s = make_solver("krylov", tiny["ggn_obj"], lam, rank=k, progress=False)
        s.fit()
    finally:
        restore()
    assert len(calls) == s.info["products"] <= 2 * k
    want = np.linalg.eigvalsh(g)[::-1]
    kept = s.info["rank"]
    assert kept == s.info["converged"] >= k // 2                 # the leading converged pairs only
    residual = np.asarray(s.info["residuals"][:kept])
    assert (residual <= krylov_module.RTOL * s._sigma).all()
    np.testing.assert_allclose(s._sigma, want[:kept], rtol=1e-4)
    assert want[-1] <= s.info["floor"] <= want[kept] * (1 + 1e-9)          # a Ritz value: below σ_{k+1}
    got = np.stack([vec_to_numpy(o) for o in s.solve([to_vec(v, d) for v in tiny["V"]])])
    err = np.linalg.norm(got - dense_lowrank(g, kept, s.info["floor"], lam, tiny["V"])) / np.linalg.norm(got)
    assert err < 1e-2, err


def test_krylov_self_influence_is_g_dot_its_own_solution(small):
    d, x, y = small["d"], small["x"][:6], small["y"][:6]
    s = make_solver("krylov", small["ggn_obj"], 0.01, rank=10, progress=False)
    s.fit()
    got = s.self_influence_batch(x, y)
    grads = per_example_gradients(d, x, y)
    want = [float(vec_dot(to_vec(gi, d), s.solve([to_vec(gi, d)])[0])) for gi in grads]
    np.testing.assert_allclose(got, want, rtol=1e-8)


def test_krylov_cached_state_gives_the_same_answer_with_no_product(small):
    d = small["d"]
    s = make_solver("krylov", small["ggn_obj"], 0.01, rank=10, progress=False)
    s.fit()
    state = {k: np.array(v) for k, v in s.state().items()}
    calls, restore = counting(small["ggn_obj"])
    try:
        again = make_solver("krylov", small["ggn_obj"], 0.01, rank=10, progress=False)
        again.load_state(state)
        a = [vec_to_numpy(o) for o in again.solve([to_vec(v, d) for v in small["V"]])]
    finally:
        restore()
    assert calls == []
    b = [vec_to_numpy(o) for o in s.solve([to_vec(v, d) for v in small["V"]])]
    np.testing.assert_array_equal(a, b)
    assert again.info["products"] == s.info["products"]
    # a relative damping: the mean eigenvalue's estimate is cached with the basis, so no product either
    s = make_solver("krylov", small["ggn_obj"], "0.1x", rank=10, progress=False)
    s.fit()
    state = {k: np.array(v) for k, v in s.state().items()}
    calls, restore = counting(small["ggn_obj"])
    try:
        again = make_solver("krylov", small["ggn_obj"], "0.1x", rank=10, progress=False)
        again.load_state(state)
        assert again.damping == s.damping > 0
    finally:
        restore()
    assert calls == []


@pytest.mark.slow
def test_krylov_auto_rank_keeps_the_pairs_well_above_the_floor(tiny):
    lam = 0.01
    s = make_solver("krylov", tiny["ggn_obj"], lam, rank="auto", progress=False)
    s.fit()
    theta = np.asarray(s.info["ritz_values"])
    limit = krylov_module.AUTO_RATIO * (max(theta[-1], 0) + lam)
    assert s.info["rank"] == int(np.sum(theta[:s.info["converged"]] >= limit))
    assert 0 < s.info["rank"] < tiny["clf"].num_params
    assert s.info["floor"] < limit


def test_krylov_refuses_a_basis_above_the_memory_budget_naming_rank_and_params(small):
    s = make_solver("krylov", small["ggn_obj"], 0.01, rank=50, memory_budget=1e-5, progress=False)
    with pytest.raises(SettingError, match=r"^rank: solver krylov with rank 50 over [\d,]+ parameters needs .* "
                                           r"above 50% of memory_budget 1e-05 GB: lower rank \(at most \d+ fits\), "
                                           r"choose fewer parameters with params"):
        s.fit()
    with pytest.raises(SettingError, match="^rank: must be a positive integer or auto, got 'ten'$"):
        make_solver("krylov", small["ggn_obj"], 0.01, rank="ten", progress=False)


@pytest.mark.slow
def test_krylov_on_the_full_hessian_floors_negative_curvature_and_refuses_it_when_kept(tiny, caplog):
    """``--hessian full``: negative eigenvalues beyond the rank kept are damped by max(φ, 0) + λ (a warning);
    a kept eigenvalue with σ + λ <= 0 is refused."""
    h, d = tiny["H"], tiny["d"]
    w = np.linalg.eigvalsh(h)
    assert w[0] < -1e-3
    lam = 0.5 - w[0]
    p = len(h)
    with caplog.at_level(logging.WARNING, logger="influence.curvature.lowrank.krylov"):
        s = make_solver("krylov", tiny["obj"], 1e-3, rank=p, progress=False)
        with pytest.raises(UserError, match="not positive definite"):
            s.fit()                                       # all of H kept, its negative part below -λ
    s = make_solver("krylov", tiny["obj"], lam, rank=p, progress=False)
    s.fit()
    got = vec_to_numpy(s.solve([to_vec(tiny["V"][0], d)])[0])
    np.testing.assert_allclose(got, np.linalg.solve(h + lam * np.eye(p), tiny["V"][0]), rtol=1e-7)
    # rank 10 of an indefinite H: the negative directions fall into the complement, damped by max(φ, 0) + λ
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="influence.curvature.lowrank.krylov"):
        s = make_solver("krylov", tiny["obj"], 1e-3, rank=10, progress=False)
        s.fit()
    assert s.info["floor"] >= 0 and s.info["smallest_ritz_value"] < 0
    assert any("damped by the floor, not inverted" in r.message for r in caplog.records)


@pytest.mark.slow
def test_dpcg_reaches_cg_answer_in_fewer_passes_than_cg(tiny):
    g, d, lam = tiny["GGN"], tiny["d"], 1e-3
    want = np.linalg.solve(g + lam * np.eye(len(g)), tiny["V"].T).T
    passes = {}
    for name in ("cg", "dpcg"):
        s = make_solver(name, tiny["ggn_obj"], lam, rank=20, cg_tol=1e-8, cg_maxiter=500, progress=False)
        s.fit()
        got = np.stack([vec_to_numpy(o) for o in s.solve([to_vec(v, d) for v in tiny["V"]])])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
        passes[name] = sum(s.info["hvp_passes"])
    assert passes["dpcg"] <= 0.75 * passes["cg"], passes      # the demo CNN: BENCHMARKS.md


def test_dpcg_self_influence_is_krylovs_from_the_same_basis(small):
    """dpcg scores the training set against itself through its krylov basis, not by CG: the numbers of
    ``--solver krylov`` with the same pairs and damping, through the whole-set route (no limit needed)."""
    k = make_solver("krylov", small["ggn_obj"], 0.01, rank=10, progress=False)
    k.fit()
    s = make_solver("dpcg", small["ggn_obj"], 0.01, rank=10, progress=False)
    s.load_state({name: np.array(v) for name, v in k.state().items()})
    calls, restore = counting(small["ggn_obj"])
    try:
        got = self_influence(s, small["d"], small["archive"], batch=16, progress=False)     # every image, no limit
    finally:
        restore()
    assert calls == []                                   # no HVP: no CG per image
    want = self_influence(k, small["d"], small["archive"], batch=16, progress=False)
    assert len(got.values) == len(small["y"]) and got.method.startswith("dpcg (")
    np.testing.assert_array_equal(got.values, want.values)
    assert s.self_influence_route and s.self_influence_ready()
    check_solver("dpcg", None)                           # no self_influence_limit asked for
