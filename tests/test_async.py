"""Asynchronous preconditioners: swap timing, staleness bound, determinism, errors, host copies."""

import threading
import time

import numpy as np
import pytest

import shampoo_core as sc
from shampoo_core import _xp
from shampoo_core import roots as roots_module
from helpers import to_np, to_xp

HP = dict(beta1=0.0, beta2=1.0, graft_type="none", block_size=8, merge_small_dims=False,
          start_preconditioning_step=1, preconditioning_compute_steps=4, relative_epsilon=False, epsilon=1e-3)


def grads(n=10, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((6, 5)) for _ in range(n)]


def run(tx, xp, gs):
    params = to_xp(xp, np.zeros((6, 5)))
    state = tx.init(params)
    states, updates = [], []
    for g in gs:
        u, state = tx.update(state, to_xp(xp, g), params)
        states.append(state)
        updates.append(to_np(u))
    return states, updates


@pytest.mark.parametrize("staleness", [1, 3])
def test_deterministic_swap_uses_roots_of_the_submitting_step(xp, staleness):
    gs = grads()
    with sc.AsyncPreconditioners(max_workers=2, max_staleness=staleness, deterministic=True) as ex:
        states, updates = run(sc.shampoo(1.0, async_preconditioners=ex, **HP), xp, gs)
    # Roots are submitted at steps 1, 5, 9 and swapped in at 1 + staleness, 5 + staleness, ...
    for t, state in enumerate(states, start=1):
        (block,) = state.params[0].blocks  # one group of one block: arrays (1, 6, 6)
        submitted = max(s for s in (1, 5, 9) if s + staleness <= t) if t > staleness else None
        for h_index, x in enumerate(block.preconditioners):
            if submitted is None:
                np.testing.assert_array_equal(to_np(x)[0], np.eye(x.shape[-1]))
            else:
                stats = to_np(states[submitted - 1].params[0].blocks[0].statistics[h_index])[0]
                expected = to_np(sc.inverse_pth_root(stats, 4, epsilon=1e-3, relative_epsilon=False).root)
                np.testing.assert_allclose(to_np(x)[0], expected, rtol=1e-12, atol=1e-14)
    # Before the first swap the update is the gradient itself (identity preconditioners).
    np.testing.assert_allclose(updates[0], -gs[0], rtol=1e-15)


def test_groups_of_several_blocks_are_joined_in_block_order(xp):
    rng = np.random.default_rng(1)
    gs = [rng.standard_normal((20, 12)) for _ in range(3)]  # blocks 8x8, 8x8, 8x4, 8x4, 4x8, 4x4
    params = to_xp(xp, np.zeros((20, 12)))
    with sc.AsyncPreconditioners(max_workers=2, max_staleness=2, deterministic=True) as ex:
        tx = sc.shampoo(1.0, async_preconditioners=ex, **HP)
        state, states = tx.init(params), []
        for g in gs:
            _, state = tx.update(state, to_xp(xp, g), params)
            states.append(state)
    submitted, swapped = states[0].params[0].blocks, states[2].params[0].blocks
    assert max(b.statistics[0].shape[0] for b in swapped) > 1
    for old, new in zip(submitted, swapped):
        for h, x in zip(old.statistics, new.preconditioners):
            for b in range(h.shape[0]):
                expected = sc.inverse_pth_root(to_np(h)[b], 4, epsilon=1e-3, relative_epsilon=False).root
                np.testing.assert_allclose(to_np(x)[b], expected, rtol=1e-10, atol=1e-12)


def test_deterministic_runs_are_reproducible():
    gs = grads(12)
    outs = []
    for workers in (1, 3):
        with sc.AsyncPreconditioners(max_workers=workers, max_staleness=2, deterministic=True) as ex:
            outs.append(run(sc.shampoo(1.0, async_preconditioners=ex, **HP), np, gs)[1])
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)


def slow_roots(monkeypatch, seconds: float) -> None:
    """Every inverse root takes ``seconds`` longer (a sleep before the real one)."""
    real = roots_module.inverse_pth_root

    def slow(a, p, **kw):
        time.sleep(seconds)
        return real(a, p, **kw)

    monkeypatch.setattr(roots_module, "inverse_pth_root", slow)


def test_staleness_bound_makes_the_step_wait(monkeypatch):
    slow_roots(monkeypatch, 0.2)
    gs = grads(4)
    with sc.AsyncPreconditioners(max_staleness=2) as ex:
        tx = sc.shampoo(1.0, async_preconditioners=ex, **HP)
        params = np.zeros((6, 5))
        state = tx.init(params)
        _, state = tx.update(state, gs[0], params)  # submits (fast return: the job sleeps)
        assert ex.pending == 1
        _, state = tx.update(state, gs[1], params)  # age 1 < 2 and not done: old roots
        np.testing.assert_array_equal(state.params[0].blocks[0].preconditioners[0][0], np.eye(6))
        t0 = time.perf_counter()
        _, state = tx.update(state, gs[2], params)  # age 2: waits for the job
        assert ex.pending == 0
        assert not np.array_equal(state.params[0].blocks[0].preconditioners[0][0], np.eye(6))
        assert time.perf_counter() - t0 < 1.0


