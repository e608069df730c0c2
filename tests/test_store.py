"""The gradient store (``--solver store``, influence/store/): its scores against the exact Gauss–Newton
solver's at D = P, its size on disk, resuming an interrupted write, and a new test set scored from the store
with no pass over the training archive."""
import numpy as np
import pytest

import influence
from engine_helpers import layer_blocks, layer_edges, per_example_gradients, write_project
from influence.data.archive_reader import TestArchive, TrainArchive
from influence.errors import SettingError
from influence.store import shards
from influence.store.shards import GradientStore
from influence.store.solver import StoreSolver

DAMPING = 0.05
N_TRAIN = 160


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_project(tmp_path_factory.mktemp("store"), N_TRAIN, 40, {"a": 4, "b": 3}, batchnorm=True)


def make(data, cache, solver="store", **options):
    options = {"damping": DAMPING, **options}
    return influence.Influence(str(data / "model.keras"), train=data / "train.npz", solver=solver, hessian="ggn",
                               preprocess="unit", progress=False, cache=cache, **options)


@pytest.mark.slow
def test_at_full_dimension_the_scores_are_the_exact_gauss_newton_solvers(data, tmp_path):
    """store_curvature dense: the whole projected matrix, at D = P the exact Gauss–Newton solver's."""
    x, y, _ = TestArchive(data / "test.npz").read("a")
    exact = make(data, None, "exact")
    want, layers = exact.scores(x, y, per_layer=True)
    store = make(data, tmp_path / "cache", store_dim=100_000, fisher="true", store_curvature="dense")
    got, got_layers = store.scores(x, y, per_layer=True)
    assert got_layers == layers == ["conv", "bn", "dense"] and got.shape == want.shape
    p = store.clf.num_params
    assert store.solver.projection.dim == p                    # D = P: an orthogonal projection
    # the rows are float16 (each scaled by its largest value): about 3 significant digits
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err < 2e-3, err
    for layer in range(len(layers)):
        e = np.linalg.norm(got[..., layer] - want[..., layer]) / np.linalg.norm(want[..., layer])
        assert e < 5e-3, (layers[layer], e)
    # positive = useful, as every solver (the sign of docs/DESIGN.md): the largest scores agree
    assert np.array_equal(np.argmax(got.sum(-1), axis=1), np.argmax(want.sum(-1), axis=1))
    # self-influence from the projected gradients (float64): the exact solver's
    mine, theirs = store.self_influence(), exact.self_influence()
    np.testing.assert_allclose(mine.values, theirs.values, rtol=1e-6, atol=1e-9 * np.abs(theirs.values).max())
    # on disk: N x D x 2 bytes + 1 % (the rows' float32 scales and meta.json)
    folder = store.solver.info["store"]
    size = sum(f.stat().st_size for f in __import__("pathlib").Path(folder).iterdir())
    assert N_TRAIN * p * 2 < size <= 1.01 * N_TRAIN * p * 2, size


@pytest.mark.slow
def test_at_full_dimension_the_blocks_are_the_gauss_newton_matrixs_per_layer_blocks(data, tmp_path):
    """store_curvature blocks (the default) at D = P: ``(G_blocks + λI)⁻¹`` with every cross-layer block of the
    Gauss–Newton matrix left out, from the same cached C as dense (no second store pass), and not dense's answer."""
    x, y, _ = TestArchive(data / "test.npz").read("a")
    exact = make(data, None, "exact")
    exact.fit()
    clf, d = exact.clf, exact.derivs
    inv = np.linalg.inv(layer_blocks(exact.solver.state()["hessian"], clf) + DAMPING * np.eye(clf.num_params))
    g_test = per_example_gradients(d, x, y)
    g_train = per_example_gradients(d, *TrainArchive(data / "train.npz").take(np.arange(N_TRAIN)))
    want = g_test @ inv @ g_train.T
    cache = tmp_path / "cache"
    dense = make(data, cache, store_dim=100_000, fisher="true", store_curvature="dense").scores(x, y)
    store = make(data, cache, store_dim=100_000, fisher="true")
    assert store.solver.structure == "blocks"
    got = store.scores(x, y)
    assert store.loaded                                 # the structure is applied after the cache
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err < 2e-3, err                              # the rows are float16
    assert np.linalg.norm(dense - want) / np.linalg.norm(want) > 20 * err


