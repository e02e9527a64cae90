"""Hyperparameter enums and validation.

Every check raises ``ValueError`` (or ``TypeError`` for a wrong type) naming the argument, so a
bad configuration fails at construction and never reaches the state.
"""

from __future__ import annotations

import enum
import math
import numbers

import array_api_compat

from . import _xp

__all__ = [
    "GraftType",
    "GraftGranularity",
    "RootMethod",
    "parse_enum",
    "check_real",
    "check_int",
    "check_bool",
    "check_learning_rate",
    "check_injectable",
]


class GraftType(str, enum.Enum):
    """Optimizer whose per-layer (or per-block) update norm Shampoo's direction is grafted onto.

    Source: Agarwal et al., "Disentangling Adaptive Gradient Methods from Learning Rates";
    arXiv 2002.09018, Sec. 3.
    """

    NONE = "none"
    SGD = "sgd"
    ADAGRAD = "adagrad"
    RMSPROP = "rmsprop"
    ADAM = "adam"
    SQRT_N = "sqrt_n"


class GraftGranularity(str, enum.Enum):
    """Whether grafting norms are taken over a whole parameter ("layer") or each block."""

    LAYER = "layer"
    BLOCK = "block"


class RootMethod(str, enum.Enum):
    """Algorithm for the inverse p-th root of a statistic."""

    EIGH = "eigh"
    NEWTON = "newton"
    AUTO = "auto"  # per (backend, device kind, size, dtype) from a measured CostModel


def parse_enum(name: str, value, enum_type):
    """Convert ``value`` (an enum member or its string value) to ``enum_type``.

    Raises:
        ValueError: ``value`` is not one of the allowed names; the message names ``name``.
    """
    if isinstance(value, enum_type):
        return value
    allowed = ", ".join(repr(m.value) for m in enum_type)
    if isinstance(value, str):
        try:
            return enum_type(value.lower())
        except ValueError:
            pass
    raise ValueError(f"{name} must be one of {allowed}; got {value!r}")


def check_real(name, value, *, low=None, high=None, low_open=False, high_open=False) -> float:
    """Validate a real scalar hyperparameter within ``[low, high]`` (ends optionally open)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {type(value).__name__} {value!r}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        lo = "-inf" if low is None else repr(low)
        hi = "inf" if high is None else repr(high)
        interval = ("(" if low_open or low is None else "[") + f"{lo}, {hi}" + (
            ")" if high_open or high is None else "]"
        )
        raise ValueError(f"{name} must be in {interval}; got {value!r}")
    return value


def check_int(name, value, *, low=None) -> int:
    """Validate an integer hyperparameter ``>= low``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer; got {type(value).__name__} {value!r}")
    value = int(value)
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}; got {value}")
    return value


def check_bool(name, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {type(value).__name__} {value!r}")
    return value


def check_learning_rate(value):
    """A learning rate is a non-negative real number, a 0-d real array, or a callable
    ``count -> float`` (a schedule); see :func:`check_injectable`.

    Raises:
        TypeError: not a number, array or callable; an array of bool or complex dtype.
        ValueError: negative or NaN; an array that is not 0-d.
    """
    if callable(value):
        return value
    return check_injectable("learning_rate", value)


def check_injectable(name: str, value):
    """A non-negative real number, or a 0-d real array (a hyperparameter that may change after
    construction, such as the weight decay).

    A 0-d array is what ``optax.inject_hyperparams`` passes, traced under ``jax.jit``; it is
    checked like a number when its value can be read and kept as the array, so that a traced
    value never reaches the host.

    Raises:
        TypeError: not a number or array; an array of bool or complex dtype.
        ValueError: negative or NaN; an array that is not 0-d. Each message names ``name``.
    """
    if array_api_compat.is_array_api_obj(value):
        if tuple(value.shape) != ():
            raise ValueError(f"{name} must be a scalar (0-d array); got shape {tuple(value.shape)}")
        xp = array_api_compat.array_namespace(value)
        if not xp.isdtype(value.dtype, ("real floating", "signed integer", "unsigned integer")):
            raise TypeError(f"{name} must have a real dtype; got {_xp.dtype_name(value.dtype)}")
        concrete = _xp.concrete(value, float)
        if concrete is not None:  # a traced value cannot be read
            check_real(name, concrete, low=0.0)
        return value
    return check_real(name, value, low=0.0)
