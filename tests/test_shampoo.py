"""Behaviour of the Shampoo transformation."""

import copy
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

import shampoo_core as sc
from helpers import eps, to_np, to_xp


def run(tx, xp, params_np, grads_np, *, apply=True):
    params = to_xp(xp, params_np)
    state = tx.init(params)
    updates = []
    for g in grads_np:
        u, state = tx.update(state, to_xp(xp, g), params)
        updates.append(to_np(u))
        if apply:
            params = sc.apply_updates(params, u)
    return updates, state, params


def test_hand_derived_two_steps(xp):
    """G₁ = diag(2, 1), G₂ = [[0, 1], [1, 0]], ε = 1 absolute, sums (beta2 = 1), no grafting.

    Step 1: L = R = diag(4, 1) + I = diag(5, 2) ->
        P₁ = diag(5^-1/4, 2^-1/4) G₁ diag(5^-1/4, 2^-1/4) = diag(2/√5, 1/√2).
    Step 2: L = R = diag(5, 2) + I = diag(6, 3) -> P₂ = 18^(-1/4) [[0, 1], [1, 0]].
    """
    tx = sc.shampoo(1.0, beta1=0.0, beta2=1.0, epsilon=1.0, relative_epsilon=False, graft_type="none",
                    start_preconditioning_step=1, preconditioning_compute_steps=1, merge_small_dims=False)
    g1 = np.diag([2.0, 1.0])
    g2 = np.array([[0.0, 1.0], [1.0, 0.0]])
    (u1, u2), _, _ = run(tx, xp, np.zeros((2, 2)), [g1, g2])
    tol = 1e3 * eps(np.float64)
    np.testing.assert_allclose(u1, -np.diag([2 / math.sqrt(5), 1 / math.sqrt(2)]), atol=tol)
    np.testing.assert_allclose(u2, -(18 ** -0.25) * g2, atol=tol)


def test_hand_derived_adagrad_graft(xp):
    """Same G₁ with AdaGrad grafting: D₁ = G₁/(√(G₁²) + 1e-30) = diag(1, 1), ‖D₁‖ = √2.

    ‖P₁‖ = √(4/5 + 1/2), so U₁ = P₁ √2 / √1.3 with lr = 0.5.
    """
    tx = sc.shampoo(0.5, beta1=0.0, beta2=1.0, epsilon=1.0, relative_epsilon=False, graft_type="adagrad",
                    diagonal_epsilon=1e-30, start_preconditioning_step=1, preconditioning_compute_steps=1,
                    merge_small_dims=False)
    (u1,), _, _ = run(tx, xp, np.zeros((2, 2)), [np.diag([2.0, 1.0])])
    p1 = np.diag([2 / math.sqrt(5), 1 / math.sqrt(2)])
    np.testing.assert_allclose(u1, -0.5 * p1 * math.sqrt(2) / math.sqrt(1.3), atol=1e3 * eps(np.float64))


