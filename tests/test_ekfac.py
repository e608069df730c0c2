"""K-FAC / EK-FAC against dense float64 references built from explicit per-image quantities.

The reference takes the tiny model apart by hand: conv input patches cut out with numpy slices,
backward signals from a hand-written forward pass, per-image gradients from single-image tapes,
and the Fisher labels re-sampled in numpy (inverse CDF with ``default_rng(seed).random(n)``).
"""
import keras
import numpy as np
import pytest
import tensorflow as tf

from engine_helpers import CLASSES, IMAGE, random_data, to_vec, write_train_archive
from influence.curvature import make_solver
from influence.curvature.kfac.plan import kron_factor_bytes, split_blocks
from influence.curvature.kfac.signals import sample_labels
from influence.errors import SettingError, UserError
from influence.model.derivatives import Derivatives
from influence.model.objective import TrainingObjective
from influence.model.vectors import vec_to_numpy
from influence.model.models import Classifier, select_params, strip_softmax

SEED = 3
DAMPING = 0.05


# ----------------------------------------------------------------------------- the reference

def softmax(clf, x):
    logits = np.asarray(clf.image_logits(x), np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


def numpy_labels(clf, x, y, fisher, seed):
    """The labels of the Fisher: y, or one draw per image from the model's softmax (numpy)."""
    if fisher == "empirical":
        return np.asarray(y, np.int64)
    p = softmax(clf, x)
    u = np.random.default_rng(seed).random(len(x))
    return np.minimum((np.cumsum(p, 1) <= u[:, None]).sum(1), p.shape[1] - 1).astype(np.int64)


def label_sets(clf, x, y, fisher, seed):
    """[(labels (N,), weights (N,))]: the Fisher is Σ over sets of Σ_n w_n² ∇L_n ∇L_nᵀ / N.

    One set of weight 1 (sampled, empirical), one per class c with weight √p_c (true), or one per rank
    j < K with each image's j-th most probable class and weight √p (top:K)."""
    if fisher.startswith("top:"):
        p = softmax(clf, x)
        order = np.argsort(-p, axis=1, kind="stable")
        return [(order[:, j], np.sqrt(p[np.arange(len(x)), order[:, j]]))
                for j in range(min(int(fisher[4:]), p.shape[1]))]
    if fisher != "true":
        return [(numpy_labels(clf, x, y, fisher, seed), np.ones(len(x)))]
    p = softmax(clf, x)
    return [(np.full(len(x), c, np.int64), np.sqrt(p[:, c])) for c in range(p.shape[1])]


def tiny_signals(clf, x, labels):
    """{layer name: (a (N, P, K1), δ (N, P, C))} of the tiny model's conv and dense layers.

    Conv patches are numpy slices (valid 3x3, stride 1); δ = ∂L_n/∂z comes from a forward pass
    written out by hand from the conv pre-activation on.
    """
    model = clf.model
    conv, dense = model.get_layer("conv"), model.get_layer("dense")
    names = {g.name for g in clf.groups}
    bn = model.get_layer("bn") if any(layer.name == "bn" for layer in model.layers) else None
    n = len(x)
    xf = x.astype(np.float64) / 255.0
    kh, kw = conv.kernel_size
    oh, ow = xf.shape[1] - kh + 1, xf.shape[2] - kw + 1
    pat = np.stack([xf[:, i:i + kh, j:j + kw, :].reshape(n, -1) for i in range(oh) for j in range(ow)], axis=1)
    c1 = conv.kernel.shape[-1]
    z1 = tf.constant(pat @ np.asarray(conv.kernel).reshape(-1, c1) + np.asarray(conv.bias))
    with tf.GradientTape() as tape:
        tape.watch(z1)
        h = tf.tanh(tf.reshape(z1, (n, oh, ow, c1)))
        if bn is not None:
            h = bn(h, training=False)
        a2 = tf.reshape(h, (n, -1))
        z2 = tf.matmul(a2, dense.kernel) + dense.bias
        loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=z2))
    d1, d2 = tape.gradient(loss, [z1, z2])
    np.testing.assert_allclose(z2.numpy(), clf.image_logits(x).numpy(), rtol=1e-10, atol=1e-12)
    one = np.ones((n, 1, 1))
    out = {"conv": (np.concatenate([pat, np.broadcast_to(one, (n, pat.shape[1], 1))], -1), d1.numpy()),
           "dense": (np.concatenate([a2.numpy()[:, None], one], -1), d2.numpy()[:, None])}
    return {k: v for k, v in out.items() if k in names}


