"""One pass over memory for the grafted first-order optimizer of a CPU step, compiled by numba.

A layer-grafted Shampoo step with a first moment and AdaGrad grafting reads the gradient g, the
first moment m and the accumulator acc three times in eager NumPy or torch (the average, the
sum of squares, and the norm of the grafting direction): about 24 ms over 11.6M float32 entries
on one core. Here one compiled loop reads each entry of g, m and acc once, writes the new m and
acc, and sums the squares of the direction, in about 12 ms (docs/performance.md, "The grafted
optimizer in one pass").

NumPy arrays and torch CPU tensors (zero-copy, through ``Tensor.numpy``) take it, from
``backends.numpy_backend`` and ``backends.torch_backend`` where numba is installed (the ``fast``
extra); numba compiles the loop at its first call for each dtype (under a second, cached on disk).

Bits: the new m and acc are NumPy's (``backends.numpy_backend.ema`` and ``plus_square``), each
operation rounded in the arrays' dtype; torch's ``lerp`` rounds ``m + w(g - m)`` once, with a
fused multiply-add, so on torch tensors m may differ from it by an ulp. The norm's squares are
summed in float64, in 16 interleaved partial sums.
"""

from __future__ import annotations

import math

import numba
import numpy as np

__all__ = ["ema_plus_square_norm_in_place"]

_LANES = 16  # independent float64 partial sums: a reduction the compiler vectorizes without reassociating


def _compiled(beta_above_half: bool):
    """The loop for one of NumPy's two forms of the average (a branch inside the loop would keep
    the compiler from vectorizing it)."""

    @numba.njit(inline="always")
    def entry(i, g, m, acc, coef, epsilon):  # pragma: no cover (compiled)
        gi = g[i]
        mi = m[i]
        # m + (β-1)(m - g) for β > 1/2, g + β(m - g) otherwise
        new_m = (mi - gi) * coef + (mi if beta_above_half else gi)
        new_acc = acc[i] + gi * gi
        m[i] = new_m
        acc[i] = new_acc
        q = np.float64(new_m / (np.sqrt(new_acc) + epsilon))
        return q * q

    @numba.njit(cache=True, nogil=True, error_model="numpy", boundscheck=False)
    def kernel(g, m, acc, coef, epsilon):  # pragma: no cover (compiled)
        n = g.shape[0]
        parts = np.zeros(_LANES, np.float64)
        whole = n - n % _LANES
        for i0 in range(0, whole, _LANES):
            for j in range(_LANES):
                parts[j] += entry(i0 + j, g, m, acc, coef, epsilon)
        for i in range(whole, n):
            parts[i - whole] += entry(i, g, m, acc, coef, epsilon)
        return math.sqrt(parts.sum())

    return kernel


_KERNELS = {True: _compiled(True), False: _compiled(False)}


def ema_plus_square_norm_in_place(g, m, acc, beta: float, epsilon: float) -> float:
    """Write β·m + (1 - β)·g into ``m`` and acc + g² into ``acc``, and return
    ‖m / (√acc + ε)‖₂ of the new values as a Python float.

    In place only: with separate outputs the compiler cannot rule out that they overlap the
    inputs, and leaves the loop unvectorized (twice the time).

    Args:
        g, m, acc: 1-D C-contiguous NumPy arrays of one length and one dtype, float32 or float64,
            ``m`` and ``acc`` writable; no two share memory.
        beta: the first moment's β in [0, 1]; epsilon: ε >= 0 (AdaGrad's), Python floats rounded
            to the arrays' dtype, as NumPy rounds a Python scalar beside an array.
    """
    dtype = g.dtype.type
    above = beta > 0.5
    coef = dtype(beta - 1.0) if above else dtype(beta)
    return float(_KERNELS[above](g, m, acc, coef, dtype(epsilon)))
