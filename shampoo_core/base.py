"""The functional optimizer interface, modelled on optax's ``GradientTransformation``."""

from __future__ import annotations

from typing import Callable, NamedTuple

import array_api_compat

from . import _xp, tree

__all__ = [
    "GradientTransformation",
    "apply_updates",
    "count_and_learning_rate",
    "scalar_as",
    "readable",
    "may_be_positive",
    "weight_decay_for_update",
    "check_leaves",
    "check_leaf_count",
    "check_against_state",
    "record_hyperparameters",
    "check_devices",
    "zero_count",
]


class GradientTransformation(NamedTuple):
    """A pure optimizer: ``state = init(params)``; ``updates, state = update(state, grads, params)``.

    ``updates`` already carry the minus sign and the learning rate: apply them with
    :func:`apply_updates`. Neither function mutates its inputs.
    """

    init: Callable
    update: Callable


def apply_updates(params, updates):
    """``params + updates`` leaf by leaf, keeping each parameter's dtype.

    Raises:
        ValueError: ``updates`` does not have the structure of ``params``.
    """
    p_leaves, spec = tree.flatten(params)
    u_leaves = tree.check_same_structure("updates", updates, spec)
    out = []
    for p, u in zip(p_leaves, u_leaves):
        xp = _xp.namespace(p, u)
        out.append(p + xp.astype(u, p.dtype))
    return tree.unflatten(spec, out)


def count_and_learning_rate(learning_rate, count):
    """``(count, lr)`` for an update given the state's ``count`` of previous updates.

    ``count`` is a Python int when it can be read on the host, else the traced 0-d array
    (``jax.jit``); the learning rate (a constant, a 0-d array or a schedule evaluated on ``count``)
    is a Python float when it can be read, else the traced array, so that no traced update reads
    device values back.
    """
    concrete = _xp.concrete(count, int)
    if concrete is not None:
        count = concrete
    return count, readable(learning_rate(count) if callable(learning_rate) else learning_rate)


def readable(value):
    """A hyperparameter from :func:`~shampoo_core.options.check_injectable` as a Python float
    where its value can be read (a number, a concrete 0-d array), else the traced array."""
    concrete = _xp.concrete(value, float)
    return value if concrete is None else concrete


def may_be_positive(value) -> bool:
    """Whether a non-negative hyperparameter (after :func:`readable`) can be nonzero: a traced
    one can, so its term is computed (and multiplies by zero when it is zero)."""
    return not isinstance(value, float) or value > 0.0


def weight_decay_for_update(weight_decay, params):
    """The weight decay of one update, read once (:func:`readable`).

    Raises:
        ValueError: ``params`` is ``None`` while the weight decay may be positive (a traced one
            may be).
    """
    wd = readable(weight_decay)
    if params is None and may_be_positive(wd):
        raise ValueError("params are required when weight_decay > 0 (or an array)")
    return wd


def scalar_as(xp, value, dtype):
    """``value`` (a Python number, or a 0-d array such as a traced learning rate) in ``dtype``.

    An array keeps its own dtype in arithmetic: a float64 learning rate (``optax.inject_hyperparams``
    stores them in the widest parameter dtype) would turn float32 updates into float64.
    """
    if isinstance(value, (int, float)):
        return value
    return xp.astype(value, dtype)


def check_leaves(name: str, leaves, paths, reference=None) -> None:
    """Check every leaf is a real floating array, matching ``reference`` in shape and dtype.

    Raises:
        TypeError: a leaf is not a real floating array (integer, bool or complex).
        ValueError: a leaf's shape or dtype differs from the reference leaf at the same path.
    """
    for i, (leaf, path) in enumerate(zip(leaves, paths)):
        try:
            xp = _xp.namespace(leaf)
        except TypeError as err:
            raise TypeError(f"{name}{path} is not an array: {type(leaf).__name__}") from err
        if not _xp.is_real_floating(xp, leaf):
            raise TypeError(f"{name}{path} must have a real floating dtype; got {leaf.dtype}")
        if reference is not None:
            ref = reference[i]
            if tuple(leaf.shape) != tuple(ref.shape):
                raise ValueError(
                    f"{name}{path} has shape {tuple(leaf.shape)}; expected {tuple(ref.shape)}"
                )
            if leaf.dtype != ref.dtype:
                raise ValueError(f"{name}{path} has dtype {leaf.dtype}; expected {ref.dtype}")