def per_image_grads(d, x, labels):
    """(N, P) float64: one tape per image."""
    return np.stack([vec_to_numpy(d.gradient(x[i:i + 1], labels[i:i + 1])) for i in range(len(x))])


def group_slices(clf):
    out, at = {}, 0
    for g in clf.groups:
        size = sum(int(np.prod(v.shape)) for v in g.variables)
        out[g.name] = slice(at, at + size)
        at += size
    return out


def l2_rows(layer, k1):
    """(K1,) regulariser Hessian per row of the (K1, C) layer matrix (2c; kernel rows, bias row)."""
    def two_c(v):
        return 2.0 * float(v.regularizer.l2) if getattr(v, "regularizer", None) is not None else 0.0
    rows = np.full(k1, two_c(layer.kernel))
    if layer.bias is not None:
        rows[-1] = two_c(layer.bias)
    return rows


def block_eigh(m, bounds):
    """Eigenpairs of the block-diagonal part of ``m``: (Q (D, D) block-diagonal, e (D,))."""
    q, e = np.zeros_like(m), np.zeros(len(m))
    for s, t in bounds:
        e[s:t], q[s:t, s:t] = np.linalg.eigh(m[s:t, s:t])
    return q, e


def kron_reference(a, dl):
    """A = mean_n (1/P) Σ_p a aᵀ, S = mean_n Σ_p δ δᵀ, G_n = Σ_p a δᵀ (N, K1, C)."""
    n, p = a.shape[:2]
    return (np.einsum("npk,npl->kl", a, a) / (p * n), np.einsum("npk,npl->kl", dl, dl) / n,
            np.einsum("npk,npo->nko", a, dl))


def dense_fisher(clf, d, x, y, method, fisher="sampled", seed=0, max_block=4096):
    """The dense (P, P) matrix F + R that ``method`` ("kfac"/"ekfac") approximates, built in numpy.

    Rows are (label set, image) pairs (see :func:`label_sets`), each with its weighted backward
    signals and per-image gradient; A comes from the images once.
    """
    sets = label_sets(clf, x, y, fisher, seed)
    n = len(x)
    parts = [tiny_signals(clf, x, labels) for labels, _ in sets]
    signals = {name: (parts[0][name][0],
                      np.concatenate([part[name][1] * w[:, None, None] for part, (_, w) in zip(parts, sets)]))
               for name in parts[0]}
    grads = np.concatenate([per_image_grads(d, x, labels) * w[:, None] for labels, w in sets])
    slices = group_slices(clf)
    total = grads.shape[1]
    f = np.zeros((total, total))
    for g in clf.groups:
        sl = slices[g.name]
        if g.name in signals:
            a, dl = signals[g.name]
            reps = len(dl) // n
            A, _, _ = kron_reference(a, dl[:n])
            _, S, G = kron_reference(np.concatenate([a] * reps), dl)
            S = S * reps                     # kron_reference divides by the rows, the Fisher by the images
            k1, c = A.shape[0], S.shape[0]
            # the reference itself: G_n from patches and signals is the per-image gradient
            np.testing.assert_allclose(G.reshape(len(G), -1), grads[:, sl], rtol=1e-8, atol=1e-12)
            qa, ea = block_eigh(A, split_blocks(k1, max_block))
            qs, es = block_eigh(S, split_blocks(c, max_block))
            if method == "ekfac":
                lam = np.sum(np.einsum("ki,nkl,lj->nij", qa, G, qs) ** 2, axis=0) / n
            else:
                lam = np.outer(np.clip(ea, 0, None), np.clip(es, 0, None))
            rho = (qa ** 2).T @ l2_rows(g.layer, k1)
            q = np.kron(qa, qs)
            f[sl, sl] = (q * (lam + rho[:, None]).ravel()) @ q.T
        else:
            reg = np.concatenate([np.full(int(np.prod(v.shape)), 2.0 * float(v.regularizer.l2)
                                          if getattr(v, "regularizer", None) is not None else 0.0)
                                  for v in g.variables])
            f[sl, sl] = np.diag(np.sum(grads[:, sl] ** 2, axis=0) / n + reg)
    return f