def test_times_count_the_workers_busy_seconds_and_the_callers_wait(monkeypatch):
    slow_roots(monkeypatch, 0.1)
    with sc.AsyncPreconditioners(max_staleness=1) as ex:
        assert ex.times() == sc.WorkerTimes(0, 0.0, 0.0, 0)
        tx = sc.shampoo(1.0, async_preconditioners=ex, **HP)
        params = np.zeros((6, 5))
        state = tx.init(params)
        _, state = tx.update(state, grads(1)[0], params)  # two jobs: the two roots of one block
        time.sleep(0.05)  # the worker is in the first one; the second is queued
        _, state = tx.update(state, grads(1)[0], params)  # age 1: waits, running the second itself
        jobs, busy, waited, caller_jobs = ex.times()
        assert jobs == 2 and caller_jobs >= 1 and busy >= 0.1 * (2 - caller_jobs) and waited >= 0.1 * caller_jobs
        view = ex.scoped("other")  # views share the pool and its counts
        assert view.times() == ex.times()
        ex.wait()
    with sc.AsyncPreconditioners(max_staleness=100) as ex:
        tx = sc.shampoo(1.0, async_preconditioners=ex, **HP)
        state = tx.init(params)
        _, state = tx.update(state, grads(1)[0], params)
        ex.wait()
        _, state = tx.update(state, grads(1)[0], params)  # finished before it was due: no wait
        assert ex.times()[::2] == (2, 0.0) and ex.times().caller_jobs == 0


def test_waiting_caller_runs_due_jobs_no_worker_started(monkeypatch):
    slow_roots(monkeypatch, 0.2)
    gs = [[g, 2.0 * g, -g] for g in grads(2)]  # three leaves: three jobs per root step
    with sc.AsyncPreconditioners(max_workers=1, max_staleness=1) as ex:
        tx = sc.shampoo(1.0, async_preconditioners=ex, **HP)
        params = [np.zeros((6, 5)) for _ in range(3)]
        state = tx.init(params)
        _, first = tx.update(state, gs[0], params)  # six jobs (two roots each); the worker takes one
        _, state = tx.update(first, gs[1], params)  # all due: the caller runs queued ones meanwhile
        jobs, busy, waited, caller_jobs = ex.times()
        assert ex.pending == 0 and jobs == 6 and 2 <= caller_jobs <= 4
        assert busy >= 0.2 * (6 - caller_jobs) and waited >= 0.2 * caller_jobs
    # Whoever ran them, the roots are those of the step-1 statistics.
    for leaf, old in zip(state.params, first.params):
        for h, x in zip(old.blocks[0].statistics, leaf.blocks[0].preconditioners):
            expected = sc.inverse_pth_root(h[0], 4, epsilon=1e-3, relative_epsilon=False).root
            np.testing.assert_allclose(x[0], expected, rtol=1e-12, atol=1e-14)


def test_error_in_a_job_the_caller_ran_surfaces_as_a_worker_s(monkeypatch):
    real = roots_module.inverse_pth_root

    def fails_in_the_caller(a, p, **kw):
        time.sleep(0.2)
        if threading.current_thread() is threading.main_thread():
            raise MemoryError("caller ran out")
        return real(a, p, **kw)

    monkeypatch.setattr(roots_module, "inverse_pth_root", fails_in_the_caller)
    with sc.AsyncPreconditioners(max_workers=1, max_staleness=1) as ex:
        params = [np.zeros((6, 5)) for _ in range(2)]
        tx = sc.shampoo(1.0, async_preconditioners=ex, **HP)
        state = tx.init(params)
        _, state = tx.update(state, grads(2), params)  # the worker takes leaf 0's first root
        with pytest.raises(RuntimeError, match=r"block \(0, 0\) \(submitted at step 1\)") as info:
            tx.update(state, grads(2), params)  # the caller runs leaf 0's second, which fails
        assert isinstance(info.value.__cause__, MemoryError)
        assert ex.times().caller_jobs >= 1


def test_finished_roots_swap_in_at_next_step():
    gs = grads(3)
    with sc.AsyncPreconditioners(max_staleness=100) as ex:
        tx = sc.shampoo(1.0, async_preconditioners=ex, **HP)
        params = np.zeros((6, 5))
        state = tx.init(params)
        _, state = tx.update(state, gs[0], params)
        ex.wait()
        _, state = tx.update(state, gs[1], params)
        assert ex.pending == 0
        assert not np.array_equal(state.params[0].blocks[0].preconditioners[0][0], np.eye(6))


