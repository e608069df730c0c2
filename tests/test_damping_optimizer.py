"""``--damping optimizer``: the per-parameter damping read from the model's training run
(influence.model.training_state), against float64 dense references on a tiny Adam-trained model."""
import numpy as np
import pytest

keras = pytest.importorskip("keras")

from test_calibrate import _images, _save_model  # noqa: E402  (the tiny Adam-trained model of --calibrate)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("optdamp")
    rng = np.random.default_rng(3)
    x, y = _images(rng, 64)
    xt, yt = _images(rng, 3)
    model = _save_model(root / "model.keras", x, y, epochs=3)
    bare = _save_model(root / "bare.keras", x, y, compiled=False)
    return model, bare, x, y, xt, yt


def _inf(trained, **kw):
    import influence

    model, _, x, y, _, _ = trained
    return influence.Influence(str(model), train=(x, y), preprocess="unit", progress=False, hessian="ggn", **kw)


def test_the_diagonal_is_adams_step_size_over_the_summed_learning_rate(trained):
    from influence.model.training_state import response_diagonal

    inf = _inf(trained, solver="exact", damping="optimizer")
    got = response_diagonal(inf.clf)
    m = keras.models.load_model(trained[0])
    opt = m.optimizer
    steps = int(opt.iterations.numpy())
    assert steps == 3 * 2 and got.facts["steps"] == steps and got.facts["optimizer"] == "Adam"
    expected = []
    for v in inf.clf.variables:        # Keras names Adam's slots <optimizer>/<layer>_<variable>_velocity
        (slot,) = [s for s in opt.variables if s.path.endswith(f"/{v.path.replace('/', '_')}_velocity")]
        velocity = slot.numpy().ravel().astype(np.float64)
        expected.append((np.sqrt(velocity / (1 - 0.999 ** steps)) + 1e-7) / (1e-2 * steps))
    np.testing.assert_allclose(got.diagonal, np.concatenate(expected), rtol=1e-6)
    assert got.diagonal.shape == (inf.clf.num_params,)


@pytest.mark.slow
def test_exact_and_full_rank_krylov_solve_h_plus_the_diagonal(trained):
    """exact: ``(G + c·D)⁻¹ v`` with the dense float64 G; krylov at full rank: the same from the basis of
    ``S G S``; self-influence too."""
    from influence.model.training_state import response_diagonal
    from influence.model.vectors import numpy_to_vec, vec_to_numpy

    base = _inf(trained, solver="exact", damping=0.0)
    g = base.solver.matrix()                                      # G, no damping
    d = response_diagonal(base.clf).diagonal
    rng = np.random.default_rng(0)
    v = rng.standard_normal((2, len(d)))
    like = base.clf.variables
    for factor, text in ((1.0, "optimizer"), (0.3, "optimizer:0.3")):
        want = np.linalg.solve(g + factor * np.diag(d), v.T).T
        exact = _inf(trained, solver="exact", damping=text)
        got = np.stack([vec_to_numpy(s) for s in exact.solver.solve([numpy_to_vec(r, like) for r in v])])
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9 * np.abs(want).max())
        krylov = _inf(trained, solver="krylov", damping=text, rank=len(d))
        krylov.fit()
        got = krylov.solver.solve_numpy(v)
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())
    _, _, x, y, _, _ = trained
    si_exact = _inf(trained, solver="exact", damping="optimizer").self_influence()
    si_krylov = _inf(trained, solver="krylov", damping="optimizer", rank=len(d)).self_influence()
    np.testing.assert_array_equal(si_krylov.indices, si_exact.indices)
    np.testing.assert_allclose(si_krylov.values, si_exact.values, rtol=1e-3)