def solve_all(solver, d, V):
    return np.stack([vec_to_numpy(s) for s in solver.solve([to_vec(v, d) for v in V])])


# ----------------------------------------------------------------------------- fixtures

def unit64(x):
    """x / 255 in float64: the numpy reference sees the very same inputs (no float32 rounding)."""
    return tf.cast(x, tf.float64) / 255.0


def tiny_model(seed=0, batchnorm=True):
    """engine_helpers' tiny model with a float64 Input (a float32 Input would round the images):
    Conv(3, tanh, L2) [-> BatchNorm] -> Flatten -> Dense(4, softmax, L2)."""
    keras.utils.set_random_seed(seed)
    reg = keras.regularizers.L2(1e-3)
    layers = [keras.Input(IMAGE, dtype="float64"),
              keras.layers.Conv2D(3, 3, activation="tanh", kernel_regularizer=reg, dtype="float64", name="conv")]
    if batchnorm:
        layers.append(keras.layers.BatchNormalization(dtype="float64", name="bn"))
    layers += [keras.layers.Flatten(dtype="float64"),
               keras.layers.Dense(CLASSES, activation="softmax", kernel_regularizer=reg, dtype="float64",
                                  name="dense")]
    model = keras.Sequential(layers)
    if batchnorm:
        rng = np.random.default_rng(seed)
        model.get_layer("bn").moving_mean.assign(rng.uniform(-0.2, 0.2, 3))
        model.get_layer("bn").moving_variance.assign(rng.uniform(0.5, 1.5, 3))
        model.get_layer("bn").gamma.assign(rng.uniform(0.5, 1.5, 3))
    return model


def tiny_setup(tmp_path, n=64, params="all", chunk=16, **model_kw):
    """The tiny conv/BN/dense model with float64 input and preprocessing, on n random images."""
    model, _ = strip_softmax(tiny_model(0, **model_kw))
    clf = Classifier(model, unit64, select_params(model, params))
    d = Derivatives(clf, IMAGE)
    x, y = random_data(n)
    archive = write_train_archive(tmp_path / "train.npz", x, y, 16)
    return clf, d, TrainingObjective(d, archive, chunk=chunk), archive, x, y


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    clf, d, obj, archive, x, y = tiny_setup(tmp_path_factory.mktemp("ekfac"))
    fitted = {}
    for method in ("kfac", "ekfac"):
        s = make_solver(method, obj, DAMPING, seed=SEED, fisher="sampled", progress=False)
        s.fit()
        fitted[method] = s
    return dict(clf=clf, d=d, obj=obj, archive=archive, x=x, y=y, fitted=fitted,
                rng=np.random.default_rng(7))


# ----------------------------------------------------------------------------- pure pieces

