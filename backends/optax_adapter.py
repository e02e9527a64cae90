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
"""

from __future__ import annotations

import optax

import shampoo_core as sc

from . import jax_backend  # noqa: F401  (registers lax.cond for traced updates)

__all__ = ["shampoo", "eva", "eva_s", "kfac"]


def shampoo(learning_rate=1e-3, **hyperparameters) -> optax.GradientTransformation:
    """Distributed Shampoo as an optax transformation.

    ``nonfinite`` defaults to ``"skip"`` here: ``"raise"`` cannot read traced gradients.

    Raises:
        ValueError / TypeError: invalid hyperparameters, naming the argument.
    """
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
    tx = make(learning_rate, **{"nonfinite": "skip", **hyperparameters})

    def update_fn(updates, state, params=None, *, curvature=None, **extra_args):
        del extra_args
        if takes_curvature:
            return tx.update(state, updates, params, curvature=curvature)
        return tx.update(state, updates, params)

    return optax.GradientTransformationExtraArgs(tx.init, update_fn)


def eva(learning_rate=0.1, **hyperparameters) -> optax.GradientTransformationExtraArgs:
    """:func:`shampoo_core.eva` (Eva, Eva-f, two-sided) as an optax transformation;
    ``update(updates, state, params, curvature=...)``. ``nonfinite`` defaults to ``"skip"``.

    Raises:
        ValueError / TypeError: invalid hyperparameters, naming the argument.
    """
    return _extra_args(sc.eva, learning_rate, hyperparameters, takes_curvature=True)


def kfac(learning_rate=0.1, **hyperparameters) -> optax.GradientTransformationExtraArgs:
    """:func:`shampoo_core.kfac` (K-FAC, FOOF) as an optax transformation;
    ``update(updates, state, params, curvature=...)``. ``nonfinite`` defaults to ``"skip"``.

    Raises:
        ValueError / TypeError: invalid hyperparameters, naming the argument.
    """
    return _extra_args(sc.kfac, learning_rate, hyperparameters, takes_curvature=True)


def eva_s(learning_rate=0.1, **hyperparameters) -> optax.GradientTransformationExtraArgs:
    """:func:`shampoo_core.eva_s` (gradients only) as an optax transformation; a ``curvature``
    passed along by ``optax.chain`` for another member is ignored. ``nonfinite`` defaults to
    ``"skip"``.

    Raises:
        ValueError / TypeError: invalid hyperparameters, naming the argument.
    """
    return _extra_args(sc.eva_s, learning_rate, hyperparameters, takes_curvature=False)