@pytest.mark.slow
def test_scores_with_damping_optimizer_differ_from_any_scalar_damping_only_through_d(trained):
    """A scalar λ equal to D's mean gives other scores (D is not constant), and scaling D by F equals
    optimizer:F."""
    _, _, _, _, xt, yt = trained
    one = _inf(trained, solver="exact", damping="optimizer:2").scores(xt, yt)
    from influence.model.training_state import response_diagonal

    inf = _inf(trained, solver="exact", damping=0.0)
    d = response_diagonal(inf.clf).diagonal
    scalar = _inf(trained, solver="exact", damping=float(2 * d.mean())).scores(xt, yt)
    assert d.std() > 0.1 * d.mean() and not np.allclose(one, scalar, rtol=1e-3)


def test_damping_optimizer_refusals_are_one_line(trained):
    from influence.errors import SettingError, UserError
    from influence.settings import parse_damping

    assert str(parse_damping("optimizer")) == "optimizer" and str(parse_damping("optimizer:0.3")) == "optimizer:0.3"
    assert parse_damping("Optimizer:0.3").optimizer and parse_damping("optimizer").value == 1.0
    for text in ("optimizer", "optimizer:0.3"):            # run.json keeps the text: a resume parses it back
        assert parse_damping(text).recorded() == text and parse_damping(parse_damping(text).recorded()).optimizer
    for bad in ("optimizer:0", "optimizer:x", "optimizerx"):
        with pytest.raises(UserError, match="^damping optimizer takes a factor"):
            parse_damping(bad)
    from influence.curvature import REGISTRY

    assert all(c.takes_diagonal for c in REGISTRY.values())  # every damped solver
    import influence

    _, bare, x, y, xt, yt = trained
    inf = influence.Influence(str(bare), train=(x, y), preprocess="unit", progress=False, solver="exact",
                              damping="optimizer")
    with pytest.raises(SettingError, match=r"^damping: optimizer reads the training run .* has none"):
        inf.scores(xt, yt)


def test_krylov_switches_between_scalar_and_optimizer_damping_on_one_basis(trained):
    """The basis is of A alone: set_damping to optimizer:F and back equals a solver built with it (rank 8: the
    floor and the Woodbury core in play)."""
    rng = np.random.default_rng(1)
    krylov = _inf(trained, solver="krylov", damping="0.1x", rank=8)
    krylov.fit()
    v = rng.standard_normal((2, krylov.clf.num_params))
    for damping in ("optimizer:3", "0.1x", "optimizer"):
        krylov.solver.set_damping(damping)
        fresh = _inf(trained, solver="krylov", damping=damping, rank=8)
        fresh.fit()
        np.testing.assert_allclose(krylov.solver.solve_numpy(v), fresh.solver.solve_numpy(v), rtol=1e-10)
    krylov.solver.set_damping("optimizer:3")
    assert krylov.solver.damping == 3.0


def test_the_woodbury_pieces_equal_the_dense_inverse_of_the_low_rank_model():
    """lowrank.diagonal_inverse / diagonal_quadratic: ``(Uᵀ(Σ − φ)U + φI + D)⁻¹`` against numpy, a pair at
    the floor included."""
    from influence.curvature.lowrank import linalg as lowrank

    rng = np.random.default_rng(2)
    p, k = 30, 4
    u = np.linalg.qr(rng.standard_normal((p, k)))[0].T
    sigma, floor = np.array([5.0, 2.0, 0.7, 0.3]), 0.3
    d = rng.uniform(0.01, 1.0, p)
    a = u.T @ np.diag(sigma - floor) @ u + floor * np.eye(p) + np.diag(d)
    v = rng.standard_normal((3, p))
    pieces = lowrank.diagonal_woodbury(u, sigma, floor, d)
    np.testing.assert_allclose(lowrank.diagonal_inverse(u, pieces, v), np.linalg.solve(a, v.T).T, rtol=1e-10)
    np.testing.assert_allclose(lowrank.diagonal_quadratic(u, pieces, v),
                               np.einsum("tp,tp->t", v, np.linalg.solve(a, v.T).T), rtol=1e-10)


