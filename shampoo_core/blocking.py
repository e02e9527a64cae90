"""Reshaping and blocking of parameters (arXiv 2002.09018, Sec. 4, "Preconditioning of large layers").

A parameter of any rank is first reshaped by merging adjacent small dimensions (never into a
dimension larger than ``block_size``), then every preconditioned dimension larger than
``block_size`` is split into blocks of ``block_size`` (the last block may be smaller; no padding).
Dimensions larger than ``skip_preconditioning_dim_size_gt`` get no statistic and are not split.

Blocks of equal shape are kept stacked: the grid of blocks is at most 2^k regular sub-grids, one
per choice of full or last block along each of the k dims, and each is one array with a leading
block axis (:class:`BlockGroup`). Every step then runs one batched operation per group where a
list of blocks would run one per block: the product's work is the same, but a step of 753 blocks
compiles under ``jax.jit`` in seconds instead of minutes, and an accelerator launches a kernel per
group, not per block. Splitting and merging are exact inverses.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

from . import _elementwise, _xp

__all__ = ["BlockPlan", "BlockGroup", "merge_small_dims", "make_plan", "split_groups", "block_grids",
           "stacks_as_grids", "merge_groups", "ema_plus_square_norm_split"]


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
class BlockGroup:
    """A regular sub-grid of equal-shaped blocks of the merged parameter.

    Attributes:
        region: per merged dim, the slice of the merged parameter the group covers.
        counts: per merged dim, how many blocks the group has along it.
        block_shape: the shape of each of its blocks.
    """

    region: tuple[slice, ...]
    counts: tuple[int, ...]
    block_shape: tuple[int, ...]

    @property
    def num_blocks(self) -> int:
        return math.prod(self.counts)


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
    def groups(self) -> tuple[BlockGroup, ...]:
        """The blocks as regular sub-grids of equal shape, row-major over the grid of parts (per
        dim: the full blocks, then a smaller last one if any)."""
        per_dim = []
        for dim_bounds in self.bounds:
            parts: list[list[int]] = []  # [start, count, size]
            for a, b in dim_bounds:
                if parts and parts[-1][2] == b - a:
                    parts[-1][1] += 1
                else:
                    parts.append([a, 1, b - a])
            per_dim.append(parts)
        return tuple(
            BlockGroup(tuple(slice(a, a + c * d) for a, c, d in combo), tuple(c for _, c, _ in combo),
                       tuple(d for _, _, d in combo))
            for combo in itertools.product(*per_dim)
        )

    @functools.cached_property
    def group_grid(self) -> tuple[int, ...]:
        """Per merged dim, how many groups lie along it (1, or 2 with a smaller last block)."""
        return tuple(len({g.region[axis].start for g in self.groups}) for axis in range(len(self.merged_shape)))

    @functools.cached_property
    def group_statistic_sizes(self) -> tuple[tuple[int, tuple[int, ...]], ...]:
        """Per group, ``(number of blocks, sizes of each block's statistics)``; ``()`` without any
        preconditioned dim."""
        if not self.num_preconditioned:
            return ()
        return tuple((g.num_blocks, tuple(d for d, pre in zip(g.block_shape, self.preconditioned) if pre))
                     for g in self.groups)

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


def _interleaved(k: int) -> tuple[int, ...]:
    """The axes ``(c_0, s_0, c_1, s_1, ...)`` of a region reshaped to counts and sizes, ordered
    ``(c_0, c_1, ..., s_0, s_1, ...)``."""
    return tuple(range(0, 2 * k, 2)) + tuple(range(1, 2 * k, 2))


def split_groups(xp, x, plan: BlockPlan, scale=None) -> list:
    """``x`` (of ``plan.shape``) as one ``(num_blocks, *block_shape)`` array per group of
    ``plan.groups``, blocks row-major over the group's grid.

    A group of one block is a reshape (a view where the library has views); a larger group is
    one copy into block-major order, so that every block is a contiguous matrix for BLAS.
    ``scale`` (a float or a 0-d array of ``x``'s namespace), if given, multiplies the blocks in
    that copy (``_elementwise.scaled_copy``, which also makes a one-block group of a ragged grid
    contiguous) instead of in a pass of its own.
    """
    out = []
    for group, region in zip(plan.groups, _regions(xp, x, plan)):
        if group.num_blocks > 1:
            region = _grid(xp, region, group)
        if scale is not None:
            region = _elementwise.scaled_copy(region, scale)
        out.append(xp.reshape(region, (group.num_blocks,) + group.block_shape))
    return out


def block_grids(xp, x, plan: BlockPlan) -> list:
    """``x`` (of ``plan.shape``, whose merged shape is 2-D) as one ``(c_0, c_1, s_0, s_1)`` array
    per group of ``plan.groups``: ``[i, j]`` is the group's block in block row i and block column
    j, so that row-major over ``(i, j)`` the blocks are those of :func:`split_groups`.

    No copy where the library has views (NumPy: a view of ``x`` whose blocks' rows lie ``x``'s
    row length apart). For libraries whose matrix products take such batches of strided blocks
    as they are (:func:`~shampoo_core._xp.takes_block_views`): the statistics and the
    preconditioning then read the parameter's blocks where they lie, and the step does not cut
    them out first (docs/performance.md, "Blocks read where they lie").

    Raises:
        ValueError: ``plan``'s merged shape is not 2-D.
    """
    if len(plan.merged_shape) != 2:
        raise ValueError(f"plan: block grids need a 2-D merged shape; got {plan.merged_shape}")
    return [_grid(xp, region, group) for group, region in zip(plan.groups, _regions(xp, x, plan))]


def stacks_as_grids(xp, stacks, plan: BlockPlan) -> list:
    """:func:`split_groups`' stacks of a plan whose merged shape is 2-D as :func:`block_grids`'
    ``(c_0, c_1, s_0, s_1)`` grids: reshapes (views where the library has views), since a
    stack holds its group's blocks row-major over the grid.

    Raises:
        ValueError: ``plan``'s merged shape is not 2-D, or ``stacks`` does not hold one stack per
            group of ``plan.groups``.
    """
    if len(plan.merged_shape) != 2:
        raise ValueError(f"plan: block grids need a 2-D merged shape; got {plan.merged_shape}")
    if len(stacks) != len(plan.groups):
        raise ValueError(f"stacks: one per group of the plan ({len(plan.groups)}); got {len(stacks)}")
    return [xp.reshape(stack, group.counts + group.block_shape) for group, stack in zip(plan.groups, stacks)]


def _regions(xp, x, plan: BlockPlan) -> list:
    """The part of ``x``, reshaped to ``plan.merged_shape``, that each group covers."""
    merged = xp.reshape(x, plan.merged_shape)
    if len(plan.groups) == 1:
        return [merged]
    return [merged[group.region] for group in plan.groups]


def _grid(xp, region, group: BlockGroup):
    """A group's region as ``(c_0, ..., c_{k-1}, s_0, ..., s_{k-1})``: block indices, then the
    block's own axes (a view where the library has views)."""
    region = xp.reshape(region, tuple(v for c, d in zip(group.counts, group.block_shape) for v in (c, d)))
    return xp.permute_dims(region, _interleaved(len(group.counts)))


def ema_plus_square_norm_split(xp, m, acc, g, plan: BlockPlan, beta: float, epsilon, weight=None,
                               donate: bool = False, beta2: float | None = None, nesterov=None):
    """:func:`~shampoo_core._elementwise.ema_plus_square_norm` of ``m``, ``acc`` and ``g``, and the
    two cuts a preconditioned step makes next: g (times ``weight``) for the statistics and the
    filtered gradient F (the new first moment, or Nesterov's) for the preconditioning, as
    :func:`split_groups` cuts them.

    Separately the cuts read g and F from memory again after the one pass has read and written
    them; a library's fast path may cut each row while the pass has it in cache
    (``backends.fused_cpu``, where numba is installed: NumPy arrays and torch CPU tensors whose
    merged shape is 2-D with more than one block along its columns, where a cut is a copy and
    not a view). The values are those of the separate calls, bit for bit.

    Args:
        m, acc, g: arrays of ``plan.shape`` and one real floating dtype, ``acc >= 0``.
        plan: the parameter's :class:`BlockPlan`.
        beta: a float in [0, 1] (β₁); epsilon: ``ema_plus_square_norm``'s ε.
        weight: ``None``, or a float multiplying g's blocks (``split_groups``' ``scale``).
        donate: ``m`` and ``acc`` may be overwritten (``ema_plus_square_norm``'s ``donate``).
        beta2: ``None`` (AdaGrad's sum) or the accumulator's β₂ (``ema_plus_square_norm``'s).
        nesterov: ``None`` (F = m'), or Nesterov's ``(c₁, c₂)`` (``ema_plus_square_norm``'s).

    Returns:
        ``(m', acc', norm, g_blocks, f_blocks)``: ``ema_plus_square_norm``'s three results, then
        ``split_groups(g, plan, weight)`` and ``split_groups(F, plan)``.
    """
    out = _xp.fast_value("ema_plus_square_norm_split", m, acc, g, plan, beta, epsilon, weight, beta2, nesterov,
                         donate=donate)
    if out is not NotImplemented:
        return out
    new_m, new_acc, norm, f = _elementwise.ema_plus_square_norm_with_f(xp, m, acc, g, beta, epsilon, donate, beta2,
                                                                         nesterov)
    return new_m, new_acc, norm, split_groups(xp, g, plan, weight), split_groups(xp, f, plan)


def merge_groups(xp, stacks, plan: BlockPlan, scale=None, block_scales=None):
    """Inverse of :func:`split_groups`: the blocks back in place, in ``plan.shape``.

    ``scale`` (a float or a 0-d array of the stacks' namespace), if given, multiplies the result
    in the pass that reorders each group's blocks (``_elementwise.scaled_copy``), not in a pass
    of its own; the result has the dtype of ``stack * scale``. ``block_scales``, if given, holds
    one ``(num_blocks,)`` array per group (of the stacks' dtype and namespace) and multiplies each
    block by its entry (times ``scale``, if given) in that same pass: per-block grafting.
    """
    if block_scales is None:
        block_scales = (None,) * len(plan.groups)
    regions = []
    for group, stack, per_block in zip(plan.groups, stacks, block_scales):
        k = len(group.counts)
        full = tuple(c * d for c, d in zip(group.counts, group.block_shape))
        factor = scale
        if per_block is not None:
            # one entry per block, broadcast over the block's own axes of the reordered stack:
            # (c_0, 1, c_1, 1, ...), or (1, 1, ...) for a group of one block left as (1, *block_shape)
            shape = tuple(v for c in group.counts for v in (c, 1)) if group.num_blocks > 1 else (1,) * (k + 1)
            factor = xp.reshape(per_block if scale is None else scale * per_block, shape)
        if group.num_blocks > 1:
            stack = xp.reshape(stack, group.counts + group.block_shape)
            # (c_0, ..., c_{k-1}, s_0, ..., s_{k-1}) back to (c_0, s_0, c_1, s_1, ...)
            stack = xp.permute_dims(stack, tuple(v for i in range(k) for v in (i, k + i)))
        if factor is not None:
            stack = _elementwise.scaled_copy(stack, factor)
        regions.append(xp.reshape(stack, full))
    counts = plan.group_grid
    for axis in reversed(range(len(counts))):
        n = counts[axis]
        regions = [xp.concat(regions[i : i + n], axis=axis) if n > 1 else regions[i]
                   for i in range(0, len(regions), n)]
    (full,) = regions
    return xp.reshape(full, plan.shape)