def test_worker_error_surfaces_in_caller(monkeypatch):
    def broken(a, p, **kw):
        raise MemoryError("worker ran out")

    monkeypatch.setattr(roots_module, "inverse_pth_root", broken)
    with sc.AsyncPreconditioners(max_staleness=1) as ex:
        tx = sc.shampoo(1.0, async_preconditioners=ex, **HP)
        params = np.zeros((6, 5))
        state = tx.init(params)
        _, state = tx.update(state, grads(1)[0], params)  # submission does not raise
        with pytest.raises(RuntimeError, match="submitted at step 1") as info:
            tx.update(state, grads(1)[0], params)
        assert isinstance(info.value.__cause__, MemoryError)


def test_views_let_several_states_share_one_executor():
    # Two states on one executor repeat each other's job keys (leaf 0, block 0): with a view each
    # they run as with an executor each; on the executor itself the second state's roots are lost.
    ga, gb = grads(9, seed=1), [100.0 * g for g in grads(9, seed=2)]
    own = []
    for gs in (ga, gb):
        with sc.AsyncPreconditioners(max_staleness=2, deterministic=True) as ex:
            own.append(run(sc.shampoo(1.0, async_preconditioners=ex, **HP), np, gs)[1])

    def shared(view):
        with sc.AsyncPreconditioners(max_workers=2, max_staleness=2, deterministic=True) as ex:
            txs = [sc.shampoo(1.0, async_preconditioners=view(ex, name), **HP) for name in ("a", "b")]
            params = np.zeros((6, 5))
            states = [tx.init(params) for tx in txs]
            out = [[], []]
            for t in range(9):
                for i, (tx, gs) in enumerate(zip(txs, (ga, gb))):
                    u, states[i] = tx.update(states[i], gs[t], params)
                    out[i].append(u)
                if t == 4:  # step 5 submitted a job per state, unless the keys collided
                    assert ex.pending == (1 if view is _same else 2)
            return out

    for got, want in zip(shared(lambda ex, name: ex.scoped(name)), own):
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
    collided = shared(_same)
    assert not all(np.array_equal(a, b) for a, b in zip(collided[1], own[1]))


def _same(ex, name):
    return ex


def test_view_exports_and_imports_its_own_jobs():
    with sc.AsyncPreconditioners(max_staleness=3, deterministic=True) as ex:
        a, b = ex.scoped("a"), ex.scoped("b")
        for view in (a, b):
            tx = sc.shampoo(1.0, async_preconditioners=view, **HP)
            params = np.zeros((6, 5))
            tx.update(tx.init(params), grads(1)[0], params)
        assert (ex.pending, a.pending, b.pending) == (2, 1, 1)
        exported = a.export_pending()
        assert [(key, step) for key, step, _ in exported] == [((0, 0), 1)]
        assert sorted(key for key, _, _ in ex.export_pending()) == [("a", 0, 0), ("b", 0, 0)]
        with sc.AsyncPreconditioners(max_staleness=3, deterministic=True) as other:
            view = other.scoped("a")
            view.import_pending(exported)
            assert (other.pending, view.pending, other.scoped("b").pending) == (1, 1, 0)
            assert view.collect((0, 0), 4, 10) is not None


@pytest.mark.parametrize("backend", ["torch", "array_api_strict:device1", "torch:cuda", "cupy"])
def test_host_copies_give_the_same_roots(backend):
    """host=True: roots from NumPy copies of device statistics come back on that device.

    array_api_strict's second device stands in for an accelerator on machines without one: it
    refuses to mix arrays of two devices, so a root returned to the default device fails."""
    from conftest import BACKENDS

    try:
        xp = BACKENDS[backend]()
    except Exception as err:
        pytest.skip(f"{backend} unavailable: {type(err).__name__}: {err}")
    gs = grads(6)
    outs = []
    for host in (False, True):
        with sc.AsyncPreconditioners(max_staleness=1, deterministic=True, host=host) as ex:
            states, updates = run(sc.shampoo(1.0, async_preconditioners=ex, **HP), xp, gs)
        block = states[-1].params[0].blocks[0]
        for x, h in zip(block.preconditioners, block.statistics):
            assert type(x) is type(h)
            assert _xp.device_of(x) == _xp.device_of(h)
            assert not np.array_equal(to_np(x)[0], np.eye(x.shape[-1]))  # a root was swapped in
        outs.append(updates)
    # NumPy's and the backend's solvers round differently; κ <= 1/epsilon amplifies float64 rounding.
    tol = 100 * np.finfo(np.float64).eps / HP["epsilon"]
    for a, b in zip(*outs):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


def test_bad_arguments_and_lazy_arrays():
    with pytest.raises(ValueError, match="max_workers"):
        sc.AsyncPreconditioners(max_workers=0)
    with pytest.raises(ValueError, match="max_staleness"):
        sc.AsyncPreconditioners(max_staleness=0)
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    with sc.AsyncPreconditioners() as ex:
        tx = sc.shampoo(1.0, async_preconditioners=ex, nonfinite="skip", **HP)
        params = jnp.zeros((6, 5))
        with pytest.raises(ValueError, match="needs eager arrays"):
            jax.jit(tx.update)(tx.init(params), jnp.ones((6, 5)), params)
