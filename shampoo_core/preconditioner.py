"""Applying Kronecker-factored preconditioners to a block (arXiv 2002.09018, Alg. 1).

For a matrix block, P = L^(-1/p) G R^(-1/p); for an order-k block, G is multiplied by one factor
along each preconditioned dimension (mode-i products), which is (⊗ᵢ Hᵢ^(-1/p)) vec(G).
"""

from __future__ import annotations

from . import _xp, blocking

__all__ = ["precondition_block", "precondition_grid", "precondition_merged"]


def precondition_block(xp, g, preconditioners, preconditioned: tuple[bool, ...]):
    """Multiply each block of a stack by its preconditioners along its preconditioned dims.

    Args:
        g: a stack of blocks, shape ``(n, d_0, ..., d_{k-1})`` (leading axis: block).
        preconditioners: symmetric ``(n, d_i, d_i)`` arrays, one per preconditioned dim, in order.
        preconditioned: which of the k block dims have a preconditioner.

    Returns:
        Array of the shape and dtype of ``g``.
    """
    if g.ndim == 2:
        return (g[:, None, :] @ preconditioners[0])[:, 0, :] if preconditioned[0] else g
    if g.ndim == 3:
        return _matrix_products(g, preconditioners, preconditioned)
    factors = iter(preconditioners)
    n, k = g.shape[0], g.ndim - 1
    # Moving block axis 0 to the end and multiplying it there each time leaves the block axes in
    # their original order after k steps; unpreconditioned axes are just rotated.
    for pre in preconditioned:
        g = xp.moveaxis(g, 1, -1)
        if pre:
            x = next(factors)
            g = g @ xp.reshape(x, (n,) + (1,) * (k - 2) + tuple(x.shape[1:]))
    return g


def _matrix_products(g, factors, preconditioned: tuple[bool, ...]):
    # 2-D blocks behind any batch axes, each factor with the same batch axes
    factors = iter(factors)
    if preconditioned[0]:
        g = next(factors) @ g  # X_L is symmetric, so this is the mode-0 product
    if preconditioned[1]:
        g = g @ next(factors)
    return g


def precondition_grid(xp, grid, preconditioners, preconditioned: tuple[bool, ...]):
    """:func:`precondition_block` for a group of 2-D blocks given as a grid
    (:func:`~shampoo_core.blocking.block_grids`), read where they lie in the parameter.

    Args:
        grid: ``(c_0, c_1, s_0, s_1)``, block ``[i, j]`` of the group's grid.
        preconditioners: ``(n, d_i, d_i)`` arrays (n = c_0·c_1, blocks row-major over the grid),
            one per preconditioned dim, in order; at least one.
        preconditioned: which of the two block dims have a preconditioner.

    Returns:
        The preconditioned blocks as a stack, ``(n, s_0, s_1)`` in the dtype of ``grid``: a new
        array, as :func:`precondition_block` returns for a stack of blocks.
    """
    lead = tuple(grid.shape[:2])
    factors = [xp.reshape(x, lead + tuple(x.shape[1:])) for x in preconditioners]
    out = _matrix_products(grid, factors, preconditioned)
    return xp.reshape(out, (lead[0] * lead[1],) + tuple(out.shape[2:]))


def precondition_merged(xp, grids, preconditioners, plan, scale):
    """A 2-D-merged parameter's preconditioned blocks back in place, times a scale that may
    depend on their norm: the layer-grafted update (or plain Shampoo's) of
    :func:`precondition_grid` and ``blocking.merge_groups`` together.

    A library's fast path (``_xp.register_fast_path``, ``"precondition_merged"``) may run it a
    block row at a time, taking each row's norm while its products are in cache and writing
    them straight into the merged result, which it then scales in place: NumPy's and torch's on
    the CPU (``backends.numpy_backend``, ``backends.torch_backend``), where the separate steps
    write and read the products and the first products in between from memory
    (docs/performance.md, "Preconditioned, normed and merged a block row at a time"). Cut
    stacks take it as grids too (``blocking.stacks_as_grids``).

    Args:
        grids: per group of ``plan.groups``, the ``(c_0, c_1, s_0, s_1)`` grid of the filtered
            gradient's blocks (``blocking.block_grids``).
        preconditioners: per group, its ``(n, d_i, d_i)`` preconditioners, one per
            preconditioned dim.
        plan: the parameter's ``blocking.BlockPlan`` (2-D merged shape).
        scale: the factor of the result: a float or 0-d array, or a function of ‖P‖ (the 2-norm
            of all the preconditioned blocks, a 0-d array of the grids' dtype) that returns it.

    Returns:
        An array of ``plan.shape``: scale · P, in the dtype of ``P * scale``.
    """
    fast = _xp.fast_path(xp, "precondition_merged")
    if fast is not None:
        out = fast(grids, preconditioners, plan, scale)
        if out is not NotImplemented:
            return out
    pre = [precondition_grid(xp, g, factors, plan.preconditioned) for g, factors in zip(grids, preconditioners)]
    factor = scale(_xp.joint_norm(xp, pre)) if callable(scale) else scale
    return blocking.merge_groups(xp, pre, plan, factor)  # scaled in the merge copy
