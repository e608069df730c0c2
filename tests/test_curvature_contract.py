"""Every registered ``--solver`` against the dense float64 matrix it claims to invert.

Each method class says what it approximates (``approximates``): ``"hessian"`` -> ``(H + λI)⁻¹ v``
(``H`` by nested tapes), ``"kfac"`` / ``"ekfac"`` -> the dense Kronecker-factored Fisher built here
from explicit per-image patches, backward signals and gradients (tests/test_ekfac.py). A new method
runs through the same ``make_solver -> fit -> solve`` path; one with an unknown ``approximates``
fails until its reference is added here.
"""
import numpy as np
import pytest

from engine_helpers import dense_hessian, to_vec
from influence.curvature import REGISTRY, make_solver
from influence.model.hvp import vec_to_numpy
from test_ekfac import dense_fisher, tiny_setup

#: options every method may take (make_solver passes each method those it accepts)
OPTIONS = dict(cg_tol=1e-10, cg_maxiter=500, seed=0, max_exact_params=10_000, fisher="sampled",
               ekfac_max_block=4096, memory_budget=1.0)
#: per-method options and relative error allowed (default 1e-7)
EXTRA = {"lissa": dict(iter=400, bsize=512)}
TOLERANCE = {"lissa": 0.05}


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    clf, d, obj, archive, x, y = tiny_setup(tmp_path_factory.mktemp("contract"), n=64)
    h = dense_hessian(d, x, y)
    lam = max(0.5, 0.5 - float(np.linalg.eigvalsh(h)[0]))     # H + λI positive definite: CG applies
    v = np.random.default_rng(11).standard_normal((2, clf.num_params))
    return dict(clf=clf, d=d, obj=obj, x=x, y=y, H=h, lam=lam, V=v, fisher={})


def reference(name, cls, problem):
    kind = getattr(cls, "approximates", None)
    lam, p = problem["lam"], problem["clf"].num_params
    if kind == "hessian":
        matrix = problem["H"]
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
    cls = REGISTRY[name]
    want = reference(name, cls, problem)
    solver = make_solver(name, problem["obj"], problem["lam"], progress=False, **OPTIONS, **EXTRA.get(name, {}))
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
