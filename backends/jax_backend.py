"""JAX policy: register ``jax.lax.cond`` so traced updates compute roots only when due,
``jax.lax.map`` so that the roots of a stack of blocks are traced once, the
device kind of traced arrays, and where new arrays beside a parameter go (commitment, sharding).

Importing this module (the optax adapter does) makes ``shampoo_core`` gate its root computation
with ``lax.cond`` under ``jax.jit``; without it, traced updates compute the roots every step and
select them with ``where`` (same numbers, more work). It also tells ``root_method="auto"`` which
device a traced statistic will be computed on (JAX's default backend, where ``jit`` places
computations on uncommitted arguments); without it the cost model falls back to eigh under jit.

New arrays follow the parameter's commitment: beside an uncommitted parameter (``jnp.asarray``)
they are uncommitted, as optax's states are, so ``jax.jit`` compiles the step once; a state that
mixed committed and uncommitted arrays would be compiled again for the committed state the first
step returns.

Parameters sharded over several devices (``jax.sharding.NamedSharding``, e.g. FSDP-style) have
their sharding as "device", which fits only arrays of their rank. With this module imported, the
state arrays of other shapes (statistics, preconditioners, counters) are replicated over the
parameter's devices, and the arrays of its shape (momentum, grafting) keep its sharding. Without
it, creating a 0-d counter beside a sharded parameter fails in JAX.
"""

from __future__ import annotations

import jax
import numpy as np

from shampoo_core import _xp

__all__ = ["cond", "map_stack", "device_kind", "placement"]


def cond(pred, true_fn, false_fn, operand):
    return jax.lax.cond(pred, true_fn, false_fn, operand)


def map_stack(f, xs):
    """``f`` over the leading axis of ``xs``: ``jax.lax.map`` when traced (one traced root for a
    whole stack of blocks), a loop of eager calls on concrete arrays.

    Not ``vmap``: it batches ``eigh``, and batched eigendecompositions on JAX's CPU deadlock in
    jaxlib 0.10.2 (two of them wait on the intra-op thread pool they occupy; a jitted
    ``bench step`` hung at block 128). Not ``lax.map`` on concrete arrays: eager JAX would
    compile the loop again at every call, and one of those compilations crashed XLA in the
    test suite; the loop of eager calls reuses JAX's compiled primitives for one block.
    """
    if isinstance(xs, jax.core.Tracer):
        return jax.lax.map(f, xs)
    return _xp.loop_stack(jax.numpy, f, xs)


def device_kind(x) -> str:
    """``"cpu"``, ``"gpu"`` or ``"tpu"``: the platform of JAX's default backend."""
    del x  # a tracer carries no device; jit runs on the default backend
    return jax.default_backend()


def placement(x, same_shape: bool = False):
    """Where new arrays beside ``x`` go.

    * ``None`` (JAX's default device, uncommitted) for an uncommitted ``x``: a jitted step's outputs
      are committed, so a state that mixed committed and uncommitted arrays would be compiled
      twice, once for ``init``'s state and once for the state the step returns;
    * the device of a committed single-device ``x``;
    * for ``x`` over several devices: its sharding for arrays of its shape (``same_shape``), else a
      sharding that replicates over the same devices (the same mesh when it has one).
    """
    device = _xp.device_of(x)
    if device is None:
        return None  # a tracer
    if not getattr(x, "committed", True):
        return None
    if not isinstance(device, jax.sharding.Sharding) or len(device.device_set) == 1 or same_shape:
        return device
    replicated = jax.sharding.PartitionSpec()
    if isinstance(device, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(device.mesh, replicated, memory_kind=device.memory_kind)
    devices = np.array(sorted(device.device_set, key=lambda d: d.id))
    return jax.sharding.NamedSharding(jax.sharding.Mesh(devices, ("devices",)), replicated)


_xp.register_cond("jax.numpy", cond)
_xp.register_map("jax.numpy", map_stack)
_xp.register_device_kind("jax.numpy", device_kind)
_xp.register_placement("jax.numpy", placement)
