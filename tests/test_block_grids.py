"""A matrix's blocks read where they lie (``blocking.block_grids``): the same blocks, statistics,
preconditioned blocks and steps as the cut stacks, and on NumPy no copy of the blocks at all."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import shampoo_core as sc
from shampoo_core import _xp, blocking, preconditioner, statistics
from helpers import eps, examples_for, to_np, to_xp

# (shape, block_size): one group, ragged grids of 2 and 4 groups, one column block, one row block
MATRICES = [((12, 8), 4), ((13, 10), 4), ((9, 20), 8), ((6, 30), 8), ((40, 7), 16), ((5, 5), 8)]


@settings(max_examples=30)
@given(rows=st.integers(1, 30), cols=st.integers(1, 30), block_size=st.integers(2, 9))
def test_grids_hold_the_blocks_of_the_cut(xp, rows, cols, block_size):
    """Row-major over each group's grid, the blocks are those of ``split_groups``, and on NumPy
    the grid is a view of the parameter: nothing is copied."""
    x_np = np.random.default_rng(rows * 31 + cols).standard_normal((rows, cols))
    x = to_xp(xp, x_np)
    plan = blocking.make_plan((rows, cols), block_size)
    if len(plan.merged_shape) != 2:  # a matrix with a dim of 1 merges to a vector
        with pytest.raises(ValueError, match="2-D merged shape"):
            blocking.block_grids(xp, x, plan)
        return
    grids = blocking.block_grids(xp, x, plan)
    for grid, stack, group in zip(grids, blocking.split_groups(xp, x, plan), plan.groups):
        assert tuple(grid.shape) == group.counts + group.block_shape
        np.testing.assert_array_equal(to_np(grid).reshape(to_np(stack).shape), to_np(stack))
        if isinstance(x, np.ndarray):
            assert np.shares_memory(grid, x)


def test_grids_need_a_matrix():
    """A kernel that merges to a matrix has grids; one that stays of order 3 has none."""
    merged = blocking.make_plan((4, 3, 3, 5), 16)
    assert merged.merged_shape == (12, 15)
    assert len(blocking.block_grids(np, np.zeros((4, 3, 3, 5)), merged)) == len(merged.groups)
    with pytest.raises(ValueError, match=r"plan: block grids need a 2-D merged shape; got \(4, 6, 70\)"):
        blocking.block_grids(np, np.zeros((4, 6, 70)), blocking.make_plan((4, 6, 70), 16))


def test_only_numpys_products_take_block_views(xp):
    x = to_xp(xp, np.zeros(2, dtype=np.float32))
    assert _xp.takes_block_views(_xp.namespace(x)) == isinstance(x, np.ndarray)


def _steps(params, grads, copy, **options):
    """``(updates per step, final state)`` of Shampoo at block 4 with roots every 2 steps from
    step 2, each step given copies (``copy``) of its gradients, since a donated step may write
    into them."""
    tx = sc.shampoo(0.1, block_size=4, start_preconditioning_step=2, preconditioning_compute_steps=2, **options)
    state, out = tx.init(params), []
    for g in grads:
        u, state = tx.update(state, {k: copy(v) for k, v in g.items()}, params)
        out.append(u)
    return out, state


@pytest.mark.parametrize("shape, block_size", MATRICES)
@pytest.mark.parametrize("preconditioned", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("donate", [False, True])
def test_statistics_and_preconditioning_on_grids_are_those_of_the_cut(xp, shape, block_size, preconditioned, donate):
    """β₂·H + (1-β₂)·Gram(G) of each block, and X_L G X_R, from the grid as from the stack of cut
    blocks; in float64, within a few roundings of the same sums. A donated NumPy statistic is
    written in place and stays the state's own array."""
    rng = np.random.default_rng(sum(shape) * block_size)
    g_np = rng.standard_normal(shape)
    g = to_xp(xp, g_np)
    plan = blocking.make_plan(shape, block_size)
    beta2 = 0.99
    for grid, stack, group in zip(blocking.block_grids(xp, g, plan), blocking.split_groups(xp, g, plan),
                                  plan.groups):
        dims = [d for d, pre in zip(group.block_shape, preconditioned) if pre]
        stats_np = [rng.standard_normal((group.num_blocks, d, d)) for d in dims]
        factors_np = [rng.standard_normal((group.num_blocks, d, d)) for d in dims]
        given_stats = [to_xp(xp, h) for h in stats_np]
        want = statistics.accumulate_weighted(xp, [to_xp(xp, h) for h in stats_np], stack, preconditioned, beta2,
                                              1.0 - beta2)
        got = statistics.accumulate_grid(xp, given_stats, grid, preconditioned, beta2, 1.0 - beta2, donate)
        for h, w, given, h_np in zip(got, want, given_stats, stats_np):
            assert tuple(h.shape) == tuple(w.shape)
            scale = np.abs(h_np) + np.abs(to_np(w))
            assert np.all(np.abs(to_np(h) - to_np(w)) <= (max(group.block_shape) + 4) * eps("float64") * (scale + 1.0))
            if donate and isinstance(given, np.ndarray):
                assert h is given  # written into the state's own array
        factors = [to_xp(xp, x) for x in factors_np]
        got = to_np(preconditioner.precondition_grid(xp, grid, factors, preconditioned))
        want = to_np(preconditioner.precondition_block(xp, stack, factors, preconditioned))
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())


