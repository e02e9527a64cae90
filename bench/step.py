"""``python -m bench step``: Shampoo's step time against its FLOP floor, measured in one run.

Model-like shapes (3 attention-sized 1024² matrices, a 1024×4096 and a 4096×1024 MLP pair, a conv
kernel and biases), float32, one BLAS thread. For each block size:

* non-root step: statistics every step, preconditioning, grafting, momentum (roots only at step 1);
  ``--graft-type`` picks the grafting optimizer of this step and the donated one (default AdaGrad,
  ``sc.shampoo``'s; ``adam`` is the grafting of Meta's Distributed Shampoo's usual configuration),
  and ``--nesterov`` gives both Nesterov's first moment (the default of the paper's optax
  implementation);
* floor: the matmuls such a step must do, timed alone on blocks of the same shapes, each with
  operands of its own: for every preconditioned dim of every block, its Gram matrix (the
  statistic) and its mode product (the preconditioning). Eager libraries also report the floor
  from cache (one block per shape, repeated), a bound below what any step over memory-resident
  blocks reaches;
* root step: the extra time of a step that recomputes every inverse root; amortized step time for
  roots every N = 1, 10, 100 steps is non-root + root / N;
* ``torch.optim.AdamW`` on the same shapes, for scale;
* one elementwise pass, timed beside each floor: every parameter read and multiplied into a new
  array (the unit of the work beside the matmuls). The step's time above its floor, and what the
  1.25x target leaves beside the matmuls (a quarter of the floor), are reported in these passes,
  so that the arithmetic's own count of passes (docs/performance.md) can be set against them;
  the same pass is also timed once per run from memory (the caches emptied before each timed
  pass: ``cold_pass_seconds``), and the counts given in those passes too, since a step's state
  does not stay in cache where the parameters alone may;
* the block matmuls of the largest gradient as a loop over blocks against one batched matmul over
  the block grid (what the step does: blocks of equal shape are stacked);
* the non-root step again with its state donated, to be written in place
  (``donate_state=True``; under ``jax.jit``, ``donate_argnums``);
* the donated non-root step of plain Shampoo (``PLAIN``: the paper's Algorithm 1, no grafting and
  no first moment): the statistics, the preconditioning and the merge alone. Its time against the
  floor is what Shampoo's own arithmetic costs beside its matmuls; the default step's time above
  it is the cost of the first-order optimizer grafted on (set against ``torch.optim.AdamW``'s).

``--library torch`` or ``jax`` runs the step and its floor on that library's CPU arrays instead of
NumPy's: torch eagerly, JAX under ``jax.jit`` (XLA fuses the elementwise passes, and the first
call, which compiles the step, is reported instead of the root step). Every thread of the process
runs on ``--threads`` CPUs (``bench.timing.pinned``), so that XLA's runtime, which runs
independent operations side by side, gets no more cores than the BLAS calls of NumPy and torch.
"""

from __future__ import annotations

import json
import pathlib
import statistics
import time
from typing import Callable, NamedTuple

from .timing import blas_libraries, call_times, pinned, start_jax

SHAPES = {
    "attn_q": (1024, 1024), "attn_k": (1024, 1024), "attn_v": (1024, 1024),
    "mlp_in": (1024, 4096), "mlp_out": (4096, 1024),
    "conv": (128, 64, 3, 3), "bias_1024": (1024,), "bias_4096": (4096,), "norm": (1024,),
}


# Plain Shampoo (arXiv 2002.09018, Algorithm 1): no grafting optimizer, no first moment.
PLAIN = {"graft_type": "none", "beta1": 0.0}


