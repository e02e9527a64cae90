"""``python -m bench roots``: inverse p-th root methods, timed against the n×n matmul floor.

Matrices are built from known spectra (log-spaced eigenvalues in [1/κ, 1], random orthogonal
eigenvectors), so the exact root Q diag(λ^(-1/p)) Qᵀ is known without an eigensolver; accuracy
is ‖X - X_exact‖_F / ‖X_exact‖_F. Every time is a median over repeats, also given in units of one
n×n matmul of the same dtype measured in the same run (the hardware floor). BLAS threads are
pinned (``--threads``): the libraries' thread pools, and every thread of the process to that
many CPUs (``bench.timing.pinned``); both are reported.
"""

from __future__ import annotations

import json
import pathlib
import statistics
from typing import NamedTuple

from .timing import call_times, pinned, start_jax


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="results/roots")
    parser.add_argument("--sizes", default="64,128,256,512,1024", help="comma-separated n")
    parser.add_argument("--kappas", default="1e2,1e6,1e10")
    parser.add_argument("--powers", default="4", help="root orders p (the batch and size sweep use each)")
    parser.add_argument("--batches", default="64x128,16x512", help="COUNTxN groups of blocks")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=float, default=1.5, help="seconds per measurement at most")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", default="", help="subset of method names (default: all available)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--save-cost-model", default="", help="write a CostModel JSON for root_method='auto'")
    parser.set_defaults(func=run)


def matrix_with_spectrum(n: int, kappa: float, p: float, seed: int = 0):
    """(A, exact A^(-1/p)) in float64, eigenvalues log-spaced in [1/κ, 1]."""
    import numpy as np

    rng = np.random.default_rng(seed + n)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.logspace(0.0, -np.log10(kappa), n)
    return (q * lam) @ q.T, (q * lam ** (-1.0 / p)) @ q.T


def _median_time(fn, repeats: int, budget: float, sync=None):
    """(median seconds, last output) of at most ``repeats`` calls within ``budget`` seconds."""
    times, out = call_times(fn, repeats, sync=sync, budget=budget)
    return statistics.median(times), out


class Method(NamedTuple):
    """One timed root method. ``make(a64, p)`` returns a callable giving (root as float64 NumPy,
    iterations). Core methods name their ``root_method``, namespace and device kind, which key the
    cost model; the others (plain LAPACK and SciPy drivers) leave them ``None``."""

    dtype: str
    make: object
    root_method: str | None = None
    namespace: str | None = None
    device: str | None = None


