"""A small training job used by the resume tests: run it whole, or in two processes."""

import argparse

import numpy as np

import shampoo_core as sc

SHAPES = {"w": (12, 7), "conv": (3, 2, 4, 4), "b": (7,), "s": ()}


def make_tx(nonfinite="raise", executor=None):
    return sc.shampoo(0.05, block_size=5, start_preconditioning_step=2, preconditioning_compute_steps=3,
                      graft_type="adam", beta2=0.99, nonfinite=nonfinite, async_preconditioners=executor)


def make_executor(use_async: bool):
    return sc.AsyncPreconditioners(max_workers=2, max_staleness=2, deterministic=True) if use_async else None


def grads_at(step, params, dtype):
    """Deterministic gradients of a quadratic plus a per-step perturbation."""
    rng = np.random.default_rng(1000 + step)
    return {k: (0.5 * p + rng.standard_normal(p.shape)).astype(dtype) for k, p in params.items()}


def initial_params(dtype):
    rng = np.random.default_rng(0)
    return {k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}


def train(tx, params, state, first_step, last_step, dtype):
    for step in range(first_step, last_step + 1):
        updates, state = tx.update(state, grads_at(step, params, dtype), params)
        params = sc.apply_updates(params, updates)
    return params, state


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="float64")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--params", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--async-roots", action="store_true")
    args = parser.parse_args()
    executor = make_executor(args.async_roots)
    tx = make_tx(executor=executor)
    if args.resume:
        saved = dict(np.load(args.params))
        params = {k: saved[k] for k in SHAPES}
        state = sc.load_state(args.checkpoint, like=params, tx=tx, async_preconditioners=executor)
        start = int(state.count) + 1
    else:
        params = initial_params(args.dtype)
        state = tx.init(params)
        start = 1
    params, state = train(tx, params, state, start, start + args.steps - 1, args.dtype)
    sc.save_state(args.checkpoint, state, tx=tx, async_preconditioners=executor)
    np.savez(args.params, **params)
    if executor is not None:
        executor.close()


if __name__ == "__main__":
    main()
