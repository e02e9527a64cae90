"""The grafting kernels: whole-array norms, and directions returned as ``(d, scale)``."""

import math

import numpy as np
import pytest

from helpers import eps, to_np, to_xp
from shampoo_core import _xp, grafting, momentum
from shampoo_core.options import GraftType


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(), (0,), (7,), (33, 17), (4, 3, 2, 2), (300, 301)])
def test_norm_is_the_two_norm(xp, dtype, shape):
    rng = np.random.default_rng(len(shape))
    a = rng.standard_normal(shape).astype(dtype)
    got = float(to_np(_xp.norm(xp, to_xp(xp, a))))
    exact = math.sqrt(float(np.sum(a.astype(np.float64) ** 2)))
    n = max(a.size, 1)
    # A sum of n squares is within n·u of the exact sum (Higham, Accuracy and Stability, Sec. 3.1);
    # the square root halves that, and rounds once more.
    assert abs(got - exact) <= (n * eps(dtype) + 2 * eps(dtype)) * exact


def test_norm_of_a_strided_view(xp):
    a = np.arange(48, dtype=np.float32).reshape(6, 8)
    got = float(to_np(_xp.norm(xp, to_xp(xp, a)[1:5, ::3])))
    assert got == pytest.approx(float(np.linalg.norm(a[1:5, ::3].astype(np.float64))), rel=1e-6)


def test_norm_of_half_arrays_does_not_overflow(xp):
    """float16 holds 512 but not 512² = 262144: the squares must not be summed in float16."""
    if not hasattr(xp, "float16"):
        pytest.skip(f"{xp.__name__} has no float16")
    x = to_xp(xp, np.full(1024, 16.0, dtype=np.float16))
    got = _xp.norm(xp, x)
    assert got.dtype == x.dtype
    assert float(to_np(got)) == pytest.approx(512.0, rel=1e-3)


def reference_direction(graft_type, acc, f, epsilon, beta2, step):
    """The grafting directions of the docstring, in float64, written out in full."""
    if graft_type in (GraftType.NONE, GraftType.SGD):
        return f
    if graft_type is GraftType.SQRT_N:
        return f * math.sqrt(f.size) / np.linalg.norm(f)
    if graft_type is GraftType.ADAM:
        return f / (np.sqrt(acc / (1.0 - beta2**step)) + epsilon)
    return f / (np.sqrt(acc) + epsilon)


@pytest.mark.parametrize("graft_type", list(GraftType))
@pytest.mark.parametrize("step", [1, 7])
@pytest.mark.parametrize("step_as_array", [False, True])
def test_direction_is_scale_times_d(xp, graft_type, step, step_as_array):
    """``scale · d`` is the direction of ``f_scale · f``, with an ε as large as √v so its place shows."""
    rng = np.random.default_rng(step)
    f = rng.standard_normal((5, 6))
    acc = rng.uniform(0.01, 0.2, (5, 6))
    epsilon, beta2, f_scale = 0.3, 0.9, 2.5
    state = grafting.GraftState(to_xp(xp, acc, np.float32))
    step_x = to_xp(xp, np.asarray(step, np.float32)) if step_as_array else step
    d, scale = grafting.graft_direction(xp, graft_type, state, to_xp(xp, f, np.float32), epsilon=epsilon,
                                        beta2=beta2, step=step_x, f_scale=f_scale)
    got = to_np(d * scale)
    want = reference_direction(graft_type, acc, f_scale * f, epsilon, beta2, step)
    np.testing.assert_allclose(got, want, rtol=20 * eps("float32"), atol=0)
    norm = float(to_np(grafting.graft_norm(xp, graft_type, d, scale)))
    assert norm == pytest.approx(float(np.linalg.norm(want)), rel=20 * eps("float32"))


@pytest.mark.parametrize("nesterov", [False, True])
def test_filtered_gradient_is_f_times_scale(xp, nesterov):
    rng = np.random.default_rng(1)
    m, g = rng.standard_normal(4), rng.standard_normal(4)
    beta1, step = 0.9, 3
    f, scale = momentum.filtered_gradient(to_xp(xp, m, np.float32), to_xp(xp, g, np.float32), beta1, step, nesterov)
    if nesterov:
        want = beta1 * m / (1 - beta1 ** (step + 1)) + (1 - beta1) * g / (1 - beta1**step)
    else:
        want = m / (1 - beta1**step)
    np.testing.assert_allclose(to_np(f * scale), want, rtol=10 * eps("float32"))
    f0, scale0 = momentum.filtered_gradient(None, to_xp(xp, g, np.float32), 0.0, step, nesterov)
    assert scale0 == 1.0
    np.testing.assert_array_equal(to_np(f0), g.astype(np.float32))


def test_joint_norm_is_the_norm_of_the_concatenation(xp):
    """The layer's norm taken of its block stacks, also in float16, whose squared norm of 300
    would overflow (max 65504)."""
    rng = np.random.default_rng(4)
    parts = [rng.standard_normal(s) for s in [(3, 4, 4), (2, 5), (7,)]]
    whole = np.sqrt(sum(float(np.sum(p * p)) for p in parts))
    out = _xp.joint_norm(xp, [to_xp(xp, p) for p in parts])
    np.testing.assert_allclose(float(out), whole, rtol=10 * eps(to_np(out).dtype))
    if not hasattr(xp, "float16"):
        return
    try:
        halves = [xp.astype(to_xp(xp, np.full((10, 10), 20.0, dtype=np.float32)), xp.float16) for _ in range(2)]
    except Exception as err:  # a device without float16
        pytest.skip(f"no float16: {err}")
    np.testing.assert_allclose(float(_xp.joint_norm(xp, halves)), 20.0 * np.sqrt(200), rtol=1e-3)
