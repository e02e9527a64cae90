"""The main job: a deep autoencoder on scikit-learn's digits, Shampoo against first-order optimizers.

``--framework`` picks how the optimizers run:

* ``torch`` (default): gradients from PyTorch autograd; Shampoo through the ``torch.optim``
  adapter (``backends.torch_optim.Shampoo``); baselines from ``torch.optim``.
* ``jax``: gradients from ``jax.value_and_grad``; the whole step (gradient, update, apply) under
  ``jax.jit``; Shampoo through the optax adapter; baselines from optax with torch's settings.
* ``numpy``: gradients from PyTorch autograd, shared zero-copy with NumPy; Shampoo is the
  functional core called on NumPy arrays; baselines from ``torch.optim``.

Every optimizer gets the same initial weights and minibatch sequence (made with NumPy, so the
frameworks start identically) and the same step budget, with a small learning-rate sweep; the
best learning rate of each is compared.

Writes ``results.json``, ``loss_curves.png`` and ``summary.md`` under ``--out``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import platform
import time

LAYERS = (64, 256, 128, 64, 16, 64, 128, 256, 64)
DEFAULT_SWEEPS = {
    "shampoo": (1e-3, 3e-3, 1e-2),
    "adam": (1e-3, 3e-3, 1e-2),
    "adagrad": (3e-3, 1e-2, 3e-2),
    "sgd_momentum": (1e-1, 3e-1, 1.0),
}
# The Eva family (not in the default run; torch and numpy: module hooks; jax: output taps under
# jit). Ranges chosen so that each best learning rate lies inside its sweep here (docs/eva.md).
EVA_SWEEPS = {
    "eva": (1e-1, 3e-1, 1.0),
    "eva_s": (1.0, 3.0, 10.0),
    "eva_f": (10.0, 30.0, 100.0),
    "kfac": (3e-1, 1.0, 3.0),
    "foof": (10.0, 30.0, 100.0),
}
ALL_SWEEPS = {**DEFAULT_SWEEPS, **EVA_SWEEPS}
# Shampoo's settings other than the learning rate (fixed, not tuned per run).
SHAMPOO_SETTINGS = dict(
    block_size=128, beta1=0.9, beta2=0.999, epsilon=1e-6, graft_type="adam", diagonal_epsilon=1e-8,
    start_preconditioning_step=10, preconditioning_compute_steps=10,
)


@dataclasses.dataclass
class RunResult:
    optimizer: str
    learning_rate: float
    steps: list
    losses: list
    final_loss: float
    train_seconds: float
    optimizer_seconds: float

    def steps_to(self, target: float):
        for s, loss in zip(self.steps, self.losses):
            if loss <= target:
                return s
        return None


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="results/demo", help="folder for results.json, loss_curves.png, summary.md")
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps per run (equal budget)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--eval-every", type=int, default=20, help="steps between full-data loss evaluations")
    parser.add_argument("--optimizers", default=",".join(DEFAULT_SWEEPS), help="comma-separated, from "
                        + ", ".join(ALL_SWEEPS) + " (eva-s and eva_s both work)")
    parser.add_argument("--lrs", type=int, default=3, help="learning rates per optimizer (1 = the middle one)")
    # One thread: these tensors are small, and a second OpenMP thread made steps 3x slower here.
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--framework", choices=("torch", "jax", "numpy"), default="torch",
                        help="how gradients and optimizers run (see the module docstring)")
    parser.add_argument("--device", default="cpu", help="torch device of the model and data (--framework torch)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="dtype of the model and data (--framework torch); losses are evaluated in float32")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(func=run)


def load_digits():
    """1797 8x8 images from scikit-learn (shipped with the package), scaled to [0, 1], float32."""
    import numpy as np
    from sklearn.datasets import load_digits as sk_load

    return (sk_load().data / 16.0).astype(np.float32)


def init_params(seed: int) -> dict:
    """Glorot-uniform weights (in, out) and zero biases, float32 NumPy arrays."""
    import numpy as np

    rng = np.random.default_rng(seed)
    params = {}
    for i, (n_in, n_out) in enumerate(zip(LAYERS[:-1], LAYERS[1:])):
        bound = math.sqrt(6.0 / (n_in + n_out))
        params[f"w{i}"] = rng.uniform(-bound, bound, size=(n_in, n_out)).astype(np.float32)
        params[f"b{i}"] = np.zeros(n_out, dtype=np.float32)
    return params


def batches(n: int, batch_size: int, steps: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed + 1)
    out = []
    while len(out) < steps:
        perm = rng.permutation(n)
        out.extend(perm[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size))
    return out[:steps]


def forward(lib, params: dict, x, record=None):
    """The autoencoder for ``lib`` = torch or jax.numpy (tanh hidden layers, sigmoid output).

    ``record``: a list that receives (layer input, pre-activation) per layer (for curvature).
    """
    n = len(LAYERS) - 1
    for i in range(n):
        inp = x
        x = x @ params[f"w{i}"] + params[f"b{i}"]
        if record is not None:
            record.append((inp, x))
        x = lib.tanh(x) if i < n - 1 else 1.0 / (1.0 + lib.exp(-x))
    return x


def loss_fn(lib, params, x):
    """Mean squared reconstruction error per pixel."""
    return lib.mean((forward(lib, params, x) - x) ** 2)


class _Recorder:
    """Full-data loss every ``eval_every`` steps; evaluation time is kept out of the timings."""

    def __init__(self, args, evaluate):
        self.args, self.evaluate = args, evaluate
        self.steps, self.losses, self.eval_seconds = [], [], 0.0

    def after(self, t, params):
        if t % self.args.eval_every and t != self.args.steps:
            return
        t0 = time.perf_counter()
        value = float(self.evaluate(params))
        self.steps.append(t)
        self.losses.append(value if math.isfinite(value) else float("inf"))
        self.eval_seconds += time.perf_counter() - t0


def _device_sync(tensor):
    """Waits for queued CUDA work, so that the optimizer's time excludes the backward pass still
    running and includes its own kernels (a no-op on the CPU)."""
    import torch

    return torch.cuda.synchronize if tensor.is_cuda else (lambda: None)


def train_torch(name, lr, data_np, order, args, progress, functional_numpy=False):
    """torch autograd; Shampoo via the torch.optim adapter, or the core on NumPy (numpy framework)."""
    import torch

    dtype = getattr(torch, args.dtype)
    data32 = torch.from_numpy(data_np).to(args.device)
    data = data32.to(dtype)
    params = {k: torch.nn.Parameter(torch.from_numpy(v.copy()).to(device=args.device, dtype=dtype))
              for k, v in init_params(args.seed).items()}
    rec = _Recorder(args, lambda p: loss_fn(torch, {k: v.float() for k, v in p.items()}, data32).detach())
    opt_seconds = 0.0
    if name == "shampoo" and functional_numpy:
        import shampoo_core as sc

        arrays = {k: v.detach().numpy().copy() for k, v in params.items()}
        tx = sc.shampoo(lr, **SHAMPOO_SETTINGS)
        state = tx.init(arrays)
        start = time.perf_counter()
        for t, idx in enumerate(order, start=1):
            leaves = {k: torch.from_numpy(v).requires_grad_(True) for k, v in arrays.items()}  # zero-copy
            grads = torch.autograd.grad(loss_fn(torch, leaves, data[idx]), list(leaves.values()))
            grads = {k: g.numpy() for k, g in zip(leaves, grads)}  # zero-copy
            t0 = time.perf_counter()
            updates, state = tx.update(state, grads, arrays)
            arrays = sc.apply_updates(arrays, updates)
            opt_seconds += time.perf_counter() - t0
            with torch.no_grad():
                rec.after(t, {k: torch.from_numpy(v) for k, v in arrays.items()})
            progress.update(1)
        return rec, time.perf_counter() - start - rec.eval_seconds, opt_seconds

    if name == "shampoo":
        from backends.torch_optim import Shampoo

        opt = Shampoo(list(params.values()), lr=lr, **SHAMPOO_SETTINGS)
    else:
        opt = {
            "adam": lambda p: torch.optim.Adam(p, lr=lr),
            "adagrad": lambda p: torch.optim.Adagrad(p, lr=lr),
            "sgd_momentum": lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9),
        }[name](list(params.values()))
    sync = _device_sync(data)
    start = time.perf_counter()
    for t, idx in enumerate(order, start=1):
        opt.zero_grad()
        loss_fn(torch, params, data[idx]).backward()
        sync()
        t0 = time.perf_counter()
        opt.step()
        sync()
        opt_seconds += time.perf_counter() - t0
        with torch.no_grad():
            rec.after(t, params)
        progress.update(1)
    return rec, time.perf_counter() - start - rec.eval_seconds, opt_seconds


def _eva_transformation(name, lr, nonfinite="raise"):
    """``nonfinite="skip"`` under ``jax.jit``, where a traced NaN check cannot raise."""
    import shampoo_core as sc

    make, extra = {
        "eva": (sc.eva, {}), "eva_f": (sc.eva, {"variant": "eva_f"}), "eva_s": (sc.eva_s, {}),
        "kfac": (sc.kfac, {}), "foof": (sc.kfac, {"variant": "foof"}),
    }[name]
    return make(lr, nonfinite=nonfinite, **extra)


# What each member of the Eva family needs from the layers: vectors, factors, or gradients only.
EVA_KIND = {"eva": "eva", "eva_f": "eva", "eva_s": None, "kfac": "kfac", "foof": "kfac"}


def train_eva_family(name, lr, data_np, order, args, progress):
    """Eva, Eva-s, Eva-f, K-FAC, FOOF on an ``nn.Module`` through ``backends.torch_curvature``.

    The module holds the same initial weights as the functional model (``nn.Linear`` stores them
    as (out, in)); the hooks collect ā and ḡ (or A and S) from every layer, with the bias folded
    in as an input column of ones, as in the Eva paper.
    """
    import torch

    from backends.torch_curvature import CurvatureOptimizer

    data = torch.from_numpy(data_np).to(args.device)
    model = _torch_autoencoder(init_params(args.seed)).to(args.device)
    opt = CurvatureOptimizer(model, _eva_transformation(name, lr), kind=EVA_KIND[name])

    def evaluate(m):
        with torch.no_grad():
            return torch.mean((m(data) - data) ** 2)

    rec = _Recorder(args, evaluate)
    opt_seconds = 0.0
    sync = _device_sync(data)
    start = time.perf_counter()
    for t, idx in enumerate(order, start=1):
        model.zero_grad()
        x = data[idx]
        torch.mean((model(x) - x) ** 2).backward()
        sync()
        t0 = time.perf_counter()
        opt.step()
        sync()
        opt_seconds += time.perf_counter() - t0
        rec.after(t, model)
        progress.update(1)
    return rec, time.perf_counter() - start - rec.eval_seconds, opt_seconds


def _torch_autoencoder(params):
    """``forward`` as an ``nn.Sequential`` of ``nn.Linear`` layers holding ``params``."""
    import torch

    n = len(LAYERS) - 1
    modules = []
    for i in range(n):
        layer = torch.nn.Linear(LAYERS[i], LAYERS[i + 1])
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(params[f"w{i}"].T.copy()))
            layer.bias.copy_(torch.from_numpy(params[f"b{i}"]))
        modules += [layer, torch.nn.Tanh() if i < n - 1 else torch.nn.Sigmoid()]
    return torch.nn.Sequential(*modules)


def train_eva_family_jax(name, lr, data_np, order, args, progress):
    """The Eva family under ``jax.jit``: curvature from ``backends.jax_curvature`` output taps.

    Each layer's parameters are one (out, in + 1) matrix [W | b] (the bias folded in, as in the
    torch run); the whole step (gradients, curvature, update, apply) is one jitted function.
    """
    import jax

    jax.config.update("jax_enable_x64", True)  # float64 K-FAC inverses; the model stays float32
    import jax.numpy as jnp

    from backends.jax_curvature import Taps, value_grads_and_curvature

    n = len(LAYERS) - 1
    p0 = init_params(args.seed)
    import numpy as np

    params = {f"l{i}": jnp.asarray(np.concatenate([p0[f"w{i}"].T, p0[f"b{i}"][:, None]], axis=1)) for i in range(n)}
    data = jnp.asarray(data_np)
    tx = _eva_transformation(name, lr, nonfinite="skip")
    kind = EVA_KIND[name]

    def loss_with_taps(p, taps, x):
        h = x
        for i in range(n):
            z = taps.dense(p[f"l{i}"], h)
            h = jnp.tanh(z) if i < n - 1 else 1.0 / (1.0 + jnp.exp(-z))
        return jnp.mean((h - x) ** 2)

    @functools.partial(jax.jit, donate_argnums=(0, 1))  # parameters and state written in place
    def step(p, s, idx):
        x = data[idx]
        if kind is None:
            grads = jax.grad(lambda q: loss_with_taps(q, Taps(), x))(p)
            updates, s = tx.update(s, grads, p)
        else:
            _, grads, curvature = value_grads_and_curvature(loss_with_taps, p, x, kind=kind)
            updates, s = tx.update(s, grads, p, curvature=curvature)
        return jax.tree_util.tree_map(jnp.add, p, updates), s

    return _run_jitted(step, params, tx.init(params), jax.jit(lambda p: loss_with_taps(p, Taps(), data)),
                       order, args, progress)


def train_jax(name, lr, data_np, order, args, progress):
    """The whole step under jax.jit; Shampoo via the optax adapter, baselines via optax."""
    import jax

    jax.config.update("jax_enable_x64", True)  # float64 roots; the model stays float32
    import jax.numpy as jnp
    import optax

    data = jnp.asarray(data_np)
    params = {k: jnp.asarray(v) for k, v in init_params(args.seed).items()}
    if name == "shampoo":
        from backends import optax_adapter

        tx = optax_adapter.shampoo(lr, **SHAMPOO_SETTINGS)
    else:
        tx = {
            "adam": lambda: optax.adam(lr, eps=1e-8),
            "adagrad": lambda: optax.adagrad(lr, initial_accumulator_value=0.0, eps=1e-10),
            "sgd_momentum": lambda: optax.sgd(lr, momentum=0.9),
        }[name]()

    @functools.partial(jax.jit, donate_argnums=(0, 1))  # parameters and state written in place
    def step(p, s, idx):
        grads = jax.grad(lambda q: loss_fn(jnp, q, data[idx]))(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    return _run_jitted(step, params, tx.init(params), jax.jit(lambda p: loss_fn(jnp, p, data)),
                       order, args, progress)


def _run_jitted(step, params, state, evaluate, order, args, progress):
    """Drive a jitted ``step(params, state, idx)`` that donates its parameters and state (each
    call's are written into the buffers of the last); the optimizer's own time is not separable."""
    import jax
    import jax.numpy as jnp

    # Committed to the device like the step's outputs: uncommitted inputs would make the second
    # call compile the step again.
    params, state = jax.device_put((params, state), jax.devices()[0])
    rec = _Recorder(args, evaluate)
    start = time.perf_counter()
    for t, idx in enumerate(order, start=1):
        params, state = step(params, state, jnp.asarray(idx))
        if t % args.eval_every == 0 or t == args.steps:
            jax.block_until_ready(params)
        rec.after(t, params)
        progress.update(1)
    jax.block_until_ready(params)
    return rec, time.perf_counter() - start - rec.eval_seconds, None


def sweep_values(name: str, count: int):
    values = ALL_SWEEPS[name]
    if count >= len(values):
        return values
    mid = len(values) // 2
    return values[mid - count // 2 : mid - count // 2 + count]


def run(args) -> int:
    from tqdm import tqdm

    if args.device != "cpu" and args.framework != "torch":
        raise SystemExit(f"--device {args.device}: only --framework torch places the model on a device "
                         "(jax uses its default device; numpy is the host)")
    if args.dtype != "float32" and args.framework != "torch":
        raise SystemExit(f"--dtype {args.dtype}: only --framework torch trains in another dtype")
    if args.framework in ("torch", "numpy"):
        import torch

        torch.set_num_threads(args.threads)
        try:
            torch.empty(0, device=args.device)  # fail before any training, not inside the first run
        except (RuntimeError, AssertionError) as err:
            raise SystemExit(f"--device {args.device}: {err}") from err
    names = [n.strip().replace("-", "_") for n in args.optimizers.split(",") if n.strip()]
    unknown = [n for n in names if n not in ALL_SWEEPS]
    if unknown:
        raise SystemExit(f"--optimizers: unknown {unknown}; choose from {list(ALL_SWEEPS)}")
    if args.dtype != "float32" and any(n in EVA_SWEEPS for n in names):
        raise SystemExit(f"--dtype {args.dtype}: the Eva family runs in float32 here; leave it out of --optimizers")
    if "adam" not in names:
        names.insert(0, "adam")  # Adam's final loss is the target
    data = load_digits()
    order = batches(data.shape[0], args.batch_size, args.steps, args.seed)
    runs: list[RunResult] = []
    for name in names:
        for lr in sweep_values(name, args.lrs):
            desc = f"{args.framework}:{name:>12} lr={lr:g}"
            with tqdm(total=args.steps, desc=desc, disable=args.no_progress, leave=True) as bar:
                if name in EVA_SWEEPS and args.framework == "jax":
                    rec, seconds, opt_seconds = train_eva_family_jax(name, lr, data, order, args, bar)
                elif name in EVA_SWEEPS:
                    rec, seconds, opt_seconds = train_eva_family(name, lr, data, order, args, bar)
                elif args.framework == "jax":
                    rec, seconds, opt_seconds = train_jax(name, lr, data, order, args, bar)
                else:
                    rec, seconds, opt_seconds = train_torch(
                        name, lr, data, order, args, bar, functional_numpy=args.framework == "numpy"
                    )
            runs.append(RunResult(name, lr, rec.steps, rec.losses, rec.losses[-1], seconds, opt_seconds))

    best = {}
    for r in runs:
        if r.optimizer not in best or r.final_loss < best[r.optimizer].final_loss:
            best[r.optimizer] = r
    target = best["adam"].final_loss
    adam_steps = best["adam"].steps_to(target)
    rows = []
    for name in names:
        r = best[name]
        reach = r.steps_to(target)
        rows.append(dict(
            optimizer=name, learning_rate=r.learning_rate, final_loss=r.final_loss, steps_to_adam_final=reach,
            fraction_of_adam_steps=None if reach is None else reach / adam_steps,
            train_seconds=r.train_seconds,
            optimizer_ms_per_step=None if r.optimizer_seconds is None else 1e3 * r.optimizer_seconds / args.steps,
            seconds_to_adam_final=None if reach is None else r.train_seconds * reach / args.steps,
        ))

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = dict(
        config=dict(vars(args), func=None, layers=LAYERS, shampoo_settings=SHAMPOO_SETTINGS,
                    sweeps={n: list(sweep_values(n, args.lrs)) for n in names}),
        machine=dict(python=platform.python_version(), framework=args.framework, device=args.device,
                     versions=_versions(args.framework),
                     threads=args.threads, cpu_count=os.cpu_count()),
        target_loss=target, adam_steps_to_target=adam_steps, summary=rows,
        runs=[dataclasses.asdict(r) for r in runs],
    )
    (out / "results.json").write_text(json.dumps(report, indent=2))
    table = format_table(rows, target)
    (out / "summary.md").write_text(table + "\n")
    plot(runs, best, target, out / "loss_curves.png", args.framework)
    print()
    print(table)
    shampoo_row = next((r for r in rows if r["optimizer"] == "shampoo"), None)
    if shampoo_row is not None:
        frac = shampoo_row["fraction_of_adam_steps"]
        verdict = "not reached" if frac is None else f"{frac:.2f} of Adam's steps"
        print(f"\nShampoo reaches Adam's final loss in {verdict} (target: <= 0.67).")
    print(f"Results written to {out}/ (results.json, summary.md, loss_curves.png)")
    return 0


def _versions(framework: str) -> dict:
    import importlib.metadata as md

    names = ["numpy", "torch"] if framework != "jax" else ["numpy", "jax", "optax"]
    return {n: md.version(n) for n in names}


def format_table(rows, target) -> str:
    lines = [
        f"Target: Adam's final training loss {target:.5f} (best learning rate of each optimizer)",
        "optimizer ms/step: time in the optimizer's own step (not separable when the whole step is jitted)",
        "",
        "| optimizer | lr | final loss | steps to target | x Adam's steps | train s | s to target | opt ms/step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        reach = "-" if r["steps_to_adam_final"] is None else str(r["steps_to_adam_final"])
        frac = "-" if r["fraction_of_adam_steps"] is None else f"{r['fraction_of_adam_steps']:.2f}"
        s_to = "-" if r["seconds_to_adam_final"] is None else f"{r['seconds_to_adam_final']:.1f}"
        lines.append(
            f"| {r['optimizer']} | {r['learning_rate']:g} | {r['final_loss']:.5f} | {reach} | {frac} | "
            f"{r['train_seconds']:.1f} | {s_to} | {_ms(r['optimizer_ms_per_step'])} |"
        )
    return "\n".join(lines)


def _ms(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def plot(runs, best, target, path, framework: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = dict(shampoo="tab:red", adam="tab:blue", adagrad="tab:green", sgd_momentum="tab:purple",
                  eva="tab:orange", eva_s="tab:brown", eva_f="tab:pink", kfac="tab:gray", foof="tab:olive")
    for r in runs:
        is_best = best[r.optimizer] is r
        ax.plot(r.steps, r.losses, color=colors.get(r.optimizer), alpha=1.0 if is_best else 0.25,
                lw=2 if is_best else 1, label=f"{r.optimizer} lr={r.learning_rate:g}" if is_best else None)
    ax.axhline(target, color="gray", ls="--", lw=1, label="Adam's final loss")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training MSE (full data)")
    ax.set_title(f"Digits autoencoder ({framework}): best learning rate bold, sweep faint")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
