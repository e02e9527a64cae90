"""``python -m bench pipeline``: roots in background threads vs none vs synchronous (Sec. 5).

Step time: model-like shapes (``bench step``'s layout at ``--scale``), float32, roots every
``--every`` steps, mean over ``--steps`` steps after a warm-up, three ways, interleaved in
``--rounds`` rounds (so that drift of a shared machine hits all three alike); the ratios are the
medians of the per-round ratios:

* none: roots only once, before timing (the cost of a step without root computation);
* sync: roots computed inside ``update`` on their steps;
* async: ``AsyncPreconditioners`` (``--workers`` threads, default one) computes them while steps
  go on.

Each ``--every`` value (a comma-separated list) is one such set of rounds. With the roots' demand
(the synchronous run's extra time over the no-root step) above 1, one worker cannot finish a
period's roots within the period's steps, and the steps wait at the staleness bound: the report
gives the workers' busy share of the asynchronous run (summed over workers) and the steps' wait
for them. More workers help only where there are cores for them beside the step's.

Loss: the digits autoencoder of ``bench demo`` (core on NumPy) trained with synchronous roots and
with asynchronous ones swapped in deterministically ``--staleness`` steps late.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
from typing import NamedTuple

from .timing import call_times


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="results/pipeline")
    parser.add_argument("--scale", type=int, default=4, help="divide bench step's dims by this")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--every", default="10,20",
                        help="preconditioning_compute_steps, comma-separated for several runs (e.g. 10,20,50)")
    parser.add_argument("--steps", type=int, default=60, help="timed steps, rounded up to whole root periods")
    parser.add_argument("--staleness", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved repetitions of the three runs")
    parser.add_argument("--train-steps", type=int, default=2000, help="digits run length (0 skips it)")
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads of the main thread")
    parser.add_argument("--workers", type=_at_least_one, default=1, help="worker threads of the asynchronous run")
    parser.set_defaults(func=run)


class StepCosts(NamedTuple):
    """What :func:`step_costs` measures, per timed step: ``mean`` and ``median`` ms, the minor
    page faults of the whole process (``None`` where :mod:`resource` is missing), and with an
    executor the ms its workers were busy and the ms the step waited for them (else ``None``)."""

    mean: float
    median: float
    faults: float | None
    busy: float | None = None
    waited: float | None = None


def mean_step(tx, params, grads, steps, warmup, sync=None):
    """(mean, median) ms per ``tx.update`` over ``steps`` steps after ``warmup`` untimed ones.

    ``sync`` waits for a device's queued work, inside each timed step.
    """
    return step_costs(tx, params, grads, steps, warmup, sync)[:2]


def step_costs(tx, params, grads, steps, warmup, sync=None, executor=None) -> StepCosts:
    """:func:`mean_step`'s (mean, median) ms, the page faults per step and, with ``executor`` (the
    :class:`shampoo_core.AsyncPreconditioners` of ``tx``), its workers' busy ms and the steps'
    wait for them per timed step (:meth:`~shampoo_core.AsyncPreconditioners.times`)."""
    state = [tx.init(params)]

    def step():
        _, state[0] = tx.update(state[0], grads, params)

    call_times(step, 0, warmup=warmup, sync=sync)
    before, worker_before = minor_faults(), None if executor is None else executor.times()
    times, _ = call_times(step, steps, warmup=0, sync=sync)
    after, worker_after = minor_faults(), None if executor is None else executor.times()
    faults = None if before is None else (after - before) / len(times)
    costs = StepCosts(1e3 * statistics.fmean(times), 1e3 * statistics.median(times), faults)
    if executor is None:
        return costs
    per_step = 1e3 / len(times)
    return costs._replace(busy=(worker_after.busy_seconds - worker_before.busy_seconds) * per_step,
                          waited=(worker_after.waited_seconds - worker_before.waited_seconds) * per_step)


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


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"an integer >= 1 expected; got {text!r}")
    return value


def _every(text: str) -> list:
    try:
        values = [int(v) for v in str(text).split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise SystemExit(f"--every: comma-separated integers >= 1 expected; got {text!r}")
    return values


def _workers_text(workers: int) -> str:
    return "one worker" if workers == 1 else f"{workers} workers"


def _whole_periods(steps: int, every: int) -> int:
    """``steps`` rounded up to whole root periods: the roots of every period in the timed window
    are then collected in it, and the worker's busy time per step is that of the same periods."""
    return every * -(-steps // every)


def _rounds(sc, params, grads, common, every, steps, rounds, workers=1):
    """``rounds`` interleaved rounds of the three runs at ``preconditioning_compute_steps=every``."""
    warmup = every + 1
    out = []
    for _ in range(rounds):
        result = {"none": step_costs(sc.shampoo(1e-3, preconditioning_compute_steps=10**9, **common),
                                     params, grads, steps, warmup),
                  "sync": step_costs(sc.shampoo(1e-3, preconditioning_compute_steps=every, **common),
                                     params, grads, steps, warmup)}
        with sc.AsyncPreconditioners(max_workers=workers, max_staleness=every) as ex:
            result["async"] = step_costs(
                sc.shampoo(1e-3, preconditioning_compute_steps=every, async_preconditioners=ex, **common),
                params, grads, steps, warmup, executor=ex)
        out.append(result)
    return out


def _summary(every: int, rounds: list) -> dict:
    """Medians over rounds; the worker's load is its busy time over the asynchronous step time
    (1: never idle), the roots' demand the synchronous run's extra time over the no-root step
    (above 1, one worker cannot keep up with the steps at this root period)."""
    def median(f):
        return statistics.median(f(r) for r in rounds)

    modes = ("none", "sync", "async")
    faults = {k: None if rounds[0][k].faults is None else median(lambda r: r[k].faults) for k in modes}
    return dict(
        every=every,
        rounds=[{k: c._asdict() for k, c in r.items()} for r in rounds],
        step_ms={k: dict(mean=median(lambda r: r[k].mean), median=median(lambda r: r[k].median)) for k in modes},
        minor_faults_per_step=faults,
        over_none={k: median(lambda r: r[k].mean / r["none"].mean) for k in modes},
        spread={k: [min(r[k].mean / r["none"].mean for r in rounds), max(r[k].mean / r["none"].mean for r in rounds)]
                for k in modes},
        root_demand=median(lambda r: (r["sync"].mean - r["none"].mean) / r["none"].mean),
        worker_load=median(lambda r: r["async"].busy / r["async"].mean),
        waited_ms_per_step=median(lambda r: r["async"].waited),
    )


def run(args) -> int:
    from .timing import limit_threads

    threads = limit_threads(args.threads)
    everies = _every(args.every)
    import shampoo_core as sc

    from .step import model_problem, scaled_shapes

    shapes = scaled_shapes(args.scale)
    params, grads = model_problem(shapes)
    common = dict(block_size=args.block_size, start_preconditioning_step=1)
    print(f"{sum(p.size for p in params.values())} parameters, block_size {args.block_size}, "
          f"{args.rounds} rounds (medians)")
    runs = []
    for every in everies:
        steps = _whole_periods(args.steps, every)
        summary = dict(_summary(every, _rounds(sc, params, grads, common, every, steps, args.rounds, args.workers)), steps=steps)
        runs.append(summary)
        print(f"roots every {every} ({steps} steps): they need {summary['root_demand']:.2f} of the no-root "
              f"step time ({_workers_text(args.workers)}: {summary['worker_load']:.2f} busy, steps waited "
              f"{summary['waited_ms_per_step']:.2f} ms each)")
        for k in ("none", "sync", "async"):
            low, high = summary["spread"][k]
            faults = summary["minor_faults_per_step"][k]
            print(f"  {k:<6} mean {summary['step_ms'][k]['mean']:8.2f} ms/step  "
                  f"median {summary['step_ms'][k]['median']:8.2f}  "
                  f"({summary['over_none'][k]:.2f}x no-root; rounds {low:.2f}-{high:.2f})"
                  + ("" if faults is None else f"  {faults:7.1f} page faults/step"))
    report = dict(threads=threads, workers=args.workers, shapes=shapes, block_size=args.block_size, steps=args.steps, runs=runs)
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
