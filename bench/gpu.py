"""``python -m bench gpu``: inverse roots, batched eigh and host roots on accelerator arrays.

The accelerator rows of ``bench roots`` and ``bench pipeline``, measured with device
synchronization, on every backend named in ``--backends`` that is present (the others are skipped
with the reason, so the command also runs on a machine without a GPU):

* roots: the core's eigh and coupled-Newton inverse p-th roots (float32 and float64) against the
  backend's plain eigh and one n×n matmul of the same dtype on the same device, accuracy against
  the exact root of a matrix with a known spectrum (as in ``bench roots``);
* batched vs loop: eigenvalues of ``count`` blocks of n×n, one ``linalg.eigh`` per block (what the
  core does) against one batched call (on CuPy and CUDA torch, batched Jacobi for small n);
* step: a Shampoo step on device parameters with no root work, with roots on the device, and with
  roots on the host CPU (``AsyncPreconditioners(host=True)``: statistics copied to NumPy, roots
  copied back), mean ms per step;
* step floor, for each of ``--floor-block-sizes``: the median non-root step against the matmuls
  it must do, timed as a loop of 2-D matmuls and as one batched matmul per group of equal blocks
  (``bench/device_step.py``), in ms and in elementwise passes; ``torch.optim.AdamW`` on the same
  device for scale.

``numpy`` and ``torch`` (CPU) run the same harness for comparison. ``--save-cost-model`` writes the
``root_method="auto"`` cost model of the measured backends (the CuPy crossover sizes).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="results/gpu")
    parser.add_argument("--backends", default="cupy,torch:cuda", help="comma-separated: cupy, torch:cuda, torch, numpy")
    parser.add_argument("--sizes", default="64,128,256,512,1024,2048,4096")
    parser.add_argument("--kappa", type=float, default=1e6)
    parser.add_argument("--power", type=int, default=4)
    parser.add_argument("--batches", default="256x8,256x16,256x32,64x64,64x128,16x512", help="COUNTxN groups")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=float, default=2.0, help="seconds per measurement at most")
    parser.add_argument("--scale", type=int, default=1, help="divide bench step's dims by this")
    parser.add_argument("--block-size", type=int, default=512, help="block_size of the step runs with roots")
    parser.add_argument("--floor-block-sizes", default="128,512,1024",
                        help="block sizes of the step-against-floor rows (empty: none)")
    parser.add_argument("--every", type=int, default=10, help="preconditioning_compute_steps of the step runs")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per step mode")
    parser.add_argument("--threads", type=int, default=1, help="host BLAS threads per worker (host roots, NumPy)")
    parser.add_argument("--host-workers", type=int, default=8, help="AsyncPreconditioners workers (host roots)")
    parser.add_argument("--save-cost-model", default="")
    parser.set_defaults(func=run)


@dataclasses.dataclass(frozen=True)
class Backend:
    """An array namespace on one device, with the barrier that makes its timings honest."""

    name: str
    xp: object
    device: object
    sync: object  # () -> None: wait for the device's queued work

    def asarray(self, a, dtype=None):
        dtype = getattr(self.xp, (dtype or a.dtype.name))
        if self.device is None:
            return self.xp.asarray(a, dtype=dtype)
        return self.xp.asarray(a, dtype=dtype, device=self.device)


def load_backend(name: str) -> Backend:
    """The backend called ``name``. Raises ImportError (with the reason) where it is not present."""
    if name == "numpy":
        import array_api_compat.numpy as xp

        return Backend(name, xp, None, lambda: None)
    if name in ("torch", "torch:cuda"):
        import torch
        import array_api_compat.torch as xp

        if name == "torch":
            return Backend(name, xp, torch.device("cpu"), lambda: None)
        if not torch.cuda.is_available():
            raise ImportError("torch has no CUDA device")
        return Backend(name, xp, torch.device("cuda"), torch.cuda.synchronize)
    if name == "cupy":
        import cupy
        import array_api_compat.cupy as xp

        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise ImportError("no CUDA device")
        return Backend(name, xp, cupy.cuda.Device(0), lambda: cupy.cuda.get_current_stream().synchronize())
    raise ValueError(f"backends: unknown backend {name!r}; expected cupy, torch:cuda, torch or numpy")


def _time(backend: Backend, fn, repeats: int, budget: float):
    from .roots import _median_time

    return _median_time(fn, repeats, budget, sync=backend.sync)


def root_rows(backend: Backend, sizes, kappa: float, p: int, repeats: int, budget: float) -> list:
    """Rows in ``bench roots``' format: method, n, dtype, seconds, matmul units, rel_error."""
    import numpy as np

    import shampoo_core as sc
    from shampoo_core import _xp

    from .roots import matrix_with_spectrum

    xp = backend.xp
    rows = []
    for n in sizes:
        a64, exact = matrix_with_spectrum(n, kappa, p)
        for dtype in ("float64", "float32"):
            a = backend.asarray(a64.astype(dtype))
            b = backend.asarray(np.random.default_rng(n).standard_normal((n, n)).astype(dtype))
            floor, _ = _time(backend, lambda: a @ b, repeats, budget)

            def plain():
                w, q = xp.linalg.eigh(a)
                return (q * xp.clip(w, min=1e-30) ** (-1.0 / p)) @ q.mT

            runs = {f"plain eigh f{dtype[-2:]} ({backend.name})": plain}
            for method in ("eigh", "newton"):
                runs[f"core {method} f{dtype[-2:]}"] = (
                    lambda method=method: sc.inverse_pth_root(a, p, epsilon=0.0, method=method).root)
            for label, fn in runs.items():
                seconds, root = _time(backend, fn, repeats, budget)
                x = _xp.to_numpy(root).astype(np.float64)
                error = float(np.linalg.norm(x - exact) / np.linalg.norm(exact))
                method = label if label.startswith("plain") else f"{label} ({backend.name})"
                core = None if label.startswith("plain") else label.split()[1]
                rows.append(dict(method=method, backend=backend.name, root_method=core, namespace=xp.__name__,
                                 device=_xp.device_kind(a), n=n, batch=1, kappa=kappa, p=p,
                                 dtype=dtype, seconds=seconds, matmul_seconds=floor,
                                 matmul_units=seconds / floor, rel_error=error))
                print(f"{method:<28} n={n:<5} {1e3 * seconds:9.3f} ms {seconds / floor:8.1f} matmuls"
                      f"  err {error:.1e}", flush=True)
    return rows


