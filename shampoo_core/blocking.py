"""Reshaping and blocking of parameters (arXiv 2002.09018, Sec. 4, "Preconditioning of large layers").

A parameter of any rank is first reshaped by merging adjacent small dimensions (never into a
dimension larger than ``block_size``), then every preconditioned dimension larger than
``block_size`` is split into blocks of ``block_size`` (the last block may be smaller; no padding).
Dimensions larger than ``skip_preconditioning_dim_size_gt`` get no statistic and are not split.
Splitting and merging are exact inverses.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

__all__ = ["BlockPlan", "merge_small_dims", "make_plan", "split_blocks", "merge_blocks"]


def merge_small_dims(shape: tuple[int, ...], max_dim: int) -> tuple[int, ...]:
    """Merge adjacent dimensions while their product stays ``<= max_dim``.

    Size-1 dimensions disappear into a neighbour. A 0-d shape becomes ``(1,)``.
    Example: ``(1, 3, 3, 1024, 1024)`` with ``max_dim=1024`` -> ``(9, 1024, 1024)``;
    ``(64, 64)`` with ``max_dim=128`` stays ``(64, 64)`` (two-sided Shampoo is kept).
    """
    merged: list[int] = []
    for d in (d for d in shape if d != 1):
        if merged and merged[-1] * d <= max_dim:
            merged[-1] *= d
        else:
            merged.append(d)
    return tuple(merged) or (1,)


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """How one parameter is reshaped and blocked.

    Attributes:
        shape: original parameter shape.
        merged_shape: shape after merging small dims (what blocks are cut from).
        preconditioned: per merged dim, whether it gets a Kronecker statistic.
        bounds: per merged dim, the ``(start, stop)`` ranges of its blocks.
    """

    shape: tuple[int, ...]
    merged_shape: tuple[int, ...]
    preconditioned: tuple[bool, ...]
    bounds: tuple[tuple[tuple[int, int], ...], ...]

    @property
    def block_slices(self) -> list[tuple[slice, ...]]:
        """Index tuples of every block, row-major over the block grid."""
        per_dim = [[slice(a, b) for a, b in dim_bounds] for dim_bounds in self.bounds]
        return [tuple(s) for s in itertools.product(*per_dim)]

    @property
    def block_shapes(self) -> list[tuple[int, ...]]:
        per_dim = [[b - a for a, b in dim_bounds] for dim_bounds in self.bounds]
        return [tuple(s) for s in itertools.product(*per_dim)]

    @functools.cached_property
    def statistic_sizes(self) -> tuple[tuple[int, ...], ...]:
        """Per block, the sizes of its statistics (its preconditioned dims); ``()`` without any."""
        if not self.num_preconditioned:
            return ()
        return tuple(tuple(d for d, pre in zip(s, self.preconditioned) if pre) for s in self.block_shapes)

    @property
    def num_preconditioned(self) -> int:
        return sum(self.preconditioned)

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@functools.lru_cache(maxsize=4096)  # plans depend only on these arguments; updates ask every step
def make_plan(
    shape: tuple[int, ...],
    block_size: int,
    *,
    merge_small_dims_: bool = True,
    skip_preconditioning_dim_size_gt: int | None = None,
) -> BlockPlan:
    """Plan the reshape and blocks of a parameter of ``shape``.

    Args:
        shape: parameter shape (any rank, 0-d included).
        block_size: largest preconditioned block dimension (>= 1).
        merge_small_dims_: merge adjacent dims whose product is ``<= block_size``.
        skip_preconditioning_dim_size_gt: a merged dim larger than this gets no statistic
            (one-sided Shampoo) and is not split; ``None`` means no limit.
    """
    shape = tuple(int(d) for d in shape)
    if merge_small_dims_:
        merged = merge_small_dims(shape, block_size)
    else:
        merged = shape if shape else (1,)
    limit = math.inf if skip_preconditioning_dim_size_gt is None else skip_preconditioning_dim_size_gt
    # A size-1 dim carries no correlation to precondition; with merging off it is kept as is.
    preconditioned = tuple(1 < d <= limit or (d == 1 and len(merged) == 1) for d in merged)
    bounds = []
    for d, pre in zip(merged, preconditioned):
        step = block_size if pre else max(d, 1)
        bounds.append(tuple((a, min(a + step, d)) for a in range(0, max(d, 1), step)) if d else ((0, 0),))
    return BlockPlan(shape, merged, preconditioned, tuple(bounds))


def split_blocks(xp, x, plan: BlockPlan) -> list:
    """Reshape ``x`` (of ``plan.shape``) to ``plan.merged_shape`` and cut it into blocks."""
    merged = xp.reshape(x, plan.merged_shape)
    return [merged[s] for s in plan.block_slices]


def merge_blocks(xp, blocks, plan: BlockPlan):
    """Inverse of :func:`split_blocks`: concatenate the blocks and restore ``plan.shape``."""
    counts = [len(b) for b in plan.bounds]
    parts = list(blocks)
    # Concatenate along the last axis first, then fold the grid one axis at a time.
    for axis in reversed(range(len(counts))):
        n = counts[axis]
        parts = [xp.concat(parts[i : i + n], axis=axis) if n > 1 else parts[i] for i in range(0, len(parts), n)]
    (full,) = parts
    return xp.reshape(full, plan.shape)
