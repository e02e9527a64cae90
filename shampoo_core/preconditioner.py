"""Applying Kronecker-factored preconditioners to a block (arXiv 2002.09018, Alg. 1).

For a matrix block, P = L^(-1/p) G R^(-1/p); for an order-k block, G is multiplied by one factor
along each preconditioned dimension (mode-i products), which is (⊗ᵢ Hᵢ^(-1/p)) vec(G).
"""

from __future__ import annotations

__all__ = ["precondition_block"]


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
        factors = iter(preconditioners)
        if preconditioned[0]:
            g = next(factors) @ g  # X_L is symmetric, so this is the mode-0 product
        if preconditioned[1]:
            g = g @ next(factors)
        return g
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
