"""Run by tests/test_jax_sharding.py in its own process: JAX must see two host devices before it
starts. Trains with parameters sharded over both, and compares with the same run on one device."""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"  # alone: other flags could stop its parsing

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

import shampoo_core as sc  # noqa: E402
from backends import jax_backend, optax_adapter  # noqa: E402, F401

HP = dict(block_size=4, start_preconditioning_step=2, preconditioning_compute_steps=2, graft_type="adam",
          epsilon=1e-3, nonfinite="skip")


def run(tx, update, params, grads, sharding):
    put = (lambda t: jax.device_put(t, sharding)) if sharding is not None else (lambda t: t)
    params, state = put(params), tx.init(put(params))
    updates = []
    for g in grads:
        u, state = update(tx, state, put(g), params)
        updates.append(u)
    return updates, state


def core(tx, state, g, p):
    return tx.update(state, g, p)


def core_jit(tx, state, g, p):
    return jax.jit(tx.update)(state, g, p)


def adapter_jit(tx, state, g, p):
    return jax.jit(tx.update)(g, state, p)


def main():
    assert len(jax.devices()) == 2, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("x",))
    rng = np.random.default_rng(0)
    shapes = {"w": (8, 6), "v": (4, 10), "b": (6,)}
    params = {k: jnp.asarray(rng.standard_normal(s)) for k, s in shapes.items()}
    grads = [{k: jnp.asarray(rng.standard_normal(s)) for k, s in shapes.items()} for _ in range(4)]
    cases = [
        ("shampoo eager", lambda: sc.shampoo(0.1, **HP), core),
        ("shampoo jit", lambda: sc.shampoo(0.1, **HP), core_jit),
        ("optax adapter jit", lambda: optax_adapter.shampoo(0.1, **HP), adapter_jit),
        ("adam eager", lambda: sc.adam(0.1), core),
        ("eva_s jit", lambda: sc.eva_s(0.1, nonfinite="skip"), core_jit),
        ("full_matrix_adagrad eager", lambda: sc.full_matrix_adagrad(0.1), core),
    ]
    for spec in (PartitionSpec("x"), PartitionSpec()):  # sharded on the first dim, and replicated
        sharding = NamedSharding(mesh, spec)
        for name, make, update in cases:
            reference, _ = run(make(), update, params, grads, None)
            updates, state = run(make(), update, params, grads, sharding)
            for u, r in zip(updates, reference):
                for k in shapes:
                    np.testing.assert_allclose(np.asarray(u[k]), np.asarray(r[k]), rtol=1e-10, atol=1e-13,
                                               err_msg=f"{name}, {spec}")
            arrays = [x for x in jax.tree_util.tree_leaves(state) if isinstance(x, jax.Array)]
            assert all(x.sharding.device_set == sharding.device_set for x in arrays), name
            if name.startswith("shampoo eager"):
                assert state.params[2].momentum.sharding == sharding, state.params[2].momentum.sharding
            print(f"ok: {name}, {spec}")


if __name__ == "__main__":
    main()
