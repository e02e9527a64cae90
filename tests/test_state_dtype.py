"""``state_dtype``: the optimizer state of half-precision parameters is kept in float32.

In bfloat16, 0.999·H rounds back to H, so a β₂ = 0.999 average stops following the gradients;
float16 drifts more slowly. These tests fail when the state is kept in the parameter's dtype.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

import shampoo_core as sc

from helpers import require_float64, to_np, to_xp

HALF = ("float16", "bfloat16")


def _half(xp, name: str, a):
    """``a`` (NumPy) as an ``xp`` array of the half dtype ``name``; skipped where ``xp`` lacks it."""
    dtype = getattr(xp, name, None)
    if dtype is None:
        pytest.skip(f"{getattr(xp, '__name__', xp)} has no {name}")
    return xp.astype(to_xp(xp, a.astype(np.float32)), dtype)


def _f64(x):
    return to_np(x).astype(np.float64) if str(x.dtype).rsplit(".", 1)[-1] != "bfloat16" else _bf16_to_f64(x)


def _bf16_to_f64(x):
    import array_api_compat

    xp = array_api_compat.array_namespace(x)
    return to_np(xp.astype(x, xp.float32)).astype(np.float64)


@pytest.mark.parametrize("half", HALF)
def test_half_precision_state_follows_the_averages(xp, half):
    steps, beta2 = 100, 0.999
    rng = np.random.default_rng(0)
    p = _half(xp, half, rng.standard_normal((6, 6)))
    g = _half(xp, half, rng.standard_normal((6, 6)))
    tx = sc.shampoo(1e-3, beta2=beta2, graft_type="adam", merge_small_dims=False,
                    start_preconditioning_step=1, preconditioning_compute_steps=10**6)
    state = tx.init(p)
    for _ in range(steps):
        u, state = tx.update(state, g, p)
    assert u.dtype == p.dtype
    s = state.params[0]
    assert s.momentum.dtype == xp.float32 and s.graft.accumulator.dtype == xp.float32
    assert all(h.dtype == xp.float32 for h in s.blocks[0].statistics + s.blocks[0].preconditioners)

    g64 = _f64(g)
    weight = 1.0 - beta2**steps  # the exact average of a constant gradient after `steps` steps
    tol = 10 * steps * np.finfo(np.float32).eps  # float32 rounding, one term per step
    left, right = (_f64(h)[0] for h in s.blocks[0].statistics)
    for got, want in ((left, weight * g64 @ g64.T), (right, weight * g64.T @ g64),
                      (_f64(s.graft.accumulator), weight * g64 * g64)):
        assert np.linalg.norm(got - want) <= tol * np.linalg.norm(want)


def test_float64_state_for_float32_parameters_is_the_float64_step(xp):
    require_float64(xp)
    rng = np.random.default_rng(1)
    p32 = to_xp(xp, rng.standard_normal((10, 7)).astype(np.float32))
    hp = dict(block_size=4, start_preconditioning_step=2, preconditioning_compute_steps=2, weight_decay=0.01)
    tx32, tx64 = sc.shampoo(0.1, state_dtype="float64", **hp), sc.shampoo(0.1, **hp)
    p64 = xp.astype(p32, xp.float64)
    s32, s64 = tx32.init(p32), tx64.init(p64)
    assert s32.params[0].momentum.dtype == xp.float64
    for _ in range(5):
        g32 = to_xp(xp, rng.standard_normal((10, 7)).astype(np.float32))
        u32, s32 = tx32.update(s32, g32, p32)
        u64, s64 = tx64.update(s64, xp.astype(g32, xp.float64), p64)
        assert u32.dtype == xp.float32
        np.testing.assert_array_equal(to_np(u32), to_np(u64).astype(np.float32))


def test_float64_state_on_a_device_without_float64_is_refused():
    strict = pytest.importorskip("array_api_strict")
    p = strict.zeros((3, 3), dtype=strict.float32, device=strict.Device("no_float64"))
    with pytest.raises(ValueError, match="state_dtype='float64' is not available"):
        sc.shampoo(state_dtype="float64").init(p)


@pytest.mark.parametrize("value", ["float16", "bfloat16", "double", 64])
def test_state_dtype_names_are_checked(value):
    with pytest.raises(ValueError, match="state_dtype must be 'float32', 'float64' or None"):
        sc.shampoo(state_dtype=value)


def test_grads_of_another_state_dtype_are_refused():
    torch = pytest.importorskip("torch")
    p = torch.zeros(4, 4, dtype=torch.bfloat16)
    tx = sc.shampoo()
    state = tx.init(p)  # float32 state
    with pytest.raises(ValueError, match=r"grads has dtype torch.float64; the state holds torch.float32"):
        tx.update(state, torch.ones(4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="grads has dtype torch.bfloat16, kept in torch.float32; the state holds torch.float64"):
        tx.update(tx.init(torch.zeros(4, 4, dtype=torch.float64)), torch.ones(4, 4, dtype=torch.bfloat16))


def test_bfloat16_under_jit():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    rng = np.random.default_rng(2)
    p = jnp.asarray(rng.standard_normal((8, 5)), dtype=jnp.bfloat16)
    tx = sc.shampoo(1e-2, block_size=4, start_preconditioning_step=1, preconditioning_compute_steps=2,
                    nonfinite="skip")
    state = tx.init(p)
    eager_state = state
    step = jax.jit(tx.update)
    for _ in range(3):
        g = jnp.asarray(rng.standard_normal((8, 5)), dtype=jnp.bfloat16)
        u, state = step(state, g, p)
        ue, eager_state = tx.update(eager_state, g, p)
        assert u.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(u, np.float32), np.asarray(ue, np.float32), rtol=2e-2, atol=1e-6)
    assert state.params[0].blocks[0].statistics[0].dtype == jnp.float32


def test_torch_adapter_keeps_state_dtypes_through_state_dict():
    torch = pytest.importorskip("torch")
    from backends.torch_optim import Shampoo

    for dtype in (torch.bfloat16, torch.float32):
        torch.manual_seed(0)
        model = torch.nn.Linear(16, 8).to(dtype)
        x = torch.randn(32, 16).to(dtype)

        def step(m, o):
            o.zero_grad()
            m(x).float().pow(2).mean().backward()
            o.step()

        opt = Shampoo(model.parameters(), lr=1e-2, start_preconditioning_step=1, preconditioning_compute_steps=2)
        for _ in range(3):
            step(model, opt)
        saved = copy.deepcopy(opt.state_dict())
        model2 = copy.deepcopy(model)
        opt2 = Shampoo(model2.parameters(), lr=1e-2, start_preconditioning_step=1, preconditioning_compute_steps=2)
        opt2.load_state_dict(saved)
        # torch's own load casts every floating state tensor to the parameter dtype and the
        # int32 counters to floats
        for p, p2 in zip(model.parameters(), model2.parameters()):
            assert [t.dtype for t in opt.state[p].values()] == [t.dtype for t in opt2.state[p2].values()]
        assert {t.dtype for t in opt2.state[model2.weight].values()} == {torch.int32, torch.float32}
        for _ in range(3):
            step(model, opt)
            step(model2, opt2)
        for p, p2 in zip(model.parameters(), model2.parameters()):
            assert torch.equal(p, p2)


def test_checkpoint_saved_before_state_dtype_existed_loads(tmp_path):
    rng = np.random.default_rng(3)
    p = rng.standard_normal((5, 4)).astype(np.float32)
    old = sc.shampoo(block_size=4)
    del old.init.hyperparameters["state_dtype"]  # the record of a version without the option
    state = old.init(p)
    _, state = old.update(state, p, p)
    sc.save_state(tmp_path / "opt.npz", state, tx=old)
    loaded = sc.load_state(tmp_path / "opt.npz", like=p, tx=sc.shampoo(block_size=4))
    np.testing.assert_array_equal(loaded.params[0].momentum, state.params[0].momentum)
    with pytest.raises(sc.CheckpointError, match="hyperparameter 'state_dtype'"):
        sc.load_state(tmp_path / "opt.npz", like=p, tx=sc.shampoo(block_size=4, state_dtype="float32"))
