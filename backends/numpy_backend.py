"""NumPy's fast paths for the core's expressions (``shampoo_core._xp.register_fast_path``).

Imported by ``shampoo_core`` the first time it meets a NumPy array. Each function returns a new
array and leaves its inputs as they were; the arithmetic runs in place on that new array,
because every temporary of an expression is a fresh, page-faulting buffer as large as the
parameter, which costs about as much as the arithmetic itself (docs/performance.md: Adam's
β·m + (1 - β)·g over 16 MB took 3.6 ms in place against 7.4 ms as an expression). 0-d arrays
decline (``NotImplemented``): NumPy's 0-d arithmetic gives scalars, which cannot be written in
place.

The functions ending in ``_`` are the in-place forms, for running averages the caller has given
up (``donate_state``): they write the value into their first argument, with the bits of the
new-array forms. Read-only arrays and broadcast views decline.
"""

from __future__ import annotations

import math

import numpy as np

from shampoo_core import _xp

from . import load_fused_cpu, load_syrk_cpu, piecewise_norm_over_root_plus, precondition_rows, python_scalars

__all__ = ["ema", "plus_square", "over_root_plus", "norm_over_root_plus", "ema_plus_square_norm",
           "ema_plus_square_norm_split", "scaled_copy", "scaled_plus_product", "precondition_merged", "ema_",
           "plus_square_", "ema_plus_square_norm_", "ema_plus_square_norm_split_", "scaled_plus_product_",
           "gram_average", "gram_average_"]

NAMESPACE = "array_api_compat.numpy"


def _arrays(*xs) -> bool:
    return all(isinstance(x, np.ndarray) and x.ndim > 0 for x in xs)


def ema(old, new, beta: float):
    """β·old + (1 - β)·new as torch's ``lerp`` forms it (see ``shampoo_core._elementwise.ema``)."""
    if not _arrays(old, new):
        return NotImplemented
    return _lerp(old, new, beta, into_old=False)


def _lerp(old, new, beta: float, into_old: bool):
    """old + (β - 1)(old - new) for β > 1/2, else new + β(old - new): torch's ``lerp`` forms, in
    one new array or (``into_old``) in ``old``, where the first form needs a temporary since it
    reads ``old`` again."""
    if beta > 0.5:
        out = old - new
        out *= beta - 1.0
        if into_old:
            old += out
            return old
        out += old
        return out
    out = np.subtract(old, new, out=old if into_old else None)
    out *= beta
    out += new
    return out


def plus_square(acc, g):
    """acc + g²."""
    if not _arrays(acc, g):
        return NotImplemented
    out = g * g
    out += acc
    return out


def over_root_plus(f, acc, epsilon):
    """f / (√acc + ε), in the one new array."""
    if not _arrays(f, acc):
        return NotImplemented
    out = np.sqrt(acc)
    out += epsilon
    return np.divide(f, out, out=out)


# Entries computed at a time where a pass goes in pieces that stay in cache (256 KB of float32):
# a reduction's pieces, and the products of the blocks of a stack added into their average.
PIECE_ENTRIES = 65536


def norm_over_root_plus(f, acc, epsilon):
    """‖f / (√acc + ε)‖₂, a piece at a time in one scratch buffer: ``f`` and ``acc`` read once,
    each piece's quotient as :func:`over_root_plus` rounds it, the pieces' squares summed in
    float64 (11.6M float32 entries on one core: 9.1 against 18.2 ms for the quotient and its dot).
    Declines all but C-contiguous float32/float64 arrays of one shape and a Python ε."""
    if not (_arrays(f, acc) and f.dtype in (np.float32, np.float64) and acc.dtype == f.dtype
            and acc.shape == f.shape and f.flags.c_contiguous and acc.flags.c_contiguous
            and isinstance(epsilon, (int, float))):
        return NotImplemented
    flat_f, flat_acc = f.reshape(-1), acc.reshape(-1)
    scratch = np.empty(min(PIECE_ENTRIES, flat_f.size), dtype=f.dtype)
    return np.asarray(piecewise_norm_over_root_plus(np, flat_f, flat_acc, epsilon, scratch, PIECE_ENTRIES),
                      dtype=f.dtype)


def _fusable(m, acc, g, beta, epsilon, beta2, nesterov) -> bool:
    """Whether ``backends.fused_cpu`` takes these: numba installed, C-contiguous float32/float64
    arrays of one shape and dtype that share no memory, Python β, ε and β₂ (or no β₂), and
    Python coefficients of Nesterov's F (or none)."""
    return (_arrays(m, acc, g) and m.dtype in (np.float32, np.float64) and acc.dtype == m.dtype
            and g.dtype == m.dtype and acc.shape == m.shape and g.shape == m.shape
            and all(x.flags.c_contiguous for x in (m, acc, g))
            and python_scalars(beta, epsilon, beta2, nesterov)
            and not any(np.may_share_memory(x, y) for x, y in ((m, acc), (m, g), (acc, g)))
            and load_fused_cpu() is not None)