def check_leaf_count(name: str, leaves, expected: int) -> None:
    """Raise ValueError unless there is one leaf per parameter the state was built for."""
    if len(leaves) != expected:
        raise ValueError(f"{name} has {len(leaves)} leaves but the optimizer state was built for {expected} parameters")


def check_against_state(grads, paths, expected, references, params=None, state_dtype=None) -> None:
    """Check grads (and params) against what ``init`` built the state for, before any of it is used.

    Without this check a float64 gradient would silently promote a float32 state, a gradient of
    another shape would fail deep inside in a broadcast with no leaf named, and one on another
    device would fail in the array library's own words, or not at all.

    Args:
        grads, paths: the flattened gradient leaves (already checked by :func:`check_leaves`,
            and their number by :func:`check_leaf_count`) and their paths; ``params``: the
            parameter leaves, or ``None``.
        expected: one ``(shape, dtype)`` per parameter the state was built for, read from its
            arrays; either may be ``None`` where the state does not determine it (a stateless
            SGD leaf has ``(None, None)``).
        references: one state array per parameter, on that parameter's device, or ``None``
            where the state holds none.
        state_dtype: ``fn(leaf) -> dtype`` of the state a leaf is kept in, for optimizers whose
            state dtype is not the parameter's (default: the leaf's own dtype).

    Raises:
        ValueError: a leaf of another shape, dtype or device, naming it.
    """
    for leaf, path, (shape, dtype) in zip(grads, paths, expected):
        if shape is not None and tuple(leaf.shape) != tuple(shape):
            raise ValueError(f"grads{path} has shape {tuple(leaf.shape)}; the state holds {tuple(shape)}")
        if dtype is None:
            continue
        held = leaf.dtype if state_dtype is None else state_dtype(leaf)
        if held != dtype:
            kept = "" if held == leaf.dtype else f", kept in {held}"
            raise ValueError(f"grads{path} has dtype {leaf.dtype}{kept}; the state holds {dtype}")
    check_devices("grads", grads, paths, references)
    if params is not None:
        check_devices("params", params, paths, references)


def zero_count(xp, device):
    """A 0-d int32 zero on ``device``: the initial value of every step and failure counter."""
    return xp.asarray(0, dtype=xp.int32, device=device)


def shape_and_dtype(array) -> tuple:
    """``(shape, dtype)`` of a state array with a parameter's shape, ``(None, None)`` for ``None``."""
    return (None, None) if array is None else (tuple(array.shape), array.dtype)


def record_hyperparameters(tx: GradientTransformation, optimizer: str, values: dict) -> GradientTransformation:
    """Attach JSON-able hyperparameters to ``tx.init`` (read by checkpoints to detect mismatches).

    Enums become their values; a learning-rate schedule is recorded as ``"<schedule>"``, a 0-d
    array as its float (``"<traced>"`` under ``jax.jit``).
    """
    record = {"optimizer": optimizer}
    for key, value in values.items():
        if callable(value):
            value = "<schedule>"
        elif array_api_compat.is_array_api_obj(value):
            concrete = _xp.concrete(value, float)
            value = "<traced>" if concrete is None else concrete
        elif hasattr(value, "value"):
            value = value.value
        record[key] = value
    tx.init.hyperparameters = record
    return tx


def check_devices(name: str, leaves, paths, reference) -> None:
    """Check each leaf lives on the device of the state array it will be combined with.

    Raises:
        ValueError: naming the leaf, its device and the state's device.
    """
    for leaf, path, ref in zip(leaves, paths, reference):
        if ref is None:
            continue
        got, want = _xp.placement(leaf), _xp.placement(ref)  # the devices, whatever the sharding
        if got is not None and want is not None and got != want:  # traced arrays have no device
            raise ValueError(f"{name}{path} is on device {got}; the optimizer state is on {want}")
