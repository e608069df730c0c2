"""The engine's numbers against float64 dense references (tiny models, seeded)."""
import numpy as np
import pytest
import tensorflow as tf

from engine_helpers import (IMAGE, classifier, dense_hessian, per_example_gradients, random_data, setup,
                            tiny_model, to_vec, write_train_archive)
from influence.backends.local import score_archive
from influence.errors import UserError
from influence.model.derivatives import Derivatives
from influence.model.vectors import vec_to_numpy
from influence.scoring import Scorer
from influence.curvature.iterative.cg import CGSolver
from influence.curvature.exact import ExactSolver
from influence.curvature.iterative.lissa import LissaSolver, estimate_lambda_max, power_iteration

DAMPING = 0.05


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    clf, d, obj, archive, x, y = setup(tmp_path_factory.mktemp("tiny"))
    return dict(clf=clf, d=d, obj=obj, archive=archive, x=x, y=y, H=dense_hessian(d, x, y),
                P=clf.num_params, rng=np.random.default_rng(1))


@pytest.mark.slow
def test_hvp_matches_dense_hessian(tiny):
    d, H, rng = tiny["d"], tiny["H"], tiny["rng"]
    v = rng.standard_normal(tiny["P"])
    hv = vec_to_numpy(tiny["obj"].hvp_full(to_vec(v, d)))
    np.testing.assert_allclose(hv, H @ v, rtol=1e-6, atol=1e-6 * np.abs(H @ v).max())


@pytest.mark.slow
def test_hvp_of_one_minibatch_matches_its_dense_hessian(tiny):
    d, x, y, rng = tiny["d"], tiny["x"][:5], tiny["y"][:5], tiny["rng"]
    H5 = dense_hessian(d, x, y)
    v = rng.standard_normal(tiny["P"])
    hv = vec_to_numpy(tiny["obj"].hvp_minibatch(to_vec(v, d), x, y))
    np.testing.assert_allclose(hv, H5 @ v, rtol=1e-6, atol=1e-6 * np.abs(H5 @ v).max())


def test_regulariser_is_in_the_hessian(tiny):
    d = tiny["d"]
    v = tiny["rng"].standard_normal(tiny["P"])
    only_reg = vec_to_numpy(d.hvp(tiny["x"], tiny["y"], to_vec(v, d), tf.constant(0.0, tf.float64),
                                  tf.constant(1.0, tf.float64)))
    # L2(1e-3) on the two kernels: 2e-3 on kernel entries, 0 on biases / BatchNorm
    kernel_mask = np.concatenate([np.full(int(np.prod(w.shape)), 2e-3 if "kernel" in w.path else 0.0)
                                  for w in d.variables])
    np.testing.assert_allclose(only_reg, kernel_mask * v, atol=1e-12)


def test_batched_scores_equal_loop_of_single_image_gradients(tiny):
    d, x, y, rng = tiny["d"], tiny["x"], tiny["y"], tiny["rng"]
    G = per_example_gradients(d, x, y)
    S = rng.standard_normal((3, tiny["P"]))
    shares = Scorer(d).shares_for(x, y, [to_vec(s, d) for s in S])
    assert shares.shape == (3, len(y), 3)
    np.testing.assert_allclose(shares.sum(-1), S @ G.T, rtol=1e-9, atol=1e-9)
    jvp = d.jvp_losses(x, y, to_vec(S[0], d)).numpy()
    np.testing.assert_allclose(jvp, G @ S[0], rtol=1e-9, atol=1e-9)


def test_layer_shares_are_each_layers_own_dot_product(tiny):
    clf, d, x, y, rng = tiny["clf"], tiny["d"], tiny["x"], tiny["y"], tiny["rng"]
    G = per_example_gradients(d, x, y)
    S = rng.standard_normal((2, tiny["P"]))
    shares = Scorer(d).shares_for(x, y, [to_vec(s, d) for s in S])
    at = 0
    for col, group in enumerate(clf.groups):
        size = sum(int(np.prod(v.shape)) for v in group.variables)
        np.testing.assert_allclose(shares[:, :, col], S[:, at:at + size] @ G[:, at:at + size].T, atol=1e-10)
        at += size
    assert at == tiny["P"]


def test_scores_do_not_depend_on_archive_batch_size(tmp_path, tiny):
    d, x, y = tiny["d"], tiny["x"], tiny["y"]
    S = [to_vec(s, d) for s in tiny["rng"].standard_normal((2, tiny["P"]))]
    scorer = Scorer(d)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = score_archive(scorer, write_train_archive(tmp_path / "a" / "train.npz", x, y, 7), S, score_batch=5)
    b = score_archive(scorer, write_train_archive(tmp_path / "b" / "train.npz", x, y, 40), S, score_batch=64)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # float32 outputs
    G = per_example_gradients(d, x, y)
    np.testing.assert_allclose(a.sum(-1), np.stack([vec_to_numpy(s) for s in S]) @ G.T, rtol=1e-4, atol=1e-5)


