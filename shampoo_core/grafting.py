"""Grafting: Shampoo's direction with a first-order optimizer's step size.

Source: Agarwal, Anil, Hazan, Koren, Zhang, "Disentangling Adaptive Gradient Methods from Learning
Rates" (2020); arXiv 2002.09018, Sec. 3. The grafted update is P · ‖D‖ / max(‖P‖, 1e-16), with P
Shampoo's preconditioned gradient and D the grafting optimizer's direction, norms taken per layer
or per block.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from . import _elementwise, _xp
from .options import GraftType

__all__ = ["GraftState", "init_graft", "update_graft", "graft_direction", "graft_norm", "graft_block_norms",
           "direction_norm", "diagonal_terms", "DIAGONAL", "NORM_FLOOR"]

NORM_FLOOR = 1e-16

# the diagonal optimizers: an accumulator of g², and the direction f / (√acc + ε)
DIAGONAL = (GraftType.ADAGRAD, GraftType.RMSPROP, GraftType.ADAM)


class GraftState(NamedTuple):
    """Diagonal second-moment statistic of the grafting optimizer.

    ``accumulator`` has the parameter's shape and dtype: Σ g² (adagrad), an EMA of g² (rmsprop,
    adam), or ``None`` (none, sgd, sqrt_n have no state).
    """

    accumulator: object


def init_graft(xp, graft_type: GraftType, param, initial_accumulator_value: float = 0.0) -> GraftState:
    if graft_type in DIAGONAL:
        return GraftState(xp.zeros_like(param) + initial_accumulator_value)
    return GraftState(None)


def update_graft(graft_type: GraftType, state: GraftState, g, beta2: float, donate: bool = False,
                 gate=None) -> GraftState:
    """Add the raw gradient ``g`` to the grafting statistic; ``donate``: the accumulator may be
    overwritten; ``gate``: the traced verdict of ``nonfinite="skip"``, where False the
    accumulator keeps its values (:mod:`shampoo_core._elementwise`)."""
    if graft_type is GraftType.ADAGRAD:
        return GraftState(_elementwise.plus_square(state.accumulator, g, donate, gate))
    if graft_type in (GraftType.RMSPROP, GraftType.ADAM):
        return GraftState(_elementwise.ema(state.accumulator, g * g, beta2, donate, gate))
    return state


def graft_direction(xp, graft_type: GraftType, state: GraftState, f, *, epsilon: float, beta2: float, step,
                    f_scale=1.0):
    """The grafting optimizer's direction for the filtered gradient ``f_scale · f`` at ``step``
    (1-based, an int or 0-d array), as ``(d, scale)`` with direction = ``scale · d``.

    sgd/none: f; adagrad: f / (√Σg² + ε); rmsprop: f / (√v + ε); adam: f / (√(v / (1-β₂ᵗ)) + ε);
    sqrt_n: f rescaled to norm √numel (unit RMS per entry).

    Every direction is linear in ``f`` up to per-step scalars (``f_scale``, Adam's bias correction
    1/√(1-β₂ᵗ), sqrt_n's normalisation), which are returned in ``scale`` instead of applied: the
    caller multiplies by a scalar anyway (the learning rate, the grafted norm), so each saves a pass
    over the parameter. Adam's ε moves inside: f / (√(v/c) + ε) = √c · f / (√v + ε√c), c = 1-β₂ᵗ.

    Args:
        f: array of the parameter's shape; ``f_scale``: a float or 0-d array > 0.

    Returns:
        ``(d, scale)``: ``d`` of ``f``'s shape and dtype; ``scale`` a float or 0-d array.
    """
    if graft_type in (GraftType.NONE, GraftType.SGD):
        return f, f_scale
    if graft_type is GraftType.SQRT_N:  # f_scale > 0 cancels
        return f, math.sqrt(math.prod(f.shape)) / _xp.at_least(xp, _xp.norm(xp, f), NORM_FLOOR)
    eps, scale = diagonal_terms(graft_type, epsilon, beta2, step)
    return _elementwise.over_root_plus(xp, f, state.accumulator, eps), f_scale * scale


def direction_norm(xp, graft_type: GraftType, state: GraftState, f, *, epsilon: float, beta2: float, step,
                   f_scale=1.0):
    """The norm of :func:`graft_direction`'s direction over the whole of ``f``, without writing
    the direction (a layer's grafted norm is all that a preconditioned step needs of it).

    The diagonal optimizers' ‖f / (√acc + ε)‖ is one pass over ``f`` and the accumulator where a
    library computes it in cache-sized pieces (:func:`shampoo_core._elementwise.norm_over_root_plus`),
    against four for the direction and its norm. Same arguments as :func:`graft_direction`.

    Returns:
        A 0-d array of ``f``'s dtype (a float for sqrt_n: √numel).
    """
    if graft_type is GraftType.SQRT_N:
        return math.sqrt(math.prod(f.shape))
    if graft_type in (GraftType.NONE, GraftType.SGD):
        return f_scale * _xp.norm(xp, f)
    eps, scale = diagonal_terms(graft_type, epsilon, beta2, step)
    return (f_scale * scale) * _elementwise.norm_over_root_plus(xp, f, state.accumulator, eps)


def diagonal_terms(graft_type: GraftType, epsilon, beta2: float, step):
    """``(ε, scale)`` of a diagonal optimizer's direction scale · f / (√acc + ε) (adagrad,
    rmsprop, adam): Adam's bias correction c = 1 - β₂ᵗ enters as √c · f / (√acc + ε√c); AdaGrad
    and RMSProp have none. Python floats for an int ``step``, 0-d arrays for an array one."""
    if graft_type is GraftType.ADAM:
        root_c = (1.0 - beta2**step) ** 0.5
        return epsilon * root_c, root_c
    return epsilon, 1.0


def graft_norm(xp, graft_type: GraftType, d, scale):
    """Norm of the grafting direction ``scale · d`` over one grafting unit (a layer or a block)."""
    if graft_type is GraftType.SQRT_N:
        return math.sqrt(math.prod(d.shape))
    return scale * _xp.norm(xp, d)


def graft_block_norms(xp, graft_type: GraftType, d, scale):
    """Per block, the norm of the grafting direction ``scale · d[i]`` of a stack ``d`` of shape
    ``(n, ...)``: an ``(n,)`` array (a float for sqrt_n, the same for every block)."""
    if graft_type is GraftType.SQRT_N:
        return math.sqrt(math.prod(d.shape[1:]))
    return scale * _xp.block_norms(xp, d)
