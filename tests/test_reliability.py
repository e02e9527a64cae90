"""Non-finite gradients, devices, extreme statistics, and a property test over random shapes."""

import types

import numpy as np
import optree
import pytest
from hypothesis import given, settings, strategies as st

import shampoo_core as sc
from helpers import examples_for, to_np, to_xp


def state_leaves(state):
    return [to_np(x).copy() for x in optree.tree_leaves(state)]


def test_nonfinite_raise_names_leaf_and_keeps_state(xp):
    tx = sc.shampoo(0.1, nonfinite="raise")
    params = {"w": to_xp(xp, np.ones((3, 3))), "b": to_xp(xp, np.ones(3))}
    state = tx.init(params)
    before = state_leaves(state)
    bad = {"w": to_xp(xp, np.ones((3, 3))), "b": to_xp(xp, np.array([1.0, np.nan, 0.0]))}
    with pytest.raises(ValueError, match=r"grads\['b'\] has non-finite values"):
        tx.update(state, bad, params)
    for a, b in zip(before, state_leaves(state)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_nonfinite_skip_leaves_state_unchanged(xp, bad_value):
    rng = np.random.default_rng(0)
    tx = sc.shampoo(0.1, block_size=4, nonfinite="skip", start_preconditioning_step=1, preconditioning_compute_steps=1)
    params = to_xp(xp, {"w": rng.standard_normal((6, 5)), "b": rng.standard_normal(5)})
    state = tx.init(params)
    for _ in range(2):
        _, state = tx.update(state, to_xp(xp, {"w": rng.standard_normal((6, 5)), "b": rng.standard_normal(5)}), params)
    bad = {"w": rng.standard_normal((6, 5)), "b": rng.standard_normal(5)}
    bad["w"][2, 3] = bad_value
    updates, new_state = tx.update(state, to_xp(xp, bad), params)
    for u in to_np(updates).values():
        np.testing.assert_array_equal(u, np.zeros_like(u))
    assert int(new_state.skipped) == int(state.skipped) + 1
    assert int(new_state.count) == int(state.count) == 2
    old = state_leaves(state._replace(skipped=None))
    new = state_leaves(new_state._replace(skipped=None))
    for a, b in zip(old, new):
        np.testing.assert_array_equal(a, b)
    # A finite step afterwards proceeds exactly as if the bad step had never happened.
    good = to_xp(xp, {"w": rng.standard_normal((6, 5)), "b": rng.standard_normal(5)})
    u1, _ = tx.update(new_state, good, params)
    u2, _ = tx.update(state, good, params)
    for k in ("w", "b"):
        np.testing.assert_array_equal(to_np(u1[k]), to_np(u2[k]))


@pytest.mark.parametrize("make", [
    lambda: sc.shampoo(0.1), lambda: sc.adam(0.1), lambda: sc.sgd(0.1, momentum=0.9),
    lambda: sc.eva(0.1), lambda: sc.eva_s(0.1), lambda: sc.kfac(0.1),
], ids=["shampoo", "adam", "sgd", "eva", "eva_s", "kfac"])
def test_device_mismatch_is_reported(make):
    strict = pytest.importorskip("array_api_strict")
    tx = make()
    params = strict.asarray(np.ones((3, 3)))
    state = tx.init(params)
    other = strict.asarray(np.ones((3, 3)), device=strict.Device("device1"))
    with pytest.raises(ValueError, match=r"grads is on device .*device1.*the optimizer state is on"):
        tx.update(state, other, params)
    with pytest.raises(ValueError, match=r"params is on device .*device1.*the optimizer state is on"):
        tx.update(state, params, other)


def test_full_matrix_device_mismatch_is_reported():
    strict = pytest.importorskip("array_api_strict")
    tx = sc.full_matrix_adagrad(0.1)
    state = tx.init(strict.asarray(np.ones(3)))
    with pytest.raises(ValueError, match=r"grads is on device .*device1.*the optimizer state is on"):
        tx.update(state, strict.asarray(np.ones(3), device=strict.Device("device1")))


def test_state_follows_parameter_device():
    strict = pytest.importorskip("array_api_strict")
    dev = strict.Device("device1")
    params = {"w": strict.asarray(np.ones((5, 3)), device=dev), "b": strict.asarray(np.ones(3), device=dev)}
    tx = sc.shampoo(0.1, start_preconditioning_step=1, preconditioning_compute_steps=1, block_size=4)
    state = tx.init(params)
    updates, state = tx.update(state, params, params)
    for leaf in optree.tree_leaves(state) + optree.tree_leaves(updates):
        assert leaf.device == dev


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("method", ["eigh", "newton"])
@pytest.mark.parametrize("kind", ["ill_conditioned", "rank_deficient", "zero"])
def test_hard_statistics_give_finite_updates(xp, dtype, method, kind):
    rng = np.random.default_rng(1)
    n = 16
    if kind == "ill_conditioned":
        # Row scales spanning 1e6 give L with κ ≈ 1e12.
        grads = [np.diag(np.logspace(0, -6, n)) @ rng.standard_normal((n, n)) for _ in range(3)]
    elif kind == "rank_deficient":
        grads = [np.outer(rng.standard_normal(n), rng.standard_normal(n)) for _ in range(2)]
    else:
        grads = [np.zeros((n, n)) for _ in range(3)]
    tx = sc.shampoo(0.1, root_method=method, epsilon=1e-12, start_preconditioning_step=1,
                    preconditioning_compute_steps=1, block_size=n, merge_small_dims=False)
    params = to_xp(xp, np.zeros((n, n), dtype=dtype))
    state = tx.init(params)
    for g in grads:
        u, state = tx.update(state, to_xp(xp, g.astype(dtype)), params)
        assert np.all(np.isfinite(to_np(u)))
    for b in state.params[0].blocks:
        for x in b.preconditioners:
            assert np.all(np.isfinite(to_np(x)))


shapes = st.lists(st.sampled_from([1, 2, 3, 5, 9]), min_size=0, max_size=5).map(tuple)
hyper = st.fixed_dictionaries(
    dict(
        block_size=st.integers(1, 6),
        beta1=st.sampled_from([0.0, 0.5, 0.9]),
        beta2=st.sampled_from([0.5, 0.99, 1.0]),
        epsilon=st.sampled_from([1e-12, 1e-6, 1e-2]),
        relative_epsilon=st.booleans(),
        graft_type=st.sampled_from(["none", "sgd", "adagrad", "rmsprop", "adam", "sqrt_n"]),
        graft_granularity=st.sampled_from(["layer", "block"]),
        start_preconditioning_step=st.integers(1, 3),
        preconditioning_compute_steps=st.integers(1, 2),
        statistics_compute_steps=st.integers(1, 2),
        merge_small_dims=st.booleans(),
        skip_preconditioning_dim_size_gt=st.sampled_from([None, 4]),
        root_method=st.sampled_from(["eigh", "newton"]),
        nesterov=st.booleans(),
        weight_decay=st.sampled_from([0.0, 0.01]),
        decoupled_weight_decay=st.booleans(),
    )
)


def test_updates_finite_and_structure_kept(xp):
    @settings(max_examples=examples_for(xp, settings().max_examples))
    @given(shape_list=st.lists(shapes, min_size=1, max_size=3), hp=hyper, steps=st.integers(1, 4),
           seed=st.integers(0, 2**16), dtype=st.sampled_from(["float32", "float64"]))
    def check(shape_list, hp, steps, seed, dtype):
        if hp["graft_type"] in ("rmsprop", "adam") and hp["beta2"] == 1.0:
            hp = dict(hp, beta2=0.99)
        rng = np.random.default_rng(seed)
        tx = sc.shampoo(0.01, **hp)
        params = to_xp(xp, [rng.standard_normal(s).astype(dtype) for s in shape_list])
        state = tx.init(params)
        spec = optree.tree_structure(state)
        shapes_before = [tuple(x.shape) for x in optree.tree_leaves(state)]
        for _ in range(steps):
            scale = 10.0 ** rng.uniform(-8, 4)
            grads = to_xp(xp, [(rng.standard_normal(s) * scale).astype(dtype) for s in shape_list])
            updates, state = tx.update(state, grads, params)
            for u, p in zip(updates, params):
                assert u.dtype == p.dtype and tuple(u.shape) == tuple(p.shape)
                assert np.all(np.isfinite(to_np(u)))
            params = sc.apply_updates(params, updates)
        assert optree.tree_structure(state) == spec
        assert [tuple(x.shape) for x in optree.tree_leaves(state)] == shapes_before
        assert int(state.count) == steps

    check()


def test_no_float64_device_computes_roots_in_float32():
    strict = pytest.importorskip("array_api_strict")
    dev = strict.Device("no_float64")
    params = strict.asarray(np.ones((6, 4), dtype=np.float32), device=dev)
    tx = sc.shampoo(0.1, start_preconditioning_step=1, preconditioning_compute_steps=1, block_size=4,
                    root_dtype="float64")
    state = tx.init(params)
    g = strict.asarray(np.arange(24, dtype=np.float32).reshape(6, 4) / 10, device=dev)
    from shampoo_core.shampoo import _WARNED_NO_FLOAT64

    _WARNED_NO_FLOAT64.clear()
    with pytest.warns(UserWarning, match="root_dtype='float64' is not available on device .*no_float64.* of array_api_strict "):
        updates, state = tx.update(state, g, params)
    assert updates.dtype == strict.float32 and updates.device == dev
    assert np.all(np.isfinite(to_np(updates)))
    assert to_np(state.params[0].blocks[0].failures).tolist() == [0]


def test_no_float64_warning_under_tracing_names_the_default_device(monkeypatch):
    # Under jax.jit a traced array has no readable device; the warning says which one is meant.
    from shampoo_core import _xp
    from shampoo_core.shampoo import _WARNED_NO_FLOAT64, _root_dtype

    monkeypatch.setattr(_xp, "device_of", lambda x: None)
    monkeypatch.setattr(_xp, "supports_float64", lambda xp, device: False)
    _WARNED_NO_FLOAT64.clear()
    import array_api_compat.numpy as xp

    config = types.SimpleNamespace(root_dtype="float64")  # the one field _root_dtype reads

    like = np.ones(3, np.float32)
    with pytest.warns(UserWarning, match="is not available on the default device of array_api_compat.numpy "):
        assert _root_dtype(config, xp, like) == np.float32
    _WARNED_NO_FLOAT64.clear()
