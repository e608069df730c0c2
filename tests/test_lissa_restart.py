"""LiSSA restarts a diverging recursion with a larger scale (influence/curvature/iterative/lissa.py, "Restarts").

The problem: the last layer of the tiny model (196 parameters, float64, convex: softmax cross-entropy
plus L2) with λ = 0.5, so ``H + λI`` is positive definite with condition number ~2 and the dense
``np.linalg.solve`` is the reference. A scale of 5 % of ``λ_max(H + λI)`` makes the recursion expand
(``|1 − μ/s| ≈ 19`` along the top eigenvector) from its first steps.
"""
import logging

import numpy as np
import pytest

from engine_helpers import dense_hessian, setup, to_vec
from influence.curvature.iterative import lissa
from influence.curvature.iterative.lissa import MAX_RESTARTS, LissaSolver
from influence.errors import UserError
from influence.model.vectors import vec_to_numpy

LAM = 0.5
#: relative error allowed against the dense solve: minibatches of 4n drawn with replacement leave
#: noise of about 1 % at this conditioning (tests/test_engine_math.py: < 0.02 at the auto scale)
RTOL = 0.02


@pytest.fixture(scope="module")
def convex(tmp_path_factory):
    clf, d, obj, archive, x, y = setup(tmp_path_factory.mktemp("restart"), params="dense")
    h = dense_hessian(d, x, y)
    a = h + LAM * np.eye(len(h))
    rng = np.random.default_rng(7)
    v = rng.standard_normal((3, len(h)))
    return dict(d=d, obj=obj, A=a, top=np.linalg.eigvalsh(a)[-1], V=v, want=np.linalg.solve(a, v.T).T)


def _solver(convex, scale, **kw):
    return LissaSolver(convex["obj"], LAM, **{"iter": 150, "bsize": 4 * convex["obj"].n, "scale": scale,
                                              "seed": 0, "progress": False, **kw})


def _err(got, want):
    return np.linalg.norm(got - want) / np.linalg.norm(want)


@pytest.mark.slow
def test_a_too_small_scale_restarts_and_converges_to_the_dense_solve(convex, caplog):
    caplog.set_level(logging.WARNING, logger="influence.curvature.iterative.lissa")
    small = 0.05 * convex["top"]
    solver = _solver(convex, small)
    d, ident = convex["d"], ("orig", 3, 1)
    got = vec_to_numpy(solver.solve([to_vec(convex["V"][0], d)], ids=[ident])[0])
    restarts = solver.info["restarts"]
    assert 1 <= len(restarts) <= MAX_RESTARTS
    # each restart is recorded (it lands in run.json) and continues where the previous one left off
    assert [r["id"] for r in restarts] == [str(ident)] * len(restarts)
    assert restarts[0]["scale_from"] == pytest.approx(small)
    for r, nxt in zip(restarts, restarts[1:] + [None]):
        assert 1 <= r["step"] <= 150
        assert 2.0 <= r["scale_to"] / r["scale_from"] <= 100.0
        if nxt:
            assert nxt["scale_from"] == r["scale_to"]
    final = restarts[-1]["scale_to"]
    assert solver.info["scale_max"] == final
    assert final > convex["top"] / 2                     # where every step contracts
    # one warning per restart, naming the vector, the step and both scales
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == len(restarts)
    assert str(ident) in warnings[0] and f"step {restarts[0]['step']}" in warnings[0]
    assert f"{restarts[0]['scale_from']:.4g}" in warnings[0] and f"{restarts[0]['scale_to']:.4g}" in warnings[0]
    # enough depth at the final scale: the answer is the dense solve's
    assert _err(got, convex["want"][0]) < RTOL
    # the restart reran the vector's own stream from h_0 = v: the same numbers as a run started at the
    # final scale, and the solver's own scale is unchanged for the next vector
    assert solver.scale == small
    direct = _solver(convex, final)
    np.testing.assert_array_equal(got, vec_to_numpy(direct.solve([to_vec(convex["V"][0], d)], ids=[ident])[0]))
    assert direct.info["restarts"] == []


@pytest.mark.slow
def test_a_vectors_result_does_not_depend_on_the_others_in_the_run(convex):
    """Restarts are per vector: solving a vector alone, first or after one that restarted gives the
    same numbers (the promise that a test image's result ignores which images share the run)."""
    d, v = convex["d"], [to_vec(row, convex["d"]) for row in convex["V"]]
    ids = [("a", 0, i) for i in range(3)]
    together = _solver(convex, 0.05 * convex["top"]).solve(v, ids=ids)
    for i in (2, 1):
        alone = _solver(convex, 0.05 * convex["top"]).solve([v[i]], ids=[ids[i]])[0]
        np.testing.assert_array_equal(vec_to_numpy(alone), vec_to_numpy(together[i]))
        assert _err(vec_to_numpy(alone), convex["want"][i]) < RTOL


def test_after_max_restarts_it_is_a_clear_error(convex):
    # each restart multiplies the scale by at most 100: from 1e-12 λ_max, MAX_RESTARTS (4) reach 1e-4 λ_max
    solver = _solver(convex, 1e-12 * convex["top"], iter=30)
    with pytest.raises(UserError, match=rf"diverged at step \d+ .* after {MAX_RESTARTS} restart\(s\) with larger "
                                        r"scales .*larger damping .*larger scale"):
        solver.solve([to_vec(convex["V"][0], convex["d"])], ids=[("orig", 0, 1)])
    assert len(solver.info["restarts"]) == MAX_RESTARTS
    assert solver.info["restarts"][-1]["scale_to"] == pytest.approx(1e-4 * convex["top"])


@pytest.mark.slow
def test_the_auto_scale_is_raised_once_by_a_deterministic_probe(convex, monkeypatch):
    """An auto scale that underestimates λ_max (here forced to 5 %): fit()'s probe restarts, every vector
    then starts from the raised scale without restarting, and the raised scale is cached state."""
    monkeypatch.setattr(lissa, "estimate_lambda_max", lambda *a, **k: (0.05 * convex["top"] / 1.1, 7))
    monkeypatch.setattr(LissaSolver, "_minibatch_lambda_max", lambda self, seed, batches=4: 0.0)
    solver = _solver(convex, None)
    solver.fit()
    info = solver.info
    assert info["scale_auto"] == pytest.approx(0.05 * convex["top"])
    assert info["probe_restarts"] >= 1 and len(info["restarts"]) == info["probe_restarts"]
    assert {r["id"] for r in info["restarts"]} == {str(lissa.PROBE_ID)}
    assert solver.scale == info["scale"] == info["restarts"][-1]["scale_to"] > convex["top"] / 2
    d = convex["d"]
    got = [vec_to_numpy(out) for out in solver.solve([to_vec(row, d) for row in convex["V"]])]
    assert len(info["restarts"]) == info["probe_restarts"]            # no test vector restarted
    assert info["scale_max"] == solver.scale
    for g, w in zip(got, convex["want"]):
        assert _err(g, w) < RTOL
    # the cache holds the raised scale; a solver loading it starts there without probing again
    loaded = _solver(convex, None)
    loaded.load_state(solver.state())
    assert loaded.scale == solver.scale and loaded.info["probe_restarts"] == info["probe_restarts"]
    assert loaded.cache_key()["scale_probe"] == {"depth": 150, "max_restarts": MAX_RESTARTS}
