"""Kronecker-factored gradient statistics (arXiv 2002.09018, Sec. 3; Gupta et al. 2018, Alg. 2).

For a block G of order k and each preconditioned dimension i, the statistic is the contraction of
G with itself over every other dimension: for a matrix, L = G Gᵀ (i = 0) and R = Gᵀ G (i = 1).
"""

from __future__ import annotations

import math

from . import _xp

__all__ = ["kronecker_factors", "statistics_weight", "accumulate_weighted", "accumulate_grid", "update_statistics"]


def kronecker_factors(xp, g, preconditioned: tuple[bool, ...]) -> list:
    """Per-dimension Gram matrices of each block of a stack.

    Args:
        g: a stack of blocks, shape ``(n, d_0, ..., d_{k-1})`` (leading axis: block), real
            floating dtype.
        preconditioned: which of the k block dims get a statistic.

    Returns:
        One ``(n, d_i, d_i)`` array per preconditioned dim, in the dtype of ``g``.
    """
    return [a @ b for a, b in _gram_operands(xp, g, preconditioned)]


def _gram_operands(xp, g, preconditioned: tuple[bool, ...]) -> list:
    """The ``(a, b)`` whose batched products ``a @ b`` are the Gram matrices of the stack ``g``,
    one pair per preconditioned dim: plain matmuls, so that BLAS sees a transposed operand (a
    symmetric product where the library detects it) instead of a transposed copy."""
    if g.ndim == 2:  # full-matrix AdaGrad on vectors: outer products, (n, d, 1) @ (n, 1, d)
        return [(g[:, :, None], g[:, None, :])] if preconditioned[0] else []
    if g.ndim == 3:
        return _matrix_gram_operands(g, preconditioned)
    out = []
    for i, pre in enumerate(preconditioned):
        if pre:
            # The mode-i unfolding of every block: its dim i first, the others flattened.
            unfolded = xp.reshape(xp.moveaxis(g, i + 1, 1), (g.shape[0], g.shape[i + 1], -1))
            out.append((unfolded, unfolded.mT))
    return out


def _matrix_gram_operands(g, preconditioned: tuple[bool, ...]) -> list:
    # 2-D blocks behind any batch axes: G Gᵀ and Gᵀ G
    pre0, pre1 = preconditioned
    return ([(g, g.mT)] if pre0 else []) + ([(g.mT, g)] if pre1 else [])


def statistics_weight(beta2: float) -> float:
    """√(1 - β₂), the factor folded into a block before its Gram matrices (1 for β₂ = 1)."""
    return 1.0 if beta2 == 1.0 else math.sqrt(1.0 - beta2)


def accumulate_weighted(xp, stats, weighted, preconditioned: tuple[bool, ...], beta2: float,
                        product_scale: float = 1.0, donate: bool = False) -> tuple:
    """β₂·H + s·Gram(weighted) per statistic, for ``weighted = statistics_weight(β₂)·G`` and
    s = ``product_scale`` = 1, or for ``weighted = G`` and s = 1 - β₂.

    β₂ = 1 gives H + Gram(G), AdaGrad's sum. Shampoo weights a whole parameter once and then cuts
    it into blocks, one pass instead of one small operation per block; where the library scales a
    matrix product as it writes it (:func:`_xp.product_takes_scale`: torch), the 2-D blocks of G
    go unweighted with s = 1 - β₂, and that pass is saved too. Each product and its average are
    one call where the library fuses them (:func:`_xp.gram_average`: the statistics are
    symmetric, and NumPy's and torch's CPU fast paths update one triangle with BLAS's ``syrk``).

    ``donate``: the caller gives ``stats`` up, and a library's in-place fast path may write the
    new statistics into them (``donate_state`` of :func:`shampoo_core.shampoo`).
    """
    return tuple(_xp.gram_average(xp, h, a, beta2, product_scale, donate)
                 for h, (a, _) in zip(stats, _gram_operands(xp, weighted, preconditioned)))


def accumulate_grid(xp, stats, grid, preconditioned: tuple[bool, ...], beta2: float, product_scale: float = 1.0,
                    donate: bool = False) -> tuple:
    """:func:`accumulate_weighted` for a group of 2-D blocks given as a grid
    (:func:`~shampoo_core.blocking.block_grids`): β₂·H + s·Gram(G) per statistic, each product
    made on the blocks where they lie in the parameter, not on a cut copy.

    Args:
        stats: the group's ``(n, d_i, d_i)`` statistics, n = c_0·c_1, blocks row-major over the
            grid.
        grid: ``(c_0, c_1, s_0, s_1)``, the dtype of ``stats``; unweighted (a view cannot carry
            the weight √(1 - β₂)), so ``product_scale`` is 1 - β₂ (1 for β₂ = 1).
        preconditioned: which of the two block dims get a statistic.

    Returns:
        The updated statistics, ``(n, d_i, d_i)`` each, in the order of ``stats``.
    """
    lead = tuple(grid.shape[:2])
    out = []
    for h, (a, _) in zip(stats, _matrix_gram_operands(grid, preconditioned)):
        on_grid = xp.reshape(h, lead + tuple(h.shape[1:]))
        new = _xp.gram_average(xp, on_grid, a, beta2, product_scale, donate)
        # written in place: the state keeps its own array, not a view of it
        out.append(h if new is on_grid else xp.reshape(new, tuple(h.shape)))
    return tuple(out)


def update_statistics(xp, stats, g, preconditioned: tuple[bool, ...], beta2: float) -> tuple:
    """Every statistic of the blocks ``g`` updated: β₂·H + (1 - β₂)·Gram(g) (Sec. 3, Alg. 1).

    The factor (1 - β₂) is folded into the block as √(1 - β₂)·g: one pass over the block instead
    of one over each statistic, which together hold Σ dᵢ² >= numel(g) entries.

    Args:
        stats: the ``(n, d_i, d_i)`` statistics of a stack of n blocks, one per preconditioned
            dim.
        g: the stack of blocks, shape ``(n, d_0, ..., d_{k-1})``, the dtype of ``stats``.

    Returns:
        The updated statistics, as a tuple in the order of ``stats``.
    """
    weight = statistics_weight(beta2)
    return accumulate_weighted(xp, stats, g if weight == 1.0 else g * weight, preconditioned, beta2)
