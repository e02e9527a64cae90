"""JAX policy: register ``jax.lax.cond`` so traced updates compute roots only when due, and the
device kind of traced arrays.

Importing this module (the optax adapter does) makes ``shampoo_core`` gate its root computation
with ``lax.cond`` under ``jax.jit``; without it, traced updates compute the roots every step and
select them with ``where`` (same numbers, more work). It also tells ``root_method="auto"`` which
device a traced statistic will be computed on (JAX's default backend, where ``jit`` places
computations on uncommitted arguments); without it the cost model falls back to eigh under jit.
"""

from __future__ import annotations

import jax

from shampoo_core import _xp

__all__ = ["cond", "device_kind"]


def cond(pred, true_fn, false_fn, operand):
    return jax.lax.cond(pred, true_fn, false_fn, operand)


def device_kind(x) -> str:
    """``"cpu"``, ``"gpu"`` or ``"tpu"``: the platform of JAX's default backend."""
    del x  # a tracer carries no device; jit runs on the default backend
    return jax.default_backend()


_xp.register_cond("jax.numpy", cond)
_xp.register_device_kind("jax.numpy", device_kind)