def test_split_blocks_cover_in_near_equal_parts():
    for size, mb in ((10, 4), (25089, 4096), (7, 7), (8, 3), (1, 5)):
        b = split_blocks(size, mb)
        assert b[0][0] == 0 and b[-1][1] == size
        assert all(s2 == e1 for (_, e1), (s2, _) in zip(b, b[1:]))
        widths = [e - s for s, e in b]
        assert max(widths) <= mb and max(widths) - min(widths) <= 1
        assert len(b) == -(-size // mb)
    with pytest.raises(SettingError, match="^ekfac_max_block: must be >= 1, got 0$"):
        split_blocks(5, 0)


def test_sample_labels_is_the_inverse_cdf():
    p = np.array([0.1, 0.0, 0.6, 0.3])
    m = 1000
    u = (np.arange(m) + 0.5) / m
    labels = sample_labels(tf.constant(np.tile(p, (m, 1))), tf.constant(u)).numpy()
    np.testing.assert_array_equal(np.bincount(labels, minlength=4), (p * m).astype(int))
    assert labels.dtype == np.int64


def test_vgg16_fc1_fits_8gb_only_with_split_blocks():
    k1, c = 25088 + 1, 4096
    split = kron_factor_bytes(k1, c, split_blocks(k1, 4096), split_blocks(c, 4096), corrected=True)
    whole = kron_factor_bytes(k1, c, [(0, k1)], [(0, c)], corrected=True)
    assert split < 8 * 2**30 < whole


# ----------------------------------------------------------------------------- against references

@pytest.mark.slow
def test_kfac_factors_of_dense_and_conv_match_numpy(tiny):
    clf, d, x, y = tiny["clf"], tiny["d"], tiny["x"], tiny["y"]
    labels = numpy_labels(clf, x, y, "sampled", SEED)
    signals = tiny_signals(clf, x, labels)
    got = tiny["fitted"]["kfac"].kronecker_factors()
    assert set(got) == {"conv", "dense"}
    for name in ("conv", "dense"):
        A, S, _ = kron_reference(*signals[name])
        np.testing.assert_allclose(got[name][0], A, rtol=1e-9, atol=1e-12 * np.abs(A).max())
        np.testing.assert_allclose(got[name][1], S, rtol=1e-9, atol=1e-12 * np.abs(S).max())
    # the BatchNorm layer got a diagonal block: E[g²] from per-image gradients
    grads = per_image_grads(d, x, labels)
    sl = group_slices(clf)["bn"]
    np.testing.assert_allclose(tiny["fitted"]["kfac"].state()["bn.diag"], np.mean(grads[:, sl] ** 2, 0), rtol=1e-9)


def test_ekfac_eigenvalues_are_the_fisher_diagonal_in_the_kronecker_basis(tiny):
    clf, d, x, y = tiny["clf"], tiny["d"], tiny["x"], tiny["y"]
    state = tiny["fitted"]["ekfac"].state()
    labels = numpy_labels(clf, x, y, "sampled", SEED)
    grads = per_image_grads(d, x, labels)
    for name, sl in group_slices(clf).items():
        if name == "bn":
            continue
        qa, qs = state[f"{name}.QA.0"], state[f"{name}.QS.0"]
        fisher = grads[:, sl].T @ grads[:, sl] / len(x)          # dense, same labels
        q = np.kron(qa, qs)
        want = np.diag(q.T @ fisher @ q).reshape(qa.shape[0], qs.shape[0])
        np.testing.assert_allclose(state[f"{name}.Lambda"], want, rtol=1e-8, atol=1e-12 * want.max())


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_inverse_matches_dense_solve(tiny, method):
    clf, d, x, y = tiny["clf"], tiny["d"], tiny["x"], tiny["y"]
    f = dense_fisher(clf, d, x, y, method, seed=SEED)
    V = tiny["rng"].standard_normal((2, clf.num_params))
    got = solve_all(tiny["fitted"][method], d, V)
    want = np.linalg.solve(f + DAMPING * np.eye(len(f)), V.T).T
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-9 * np.abs(want).max())
    np.testing.assert_array_equal(vec_to_numpy(tiny["fitted"][method].precondition(to_vec(V[0], d))), got[0])


def _dense_only(tmp_path, n, regulariser=None):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input(IMAGE, dtype="float64"), keras.layers.Flatten(dtype="float64"),
                              keras.layers.Dense(4, dtype="float64", kernel_regularizer=regulariser, name="dense")])
    model, _ = strip_softmax(model)
    clf = Classifier(model, unit64, select_params(model, "all"))
    d = Derivatives(clf, IMAGE)
    x, y = random_data(n, seed=5)
    return clf, d, TrainingObjective(d, write_train_archive(tmp_path / "train.npz", x, y, 8), chunk=8), x, y


@pytest.mark.slow
@pytest.mark.parametrize("method,fisher", [("kfac", "sampled"), ("ekfac", "sampled"), ("kfac", "true"),
                                           ("ekfac", "true")])
def test_one_dense_layer_one_image_is_the_exact_fisher(tmp_path, method, fisher):
    """For Dense on one image a is fixed, so A ⊗ S is the exact Fisher -- also the expectation over
    classes Σ_c p_c g_c g_cᵀ (a ⊗ Σ_c p_c δ_c δ_cᵀ)."""
    clf, d, obj, x, y = _dense_only(tmp_path, 1)
    lam = 1.0
    solver = make_solver(method, obj, lam, fisher=fisher, seed=SEED, progress=False)
    p = clf.num_params
    inv = solve_all(solver, d, np.eye(p))
    f = np.linalg.inv(inv) - lam * np.eye(p)
    want = sum(np.outer(g, g) for labels, w in label_sets(clf, x, y, fisher, SEED)
               for g in per_image_grads(d, x, labels) * w[:, None])
    np.testing.assert_allclose(f, want, atol=1e-9 * np.abs(want).max())


