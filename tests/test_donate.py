"""``donate_state``: the state written in place where the library can, with the bits of a new one.

A donated step must give the same updates and state as a step that allocates a new state, write
into the state it was given on NumPy and torch (and nowhere else), and leave that state whole
when it raises before the step (a bad input, a non-finite gradient, a failed asynchronous root).
"""

import time

import numpy as np
import optree
import pytest
from hypothesis import given, settings, strategies as st

import shampoo_core as sc
from shampoo_core import _elementwise, _xp
from shampoo_core import roots as roots_module
from helpers import examples_for, to_np, to_xp

# A matrix in 2 x 2 blocks, a ragged matrix, a vector (full-matrix AdaGrad) and an order-3 block
# (its statistics through mode unfoldings): every path the statistics take.
SHAPES = {"w": (16, 12), "ragged": (20, 7), "v": (6,), "conv": (4, 3, 2, 2)}
HP = dict(block_size=8, start_preconditioning_step=2, preconditioning_compute_steps=3, graft_beta2=0.95)


def problem(xp, steps=6, seed=0):
    rng = np.random.default_rng(seed)
    params = {k: to_xp(xp, rng.standard_normal(s), "float32") for k, s in SHAPES.items()}
    grads = [{k: to_xp(xp, rng.standard_normal(s), "float32") for k, s in SHAPES.items()} for _ in range(steps)]
    return params, grads


def snapshot(state) -> list:
    return [to_np(x).copy() if not isinstance(x, (int, float)) else x for x in optree.tree_leaves(state)]