def test_a_new_test_set_is_scored_from_the_store_without_a_training_pass(data, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    xa, ya, _ = TestArchive(data / "test.npz").read("a")
    xb, yb, _ = TestArchive(data / "test.npz").read("b")
    first = make(data, cache, store_dim=40)
    first.scores(xa, ya)
    want = first.scores(xb, yb, per_layer=True)[0]
    assert not first.loaded

    def no_pass(*args, **kwargs):
        raise AssertionError("the training archive was read")

    monkeypatch.setattr(TrainArchive, "take", no_pass)
    monkeypatch.setattr(TrainArchive, "read_batch", no_pass)
    monkeypatch.setattr(StoreSolver, "fit", no_pass)
    second = make(data, cache, store_dim=40)                    # a new run: model and archive opened anew
    got = second.scores(xb, yb, per_layer=True)[0]
    assert second.loaded
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("damping", ["0.1x", DAMPING])
def test_a_rerun_decomposes_nothing_at_the_damping_it_was_fitted_at(data, tmp_path, monkeypatch, damping):
    """The fit forms what its damping needs and the cache keeps it: a relative damping the damped inverse (no
    eigendecomposition of C at all), a number the eigendecomposition; a rerun with the same damping (a new test
    folder) forms neither and gives the same scores, one with another damping forms only what that one needs."""
    from influence.store import damping as store_damping

    cache = tmp_path / "cache"
    x, y, _ = TestArchive(data / "test.npz").read("a")
    formed = []
    inverse, decomposition = store_damping.damped_inverse, StoreSolver._decomposition

    def counted(self):
        if self._evals is None:
            formed.append("eigh")
        return decomposition(self)

    monkeypatch.setattr(store_damping, "damped_inverse", lambda *a: formed.append("inverse") or inverse(*a))
    monkeypatch.setattr(StoreSolver, "_decomposition", counted)
    first = make(data, cache, store_dim=40, damping=damping)
    want = first.scores(x, y)
    relative = isinstance(damping, str)
    assert formed == (["inverse"] if relative else ["eigh"])
    formed.clear()
    again = make(data, cache, store_dim=40, damping=damping)
    np.testing.assert_array_equal(again.scores(x, y), want)
    assert again.loaded and formed == []
    other = make(data, cache, store_dim=40, damping=DAMPING if relative else "0.1x")
    other.scores(x, y)
    assert other.loaded and formed == (["eigh"] if relative else ["inverse"])


@pytest.mark.slow
@pytest.mark.parametrize("projection", ["kfac", "random"])
def test_an_interrupted_write_resumes_from_its_last_shard(data, tmp_path, monkeypatch, projection):
    """The resumed pass reads only the shards not written (the K-FAC projection first runs K-FAC's pass again:
    the same sums give the same eigenvectors, so the same store folder)."""
    monkeypatch.setattr(shards, "shard_rows", lambda n, dim: 48)   # 4 shards of 48, 48, 48, 16 images
    whole = make(data, tmp_path / "whole", store_dim=10, store_projection=projection)
    whole.fit()
    store = whole.solver.store()
    assert store.shards == 4 and store.rows == 48

    real_write = GradientStore.write_shard

    def write_then_fail(self, k, rows):
        if k == 2:
            raise KeyboardInterrupt
        real_write(self, k, rows)

    monkeypatch.setattr(GradientStore, "write_shard", write_then_fail)
    broken = make(data, tmp_path / "broken", store_dim=10, store_projection=projection)
    with pytest.raises(KeyboardInterrupt):
        broken.fit()
    folder = broken.solver.store().folder
    assert sorted(p.name for p in folder.glob("rows-*")) == ["rows-00000.f16", "rows-00001.f16"]
    assert (folder / "partial.npz").is_file()
    assert not list(folder.glob(".*tmp*"))                      # nothing half-written under any name

    monkeypatch.setattr(GradientStore, "write_shard", real_write)
    read = []
    real_take = TrainArchive.take

    def counting_take(self, indices):
        read.extend(int(i) for i in indices)
        return real_take(self, indices)

    monkeypatch.setattr(TrainArchive, "take", counting_take)
    resumed = make(data, tmp_path / "broken", store_dim=10, store_projection=projection)
    resumed.fit()
    again = list(range(N_TRAIN)) if projection == "kfac" else []   # K-FAC's pass reads every image once
    assert sorted(read) == sorted(again + list(range(96, N_TRAIN)))   # the store: only the shards not written
    assert resumed.solver.store().folder == folder
    assert not (folder / "partial.npz").exists()
    np.testing.assert_allclose(resumed.solver.state()["curvature"], whole.solver.state()["curvature"],
                               rtol=1e-12, atol=1e-15)
    for k in range(4):
        for a, b in zip(resumed.solver.store().shard(k), store.shard(k)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_store_dim_is_checked(data):
    with pytest.raises(SettingError, match=r"^store_dim: must be a positive integer or auto, got 0$"):
        make(data, None, store_dim=0)
    with pytest.raises(SettingError, match=r"^store_dim: 200 needs 0.000894 GB for its dense 200x200 curvature, "
                                           r"above memory_budget 0.0001 GB"):
        make(data, None, store_dim=200, memory_budget=0.0001)
    with pytest.raises(SettingError, match=r"^fisher: solver store takes auto, true, top:K or empirical"):
        make(data, None, fisher="sampled")


def test_the_dimensions_are_shared_equally_and_a_small_side_is_kept_whole():
    from influence.store.projection import equal_shares, kron_sides

    # mlp-brief's three Dense layers (193 x 120, 121 x 120, 121 x 10) at D = 1024
    assert equal_shares([23160, 14520, 1210], 1024) == [342, 341, 341]
    assert kron_sides(121, 10, 341) == (34, 10)                   # the 10 outputs whole
    assert kron_sides(193, 120, 342) == (19, 18)                  # 18 of the 120 outputs, 19 of the 193 inputs
    # a layer smaller than its share is whole, and leaves the rest to the others
    assert equal_shares([16, 216, 5770], 1024) == [16, 216, 792]
    # D >= P: every layer whole, both sides
    sizes = [27 * 8, 16, 577 * 10]
    assert equal_shares(sizes, sum(sizes)) == sizes
    assert kron_sides(577, 10, 5770) == (577, 10) and kron_sides(3, 7, 21) == (3, 7)


@pytest.mark.slow
def test_a_relative_damping_is_per_layer(data, tmp_path):
    """``1x``: each layer damped by its own mean Gauss–Newton eigenvalue, as EK-FAC is; at D = P the scores
    are ``g_tᵀ (G_blocks + Λ)⁻¹ g_i`` with ``Λ = trace(G_ll)/P_l`` on layer ``l`` (G's per-layer blocks: the
    default store_curvature)."""
    x, y, _ = TestArchive(data / "test.npz").read("a")
    store = make(data, tmp_path / "cache", store_dim=100_000, fisher="true")
    exact = make(data, None, "exact")
    exact.fit()
    g = exact.solver.state()["hessian"]                          # the dense Gauss–Newton matrix (hessian ggn)
    store.solver.damping = "1x"
    got = store.scores(x, y)
    edges = layer_edges(store.clf)
    lam = np.concatenate([np.full(e - s, np.trace(g[s:e, s:e]) / (e - s)) for s, e in zip(edges, edges[1:])])
    assert len(set(np.round(lam, 12))) == 3                      # three layers, three dampings
    train = TrainArchive(data / "train.npz")
    xt, yt = train.take(np.arange(len(train)))
    d = store.derivs
    g_train = per_example_gradients(d, xt, yt.astype(np.int64))
    g_test = per_example_gradients(d, x, y.astype(np.int64))
    want = g_test @ np.linalg.solve(layer_blocks(g, store.clf) + np.diag(lam), g_train.T)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2e-3
    recorded = store.solver.info["damping_per_layer"]               # {layer: λ}, as EK-FAC records its own
    assert list(recorded) == [b.name for b in store.solver.plan]
    np.testing.assert_allclose(list(recorded.values()), lam[edges[:-1]], rtol=1e-5)


@pytest.mark.slow
def test_a_new_store_removes_the_whole_stores_of_other_settings_but_not_a_partial_or_held_one(data, tmp_path, caplog):
    import gc
    import logging

    cache = tmp_path / "cache"
    first = make(data, cache, store_dim=10)
    first.fit()
    old = first.solver.store().folder
    old_bytes = shards.folder_bytes(old)
    del first
    gc.collect()                                               # its in-use lock goes with it
    partial = GradientStore(cache, "p" * 24, 100, 4, rows=50)  # an interrupted pass of other settings: resumable
    partial.open_for_writing()
    partial.write_shard(0, np.ones((50, 4)))
    partial.save_checkpoint(np.zeros((4, 4)), 1)
    held = GradientStore(cache, "h" * 24, 10, 4)               # whole, but a live process reads it
    held.open_for_writing()
    held.write_shard(0, np.ones((10, 4)))
    lock = held.hold()
    assert shards.whole_store(held.folder) and not shards.whole_store(partial.folder)

    second = make(data, cache, store_dim=12)                   # new settings: a new key, a new store
    with caplog.at_level(logging.INFO, logger="influence.store.shards"):
        second.fit()
    assert not old.exists()
    assert partial.folder.is_dir() and held.folder.is_dir() and second.solver.store().complete()
    lines = [r.getMessage() for r in caplog.records if r.name == "influence.store.shards"]
    assert lines == [f"store: removed 1 old store folder(s) under {cache} ({old_bytes / 1e6:.1f} MB: {old.name}); "
                     f"kept 1 partial one(s) of other settings ({shards.folder_bytes(partial.folder) / 1e6:.1f} MB), "
                     f"resumable"], lines
    # the new store is loaded again and scores with no pass; once released, the held store goes at the next prune
    x, y, _ = TestArchive(data / "test.npz").read("a")
    assert make(data, cache, store_dim=12).scores(x, y).shape == (len(y), N_TRAIN)
    lock.close()
    size = shards.folder_bytes(held.folder)
    assert shards.prune_stores(cache, second.solver.store().digest) == ([held.folder.name], size)
    assert partial.folder.is_dir() and second.solver.store().complete()


def test_top_eigen_rows_are_a_block_diagonal_factors_leading_eigenvectors():
    """:func:`projection.top_eigen_rows` against numpy's eigendecomposition of the dense block-diagonal factor:
    orthonormal rows spanning its top eigenvectors, the projected factor diagonal with its largest eigenvalues."""
    from influence.store.projection import top_eigen_rows

    rng = np.random.default_rng(0)
    blocks = []
    for size in (4, 3):
        m = rng.standard_normal((size, size))
        blocks.append(m @ m.T + 0.1 * np.eye(size))
    dense = np.zeros((7, 7))
    dense[:4, :4], dense[4:, 4:] = blocks
    values, vectors = zip(*(np.linalg.eigh(b) for b in blocks))
    rows = top_eigen_rows(vectors, values, [(0, 4), (4, 7)], 3)
    np.testing.assert_allclose(rows @ rows.T, np.eye(3), atol=1e-12)
    want = np.sort(np.linalg.eigvalsh(dense))[::-1][:3]
    np.testing.assert_allclose(np.diag(rows @ dense @ rows.T), want, rtol=1e-10)
    np.testing.assert_allclose(rows @ dense @ rows.T, np.diag(want), atol=1e-10)
    assert all((row[:4] == 0).all() or (row[4:] == 0).all() for row in rows)     # each inside its own block


@pytest.mark.slow
def test_the_kfac_projection_keeps_each_layers_top_eigen_directions_and_a_rerun_loads_it(data, tmp_path, monkeypatch):
    """store_projection kfac (the default): a Kronecker layer's R_in / R_out are the top eigenvectors of its K-FAC
    factors A / S (fitted here with solver kfac); the cached state brings them back without K-FAC's pass, and the
    random projection is another store."""
    from influence.curvature.kfac.plan import KronBlock
    from influence.store import projection as projection_module

    kfac = make(data, None, "kfac")
    kfac.solver.fit()
    factors = kfac.solver.kronecker_factors()
    store = make(data, tmp_path / "cache", store_dim=40)
    store.fit()
    sol = store.solver
    assert sol.info["projection"] == "kfac"
    checked = 0
    for b, mats in zip(sol.projection.plan, sol.projection.mats):
        if not isinstance(b, KronBlock):
            continue
        for r, factor in zip(mats, factors[b.name]):
            top = np.sort(np.linalg.eigvalsh(factor))[::-1][:r.shape[0]]
            np.testing.assert_allclose(np.trace(r @ factor @ r.T), top.sum(), rtol=1e-8)
            checked += 1
    assert checked >= 2
    x, y, _ = TestArchive(data / "test.npz").read("a")
    want = store.scores(x, y)

    def no_pass(*args, **kwargs):
        raise AssertionError("K-FAC's pass ran again")

    monkeypatch.setattr(projection_module, "kfac_projection", no_pass)
    monkeypatch.setattr("influence.store.solver.kfac_projection", no_pass)
    again = make(data, tmp_path / "cache", store_dim=40)
    np.testing.assert_array_equal(again.scores(x, y), want)
    assert again.solver.projection.fingerprint() == sol.projection.fingerprint()
    random = make(data, tmp_path / "cache", store_dim=40, store_projection="random")
    random.fit()
    assert random.solver.store().folder != sol.store().folder


def test_a_kfac_projection_whose_factors_do_not_fit_the_budget_is_refused_naming_the_setting(data):
    from influence.store.projection import kfac_projection

    inf = make(data, None, store_dim=10, memory_budget=2e-5)
    with pytest.raises(SettingError, match=r"^store_projection: kfac fits K-FAC's factors first, and they need .* "
                                           r"even in blocks of 256, over memory_budget 2e-05 GB \(largest layers: "
                                           r".*\); give a larger memory_budget, fewer layers with params or "
                                           r"store_projection random$"):
        kfac_projection(inf.solver.projection, inf.objective, "true", 2e-5)


def test_the_kfac_projection_splits_its_factors_into_smaller_blocks_until_they_fit_the_budget():
    """VGG16's largest Kronecker layers (fc1: A 25 089, S 4 096): in K-FAC's blocks of 4 096 the factors need about 3 GB,
    more than the default 2 GB, so the store's projection halves the blocks until they fit (the store keeps only the
    factors' top eigenvectors); with no budget, or room for them, the blocks stay 4 096; a budget no block fits gives
    None."""
    from influence.curvature.kfac.plan import MAX_BLOCK, KronBlock, fit_bytes, split_blocks
    from influence.settings import gb_to_bytes
    from influence.store.projection import MIN_PROJECTION_BLOCK, projection_block

    def kron(name, k, c):
        return KronBlock(name, None, kernel_pos=0, bias_pos=1, k_in=k, c_out=c, kernel_shape=(k, c),
                         a_bounds=[(0, k + 1)], s_bounds=[(0, c)], reg_rows=np.zeros(k + 1))

    plan = ([kron(f"conv{i}", 4608, 512) for i in range(5)] + [kron("fc1", 25088, 4096), kron("fc2", 4096, 4096),
            kron("predictions", 4096, 1000)])

    def need(block):
        split = [KronBlock(b.name, None, 0, 1, b.k_in, b.c_out, b.kernel_shape, split_blocks(b.k1, block),
                           split_blocks(b.c_out, block), b.reg_rows) for b in plan]
        return max(sum(b.bytes(False) for b in split), fit_bytes(split, {}, False, 4))

    assert need(MAX_BLOCK) > 1.4 * gb_to_bytes(2)
    block, first, needed = projection_block(plan, {}, 4, 2)
    assert block < MAX_BLOCK and first == need(MAX_BLOCK) and needed == need(block) <= gb_to_bytes(2)
    assert need(2 * block) > gb_to_bytes(2)                      # the largest that fits
    assert projection_block(plan, {}, 4, None)[0] == MAX_BLOCK
    assert projection_block(plan, {}, 4, 8)[0] == MAX_BLOCK
    assert projection_block(plan, {}, 4, 0.1) == (None, need(MAX_BLOCK), need(MIN_PROJECTION_BLOCK))


def test_a_float32_vector_is_projected_as_its_float64_copy(data):
    """:meth:`Projection.project` multiplies a Kronecker kernel by ``R_in`` in the kernel's own dtype before widening
    it (VGG16's fc1 in float64 took most of a test image's projection): a float32 vector projects to within float32
    rounding of its float64 copy, and a float64 vector exactly as the dense ``R_in V R_outᵀ``."""
    from influence.curvature.kfac.plan import KronBlock

    proj = make(data, None, store_dim=40).solver.projection
    rng = np.random.default_rng(0)
    vec64 = [rng.standard_normal(tuple(v.shape)) for v in make(data, None, "exact").clf.variables]
    vec32 = [v.astype(np.float32) for v in vec64]
    want = proj.project(vec64)
    np.testing.assert_allclose(proj.project(vec32), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    at = 0
    for b, mats, size in zip(proj.plan, proj.mats, proj.sizes):
        if isinstance(b, KronBlock):
            np.testing.assert_allclose(want[at:at + size], (mats[0] @ proj.full_layer(b, vec64) @ mats[1].T).ravel(),
                                       rtol=1e-12, atol=1e-12)
        at += size