@pytest.mark.slow
def test_results_do_not_depend_on_chunk_size(tiny):
    d, archive = tiny["d"], tiny["archive"]
    V = tiny["rng"].standard_normal((2, tiny["clf"].num_params))
    small = make_solver("ekfac", TrainingObjective(d, archive, chunk=7), DAMPING, seed=SEED, fisher="sampled", progress=False)
    np.testing.assert_allclose(solve_all(small, d, V), solve_all(tiny["fitted"]["ekfac"], d, V), rtol=1e-9,
                               atol=1e-12)


def test_state_round_trip_gives_identical_solves(tiny):
    d, obj, fitted = tiny["d"], tiny["obj"], tiny["fitted"]["ekfac"]
    V = tiny["rng"].standard_normal((2, tiny["clf"].num_params))
    state = {k: np.array(v) for k, v in fitted.state().items()}
    loaded = make_solver("ekfac", obj, DAMPING, seed=SEED, fisher="sampled", progress=False)
    loaded.load_state(state)
    np.testing.assert_array_equal(solve_all(loaded, d, V), solve_all(fitted, d, V))
    # the damping is not part of the state: another λ reuses it
    other = make_solver("ekfac", obj, 1.0, seed=SEED, fisher="sampled", progress=False)
    other.load_state(state)
    assert other.cache_key() == fitted.cache_key() and "damping" not in other.cache_key()
    assert not np.allclose(solve_all(other, d, V), solve_all(fitted, d, V))
    del state["dense.Lambda"]
    with pytest.raises(ValueError, match="dense.Lambda"):
        make_solver("ekfac", obj, DAMPING, progress=False).load_state(state)


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_fitted_state_is_one_value_that_round_trips_through_its_arrays(tiny, method):
    """KroneckerFit -> to_arrays -> from_arrays: the same solve and self-influence, bit for bit, through
    the parts themselves (damped_eigenvalues, KroneckerSolve, SelfInfluenceGraph), and the same arrays."""
    from influence.curvature.kfac.self_influence import SelfInfluenceGraph
    from influence.curvature.kfac.solve import KroneckerSolve, damped_eigenvalues
    from influence.curvature.kfac.state import KroneckerFit

    d, solver = tiny["d"], tiny["fitted"][method]
    fit = solver.fitted
    arrays = {k: np.array(v) for k, v in fit.to_arrays().items()}
    back = KroneckerFit.from_arrays(solver.plan, arrays, fit.corrected)
    assert back.corrected == (method == "ekfac") and not back.compacted
    assert back.to_arrays().keys() == fit.to_arrays().keys()
    for key, value in back.to_arrays().items():
        np.testing.assert_array_equal(value, fit.to_arrays()[key], err_msg=key)
    for name, rho in fit.rho.items():
        np.testing.assert_array_equal(back.rho[name], rho, err_msg=name)
    parts = KroneckerSolve(solver.plan, solver.variables, np.float64)
    vecs = [to_vec(v, d) for v in tiny["rng"].standard_normal((2, tiny["clf"].num_params))]

    def solved(f):
        dens, _ = damped_eigenvalues(f, solver.damping_spec, np.float64, method)
        return [vec_to_numpy(s) for s in parts.inverse(f.eig, dens, vecs)]

    got = solved(back)
    np.testing.assert_array_equal(got, solved(fit))
    np.testing.assert_array_equal(got, [vec_to_numpy(s) for s in solver.solve(vecs)])
    x, y = tiny["x"][:5], tiny["y"][:5].astype(np.int64)
    self_back = SelfInfluenceGraph(solver.signals, back, solver.damping_spec, d.x_spec, d.y_spec)(x, y)
    np.testing.assert_array_equal(self_back, solver.self_influence_batch(x, y))
    with pytest.raises(ValueError, match="dense.QS.0"):
        KroneckerFit.from_arrays(solver.plan, {k: v for k, v in arrays.items() if k != "dense.QS.0"}, fit.corrected)


