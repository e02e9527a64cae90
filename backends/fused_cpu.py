"""One pass over memory for the grafted first-order optimizer of a CPU step, compiled by numba.

A layer-grafted Shampoo step with a first moment and AdaGrad grafting reads the gradient g, the
first moment m and the accumulator acc three times in eager NumPy or torch (the average, the
sum of squares, and the norm of the grafting direction): about 24 ms over 11.6M float32 entries
on one core. Here one compiled loop reads each entry of g, m and acc once, writes the new m and
acc, and sums the squares of the direction, in about 12 ms (docs/performance.md, "The grafted
optimizer in one pass"). RMSProp's and Adam's grafting take the same loop with the accumulator
an average of g² (``beta2``), compiled apart: a ``None`` is a type of its own to numba, so each
loop is built once with AdaGrad's sum and once with the average, neither branching on it.
Nesterov's first moment takes it the same way (``nesterov``): the norm and the cut are of its
filtered gradient F = c₁·m' + c₂·g, formed in the loop from the m' it has just written.

The new m and acc go into ``m`` and ``acc`` (a donated state) or into new arrays: the loop
reads the old values and writes the new ones, instead of copying the old arrays first and
writing into the copies (two more passes).

The same pass can also cut g and the new m into the blocks of a parameter's block plan (``cut``
of :func:`ema_plus_square_norm`): each row of the parameter is copied into its blocks right
after the pass has read and written it, while it is still in cache, where cutting g and m
afterwards (``shampoo_core.blocking.split_groups``) reads both from memory again.

NumPy arrays and torch CPU tensors (zero-copy, through ``Tensor.numpy``) take it, from
``backends.numpy_backend`` and ``backends.torch_backend`` where numba is installed (the ``fast``
extra); numba compiles each loop at its first call for each dtype (under a second, cached on
disk).

Bits: the new m and acc are NumPy's (``backends.numpy_backend.ema``, and ``plus_square`` or
``ema`` of acc and g²; F is NumPy's ``c1 * m + c2 * g``), each operation rounded in the arrays'
dtype; torch's ``lerp`` rounds ``m + w(g - m)`` once, with a fused multiply-add, so on torch
tensors m may differ from it by an ulp. The norm's squares are summed in float64, in 16
interleaved partial sums, entry k into sum k mod 16 in every form of the loop, so that all
forms return the same norm. The blocks are ``split_groups``' bits.

Vectorization: indices are unsigned, because numba wraps a negative index around, and the
branch that checks for one keeps the compiler from vectorizing a loop whose start it cannot
prove >= 0 (a loop over the rows of a parameter ran 3.3 times slower). Separate outputs are
written through pointers the compiler cannot prove apart from the inputs; it checks for overlap
once per loop at run time and vectorizes. The in-place loops are compiled on their own, with
one pointer for m and one for acc: given the same arrays as inputs and outputs, the separate
loop fails that check and runs unvectorized (22 against 12 ms over 11.6M entries). The two
forms of the average are one loop with a flag the compiler hoists out of it.
"""

from __future__ import annotations

import functools
import math

import numba
import numpy as np

__all__ = ["ema_plus_square_norm", "cuts_in_one_pass", "cut_layout", "cut_stacks"]

_LANES = 16  # independent float64 partial sums: a reduction the compiler vectorizes without reassociating


# Module-level functions, not closures: numba's disk cache cannot key a closure over other
# compiled functions, and compiled one again in every process, adding a file to the cache each time.

@numba.njit(inline="always")
def _filtered(new_m, gi, nesterov):  # pragma: no cover (compiled)
    # the first moment, or Nesterov's c₁·m' + c₂·g, each product rounded, as NumPy rounds it
    if nesterov is None:
        return new_m
    return nesterov[0] * new_m + nesterov[1] * gi


@numba.njit(inline="always")
def _entry(i, g, m, acc, m_out, acc_out, form, squares, nesterov):  # pragma: no cover (compiled)
    above, coef, epsilon = form
    i = np.uint64(i)
    gi = g[i]
    mi = m[i]
    # m + (β-1)(m - g) for β > 1/2, g + β(m - g) otherwise; ``above`` is the same for the whole
    # loop, which the compiler splits into one vectorized loop per form
    new_m = (mi - gi) * coef + (mi if above else gi)
    square = gi * gi
    ai = acc[i]
    if squares is None:  # AdaGrad's sum; a None is a type of its own, compiled without this branch
        new_acc = ai + square
    else:  # the average of the squares (RMSProp, Adam) in the same forms
        new_acc = (ai - square) * squares[1] + (ai if squares[0] else square)
    m_out[i] = new_m
    acc_out[i] = new_acc
    q = np.float64(_filtered(new_m, gi, nesterov) / (np.sqrt(new_acc) + epsilon))
    return q * q


