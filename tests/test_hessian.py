"""``--hessian ggn`` through calculate's entry point: a model away from a minimum, a small damping."""
import json

import numpy as np
import pytest

from engine_helpers import calc_settings, dense_hessian, per_example_gradients, write_project
from influence.engine import calculate
from influence.errors import UserError
from test_curvature_contract import dense_ggn


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_project(tmp_path_factory.mktemp("hessian"), 24, 10, {"a": 3}, batchnorm=True)


@pytest.mark.slow
def test_cg_on_the_gauss_newton_matrix_runs_where_the_hessian_has_negative_curvature(data, tmp_path):
    from influence.data.archive_reader import TestArchive, TrainArchive
    from influence.model.derivatives import Derivatives
    from influence.model.models import load_classifier

    train = TrainArchive(data / "train.npz")
    x, y = train.take(np.arange(len(train)))
    y = y.astype(np.int64)
    clf = load_classifier(str(data / "model.keras"), preprocess="unit")
    d = Derivatives(clf, train.image_shape)
    lam = 1e-3
    assert np.linalg.eigvalsh(dense_hessian(d, x, y))[0] < -10 * lam        # the random tiny model is no minimum
    with pytest.raises(UserError, match="negative curvature"):
        calculate(calc_settings(data, tmp_path / "full", solver="cg", hessian="full", damping=lam))
    out = tmp_path / "ggn"
    assert calculate(calc_settings(data, out, solver="cg", hessian="ggn", damping=lam, cg_tol=1e-8)) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["hessian"] == "ggn" and run["solver_info"]["hessian"] == "ggn"
    assert len(run["solver_info"]["hvp_passes"]) == 3 and min(run["solver_info"]["hvp_passes"]) >= 1
    # the scores are gᵢᵀ (G + λI)⁻¹ g_t with the dense Gauss–Newton matrix
    g = dense_ggn(d, x, y)
    xt, yt, _ = TestArchive(data / "test.npz").read("a")
    gt = per_example_gradients(d, xt[:1], yt[:1].astype(np.int64))[0]
    want = per_example_gradients(d, x, y) @ np.linalg.solve(g + lam * np.eye(len(g)), gt)
    got = np.load(out / "a" / str(int(yt[0])) / "1_scores.npy")
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    # another --hessian into the same --out is refused (it changes the numbers)
    with pytest.raises(UserError, match="hessian ggn -> full"):
        calculate(calc_settings(data, out, solver="cg", hessian="full", damping=lam))