@pytest.mark.slow
def test_split_blocks_give_block_diagonal_factors(tiny):
    clf, d, x, y, obj = tiny["clf"], tiny["d"], tiny["x"], tiny["y"], tiny["obj"]
    solver = make_solver("ekfac", obj, DAMPING, seed=SEED, fisher="sampled", ekfac_max_block=10, progress=False)
    solver.fit()
    whole = tiny["fitted"]["kfac"].kronecker_factors()
    for name, (a, s) in solver.kronecker_factors().items():
        mask = np.zeros_like(a, bool)
        for lo, hi in split_blocks(len(a), 10):
            mask[lo:hi, lo:hi] = True
        assert len(split_blocks(len(a), 10)) >= 3
        np.testing.assert_allclose(a, np.where(mask, whole[name][0], 0.0), rtol=1e-9, atol=1e-14)
        np.testing.assert_allclose(s, whole[name][1], rtol=1e-9, atol=1e-14)
    f = dense_fisher(clf, d, x, y, "ekfac", seed=SEED, max_block=10)
    V = tiny["rng"].standard_normal((1, clf.num_params))
    want = np.linalg.solve(f + DAMPING * np.eye(len(f)), V.T).T
    np.testing.assert_allclose(solve_all(solver, d, V), want, rtol=1e-7, atol=1e-9 * np.abs(want).max())


# ----------------------------------------------------------------------------- errors and options

def test_memory_budget_error_names_layers_and_ways_out(tiny):
    with pytest.raises(UserError) as err:
        make_solver("ekfac", tiny["obj"], DAMPING, memory_budget=1e-6, progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "--" not in msg                 # settings by their Python names
    for part in ("memory_budget", "params", "ekfac_max_block", "dense", "conv", "GB"):
        assert part in msg, (part, msg)
    make_solver("ekfac", tiny["obj"], DAMPING, memory_budget=1e-3, progress=False)   # ~50 kB: fits


def test_l1_regulariser_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="layer 'dense' has a L1 regulariser.*L2"):
        make_solver("ekfac", _dense_only(tmp_path, 4, keras.regularizers.L1(1e-3))[2], DAMPING, progress=False)


@pytest.mark.slow
def test_singular_fisher_without_damping_is_a_clear_error(tmp_path):
    clf, d, obj, x, y = _dense_only(tmp_path, 1)
    solver = make_solver("ekfac", obj, 0.0, progress=False)
    with pytest.raises(SettingError, match="^damping: .*singular.*give a damping > 0"):
        solver.solve([to_vec(np.ones(clf.num_params), d)])


@pytest.mark.slow
def test_fisher_sampled_is_deterministic_and_differs_from_empirical(tiny):
    obj, d = tiny["obj"], tiny["d"]
    V = tiny["rng"].standard_normal((1, tiny["clf"].num_params))
    base = solve_all(tiny["fitted"]["ekfac"], d, V)
    again = make_solver("ekfac", obj, DAMPING, seed=SEED, fisher="sampled", progress=False)
    np.testing.assert_array_equal(solve_all(again, d, V), base)
    other_seed = make_solver("ekfac", obj, DAMPING, seed=SEED + 1, fisher="sampled", progress=False)
    empirical = make_solver("ekfac", obj, DAMPING, fisher="empirical", progress=False)
    assert empirical.cache_key() == {"fisher": "empirical", "ekfac_max_block": 4096}
    for s in (other_seed, empirical):
        assert np.linalg.norm(solve_all(s, d, V) - base) > 1e-3 * np.linalg.norm(base)
    # the empirical Fisher follows the true labels
    f = dense_fisher(tiny["clf"], d, tiny["x"], tiny["y"], "ekfac", fisher="empirical")
    want = np.linalg.solve(f + DAMPING * np.eye(len(f)), V.T).T
    np.testing.assert_allclose(solve_all(empirical, d, V), want, rtol=1e-7, atol=1e-9 * np.abs(want).max())
    with pytest.raises(SettingError, match="^fisher: must be one of auto, sampled, true, empirical or top:K, got 'exact'"):
        make_solver("ekfac", obj, DAMPING, fisher="exact")
    for bad in ("top:0", "top:x", "top:"):
        with pytest.raises(SettingError, match="^fisher: top:K takes a whole number of classes K >= 1"):
            make_solver("ekfac", obj, DAMPING, fisher=bad)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_true_fisher_is_the_expectation_over_classes(tiny, method):
    clf, d, obj = tiny["clf"], tiny["d"], tiny["obj"]
    solver = make_solver(method, obj, DAMPING, fisher="true", progress=False)
    assert solver.cache_key() == {"fisher": "true", "ekfac_max_block": 4096}
    f = dense_fisher(clf, d, tiny["x"], tiny["y"], method, fisher="true")
    V = tiny["rng"].standard_normal((2, clf.num_params))
    want = np.linalg.solve(f + DAMPING * np.eye(len(f)), V.T).T
    np.testing.assert_allclose(solve_all(solver, d, V), want, rtol=1e-7, atol=1e-9 * np.abs(want).max())


