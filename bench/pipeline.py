"""``python -m bench pipeline``: roots in background threads vs none vs synchronous (Sec. 5).

Step time: model-like shapes (``bench step``'s layout at ``--scale``), float32, roots every
``--every`` steps, mean over ``--steps`` steps after a warm-up, three ways, interleaved in
``--rounds`` rounds (so that drift of a shared machine hits all three alike); the ratios are the
medians of the per-round ratios:

* none: roots only once, before timing (the cost of a step without root computation);
* sync: roots computed inside ``update`` on their steps;
* async: ``AsyncPreconditioners`` (one worker thread) computes them while steps go on.

Loss: the digits autoencoder of ``bench demo`` (core on NumPy) trained with synchronous roots and
with asynchronous ones swapped in deterministically ``--staleness`` steps late.
"""

from __future__ import annotations

import json
import pathlib
import statistics

from .timing import call_times


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="results/pipeline")
    parser.add_argument("--scale", type=int, default=4, help="divide bench step's dims by this")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--every", type=int, default=10, help="preconditioning_compute_steps")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--staleness", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved repetitions of the three runs")
    parser.add_argument("--train-steps", type=int, default=2000, help="digits run length (0 skips it)")
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads of the main thread")
    parser.set_defaults(func=run)


def mean_step(tx, params, grads, steps, warmup, sync=None):
    """(mean, median) ms per ``tx.update`` over ``steps`` steps after ``warmup`` untimed ones.

    ``sync`` waits for a device's queued work, inside each timed step.
    """
    return step_costs(tx, params, grads, steps, warmup, sync)[:2]


def step_costs(tx, params, grads, steps, warmup, sync=None):
    """:func:`mean_step`'s (mean, median) ms and the minor page faults per timed step of the whole
    process, its worker threads included (``None`` where :mod:`resource` is missing)."""
    state = [tx.init(params)]

    def step():
        _, state[0] = tx.update(state[0], grads, params)

    call_times(step, 0, warmup=warmup, sync=sync)
    before = minor_faults()
    times, _ = call_times(step, steps, warmup=0, sync=sync)
    after = minor_faults()
    faults = None if before is None else (after - before) / len(times)
    return 1e3 * statistics.fmean(times), 1e3 * statistics.median(times), faults


def minor_faults() -> int | None:
    """Minor page faults of this process so far, all threads (``getrusage``), or ``None``.

    A worker thread whose allocator gives pages back to the kernel and takes them again faults
    on every page it touches anew, and the kernel's unmapping interrupts the other threads' cores
    too (docs/performance.md, asynchronous preconditioners)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _digits(steps: int, executor, seed=0):

    import shampoo_core as sc

    from .demo import SHAMPOO_SETTINGS, batches, init_params, load_digits, loss_fn

    import torch

    data_np = load_digits()
    data = torch.from_numpy(data_np)
    arrays = init_params(seed)
    settings = dict(SHAMPOO_SETTINGS)
    tx = sc.shampoo(3e-3, async_preconditioners=executor, **settings)
    state = tx.init(arrays)
    curve = []
    for t, idx in enumerate(batches(data.shape[0], 128, steps, seed), start=1):
        leaves = {k: torch.from_numpy(v).requires_grad_(True) for k, v in arrays.items()}
        g = torch.autograd.grad(loss_fn(torch, leaves, data[idx]), list(leaves.values()))
        updates, state = tx.update(state, {k: x.numpy() for k, x in zip(leaves, g)}, arrays)
        arrays = sc.apply_updates(arrays, updates)
        if t % 100 == 0 or t == steps:
            with torch.no_grad():
                curve.append((t, float(loss_fn(torch, {k: torch.from_numpy(v) for k, v in arrays.items()}, data))))
    return curve


def run(args) -> int:
    from .timing import limit_threads

    threads = limit_threads(args.threads)
    import shampoo_core as sc

    from .step import model_problem, scaled_shapes

    shapes = scaled_shapes(args.scale)
    params, grads = model_problem(shapes)
    common = dict(block_size=args.block_size, start_preconditioning_step=1)
    warmup = args.every + 1
    modes = ("none", "sync", "async")
    rounds = []
    for _ in range(args.rounds):
        result = {"none": step_costs(sc.shampoo(1e-3, preconditioning_compute_steps=10**9, **common),
                                      params, grads, args.steps, warmup),
                  "sync": step_costs(sc.shampoo(1e-3, preconditioning_compute_steps=args.every, **common),
                                      params, grads, args.steps, warmup)}
        with sc.AsyncPreconditioners(max_workers=1, max_staleness=args.every) as ex:
            result["async"] = step_costs(
                sc.shampoo(1e-3, preconditioning_compute_steps=args.every, async_preconditioners=ex, **common),
                params, grads, args.steps, warmup)
        rounds.append(result)
    step_ms = {k: dict(mean=statistics.median(r[k][0] for r in rounds),
                       median=statistics.median(r[k][1] for r in rounds)) for k in modes}
    faults = {k: None if rounds[0][k][2] is None else statistics.median(r[k][2] for r in rounds) for k in modes}
    over_none = {k: statistics.median(r[k][0] / r["none"][0] for r in rounds) for k in modes}
    print(f"{sum(p.size for p in params.values())} parameters, block_size {args.block_size}, roots every {args.every}, "
          f"{args.rounds} rounds (medians)")
    for k in modes:
        spread = [r[k][0] / r["none"][0] for r in rounds]
        print(f"  {k:<6} mean {step_ms[k]['mean']:8.2f} ms/step  median {step_ms[k]['median']:8.2f}  "
              f"({over_none[k]:.2f}x no-root; rounds {min(spread):.2f}-{max(spread):.2f})"
              + ("" if faults[k] is None else f"  {faults[k]:7.1f} page faults/step"))
    report = dict(threads=threads, shapes=shapes, block_size=args.block_size, every=args.every,
                  steps=args.steps,
                  rounds=[{k: dict(mean=m, median=md, minor_faults_per_step=f) for k, (m, md, f) in r.items()}
                          for r in rounds],
                  step_ms=step_ms, minor_faults_per_step=faults,
                  async_over_none=over_none["async"], sync_over_none=over_none["sync"])
    if args.train_steps:
        sync_curve = _digits(args.train_steps, None)
        with sc.AsyncPreconditioners(max_staleness=args.staleness, deterministic=True) as ex:
            async_curve = _digits(args.train_steps, ex)
        report["digits"] = dict(staleness=args.staleness, sync=sync_curve, async_=async_curve)
        print(f"digits autoencoder, {args.train_steps} steps: final loss sync {sync_curve[-1][1]:.5f}, "
              f"async (roots {args.staleness} steps stale) {async_curve[-1][1]:.5f}")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline.json").write_text(json.dumps(report, indent=2))
    print(f"written to {out}/pipeline.json")
    return 0
