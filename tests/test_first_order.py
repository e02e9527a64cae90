"""The grafting optimizers on their own match torch.optim (an independent implementation)."""

import numpy as np
import pytest

import shampoo_core as sc
from helpers import to_np, to_xp

torch = pytest.importorskip("torch")


def trajectory_ours(tx, xp, w0, grad_fn, steps):
    w = to_xp(xp, w0)
    state = tx.init(w)
    for _ in range(steps):
        g = to_xp(xp, grad_fn(to_np(w)))
        u, state = tx.update(state, g, w)
        w = sc.apply_updates(w, u)
    return to_np(w)


def trajectory_torch(make_opt, w0, grad_fn, steps):
    w = torch.tensor(w0, requires_grad=True)
    opt = make_opt([w])
    for _ in range(steps):
        w.grad = torch.tensor(grad_fn(w.detach().numpy()))
        opt.step()
    return w.detach().numpy()


def quad_grad(a):
    return lambda w: a @ w + np.sin(w)


CASES = [
    (lambda: sc.adam(0.05, beta1=0.9, beta2=0.99, epsilon=1e-8),
     lambda p: torch.optim.Adam(p, lr=0.05, betas=(0.9, 0.99), eps=1e-8)),
    # an ε comparable to √v̂: its place relative to the bias correction shows
    (lambda: sc.adam(0.05, beta1=0.8, beta2=0.9, epsilon=0.3),
     lambda p: torch.optim.Adam(p, lr=0.05, betas=(0.8, 0.9), eps=0.3)),
    (lambda: sc.adam(0.05, weight_decay=0.1, decoupled_weight_decay=True),
     lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1)),
    (lambda: sc.adam(0.05, weight_decay=0.1),
     lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=0.1)),
    (lambda: sc.adagrad(0.1, epsilon=1e-10),
     lambda p: torch.optim.Adagrad(p, lr=0.1, eps=1e-10)),
    (lambda: sc.adagrad(0.1, initial_accumulator_value=0.5, weight_decay=0.01),
     lambda p: torch.optim.Adagrad(p, lr=0.1, initial_accumulator_value=0.5, weight_decay=0.01)),
    (lambda: sc.sgd(0.01), lambda p: torch.optim.SGD(p, lr=0.01)),
    (lambda: sc.sgd(0.01, momentum=0.9, weight_decay=0.01),
     lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, weight_decay=0.01)),
    (lambda: sc.sgd(0.01, momentum=0.9, nesterov=True),
     lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, nesterov=True)),
]


@pytest.mark.parametrize("ours, theirs", CASES)
def test_matches_torch_optim(xp, ours, theirs):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, 6))
    a = a @ a.T / 6
    w0 = rng.standard_normal(6)
    mine = trajectory_ours(ours(), xp, w0, quad_grad(a), 25)
    ref = trajectory_torch(theirs, w0, quad_grad(a), 25)
    np.testing.assert_allclose(mine, ref, rtol=1e-10, atol=1e-12)