@pytest.mark.slow
@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_top_k_fisher_is_the_probability_weighted_sum_over_each_images_top_classes(tiny, method):
    """top:2 against the dense Fisher of each image's 2 most probable classes (weights p_c); top:K with
    K >= the number of classes is the true Fisher (another order of summation)."""
    clf, d, obj = tiny["clf"], tiny["d"], tiny["obj"]
    V = tiny["rng"].standard_normal((2, clf.num_params))
    solver = make_solver(method, obj, DAMPING, fisher="top:2", progress=False)
    assert solver.cache_key() == {"fisher": "top:2", "ekfac_max_block": 4096}
    f = dense_fisher(clf, d, tiny["x"], tiny["y"], method, fisher="top:2")
    want = np.linalg.solve(f + DAMPING * np.eye(len(f)), V.T).T
    got = solve_all(solver, d, V)
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-9 * np.abs(want).max())
    true = solve_all(make_solver(method, obj, DAMPING, fisher="true", progress=False), d, V)
    assert np.linalg.norm(got - true) > 1e-4 * np.linalg.norm(true)       # the dropped classes count
    every = solve_all(make_solver(method, obj, DAMPING, fisher=f"top:{clf.num_classes + 3}", progress=False), d, V)
    np.testing.assert_allclose(every, true, rtol=1e-9, atol=1e-12 * np.abs(true).max())


@pytest.mark.slow
def test_a_float32_model_fits_the_same_factors_as_float64(tmp_path, tiny):
    """Per-chunk products run in the model's dtype (float32 here), sums in float64: same state."""
    model64, _ = strip_softmax(tiny_model(0))
    keras.utils.set_random_seed(0)
    layers64 = [layer for layer in model64.layers if not isinstance(layer, keras.layers.InputLayer)]
    model32 = keras.Sequential([keras.Input(IMAGE)] + [
        type(layer).from_config({**layer.get_config(), "dtype": "float32"}) for layer in layers64])
    for src, dst in zip(layers64, model32.layers):
        dst.set_weights([w.astype(np.float32) for w in src.get_weights()])
    clf = Classifier(model32, lambda x: tf.cast(x, tf.float32) / 255.0, select_params(model32, "all"))
    d = Derivatives(clf, IMAGE)
    obj = TrainingObjective(d, tiny["archive"], chunk=16)
    s32 = make_solver("ekfac", obj, DAMPING, seed=SEED, fisher="sampled", progress=False)
    s32.fit()
    want, got = tiny["fitted"]["ekfac"].state(), s32.state()
    assert set(want) == set(got)
    for key in want:
        if ".Q" in key:            # eigenvectors: compare the subspaces they span, sign-free
            np.testing.assert_allclose(np.abs(got[key].T @ want[key]).max(axis=0), 1.0, atol=5e-3, err_msg=key)
        else:
            np.testing.assert_allclose(got[key], want[key], rtol=2e-3, atol=1e-6 * np.abs(want[key]).max(),
                                       err_msg=key)


