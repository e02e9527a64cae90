"""Full-matrix AdaGrad (Duchi, Hazan, Singer 2011), the reference Shampoo approximates.

W ← W - lr (εI + Σₛ gₛgₛᵀ)^(-1/2) g_t with g = vec(G) row-major. Memory O(n²) and an O(n³) root
per step: for small parameters only (tests, demos); ``max_size`` guards against misuse.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from . import _xp, roots, tree
from .base import (GradientTransformation, check_against_state, check_leaf_count, check_leaves,
                   count_and_learning_rate, record_hyperparameters, zero_count)
from .options import check_int, check_learning_rate, check_real

__all__ = ["full_matrix_adagrad", "FullMatrixState"]


class FullMatrixState(NamedTuple):
    """``count``: 0-d int32; ``statistics``: one ``(n, n)`` Σ g gᵀ per leaf (n = leaf size)."""

    count: object
    statistics: tuple


def full_matrix_adagrad(learning_rate=1e-2, *, epsilon: float = 1e-6, max_size: int = 4096):
    """Full-matrix AdaGrad with absolute ridge ``epsilon``; roots by float64 eigendecomposition.

    Raises:
        ValueError: a parameter has more than ``max_size`` entries (at ``init``), or bad arguments.
    """
    learning_rate = check_learning_rate(learning_rate)
    epsilon = check_real("epsilon", epsilon, low=0.0)
    max_size = check_int("max_size", max_size, low=1)

    def init(params):
        leaves, _ = tree.flatten(params)
        paths = tree.leaf_paths(params)
        check_leaves("params", leaves, paths)
        stats = []
        for p, path in zip(leaves, paths):
            n = math.prod(p.shape)
            if n > max_size:
                raise ValueError(f"params{path} has {n} entries; full_matrix_adagrad allows max_size={max_size}")
            xp = _xp.namespace(p)
            stats.append(xp.zeros((n, n), dtype=p.dtype, device=_xp.placement(p)))
        xp = _xp.namespace(*leaves)
        return FullMatrixState(zero_count(xp, _xp.placement(leaves[0])), tuple(stats))

    def update(state, grads, params=None):
        leaves, spec = tree.flatten(grads)
        paths = tree.leaf_paths(grads)
        check_leaf_count("grads", leaves, len(state.statistics))
        check_leaves("grads", leaves, paths)
        check_against_state(leaves, paths, [(None, h.dtype) for h in state.statistics], state.statistics)
        for g, h, path in zip(leaves, state.statistics, paths):
            if math.prod(g.shape) != h.shape[0]:
                raise ValueError(
                    f"grads{path} has {math.prod(g.shape)} entries; the state holds a statistic for {h.shape[0]}"
                )
        _, lr = count_and_learning_rate(learning_rate, int(state.count))
        updates, stats = [], []
        for g, h in zip(leaves, state.statistics):
            xp = _xp.namespace(g)
            v = xp.reshape(g, (-1,))
            h = h + v[:, None] * v[None, :]
            root = roots.inverse_pth_root(h, 2, epsilon=epsilon, relative_epsilon=False, dtype=xp.float64
                                          if _xp.supports_float64(xp, _xp.device_of(g)) else None).root
            updates.append(xp.reshape((-lr) * (root @ v), g.shape))
            stats.append(h)
        return tree.unflatten(spec, updates), FullMatrixState(state.count + 1, tuple(stats))

    return record_hyperparameters(
        GradientTransformation(init, update), "full_matrix_adagrad",
        dict(learning_rate=learning_rate, epsilon=epsilon, max_size=max_size),
    )