@pytest.mark.parametrize("donate", [False, True])
@pytest.mark.parametrize("beta1, graft_type", [(0.9, "adagrad"), (0.0, "adagrad"), (0.9, "none"), (0.9, "adam")])
def test_numpy_steps_read_a_matrixs_blocks_where_they_lie(monkeypatch, donate, beta1, graft_type):
    """NumPy's steps take their matrices' blocks as grids (statistics and preconditioning, root
    steps among them) and update as the steps that cut the blocks: the same updates and state,
    up to the rounding of (1-β₂)·G Gᵀ against (√(1-β₂)·G)(√(1-β₂)·G)ᵀ, in float64."""
    rng = np.random.default_rng(11)
    params = {"w": rng.standard_normal((13, 10)), "t": rng.standard_normal((6, 40)), "b": rng.standard_normal(10),
              "k": rng.standard_normal((2, 2, 12))}
    grads = [{k: rng.standard_normal(v.shape) for k, v in params.items()} for _ in range(5)]
    grids = []
    real = blocking.block_grids
    monkeypatch.setattr(blocking, "block_grids", lambda *a, **k: grids.append(tuple(a[1].shape)) or real(*a, **k))

    def run():
        return _steps(params, grads, np.copy, beta1=beta1, graft_type=graft_type, donate_state=donate)

    on_grids, grid_state = run()
    assert set(grids) == {(13, 10), (6, 40), (2, 2, 12)}  # the last merges to (4, 12); the vector is cut
    grids.clear()
    monkeypatch.setattr(_xp, "takes_block_views", lambda xp: False)
    cut, cut_state = run()
    assert grids == []
    for got, want in zip(on_grids, cut):
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-9, atol=1e-12, err_msg=k)
    for s_grid, s_cut in zip(grid_state.params, cut_state.params):
        for b_grid, b_cut in zip(s_grid.blocks, s_cut.blocks):
            for h_grid, h_cut in zip(b_grid.statistics, b_cut.statistics):
                np.testing.assert_allclose(h_grid, h_cut, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("shape, block_size, skip", [(s, b, None) for s, b in MATRICES]
                         + [((6, 30), 4, 20), ((30, 6), 4, 20)])  # one-sided: a dim > skip has no statistic
@pytest.mark.parametrize("scale_kind", ["of the norm", "float"])
def test_preconditioned_blocks_merged_and_scaled(xp, shape, block_size, skip, scale_kind):
    """scale(‖P‖)·P in place of the parameter: the preconditioned blocks merged as
    ``merge_groups`` merges the cut stacks, the norm that of all of them (NumPy's fast path takes
    it a block row at a time), in float32 within a few roundings."""
    rng = np.random.default_rng(sum(shape) + block_size)
    f = to_xp(xp, rng.standard_normal(shape).astype(np.float32))
    plan = blocking.make_plan(shape, block_size, skip_preconditioning_dim_size_gt=skip)
    preconditioned = plan.preconditioned
    factors = [[to_xp(xp, rng.standard_normal((group.num_blocks, d, d)).astype(np.float32))
                for d, pre in zip(group.block_shape, preconditioned) if pre] for group in plan.groups]
    pre = [preconditioner.precondition_block(xp, stack, fs, preconditioned)
           for stack, fs in zip(blocking.split_groups(xp, f, plan), factors)]
    p_norm = float(np.sqrt(sum(np.sum(to_np(p).astype(np.float64) ** 2) for p in pre)))
    seen = []

    def scale(norm):
        seen.append(float(norm))
        return 0.5 / norm

    got = to_np(preconditioner.precondition_merged(xp, blocking.block_grids(xp, f, plan), factors, plan,
                                                   scale if scale_kind == "of the norm" else 0.25))
    merged = to_np(blocking.merge_groups(xp, pre, plan)).astype(np.float64)
    want = merged * (0.5 / p_norm if scale_kind == "of the norm" else 0.25)
    assert got.shape == shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=64 * eps("float32") * np.abs(want).max())
    if scale_kind == "of the norm":
        assert seen == [pytest.approx(p_norm, rel=64 * eps("float32"))]