def scaled_shapes(scale: int) -> dict:
    """``SHAPES`` with every dim of 64 or more divided by ``scale`` (kernel sizes kept)."""
    return {k: tuple(max(d // scale, 1) if d >= 64 else d for d in s) for k, s in SHAPES.items()}


def model_problem(shapes: dict, seed: int = 0):
    """float32 NumPy ``(params, grads)`` of ``shapes``: N(0, 0.02²) weights, N(0, 1) gradients."""
    import numpy as np

    rng = np.random.default_rng(seed)
    params = {k: (rng.standard_normal(s) * 0.02).astype(np.float32) for k, s in shapes.items()}
    grads = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    return params, grads


# The same layout 16x smaller per dim, for smoke tests.
SMALL_SHAPES = scaled_shapes(16)


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="results/step")
    parser.add_argument("--block-sizes", default="128,512,1024")
    parser.add_argument("--steps", type=int, default=20,
                        help="timed non-root steps per block size, and repeats of each floor (medians)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--small", action="store_true", help="16x smaller shapes (smoke test)")
    parser.add_argument("--library", choices=("numpy", "torch", "jax"), default="numpy",
                        help="array library of the step and its floor (jax: under jax.jit)")
    parser.add_argument("--graft-type", choices=("adagrad", "rmsprop", "adam", "sgd", "sqrt_n", "none"),
                        default="adagrad", help="grafting optimizer of the step (plain Shampoo's has none)")
    parser.add_argument("--nesterov", action="store_true",
                        help="Nesterov's first moment in the step (plain Shampoo's has none)")
    parser.set_defaults(func=run)


class Library(NamedTuple):
    """How the step and its floor run on one array library's CPU arrays."""

    name: str
    asarray: Callable  # float32 NumPy array -> the library's array
    compile: Callable  # fn -> fn that runs to completion (jitted and awaited for JAX)
    # tx.update -> the same with its state donated (jax.jit's donate_argnums); None for eager
    # libraries, which donate through sc.shampoo(..., donate_state=True)
    compile_donating: Callable | None = None


def library(name: str, threads: int, report: dict | None = None) -> Library:
    if name == "numpy":
        return Library(name, lambda a: a, lambda fn: fn)
    if name == "torch":
        import torch

        torch.set_num_threads(threads)
        return Library(name, torch.from_numpy, lambda fn: fn)
    jax = start_jax(threads, report)
    import jax.numpy as jnp

    import backends.jax_backend  # noqa: F401  (lax.cond: roots only on their steps)

    def compile_(fn):
        jitted = jax.jit(fn)
        return lambda *args: jax.block_until_ready(jitted(*args))

    def compile_donating(update):
        # The state goes out first, as it came in: JAX gives each donated input buffer to an
        # output of the same shape and dtype, in order, so with the updates first the state's
        # buffers would go to them and the new state would be copied.
        jitted = jax.jit(lambda state, *args: update(state, *args)[::-1], donate_argnums=0)

        def run(*args):
            state, updates = jax.block_until_ready(jitted(*args))
            return updates, state

        return run

    return Library(name, jnp.asarray, compile_, compile_donating)


def _median(fn, n):
    return statistics.median(call_times(fn, n)[0])


def pass_seconds(params, repeats: int, lib: Library | None = None) -> float:
    """Time of one elementwise pass over ``params`` (NumPy arrays) on ``lib``'s arrays: each read
    once and its product by a scalar written to a new array, as the step's passes write theirs
    (under JAX, all of them in one jitted call)."""
    return _median(_unit_pass(params, lib), repeats)


def _unit_pass(params, lib: Library | None):
    """A call of :func:`one_pass` over ``params`` as ``lib``'s arrays (compiled under JAX)."""
    lib = lib or library("numpy", 1)
    arrays = [lib.asarray(p) for p in params.values()]
    run_all = lib.compile(one_pass)
    return lambda: run_all(arrays)


EVICT_BYTES = 1 << 30  # above the last-level cache of any machine here (300 MiB the largest seen)


def cold_pass_seconds(params, repeats: int, lib: Library | None = None, evict_bytes: int = EVICT_BYTES) -> float:
    """:func:`pass_seconds` with the caches emptied before each timed pass (a read of an
    ``evict_bytes`` buffer, untimed): the pass as it meets a step's arrays that other work has
    pushed out of cache, at the machine's memory bandwidth. 11.6M float32 parameters (46 MB) fit
    in a large last-level cache, and the step's state (its statistics alone 99 MB at block 128)
    does not; on a machine with a large cache and a slow memory a pass takes 3x longer here than
    in :func:`pass_seconds` (docs/performance.md, "A second machine"). ``evict_bytes``: the
    buffer read between passes, larger than the last-level cache."""
    import numpy as np

    run = _unit_pass(params, lib)
    run()  # compiles under JAX
    buffer = np.ones(max(evict_bytes // 8, 1))
    times = []
    for _ in range(repeats):
        read_all(buffer)
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def read_all(buffer) -> float:
    """Every line of ``buffer`` read (its sum): what was cached before is evicted."""
    return float(buffer.sum())


def one_pass(arrays) -> list:
    """The unit pass: each array read once and its product by a scalar written to a new array."""
    return [x * 0.5 for x in arrays]


TARGET = 1.25  # the step's target against its floor (non-root steps)


def ratio_text(ratio: float, of: str = "", target: float = TARGET) -> str:
    """``ratio`` (a step's time over its floor) as text that says which side of ``target`` it is:
    ``ratio_text(1.13, " the floor")`` is ``"1.13x the floor, within 1.25x"``. Digits are added
    (up to 6) while the ratio would print as the target itself, so that 1.254 reads
    ``"1.254x, above 1.25x"``, not ``"1.25x"``."""
    digits = 2
    while digits < 6 and ratio != target and round(ratio, digits) == round(target, digits):
        digits += 1
    return f"{ratio:.{digits}f}x{of}, {'within' if ratio <= target else 'above'} {target:g}x"


def passes(row: dict) -> dict:
    """``row``'s time above the floor, and the part of the floor that the ``TARGET`` (1.25x) leaves
    beside the matmuls, in elementwise passes over the parameters (``pass_ms``), and with
    ``cold_pass_ms`` also in passes from memory (keys prefixed ``cold_``)."""
    out = {}
    for prefix, unit in (("", row["pass_ms"]), ("cold_", row.get("cold_pass_ms"))):
        if unit:
            out.update({f"{prefix}passes_above_floor": (row["nonroot_ms"] - row["floor_ms"]) / unit,
                        f"{prefix}passes_left_by_target": (TARGET - 1.0) * row["floor_ms"] / unit})
    return out


def _block_counts(block_size: int, params) -> dict:
    """``{(block shape, preconditioned flags): count}``, planned as ``sc.shampoo``'s defaults do
    (merge small dims, skip dims > 4096)."""
    from shampoo_core import blocking

    counts: dict = {}
    for p in params.values():
        plan = blocking.make_plan(tuple(p.shape), block_size, skip_preconditioning_dim_size_gt=4096)
        if not plan.num_preconditioned:
            continue
        for shape in plan.block_shapes:
            counts[(shape, plan.preconditioned)] = counts.get((shape, plan.preconditioned), 0) + 1
    return counts


def _operands(rng, shape, preconditioned) -> list:
    """``[(M, H)]`` of one block: per preconditioned dim its matricization M (that dim first,
    contiguous) and a symmetric H of M's order."""
    import numpy as np

    g = rng.standard_normal(shape).astype(np.float32)
    out = []
    for i, flag in enumerate(preconditioned):
        if flag:
            m = np.ascontiguousarray(np.moveaxis(g, i, 0).reshape(shape[i], -1))
            out.append((m, (m @ m.T).astype(np.float32)))
    return out


def _products(mats, gram):
    # the statistic (as `gram_product` forms it) and the mode product
    return [(gram(m), h @ m) for m, h in mats]


def gram_product(lib: Library) -> Callable:
    """M·Mᵀ as ``lib``'s step forms a statistic's product, for the floor: NumPy's ``@`` (it
    dispatches ``a @ a.T`` to BLAS's symmetric rank-k update, ``syrk``); for torch's CPU tensors
    the same on zero-copy NumPy views for the blocks whose statistics its step gives to ``syrk``
    (``backends.torch_backend.syrk_pays``, where numba and SciPy are installed), else torch's
    ``@``, a full product, which is faster on small blocks; JAX's ``@``."""
    if lib.name == "torch":
        import torch

        from backends import load_syrk_cpu, torch_backend

        if load_syrk_cpu() is not None:
            def gram(m):
                if not torch_backend.syrk_pays(*m.shape):
                    return m @ m.T
                view = m.numpy()
                return torch.from_numpy(view @ view.T)

            return gram
    return lambda m: m @ m.T


def floor_seconds(block_size: int, params, repeats: int, lib: Library | None = None) -> float:
    """Time of the Gram and mode-product matmuls of every block of ``params``, each block with
    operands of its own (as a step meets them: 11.6M parameters do not stay in cache), on
    ``lib``'s arrays (NumPy by default), each Gram product as :func:`gram_product` forms it.
    NumPy and torch: one matmul call after another, results dropped; JAX: all of them in one
    jitted call, so that no per-call dispatch is counted (a step is one call too).
    """
    import numpy as np

    lib = lib or library("numpy", 1)
    rng = np.random.default_rng(0)
    mats = [(lib.asarray(m), lib.asarray(h)) for (shape, pre), count in _block_counts(block_size, params).items()
            for _ in range(count) for m, h in _operands(rng, shape, pre)]
    gram = gram_product(lib)
    if lib.name == "jax":
        run_all = lib.compile(lambda mats: _products(mats, gram))
        run_all(mats)  # compiles

        def run():
            run_all(mats)
    else:

        def run():
            for m, h in mats:
                gram(m)
                h @ m
    return _median(run, repeats)


def hot_floor_seconds(block_size: int, params, repeats: int, lib: Library | None = None) -> float:
    """The floor as one block per distinct shape, timed on the same operands again and again
    (so from cache), times the number of blocks of that shape: a lower bound no step over
    memory-resident blocks reaches. For NumPy and torch (eager calls) only; under JAX every call
    would add its dispatch."""
    import numpy as np

    lib = lib or library("numpy", 1)
    total = 0.0
    rng = np.random.default_rng(0)
    gram = gram_product(lib)
    for (shape, pre), count in _block_counts(block_size, params).items():
        mats = [(lib.asarray(m), lib.asarray(h)) for m, h in _operands(rng, shape, pre)]
        total += count * _median(lambda: _products(mats, gram), repeats)
    return total


def batching_seconds(block_size: int, repeats: int, shape=(4096, 1024)) -> tuple[float, float]:
    """(loop, batched): the block matmuls of one step on a ``shape`` float32 gradient (statistics
    and two-sided preconditioning of every block), one 2-D matmul per block against one batched
    matmul over the (rows, cols) block grid; the grid must divide ``shape``."""
    import numpy as np

    rng = np.random.default_rng(1)
    g = rng.standard_normal(shape).astype(np.float32)
    r, c = shape[0] // block_size, shape[1] // block_size
    grid = g.reshape(r, block_size, c, block_size).transpose(0, 2, 1, 3)  # a view, as blocks are
    left = rng.standard_normal((r, c, block_size, block_size)).astype(np.float32)
    right = rng.standard_normal((r, c, block_size, block_size)).astype(np.float32)
    blocks = [(grid[i, j], left[i, j], right[i, j]) for i in range(r) for j in range(c)]

    def loop():
        for b, lm, rm in blocks:
            b @ b.T
            b.T @ b
            lm @ b @ rm

    def batched():
        grid @ grid.transpose(0, 1, 3, 2)
        grid.transpose(0, 1, 3, 2) @ grid
        left @ grid @ right

    return _median(loop, repeats), _median(batched, repeats)


def run(args) -> int:
    # Every thread on --threads CPUs, JAX's runtime pool included (bench/timing.py).
    with pinned(args.threads) as threads:
        return _run(args, threads)


def _run(args, threads: dict) -> int:
    lib = library(args.library, args.threads, threads)
    shapes = SMALL_SHAPES if args.small else SHAPES
    np_params, np_grads = model_problem(shapes)
    params = {k: lib.asarray(v) for k, v in np_params.items()}
    grads = {k: lib.asarray(v) for k, v in np_grads.items()}
    n_params = sum(p.size for p in np_params.values())
    jitted = lib.name == "jax"
    optimizer = dict(graft_type=args.graft_type, nesterov=args.nesterov)  # of the default and the donated step
    rows = []
    # the unit pass from memory, once per run (it does not depend on the blocks)
    cold_pass_ms = 1e3 * cold_pass_seconds(np_params, args.steps, lib, (16 << 20) if args.small else EVICT_BYTES)
    for block_size in [int(b) for b in args.block_sizes.split(",") if b]:
        first, nonroot = step_seconds(lib, block_size, params, grads, args.steps, **optimizer)
        floor = floor_seconds(block_size, np_params, args.steps, lib)
        pass_ms = 1e3 * pass_seconds(np_params, args.steps, lib)
        row = dict(block_size=block_size, blocks=sum(_block_counts(block_size, np_params).values()),
                   nonroot_ms=1e3 * nonroot, floor_ms=1e3 * floor, ratio_to_floor=nonroot / floor, pass_ms=pass_ms,
                   cold_pass_ms=cold_pass_ms)
        row.update(passes(row))
        # the state written in place: donate_state=True eagerly, donate_argnums under jax.jit
        donated = 1e3 * step_seconds(lib, block_size, params, grads, args.steps, donate=True, **optimizer)[1]
        row.update(donated_nonroot_ms=donated, donated_ratio_to_floor=donated / row["floor_ms"],
                   donated_passes_above_floor=passes(dict(row, nonroot_ms=donated))["passes_above_floor"])
        plain = 1e3 * step_seconds(lib, block_size, params, grads, args.steps, donate=True, **PLAIN)[1]
        row.update(plain_donated_nonroot_ms=plain, plain_donated_ratio_to_floor=plain / row["floor_ms"],
                   plain_donated_passes_above_floor=passes(dict(row, nonroot_ms=plain))["passes_above_floor"],
                   grafted_optimizer_ms=donated - plain)
        if jitted:
            row.update(first_call_s=first)  # compilation dominates; the root step is not separable
            roots_text = f"first call (compiles) {first:.1f} s"
        else:
            hot = hot_floor_seconds(block_size, np_params, args.steps, lib)
            row.update(hot_floor_ms=1e3 * hot, ratio_to_hot_floor=nonroot / hot)
            root = max(first - nonroot, 0.0)
            row.update(root_step_extra_ms=1e3 * root, amortized_ms={n: 1e3 * (nonroot + root / n) for n in (1, 10, 100)})
            roots_text = (f"roots +{row['root_step_extra_ms']:.0f} ms; amortized N=1/10/100: "
                          + " / ".join(f"{v:.0f}" for v in row["amortized_ms"].values()) + " ms")
        big = max(np_params.values(), key=lambda p: p.size).shape
        if lib.name == "numpy" and len(big) == 2 and all(d % block_size == 0 and d > block_size for d in big):
            loop, batched = batching_seconds(block_size, args.steps, big)
            row.update(block_matmuls_loop_ms=1e3 * loop, block_matmuls_batched_ms=1e3 * batched)
        rows.append(row)
        print(f"block_size {block_size:5d} ({row['blocks']} blocks): non-root step {row['nonroot_ms']:8.1f} ms, "
              f"floor {row['floor_ms']:8.1f} ms ({ratio_text(row['ratio_to_floor'])})"
              + (f", from cache {row['hot_floor_ms']:.1f} ms ({row['ratio_to_hot_floor']:.2f}x)" if not jitted else "")
              + f"; {roots_text}", flush=True)
        print(f"    one elementwise pass over the parameters {pass_ms:.2f} ms ({cold_pass_ms:.2f} ms from memory, "
              f"caches emptied first); above the floor {row['passes_above_floor']:.1f} passes "
              f"({row['cold_passes_above_floor']:.1f} from memory); the {TARGET:g}x target leaves "
              f"{row['passes_left_by_target']:.1f} ({row['cold_passes_left_by_target']:.1f})", flush=True)
        how = "donate_argnums" if jitted else "donate_state=True"
        print(f"    {how} (the state written in place): non-root step {row['donated_nonroot_ms']:.1f} ms "
              f"({ratio_text(row['donated_ratio_to_floor'], ' the floor')}; {row['donated_passes_above_floor']:.1f} "
              "passes above it)", flush=True)
        print(f"    plain Shampoo (no grafting, no first moment), donated: {row['plain_donated_nonroot_ms']:.1f} ms "
              f"({ratio_text(row['plain_donated_ratio_to_floor'], ' the floor')}; {row['plain_donated_passes_above_floor']:.1f} "
              f"passes above it); the grafted optimizer and first moment add {row['grafted_optimizer_ms']:.1f} ms",
              flush=True)
        if "block_matmuls_loop_ms" in row:
            print(f"    block matmuls of the {big[0]}x{big[1]} gradient: loop over blocks "
                  f"{row['block_matmuls_loop_ms']:.1f} ms, one batched matmul {row['block_matmuls_batched_ms']:.1f} ms")
    adamw = _adamw_ms(np_params, np_grads, args.steps, args.threads)
    pass_ms = 1e3 * pass_seconds(np_params, args.steps, lib)  # beside AdamW, for its count of passes
    if adamw is not None:
        print(f"torch.optim.AdamW step: {adamw:.1f} ms ({adamw / pass_ms:.1f} passes)")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # numba's one pass for the first moment, the accumulator, the grafted norm and the cuts of g
    # and m into blocks (NumPy, torch)
    import backends
    from shampoo_core import GraftType, grafting

    one_pass = (lib.name in ("numpy", "torch") and GraftType(args.graft_type) in grafting.DIAGONAL
                and backends.load_fused_cpu() is not None)
    blas = blas_libraries()
    (out / "step.json").write_text(json.dumps(dict(library=args.library, threads=threads, parameters=n_params, shapes=shapes,
                                                   graft_type=args.graft_type, nesterov=args.nesterov, rows=rows,
                                                   adamw_ms=adamw, pass_ms=pass_ms, cold_pass_ms=cold_pass_ms,
                                                   first_order_in_one_pass=one_pass,
                                                   blas=blas),
                                              indent=2))
    if blas:
        print("BLAS: " + ", ".join(f"{b['internal_api']} {b['version']} ({b['architecture']} kernels)" for b in blas))
    print(f"{n_params} parameters; grafting: {args.graft_type}{'; Nesterov' if args.nesterov else ''}; "
          "grafted optimizer in one pass (numba): "
          f"{'yes' if one_pass else 'no'}; written to {out}/step.json")
    return 0


def step_seconds(lib: Library, block_size: int, params, grads, steps: int, donate: bool = False,
                 **options) -> tuple:
    """``(first, non-root)``: the seconds of step 1 of ``bench step``'s optimizer (every root
    computed; compilation too under jit) and the median of ``steps`` non-root steps after it, on
    ``lib``'s arrays. ``donate``: each step gives its state up, to be written in place
    (``donate_state=True``, or ``donate_argnums`` under ``jax.jit``). ``options``: more keywords
    of ``sc.shampoo`` (``nonfinite`` defaults to "skip" under ``jax.jit``, where "raise" cannot
    read the gradients)."""
    import shampoo_core as sc

    options.setdefault("nonfinite", "skip" if lib.name == "jax" else "raise")
    if donate and lib.compile_donating is None:
        options["donate_state"] = True
    tx = sc.shampoo(1e-3, block_size=block_size, start_preconditioning_step=1,
                    preconditioning_compute_steps=10**9, **options)
    update = lib.compile_donating(tx.update) if donate and lib.compile_donating else lib.compile(tx.update)
    t0 = time.perf_counter()
    box = {"state": update(tx.init(params), grads, params)[1]}
    first = time.perf_counter() - t0

    def step():
        _, box["state"] = update(box["state"], grads, params)

    return first, _median(step, steps)


def _adamw_ms(params, grads, steps, threads=None, device=None, sync=None, warmup=1, **options):
    """Median ms of a ``torch.optim.AdamW`` step (``options``: its keywords, e.g. ``fused=True``)
    on copies of ``params`` (NumPy arrays) with ``grads``, on ``device`` (CPU by default);
    ``sync`` waits for the device's queued work inside each timed step, after ``warmup`` untimed
    ones. ``None`` without torch.
    Raises RuntimeError where the device lacks the variant that ``options`` ask for."""
    try:
        import torch
    except ImportError:
        return None
    if threads is not None:
        torch.set_num_threads(threads)
    ps = [torch.nn.Parameter(torch.as_tensor(p, device=device).clone()) for p in params.values()]
    for p, g in zip(ps, grads.values()):
        p.grad = torch.as_tensor(g, device=device)
    opt = torch.optim.AdamW(ps, lr=1e-3, **options)
    return 1e3 * statistics.median(call_times(opt.step, steps, warmup=warmup, sync=sync)[0])
