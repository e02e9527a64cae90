"""The elementwise averages and divisions of ``_elementwise`` and the stacked statistics average of
``_xp.scaled_plus_product``: whatever pass the library takes (torch's fused kernels, NumPy's
arithmetic in place), the value is the expression's, in a new array, with the inputs untouched."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import eps, to_np, to_xp
from shampoo_core import _elementwise, _xp

SHAPES = [(), (1,), (7,), (33, 17), (4, 3, 2, 2)]


def _inputs(shape, seed, dtype, positive=False):
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal(shape), rng.standard_normal(shape)
    if positive:
        a, b = np.abs(a), np.abs(b)
    return np.asarray(a, dtype=dtype), np.asarray(b, dtype=dtype)


def _check_new_and_untouched(xp, out, inputs, copies, like):
    assert out.shape == like.shape and out.dtype == like.dtype
    for x, before in zip(inputs, copies):
        assert x is not out
        np.testing.assert_array_equal(to_np(x), before)


@pytest.mark.parametrize("shape", SHAPES)
@given(beta=st.sampled_from([0.0, 0.1, 0.5, 0.9, 0.999, 1.0]), seed=st.integers(0, 2**16))
def test_ema_is_the_running_average(xp, shape, beta, seed):
    old, new = _inputs(shape, seed, np.float32)
    xo, xn = to_xp(xp, old), to_xp(xp, new)
    out = _elementwise.ema(xo, xn, beta)
    _check_new_and_untouched(xp, out, (xo, xn), (old, new), xo)
    exact = beta * old.astype(np.float64) + (1.0 - beta) * new.astype(np.float64)
    # β and 1 - β round to float32, and the interpolation rounds two or three times more, each
    # within u of max(|old|, |new|).
    bound = 6 * eps("float32") * np.maximum(np.abs(old), np.abs(new))
    assert np.all(np.abs(to_np(out) - exact) <= bound)


@pytest.mark.parametrize("beta, expected", [(0.0, "new"), (1.0, "old")])
def test_ema_is_exact_at_the_ends(xp, beta, expected):
    old, new = _inputs((50,), 3, np.float32)
    out = to_np(_elementwise.ema(to_xp(xp, old), to_xp(xp, new), beta))
    np.testing.assert_array_equal(out, {"old": old, "new": new}[expected])


def test_ema_from_zero_keeps_its_relative_accuracy(xp):
    """The first step of Adam's v from zero state: (1 - β)·g² with β = 0.999. Interpolating the
    wrong way round, g² + β(0 - g²), cancels 3 of float32's 7 digits."""
    g2 = np.linspace(0.5, 4.0, 64, dtype=np.float32)
    out = to_np(_elementwise.ema(to_xp(xp, np.zeros_like(g2)), to_xp(xp, g2), 0.999))
    exact = 0.001 * g2.astype(np.float64)  # (1 - 0.999) rounds to float32 once, within 2u
    np.testing.assert_allclose(out, exact, rtol=4 * eps("float32"))


@pytest.mark.parametrize("shape", SHAPES)
@given(seed=st.integers(0, 2**16))
def test_plus_square_is_adagrads_sum(xp, shape, seed):
    acc, g = _inputs(shape, seed, np.float32)
    acc = np.abs(acc)
    xa, xg = to_xp(xp, acc), to_xp(xp, g)
    out = _elementwise.plus_square(xa, xg)
    _check_new_and_untouched(xp, out, (xa, xg), (acc, g), xa)
    exact = acc.astype(np.float64) + g.astype(np.float64) ** 2
    assert np.all(np.abs(to_np(out) - exact) <= 2 * eps("float32") * exact)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("epsilon_kind", ["float", "array"])
@given(seed=st.integers(0, 2**16), epsilon=st.sampled_from([0.0, 1e-8, 0.3]))
def test_over_root_plus_is_the_diagonal_step(xp, shape, epsilon_kind, seed, epsilon):
    f, acc = _inputs(shape, seed, np.float32, positive=False)
    acc = np.abs(acc) + np.float32(0.01)
    xf, xa = to_xp(xp, f), to_xp(xp, acc)
    e = epsilon if epsilon_kind == "float" else to_xp(xp, np.asarray(epsilon, dtype=np.float32))
    out = _elementwise.over_root_plus(xp, xf, xa, e)
    _check_new_and_untouched(xp, out, (xf, xa), (f, acc), xf)
    exact = f.astype(np.float64) / (np.sqrt(acc.astype(np.float64)) + np.float64(np.float32(epsilon)))
    assert np.all(np.abs(to_np(out) - exact) <= 5 * eps("float32") * np.abs(exact))


def test_torch_division_that_autograd_records_is_differentiable():
    """A result autograd needs for its backward pass must not be overwritten."""
    torch = pytest.importorskip("torch")
    f = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    acc = torch.tensor([4.0, 1.0, 9.0], requires_grad=True)
    out = _elementwise.over_root_plus(torch, f, acc, 1.0)
    out.sum().backward()
    torch.testing.assert_close(f.grad, 1.0 / (acc.detach().sqrt() + 1.0))
    torch.testing.assert_close(acc.grad, -f.detach() / (acc.detach().sqrt() + 1.0) ** 2 / (2 * acc.detach().sqrt()))


@pytest.mark.parametrize("n, d", [(1, 4), (7, 8), (9, 128), (3, 300)])
@pytest.mark.parametrize("beta", [0.0, 0.999, 1.0])
def test_stacked_average_of_products(xp, n, d, beta):
    """β·C + A·B for stacks whose length is not a multiple of the blocks NumPy adds at a time
    (four of 128×128), with the bits of the plain expression in float32 on NumPy."""
    rng = np.random.default_rng(n * d)
    a = rng.standard_normal((n, d, d)).astype(np.float32)
    c = rng.standard_normal((n, d, d)).astype(np.float32)
    xa, xc = to_xp(xp, a), to_xp(xp, c)
    out = _xp.scaled_plus_product(xp, xc, xa, xa.mT, beta)
    _check_new_and_untouched(xp, out, (xa, xc), (a, c), xc)
    plain = (c if beta == 1.0 else np.float32(beta) * c) + a @ a.transpose(0, 2, 1)
    if type(xa) is np.ndarray:
        np.testing.assert_array_equal(to_np(out), plain)
    exact = beta * c.astype(np.float64) + a.astype(np.float64) @ a.transpose(0, 2, 1).astype(np.float64)
    scale = np.abs(c) + np.abs(a).astype(np.float64) @ np.abs(a).transpose(0, 2, 1)
    assert np.all(np.abs(to_np(out) - exact) <= (d + 2) * eps("float32") * scale)