def test_numpys_merged_preconditioning_is_the_separate_steps(monkeypatch):
    """NumPy's row-at-a-time fast path against the core's separate steps (its own fallback): the
    same products, the same merge, a norm summed in another order; a float64 scale promotes the
    float32 result, as the merge copy does."""
    rng = np.random.default_rng(2)
    shape, plan = (13, 10), blocking.make_plan((13, 10), 4)
    f = rng.standard_normal(shape).astype(np.float32)
    factors = [[rng.standard_normal((g.num_blocks, d, d)).astype(np.float32) for d in g.block_shape]
               for g in plan.groups]
    ns = _xp.namespace(f)
    run = lambda scale: preconditioner.precondition_merged(ns, blocking.block_grids(ns, f, plan), factors, plan, scale)
    fast = [run(lambda n: 0.5 / n), run(np.asarray(1.0 + 2.0**-40))]
    monkeypatch.delitem(_xp._FAST_PATHS, (ns.__name__, "precondition_merged"))
    separate = [run(lambda n: 0.5 / n), run(np.asarray(1.0 + 2.0**-40))]
    np.testing.assert_allclose(fast[0], separate[0], rtol=8 * eps("float32"), atol=0)
    assert fast[1].dtype == separate[1].dtype == np.float64
    np.testing.assert_array_equal(fast[1], separate[1])


def test_stacks_are_grids_by_a_reshape(xp):
    """The cut stacks of a ragged 2-D plan, reshaped, are the grids of the same blocks; plans of
    another order and stacks of another count are refused by name."""
    x_np = np.random.default_rng(4).standard_normal((13, 10))
    x = to_xp(xp, x_np)
    plan = blocking.make_plan((13, 10), 4)
    stacks = blocking.split_groups(xp, x, plan)
    for got, want in zip(blocking.stacks_as_grids(xp, stacks, plan), blocking.block_grids(xp, x, plan)):
        np.testing.assert_array_equal(to_np(got), to_np(want))
    with pytest.raises(ValueError, match=r"stacks: one per group of the plan \(4\); got 3"):
        blocking.stacks_as_grids(xp, stacks[:3], plan)
    cube = blocking.make_plan((4, 6, 70), 16)
    with pytest.raises(ValueError, match="plan: block grids need a 2-D merged shape"):
        blocking.stacks_as_grids(xp, blocking.split_groups(xp, to_xp(xp, np.zeros((4, 6, 70))), cube), cube)