def test_a_keras_model_object_from_python_gives_the_same_diagonal(trained):
    import influence
    from influence.model.training_state import response_diagonal

    model, _, x, y, _, _ = trained
    from_file = response_diagonal(_inf(trained, solver="exact").clf).diagonal
    obj = keras.models.load_model(model)
    inf = influence.Influence(obj, train=(x, y), preprocess="unit", progress=False, solver="exact")
    np.testing.assert_array_equal(response_diagonal(inf.clf).diagonal, from_file)


def test_damping_auto_reads_the_training_run_where_the_solver_takes_it(trained):
    """auto -> optimizer for krylov / exact on a model with its optimizer state (said in solver_choice);
    0.1x for other solvers, for a model without state (said why), and an explicit 0.1x stays."""
    import influence

    from influence.model.training_state import mean_training_loss, response_factor

    model, bare, x, y, _, _ = trained
    auto = _inf(trained, solver="exact")
    c = response_factor(mean_training_loss(auto.derivs, auto.train))
    assert str(auto.settings.damping) == f"optimizer:{c:g}" and (f"damping auto: optimizer:{c:g} (per parameter, "
                                                                 f"from the Adam state of 6") in auto.solver_choice
    assert "sqrt(mean training loss" in auto.solver_choice
    assert str(_inf(trained, solver="exact", damping="0.1x").settings.damping) == "0.1x"
    assert str(_inf(trained, solver="ekfac").settings.damping) == "0.1x"
    plain = influence.Influence(str(bare), train=(x, y), preprocess="unit", progress=False, solver="exact")
    assert str(plain.settings.damping) == "0.1x" and plain.solver_choice.endswith("; damping auto: 0.1x (the model holds no trained optimizer state)")
    picked = _inf(trained)                                           # solver auto: krylov here
    assert picked.solver_name == "krylov" and str(picked.settings.damping) == f"optimizer:{c:g}"


def test_damping_auto_s_factor_of_d_follows_the_mean_training_loss():
    """sqrt(mean loss / 0.01) within 0.1-3, two digits: the panel's models land on their measured best factors (the
    demo CNN 2e-4 -> 0.14, the MLPs trained 40 epochs 0.0091 -> 0.95, the briefly trained 0.083 -> 2.9); the mean is
    over a fixed sample of at most RESPONSE_SAMPLE images."""
    from influence.model.training_state import RESPONSE_SAMPLE, mean_training_loss, response_factor

    assert [response_factor(v) for v in (0.0, 2e-4, 0.0091, 0.01, 0.083, 0.5)] == [0.1, 0.14, 0.95, 1.0, 2.9, 3.0]

    class Losses:                               # derivs.losses: the label itself as the loss
        @staticmethod
        def losses(x, y):
            import tensorflow as tf

            return tf.constant(np.asarray(y, np.float64))

    class Train:
        def __init__(self, n):
            self.n, self.read = n, []

        def __len__(self):
            return self.n

        def take(self, idx):
            self.read.extend(np.asarray(idx).tolist())
            return None, np.asarray(idx)

    small = Train(10)
    assert mean_training_loss(Losses, small) == pytest.approx(4.5) and sorted(small.read) == list(range(10))
    big = Train(3 * RESPONSE_SAMPLE)
    first = mean_training_loss(Losses, big)
    assert len(big.read) == RESPONSE_SAMPLE == len(set(big.read)) and big.read == sorted(big.read)
    assert mean_training_loss(Losses, Train(3 * RESPONSE_SAMPLE)) == first           # the same sample every run


