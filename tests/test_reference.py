"""Shampoo against a dense reference written from the paper, on every backend.

The reference below shares no code with ``shampoo_core``: it cuts each parameter into its blocks
by index arithmetic, forms each statistic from the mode-i unfolding of the block, takes roots with
``numpy.linalg.eigh`` and preconditions with the explicit Kronecker product
``(X_0 ⊗ X_1 ⊗ ...) vec(G)`` (arXiv 2002.09018, Alg. 1 and Sec. 4) instead of mode products. The
property: for random shapes and hyperparameters (blocking, merging, one-sided dims, both β₂
regimes, momentum and Nesterov, every grafting type and granularity, weight decay both ways, the
statistics and root schedules, eigh and Newton roots) the core's updates agree with it to a
tolerance set by the dtype's epsilon and the condition number of the regularized statistics,
eagerly on every backend, through the optax adapter under ``jax.jit`` and through the
``torch.optim`` adapter.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import shampoo_core as sc
from helpers import eps, examples_for, require_float64, to_np, to_xp

NORM_FLOOR = 1e-16


def _root(h, p, epsilon, relative):
    """(H + ridge I)^(-1/p) and the condition number of H + ridge I."""
    w, q = np.linalg.eigh((h + h.T) / 2)
    w = np.clip(w, 0.0, None)
    lam_max = w.max()
    ridge = epsilon * lam_max if relative and lam_max > 0 else epsilon
    w = w + ridge
    return (q * w ** (-1.0 / p)) @ q.T, w.max() / w.min()


def _unfold(block, i):
    """Mode-i unfolding: rows indexed by dim i, columns by the other dims."""
    return np.moveaxis(block, i, 0).reshape(block.shape[i], -1)


def reference_shampoo(param, grads, hp):
    """Updates of one parameter, float64, and the largest condition number met by a root."""
    dims = param.shape or (1,)
    if hp["merge_small_dims"]:  # adjacent dims merge while their product stays <= block_size
        merged = []
        for d in (d for d in param.shape if d != 1):
            if merged and merged[-1] * d <= hp["block_size"]:
                merged[-1] *= d
            else:
                merged.append(d)
        dims = tuple(merged) or (1,)
    limit = math.inf if hp["skip_preconditioning_dim_size_gt"] is None else hp["skip_preconditioning_dim_size_gt"]
    pre = [1 < d <= limit or (d == 1 and len(dims) == 1) for d in dims]
    k = sum(pre)
    p = hp["exponent_override"] or 2 * k
    bs = hp["block_size"]
    cuts = [[(a, min(a + bs, d)) for a in range(0, d, bs)] if q else [(0, d)] for d, q in zip(dims, pre)]
    grid = list(itertools.product(*cuts))  # each block as its (start, stop) per dim

    def index(cell):
        return tuple(slice(a, b) for a, b in cell)

    def shape_of(cell):
        return tuple(b - a for a, b in cell)

    stats = {cell: [np.zeros((n, n)) for n, q in zip(shape_of(cell), pre) if q] for cell in grid}
    roots = {cell: [np.eye(n) for n, q in zip(shape_of(cell), pre) if q] for cell in grid}
    beta1, beta2, graft_beta2 = hp["beta1"], hp["beta2"], hp["graft_beta2"]
    lr, wd = hp["learning_rate"], hp["weight_decay"]
    m = np.zeros(dims)
    v = np.zeros(dims)
    w = param.reshape(dims)
    kappa = 1.0
    updates = []
    for t, g in enumerate(grads, start=1):
        g = g.reshape(dims)
        if wd and not hp["decoupled_weight_decay"]:
            g = g + wd * w
        f = g
        if beta1:
            m = beta1 * m + (1 - beta1) * g
            if hp["nesterov"]:
                f = beta1 * m / (1 - beta1 ** (t + 1)) + (1 - beta1) * g / (1 - beta1**t)
            else:
                f = m / (1 - beta1**t)
        graft = hp["graft_type"]
        if graft == "adagrad":
            v = v + g * g
            d = f / (np.sqrt(v) + hp["diagonal_epsilon"])
        elif graft == "rmsprop":
            v = graft_beta2 * v + (1 - graft_beta2) * g * g
            d = f / (np.sqrt(v) + hp["diagonal_epsilon"])
        elif graft == "adam":
            v = graft_beta2 * v + (1 - graft_beta2) * g * g
            d = f / (np.sqrt(v / (1 - graft_beta2**t)) + hp["diagonal_epsilon"])
        elif graft == "sqrt_n":
            d = f * math.sqrt(f.size) / max(np.linalg.norm(f), NORM_FLOOR)
        else:  # sgd, none
            d = f

        due_roots = t >= hp["start_preconditioning_step"] and (t - hp["start_preconditioning_step"]) % hp[
            "preconditioning_compute_steps"] == 0
        for cell in grid:
            block = g[index(cell)]
            axes = [i for i, q in enumerate(pre) if q]
            if (t - 1) % hp["statistics_compute_steps"] == 0:
                for j, i in enumerate(axes):
                    gram = _unfold(block, i) @ _unfold(block, i).T
                    h = stats[cell][j]
                    stats[cell][j] = h + gram if beta2 == 1.0 else beta2 * h + (1 - beta2) * gram
            if due_roots:
                results = [_root(h, p, hp["epsilon"], hp["relative_epsilon"]) for h in stats[cell]]
                roots[cell] = [r for r, _ in results]
                kappa = max([kappa] + [c for _, c in results])

        if t >= hp["start_preconditioning_step"] and k:
            precond = np.empty(dims)
            for cell in grid:
                it = iter(roots[cell])
                factors = [next(it) if q else np.eye(n) for n, q in zip(shape_of(cell), pre)]
                kron = functools.reduce(np.kron, factors)
                precond[index(cell)] = (kron @ f[index(cell)].ravel()).reshape(shape_of(cell))
            if graft == "none":
                u = precond
            else:
                units = [tuple(slice(None) for _ in dims)] if hp["graft_granularity"] == "layer" else map(index, grid)
                u = np.empty(dims)
                for sl in units:
                    target = math.sqrt(d[sl].size) if graft == "sqrt_n" else np.linalg.norm(d[sl])
                    u[sl] = precond[sl] * target / max(np.linalg.norm(precond[sl]), NORM_FLOOR)
        else:
            u = d
        if wd and hp["decoupled_weight_decay"]:
            u = u + wd * w
        update = -lr * u
        w = w + update
        updates.append(update.reshape(param.shape))
    return updates, kappa


def tolerance(dtype, kappa, want, root_method):
    """A root of H + ridge·I moves by about eps·κ relative to itself (its eigenvalues do).
    Newton's ridge comes from a power-iteration λmax (relative tolerance 1e-6, met on statistics
    this small), not from the exact λmax; the root moves by at most that much."""
    scale = max(1.0, float(np.abs(want).max()))
    return 1e3 * eps(dtype) * kappa * scale + (1e-6 * scale if root_method == "newton" else 0.0)


# Ranks drawn first: a bare list strategy spends most examples on 0-d parameters.
shapes = st.integers(0, 3).flatmap(lambda rank: st.tuples(*[st.integers(1, 7)] * rank))


hyperparameters = st.fixed_dictionaries({
    "learning_rate": st.sampled_from([0.1, 1.0]),
    "block_size": st.integers(2, 5),
    "beta1": st.sampled_from([0.0, 0.9]),
    "beta2": st.sampled_from([1.0, 0.9]),
    "epsilon": st.sampled_from([1e-3, 1e-1]),
    "relative_epsilon": st.booleans(),
    "diagonal_epsilon": st.sampled_from([1e-8, 1e-3]),
    "weight_decay": st.sampled_from([0.0, 0.01]),
    "decoupled_weight_decay": st.booleans(),
    "nesterov": st.booleans(),
    "start_preconditioning_step": st.integers(1, 4),
    "preconditioning_compute_steps": st.integers(1, 3),
    "statistics_compute_steps": st.integers(1, 2),
    "graft_type": st.sampled_from(["none", "sgd", "adagrad", "rmsprop", "adam", "sqrt_n"]),
    "graft_beta2": st.sampled_from([0.9, 0.99]),
    "graft_granularity": st.sampled_from(["layer", "block"]),
    "exponent_override": st.sampled_from([None, None, 2]),
    "skip_preconditioning_dim_size_gt": st.sampled_from([None, 4]),
    "merge_small_dims": st.booleans(),
    "root_method": st.sampled_from(["eigh", "newton"]),
})


@pytest.mark.filterwarnings("ignore:root_dtype='float64' is not available")  # no_float64: roots in float32
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_updates_match_the_dense_reference(xp, dtype):
    """float32 parameters keep float32 statistics (roots still taken in float64): their tolerance
    is float32's epsilon times the same condition number."""
    if dtype == np.float64:
        require_float64(xp)

    @settings(max_examples=examples_for(xp, settings().max_examples))
    @given(shape=shapes, hp=hyperparameters, steps=st.integers(1, 6), seed=st.integers(0, 2**16))
    def check(shape, hp, steps, seed):
        rng = np.random.default_rng(seed)
        # The reference runs in float64 on the values the core receives.
        param = rng.standard_normal(shape).astype(dtype)
        grads = [rng.standard_normal(shape).astype(dtype) for _ in range(steps)]
        expected, kappa = reference_shampoo(param.astype(np.float64), [g.astype(np.float64) for g in grads], hp)
        kwargs = {key: value for key, value in hp.items() if key != "learning_rate"}
        tx = sc.shampoo(hp["learning_rate"], root_dtype="float64", **kwargs)
        params = to_xp(xp, param)
        state = tx.init(params)
        for t, (g, want) in enumerate(zip(grads, expected), start=1):
            u, state = tx.update(state, to_xp(xp, g), params)
            params = sc.apply_updates(params, u)
            got = to_np(u)
            assert got.dtype == dtype
            tol = tolerance(dtype, kappa, want, hp["root_method"])
            np.testing.assert_allclose(got, want, rtol=0, atol=tol, err_msg=f"step {t} of {steps}, {hp}")

    check()