def ema_plus_square_norm(m, acc, g, beta: float, epsilon, beta2=None, nesterov=None):
    """The new first moment, the new accumulator and the grafted norm by one compiled pass that
    reads ``m`` and ``acc`` and writes new arrays (``backends.fused_cpu``), with :func:`ema`'s and
    :func:`plus_square`'s bits (given ``beta2``, the accumulator with :func:`ema`'s of ``acc``
    and g²). Declines where numba is not installed, and all but :func:`_fusable` arguments."""
    return _fused(m, acc, g, beta, epsilon, beta2, nesterov, in_place=False)


def ema_plus_square_norm_split(m, acc, g, plan, beta: float, epsilon, weight, beta2=None, nesterov=None):
    """:func:`ema_plus_square_norm`, with g·``weight`` and the new m (Nesterov's F, given
    ``nesterov``) cut into ``plan``'s blocks in the same compiled pass, with ``split_groups``'
    bits. Declines where numba is not installed, all but :func:`_fusable` arguments, and plans
    whose cut is no copy (``backends.fused_cpu.cuts_in_one_pass``)."""
    return _fused(m, acc, g, beta, epsilon, beta2, nesterov, in_place=False, plan=plan, weight=weight)


def _fused(m, acc, g, beta, epsilon, beta2, nesterov, in_place: bool, plan=None, weight=None):
    """The compiled pass into ``m`` and ``acc`` or new arrays; the norm as a 0-d array of their
    dtype; with a ``plan``, g's and F's blocks (views of one new buffer each) too.
    ``NotImplemented`` for all but :func:`_fusable` arguments, ``m`` and ``acc`` that cannot be
    written (``in_place``), and plans whose cut is no copy (``fused_cpu.cuts_in_one_pass``)."""
    if not (_fusable(m, acc, g, beta, epsilon, beta2, nesterov)
            and (not in_place or (_writable(m) and _writable(acc)))
            and (plan is None or load_fused_cpu().cuts_in_one_pass(plan, g.shape, weight))):
        return NotImplemented
    fused = load_fused_cpu()
    out = None if in_place else (np.empty_like(m), np.empty_like(acc))
    new_m, new_acc = (m, acc) if in_place else out
    cut = None
    if plan is not None:
        cut = (plan, weight, np.empty(g.size, dtype=g.dtype), np.empty(g.size, dtype=g.dtype))
    norm = fused.ema_plus_square_norm(g.reshape(-1), m.reshape(-1), acc.reshape(-1), beta, epsilon,
                                      beta2=beta2, nesterov=nesterov,
                                      out=None if out is None else [x.reshape(-1) for x in out], cut=cut)
    result = (new_m, new_acc, np.asarray(norm, dtype=m.dtype))
    return result if cut is None else result + (fused.cut_stacks(cut[2], plan), fused.cut_stacks(cut[3], plan))


def scaled_copy(x, scale):
    """scale·x written into a new C-contiguous array, in NumPy's result dtype of ``x * scale``."""
    if not _arrays(x):
        return NotImplemented
    return np.multiply(x, scale, out=np.empty(x.shape, dtype=np.result_type(x, scale)))


def scaled_plus_product(c, a, b, beta: float, alpha: float = 1.0):
    """β·C + α·A·B for stacks (one or more batch axes: a group's blocks as a stack, or as a grid
    of strided views, ``shampoo_core.blocking.block_grids``): a few blocks at a time, each piece
    of C scaled into the new array and the products added while the piece is in cache. The same
    bits as the expression (1506 statistics of 128×128: 87-89 against 108-110 ms; 114 of
    512×512: 180-185 against 216-218 ms). 2-D operands decline: NumPy's ``a @ a.T`` is a
    symmetric rank-k update, which BLAS's general product with β (SciPy's ``sgemm``) loses to,
    150 against 129 ms.
    """
    if c.ndim < 3 or not _arrays(c, a, b):
        return NotImplemented
    out = np.empty(c.shape, dtype=np.result_type(c, beta))
    _average_products(out, c, a, b, beta, alpha)
    return out


def precondition_merged(grids, preconditioners, plan, scale):
    """``shampoo_core.preconditioner.precondition_merged`` a block row at a time: each row's
    products (one batched call per preconditioned dim over the row's blocks, read where they lie)
    go into scratch buffers, the last straight into its place in the new merged array where the
    row's group spans every column (else it is copied there), its squares are summed (in
    float64) while it is in cache, and the merged array is then scaled in place (the row loop
    is ``backends.precondition_rows``, torch's too). The separate steps
    write every product, read them again for the norm, and read them a third time to merge
    them (the 4-D products alike, so P has the same bits). ``bench step``'s
    donated step at block 128: 119.5 against 125.1 ms (89.5 against 91.4 ms with OpenBLAS's
    SkylakeX kernels; docs/performance.md). Declines all but NumPy grids of one real floating
    dtype."""
    if not (all(_arrays(g) for g in grids) and len({g.dtype for g in grids}) == 1
            and grids[0].dtype in (np.float32, np.float64)):
        return NotImplemented
    out = np.empty(plan.merged_shape, dtype=grids[0].dtype)
    total = precondition_rows(grids, preconditioners, plan, out, np.matmul,
                              lambda shape: np.empty(shape, dtype=out.dtype), lambda row: float(np.vdot(row, row)))
    factor = scale(np.asarray(math.sqrt(total), dtype=out.dtype)) if callable(scale) else scale
    if np.result_type(out, factor) != out.dtype:  # a wider scale promotes, as the merge copy would
        return (out * factor).reshape(plan.shape)
    out *= factor
    return out.reshape(plan.shape)