@pytest.mark.parametrize("shape, block_size, skip", [((13, 10), 4, None), ((6, 30), 4, 20), ((30, 6), 4, 20)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torchs_merged_preconditioning_is_the_separate_steps(monkeypatch, shape, block_size, skip, dtype):
    """torch's row-at-a-time fast path against the core's separate steps (its own fallback), on
    cut stacks taken as grids and on strided grids of the parameter, one- and two-sided: the
    same products and merge, bit for bit under a fixed scale; a norm summed in another order."""
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(sum(shape))
    dt = getattr(torch, dtype)
    f = torch.randn(shape, generator=gen, dtype=dt)
    plan = blocking.make_plan(shape, block_size, skip_preconditioning_dim_size_gt=skip)
    factors = [[torch.randn((g.num_blocks, d, d), generator=gen, dtype=dt)
                for d, pre in zip(g.block_shape, plan.preconditioned) if pre] for g in plan.groups]
    ns = _xp.namespace(f)
    cut = blocking.stacks_as_grids(ns, blocking.split_groups(ns, f, plan), plan)

    def run(grids):
        return [preconditioner.precondition_merged(ns, grids, factors, plan, scale)
                for scale in (lambda n: 0.5 / n, 0.25)]

    fast = [run(cut), run(blocking.block_grids(ns, f, plan))]
    monkeypatch.delitem(_xp._FAST_PATHS, (ns.__name__, "precondition_merged"))
    separate = run(cut)
    for got in fast:
        assert got[0].dtype == dt and tuple(got[0].shape) == shape
        torch.testing.assert_close(got[0], separate[0], rtol=8 * eps(dtype), atol=0)
        torch.testing.assert_close(got[1], separate[1], rtol=0, atol=0)


def test_torchs_merged_preconditioning_declines_what_it_cannot_take():
    """Tensors autograd records, and factors of another dtype, go to the separate steps."""
    torch = pytest.importorskip("torch")
    import backends.torch_backend as tb

    plan = blocking.make_plan((8, 8), 4)
    f = torch.ones((8, 8))
    grids = blocking.block_grids(_xp.namespace(f), f, plan)
    factors = [[torch.eye(4).expand(4, 4, 4).contiguous()] * 2]
    assert tb.precondition_merged(grids, factors, plan, 1.0) is not NotImplemented
    assert tb.precondition_merged(grids, [[factors[0][0].double()] * 2], plan, 1.0) is NotImplemented
    recorded = [[factors[0][0].clone().requires_grad_()] * 2]
    assert tb.precondition_merged(grids, recorded, plan, 1.0) is NotImplemented


def _row_functions(library: str):
    """``(namespace, matmul, empty_like_of(dtype), squares)`` of a CPU fast path's row loop."""
    if library == "numpy":
        return np, np.matmul, lambda dt: (lambda shape: np.empty(shape, dtype=dt)), lambda r: float(np.vdot(r, r))
    torch = pytest.importorskip("torch")
    import backends.torch_backend as tb

    return torch, torch.matmul, lambda dt: (lambda shape: torch.empty(shape, dtype=dt)), tb._squares


@pytest.mark.parametrize("library", ["numpy", "torch"])
@pytest.mark.parametrize("shape, block_size, skip, in_place", [
    ((13, 8), 4, None, 2),     # two groups, both spanning every column
    ((13, 10), 4, None, 0),    # four groups, none spanning every column
    ((12, 10), 4, None, 0),
    ((6, 30), 4, 20, 2),       # one-sided, rows blocked: no scratch at all
    ((30, 6), 4, 20, 0),       # one-sided, columns blocked
])
def test_rows_of_groups_spanning_every_column_are_written_in_place(library, shape, block_size, skip, in_place):
    """The shared row loop writes a row's last product straight into the merged result where its
    group spans every column (one scratch buffer fewer per such group), and through scratch
    elsewhere: P has the bits of the separate steps either way, and the returned sum of squares
    is that of P."""
    lib, matmul, empty_of, squares = _row_functions(library)
    import backends

    rng = np.random.default_rng(sum(shape))
    plan = blocking.make_plan(shape, block_size, skip_preconditioning_dim_size_gt=skip)
    assert len(plan.merged_shape) == 2
    f = lib.asarray(rng.standard_normal(shape).astype(np.float32))
    factors = [[lib.asarray(rng.standard_normal((g.num_blocks, d, d)).astype(np.float32))
                for d, pre in zip(g.block_shape, plan.preconditioned) if pre] for g in plan.groups]
    ns = _xp.namespace(f)
    out = lib.empty(plan.merged_shape, dtype=f.dtype)
    allocated = []
    empty = empty_of(f.dtype)

    def counted(shape_):
        allocated.append(tuple(shape_))
        return empty(shape_)

    total = backends.precondition_rows(blocking.block_grids(ns, f, plan), factors, plan, out, matmul, counted,
                                       squares)
    per_group = [len(fs) for fs in factors]
    assert len(allocated) == sum(per_group) - in_place
    separate = [preconditioner.precondition_grid(ns, grid, fs, plan.preconditioned)
                for grid, fs in zip(blocking.block_grids(ns, f, plan), factors)]
    want = to_np(blocking.merge_groups(ns, separate, plan))
    np.testing.assert_array_equal(to_np(out), want)
    assert total == pytest.approx(float(np.sum(want.astype(np.float64) ** 2)), rel=64 * eps("float32"))


@pytest.mark.parametrize("donate", [False, True])
@pytest.mark.parametrize("beta1, graft_type", [(0.9, "adagrad"), (0.9, "none"), (0.0, "adam")])
def test_torch_steps_precondition_a_block_row_at_a_time(monkeypatch, donate, beta1, graft_type):
    """torch's layer-grafted (and plain) steps take the cut blocks of their 2-D-merged leaves as
    grids into the row-at-a-time preconditioning, and update as the separate steps do, in
    float64 up to the norm's order of summation."""
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(3)
    params = {"w": torch.randn((13, 10), generator=gen, dtype=torch.float64),
              "k": torch.randn((2, 2, 12), generator=gen, dtype=torch.float64),
              "b": torch.randn(10, generator=gen, dtype=torch.float64)}
    grads = [{k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in params.items()}
             for _ in range(4)]
    calls = []
    real = preconditioner.precondition_merged
    monkeypatch.setattr(preconditioner, "precondition_merged",
                        lambda *a, **k: calls.append(tuple(a[3].shape)) or real(*a, **k))

    def run():
        return _steps(params, grads, torch.clone, beta1=beta1, graft_type=graft_type, donate_state=donate)[0]

    merged = run()
    assert set(calls) == {(13, 10), (2, 2, 12)}
    ns = _xp.namespace(params["w"])
    monkeypatch.delitem(_xp._FAST_PATHS, (ns.__name__, "precondition_merged"))
    calls.clear()
    separate = run()
    assert calls == []
    for got, want in zip(merged, separate):
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-15, msg=k)
