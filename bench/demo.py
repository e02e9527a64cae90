"""The main job: a deep autoencoder on scikit-learn's digits, Shampoo against first-order optimizers.

Gradients come from PyTorch autograd on the CPU. Shampoo is shampoo-core's functional API called
directly on the torch tensors (array_api_compat, no copies); the baselines are ``torch.optim``.
Every optimizer gets the same initial weights, the same minibatch sequence and the same step
budget, with a small learning-rate sweep; the best learning rate of each is compared.

Writes ``results.json``, ``loss_curves.png`` and ``summary.md`` under ``--out``.
"""

from __future__ import annotations

import dataclasses
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
    parser.add_argument("--optimizers", default=",".join(DEFAULT_SWEEPS), help="comma-separated subset of "
                        + ", ".join(DEFAULT_SWEEPS))
    parser.add_argument("--lrs", type=int, default=3, help="learning rates per optimizer (1 = the middle one)")
    # One thread: these tensors are small, and a second OpenMP thread made steps 3x slower here.
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(func=run)


def load_digits(torch):
    """1797 8x8 images from scikit-learn (shipped with the package), scaled to [0, 1]."""
    from sklearn.datasets import load_digits as sk_load

    data = sk_load().data / 16.0
    return torch.tensor(data, dtype=torch.float32)


def init_params(torch, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    params = {}
    for i, (n_in, n_out) in enumerate(zip(LAYERS[:-1], LAYERS[1:])):
        bound = math.sqrt(6.0 / (n_in + n_out))  # Glorot uniform
        params[f"w{i}"] = (torch.rand(n_in, n_out, generator=gen) * 2 - 1) * bound
        params[f"b{i}"] = torch.zeros(n_out)
    return params


def forward(torch, params: dict, x):
    n = len(LAYERS) - 1
    for i in range(n):
        x = x @ params[f"w{i}"] + params[f"b{i}"]
        x = torch.tanh(x) if i < n - 1 else torch.sigmoid(x)
    return x


def loss_fn(torch, params, x):
    """Mean squared reconstruction error per pixel."""
    return torch.mean((forward(torch, params, x) - x) ** 2)


def batches(torch, n: int, batch_size: int, steps: int, seed: int):
    gen = torch.Generator().manual_seed(seed + 1)
    out = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=gen)
        out.extend(perm[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size))
    return out[:steps]


def train_shampoo(torch, data, order, lr, args, progress):
    import shampoo_core as sc

    params = init_params(torch, args.seed)
    tx = sc.shampoo(lr, **SHAMPOO_SETTINGS)
    state = tx.init(params)
    steps, losses, opt_time = [], [], 0.0
    start = time.perf_counter()
    eval_time = 0.0
    for t, idx in enumerate(order, start=1):
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        loss = loss_fn(torch, leaves, data[idx])
        grads = torch.autograd.grad(loss, list(leaves.values()))
        grads = dict(zip(leaves, grads))
        t0 = time.perf_counter()
        with torch.no_grad():
            updates, state = tx.update(state, grads, params)
            params = sc.apply_updates(params, updates)
        opt_time += time.perf_counter() - t0
        eval_time += _maybe_eval(torch, t, args, params, data, steps, losses)
        progress.update(1)
    return steps, losses, time.perf_counter() - start - eval_time, opt_time


def train_torch(torch, name, data, order, lr, args, progress):
    params = {k: torch.nn.Parameter(v) for k, v in init_params(torch, args.seed).items()}
    opt = {
        "adam": lambda p: torch.optim.Adam(p, lr=lr),
        "adagrad": lambda p: torch.optim.Adagrad(p, lr=lr),
        "sgd_momentum": lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9),
    }[name](list(params.values()))
    steps, losses, opt_time = [], [], 0.0
    start = time.perf_counter()
    eval_time = 0.0
    for t, idx in enumerate(order, start=1):
        opt.zero_grad()
        loss_fn(torch, params, data[idx]).backward()
        t0 = time.perf_counter()
        opt.step()
        opt_time += time.perf_counter() - t0
        eval_time += _maybe_eval(torch, t, args, params, data, steps, losses)
        progress.update(1)
    return steps, losses, time.perf_counter() - start - eval_time, opt_time