def test_jitted_optax_updates_match_the_dense_reference():
    """The optax adapter under ``jax.jit`` (roots gated by ``lax.cond``, ``nonfinite="skip"``, its
    default) against the same reference: a traced step count, schedule and grafting path."""
    jax = pytest.importorskip("jax")
    pytest.importorskip("optax")
    jax.config.update("jax_enable_x64", True)
    from backends import optax_adapter

    # Each example compiles its own step: a few, with the same draws as the eager test.
    @settings(max_examples=max(4, settings().max_examples // 5))
    @given(shape=shapes, hp=hyperparameters, steps=st.integers(1, 6), seed=st.integers(0, 2**16))
    def check(shape, hp, steps, seed):
        rng = np.random.default_rng(seed)
        param = rng.standard_normal(shape)
        grads = [rng.standard_normal(shape) for _ in range(steps)]
        expected, kappa = reference_shampoo(param, grads, hp)
        # eigh only: the masked Newton of a traced step takes λmax from 256 power steps, whose
        # accuracy depends on the eigenvalue gap (tests/test_roots.py checks that path).
        tx = optax_adapter.shampoo(root_dtype="float64", nonfinite="skip", **dict(hp, root_method="eigh"))
        params = jax.numpy.asarray(param)
        state = tx.init(params)
        update = jax.jit(tx.update)
        for t, (g, want) in enumerate(zip(grads, expected), start=1):
            u, state = update(jax.numpy.asarray(g), state, params)
            params = params + u
            tol = tolerance(np.float64, kappa, want, "eigh")
            np.testing.assert_allclose(np.asarray(u), want, rtol=0, atol=tol, err_msg=f"step {t} of {steps}, {hp}")

    check()


def test_torch_optim_adapter_matches_the_dense_reference():
    """``backends.torch_optim.Shampoo`` with two param groups of different hyperparameters (each
    drawn as above, betas spelled as torch does) against the reference, parameter by parameter."""
    torch = pytest.importorskip("torch")
    from backends.torch_optim import Shampoo

    @settings(max_examples=max(4, settings().max_examples // 2))
    @given(shapes=st.tuples(shapes, shapes), hps=st.tuples(hyperparameters, hyperparameters),
           steps=st.integers(1, 6), seed=st.integers(0, 2**16))
    def check(shapes, hps, steps, seed):
        rng = np.random.default_rng(seed)
        values = [rng.standard_normal(shape) for shape in shapes]
        grads = [[rng.standard_normal(shape) for _ in range(steps)] for shape in shapes]
        params = [torch.nn.Parameter(torch.from_numpy(v.copy())) for v in values]
        groups = []
        for p, hp in zip(params, hps):
            group = {k: v for k, v in hp.items() if k not in ("learning_rate", "beta1", "beta2")}
            groups.append(dict(group, params=[p], lr=hp["learning_rate"], betas=(hp["beta1"], hp["beta2"]),
                               root_dtype="float64"))
        opt = Shampoo(groups)
        expected = [reference_shampoo(v, g, hp) for v, g, hp in zip(values, grads, hps)]
        for t in range(steps):
            before = [p.detach().clone() for p in params]
            for p, g in zip(params, grads):
                p.grad = torch.from_numpy(g[t].copy())
            opt.step()
            for i, (p, b) in enumerate(zip(params, before)):
                (want_all, kappa), hp = expected[i], hps[i]
                want = want_all[t]
                tol = tolerance(np.float64, kappa, want, hp["root_method"])
                # The update is read back as a parameter difference: one more rounding of p.
                tol += 4 * eps(np.float64) * max(1.0, float(b.abs().max()))
                np.testing.assert_allclose((p.detach() - b).numpy(), want, rtol=0, atol=tol,
                                           err_msg=f"param {i}, step {t + 1} of {steps}, {hp}")

    check()