def assert_same_leaves(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("graft_type,beta2", [("adagrad", 0.99), ("adam", 0.999), ("rmsprop", 1.0), ("sgd", 0.9),
                                              ("none", 0.99)])
def test_donated_steps_have_the_bits_of_new_states(xp, graft_type, beta2):
    params, grads = problem(xp)
    runs = []
    for donate in (False, True):
        tx = sc.shampoo(1e-2, graft_type=graft_type, beta2=beta2, donate_state=donate, **HP)
        state, updates = tx.init(params), []
        for g in grads:  # root steps 2 and 5 among them
            u, state = tx.update(state, g, params)
            updates.append([to_np(x) for x in optree.tree_leaves(u)])
        runs.append((updates, snapshot(state)))
    for (u0, s0), (u1, s1) in [runs]:
        for a, b in zip(u0, u1):
            assert_same_leaves(a, b)
        assert_same_leaves(s0, s1)


SHAPE_LISTS = st.lists(st.integers(0, 4).flatmap(lambda rank: st.tuples(*[st.integers(1, 9)] * rank)),
                       min_size=1, max_size=3)
HYPERPARAMETERS = st.fixed_dictionaries({
    "block_size": st.integers(2, 6),
    "beta1": st.sampled_from([0.0, 0.3, 0.9]),
    "beta2": st.sampled_from([1.0, 0.4, 0.99]),
    "graft_type": st.sampled_from(["none", "sgd", "adagrad", "rmsprop", "adam", "sqrt_n"]),
    "graft_beta2": st.sampled_from([0.3, 0.99]),
    "graft_granularity": st.sampled_from(["layer", "block"]),
    "nesterov": st.booleans(),
    "weight_decay": st.sampled_from([0.0, 0.01]),
    "decoupled_weight_decay": st.booleans(),
    "merge_small_dims": st.booleans(),
    "statistics_compute_steps": st.integers(1, 2),
    "start_preconditioning_step": st.integers(1, 3),
    "preconditioning_compute_steps": st.integers(1, 3),
})


@pytest.mark.filterwarnings("ignore:root_dtype='float64' is not available")  # no_float64: roots in float32
def test_donation_keeps_the_bits_for_any_shapes_and_hyperparameters(xp):
    """Averages of β < 1/2 and > 1/2 (the two forms of the in-place average), β₂ = 1 (sums),
    leaves of order 0-4, every graft type and granularity, skipped statistics steps."""

    # Elsewhere than NumPy and torch the option changes nothing (no in-place kernels): a few examples.
    in_place = getattr(xp, "__name__", "") in ("array_api_compat.numpy", "array_api_compat.torch")

    @settings(max_examples=examples_for(xp, settings().max_examples) if in_place else 3)
    @given(shapes=SHAPE_LISTS, hp=HYPERPARAMETERS, steps=st.integers(1, 5), seed=st.integers(0, 2**16))
    def check(shapes, hp, steps, seed):
        rng = np.random.default_rng(seed)
        params = [to_xp(xp, rng.standard_normal(s), "float32") for s in shapes]
        grads = [[to_xp(xp, rng.standard_normal(s), "float32") for s in shapes] for _ in range(steps)]
        runs = []
        for donate in (False, True):
            tx = sc.shampoo(0.1, donate_state=donate, **hp)
            state, updates = tx.init(params), []
            for g in grads:
                u, state = tx.update(state, g, params)
                updates.append([to_np(x) for x in u])
            runs.append((updates, snapshot(state)))
        (u0, s0), (u1, s1) = runs
        for a, b in zip(u0, u1):
            assert_same_leaves(a, b)
        assert_same_leaves(s0, s1)

    check()


def _running_averages(state) -> list:
    """The arrays a donated step may write: first moments, grafting accumulators, statistics."""
    out = []
    for s in state.params:
        out += [x for x in (s.momentum, s.graft.accumulator) if x is not None]
        out += [h for b in s.blocks for h in b.statistics]
    return out


def test_donation_writes_into_the_given_state_where_the_library_can(xp):
    params, grads = problem(xp, steps=3)
    tx = sc.shampoo(1e-2, donate_state=True, **HP)
    state = tx.init(params)
    _, state = tx.update(state, grads[0], params)
    given = _running_averages(state)
    before = [to_np(x).copy() for x in given]
    _, new = tx.update(state, grads[1], params)
    written = [a is b for a, b in zip(given, _running_averages(new))]
    if _xp.namespace(given[0]).__name__ in ("array_api_compat.numpy", "array_api_compat.torch"):  # every one in place
        assert all(written)
        assert not any(np.array_equal(to_np(x), b) for x, b in zip(given, before))
    else:  # no in-place kernels (JAX, array_api_strict): new arrays, the given state untouched
        assert not any(written)
        assert_same_leaves([to_np(x) for x in given], before)


def test_a_new_state_is_the_default_and_leaves_the_given_one_untouched():
    params, grads = problem(np, steps=2)
    tx = sc.shampoo(1e-2, **HP)
    state = tx.init(params)
    _, state = tx.update(state, grads[0], params)
    before = snapshot(state)
    _, new = tx.update(state, grads[1], params)
    assert_same_leaves(snapshot(state), before)
    assert not any(a is b for a, b in zip(_running_averages(state), _running_averages(new)))


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_rejected_steps_leave_a_donated_state_whole(backend):
    xp = pytest.importorskip(backend)
    params, grads = problem(xp, steps=2)
    tx = sc.shampoo(1e-2, donate_state=True, **HP)
    state = tx.init(params)
    _, state = tx.update(state, grads[0], params)
    before = snapshot(state)
    bad = dict(grads[1], ragged=grads[1]["ragged"] * np.nan)
    with pytest.raises(ValueError, match=r"grads\['ragged'\] has non-finite"):
        tx.update(state, bad, params)
    assert_same_leaves(snapshot(state), before)
    wrong_shape = dict(grads[1], conv=grads[1]["w"])  # every other leaf checked and fine
    with pytest.raises(ValueError, match="conv"):
        tx.update(state, wrong_shape, params)
    assert_same_leaves(snapshot(state), before)
    skip = sc.shampoo(1e-2, donate_state=True, nonfinite="skip", **HP)
    _, skipped = skip.update(state, bad, params)
    assert int(skipped.skipped) == 1
    assert_same_leaves(snapshot(skipped._replace(skipped=state.skipped)), before)


ASYNC = dict(beta1=0.9, beta2=0.99, block_size=8, start_preconditioning_step=1, preconditioning_compute_steps=2)


@pytest.mark.parametrize("host", [False, True])
def test_asynchronous_roots_read_a_copy_of_donated_statistics(host, monkeypatch):
    """The worker computes the roots of the statistics of its step, not of the later values that
    donated steps write into the same arrays: the same updates as a run with new states."""
    real = roots_module.inverse_pth_root

    def slow(a, p, **kw):  # the next step writes the statistics before the worker reads them
        time.sleep(0.01)
        return real(a, p, **kw)

    monkeypatch.setattr(roots_module, "inverse_pth_root", slow)
    params, grads = problem(np, steps=9)
    runs = []
    for donate in (False, True):
        with sc.AsyncPreconditioners(max_staleness=2, deterministic=True, host=host) as ex:
            tx = sc.shampoo(1e-2, async_preconditioners=ex, donate_state=donate, **ASYNC)
            state, updates = tx.init(params), []
            for g in grads:
                u, state = tx.update(state, g, params)
                updates.append([to_np(x) for x in optree.tree_leaves(u)])
            runs.append(updates)
    for a, b in zip(*runs):
        assert_same_leaves(a, b)


def test_a_failed_asynchronous_root_raises_before_a_donated_state_is_written(monkeypatch):
    params, grads = problem(np, steps=2)
    real = roots_module.inverse_pth_root

    def broken_for_ragged(a, p, **kw):  # "ragged" (7 columns) fails after "conv" is collected
        if a.shape[-1] == 7:
            raise MemoryError("worker ran out")
        return real(a, p, **kw)

    monkeypatch.setattr(roots_module, "inverse_pth_root", broken_for_ragged)
    with sc.AsyncPreconditioners(max_staleness=1, deterministic=True) as ex:
        tx = sc.shampoo(1e-2, async_preconditioners=ex, donate_state=True, **ASYNC)
        state = tx.init(params)
        _, state = tx.update(state, grads[0], params)
        before = snapshot(state)
        with pytest.raises(RuntimeError, match="submitted at step 1"):
            tx.update(state, grads[1], params)
        assert_same_leaves(snapshot(state), before)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_in_place_kernels_decline_what_they_cannot_write(backend):
    """A read-only or broadcast array, or one autograd records, gets a new array with the same
    value: donation never writes where the library would refuse or where another view reads."""
    lib = pytest.importorskip(backend)
    rng = np.random.default_rng(1)
    old, new = rng.standard_normal((2, 5, 5)).astype(np.float32)
    cases = []
    if backend == "numpy":
        read_only = old.copy()
        read_only.flags.writeable = False
        cases += [read_only, np.broadcast_to(old[:1], old.shape)]
        as_lib = np.asarray
    else:
        cases += [lib.from_numpy(old).requires_grad_(), lib.from_numpy(old[:1].copy()).expand(old.shape)]
        as_lib = lib.from_numpy
    for target in cases:
        kept = to_np(target).copy()
        want = to_np(_elementwise.ema(as_lib(kept.copy()), as_lib(new), 0.9))
        if backend == "torch":
            with lib.no_grad():
                out = _elementwise.ema(target, as_lib(new), 0.9, donate=True)
        else:
            out = _elementwise.ema(target, as_lib(new), 0.9, donate=True)
        assert out is not target
        np.testing.assert_array_equal(to_np(out), want)
        np.testing.assert_array_equal(to_np(target), kept)


def test_torch_statistics_of_large_blocks_by_syrk_keep_the_bits_when_donated(monkeypatch):
    """torch's statistics of blocks large enough for BLAS's ``syrk`` (a 256×384 matrix in blocks of
    256: three of its four statistics) go to it, with a new state and donated alike, and the two
    runs have the same bits, root steps included."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("numba")
    from backends import load_syrk_cpu

    kernels = load_syrk_cpu()
    calls = []
    real = kernels.gram_average
    monkeypatch.setattr(kernels, "gram_average", lambda c, a, *args, **kw: calls.append(a.shape) or real(c, a, *args, **kw))
    rng = np.random.default_rng(4)
    params = {"w": torch.from_numpy(rng.standard_normal((256, 384)).astype(np.float32))}
    grads = [{"w": torch.from_numpy(rng.standard_normal((256, 384)).astype(np.float32))} for _ in range(4)]
    runs = []
    for donate in (False, True):
        calls.clear()
        tx = sc.shampoo(1e-2, block_size=256, start_preconditioning_step=2, preconditioning_compute_steps=2,
                        donate_state=donate)
        state, updates = tx.init(params), []
        for g in grads:
            u, state = tx.update(state, g, params)
            updates.append(to_np(u["w"]).copy())
        assert sorted(calls) == sorted([(1, 256, 256), (1, 256, 256), (1, 128, 256)] * len(grads))
        runs.append((updates, snapshot(state)))
    for a, b in zip(runs[0][0], runs[1][0]):
        np.testing.assert_array_equal(a, b)
    assert_same_leaves(runs[0][1], runs[1][1])


def test_donate_state_is_checked_and_not_a_checkpointed_hyperparameter(tmp_path):
    with pytest.raises(TypeError, match="donate_state"):
        sc.shampoo(donate_state="yes")
    params, grads = problem(np, steps=1)
    tx = sc.shampoo(1e-2, **HP)
    state = tx.init(params)
    _, state = tx.update(state, grads[0], params)
    sc.save_state(tmp_path / "opt.npz", state, tx=tx)
    donating = sc.shampoo(1e-2, donate_state=True, **HP)
    loaded = sc.load_state(tmp_path / "opt.npz", like=params, tx=donating)  # the same run, in place
    assert_same_leaves(snapshot(loaded), snapshot(state))


FIRST_ORDER = {
    "adam": lambda donate: sc.adam(1e-2, beta2=0.99, weight_decay=0.01, donate_state=donate),
    "nadamw": lambda donate: sc.adam(1e-2, nesterov=True, weight_decay=0.01, decoupled_weight_decay=True,
                                     donate_state=donate),
    "adagrad": lambda donate: sc.adagrad(1e-2, initial_accumulator_value=0.1, donate_state=donate),
}


@pytest.mark.parametrize("name", sorted(FIRST_ORDER))
def test_first_order_donation_keeps_the_bits_and_writes_where_the_library_can(xp, name):
    params, grads = problem(xp, steps=4)
    runs = []
    for donate in (False, True):
        tx = FIRST_ORDER[name](donate)
        state, updates, written = tx.init(params), [], []
        for g in grads:
            given = optree.tree_leaves((state.momentum, state.graft))
            u, state = tx.update(state, g, params)
            written += [a is b for a, b in zip(given, optree.tree_leaves((state.momentum, state.graft)))]
            updates.append([to_np(x) for x in optree.tree_leaves(u)])
        runs.append((updates, snapshot(state), written))
    (u0, s0, w0), (u1, s1, w1) = runs
    for a, b in zip(u0, u1):
        assert_same_leaves(a, b)
    assert_same_leaves(s0, s1)
    assert not any(w0)  # a new state by default
    in_place = _xp.namespace(*optree.tree_leaves(params)).__name__ in ("array_api_compat.numpy", "array_api_compat.torch")
    assert w1 and all(w1) == in_place and any(w1) == in_place


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_first_order_rejected_steps_leave_a_donated_state_whole(backend):
    xp = pytest.importorskip(backend)
    params, grads = problem(xp, steps=2)
    tx = sc.adam(1e-2, donate_state=True)
    _, state = tx.update(tx.init(params), grads[0], params)
    before = snapshot(state)
    with pytest.raises(ValueError, match=r"\['w'\]"):  # the last leaf in the state's order
        tx.update(state, dict(grads[1], w=grads[1]["ragged"]), params)
    assert_same_leaves(snapshot(state), before)
    with pytest.raises(TypeError, match="donate_state"):
        sc.adagrad(donate_state=1)
