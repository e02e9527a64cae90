"""Per-step cost of each adapter against calling the functional core directly.

Same parameter shapes as the demo's autoencoder, fixed random gradients, Shampoo with the demo's
settings (roots every 10 steps). For each way of running, the median and mean step time over
``--steps`` steps (after ``--warmup`` steps, which include JAX compilation), measured in one run.
"""

from __future__ import annotations

import json
import pathlib
import statistics

from .demo import SHAMPOO_SETTINGS, init_params
from .timing import call_times


def add_arguments(parser) -> None:
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--out", default="results/adapters")
    parser.add_argument("--threads", type=int, default=1)
    parser.set_defaults(func=run)


def _time(step, n: int, warmup: int, sync=None):
    times, _ = call_times(step, n, warmup=warmup, sync=sync)
    return 1e3 * statistics.median(times), 1e3 * statistics.fmean(times)


def _numpy_core(params, grads, n, warmup):
    import shampoo_core as sc

    tx = sc.shampoo(1e-3, **SHAMPOO_SETTINGS)
    box = {"state": tx.init(params)}

    def step():
        _, box["state"] = tx.update(box["state"], grads, params)

    return _time(step, n, warmup)


def _torch_core(params, grads, n, warmup, donate_state: bool = False):
    import torch

    import shampoo_core as sc

    tp = {k: torch.from_numpy(v) for k, v in params.items()}
    tg = {k: torch.from_numpy(v) for k, v in grads.items()}
    tx = sc.shampoo(1e-3, donate_state=donate_state, **SHAMPOO_SETTINGS)
    box = {"state": tx.init(tp)}

    def step():
        with torch.no_grad():
            _, box["state"] = tx.update(box["state"], tg, tp)

    return _time(step, n, warmup)


def _torch_adapter(params, grads, n, warmup):
    import torch

    from backends.torch_optim import Shampoo

    ps = [torch.nn.Parameter(torch.from_numpy(v.copy())) for v in params.values()]
    for p, g in zip(ps, grads.values()):
        p.grad = torch.from_numpy(g)
    opt = Shampoo(ps, lr=1e-3, **SHAMPOO_SETTINGS)
    return _time(opt.step, n, warmup)


def _torch_adam(params, grads, n, warmup):
    import torch

    ps = [torch.nn.Parameter(torch.from_numpy(v.copy())) for v in params.values()]
    for p, g in zip(ps, grads.values()):
        p.grad = torch.from_numpy(g)
    opt = torch.optim.Adam(ps, lr=1e-3)
    return _time(opt.step, n, warmup)


def _jax(params, grads, n, warmup, adapter: bool):
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    import shampoo_core as sc
    from backends import jax_backend  # noqa: F401  (lax.cond gating in both cases)
    from backends import optax_adapter

    jp = {k: jnp.asarray(v) for k, v in params.items()}
    jg = {k: jnp.asarray(v) for k, v in grads.items()}
    if adapter:
        tx = optax_adapter.shampoo(1e-3, **SHAMPOO_SETTINGS)
        update = jax.jit(lambda s: tx.update(jg, s, jp))
    else:
        core = sc.shampoo(1e-3, nonfinite="skip", **SHAMPOO_SETTINGS)
        tx = core
        update = jax.jit(lambda s: core.update(s, jg, jp))
    box = {"state": tx.init(jp)}

    def step():
        _, box["state"] = update(box["state"])

    return _time(step, n, warmup, sync=lambda: jax.block_until_ready(box["state"]))


def run(args) -> int:
    import numpy as np

    try:
        import torch

        torch.set_num_threads(args.threads)
    except ImportError:
        torch = None
    params = init_params(0)
    rng = np.random.default_rng(0)
    grads = {k: rng.standard_normal(v.shape).astype(np.float32) * 1e-2 for k, v in params.items()}
    cases = [("core on NumPy", lambda: _numpy_core(params, grads, args.steps, args.warmup))]
    if torch is not None:
        cases += [
            ("core on torch tensors", lambda: _torch_core(params, grads, args.steps, args.warmup)),
            # What the adapter calls: the state written in place, as torch optimizers write theirs.
            ("core on torch tensors, donate_state=True",
             lambda: _torch_core(params, grads, args.steps, args.warmup, donate_state=True)),
            ("torch.optim adapter", lambda: _torch_adapter(params, grads, args.steps, args.warmup)),
            ("torch.optim.Adam (scale)", lambda: _torch_adam(params, grads, args.steps, args.warmup)),
        ]
    try:
        import jax  # noqa: F401
        import optax  # noqa: F401

        cases += [
            ("core on JAX, jitted", lambda: _jax(params, grads, args.steps, args.warmup, adapter=False)),
            ("optax adapter, jitted", lambda: _jax(params, grads, args.steps, args.warmup, adapter=True)),
        ]
    except ImportError:
        pass
    rows = []
    for name, fn in cases:
        median, mean = fn()
        rows.append(dict(case=name, median_ms=median, mean_ms=mean))
        print(f"{name:<41} median {median:8.2f} ms   mean (incl. root steps) {mean:8.2f} ms")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapters.json").write_text(json.dumps(dict(steps=args.steps, threads=args.threads, rows=rows), indent=2))
    print(f"written to {out}/adapters.json")
    return 0