def test_scores_of_a_float32_model_agree_with_float64(tmp_path):
    x, y = random_data(12)
    m64, m32 = tiny_model(0, dtype="float64"), tiny_model(0, dtype="float32")
    m32.set_weights([w.astype(np.float32) for w in m64.get_weights()])
    c64, c32 = classifier(m64), classifier(m32)
    d64, d32 = Derivatives(c64, IMAGE), Derivatives(c32, IMAGE)
    s = np.random.default_rng(3).standard_normal(c64.num_params)
    a = Scorer(d64).shares_for(x, y, [to_vec(s, d64)]).sum(-1)
    b = Scorer(d32).shares_for(x, y, [to_vec(s, d32)]).sum(-1)
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-4 * np.abs(a).max())


def test_a_confident_float32_image_keeps_its_true_class_gradient():
    """Once p_y rounds to 1 in float32, p_y − 1 cancels to 0; the loss takes the true-class entry as
    −Σ_{c≠y} p_c, so the float32 gradient, per-image loss and HVP equal float64's (tf.nn's lose it)."""
    x, y = random_data(6, seed=5)
    m64, m32 = tiny_model(0, dtype="float64"), tiny_model(0, dtype="float32")
    dense = m64.get_layer("dense")
    dense.bias.assign(np.eye(4)[y[0]] * 20.0)       # p_y ≈ 1 − 1e-8: exactly 1 in float32, not in float64
    m32.set_weights([w.astype(np.float32) for w in m64.get_weights()])
    d64, d32 = Derivatives(classifier(m64), IMAGE), Derivatives(classifier(m32), IMAGE)
    confident = np.nonzero(y == y[0])[0]
    p32 = d32.predict(x).numpy()
    assert (p32[confident, y[0]] == 1.0).all()       # float32 rounds p_y to exactly 1 here
    g64 = per_example_gradients(d64, x[confident], y[confident])
    g32 = per_example_gradients(d32, x[confident], y[confident])
    assert np.abs(g64).max() > 0
    np.testing.assert_allclose(g32, g64, rtol=0, atol=1e-4 * np.abs(g64).max())
    l64, l32 = d64.losses(x, y).numpy(), d32.losses(x, y).numpy()
    np.testing.assert_allclose(l32, l64, rtol=1e-4)
    assert (l32[confident] > 0).all()
    # what tf.nn's float32 cross-entropy gives: a gradient without the true-class term
    xi, yi = x[confident[:1]], y[confident[:1]]
    with tf.GradientTape() as tape:
        logits = d32.clf.image_logits(xi)
        tape.watch(logits)
        plain = tf.nn.sparse_softmax_cross_entropy_with_logits(yi, logits)
    assert tape.gradient(plain, logits).numpy()[0, yi[0]] == 0.0
    v = np.random.default_rng(2).standard_normal(g64.shape[1])
    one = tf.constant(1.0, tf.float64)
    h64 = vec_to_numpy(d64.hvp(x[confident], y[confident], to_vec(v, d64), one, one))
    h32 = vec_to_numpy(d32.hvp(x[confident], y[confident], to_vec(v, d32), tf.constant(1.0), tf.constant(1.0)))
    np.testing.assert_allclose(h32, h64, rtol=0, atol=1e-3 * np.abs(h64).max())


@pytest.mark.slow
def test_exact_solver_matches_numpy_solve(tiny):
    d, H, rng = tiny["d"], tiny["H"], tiny["rng"]
    V = rng.standard_normal((2, tiny["P"]))
    solver = ExactSolver(tiny["obj"], DAMPING, progress=False)
    got = np.stack([vec_to_numpy(s) for s in solver.solve([to_vec(v, d) for v in V])])
    want = np.linalg.solve(H + DAMPING * np.eye(tiny["P"]), V.T).T
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_exact_solver_refuses_too_many_parameters(tiny):
    solver = ExactSolver(tiny["obj"], DAMPING, max_exact_params=10, progress=False)
    with pytest.raises(UserError, match="above the limit"):
        solver.solve([to_vec(np.ones(tiny["P"]), tiny["d"])])


def _convex_setup(tmp_path):
    """Last layer only + damping large enough that H + λI is safely positive definite."""
    clf, d, obj, archive, x, y = setup(tmp_path, params="dense")
    H = dense_hessian(d, x, y)
    lam = max(DAMPING, -np.linalg.eigvalsh(H)[0] + DAMPING)
    return d, obj, H, lam


@pytest.mark.slow
def test_cg_matches_numpy_solve(tmp_path):
    d, obj, H, lam = _convex_setup(tmp_path)
    v = np.random.default_rng(2).standard_normal(H.shape[0])
    got = vec_to_numpy(CGSolver(obj, lam, cg_tol=1e-10, cg_maxiter=500, progress=False).solve([to_vec(v, d)])[0])
    want = np.linalg.solve(H + lam * np.eye(H.shape[0]), v)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7 * np.abs(want).max())


