"""The non-finite guard shared by Shampoo and the Eva family: exact verdicts, named inputs."""

import numpy as np
import pytest

from helpers import to_xp
from shampoo_core._xp import namespace
from shampoo_core.nonfinite import check_mode, guard


def named(xp, **arrays):
    return [(f"grads['{k}']", to_xp(xp, v)) for k, v in arrays.items()]


@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")  # NumPy, on the sums
@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_finite_inputs_whose_sum_overflows_pass(xp, mode):
    """The fast test sums every input; a finite overflow must fall back to the exact test, not
    reject a good step."""
    big = np.full((4, 3), 3e38, dtype=np.float32)
    inputs = named(xp, w=big, b=-big[0])
    verdict = guard(namespace(inputs[0][1]), inputs, mode)
    assert verdict.skip is False and verdict.finite is None


@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_finite_inputs_whose_squares_overflow_pass(xp, dtype):
    """NumPy's fast test is a sum of squares (one BLAS dot): entries far below the dtype's
    largest value whose squares overflow must take the exact test and pass, and a NaN beside
    them must still be found."""
    big = np.full(5, np.sqrt(np.finfo(dtype).max) * 2, dtype=dtype)
    assert np.isinf(np.dot(big, big)) and np.isfinite(big.sum())
    inputs = named(xp, w=big)
    assert guard(namespace(inputs[0][1]), inputs, "raise") == (False, None)
    bad = big.copy()
    bad[3] = np.nan
    inputs = named(xp, w=big, b=bad)
    with pytest.raises(ValueError, match=r"grads\['b'\] has non-finite values"):
        guard(namespace(inputs[0][1]), inputs, "raise")


@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_the_first_bad_input_is_named_even_beside_an_overflow(xp, bad):
    w = np.full((4, 3), 3e38, dtype=np.float32)
    b = np.ones(3, dtype=np.float32)
    c = np.ones(2, dtype=np.float32)
    b[1] = bad
    c[0] = bad
    inputs = named(xp, w=w, b=b, c=c)
    xpn = namespace(inputs[0][1])
    with pytest.raises(ValueError, match=r"grads\['b'\] has non-finite values \(nonfinite='raise'\)"):
        guard(xpn, inputs, "raise")
    assert guard(xpn, inputs, "skip") == (True, None)


def test_mixed_dtypes_and_no_inputs(xp):
    inputs = named(xp, w=np.ones((2, 2), np.float32), b=np.array([1.0, np.inf]))
    with pytest.raises(ValueError, match=r"grads\['b'\]"):
        guard(namespace(inputs[0][1]), inputs, "raise")
    assert guard(None, [], "raise") == (False, None)


def test_float16_sums_do_not_overflow():
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as xpt

    g = torch.full((100, 100), 60000.0, dtype=torch.float16)  # sum 6e8, far past float16's 65504
    assert guard(xpt, [("grads", g)], "raise") == (False, None)


def test_mode_is_validated():
    assert check_mode("skip") == "skip"
    with pytest.raises(ValueError, match="nonfinite must be 'raise', 'skip' or 'ignore'; got 'warn'"):
        check_mode("warn")


def test_ignore_checks_nothing(xp):
    inputs = named(xp, b=np.array([1.0, np.nan]))
    assert guard(namespace(inputs[0][1]), inputs, "ignore") == (False, None)


def test_inputs_on_several_devices():
    """A model split over devices: the fast test sums per device (adding across them fails)."""
    strict = pytest.importorskip("array_api_strict")
    other = strict.Device("device1")
    ok = [("a", strict.ones((2, 2))), ("b", strict.ones(3, device=other))]
    assert guard(strict, ok, "raise") == (False, None)
    bad = ok + [("c", strict.asarray([1.0, float("nan")], device=other))]
    with pytest.raises(ValueError, match="c has non-finite values"):
        guard(strict, bad, "raise")
