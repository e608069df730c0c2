"""Leave-one-out check (``python -m influence.validate``, :mod:`influence.experiments`): on softmax
regression fitted to its optimum, the predicted change of test loss (score / n, exact solver)
matches retraining without the image."""
import numpy as np
import pytest

from influence.calibration import stats
from influence.experiments import panels, problems


def test_rankdata_and_spearman_with_ties():
    np.testing.assert_allclose(stats.rankdata([10, 20, 20, 5]), [2.0, 3.5, 3.5, 1.0])
    assert stats.spearman([1, 2, 3, 4], [1, 4, 9, 16]) == pytest.approx(1.0)
    assert stats.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert stats.pearson([1, 2, 3], [2, 4, 6.5]) == pytest.approx(np.corrcoef([1, 2, 3], [2, 4, 6.5])[0, 1])


@pytest.fixture(scope="module")
def convex():
    return problems.ConvexProblem(tests=2, seed=0)


@pytest.mark.slow
def test_convex_model_is_at_its_optimum(convex):
    assert convex.fit_info["grad_norm"] < 1e-10
    # the engine's dense Hessian agrees with the hand-written one used for the Newton steps
    from influence.curvature import make_solver

    h_engine = make_solver("exact", convex.objective, 0.0, progress=False).matrix()
    h_hand = convex.hessian(convex.weights())
    np.testing.assert_allclose(h_engine, h_hand, rtol=0, atol=1e-7 * np.abs(h_hand).max())


@pytest.mark.slow
def test_leave_one_out_exact(convex):
    from influence.curvature import make_solver

    solver = make_solver("exact", convex.objective, 0.0, progress=False)
    res = panels.run_panel("convex", convex, solver, top=5, random=3, seed=0)
    assert res.pearson >= 0.99, res.pearson
    assert res.spearman >= 0.9, res.spearman
    # sign convention: removing the most useful training image (largest positive score) RAISES the
    # test loss, and the most harmful one (most negative) lowers it, by about score / n
    scores, _ = convex.scores(solver)
    for t in range(scores.shape[0]):
        useful = int(np.argmax(scores[t]))
        harmful = int(np.argmin(scores[t]))
        assert scores[t, useful] > 0 and scores[t, harmful] < 0
        up = convex.actual_change(useful)[t]
        assert up > 0
        assert up == pytest.approx(scores[t, useful] / convex.n, rel=0.3)
        assert convex.actual_change(harmful)[t] < 0
