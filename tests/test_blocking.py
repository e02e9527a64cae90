"""Reshaping and blocking: the merge rule and exact round trips."""

import math

import numpy as np
from hypothesis import given, strategies as st

from shampoo_core.blocking import make_plan, merge_groups, merge_small_dims, split_groups
from helpers import to_np, to_xp

shapes = st.lists(st.integers(0, 9), min_size=0, max_size=5).map(tuple)


def test_merge_examples():
    assert merge_small_dims((1, 3, 3, 1024, 1024), 1024) == (9, 1024, 1024)
    # A fixed merge threshold above 4096 would turn this matrix into a vector.
    assert merge_small_dims((64, 64), 128) == (64, 64)
    assert merge_small_dims((2000, 1, 2000), 128) == (2000, 2000)
    assert merge_small_dims((), 8) == (1,)
    assert merge_small_dims((1, 1), 8) == (1,)


@given(shape=st.lists(st.integers(1, 300), max_size=6).map(tuple), block_size=st.integers(1, 512))
def test_merge_never_exceeds_block_size(shape, block_size):
    merged = merge_small_dims(shape, block_size)
    assert math.prod(merged) == math.prod(shape)
    for d in merged:
        # A merged dim is either an original dim or a product <= block_size.
        assert d <= block_size or d in shape


@given(shape=shapes, block_size=st.integers(1, 7), merge=st.booleans(), skip=st.one_of(st.none(), st.integers(0, 8)))
def test_split_merge_round_trip(xp, shape, block_size, merge, skip):
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal(shape)
    x = to_xp(xp, x_np)
    plan = make_plan(shape, block_size, merge_small_dims_=merge, skip_preconditioning_dim_size_gt=skip)
    stacks = split_groups(xp, x, plan)
    merged = x_np.reshape(plan.merged_shape)
    # Every block of the grid lies in exactly one group, at its row-major place in the group's grid.
    seen = 0
    for group, stack in zip(plan.groups, stacks):
        assert tuple(stack.shape) == (group.num_blocks,) + group.block_shape
        for d, pre in zip(group.block_shape, plan.preconditioned):
            assert d <= block_size or not pre
        for i, index in enumerate(np.ndindex(*group.counts)):
            where = tuple(slice(r.start + j * d, r.start + (j + 1) * d)
                          for r, j, d in zip(group.region, index, group.block_shape))
            np.testing.assert_array_equal(to_np(stack)[i], merged[where])
            seen += 1
    assert seen == len(plan.block_shapes)
    back = merge_groups(xp, stacks, plan)
    assert tuple(back.shape) == shape
    np.testing.assert_array_equal(to_np(back), x_np)
    # A scale joins the split and the merge (a power of two: exact).
    for half, stack in zip(split_groups(xp, x, plan, 0.5), stacks):
        np.testing.assert_array_equal(to_np(half), 0.5 * to_np(stack))
    np.testing.assert_array_equal(to_np(merge_groups(xp, stacks, plan, 0.5)), 0.5 * x_np)
    # Per-block scales (per-block grafting) join the merge too: each block times its own entry,
    # the same bits as scaling the stacks first.
    scales = [to_xp(xp, 2.0 ** rng.integers(-3, 4, group.num_blocks)) for group in plan.groups]
    expected = merge_groups(xp, [to_xp(xp, to_np(stack) * to_np(s).reshape((-1,) + (1,) * (stack.ndim - 1)))
                                 for stack, s in zip(stacks, scales)], plan)
    np.testing.assert_array_equal(to_np(merge_groups(xp, stacks, plan, block_scales=scales)), to_np(expected))
    np.testing.assert_array_equal(to_np(merge_groups(xp, stacks, plan, 0.5, block_scales=scales)),
                                  0.5 * to_np(expected))


def test_groups_of_a_ragged_grid():
    plan = make_plan((300, 200), 128)
    assert [(g.counts, g.block_shape) for g in plan.groups] == [
        ((2, 1), (128, 128)), ((2, 1), (128, 72)), ((1, 1), (44, 128)), ((1, 1), (44, 72))]
    assert plan.group_statistic_sizes == ((2, (128, 128)), (2, (128, 72)), (1, (44, 128)), (1, (44, 72)))


def test_skipped_dim_is_not_split():
    plan = make_plan((5000, 100), 64, skip_preconditioning_dim_size_gt=4096)
    assert plan.preconditioned == (False, True)
    assert plan.block_shapes == [(5000, 64), (5000, 36)]
