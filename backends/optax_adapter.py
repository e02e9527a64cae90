"""optax ``GradientTransformation`` over the functional core.

``backends.optax_adapter.shampoo(...)`` takes the keywords of :func:`shampoo_core.shampoo` and
follows optax's conventions: ``update(updates, state, params)`` argument order, usable in
``optax.chain``, learning rates may be optax schedules, and ``update`` can be traced by
``jax.jit`` (root computation is gated by ``lax.cond``). The returned updates already include
``-learning_rate``: apply them with ``optax.apply_updates``.
"""

from __future__ import annotations

import optax

import shampoo_core as sc

from . import jax_backend  # noqa: F401  (registers lax.cond for traced updates)

__all__ = ["shampoo"]


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