def _writable(target, *others) -> bool:
    """Whether ``target`` may be written in place: an array of the others' shape and dtype that
    owns writable memory without repeats (not read-only, not a broadcast view)."""
    return (_arrays(target, *others) and target.flags.writeable
            and all(stride != 0 or size == 1 for stride, size in zip(target.strides, target.shape))
            and all(x.shape == target.shape and x.dtype == target.dtype for x in others))


def ema_(old, new, beta: float):
    """β·old + (1 - β)·new written into ``old``, in :func:`ema`'s operations (for β > 1/2 the
    difference needs a temporary: ``old`` is read again after it)."""
    if not _writable(old, new):
        return NotImplemented
    return _lerp(old, new, beta, into_old=True)


def plus_square_(acc, g):
    """acc + g² written into ``acc`` (the same sum as :func:`plus_square`: addition commutes)."""
    if not _writable(acc, g):
        return NotImplemented
    acc += g * g
    return acc


def ema_plus_square_norm_(m, acc, g, beta: float, epsilon, beta2=None, nesterov=None):
    """:func:`ema_plus_square_norm` written into ``m`` and ``acc``, with the same bits."""
    return _fused(m, acc, g, beta, epsilon, beta2, nesterov, in_place=True)


def ema_plus_square_norm_split_(m, acc, g, plan, beta: float, epsilon, weight, beta2=None, nesterov=None):
    """:func:`ema_plus_square_norm_split` with m and acc written in place, with the same bits."""
    return _fused(m, acc, g, beta, epsilon, beta2, nesterov, in_place=True, plan=plan, weight=weight)


def scaled_plus_product_(c, a, b, beta: float, alpha: float = 1.0):
    """β·C + α·A·B for stacks written into ``C``, a few blocks at a time as
    :func:`scaled_plus_product`."""
    if c.ndim < 3 or not (_arrays(a, b) and _writable(c)):
        return NotImplemented
    _average_products(c, c, a, b, beta, alpha)
    return c


def gram_average(c, a, beta: float, alpha: float = 1.0):
    """β·C + α·A·Aᵀ of a symmetric C (``shampoo_core._xp.gram_average``) in a new array: each
    block of C copied into it and updated there by BLAS's ``syrk`` with β, one call per block
    (``backends.syrk_cpu``; numba and SciPy's BLAS). Entries may differ from the expression's
    by an ulp (BLAS rounds α·P + β·C in its kernel). ``bench step``'s statistics at block 128:
    docs/performance.md, "A statistic's running average in one BLAS call". Declines where numba
    is not installed or BLAS cannot read the blocks where they lie."""
    return _gram_average(c, a, beta, alpha, in_place=False)


def gram_average_(c, a, beta: float, alpha: float = 1.0):
    """:func:`gram_average` written into ``c``."""
    return _gram_average(c, a, beta, alpha, in_place=True)


def _gram_average(c, a, beta, alpha, in_place: bool):
    kernels = load_syrk_cpu()
    if kernels is None or not _arrays(c, a) or (in_place and not _writable(c)):
        return NotImplemented
    out = kernels.gram_average(c, a, beta, alpha, out=c if in_place else None)
    return NotImplemented if out is None else out


def _average_products(out, c, a, b, beta: float, alpha: float) -> None:
    """``out = beta * c + alpha * (a @ b)`` for stacks of one batch shape (``out`` may be ``c``),
    a few blocks of the last batch axis at a time: each piece of ``c`` is scaled into ``out`` and
    its products added while it is in cache, not in a pass over all of ``c`` first."""
    step = max(1, PIECE_ENTRIES // max(1, out.shape[-2] * out.shape[-1]))
    for lead in np.ndindex(out.shape[:-3]):
        for i in range(0, out.shape[-3], step):
            at = lead + (slice(i, i + step),)
            piece = out[at]
            if out is not c:
                np.multiply(c[at], beta, out=piece)
            elif beta != 1.0:
                piece *= beta
            product = a[at] @ b[at]
            if alpha != 1.0:
                product *= alpha
            piece += product


for _name in __all__:
    # NumPy's matmul gives BLAS each block of a strided batch with its row stride, no copy
    _xp.register_fast_path(NAMESPACE, _name, globals()[_name],
                           **({"block_views": True} if _name == "scaled_plus_product" else {}))
