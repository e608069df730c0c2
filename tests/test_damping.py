"""``--damping``: absolute λ, or relative to the curvature's scale (``auto``, ``0.3x``): per fitted layer for
kfac/ekfac, from trace(H)/P for the Hessian methods."""
import numpy as np
import pytest

from engine_helpers import to_vec
from influence.curvature import make_solver
from influence.curvature.damping import AUTO_FACTOR, Damping, parse_damping
from influence.errors import UserError
from influence.model.vectors import vec_to_numpy
from test_ekfac import SEED, _dense_only, tiny_setup


def test_parse_damping():
    assert parse_damping(0.01) == Damping(0.01) and parse_damping("1e-3") == Damping(1e-3)
    assert parse_damping("auto") == Damping(AUTO_FACTOR, relative=True)
    assert parse_damping("0.3x") == Damping(0.3, relative=True) and str(parse_damping("0.3X")) == "0.3x"
    assert parse_damping(Damping(2.0)) == Damping(2.0) and str(parse_damping(0.5)) == "0.5"
    assert Damping(0.3, True).for_block(2.0) == pytest.approx(0.6) and Damping(0.3).for_block(2.0) == 0.3
    for bad in ("abc", "-1", "0x", "x", "-0.1x", float("nan")):
        with pytest.raises(UserError, match="damping"):
            parse_damping(bad)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_relative_damping_of_one_layer_is_that_absolute_damping(tmp_path, method):
    """One Kronecker block: ``0.3x`` is λ = 0.3 × mean(Λ + ρ) of that block, exactly."""
    clf, d, obj, x, y = _dense_only(tmp_path, 24)
    rel = make_solver(method, obj, "0.3x", seed=SEED, progress=False)
    rel.fit()
    (block,) = rel.plan
    lam = 0.3 * float(np.mean(rel.undamped(block)))
    absolute = make_solver(method, obj, lam, seed=SEED, progress=False)
    absolute.load_state(rel.state())
    v = [to_vec(np.random.default_rng(1).standard_normal(clf.num_params), d)]
    np.testing.assert_allclose(vec_to_numpy(rel.solve(v)[0]), vec_to_numpy(absolute.solve(v)[0]), rtol=1e-12)
    assert rel.info["damping"] == "0.3x" and rel.info["damping_per_layer"] == {block.name: pytest.approx(lam, rel=1e-5)}
    assert rel.damping is None and absolute.damping == lam


@pytest.mark.slow
def test_relative_damping_is_per_layer_and_self_influence_follows_it(tmp_path):
    clf, d, obj, archive, x, y = tiny_setup(tmp_path, n=32)
    solver = make_solver("ekfac", obj, "auto", seed=SEED, progress=False)
    solver.fit()
    per_layer = {b.name: AUTO_FACTOR * float(np.mean(solver.undamped(b))) for b in solver.plan}
    solver.solve([to_vec(np.ones(clf.num_params), d)])
    assert solver.info["damping_per_layer"] == pytest.approx(per_layer, rel=1e-5)
    assert len(set(np.round(list(per_layer.values()), 12))) == len(per_layer)     # one λ per layer
    # self-influence gᵢᵀ(F + λ_b)⁻¹gᵢ through its own graph = gᵢ · solve(gᵢ)
    grads = [d.gradient(x[i:i + 1], y[i:i + 1]) for i in range(3)]
    own = [float(vec_to_numpy(g) @ vec_to_numpy(s)) for g, s in zip(grads, solver.solve(grads))]
    np.testing.assert_allclose(solver.self_influence_batch(x[:3], y[:3]), own, rtol=1e-6)
    # a new damping takes effect in both
    solver.damping = 0.05
    assert solver.damping == 0.05
    fixed = [float(vec_to_numpy(g) @ vec_to_numpy(s)) for g, s in zip(grads, solver.solve(grads))]
    assert not np.allclose(fixed, own)
    np.testing.assert_allclose(solver.self_influence_batch(x[:3], y[:3]), fixed, rtol=1e-6)


def test_hutchinson_trace_is_unbiased_and_exact_for_a_diagonal():
    from influence.curvature.damping import hutchinson_trace

    d = np.array([1.0, 2.0, 3.0, 4.0])
    assert hutchinson_trace(lambda z: d * z, 4, probes=3) == (10.0, 0.0)       # z_j² = 1: exact, no spread
    a = np.random.default_rng(0).standard_normal((30, 30))
    a = a @ a.T
    est, err = hutchinson_trace(lambda z: a @ z, 30, probes=400, seed=1)
    assert abs(est - np.trace(a)) < 4 * err and err < 0.1 * np.trace(a)


@pytest.mark.slow
def test_exact_relative_damping_is_the_factor_times_the_mean_eigenvalue(tmp_path):
    clf, d, obj, x, y = _dense_only(tmp_path, 24)
    rel = make_solver("exact", obj, "0.3x", progress=False)
    v = [to_vec(np.random.default_rng(1).standard_normal(clf.num_params), d)]
    got = vec_to_numpy(rel.solve(v)[0])
    h = rel._hessian
    lam = 0.3 * np.trace(h) / len(h)
    np.testing.assert_allclose(got, np.linalg.solve(h + lam * np.eye(len(h)), vec_to_numpy(v[0])), rtol=1e-9)
    assert rel.damping == pytest.approx(lam) and rel.info["damping"] == pytest.approx(lam)
    assert rel.info["damping_rule"] == "0.3x" and rel.info["trace_probes"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("method", ["cg", "lissa", "pcg"])
def test_hessian_methods_take_a_relative_damping_from_a_trace_estimate(tmp_path, method):
    """cg / lissa / pcg: λ = factor × Hutchinson's trace(H)/P, within its error of the dense trace, recorded."""
    from influence.curvature.damping import TRACE_PROBES

    clf, d, obj, x, y = _dense_only(tmp_path, 24)
    h = make_solver("exact", obj, 0.0, progress=False).matrix()
    rel = make_solver(method, obj, "auto", progress=False)
    lam = rel.damping
    mean, err = rel.info["mean_eigenvalue"], rel.info["mean_eigenvalue_error"]
    assert lam == pytest.approx(AUTO_FACTOR * mean) and rel.info["damping"] == lam
    assert rel.info["damping_rule"] == "0.1x" and rel.info["trace_probes"] == TRACE_PROBES
    assert abs(mean - np.trace(h) / len(h)) <= 4 * err + 1e-12
    assert rel.damping is lam or rel.damping == lam                       # estimated once
    if method == "cg":
        v = [to_vec(np.random.default_rng(2).standard_normal(clf.num_params), d)]
        want = np.linalg.solve(h + lam * np.eye(len(h)), vec_to_numpy(v[0]))
        np.testing.assert_allclose(vec_to_numpy(rel.solve(v)[0]), want, rtol=1e-5, atol=1e-8 * np.abs(want).max())


def test_calculate_flag(tmp_path, capsys):
    """``--damping abc`` is a usage error, before any work."""
    from engine_helpers import write_project
    from influence.calculate_cli import build_parser, job
    from influence.cli import main

    data = write_project(tmp_path / "data", 16, 8, {"a": 2})
    common = ["--data", str(data), "--model", str(data / "model.keras"), "--preprocess", "unit", "-sf", "png",
              "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exc:
        main(build_parser, job, common + ["--damping", "abc"])
    assert exc.value.code == 2 and "damping must be a number" in capsys.readouterr().err