def test_the_projected_diagonal_is_the_diagonal_of_d_in_the_kronecker_eigenbasis():
    """``(Q_A∘Q_A)ᵀ D (Q_S∘Q_S)`` (block-diagonal Q_A split in two) equals ``diag(Qᵀ diag(D) Q)`` with the dense
    ``Q = Q_A ⊗ Q_S`` (row-major (K1, C) flattening), float64."""
    from types import SimpleNamespace

    from influence.curvature.kfac.solve import projected_diagonal

    rng = np.random.default_rng(5)
    k_in, c = 4, 3
    qa = [np.linalg.qr(rng.standard_normal((n, n)))[0] for n in (3, 2)]       # K1 = 5: 4 kernel rows + bias
    qs = [np.linalg.qr(rng.standard_normal((c, c)))[0]]
    block = SimpleNamespace(name="dense", k1=k_in + 1, c_out=c, k_in=k_in, kernel_pos=0, bias_pos=1,
                            a_bounds=[(0, 3), (3, 5)], s_bounds=[(0, c)])
    kernel, bias = rng.uniform(0.1, 2.0, (k_in, c)), rng.uniform(0.1, 2.0, c)
    got = projected_diagonal(block, [kernel, bias], {"dense": {"QA": qa, "QS": qs}})
    dense_qa = np.zeros((k_in + 1, k_in + 1))
    dense_qa[:3, :3], dense_qa[3:, 3:] = qa
    q = np.kron(dense_qa, qs[0])
    want = np.diag(q.T @ np.diag(np.concatenate([kernel, bias[None]]).ravel()) @ q).reshape(k_in + 1, c)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert got.shape == (k_in + 1, c) and np.isclose(got.sum(), kernel.sum() + bias.sum())


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["kfac", "ekfac"])
def test_kfac_with_a_constant_d_is_the_scalar_damping_and_self_influence_follows(trained, solver, monkeypatch):
    """Damping optimizer in the Kronecker eigenbasis: a constant ``D = d`` adds ``d`` to every eigenvalue, as
    ``--damping d`` does (the basis is orthonormal), in the solve and in self-influence; the real ``D`` differs."""
    from influence.curvature.base import InverseHVP
    from influence.model.training_state import response_diagonal

    _, _, x, y, xt, yt = trained
    d = response_diagonal(_inf(trained, solver="exact", damping=0.0).clf).diagonal
    real = _inf(trained, solver=solver, damping="optimizer:0.5").scores(xt, yt)
    const = float(np.median(d))
    monkeypatch.setattr(InverseHVP, "response_diagonal",
                        lambda self: np.full(len(d), const) if self.damping_spec.optimizer else None)
    opt = _inf(trained, solver=solver, damping="optimizer:0.5")
    scalar = _inf(trained, solver=solver, damping=0.5 * const)
    np.testing.assert_allclose(opt.scores(xt, yt), scalar.scores(xt, yt), rtol=1e-5)
    np.testing.assert_allclose(opt.self_influence().values, scalar.self_influence().values, rtol=1e-5)
    assert opt.solver.info["damping_per_layer"] and not np.allclose(real, scalar.scores(xt, yt), rtol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["cg", "pcg", "dpcg"])
def test_the_conjugate_gradient_solvers_reach_the_dense_h_plus_d_answer(trained, solver):
    """cg, pcg (EK-FAC preconditioned, itself damped per eigen-direction) and dpcg (the krylov basis's Woodbury
    inverse as preconditioner) converge to exact's ``(G + c·D)⁻¹`` scores."""
    _, _, _, _, xt, yt = trained
    want = _inf(trained, solver="exact", damping="optimizer:0.5").scores(xt, yt)
    got = _inf(trained, solver=solver, damping="optimizer:0.5", cg_tol=1e-8, cg_maxiter=400).scores(xt, yt)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())


@pytest.mark.slow
def test_lissa_reaches_the_dense_h_plus_d_answer(trained):
    """LiSSA damps each step by ``c·D ⊙ h`` (its scale from ``λ_max(H) + c·max D``): with minibatches as large as the
    training set and a depth of several ``s / (c·min D)`` it lands on exact's ``(G + c·D)⁻¹`` scores, and not on
    the scalar damping of the same mean."""
    _, _, _, _, xt, yt = trained
    want = _inf(trained, solver="exact", damping="optimizer:0.5").scores(xt, yt)
    inf = _inf(trained, solver="lissa", damping="optimizer:0.5", iter=1500, bsize=512)
    got = inf.scores(xt, yt)
    info = inf.solver.info
    assert info["response"]["steps"] > 0 and not info["restarts"]
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err < 0.03, err             # measured 0.009 at depth 1500 (0.007 at 3000, 0.024 at 1000)
    low, high = inf.solver.damping_bounds()
    assert 0 < low < high and info["scale"] >= high
    from influence.model.training_state import response_diagonal

    mean = 0.5 * response_diagonal(inf.clf).diagonal.mean()
    scalar = _inf(trained, solver="exact", damping=float(mean)).scores(xt, yt)
    assert np.linalg.norm(scalar - want) / np.linalg.norm(want) > 2 * err