@given(n=st.integers(1, 12), steps=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_vector_parameter_is_full_matrix_adagrad(xp, n, steps, seed):
    rng = np.random.default_rng(seed)
    grads = [rng.standard_normal(n) for _ in range(steps)]
    epsilon = 1e-2
    tx = sc.shampoo(0.1, block_size=16, beta1=0.0, beta2=1.0, epsilon=epsilon, relative_epsilon=False,
                    graft_type="none", start_preconditioning_step=1, preconditioning_compute_steps=1)
    ours, _, _ = run(tx, xp, np.zeros(n), grads)
    reference, _, _ = run(sc.full_matrix_adagrad(0.1, epsilon=epsilon), xp, np.zeros(n), grads)
    # Independent NumPy reference: -lr (εI + Σ g gᵀ)^(-1/2) g_t.
    h = epsilon * np.eye(n)
    for t, g in enumerate(grads):
        h = h + np.outer(g, g)
        w, q = np.linalg.eigh(h)
        expected = -0.1 * (q * w**-0.5) @ q.T @ g
        tol = 1e3 * eps(np.float64) * np.linalg.cond(h) * np.abs(expected).max()
        np.testing.assert_allclose(ours[t], expected, atol=tol)
        np.testing.assert_allclose(reference[t], expected, atol=tol)


@pytest.mark.parametrize(
    "graft, first_order",
    [
        ("adam", lambda: sc.adam(0.01, beta1=0.9, beta2=0.99, epsilon=1e-8)),
        ("adagrad", lambda: sc.adagrad(0.01, epsilon=1e-8)),
        ("sgd", lambda: sc.sgd(0.01)),
    ],
)
def test_before_start_equals_grafting_optimizer(xp, graft, first_order):
    rng = np.random.default_rng(1)
    params = {"w": rng.standard_normal((6, 5)), "b": rng.standard_normal(5), "t": rng.standard_normal((2, 3, 4))}
    grads = [{k: rng.standard_normal(v.shape) for k, v in params.items()} for _ in range(6)]
    beta1 = 0.9 if graft == "adam" else 0.0
    tx = sc.shampoo(0.01, block_size=4, beta1=beta1, beta2=0.99, diagonal_epsilon=1e-8, graft_type=graft,
                    start_preconditioning_step=100, preconditioning_compute_steps=1)
    ours, _, _ = run(tx, xp, params, grads)
    ref, _, _ = run(first_order(), xp, params, grads)
    for a, b in zip(ours, ref):
        for k in params:
            np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("granularity", ["layer", "block"])
@pytest.mark.parametrize("graft", ["sgd", "adagrad", "rmsprop", "adam", "sqrt_n"])
@pytest.mark.parametrize("beta1", [0.0, 0.9])  # with a first moment, its bias correction scales f
def test_update_norm_equals_graft_norm(xp, granularity, graft, beta1):
    rng = np.random.default_rng(2)
    shape = (10, 7)
    grads = [rng.standard_normal(shape) for _ in range(3)]
    lr = 0.5
    tx = sc.shampoo(lr, block_size=4, beta1=beta1, beta2=0.9, diagonal_epsilon=1e-8, graft_type=graft,
                    graft_granularity=granularity, start_preconditioning_step=1, preconditioning_compute_steps=1)
    first_order = sc.shampoo(lr, block_size=4, beta1=beta1, beta2=0.9, diagonal_epsilon=1e-8, graft_type=graft,
                             start_preconditioning_step=10**9)
    ours, _, _ = run(tx, xp, np.zeros(shape), grads, apply=False)
    ref, _, _ = run(first_order, xp, np.zeros(shape), grads, apply=False)
    from shampoo_core.blocking import make_plan

    plan = make_plan(shape, 4)
    for u, d in zip(ours, ref):
        if granularity == "layer":
            units = [(slice(None), slice(None))]
        else:
            units = plan.block_slices
        for s in units:
            expected = math.sqrt(u[s].size) * lr if graft == "sqrt_n" else np.linalg.norm(d[s])
            assert np.linalg.norm(u[s]) == pytest.approx(expected, rel=1e3 * eps(np.float64))
        # Shampoo's direction, not the graft's.
        assert not np.allclose(u / np.linalg.norm(u), d / np.linalg.norm(d), atol=1e-3)


@pytest.mark.parametrize("graft", ["sgd", "adagrad", "rmsprop", "adam", "sqrt_n"])
def test_a_layer_grafted_step_takes_the_norm_without_writing_the_direction(graft, monkeypatch):
    """Preconditioned, a layer needs only the grafting direction's norm; before
    start_preconditioning_step, and for per-block norms, the direction itself."""
    from shampoo_core import grafting

    rng = np.random.default_rng(4)
    params = {"w": rng.standard_normal((12, 10)).astype(np.float32)}
    grads = [{"w": rng.standard_normal((12, 10)).astype(np.float32)} for _ in range(3)]
    real = grafting.graft_direction
    calls = []
    monkeypatch.setattr(grafting, "graft_direction", lambda *a, **k: calls.append(1) or real(*a, **k))
    for granularity, written in (("layer", [1, 0, 0]), ("block", [1, 1, 1])):
        tx = sc.shampoo(0.1, block_size=4, graft_type=graft, graft_granularity=granularity,
                        start_preconditioning_step=2, preconditioning_compute_steps=1)
        state = tx.init(params)
        for g, expected in zip(grads, written):
            calls.clear()
            _, state = tx.update(state, g, params)
            assert len(calls) == expected, (granularity, expected)


@pytest.mark.parametrize("beta2", [0.999, 1.0])  # blocks weighted by √(1-β₂) for the statistics, or not
def test_a_step_without_a_first_moment_cuts_the_gradient_into_blocks_once(xp, beta2, monkeypatch):
    """With β₁ = 0 the filtered gradient is the gradient, already cut into blocks for the
    statistics: preconditioning reuses those blocks (rescaled where they were weighted), where a
    first moment needs a cut of its own; a step that leaves the statistics alone cuts only F.
    (On NumPy a matrix's blocks are read where they lie, ``blocking.block_grids``, counted alike.)
    (That the updates stay right is test_reference's property, which draws β₁ = 0 and β₂ < 1.)"""
    import backends
    from shampoo_core import blocking

    # numba's first-order pass cuts g and m itself where it runs (test_fused counts those cuts)
    monkeypatch.setattr(backends, "_FUSED_CPU", [None])
    rng = np.random.default_rng(5)
    params = to_xp(xp, {"w": rng.standard_normal((12, 10)), "b": rng.standard_normal(10)})
    grads = to_xp(xp, {"w": rng.standard_normal((12, 10)), "b": rng.standard_normal(10)})
    cuts = []  # cuts, or grids of blocks where they lie (NumPy's matrices: blocking.block_grids)
    for name in ("split_groups", "block_grids"):
        monkeypatch.setattr(blocking, name, lambda *a, real=getattr(blocking, name), **k: cuts.append(1) or real(*a, **k))
    # (β₁, statistics every k steps, cuts per leaf at step 2, which skips the statistics for k = 2)
    for beta1, k, per_leaf in ((0.0, 1, 1), (0.9, 1, 2), (0.0, 2, 1), (0.9, 2, 1)):
        tx = sc.shampoo(0.1, block_size=4, beta1=beta1, beta2=beta2, start_preconditioning_step=1,
                        preconditioning_compute_steps=1, statistics_compute_steps=k)
        state = tx.update(tx.init(params), grads, params)[1]
        cuts.clear()
        updates, _ = tx.update(state, grads, params)
        assert len(cuts) == 2 * per_leaf, (beta1, k)
        assert all(np.all(np.isfinite(to_np(u))) for u in updates.values())


def test_inputs_are_not_mutated(xp):
    rng = np.random.default_rng(3)
    params_np = {"w": rng.standard_normal((5, 4)), "b": rng.standard_normal(4)}
    grads_np = {k: rng.standard_normal(v.shape) for k, v in params_np.items()}
    tx = sc.shampoo(0.1, start_preconditioning_step=1, preconditioning_compute_steps=1, weight_decay=0.1)
    params, grads = to_xp(xp, params_np), to_xp(xp, grads_np)
    state = tx.init(params)
    state_before = copy.deepcopy(to_np_tree(state))
    tx.update(state, grads, params)
    for k in params_np:
        np.testing.assert_array_equal(to_np(params[k]), params_np[k])
        np.testing.assert_array_equal(to_np(grads[k]), grads_np[k])
    after = to_np_tree(state)
    assert_trees_equal(state_before, after)


def to_np_tree(state):
    import optree

    return optree.tree_map(lambda x: to_np(x).copy(), state, none_is_leaf=False)


def assert_trees_equal(a, b):
    import optree

    la, sa = optree.tree_flatten(a)
    lb, sb = optree.tree_flatten(b)
    assert sa == sb
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(x, y)


def test_statistics_include_current_gradient_and_schedules(xp):
    rng = np.random.default_rng(4)
    grads = [rng.standard_normal((3, 3)) for _ in range(7)]
    tx = sc.shampoo(0.1, beta1=0.0, beta2=1.0, graft_type="none", start_preconditioning_step=3,
                    preconditioning_compute_steps=2, statistics_compute_steps=2, merge_small_dims=False)
    params = to_xp(xp, np.zeros((3, 3)))
    state = tx.init(params)
    identity = np.eye(3)
    for t, g in enumerate(grads, start=1):
        u, state = tx.update(state, to_xp(xp, g), params)
        (block,) = state.params[0].blocks  # one group of one block: arrays (1, 3, 3)
        used = [g_ for s, g_ in enumerate(grads[:t], start=1) if (s - 1) % 2 == 0]
        np.testing.assert_allclose(to_np(block.statistics[0])[0], sum(x @ x.T for x in used), rtol=1e-12)
        computed = t >= 3 and (t - 3) % 2 == 0
        x = to_np(block.preconditioners[0])[0]
        if t < 3:
            np.testing.assert_array_equal(x, identity)
            np.testing.assert_allclose(to_np(u), -0.1 * g, rtol=1e-15)
        elif computed:
            h = to_np(block.statistics[0])[0]
            w, q = np.linalg.eigh(h)
            ridge = 1e-6 * w.max()
            np.testing.assert_allclose(x, (q * (w + ridge) ** -0.25) @ q.T, rtol=1e-6)


def test_failed_root_keeps_previous_preconditioner(xp):
    tx = sc.shampoo(0.1, beta1=0.0, graft_type="none", start_preconditioning_step=1,
                    preconditioning_compute_steps=1, root_method="newton", inverse_failure_threshold=0.0,
                    merge_small_dims=False)
    params = to_xp(xp, np.zeros((3, 3)))
    state = tx.init(params)
    g = np.arange(9.0).reshape(3, 3)
    u, state = tx.update(state, to_xp(xp, g), params)
    (block,) = state.params[0].blocks
    # Threshold 0 rejects every root with any error: the identity stays, and it is counted.
    for x in block.preconditioners:
        np.testing.assert_array_equal(to_np(x), np.eye(3)[None])
    assert to_np(block.failures).tolist() == [2]
    assert float(block.last_error[0]) > 0.0
    np.testing.assert_allclose(to_np(u), -0.1 * g)


@pytest.mark.parametrize("shape, preconditioned", [((2, 3, 4), (True, True)), ((2, 3, 4), (False, True)),
                                                   ((2, 2, 3, 2), (True, False, True)), ((3, 4), (True,))])
def test_statistics_scaled_in_the_product_equal_the_weighted_block(xp, shape, preconditioned):
    """β₂H + (1-β₂)·Gram(G) with (1-β₂) given to the product (torch's 2-D blocks in a step) is
    ``update_statistics``' √(1-β₂)·G up to rounding, for stacks of matrices, of order-3 blocks
    and of vectors (full-matrix statistics)."""
    from shampoo_core import statistics

    beta2 = 0.999
    rng = np.random.default_rng(11)
    g = rng.standard_normal(shape)
    stats = tuple(to_xp(xp, np.eye(d)[None].repeat(shape[0], 0)) for d, pre in zip(shape[1:], preconditioned) if pre)
    weighted = statistics.update_statistics(xp, stats, to_xp(xp, g), preconditioned, beta2)
    scaled = statistics.accumulate_weighted(xp, stats, to_xp(xp, g), preconditioned, beta2, 1.0 - beta2)
    assert len(scaled) == len(weighted) == sum(preconditioned)
    for a, b in zip(scaled, weighted):
        tol = 100 * eps(to_np(b).dtype)
        np.testing.assert_allclose(to_np(a), to_np(b), rtol=tol, atol=tol)


def test_nonfinite_statistics_never_reach_preconditioner(xp):
    # Finite float32 gradients whose Gram matrix overflows even after the (1 - beta2) factor is
    # folded in (sqrt(1e-3) * 1e22 squared > 3.4e38): the statistics become inf.
    tx = sc.shampoo(0.1, beta1=0.0, graft_type="none", start_preconditioning_step=1, preconditioning_compute_steps=1,
                    merge_small_dims=False)
    params = to_xp(xp, np.zeros((2, 2), dtype=np.float32))
    state = tx.init(params)
    g = np.array([[1e22, 1.0], [1.0, 1.0]], dtype=np.float32)
    _, state = tx.update(state, to_xp(xp, g), params)
    (block,) = state.params[0].blocks
    assert not np.all(np.isfinite(to_np(block.statistics[0])))
    assert to_np(block.failures).tolist() == [2]
    for x in block.preconditioners:
        np.testing.assert_array_equal(to_np(x), np.eye(2, dtype=np.float32)[None])


@pytest.mark.parametrize("decoupled", [True, False])
def test_weight_decay(xp, decoupled):
    w = np.array([1.0, -2.0, 3.0])
    g = np.array([0.5, 0.5, 0.5])
    tx = sc.shampoo(0.1, beta1=0.0, graft_type="sgd", weight_decay=0.01, decoupled_weight_decay=decoupled,
                    start_preconditioning_step=100)
    (u,), _, _ = run(tx, xp, w, [g])
    # Decoupled: the decay is multiplied by the learning rate exactly once (AdamW).
    np.testing.assert_allclose(u, -0.1 * (g + 0.01 * w), rtol=1e-14)


def test_weight_decay_coupled_enters_statistics(xp):
    w = np.array([[1.0, 0.0], [0.0, 2.0]])
    g = np.zeros((2, 2))
    tx = sc.shampoo(0.1, beta1=0.0, beta2=1.0, weight_decay=0.5, decoupled_weight_decay=False,
                    merge_small_dims=False)
    _, state, _ = run(tx, xp, w, [g], apply=False)
    np.testing.assert_allclose(to_np(state.params[0].blocks[0].statistics[0])[0], (0.5 * w) @ (0.5 * w).T)


def test_momentum_and_nesterov(xp):
    g1, g2 = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    b1 = 0.5
    for nesterov in (False, True):
        tx = sc.shampoo(1.0, beta1=b1, graft_type="sgd", nesterov=nesterov, start_preconditioning_step=100)
        (u1, u2), _, _ = run(tx, xp, np.zeros(2), [g1, g2])
        m1 = (1 - b1) * g1
        m2 = b1 * m1 + (1 - b1) * g2
        if nesterov:
            exp2 = b1 * m2 / (1 - b1**3) + (1 - b1) * g2 / (1 - b1**2)
        else:
            exp2 = m2 / (1 - b1**2)
        np.testing.assert_allclose(u2, -exp2, rtol=1e-14)


def test_learning_rate_schedule_gets_update_count(xp):
    seen = []

    def schedule(count):
        seen.append(count)
        return 0.1 * (count + 1)

    tx = sc.shampoo(schedule, beta1=0.0, graft_type="sgd", start_preconditioning_step=100)
    us, _, _ = run(tx, xp, np.zeros(2), [np.ones(2)] * 3)
    assert seen == [0, 1, 2]
    np.testing.assert_allclose([u[0] for u in us], [-0.1, -0.2, -0.3])


def test_small_matrix_merges_into_full_matrix_adagrad(xp):
    tx = sc.shampoo(0.1, block_size=16)
    state = tx.init(to_xp(xp, np.zeros((2, 8))))
    assert [tuple(h.shape) for h in state.params[0].blocks[0].statistics] == [(1, 16, 16)]
    state = tx.init(to_xp(xp, np.zeros((8, 8))))
    assert [tuple(h.shape) for h in state.params[0].blocks[0].statistics] == [(1, 8, 8), (1, 8, 8)]


def test_one_sided_for_large_dims(xp):
    tx = sc.shampoo(0.1, block_size=8, skip_preconditioning_dim_size_gt=8, start_preconditioning_step=1)
    params = to_xp(xp, np.zeros((20, 4)))
    state = tx.init(params)
    (block,) = state.params[0].blocks
    assert [tuple(h.shape) for h in block.statistics] == [(1, 4, 4)]


def test_all_dims_skipped_uses_graft(xp):
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(20) for _ in range(3)]
    tx = sc.shampoo(0.1, beta1=0.0, graft_type="adagrad", diagonal_epsilon=1e-8, skip_preconditioning_dim_size_gt=8,
                    start_preconditioning_step=1)
    ours, state, _ = run(tx, xp, np.zeros(20), grads)
    ref, _, _ = run(sc.adagrad(0.1, epsilon=1e-8), xp, np.zeros(20), grads)
    assert state.params[0].blocks == ()
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(a, b)


