"""A Shampoo step on one device against its matmul floor: ``python -m bench gpu``'s floor rows.

``bench step`` times its floor on the CPU as one matmul call per block. On an accelerator that
would time kernel launches: at block 128 the model's 11.6M parameters are 753 blocks, with a
Gram matrix and a mode product per preconditioned dim of each. Here the floor is timed both ways,
synchronized with the device, and the faster one is the floor:

* loop: per preconditioned dim of every block, its Gram matrix ``M @ M.T`` and its mode product
  ``H @ M`` (M: the block matricized along that dim, H: a symmetric matrix of its order), one
  2-D matmul call each;
* batched: the same products as one batched matmul per group of equal-shaped blocks and dim,
  on stacks of blocks (the blocks of all parameters together; the core stacks those of each
  parameter).

Each block has operands of its own, as in ``bench step``. Beside the floor: the median non-root
step (statistics every step, roots only at step 1), new and with ``donate_state=True`` (the state
written in place), one elementwise pass over the parameters,
the step's time above the floor and what the 1.25x target leaves, both in those passes, and on
torch backends ``torch.optim.AdamW`` (default and ``fused=True``) on the same device for scale.
"""

from __future__ import annotations


def floor_operands(backend, block_size: int, params) -> list:
    """``[(M, H)]`` on ``backend``'s device, one pair per group of equal-shaped blocks (of all
    parameters) and preconditioned dim: the operands of ``bench step``'s floor for each block of
    the group, stacked. M of shape (count, d, size / d) holds every block of the group matricized
    along that dim, H of shape (count, d, d) is symmetric. ``params``: NumPy arrays, planned as
    ``sc.shampoo``'s defaults plan them."""
    import numpy as np

    from .step import _block_counts, _operands

    rng = np.random.default_rng(0)
    out = []
    for (shape, pre), count in _block_counts(block_size, params).items():
        blocks = [_operands(rng, shape, pre) for _ in range(count)]  # per block: [(M, H)] per dim
        for per_dim in zip(*blocks):
            out.append((backend.asarray(np.stack([m for m, _ in per_dim])),
                        backend.asarray(np.stack([h for _, h in per_dim]))))
    return out


def floor_times(backend, operands, repeats: int, budget: float) -> tuple[float, float]:
    """(loop, batched) median seconds of the floor's products on ``operands``."""
    from .roots import _median_time

    xp = backend.xp
    singles = [(m[j, ...], h[j, ...]) for m, h in operands for j in range(m.shape[0])]
    pairs = [(m, xp.matrix_transpose(m), h) for m, h in operands]

    def loop():
        for m, h in singles:
            m @ m.T
            h @ m

    def batched():
        for m, mt, h in pairs:
            m @ mt
            h @ m

    loop_s, _ = _median_time(loop, repeats, budget, sync=backend.sync)
    batched_s, _ = _median_time(batched, repeats, budget, sync=backend.sync)
    return loop_s, batched_s


def pass_time(backend, params, repeats: int, budget: float) -> float:
    """Median seconds of ``bench step``'s unit pass over ``params`` (device arrays)."""
    from .roots import _median_time
    from .step import one_pass

    arrays = list(params.values())
    seconds, _ = _median_time(lambda: one_pass(arrays), repeats, budget, sync=backend.sync)
    return seconds


def adamw_ms(backend, params, grads, steps: int) -> dict:
    """Median ms of a ``torch.optim.AdamW`` step on ``backend``'s device (torch backends only,
    else ``{}``): ``{"default": ..., "fused": ...}``; a variant the device lacks is left out.
    ``params``, ``grads``: NumPy arrays."""
    if not backend.name.startswith("torch"):
        return {}
    from .step import _adamw_ms

    out = {}
    for name, options in (("default", {}), ("fused", {"fused": True})):
        try:
            out[name] = _adamw_ms(params, grads, steps, device=backend.device, sync=backend.sync, warmup=2,
                                  **options)
        except RuntimeError:  # fused is not implemented for this device
            continue
    return out


def floor_row(backend, np_params, np_grads, block_size: int, steps: int, repeats: int, budget: float) -> dict:
    """One block size: the median non-root step on ``backend``'s device against its floor, in ms
    and in elementwise passes (see the module docstring). ``np_params``, ``np_grads``: the
    model's NumPy arrays (``bench.step.model_problem``)."""
    import shampoo_core as sc

    from .pipeline import mean_step
    from .step import TARGET, _block_counts, passes, ratio_text

    params = {k: backend.asarray(v) for k, v in np_params.items()}
    grads = {k: backend.asarray(v) for k, v in np_grads.items()}
    settings = dict(block_size=block_size, start_preconditioning_step=1, preconditioning_compute_steps=10**9)
    _, median = mean_step(sc.shampoo(1e-3, **settings), params, grads, steps, 2, sync=backend.sync)
    # In place where the library has the kernels (torch; CuPy has none registered: a new state).
    _, donated = mean_step(sc.shampoo(1e-3, donate_state=True, **settings), params, grads, steps, 2,
                           sync=backend.sync)
    operands = floor_operands(backend, block_size, np_params)
    loop_s, batched_s = floor_times(backend, operands, repeats, budget)
    pass_s = pass_time(backend, params, repeats, budget)
    row = dict(block_size=block_size, blocks=sum(_block_counts(block_size, np_params).values()),
               nonroot_ms=median, floor_loop_ms=1e3 * loop_s, floor_batched_ms=1e3 * batched_s,
               floor_ms=1e3 * min(loop_s, batched_s), pass_ms=1e3 * pass_s)
    row["ratio_to_floor"] = row["nonroot_ms"] / row["floor_ms"]
    row.update(passes(row))
    row.update(donated_nonroot_ms=donated, donated_ratio_to_floor=donated / row["floor_ms"])
    print(f"{backend.name:<10} block_size {block_size:5d} ({row['blocks']} blocks): non-root step "
          f"{row['nonroot_ms']:8.2f} ms, floor {row['floor_ms']:8.2f} ms ({ratio_text(row['ratio_to_floor'])}; loop "
          f"{row['floor_loop_ms']:.2f}, batched {row['floor_batched_ms']:.2f}); pass {row['pass_ms']:.3f} ms, "
          f"above the floor {row['passes_above_floor']:.1f} passes, {TARGET:g}x leaves {row['passes_left_by_target']:.1f}; "
          f"donate_state=True {row['donated_nonroot_ms']:.2f} ms ({ratio_text(row['donated_ratio_to_floor'])})", flush=True)
    return row

