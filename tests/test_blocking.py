"""Reshaping and blocking: the merge rule and exact round trips."""

import math

import numpy as np
from hypothesis import given, strategies as st

from shampoo_core.blocking import make_plan, merge_blocks, merge_small_dims, split_blocks
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
    blocks = split_blocks(xp, x, plan)
    assert [tuple(b.shape) for b in blocks] == plan.block_shapes
    for b_shape in plan.block_shapes:
        for d, pre in zip(b_shape, plan.preconditioned):
            if pre:
                assert d <= block_size
    back = merge_blocks(xp, blocks, plan)
    assert tuple(back.shape) == shape
    np.testing.assert_array_equal(to_np(back), x_np)


def test_skipped_dim_is_not_split():
    plan = make_plan((5000, 100), 64, skip_preconditioning_dim_size_gt=4096)
    assert plan.preconditioned == (False, True)
    assert plan.block_shapes == [(5000, 64), (5000, 36)]