def test_float32_state_and_updates(xp):
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((9, 5)).astype(np.float32)}
    grads = [{"w": rng.standard_normal((9, 5)).astype(np.float32)} for _ in range(4)]
    tx = sc.shampoo(0.1, block_size=4, start_preconditioning_step=1, preconditioning_compute_steps=1)
    us, state, p = run(tx, xp, params, grads)
    assert all(u["w"].dtype == np.float32 for u in us)
    for b in state.params[0].blocks:
        assert all(h.dtype == xp.float32 for h in b.statistics + b.preconditioners)
    assert p["w"].dtype == xp.float32
    # float64 roots then a float32 cast: matches a float64 run to float32 accuracy.
    us64, _, _ = run(tx, xp, {"w": params["w"].astype(np.float64)}, [{"w": g["w"].astype(np.float64)} for g in grads])
    np.testing.assert_allclose(us[-1]["w"], us64[-1]["w"], rtol=1e-3, atol=1e-4 * np.abs(us64[-1]["w"]).max())


def test_scalar_and_nested_parameters(xp):
    params = {"layers": [{"w": np.ones((3, 2)), "s": np.array(2.0)}], "bias": (np.zeros(3),)}
    grads = {"layers": [{"w": np.full((3, 2), 0.5), "s": np.array(1.0)}], "bias": (np.ones(3),)}
    tx = sc.shampoo(0.1, start_preconditioning_step=1)
    (u,), state, p = run(tx, xp, params, [grads])
    assert set(u) == {"layers", "bias"} and isinstance(u["bias"], tuple)
    assert u["layers"][0]["s"].shape == ()
    assert np.isfinite(u["layers"][0]["s"]) and u["layers"][0]["s"] < 0