@pytest.mark.slow
def test_lissa_converges_to_numpy_solve(tmp_path):
    d, obj, H, lam = _convex_setup(tmp_path)
    lam = max(lam, 0.5)  # condition number ~ λ_max/λ sets the depth needed
    A = H + lam * np.eye(H.shape[0])
    v = np.random.default_rng(4).standard_normal(H.shape[0])
    want = np.linalg.solve(A, v)
    # full batch (b = n): LiSSA is then the deterministic Neumann series, error (1 - λ_min/s)^T
    solver = LissaSolver(obj, lam, iter=400, bsize=len(obj.archive) * 4, scale=None, seed=0, progress=False)
    solver.fit()
    assert solver.info["lambda_max"] == pytest.approx(np.linalg.eigvalsh(A)[-1], rel=0.01)
    assert solver.scale >= 1.1 * solver.info["lambda_max"]
    got = vec_to_numpy(solver.solve([to_vec(v, d)])[0])
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.02
    # stochastic minibatches: unbiased, close after averaging repeats
    sto = LissaSolver(obj, lam, iter=200, bsize=8, repeats=4, scale=solver.scale, seed=1, progress=False)
    got = vec_to_numpy(sto.solve([to_vec(v, d)])[0])
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.15


@pytest.mark.slow
def test_lissa_divergence_is_a_clear_error(tmp_path):
    # a too-small scale now restarts with larger ones (tests/test_lissa_restart.py); one so small that
    # MAX_RESTARTS restarts (x100 at most each) cannot reach λ_max/2 still stops with the error
    d, obj, H, lam = _convex_setup(tmp_path)
    tiny_scale = 1e-12 * np.linalg.eigvalsh(H)[-1]
    solver = LissaSolver(obj, lam, iter=500, bsize=40, scale=tiny_scale, progress=False)
    v = np.random.default_rng(5).standard_normal(H.shape[0])
    with pytest.raises(UserError, match="diverged.*after 4 restart.*larger damping.*larger scale"):
        solver.solve([to_vec(v, d)])


def test_lambda_max_matches_eigh(tiny):
    H = tiny["H"]
    w = np.linalg.eigvalsh(H)
    dominant = w[np.argmax(np.abs(w))]
    lam, _ = estimate_lambda_max(tiny["obj"], DAMPING, sample=10_000, iters=500, tol=1e-9)
    assert lam == pytest.approx(abs(dominant) + DAMPING, rel=1e-3)
    mu, _ = power_iteration(lambda v: to_vec(H @ vec_to_numpy(v), tiny["d"]), tiny["d"].variables, iters=500, tol=1e-10)
    assert mu == pytest.approx(dominant, rel=1e-4)


def test_subclassed_model_scores_totals_without_split(tmp_path):
    """A model that is not functional cannot be tapped: scores are the total only, still exact."""
    import keras

    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.flat = keras.layers.Flatten(dtype="float64")
            self.hidden = keras.layers.Dense(5, activation="tanh", dtype="float64")
            self.out = keras.layers.Dense(4, dtype="float64")

        def call(self, x):
            return self.out(self.hidden(self.flat(x)))

    from influence.model.models import Classifier, make_preprocess, select_params

    model = Net()
    model(np.zeros((1,) + IMAGE))
    clf = Classifier(model, make_preprocess("unit"), select_params(model, "all"))
    d = Derivatives(clf, IMAGE)
    scorer = Scorer(d)
    assert not scorer.split
    x, y = random_data(9)
    S = np.random.default_rng(5).standard_normal((2, clf.num_params))
    shares = scorer.shares_for(x, y, [to_vec(s, d) for s in S])
    assert shares.shape == (2, 9, 1)
    np.testing.assert_allclose(shares[..., 0], S @ per_example_gradients(d, x, y).T, rtol=1e-9, atol=1e-9)


def test_memory_plan_takes_the_fitted_curvature_off_the_budget(tiny):
    """The solver's resident state and workspace come off --memory-budget before the test vectors
    get their half: a solver holding most of the budget leaves room for fewer vectors."""
    from types import SimpleNamespace

    from influence.memory import plan_memory

    clf, p = tiny["clf"], tiny["P"]
    budget_gb = 64 * p * 8 / 2**30                         # room for 64 parameter-sized float64 arrays
    settings = SimpleNamespace(memory_budget=budget_gb, score_batch=256)
    light = SimpleNamespace(resident_bytes=0, workspace_bytes=0, copies_per_vector=2)
    heavy = SimpleNamespace(resident_bytes=32 * p * 8, workspace_bytes=16 * p * 8, copies_per_vector=2)
    assert plan_memory(clf, settings, 100, light).vectors == 16        # 32 arrays / 2 per vector
    plan = plan_memory(clf, settings, 100, heavy)
    assert plan.vectors == 4 and plan.solver_bytes == 48 * p * 8      # (64 - 48) / 2 / 2
    assert plan_memory(clf, settings, 3, light).vectors == 3            # never more than the test images
    cg = CGSolver(tiny["obj"], DAMPING, progress=False)
    assert cg.workspace_bytes == 4 * p * 8 and cg.copies_per_vector == 3
