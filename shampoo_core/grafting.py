"""Grafting: Shampoo's direction with a first-order optimizer's step size.

Source: Agarwal, Anil, Hazan, Koren, Zhang, "Disentangling Adaptive Gradient Methods from Learning
Rates" (2020); arXiv 2002.09018, Sec. 3. The grafted update is P · ‖D‖ / max(‖P‖, 1e-16), with P
Shampoo's preconditioned gradient and D the grafting optimizer's direction, norms taken per layer
or per block.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from .options import GraftType

__all__ = ["GraftState", "init_graft", "update_graft", "graft_direction", "graft_norm", "NORM_FLOOR"]

NORM_FLOOR = 1e-16


class GraftState(NamedTuple):
    """Diagonal second-moment statistic of the grafting optimizer.

    ``accumulator`` has the parameter's shape and dtype: Σ g² (adagrad), an EMA of g² (rmsprop,
    adam), or ``None`` (none, sgd, sqrt_n have no state).
    """

    accumulator: object


def init_graft(xp, graft_type: GraftType, param, initial_accumulator_value: float = 0.0) -> GraftState:
    if graft_type in (GraftType.ADAGRAD, GraftType.RMSPROP, GraftType.ADAM):
        return GraftState(xp.zeros_like(param) + initial_accumulator_value)
    return GraftState(None)


def update_graft(graft_type: GraftType, state: GraftState, g, beta2: float) -> GraftState:
    """Add the raw gradient ``g`` to the grafting statistic."""
    if graft_type is GraftType.ADAGRAD:
        return GraftState(state.accumulator + g * g)
    if graft_type in (GraftType.RMSPROP, GraftType.ADAM):
        return GraftState(beta2 * state.accumulator + (1.0 - beta2) * (g * g))
    return state


def graft_direction(xp, graft_type: GraftType, state: GraftState, f, *, epsilon: float, beta2: float, step: int):
    """The grafting optimizer's direction for filtered gradient ``f`` at ``step`` (1-based).

    sgd/none: f; adagrad: f / (√Σg² + ε); rmsprop: f / (√v + ε); adam: f / (√(v / (1-β₂ᵗ)) + ε);
    sqrt_n: f rescaled to norm √numel (unit RMS per entry).
    """
    if graft_type in (GraftType.NONE, GraftType.SGD):
        return f
    if graft_type is GraftType.SQRT_N:
        norm = xp.linalg.vector_norm(f)
        return f * (math.sqrt(math.prod(f.shape)) / xp.clip(norm, min=NORM_FLOOR))
    acc = state.accumulator
    if graft_type is GraftType.ADAM:
        acc = acc * (1.0 / (1.0 - beta2**step))
    return f / (xp.sqrt(acc) + epsilon)


def graft_norm(xp, graft_type: GraftType, d):
    """Norm of the grafting direction ``d`` over one grafting unit (a layer or a block)."""
    if graft_type is GraftType.SQRT_N:
        return math.sqrt(math.prod(d.shape))
    return xp.linalg.vector_norm(d)
