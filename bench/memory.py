"""``python -m bench memory``: optimizer state size in bytes per parameter, on the demo's model.

Counts the bytes of every array in each optimizer's state after one step (float32 parameters,
curvature for the Eva family and K-FAC from one batch of the digits data).
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
        state = tx.init(opt)
        if curvature is None:
            _, state = tx.update(state, g_opt, opt)
        else:
            _, state = tx.update(state, g_opt, opt, curvature=curvature)
        b = state_bytes(state)
        rows.append(dict(optimizer=name, state_bytes=b, bytes_per_parameter=b / n))
        print(f"{name:<36} {b / 1e6:8.2f} MB  {b / n:6.2f} bytes/parameter")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps(dict(parameters=n, rows=rows), indent=2))
    print(f"{n} float32 parameters; written to {out}/memory.json")
    return 0