@pytest.mark.parametrize("beta2", [0.999, 0.5, 1.0])
def test_update_statistics_folds_the_decay_into_the_block(xp, beta2):
    """β₂H + (1-β₂)·Gram(G) per dim, with (1-β₂) applied to the block: the same statistics up to
    rounding, and a float32 entry of 3e20 (plain Gram 9e40, past float32's 3.4e38) stays finite
    exactly when (1-β₂)·9e40 does (β₂ = 1 sums unscaled, as AdaGrad)."""
    from shampoo_core import statistics

    rng = np.random.default_rng(5)
    # A stack of two blocks; each must get the statistics of its own block.
    g, h0, h1 = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3, 3)), rng.standard_normal((2, 4, 4))
    h0, h1 = h0 + np.swapaxes(h0, 1, 2), h1 + np.swapaxes(h1, 1, 2)  # statistics are symmetric
    gt = np.swapaxes(g, 1, 2)
    new = statistics.update_statistics(xp, (to_xp(xp, h0), to_xp(xp, h1)), to_xp(xp, g), (True, True), beta2)
    weight = 1.0 if beta2 == 1.0 else 1.0 - beta2  # beta2 = 1 sums (AdaGrad)
    tol = 100 * eps(to_np(new[0]).dtype)
    np.testing.assert_allclose(to_np(new[0]), beta2 * h0 + weight * g @ gt, rtol=tol, atol=tol)
    np.testing.assert_allclose(to_np(new[1]), beta2 * h1 + weight * gt @ g, rtol=tol, atol=tol)
    (right,) = statistics.update_statistics(xp, (to_xp(xp, h1),), to_xp(xp, g), (False, True), beta2)
    np.testing.assert_allclose(to_np(right), beta2 * h1 + weight * gt @ g, rtol=tol, atol=tol)
    big = to_xp(xp, np.array([[[3e20, 1.0], [1.0, 1.0]]], dtype=np.float32))
    zero = to_xp(xp, np.zeros((1, 2, 2), dtype=np.float32))
    (h,) = statistics.update_statistics(xp, (zero,), big, (True, False), beta2)
    assert bool(np.all(np.isfinite(to_np(h)))) == (0 < (1 - beta2) * 9e40 < 3.4e38)