def methods(threads: int = 1, report: dict | None = None):
    """name -> :class:`Method`."""
    import numpy as np
    import scipy.linalg as sla

    import array_api_compat.numpy as xnp
    import shampoo_core as sc
    from shampoo_core import _xp

    def lapack_root(driver, dtype):
        def make(a, p):
            a_t = a.astype(dtype)

            def go():
                w, q = sla.eigh(a_t, driver=driver, check_finite=False)
                w = np.clip(w, 0.0, None)
                return ((q * w ** (-1.0 / p)) @ q.T).astype(np.float64), 0

            return go

        return make

    def core(method, dtype, xp=xnp, to_np=np.asarray):
        def make(a, p):
            a_t = xp.asarray(a.astype(dtype))

            def go():
                r = sc.inverse_pth_root(a_t, p, epsilon=0.0, method=method, dtype=getattr(xp, dtype))
                return to_np(r.root).astype(np.float64), r.iterations

            return go

        return Method(dtype, make, method, xp.__name__, _xp.device_kind(xp.zeros(1)))

    table = {
        "numpy eigh f64 (plain LAPACK)": Method("float64", lambda a, p: _plain_numpy_eigh(a, p)),
        "core eigh f64": core("eigh", "float64"),
        "core eigh f32": core("eigh", "float32"),
        "scipy evd f64": Method("float64", lapack_root("evd", np.float64)),
        "scipy evd f32": Method("float32", lapack_root("evd", np.float32)),
        "scipy evr f64": Method("float64", lapack_root("evr", np.float64)),
        "scipy evr f32": Method("float32", lapack_root("evr", np.float32)),
        "core newton f64": core("newton", "float64"),
        "core newton f32": core("newton", "float32"),
    }
    try:
        import torch
        import array_api_compat.torch as xt

        torch.set_num_threads(threads)
        table["core newton f64 (torch)"] = core("newton", "float64", xt, lambda x: x.numpy())
        table["core eigh f64 (torch)"] = core("eigh", "float64", xt, lambda x: x.numpy())
    except ImportError:
        pass
    try:
        jax = start_jax(threads, report)
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp

        def jax_core(method):
            def make(a, p):
                a_t = jnp.asarray(a)
                fn = jax.jit(lambda m: sc.inverse_pth_root(m, p, epsilon=0.0, method=method).root)

                def go():
                    return np.asarray(jax.block_until_ready(fn(a_t))), 0

                return go

            # jit runs on JAX's default device, which is a GPU where one is present
            return Method("float64", make, method, jnp.__name__, _xp.device_kind(jnp.zeros(1)))

        table["core newton f64 (jax.jit)"] = jax_core("newton")
        table["core eigh f64 (jax.jit)"] = jax_core("eigh")
    except ImportError:
        pass
    try:
        import cupy
        import array_api_compat.cupy as xc

        if cupy.cuda.runtime.getDeviceCount() > 0:
            table["core eigh f64 (cupy)"] = core("eigh", "float64", xc, lambda x: x.get())
            table["core newton f64 (cupy)"] = core("newton", "float64", xc, lambda x: x.get())
    except Exception:  # no CuPy or no CUDA device
        pass
    return table


def _plain_numpy_eigh(a, p):
    import numpy as np

    def go():
        w, q = np.linalg.eigh(a)
        return (q * np.clip(w, 1e-300, None) ** (-1.0 / p)) @ q.T, 0

    return go


def _matmul_floor(n: int, dtype: str, repeats: int, budget: float) -> float:
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    t, _ = _median_time(lambda: a @ b, repeats, budget)
    return t


def run(args) -> int:
    # Every thread on --threads CPUs: XLA's runtime runs the independent operations of one call
    # side by side, one thread per core, where the BLAS calls of NumPy and torch get one.
    with pinned(args.threads) as thread_info:
        return _run(args, thread_info)


def _run(args, thread_info: dict) -> int:
    import numpy as np

    sizes = [int(x) for x in args.sizes.split(",") if x]
    kappas = [float(x) for x in args.kappas.split(",") if x]
    powers = [int(x) for x in args.powers.split(",") if x]
    table = methods(args.threads, thread_info)
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",")]
        table = {k: v for k, v in table.items() if k in wanted}
    floors = {}
    rows = []

    def measure(n, kappa, p, name, batch=1):
        method = table[name]
        dtype, make = method.dtype, method.make
        key = (n, dtype)
        if key not in floors:
            floors[key] = _matmul_floor(n, dtype, args.repeats, args.budget)
        cases = [matrix_with_spectrum(n, kappa, p, seed=s) for s in range(batch)]
        runners = [make(a, p) for a, _ in cases]

        def go():
            return [r() for r in runners]

        t, outs = _median_time(go, args.repeats, args.budget)
        errors = [np.linalg.norm(x - exact) / np.linalg.norm(exact) for (x, _), (_, exact) in zip(outs, cases)]
        row = dict(method=name, root_method=method.root_method, namespace=method.namespace,
                   device=method.device, n=n, batch=batch, kappa=kappa, p=p, dtype=dtype, seconds=t,
                   seconds_per_block=t / batch, matmul_seconds=floors[key],
                   matmul_units=t / batch / floors[key], rel_error=float(max(errors)),
                   iterations=max(it for _, it in outs))
        rows.append(row)
        print(f"{name:<30} n={n:<5} batch={batch:<3} κ={kappa:<6.0e} p={p} "
              f"{1e3 * t / batch:9.2f} ms/block {row['matmul_units']:7.1f} matmuls  err {row['rel_error']:.1e}"
              + (f"  it {row['iterations']}" if row["iterations"] else ""), flush=True)

    for p in powers:
        for n in sizes:
            for kappa in kappas:
                for name in table:
                    measure(n, kappa, p, name)
        for spec in [b for b in args.batches.split(",") if b]:
            count, n = (int(x) for x in spec.split("x"))
            for name in ("core eigh f64", "core newton f64"):
                if name in table:
                    measure(n, 1e6, p, name, batch=1)
                    measure(n, 1e6, p, name, batch=count)

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = dict(threads=thread_info, numpy=np.__version__, rows=rows, target=_target(rows))
    (out / "roots.json").write_text(json.dumps(report, indent=2))
    if report["target"]:
        t = report["target"]
        print(f"\nTarget (n=1024, p=4, κ<=1e6, accuracy 1e-6): fastest qualifying method "
              f"{t['method']} at {t['ratio_to_plain_eigh']:.2f}x the plain float64 LAPACK eigh")
    if args.save_cost_model:
        model = cost_model_from(rows)
        model.save(args.save_cost_model)
        _print_crossovers(model)
    if not args.no_plot:
        _plot(rows, out / "roots.png")
    print(f"written to {out}/roots.json" + ("" if args.no_plot else " and roots.png"))
    return 0


