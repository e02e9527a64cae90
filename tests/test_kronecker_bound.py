"""The bound that makes Shampoo sound (Gupta, Koren, Singer 2018, Lemma 8; slides "Sketch of proof").

For gradients whose mode matricizations have rank <= r, with g = vec(G) row-major,

    ε I + (1/r) Σₜ gₜgₜᵀ  ⪯  ⊗ᵢ (ε I + Hᵢ)^(1/k)

where Hᵢ are Shampoo's statistics of the k dims. Shampoo's preconditioner is
Xᵢ = (ε I + Hᵢ)^(-1/2k), so the right side is (⊗ᵢ Xᵢ)^(-2): the test reads the statistics
and preconditioners out of the optimizer state, i.e. it checks what the optimizer really uses.
"""

import math
from functools import reduce

import numpy as np
from hypothesis import given, strategies as st

import shampoo_core as sc
from helpers import eps, to_np, to_xp


def run_shampoo(xp, grads, epsilon):
    shape = grads[0].shape
    tx = sc.shampoo(
        1.0, block_size=max(shape), beta1=0.0, beta2=1.0, epsilon=epsilon, relative_epsilon=False,
        graft_type="none", start_preconditioning_step=1, preconditioning_compute_steps=1,
        merge_small_dims=False, skip_preconditioning_dim_size_gt=None,
    )
    params = to_xp(xp, np.zeros(shape))
    state = tx.init(params)
    for g in grads:
        _, state = tx.update(state, to_xp(xp, g), params)
    (block,) = state.params[0].blocks
    return [to_np(h)[0] for h in block.statistics], [to_np(x)[0] for x in block.preconditioners]


gradient_sequences = st.integers(0, 2**16).flatmap(
    lambda seed: st.tuples(
        st.just(seed),
        st.lists(st.integers(2, 5), min_size=2, max_size=3),
        st.integers(1, 6),
        st.floats(1e-3, 1.0),
    )
)


@given(case=gradient_sequences)
def test_shampoo_dominates_full_matrix_adagrad(xp, case):
    seed, shape, steps, epsilon = case
    rng = np.random.default_rng(seed)
    # Vary scales and ranks so some gradients are rank-deficient.
    grads = []
    for _ in range(steps):
        g = rng.standard_normal(shape) * 10 ** rng.uniform(-1, 1)
        if len(shape) == 2 and rng.random() < 0.5:
            u = rng.standard_normal((shape[0], 1))
            g = u @ rng.standard_normal((1, shape[1]))
        grads.append(g)
    stats, pre = run_shampoo(xp, grads, epsilon)
    n = math.prod(shape)
    r = max(min(d, n // d) for d in shape)
    k = len(shape)

    # The statistics are the mode-i Gram matrices, summed over steps.
    for i, h in enumerate(stats):
        others = [j for j in range(k) if j != i]
        expected = sum(np.tensordot(g, g, axes=(others, others)) for g in grads)
        np.testing.assert_allclose(h, expected, rtol=1e-10, atol=1e-10 * np.abs(expected).max())

    lhs = epsilon * np.eye(n) + sum(np.outer(g.ravel(), g.ravel()) for g in grads) / r
    rhs = reduce(np.kron, [np.linalg.inv(x) @ np.linalg.inv(x) for x in pre])
    gap = np.linalg.eigvalsh((rhs - lhs + (rhs - lhs).T) / 2).min()
    # Rounding in the roots is relative to κ of each factor; the bound itself is exact.
    kappa = max(np.linalg.cond(epsilon * np.eye(h.shape[0]) + h) for h in stats)
    tol = 100 * n * eps(np.float64) * kappa * np.linalg.norm(rhs, 2)
    assert gap >= -tol


def test_bound_is_tight_enough_to_fail():
    """Without the 1/r factor the inequality can fail: the test above is not vacuous."""
    rng = np.random.default_rng(0)
    shape = (3, 3)
    failures = 0
    for _ in range(20):
        grads = [rng.standard_normal(shape) for _ in range(3)]
        l = sum(g @ g.T for g in grads)
        r_ = sum(g.T @ g for g in grads)

        def half(a):
            w, q = np.linalg.eigh(a)
            return (q * np.sqrt(w)) @ q.T

        eps_ = 1e-3
        rhs = np.kron(half(eps_ * np.eye(3) + l), half(eps_ * np.eye(3) + r_))
        lhs = eps_ * np.eye(9) + sum(np.outer(g.ravel(), g.ravel()) for g in grads) * 3.0  # r times too big
        failures += np.linalg.eigvalsh(rhs - lhs).min() < -1e-8
    assert failures > 0
