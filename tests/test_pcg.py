"""--solver pcg: CG preconditioned by EK-FAC, test vectors in lockstep (the dense check of its answer
is in tests/test_curvature_contract.py)."""
import numpy as np
import pytest
import tensorflow as tf

from engine_helpers import dense_hessian, to_vec
from influence.curvature import make_solver
from influence.curvature.iterative.cg import conjugate_gradient
from influence.curvature.iterative.lockstep import hvp_full_many, lockstep_pcg
from influence.errors import UserError
from influence.model.vectors import vec_to_numpy
from test_ekfac import tiny_setup


def np_vec(a):
    return (tf.constant(a[:3].reshape(3, 1)), tf.constant(a[3:]))


def test_lockstep_iterates_like_one_cg_per_vector():
    rng = np.random.default_rng(0)
    m = rng.standard_normal((9, 9))
    a = m @ m.T + 0.1 * np.eye(9)
    prec_m = np.diag(1.0 / np.diag(a))

    def apply(v):
        return np_vec(a @ vec_to_numpy(v))

    def precondition(v):
        return np_vec(prec_m @ vec_to_numpy(v))

    calls = []

    def apply_many(vs):
        calls.append(len(vs))
        return [apply(v) for v in vs]

    vs = [np_vec(rng.standard_normal(9)) for _ in range(3)]
    vs[2] = np_vec(a @ vec_to_numpy(vs[0]) * 1e-3)      # a different right-hand side scale
    x0s = [np_vec(rng.standard_normal(9)) for _ in range(3)]
    together = lockstep_pcg(apply_many, vs, tol=1e-10, maxiter=50, precondition=precondition, x0s=x0s)
    for v, x0, (x, it, res) in zip(vs, x0s, together):
        alone, it1, res1 = conjugate_gradient(apply, v, tol=1e-10, maxiter=50, x0=x0, precondition=precondition)
        assert it == it1 and res == pytest.approx(res1, rel=1e-6, abs=1e-14)
        np.testing.assert_allclose(vec_to_numpy(x), vec_to_numpy(alone), rtol=1e-10)
        np.testing.assert_allclose(vec_to_numpy(x), np.linalg.solve(a, vec_to_numpy(v)), rtol=1e-8)
    # one pass per iteration serves every vector still running, and finished ones drop out
    its = [r[1] for r in together]
    assert len(calls) == 1 + max(its) and calls[0] == 3 and calls[-1] == its.count(max(its))


@pytest.fixture(scope="module")
def dense_layer(tmp_path_factory):
    """The tiny model's last layer only (convex): H + λI positive definite."""
    clf, d, obj, archive, x, y = tiny_setup(tmp_path_factory.mktemp("pcg"), n=64, params="dense")
    return dict(clf=clf, d=d, obj=obj, x=x, y=y, H=dense_hessian(d, x, y))


@pytest.mark.slow
def test_hvps_of_several_vectors_share_each_pass(dense_layer):
    d, obj = dense_layer["d"], dense_layer["obj"]
    vs = [to_vec(v, d) for v in np.random.default_rng(1).standard_normal((3, dense_layer["clf"].num_params))]
    for got, v in zip(hvp_full_many(obj, vs), vs):
        np.testing.assert_allclose(vec_to_numpy(got), dense_layer["H"] @ vec_to_numpy(v), rtol=1e-9, atol=1e-12)
    assert hvp_full_many(obj, []) == []


@pytest.mark.slow
def test_pcg_needs_fewer_hvps_than_cg(dense_layer):
    d, obj, h = dense_layer["d"], dense_layer["obj"], dense_layer["H"]
    lam = 0.05
    V = np.random.default_rng(2).standard_normal((3, dense_layer["clf"].num_params))
    want = np.linalg.solve(h + lam * np.eye(len(h)), V.T).T
    cg = make_solver("cg", obj, lam, cg_tol=1e-8, cg_maxiter=300, progress=False)
    pcg = make_solver("pcg", obj, lam, cg_tol=1e-8, cg_maxiter=300, progress=False)
    for solver in (cg, pcg):
        got = np.stack([vec_to_numpy(s) for s in solver.solve([to_vec(v, d) for v in V])])
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7 * np.abs(want).max())
    assert len(pcg.info["hvps"]) == 3 and pcg.info["hvps"] == [i + 1 for i in pcg.info["iterations"]]
    assert max(pcg.info["hvps"]) < min(cg.info["iterations"]), (pcg.info["hvps"], cg.info["iterations"])


@pytest.mark.slow
def test_pcg_shares_the_ekfac_fit(dense_layer):
    d, obj = dense_layer["d"], dense_layer["obj"]
    ekfac = make_solver("ekfac", obj, 0.05, seed=4, progress=False)
    pcg = make_solver("pcg", obj, 0.05, seed=4, cg_tol=1e-8, progress=False)
    assert pcg.cache_name == ekfac.cache_name == "ekfac" and pcg.cache_key() == ekfac.cache_key()
    pcg.load_state(ekfac.state())
    v = to_vec(np.random.default_rng(3).standard_normal(dense_layer["clf"].num_params), d)
    np.testing.assert_array_equal(vec_to_numpy(pcg.ekfac.precondition(v)), vec_to_numpy(ekfac.solve([v])[0]))
    assert set(pcg.state()) == set(ekfac.state())


@pytest.mark.slow
def test_negative_curvature_is_the_cg_message(tmp_path):
    # all layers of the untrained tiny model: H has eigenvalues near -2.8 (test_curvature_contract)
    clf, d, obj, archive, x, y = tiny_setup(tmp_path, n=16)
    pcg = make_solver("pcg", obj, 1e-3, cg_tol=1e-10, cg_maxiter=300, progress=False)
    vs = [to_vec(v, d) for v in np.random.default_rng(5).standard_normal((2, clf.num_params))]
    with pytest.raises(UserError, match="pcg met negative curvature.*raise damping"):
        pcg.solve(vs)