def _maybe_eval(torch, t, args, params, data, steps, losses) -> float:
    if t % args.eval_every and t != args.steps:
        return 0.0
    t0 = time.perf_counter()
    with torch.no_grad():
        value = float(loss_fn(torch, params, data))
    steps.append(t)
    losses.append(value if math.isfinite(value) else float("inf"))
    return time.perf_counter() - t0


def sweep_values(name: str, count: int):
    values = DEFAULT_SWEEPS[name]
    if count >= len(values):
        return values
    mid = len(values) // 2
    return values[mid - count // 2 : mid - count // 2 + count]


def run(args) -> int:
    import torch
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    unknown = [n for n in names if n not in DEFAULT_SWEEPS]
    if unknown:
        raise SystemExit(f"--optimizers: unknown {unknown}; choose from {list(DEFAULT_SWEEPS)}")
    if "adam" not in names:
        names.insert(0, "adam")  # Adam's final loss is the target
    data = load_digits(torch)
    order = batches(torch, data.shape[0], args.batch_size, args.steps, args.seed)
    runs: list[RunResult] = []
    for name in names:
        for lr in sweep_values(name, args.lrs):
            with tqdm(total=args.steps, desc=f"{name:>12} lr={lr:g}", disable=args.no_progress, leave=True) as bar:
                if name == "shampoo":
                    out = train_shampoo(torch, data, order, lr, args, bar)
                else:
                    out = train_torch(torch, name, data, order, lr, args, bar)
            steps, losses, seconds, opt_seconds = out
            runs.append(RunResult(name, lr, steps, losses, losses[-1], seconds, opt_seconds))

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
            train_seconds=r.train_seconds, optimizer_ms_per_step=1e3 * r.optimizer_seconds / args.steps,
            seconds_to_adam_final=None if reach is None else r.train_seconds * reach / args.steps,
        ))

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = dict(
        config=dict(vars(args), func=None, layers=LAYERS, shampoo_settings=SHAMPOO_SETTINGS,
                    sweeps={n: list(sweep_values(n, args.lrs)) for n in names}),
        machine=dict(python=platform.python_version(), torch=torch.__version__, threads=torch.get_num_threads(),
                     cpu_count=os.cpu_count()),
        target_loss=target, adam_steps_to_target=adam_steps, summary=rows,
        runs=[dataclasses.asdict(r) for r in runs],
    )
    (out / "results.json").write_text(json.dumps(report, indent=2))
    table = format_table(rows, target)
    (out / "summary.md").write_text(table + "\n")
    plot(runs, best, target, out / "loss_curves.png")
    print()
    print(table)
    shampoo_row = next((r for r in rows if r["optimizer"] == "shampoo"), None)
    if shampoo_row is not None:
        frac = shampoo_row["fraction_of_adam_steps"]
        verdict = "not reached" if frac is None else f"{frac:.2f} of Adam's steps"
        print(f"\nShampoo reaches Adam's final loss in {verdict} (target: <= 0.67).")
    print(f"Results written to {out}/ (results.json, summary.md, loss_curves.png)")
    return 0


def format_table(rows, target) -> str:
    lines = [
        f"Target: Adam's final training loss {target:.5f} (best learning rate of each optimizer)",
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
            f"{r['train_seconds']:.1f} | {s_to} | {r['optimizer_ms_per_step']:.2f} |"
        )
    return "\n".join(lines)


def plot(runs, best, target, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = dict(shampoo="tab:red", adam="tab:blue", adagrad="tab:green", sgd_momentum="tab:purple")
    for r in runs:
        is_best = best[r.optimizer] is r
        ax.plot(r.steps, r.losses, color=colors.get(r.optimizer), alpha=1.0 if is_best else 0.25,
                lw=2 if is_best else 1, label=f"{r.optimizer} lr={r.learning_rate:g}" if is_best else None)
    ax.axhline(target, color="gray", ls="--", lw=1, label="Adam's final loss")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training MSE (full data)")
    ax.set_title("Digits autoencoder: best learning rate bold, sweep faint")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