def batched_vs_loop(backend: Backend, count: int, n: int, repeats: int, budget: float) -> dict:
    """Eigenvalues of ``count`` SPD n×n blocks: a loop of 2-D eigh calls vs one batched call."""
    import numpy as np

    from shampoo_core import _xp

    xp = backend.xp
    rng = np.random.default_rng(count * n)
    g = rng.standard_normal((count, n, 2 * n))
    blocks = backend.asarray(g @ np.swapaxes(g, -1, -2) / (2 * n))
    singles = [blocks[i, ...] for i in range(count)]

    def loop():
        return [xp.linalg.eigh(s)[0] for s in singles]

    def batched():
        return xp.linalg.eigh(blocks)[0]

    loop_s, w_loop = _time(backend, loop, repeats, budget)
    batched_s, w_batched = _time(backend, batched, repeats, budget)
    w_loop = np.stack([_xp.to_numpy(w) for w in w_loop])
    difference = float(np.max(np.abs(w_loop - _xp.to_numpy(w_batched))) / np.max(np.abs(w_loop)))
    row = dict(backend=backend.name, count=count, n=n, loop_seconds=loop_s, batched_seconds=batched_s,
               loop_over_batched=loop_s / batched_s, max_relative_eigenvalue_difference=difference)
    print(f"{backend.name:<10} {count:>4} blocks of {n:<4} loop {1e3 * loop_s:9.3f} ms  "
          f"batched {1e3 * batched_s:9.3f} ms  loop/batched {loop_s / batched_s:6.2f}  diff {difference:.1e}",
          flush=True)
    return row


