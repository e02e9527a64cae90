"""Applying Kronecker-factored preconditioners to a block (arXiv 2002.09018, Alg. 1).

For a matrix block, P = L^(-1/p) G R^(-1/p); for an order-k block, G is multiplied by one factor
along each preconditioned dimension (mode-i products), which is (⊗ᵢ Hᵢ^(-1/p)) vec(G).
"""

from __future__ import annotations

__all__ = ["precondition_block"]


def precondition_block(xp, g, preconditioners, preconditioned: tuple[bool, ...]):
    """Multiply block ``g`` by ``preconditioners`` along its preconditioned dimensions.

    Args:
        g: block of shape ``(d_0, ..., d_{k-1})``.
        preconditioners: symmetric ``(d_i, d_i)`` arrays, one per preconditioned dim, in order.
        preconditioned: which dims have a preconditioner.

    Returns:
        Array of the shape and dtype of ``g``.
    """
    if g.ndim == 1:
        return g @ preconditioners[0] if preconditioned[0] else g
    if g.ndim == 2:
        factors = iter(preconditioners)
        if preconditioned[0]:
            g = next(factors) @ g  # X_L is symmetric, so this is the mode-0 product
        if preconditioned[1]:
            g = g @ next(factors)
        return g
    factors = iter(preconditioners)
    # Contracting axis 0 each time moves the result's new axis to the end, so after k steps the
    # axes are back in their original order; unpreconditioned axes are just rotated.
    for pre in preconditioned:
        if pre:
            g = xp.tensordot(g, next(factors), axes=([0], [0]))
        else:
            g = xp.moveaxis(g, 0, -1)
    return g