@pytest.mark.slow
def test_the_store_at_full_dimension_reaches_the_dense_h_plus_d_answer(trained, tmp_path):
    """The store projects ``D`` as it projects the curvature, ``C + c·R diag(D) Rᵀ``: at ``D = P`` (an orthogonal
    projection) its scores and self-influence are exact's ``(G + c·D)⁻¹`` ones (store_curvature dense: the whole
    matrix; the blocks are checked without D in tests/test_store.py)."""
    _, _, _, _, xt, yt = trained
    exact = _inf(trained, solver="exact", damping="optimizer:0.5")
    store = _inf(trained, solver="store", damping="optimizer:0.5", store_dim=100_000, fisher="true",
                 store_curvature="dense", cache=tmp_path / "cache")
    want, got = exact.scores(xt, yt), store.scores(xt, yt)
    assert store.solver.projection.dim == store.clf.num_params
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2e-3      # float16 rows: 3 significant digits
    mine, theirs = store.self_influence(), exact.self_influence()
    np.testing.assert_allclose(mine.values, theirs.values, rtol=1e-6, atol=1e-9 * np.abs(theirs.values).max())


def test_the_projected_diagonal_is_r_diag_d_r_transposed():
    """:meth:`Projection.projected_diagonal` against the dense ``R diag(d) Rᵀ`` of the whole projection, the
    projection's matrix built column by column from :meth:`Projection.project`."""
    from influence.curvature.kfac.plan import DiagBlock, KronBlock
    from influence.store.projection import Projection

    rng = np.random.default_rng(0)
    shapes = [(5, 3), (3,), (4,)]               # a dense layer's kernel and bias, then a diagonal variable
    kron = KronBlock("dense", None, kernel_pos=0, bias_pos=1, k_in=5, c_out=3, kernel_shape=(5, 3), a_bounds=[],
                     s_bounds=[], reg_rows=np.zeros(6))
    diag = DiagBlock("scale", None, positions=[2], shapes=[(4,)], reg=np.zeros(4))
    proj = Projection([kron, diag], [(4, 2), (3,)], seed=1)
    sizes = [int(np.prod(s)) for s in shapes]

    def unflat(flat):
        return [part.reshape(s) for part, s in zip(np.split(flat, np.cumsum(sizes)[:-1]), shapes)]

    r = np.stack([proj.project(unflat(e)) for e in np.eye(sum(sizes))], axis=1)       # (D, P)
    d = rng.uniform(0.1, 2.0, sum(sizes))
    np.testing.assert_allclose(proj.projected_diagonal(unflat(d)), (r * d) @ r.T, atol=1e-12)


def test_ekfac_takes_the_optimizer_damping_under_auto_where_krylov_would_be_too_thin(trained):
    """A budget that holds fewer than 64 krylov pairs: solver auto -> store, and its damping auto -> optimizer
    (the model holds its Adam state), as ekfac's there; with a budget where krylov fits, ekfac asked keeps 0.1x."""
    thin = _inf(trained, memory_budget=0.0003)
    assert thin.solver_name == "store" and str(thin.settings.damping).startswith("optimizer:")
    assert "damping auto: optimizer:" in thin.solver_choice and "(per parameter, from the Adam state" in thin.solver_choice
    assert str(_inf(trained, solver="ekfac", memory_budget=0.0003).settings.damping) == "optimizer"
    assert str(_inf(trained, solver="ekfac").settings.damping) == "0.1x"