def step_times(backend: Backend, shapes: dict, block_size: int, every: int, steps: int, host_workers: int = 1) -> dict:
    """Mean and median ms per Shampoo step on ``backend``: no root work, device roots, host roots;
    for host roots also the workers' busy ms per step, their load (busy share of each worker over
    the run) and the ms each step waited for them (``AsyncPreconditioners.times``)."""
    import shampoo_core as sc

    from .pipeline import _whole_periods, step_costs
    from .step import model_problem

    params, grads = ({k: backend.asarray(v) for k, v in tree.items()} for tree in model_problem(shapes))
    common = dict(block_size=block_size, start_preconditioning_step=1)
    steps = _whole_periods(steps, every)

    def measure(tx, executor=None):
        # Warm-up: the first root step and a full root period, so no cold start is timed.
        costs = step_costs(tx, params, grads, steps, every + 1, sync=backend.sync, executor=executor)
        row = dict(mean_ms=costs.mean, median_ms=costs.median)
        if executor is not None:
            row.update(worker_busy_ms=costs.busy, worker_load=costs.busy / (executor.max_workers * costs.mean),
                       waited_ms=costs.waited)
        return row

    out = {"none": measure(sc.shampoo(1e-3, preconditioning_compute_steps=10**9, **common)),
           "device_roots": measure(sc.shampoo(1e-3, preconditioning_compute_steps=every, **common))}
    with sc.AsyncPreconditioners(max_workers=host_workers, max_staleness=every, host=True) as ex:
        out["host_roots_async"] = measure(
            sc.shampoo(1e-3, preconditioning_compute_steps=every, async_preconditioners=ex, **common), ex)
    none = out["none"]["mean_ms"]
    for mode, r in out.items():
        r["over_none"] = r["mean_ms"] / none
        print(f"{backend.name:<10} step {mode:<17} mean {r['mean_ms']:9.2f} ms  median {r['median_ms']:9.2f}"
              f"  ({r['over_none']:.2f}x no root work)"
              + (f"  workers {r['worker_load']:.2f} busy, steps waited {r['waited_ms']:.2f} ms"
                 if "worker_load" in r else ""), flush=True)
    return out


def run(args) -> int:
    from . import device_step
    from .roots import _print_crossovers, cost_model_from
    from .timing import limit_threads
    from .step import model_problem, scaled_shapes

    thread_info = limit_threads(args.threads)
    sizes = [int(x) for x in args.sizes.split(",") if x]
    batches = [tuple(int(x) for x in b.split("x")) for b in args.batches.split(",") if b]
    shapes = scaled_shapes(args.scale)
    floor_blocks = [int(b) for b in args.floor_block_sizes.split(",") if b]
    problem = model_problem(shapes)  # NumPy (params, grads), copied to each backend
    report = dict(threads=thread_info, skipped={}, roots=[], batched=[], step={}, step_floor={}, adamw_ms={})
    for name in [b.strip() for b in args.backends.split(",") if b.strip()]:
        try:
            backend = load_backend(name)
        except ImportError as err:
            report["skipped"][name] = str(err) or type(err).__name__
            print(f"{name}: skipped ({report['skipped'][name]})", flush=True)
            continue
        report["roots"] += root_rows(backend, sizes, args.kappa, args.power, args.repeats, args.budget)
        report["batched"] += [batched_vs_loop(backend, c, n, args.repeats, args.budget) for c, n in batches]
        if args.steps:
            report["step"][name] = step_times(backend, shapes, args.block_size, args.every, args.steps,
                                              args.host_workers)
            report["step_floor"][name] = [device_step.floor_row(backend, *problem, b, args.steps, args.repeats,
                                                                args.budget) for b in floor_blocks]
            report["adamw_ms"][name] = device_step.adamw_ms(backend, *problem, args.steps)
            for variant, ms in report["adamw_ms"][name].items():
                print(f"{name:<10} torch.optim.AdamW ({variant}) step {ms:.2f} ms", flush=True)
    if args.save_cost_model and report["roots"]:
        model = cost_model_from(report["roots"])
        pathlib.Path(args.save_cost_model).parent.mkdir(parents=True, exist_ok=True)
        model.save(args.save_cost_model)
        _print_crossovers(model)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(report, indent=2))
    if report["roots"]:
        from .roots import _plot

        _plot(report["roots"], out / "gpu.png", title="Inverse p-th root on each backend's device: time vs n")
    print(f"written to {out}/gpu.json" + (" and gpu.png" if report["roots"] else ""))
    return 0
