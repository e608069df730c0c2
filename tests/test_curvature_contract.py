"""Every registered ``--solver`` against the dense float64 matrix it claims to invert.

Each method class says what it approximates (``approximates``): ``"hessian"`` -> ``(H + λI)⁻¹ v`` (``H`` by nested
tapes), ``"lowrank"`` -> the same from ``H``'s top eigenpairs and a floor (exact at full rank), ``"ggn"`` -> ``(G +
λI)⁻¹ v`` with the Gauss–Newton matrix ``G``, ``"ggn-blocks"`` -> the same with ``G``'s per-layer blocks only (the
store at ``D = P``), ``"kfac"`` / ``"ekfac"`` -> the dense Kronecker-factored Fisher built here from explicit
per-image patches, backward signals and gradients (tests/test_ekfac.py). A new method runs through the same
``make_solver -> fit -> solve`` path; one with an unknown ``approximates`` fails until its reference is added here.
"""
import numpy as np
import pytest
import tensorflow as tf

from engine_helpers import dense_hessian, layer_blocks, to_vec
from influence.curvature import REGISTRY, make_solver
from influence.model.objective import TrainingObjective
from influence.model.vectors import vec_to_numpy
from influence.settings import SOLVER_OPTIONS, Settings
from test_ekfac import dense_fisher, tiny_setup

#: every test here needs the dense float64 Hessian and Gauss–Newton matrix of the module's problem (seconds)
pytestmark = pytest.mark.slow

#: every solver option (influence.settings.SOLVER_OPTIONS, from the settings' metadata: a new option is
#: passed here without an edit), at calculate.py's default as a solver takes it unless this test sets it
#: (make_solver passes each method those it accepts)
OPTIONS = {**Settings().solver_options(),
           **dict(cg_tol=1e-10, cg_maxiter=500, fisher="sampled", memory_budget=1.0)}
assert set(OPTIONS) == set(SOLVER_OPTIONS)
#: per-method options and relative error allowed (default 1e-7)
EXTRA = {"lissa": dict(iter=400, bsize=512), "krylov": dict(rank=100_000), "dpcg": dict(rank=8),
         "store": dict(store_dim=100_000, fisher="true")}
TOLERANCE = {"lissa": 0.05}


