"""optax ``GradientTransformation`` over the functional core.

``backends.optax_adapter.shampoo(...)`` takes the keywords of :func:`shampoo_core.shampoo` and
follows optax's conventions: ``update(updates, state, params)`` argument order, usable in
``optax.chain``, learning rates may be optax schedules, and ``update`` can be traced by
``jax.jit`` (root computation is gated by ``lax.cond``). The returned updates already include
``-learning_rate``: apply them with ``optax.apply_updates``.

``eva``, ``eva_s`` and ``kfac`` do the same for the Eva family and K-FAC/FOOF. They are
``optax.GradientTransformationExtraArgs``: the layer curvature is passed as the keyword
``curvature`` of ``update``, which ``optax.chain`` hands to every member that takes extra
arguments (``backends.jax_curvature.value_grads_and_curvature`` computes it).

Each factory has the signature of its core function, so ``optax.inject_hyperparams`` can wrap it.
Only ``learning_rate`` can be injected (it may be a traced array); every other hyperparameter fixes
the state's layout or its validation at construction, and must be named in ``static_args``::

    tx = optax.inject_hyperparams(optax_adapter.shampoo,
                                  static_args=optax_adapter.static_args(optax_adapter.shampoo))(
        learning_rate=1e-3, block_size=128)
    state.hyperparams["learning_rate"] = 3e-4   # read and change it between steps, as in optax
"""

from __future__ import annotations

import inspect

import array_api_compat
import optax

import shampoo_core as sc

from . import jax_backend  # noqa: F401  (registers lax.cond for traced updates)

__all__ = ["shampoo", "eva", "eva_s", "kfac", "static_args"]


def static_args(factory) -> tuple[str, ...]:
    """The hyperparameters of ``factory`` (one of this module's) other than ``learning_rate``: the
    ``static_args`` that ``optax.inject_hyperparams`` needs to wrap it."""
    return tuple(name for name in inspect.signature(factory).parameters if name != "learning_rate")


def _check_not_arrays(factory: str, hyperparameters: dict) -> None:
    """Only the learning rate may be an array; name the way out of ``optax.inject_hyperparams``."""
    for name, value in hyperparameters.items():
        if array_api_compat.is_array_api_obj(value):
            raise TypeError(
                f"{name} must be a Python value, not an array ({value.dtype}): only learning_rate can "
                "change after construction. optax.inject_hyperparams makes arrays of every numeric "
                f"argument, defaults included; pass it static_args=optax_adapter.static_args(optax_adapter.{factory})"
            )


def _with_signature(core, learning_rate):
    """Give an adapter factory ``core``'s signature, with its own learning-rate default and
    ``nonfinite="skip"`` (read by ``optax.inject_hyperparams``, which binds arguments by name)."""
    defaults = {"learning_rate": learning_rate, "nonfinite": "skip"}

    def wrap(factory):
        signature = inspect.signature(core)
        factory.__signature__ = signature.replace(
            parameters=[p.replace(default=defaults[p.name]) if p.name in defaults else p
                        for p in signature.parameters.values()],
            return_annotation=inspect.signature(factory).return_annotation,
        )
        return factory

    return wrap


@_with_signature(sc.shampoo, learning_rate=1e-3)
def shampoo(learning_rate=1e-3, **hyperparameters) -> optax.GradientTransformation:
    """Distributed Shampoo as an optax transformation; the keywords of :func:`shampoo_core.shampoo`.

    ``nonfinite`` defaults to ``"skip"`` here: ``"raise"`` cannot read traced gradients.
    ``learning_rate`` may also be a 0-d array, traced or not (``optax.inject_hyperparams``).

    Raises:
        ValueError / TypeError: invalid hyperparameters, naming the argument; TypeError for an
            array given for any hyperparameter but ``learning_rate``.
    """
    _check_not_arrays("shampoo", hyperparameters)
    hyperparameters.setdefault("nonfinite", "skip")
    tx = sc.shampoo(learning_rate, **hyperparameters)

    def init_fn(params):
        return tx.init(params)

    def update_fn(updates, state, params=None):
        return tx.update(state, updates, params)

    return optax.GradientTransformation(init_fn, update_fn)


def _extra_args(make, learning_rate, hyperparameters, takes_curvature: bool):
    """``make(learning_rate, nonfinite="skip" unless given, ...)`` with optax's argument order;
    other members' extra arguments, which optax.chain passes along, are dropped."""
    _check_not_arrays(make.__name__, hyperparameters)
    tx = make(learning_rate, **{"nonfinite": "skip", **hyperparameters})

    def update_fn(updates, state, params=None, *, curvature=None, **extra_args):
        del extra_args
        if takes_curvature:
            return tx.update(state, updates, params, curvature=curvature)
        return tx.update(state, updates, params)

    return optax.GradientTransformationExtraArgs(tx.init, update_fn)


@_with_signature(sc.eva, learning_rate=0.1)
def eva(learning_rate=0.1, **hyperparameters) -> optax.GradientTransformationExtraArgs:
    """:func:`shampoo_core.eva` (Eva, Eva-f, two-sided) as an optax transformation;
    ``update(updates, state, params, curvature=...)``. ``nonfinite`` defaults to ``"skip"``.

    Raises:
        ValueError / TypeError: invalid hyperparameters, naming the argument; TypeError for an
            array given for any hyperparameter but ``learning_rate``.
    """
    return _extra_args(sc.eva, learning_rate, hyperparameters, takes_curvature=True)


@_with_signature(sc.kfac, learning_rate=0.1)
def kfac(learning_rate=0.1, **hyperparameters) -> optax.GradientTransformationExtraArgs:
    """:func:`shampoo_core.kfac` (K-FAC, FOOF) as an optax transformation;
    ``update(updates, state, params, curvature=...)``. ``nonfinite`` defaults to ``"skip"``.

    Raises:
        ValueError / TypeError: invalid hyperparameters, naming the argument; TypeError for an
            array given for any hyperparameter but ``learning_rate``.
    """
    return _extra_args(sc.kfac, learning_rate, hyperparameters, takes_curvature=True)


@_with_signature(sc.eva_s, learning_rate=0.1)
def eva_s(learning_rate=0.1, **hyperparameters) -> optax.GradientTransformationExtraArgs:
    """:func:`shampoo_core.eva_s` (gradients only) as an optax transformation; a ``curvature``
    passed along by ``optax.chain`` for another member is ignored. ``nonfinite`` defaults to
    ``"skip"``.

    Raises:
        ValueError / TypeError: invalid hyperparameters, naming the argument; TypeError for an
            array given for any hyperparameter but ``learning_rate``.
    """
    return _extra_args(sc.eva_s, learning_rate, hyperparameters, takes_curvature=False)
