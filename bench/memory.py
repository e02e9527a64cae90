"""``python -m bench memory``: optimizer state size in bytes per parameter, on the demo's model.

Counts the bytes of every array in each optimizer's state after one step (float32 parameters,
curvature for the Eva family and K-FAC from one batch of the digits data), and the most memory
NumPy allocates during a step (traced by ``tracemalloc``): the updates, the temporaries, and,
unless the state is donated (``donate_state=True``), the new state. It is measured at step 11,
the first of Shampoo's demo settings that preconditions without computing roots.
"""

from __future__ import annotations

import json
import pathlib


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="results/memory")
    parser.set_defaults(func=run)


def state_bytes(state) -> int:
    import optree

    return sum(int(x.nbytes) if hasattr(x, "nbytes") else x.element_size() * x.numel()
               for x in optree.tree_leaves(state))


# The step whose peak is measured: after start_preconditioning_step and its root step (10).
PEAK_STEP = 11


def step_peak_bytes(update) -> tuple:
    """``(peak, result)``: the most bytes traced by ``tracemalloc`` during ``update()`` above those
    allocated when it starts (NumPy reports its array memory to ``tracemalloc``)."""
    import tracemalloc

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = update()
        return tracemalloc.get_traced_memory()[1] - before, result
    finally:
        tracemalloc.stop()


def run(args) -> int:
    import numpy as np

    import shampoo_core as sc

    from .demo import SHAMPOO_SETTINGS, init_params

    params = init_params(0)
    n = sum(p.size for p in params.values())
    rng = np.random.default_rng(0)
    grads = {k: rng.standard_normal(p.shape).astype(np.float32) for k, p in params.items()}
    opt = {k: (v.T.copy() if k.startswith("w") else v) for k, v in params.items()}
    g_opt = {k: (v.T.copy() if k.startswith("w") else v) for k, v in grads.items()}

    def vectors(k, v):
        return (np.ones(v.shape[0], np.float32), np.ones(v.shape[1], np.float32)) if k.startswith("w") else None

    def factors(k, v, two=True):
        if not k.startswith("w"):
            return None
        return (np.eye(v.shape[0], dtype=np.float32) if two else None, np.eye(v.shape[1], dtype=np.float32))

    cases = {
        "shampoo (block 128, demo settings)": (sc.shampoo(1e-3, **SHAMPOO_SETTINGS), None),
        "shampoo, donate_state=True": (sc.shampoo(1e-3, donate_state=True, **SHAMPOO_SETTINGS), None),
        "adam": (sc.adam(1e-3), None),
        "adagrad": (sc.adagrad(1e-2), None),
        "sgd_momentum": (sc.sgd(0.1, momentum=0.9), None),
        "eva": (sc.eva(1.0), {k: vectors(k, v) for k, v in opt.items()}),
        "eva_f": (sc.eva(1.0, variant="eva_f"), {k: vectors(k, v) for k, v in opt.items()}),
        "eva_s": (sc.eva_s(1.0), None),
        "kfac": (sc.kfac(1.0), {k: factors(k, v) for k, v in opt.items()}),
        "foof": (sc.kfac(1.0, variant="foof"), {k: factors(k, v, two=False) for k, v in opt.items()}),
    }
    rows = []
    for name, (tx, curvature) in cases.items():
        extra = {} if curvature is None else {"curvature": curvature}
        state = tx.init(opt)
        _, state = tx.update(state, g_opt, opt, **extra)
        b = state_bytes(state)
        for _ in range(2, PEAK_STEP):
            _, state = tx.update(state, g_opt, opt, **extra)
        peak, _ = step_peak_bytes(lambda: tx.update(state, g_opt, opt, **extra))
        state = None  # given up to a donated step
        rows.append(dict(optimizer=name, state_bytes=b, bytes_per_parameter=b / n, step_peak_bytes=peak,
                         step_peak_bytes_per_parameter=peak / n))
        print(f"{name:<36} {b / 1e6:8.2f} MB  {b / n:6.2f} bytes/parameter; a step allocates at most "
              f"{peak / 1e6:6.2f} MB ({peak / n:5.2f} bytes/parameter)")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps(dict(parameters=n, rows=rows), indent=2))
    print(f"{n} float32 parameters; written to {out}/memory.json")
    return 0