def cost_model_from(rows):
    """CostModel over the core's methods that reached 1e-6 relative accuracy at every κ <= 1e6,
    keyed by the namespace and device kind each was measured on (rows without them are not the
    core's and are left out)."""
    from shampoo_core import CostModel

    timings: dict = {}
    groups: dict = {}
    for r in rows:
        if not r.get("root_method") or r["batch"] != 1 or r["kappa"] > 1e6:
            continue
        key = (r["namespace"], r["device"], r["dtype"], r["n"], r["root_method"])
        groups.setdefault(key, []).append(r)
    for (namespace, device, dtype, n, method), rs in sorted(groups.items()):
        if all(r["rel_error"] <= 1e-6 for r in rs):
            table = timings.setdefault(namespace, {}).setdefault(device, {}).setdefault(dtype, [])
            if not table or table[-1][0] != n:
                table.append([n, {}])
            table[-1][1][method] = max(r["seconds"] for r in rs)
    return CostModel(timings)


def _print_crossovers(model) -> None:
    for backend, device, dtype in model.entries():
        print(f"auto on {backend} ({device}) {dtype}: {model.crossovers(backend, dtype, device)}")


def _target(rows):
    """The issue's target: 1024, p=4, κ <= 1e6, rel. error <= 1e-6, vs plain float64 eigh time."""
    cand = [r for r in rows if r["n"] == 1024 and r["p"] == 4 and r["batch"] == 1 and r["kappa"] <= 1e6]
    plain = {r["kappa"]: r["seconds"] for r in cand if r["method"].startswith("numpy eigh f64")}
    if not plain:
        return None
    best = None
    for method in {r["method"] for r in cand if not r["method"].startswith("numpy eigh")}:
        mine = [r for r in cand if r["method"] == method]
        if all(r["rel_error"] <= 1e-6 for r in mine) and len(mine) == len(plain):
            ratio = max(r["seconds"] / plain[r["kappa"]] for r in mine)
            if best is None or ratio < best["ratio_to_plain_eigh"]:
                best = dict(method=method, ratio_to_plain_eigh=ratio)
    return best


def _plot(rows, path, title="Inverse p-th root: time vs n (CPU; GPU methods when a GPU is present)") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    singles = [r for r in rows if r["batch"] == 1 and r["p"] == rows[0]["p"] and r["kappa"] == 1e6]
    for method in sorted({r["method"] for r in singles}):
        pts = sorted((r["n"], r["seconds"]) for r in singles if r["method"] == method)
        style = "--" if "f32" in method else "-"
        ax.plot([n for n, _ in pts], [1e3 * t for _, t in pts], style, marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("n")
    ax.set_ylabel("median ms per inverse root (κ = 1e6)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
