"""A statistic's running average in one BLAS call per block: β·H + α·G·Gᵀ by ``syrk`` with β.

Shampoo's statistics are symmetric (arXiv 2002.09018, Sec. 3: H ← β₂·H + (1 - β₂)·G·Gᵀ). NumPy's
``a @ a.T`` already runs BLAS's symmetric rank-k update (``syrk``), but with β = 0 into a new
array: the average then takes passes of its own over every statistic (β·H, α·P, the sum), each
in cache a few blocks at a time (``backends.numpy_backend.scaled_plus_product``). Here a loop
compiled by numba calls ``ssyrk``/``dsyrk`` (SciPy's ``cython_blas``) once per block with
β₂ and α given to it: BLAS scales the block's lower triangle and adds the product in one pass,
and the loop mirrors the triangle while the block is in cache. A new state copies each block
of H into its new array first, in the same loop.

Bits: ``syrk`` rounds α·P + β·H inside its kernel (a fused multiply-add where the CPU has one),
where the expression rounds α·P, β·H and their sum apart, so the entries may differ from the
expression's by an ulp; the result is exactly symmetric. Only the lower triangle of H is read:
H must be symmetric, as a statistic is.

The loop calls BLAS by a symbol name bound to SciPy's routines when this module is imported, so
numba caches it on disk like ``backends.fused_cpu``'s loops.
"""

from __future__ import annotations

import llvmlite.binding as llvm
import numba
import numpy as np
from numba import types
from numba.extending import get_cython_function_address

__all__ = ["gram_average"]

# Fortran ?syrk(uplo, trans, n, k, alpha, a, lda, beta, c, ldc), every argument by reference.
# Called by a symbol name bound to SciPy's routine in each process, so that the compiled loop,
# which refers to the name and not to this process's address, can be cached on disk; the
# pointers go as integers of their width, which the calling convention passes alike.
_SIGNATURE = types.void(*([types.uintp] * 10))
for _name in ("ssyrk", "dsyrk"):
    llvm.add_symbol(f"shampoo_core_{_name}", get_cython_function_address("scipy.linalg.cython_blas", _name))
_SSYRK = types.ExternalFunction("shampoo_core_ssyrk", _SIGNATURE)
_DSYRK = types.ExternalFunction("shampoo_core_dsyrk", _SIGNATURE)
_INT32_MAX = 2**31 - 1


@numba.njit(nogil=True, boundscheck=False, cache=True)
def _run(a, c, out, copy, chars, ints, scalars):  # pragma: no cover (compiled)
    # a: (L0, L1, ·, ·) blocks; c, out: (L0, L1, m, m), rows contiguous (the same array unless
    # ``copy``); chars: uplo, trans; ints: n, k, lda, ldc; scalars: alpha, beta (the dtype's)
    m = out.shape[2]
    p_chars, p_ints, p_scalars = chars.ctypes.data, ints.ctypes.data, scalars.ctypes.data
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            o = out[i, j]
            if copy:
                o[:, :] = c[i, j]
            args = (p_chars, p_chars + 1, p_ints, p_ints + 4, p_scalars, a[i, j].ctypes.data, p_ints + 8,
                    p_scalars + scalars.itemsize, o.ctypes.data, p_ints + 12)
            if scalars.itemsize == 8:
                _DSYRK(*args)
            else:
                _SSYRK(*args)
            for r in range(m):  # BLAS wrote the row-major lower triangle
                for s in range(r + 1, m):
                    o[r, s] = o[s, r]


_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _as_4d(x):
    """``x`` with exactly two leading axes (a view): one added in front of a 3-D stack."""
    return x[None] if x.ndim == 3 else x


def _blas_layout(a):
    """``(trans, lda)`` that make BLAS's ``syrk`` form A·Aᵀ of each (m, k) block of ``a``, read
    where it lies, or ``None`` where neither axis of the blocks has unit stride."""
    size = a.itemsize
    m, k = a.shape[-2:]
    row, col = a.strides[-2:]
    # the stride of an axis of length 1 is never used (outer products: a column of a vector)
    col = size if k == 1 else col
    row = size * k if m == 1 else row
    # Column-major to BLAS: a row-major block is Aᵀ (k×m, lda = its row stride) -> C = (Aᵀ)ᵀ·Aᵀ
    if col == size and row % size == 0 and row // size >= k:
        return ord("T"), row // size
    if row == size and col % size == 0 and col // size >= m:
        return ord("N"), col // size
    return None


def gram_average(c, a, beta: float, alpha: float, out=None):
    """β·C + α·A·Aᵀ per block, into ``out`` (``c`` itself, written in place, or a new array of
    its shape and dtype), or ``None`` where BLAS cannot take the operands as they are (the
    caller computes it another way).

    Args:
        c: ``(..., m, m)`` symmetric blocks, one or two leading axes, rows contiguous.
        a: ``(..., m, k)`` blocks of the same leading axes and dtype (float32 or float64), each
            with one axis of unit stride (a parameter's block read where it lies, or its
            transpose).
        beta, alpha: Python floats; β ≠ 0 (BLAS would not read C, and a non-finite entry of C
            would not carry over as it does in the expression).

    Returns:
        ``out`` (a new array where ``out`` is ``None``), or ``None``.
    """
    dtype = c.dtype
    if (dtype not in _DTYPES or a.dtype != dtype or c.ndim not in (3, 4) or a.ndim != c.ndim
            or a.shape[:-2] != c.shape[:-2] or c.shape[-1] != c.shape[-2] or a.shape[-2] != c.shape[-1]
            or 0 in a.shape or not (isinstance(beta, float) and isinstance(alpha, float)) or beta == 0.0):
        return None
    m, k = a.shape[-2:]
    if c.strides[-1] != c.itemsize or c.strides[-2] != m * c.itemsize:
        return None
    layout = _blas_layout(a)
    if layout is None or max(m, k, layout[1]) > _INT32_MAX:
        return None
    trans, lda = layout
    if out is None:
        out = np.empty(c.shape, dtype=dtype)
    chars = np.array([ord("U"), trans], dtype=np.uint8)  # Fortran's upper: the row-major lower
    ints = np.array([m, k, lda, m], dtype=np.int32)
    scalars = np.array([alpha, beta], dtype=dtype)
    _run(_as_4d(a), _as_4d(c), _as_4d(out), out is not c, chars, ints, scalars)
    return out
