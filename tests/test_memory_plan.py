"""The memory plan of a curvature fit against the bytes the fit really holds (issue: VGG16 with fisher
top:10 was killed for memory because the chunk was planned for one backward signal per image).

The "held" bytes are counted from the arrays the fit's own code makes on a chunk of a tiny model: the
records of :meth:`LayerSignals.signals` (each layer's input and its backward signals) and, for the largest
Kronecker layer, the patches and signals of :func:`kron_inputs` with their rotations into the eigenbasis
(EK-FAC's second pass). A plan that forgets the rows of ``top:K`` / ``true`` fails here.
"""
from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf

from engine_helpers import random_data, setup
from influence.curvature import make_solver
from influence.curvature.kfac.plan import KronBlock
from influence.curvature.kfac.signals import kron_inputs, signal_rows
from influence.errors import SettingError
from influence.memory import Budget, fit_image_bytes, layer_shapes, plan_memory

N = 6


def nbytes(t):
    return int(np.prod(t.shape)) * t.dtype.size


def held_per_image(solver, x, y):
    """Bytes per image of one fitting chunk, counted from the arrays the fit makes (model dtype)."""
    u = np.random.default_rng(0).random(len(x))
    grouped = solver.signals.signals(tf.constant(x), tf.constant(y), tf.constant(u))
    records = 0
    for recs in grouped.values():
        for kind, x_l, delta in recs:
            inputs = [a for a in x_l[0] if tf.is_tensor(a)] if kind is None else [x_l]
            records += sum(nbytes(a) for a in inputs) + nbytes(delta)
    dtype = solver.passes.compute_dtype
    layer = 0
    for b in solver.plan:
        if isinstance(b, KronBlock):
            a, dl, _ = kron_inputs(b, grouped[id(b.layer)], dtype)
            layer = max(layer, 2 * (nbytes(a) + nbytes(dl)))      # the patches, the signals, both rotated
    return (records + layer) / len(x)


@pytest.fixture(scope="module")
def fits(tmp_path_factory):
    """{fisher: (R, held bytes per image, planned bytes per image)} on the tiny conv + BatchNorm + dense model."""
    clf, d, obj, _, _, _ = setup(tmp_path_factory.mktemp("plan"), n=N, batch=N, dtype="float32")
    x, y = random_data(N, seed=1)
    shapes = layer_shapes(clf)
    out = {}
    for fisher in ("sampled", "empirical", "top:3", "true"):
        solver = make_solver("ekfac", obj, 0.1, fisher=fisher, progress=False)
        rows = solver.signal_rows
        out[fisher] = (rows, held_per_image(solver, x, y), fit_image_bytes(shapes, clf.dtype.size, rows))
    return out


def test_rows_per_image_of_each_fisher():
    assert [signal_rows(f, 1000) for f in ("sampled", "empirical", "top:10", "top:3")] == [1, 1, 10, 3]
    assert signal_rows("true", 4) == 4 and signal_rows("top:10", 4) == 4     # never more rows than classes


@pytest.mark.parametrize("fisher", ["sampled", "empirical", "top:3", "true"])
def test_plan_covers_what_the_fit_holds_per_image(fits, fisher):
    rows, held, planned = fits[fisher]
    assert rows == {"sampled": 1, "empirical": 1, "top:3": 3, "true": 4}[fisher]
    assert planned >= held, f"{fisher}: the plan counts {planned} B per image, the fit holds {held:.0f}"
    assert planned <= 3 * held, f"{fisher}: the plan counts {planned} B per image for {held:.0f} held"


@pytest.mark.parametrize("fisher", ["top:3", "true"])
def test_plan_grows_with_the_rows_at_least_as_the_fit_does(fits, fisher):
    """Each extra class of top:K / true costs what the fit really holds more: a plan that forgot the
    factor (the old one) has no growth at all and fails."""
    rows, held, planned = fits[fisher]
    _, held_1, planned_1 = fits["sampled"]
    assert rows > 1
    assert planned - planned_1 >= held - held_1 > 0


def test_the_fit_chunk_shrinks_with_the_rows_and_a_fit_with_no_room_is_refused(tmp_path):
    clf, _, obj, _, _, _ = setup(tmp_path, n=N, batch=N, dtype="float32")
    per_image = {r: fit_image_bytes(layer_shapes(clf), 4, r) for r in (1, 10)}
    held = 10_000
    budget = Budget(memory_budget=(held + 20 * per_image[1]) / 2**30, score_batch=256)

    def chunk(rows):
        solver = SimpleNamespace(name="ekfac", fisher=f"top:{rows}", fit_bytes=held, signal_rows=rows,
                                 copies_per_vector=2)
        return plan_memory(clf, budget, 1, solver, fitting=True).chunk

    assert chunk(1) == 20
    assert 1 <= chunk(10) == 20 * per_image[1] // per_image[10] < chunk(1)
    tight = Budget(memory_budget=(held + per_image[10] - 1) / 2**30, score_batch=256)
    solver = SimpleNamespace(name="ekfac", fisher="top:10", fit_bytes=held, signal_rows=10, copies_per_vector=2)
    with pytest.raises(SettingError) as err:
        plan_memory(clf, tight, 1, solver, fitting=True)
    assert err.value.setting == "memory_budget"
    msg = str(err.value)
    assert "\n" not in msg and "fisher top:10 (10 backward signals per image)" in msg
    assert "top:3, or sampled" in msg and "params" in msg
    # the same budget holds one image of the one-signal Fisher
    solver.signal_rows, solver.fisher = 1, "sampled"
    assert plan_memory(clf, tight, 1, solver, fitting=True).chunk >= 1


def test_pcg_plans_its_ekfac_fit(tmp_path):
    """pcg fits EK-FAC: its fit's chunk is planned with the preconditioner's fit and rows."""
    _, _, obj, _, _, _ = setup(tmp_path, n=N, batch=N, dtype="float32")
    pcg = make_solver("pcg", obj, 0.1, fisher="true", progress=False)
    assert pcg.fit_bytes == pcg.ekfac.fit_bytes > 0
    assert pcg.signal_rows == pcg.ekfac.signal_rows == 4