def dense_ggn(d, x, y):
    """float64 (P, P) Gauss–Newton matrix ``mean_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i + ∇²Ω``, from the
    logits' full Jacobian (one tape) and the regulariser's Hessian (nested tapes)."""
    prim = [v.value for v in d.variables]
    with tf.GradientTape(persistent=True) as tape:
        logits = d._logits(x)
    jac = tape.jacobian(logits, prim, experimental_use_pfor=False)
    n, k = logits.shape
    jm = np.concatenate([np.reshape(np.asarray(j, np.float64), (n, k, -1)) for j in jac], axis=2)    # (N, K, P)
    z = np.asarray(logits, np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    h_out = np.einsum("nk,kl->nkl", p, np.eye(k)) - np.einsum("nk,nl->nkl", p, p)
    g = np.einsum("nkp,nkl,nlq->pq", jm, h_out, jm) / n
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            reg = d.regularization()
        flat = tf.concat([tf.reshape(t, [-1]) for t in inner.gradient(reg, prim,
                                                                        unconnected_gradients="zero")], 0)
    rj = outer.jacobian(flat, prim, experimental_use_pfor=False, unconnected_gradients="zero")
    return g + np.concatenate([np.reshape(np.asarray(j, np.float64), (len(g), -1)) for j in rj], axis=1)


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    clf, d, obj, archive, x, y = tiny_setup(tmp_path_factory.mktemp("contract"), n=64)
    h = dense_hessian(d, x, y)
    lam = max(0.5, 0.5 - float(np.linalg.eigvalsh(h)[0]))     # H + λI positive definite: CG applies
    v = np.random.default_rng(11).standard_normal((2, clf.num_params))
    ggn_obj = TrainingObjective(d, archive, chunk=obj.chunk, hessian="ggn")
    return dict(clf=clf, d=d, obj=obj, x=x, y=y, H=h, lam=lam, V=v, fisher={}, ggn_obj=ggn_obj,
                GGN=dense_ggn(d, x, y))


def reference(name, solver, problem):
    kind = getattr(solver, "approximates", None)      # the store's follows its structure (store_curvature)
    lam, p = problem["lam"], problem["clf"].num_params
    if kind == "hessian":
        matrix = problem["H"]
    elif kind == "ggn":         # the Gauss–Newton matrix whatever the objective's --hessian
        matrix = problem["GGN"]
    elif kind == "ggn-blocks":  # its per-layer blocks (the store at D = P)
        matrix = layer_blocks(problem["GGN"], problem["clf"])
    elif kind == "lowrank":
        # the top-k eigenpairs with the floor σ_{k+1} for the rest; k = P (the whole spectrum) is exact
        w, q = np.linalg.eigh(problem["H"])
        w, q = w[::-1], q[:, ::-1]
        k = min(EXTRA[name]["rank"], p)
        floor = max(w[k], 0.0) if k < p else 0.0
        c = problem["V"] @ q[:, :k]
        return (problem["V"] - c @ q[:, :k].T) / (floor + lam) + (c / (w[:k] + lam)) @ q[:, :k].T
    elif kind in ("kfac", "ekfac"):
        if kind not in problem["fisher"]:
            problem["fisher"][kind] = dense_fisher(problem["clf"], problem["d"], problem["x"], problem["y"], kind,
                                                   fisher=OPTIONS["fisher"], seed=OPTIONS["seed"])
        matrix = problem["fisher"][kind]
    else:
        pytest.fail(f"--solver {name}: unknown approximates = {kind!r}; add its dense reference to "
                    "tests/test_curvature_contract.py")
    return np.linalg.solve(matrix + lam * np.eye(p), problem["V"].T).T


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_solver_matches_its_dense_reference(name, problem):
    solver = make_solver(name, problem["obj"], problem["lam"], progress=False, **{**OPTIONS, **EXTRA.get(name, {})})
    want = reference(name, solver, problem)
    solver.fit()
    d = problem["d"]
    outs = solver.solve([to_vec(v, d) for v in problem["V"]])
    # each result is a Vec shaped and typed like the model's variables
    for out in outs:
        assert [tuple(t.shape) for t in out] == [tuple(v.shape) for v in d.variables]
        assert all(t.dtype == d.dtype for t in out)
    got = np.stack([vec_to_numpy(out) for out in outs])
    for g, w in zip(got, want):
        err = np.linalg.norm(g - w) / np.linalg.norm(w)
        assert err <= TOLERANCE.get(name, 1e-7), (name, err)


HESSIAN_SOLVERS = sorted(n for n, c in REGISTRY.items() if getattr(c, "approximates", None) == "hessian")


@pytest.mark.parametrize("name", HESSIAN_SOLVERS)
def test_solver_with_hessian_ggn_matches_the_dense_gauss_newton_matrix(name, problem):
    """``--hessian ggn``: the same solver on the objective's Gauss–Newton products solves (G + λI)."""
    d, g = problem["d"], problem["GGN"]
    lam = 0.05                                             # G is positive semi-definite: a small λ will do
    want = np.linalg.solve(g + lam * np.eye(len(g)), problem["V"].T).T
    solver = make_solver(name, problem["ggn_obj"], lam, progress=False, **{**OPTIONS, **EXTRA.get(name, {})})
    solver.fit()
    assert solver.info["hessian"] == "ggn"
    got = np.stack([vec_to_numpy(out) for out in solver.solve([to_vec(v, d) for v in problem["V"]])])
    for gi, w in zip(got, want):
        err = np.linalg.norm(gi - w) / np.linalg.norm(w)
        assert err <= TOLERANCE.get(name, 1e-7) * (2 if name == "lissa" else 1), (name, err)


def test_gauss_newton_is_positive_semidefinite_where_the_hessian_is_not(problem):
    h, g = problem["H"], problem["GGN"]
    assert np.linalg.eigvalsh(h)[0] < -1e-3                       # the tiny random model is not at a minimum
    assert np.linalg.eigvalsh(g)[0] > -1e-10 * np.abs(g).max()
    np.testing.assert_allclose(g, g.T, atol=1e-12 * np.abs(g).max())
    # the products the solvers take equal the dense matrix
    d, v = problem["d"], problem["V"][0]
    gv = vec_to_numpy(problem["ggn_obj"].hvp_full(to_vec(v, d)))
    np.testing.assert_allclose(gv, g @ v, rtol=1e-9, atol=1e-12 * np.abs(g @ v).max())


def test_make_solver_refuses_an_option_no_method_takes(problem):
    from influence.errors import UserError

    with pytest.raises(UserError, match=r"no solver takes the option\(s\) cg_tolerance, itr; options: .*cg_tol"):
        make_solver("cg", problem["obj"], 1.0, progress=False, cg_tolerance=1e-3, itr=3)
    # another method's option is left out: calculate.py passes every method's settings
    assert make_solver("exact", problem["obj"], 1.0, progress=False, iter=5, fisher="true").name == "exact"