@pytest.mark.slow
def test_compact_keeps_the_solves_and_solve_stacked_writes_in_place(tiny):
    """After the state is cached the solver keeps eigenvectors and Λ + ρ + λ only (model dtype):
    the same solutions, solve_stacked equal to stacking solve's, and state() refused."""
    d, obj = tiny["d"], tiny["obj"]
    V = tiny["rng"].standard_normal((3, tiny["clf"].num_params))
    s = make_solver("ekfac", obj, DAMPING, seed=SEED, fisher="sampled", progress=False)
    s.load_state({k: np.array(v) for k, v in tiny["fitted"]["ekfac"].state().items()})
    before = solve_all(s, d, V)
    s.compact()
    np.testing.assert_array_equal(solve_all(s, d, V), before)
    vecs = [to_vec(v, d) for v in V]
    stacked = s.solve_stacked(vecs)
    assert vecs == [None] * 3                      # the caller's gradients were released on the way
    got = np.concatenate([np.reshape(p.numpy(), (3, -1)) for p in stacked], axis=1)
    np.testing.assert_array_equal(got, before)
    held = sum(q.nbytes for e in s.fitted.eig.values() for k in ("QA", "QS") for q in e[k])
    held += sum(a.nbytes for a in s.damped().values())
    assert s.resident_bytes == held
    assert s.fitted.compacted and not s.fitted.lam and "eA" not in s.fitted.eig["dense"]
    with pytest.raises(RuntimeError, match="compact"):
        s.state()


def test_rank_one_is_found_and_refused_on_rank_two():
    from influence.curvature.kfac.solve import rank_one

    rng = np.random.default_rng(0)
    a, d = rng.standard_normal(300), rng.standard_normal(40)
    u, w = rank_one(np.outer(a, d), 1e-12, rows=64)
    np.testing.assert_allclose(np.outer(u, w), np.outer(a, d), rtol=1e-12, atol=1e-14)
    assert rank_one(np.outer(a, d) + 1e-6 * np.outer(d[:1].repeat(300), a[:40]), 1e-12, rows=64) is None
    assert rank_one(np.zeros((3, 4)), 1e-12) is None


def test_rank_one_test_vectors_take_the_cheap_rotation_with_the_same_answer(tiny, monkeypatch):
    """A one-image gradient of a Dense layer is a δᵀ: rotated as (Q_Aᵀa)(Q_Sᵀδ)ᵀ it gives the same solve."""
    from influence.curvature.kfac import solve as kfac_solve

    d, solver = tiny["d"], tiny["fitted"]["ekfac"]
    grads = [d.gradient(tiny["x"][i:i + 1], tiny["y"][i:i + 1].astype(np.int64)) for i in range(2)]
    full = [vec_to_numpy(s) for s in solver.solve(grads)]
    calls = []
    real = kfac_solve.rank_one
    monkeypatch.setattr(kfac_solve, "rank_one", lambda m, tol: calls.append(real(m, tol) is not None) or real(m, tol))
    monkeypatch.setattr(kfac_solve, "RANK_ONE_MIN", 1)
    cheap = [vec_to_numpy(s) for s in solver.solve(grads)]
    assert calls.count(True) == 2 and calls.count(False) == 2     # dense is rank one, the conv is not
    for f, c in zip(full, cheap):
        np.testing.assert_allclose(c, f, rtol=1e-9, atol=1e-12 * np.abs(f).max())


@pytest.mark.slow
def test_fisher_auto_is_the_expectation_over_the_classes_that_carry_the_mass(tiny):
    """``--fisher auto`` (the default): ``true`` up to AUTO_TRUE_CLASSES classes, else ``top:10``."""
    from influence.curvature.kfac.signals import AUTO_TRUE_CLASSES, resolve_fisher

    assert resolve_fisher("auto", AUTO_TRUE_CLASSES) == "true"
    assert resolve_fisher("auto", 1000) == f"top:{AUTO_TRUE_CLASSES}"
    assert resolve_fisher("sampled", 1000) == "sampled"
    obj, d = tiny["obj"], tiny["d"]
    default = make_solver("ekfac", obj, DAMPING, progress=False)
    assert default.fisher == "true" and default.cache_key()["fisher"] == "true"
    V = tiny["rng"].standard_normal((1, tiny["clf"].num_params))
    true = make_solver("ekfac", obj, DAMPING, fisher="true", progress=False)
    np.testing.assert_array_equal(solve_all(default, d, V), solve_all(true, d, V))