@numba.njit(inline="always")
def _run(g, m, acc, m_out, acc_out, form, squares, nesterov, parts, start, stop):  # pragma: no cover (compiled)
    # ``start`` a multiple of the lanes, so that entry k adds into lane k % _LANES
    whole = stop - (stop - start) % _LANES
    for i0 in range(start, whole, _LANES):
        for j in range(_LANES):
            parts[j] += _entry(i0 + j, g, m, acc, m_out, acc_out, form, squares, nesterov)
    for i in range(whole, stop):
        parts[i - whole] += _entry(i, g, m, acc, m_out, acc_out, form, squares, nesterov)


@numba.njit(inline="always")
def _cut_rows(g, new_m, nesterov, weight, cols, r0, r1, table, starts, widths, g_cut,
              m_cut):  # pragma: no cover (compiled)
    for i in range(r0, r1):
        for b in range(starts.shape[0]):
            dst = np.uint64(table[i, b])
            src = np.uint64(i * cols + starts[b])
            for c in range(np.uint64(widths[b])):
                g_cut[dst + c] = g[src + c] * weight
            for c in range(np.uint64(widths[b])):
                m_cut[dst + c] = _filtered(new_m[src + c], g[src + c], nesterov)


_jit = numba.njit(cache=True, nogil=True, error_model="numpy", boundscheck=False)


@_jit
def _flat_in_place(g, m, acc, form, squares, nesterov):  # pragma: no cover (compiled)
    parts = np.zeros(_LANES, np.float64)
    _run(g, m, acc, m, acc, form, squares, nesterov, parts, 0, g.shape[0])
    return math.sqrt(parts.sum())


@_jit
def _flat_into(g, m, acc, m_out, acc_out, form, squares, nesterov):  # pragma: no cover (compiled)
    parts = np.zeros(_LANES, np.float64)
    _run(g, m, acc, m_out, acc_out, form, squares, nesterov, parts, 0, g.shape[0])
    return math.sqrt(parts.sum())


@numba.njit(inline="always")
def _cut_pieces(g, m, acc, m_out, acc_out, form, squares, nesterov, weight, cols, rows_per_piece, table, starts, widths,
                g_cut, m_cut):  # pragma: no cover (compiled)
    parts = np.zeros(_LANES, np.float64)
    rows = g.shape[0] // cols
    for r0 in range(0, rows, rows_per_piece):
        r1 = min(r0 + rows_per_piece, rows)
        _run(g, m, acc, m_out, acc_out, form, squares, nesterov, parts, r0 * cols, r1 * cols)
        # still in cache
        _cut_rows(g, m_out, nesterov, weight, cols, r0, r1, table, starts, widths, g_cut, m_cut)
    return math.sqrt(parts.sum())


@_jit
def _cut_in_place(g, m, acc, form, squares, nesterov, weight, cols, rows_per_piece, table, starts, widths, g_cut,
                  m_cut):  # pragma: no cover (compiled)
    return _cut_pieces(g, m, acc, m, acc, form, squares, nesterov, weight, cols, rows_per_piece, table, starts, widths,
                       g_cut, m_cut)


@_jit
def _cut_into(g, m, acc, m_out, acc_out, form, squares, nesterov, weight, cols, rows_per_piece, table, starts, widths,
              g_cut, m_cut):  # pragma: no cover (compiled)
    return _cut_pieces(g, m, acc, m_out, acc_out, form, squares, nesterov, weight, cols, rows_per_piece, table, starts,
                       widths, g_cut, m_cut)


# by (cut, in place); the in-place loops are their own, with one pointer for m and one for acc
_KERNELS = {(False, True): _flat_in_place, (False, False): _flat_into,
            (True, True): _cut_in_place, (True, False): _cut_into}


def ema_plus_square_norm(g, m, acc, beta: float, epsilon: float, out=None, cut=None, beta2=None,
                         nesterov=None) -> float:
    """β·m + (1 - β)·g and acc + g² (or β₂·acc + (1 - β₂)·g²), and ‖m' / (√acc' + ε)‖₂ of the new
    values as a Python float, in one pass (with ``nesterov``, ‖F / (√acc' + ε)‖₂ of Nesterov's
    filtered gradient F = c₁·m' + c₂·g).

    Args:
        g, m, acc: 1-D C-contiguous NumPy arrays of one length and one dtype, float32 or float64;
            no two share memory.
        beta: the first moment's β in [0, 1]; epsilon: ε >= 0 (AdaGrad's), Python floats rounded
            to the arrays' dtype, as NumPy rounds a Python scalar beside an array.
        out: ``None``: the new values are written into ``m`` and ``acc`` (then writable); or
            ``(m_out, acc_out)``, arrays like ``m`` sharing no memory with the others, which
            receive them (``m`` and ``acc`` are only read).
        cut: ``None``, or ``(plan, weight, g_cut, m_cut)``: also write g·``weight`` and the new m
            (F with ``nesterov``) cut into the blocks of ``plan`` (a
            ``shampoo_core.blocking.BlockPlan`` that :func:`cuts_in_one_pass` takes; ``weight`` a
            Python float or ``None``) into ``g_cut`` and ``m_cut``, arrays like ``m`` sharing no
            memory with the others, laid out as :func:`cut_layout` says.
        beta2: ``None``: AdaGrad's sum acc + g²; or RMSProp's and Adam's β₂ in [0, 1], a Python
            float: the average of the squares, in the first moment's form (NumPy's ``ema`` of
            ``acc`` and g², rounded as it rounds).
        nesterov: ``None``: the norm and the cut are of m'; or ``(c₁, c₂)``, Python floats
            (``shampoo_core.momentum.nesterov_coefficients``): they are of F = c₁·m' + c₂·g,
            rounded as NumPy rounds ``c1 * m + c2 * g``. m' itself is written either way.
    """
    dtype = g.dtype.type
    form = _average_form(dtype, beta) + (dtype(epsilon),)
    squares = None if beta2 is None else _average_form(dtype, beta2)
    if nesterov is not None:
        nesterov = (dtype(nesterov[0]), dtype(nesterov[1]))
    arrays = (g, m, acc) + (() if out is None else tuple(out))
    kernel = _KERNELS[(cut is not None, out is None)]
    if cut is None:
        return float(kernel(*arrays, form, squares, nesterov))
    plan, weight, g_cut, m_cut = cut
    table, starts, widths, _ = cut_layout(plan)
    cols = plan.merged_shape[1]
    rows_per_piece = _LANES // math.gcd(cols, _LANES)  # pieces of whole lanes keep the flat loop's sums
    scale = dtype(1.0 if weight is None else weight)
    return float(kernel(*arrays, form, squares, nesterov, scale, cols, rows_per_piece, table, starts, widths, g_cut,
                        m_cut))


