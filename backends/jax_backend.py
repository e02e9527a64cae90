"""JAX policy: register ``jax.lax.cond`` so traced updates compute roots only when due.

Importing this module (the optax adapter does) makes ``shampoo_core`` gate its root computation
with ``lax.cond`` under ``jax.jit``; without it, traced updates compute the roots every step and
select them with ``where`` (same numbers, more work).
"""

from __future__ import annotations

import jax

from shampoo_core import _xp

__all__ = ["cond"]


def cond(pred, true_fn, false_fn, operand):
    return jax.lax.cond(pred, true_fn, false_fn, operand)


_xp.register_cond("jax.numpy", cond)