def _average_form(dtype, beta):
    """``(above, coef)`` of β·old + (1 - β)·new as the loop forms it: old + (β - 1)(old - new) for
    β > 1/2, new + β(old - new) otherwise, the coefficient rounded to the arrays' dtype."""
    return (True, dtype(beta - 1.0)) if beta > 0.5 else (False, dtype(beta))


def cuts_in_one_pass(plan, shape, weight) -> bool:
    """Whether ``cut`` of :func:`ema_plus_square_norm` takes ``plan`` for arrays of ``shape``:
    ``plan``'s own, non-empty, merged into 2-D with more than one block along the columns (with
    one, every group's blocks are whole rows, and ``split_groups`` cuts g and m as views, with no
    copy to save), and a Python float or ``None`` as ``weight``."""
    return (tuple(shape) == plan.shape and plan.size > 0 and len(plan.merged_shape) == 2
            and len(plan.bounds[1]) > 1 and (weight is None or isinstance(weight, float)))


@functools.lru_cache(maxsize=1024)  # plans are few and fixed; a step asks once per parameter
def cut_layout(plan):
    """Where the cut of :func:`ema_plus_square_norm` puts each entry of a parameter of ``plan``
    (a ``shampoo_core.blocking.BlockPlan`` whose merged shape is ``(rows, cols)``).

    The blocks lie in one buffer group after group, each group's stack of blocks in the order of
    ``split_groups``, so that ``buffer[offset:offset + size].reshape(shape)`` is that group's
    stack.

    Returns:
        ``(table, starts, widths, stacks)``: ``table`` ``(rows, column blocks)`` int64, the buffer
        index of each row's first entry in each column block; ``starts``, ``widths`` per column
        block (int64); ``stacks`` per group ``(offset, (num_blocks, *block_shape))``. The arrays
        are read-only: every step of the plan shares them.

    Raises:
        ValueError: the merged shape is not 2-D.
    """
    if len(plan.merged_shape) != 2:
        raise ValueError(f"plan: the cut needs a 2-D merged shape; got {plan.merged_shape}")
    rows, _ = plan.merged_shape
    starts = np.array([a for a, _ in plan.bounds[1]], dtype=np.int64)
    widths = np.array([b - a for a, b in plan.bounds[1]], dtype=np.int64)
    table = np.empty((rows, starts.shape[0]), dtype=np.int64)
    stacks, offset = [], 0
    for group in plan.groups:
        (row_slice, col_slice), (row_count, col_count), (height, width) = group.region, group.counts, group.block_shape
        block_row, row = np.divmod(np.arange(row_slice.stop - row_slice.start, dtype=np.int64), height)
        block_col = np.arange(col_count, dtype=np.int64)
        first = int(np.searchsorted(starts, col_slice.start))
        table[row_slice, first:first + col_count] = offset + (
            (block_row[:, None] * col_count + block_col[None, :]) * height + row[:, None]) * width
        stacks.append((offset, (row_count * col_count, height, width)))
        offset += row_count * col_count * height * width
    for x in (table, starts, widths):
        x.flags.writeable = False
    return table, starts, widths, tuple(stacks)


def cut_stacks(buffer, plan) -> list:
    """The stacks of blocks of ``plan``'s groups in a 1-D NumPy array or torch tensor laid out as
    :func:`cut_layout` says: views of ``buffer``, as ``split_groups`` returns them."""
    return [buffer[offset:offset + math.prod(shape)].reshape(shape) for offset, shape in cut_layout(plan)[3]]
