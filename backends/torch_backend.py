"""torch's fast paths for the core's expressions (``shampoo_core._xp.register_fast_path``).

Imported by ``shampoo_core`` the first time it meets a torch tensor. Each function returns a new
tensor and leaves its inputs as they were, in fewer passes than the expression: the fused
kernels of ``torch.optim``'s own optimizers (``lerp``, ``addcmul``), ``out=`` into the one new
tensor, matrix products that add β·C and scale by α as they write (``addmm``/``baddbmm``), and on
the CPU the statistics' averages by BLAS's symmetric ``syrk`` (``backends.syrk_cpu``).
Where autograd records the inputs, the functions that would write into a tensor autograd
needs decline (``NotImplemented``) and the core computes the expression.

The functions ending in ``_`` are the in-place forms, for running averages the caller has given
up (``donate_state``): the same kernels as ``torch.optim``'s own in-place steps (``lerp_``,
``addcmul_``, ``baddbmm_``), with the bits of the new-tensor forms.
"""

from __future__ import annotations

import math

import torch

from shampoo_core import _xp

from . import load_fused_cpu, load_syrk_cpu, piecewise_norm_over_root_plus, precondition_rows, python_scalars

__all__ = ["ema", "plus_square", "over_root_plus", "norm_over_root_plus", "ema_plus_square_norm",
           "ema_plus_square_norm_split", "norm", "scaled_copy", "scaled_plus_product", "precondition_merged",
           "gram_average", "ema_", "plus_square_", "ema_plus_square_norm_", "ema_plus_square_norm_split_",
           "scaled_plus_product_", "gram_average_"]

NAMESPACE = "array_api_compat.torch"


def _tensors(*xs) -> bool:
    return all(isinstance(x, torch.Tensor) for x in xs)


def ema(old, new, beta: float):
    """β·old + (1 - β)·new, one ``lerp`` pass. ``lerp(old, new, 1 - β)``, not
    ``lerp(new, old, β)``: torch rounds the weight to the tensors' dtype, and 1 - β rounded once
    keeps Adam's first (1 - β₂)·g² exact to 1 ulp, where 1 - round(β) is 1.3e-5 off for
    β = 0.999 in float32."""
    if not _tensors(old, new):
        return NotImplemented
    return torch.lerp(old, new, 1.0 - beta)


def plus_square(acc, g):
    """acc + g², one ``addcmul`` pass."""
    if not _tensors(acc, g):
        return NotImplemented
    return torch.addcmul(acc, g, g)


def over_root_plus(f, acc, epsilon):
    """f / (√acc + ε), written into the one new tensor (autograd forbids writing its results)."""
    if not _tensors(f, acc) or f.requires_grad or acc.requires_grad:
        return NotImplemented
    denominator = torch.sqrt(acc).add_(epsilon)  # in place on the new tensor only
    return torch.div(f, denominator, out=denominator)


# Entries of one piece of a reduction computed in pieces: 256 KB of float32 per operand, in cache.
PIECE_ENTRIES = 65536
_REAL = (torch.float32, torch.float64)


def norm_over_root_plus(f, acc, epsilon):
    """‖f / (√acc + ε)‖₂, a piece at a time in one scratch tensor: ``f`` and ``acc`` read once,
    each piece's quotient as :func:`over_root_plus` rounds it, the pieces' squares summed in
    float64 (11.6M float32 entries on one core: 11.3 against 24.4 ms for the quotient and its
    norm). CPU only: a GPU would wait for every piece. Declines all but contiguous float32/float64
    tensors of one shape that autograd does not record, and a Python ε."""
    if not (_tensors(f, acc) and f.device.type == "cpu" and f.dtype in _REAL and acc.dtype == f.dtype
            and acc.shape == f.shape and not (f.requires_grad or acc.requires_grad)
            and f.is_contiguous() and acc.is_contiguous() and isinstance(epsilon, (int, float))):
        return NotImplemented
    flat_f, flat_acc = f.reshape(-1), acc.reshape(-1)
    scratch = torch.empty(min(PIECE_ENTRIES, flat_f.numel()), dtype=f.dtype, device=f.device)
    return torch.tensor(piecewise_norm_over_root_plus(torch, flat_f, flat_acc, epsilon, scratch, PIECE_ENTRIES),
                        dtype=f.dtype, device=f.device)


def _fusable(m, acc, g, beta, epsilon, beta2, nesterov) -> bool:
    """Whether ``backends.fused_cpu`` takes these: numba installed, contiguous CPU float32/float64
    tensors of one shape and dtype, none recorded by autograd, that share no memory; Python β, ε
    and β₂ (or no β₂), and Python coefficients of Nesterov's F (or none)."""
    return (_tensors(m, acc, g) and m.dtype in _REAL and acc.dtype == m.dtype and g.dtype == m.dtype
            and acc.shape == m.shape and g.shape == m.shape
            and all(x.device.type == "cpu" and x.is_contiguous() and not x.requires_grad for x in (m, acc, g))
            and python_scalars(beta, epsilon, beta2, nesterov)
            and _disjoint(m, acc, g) and load_fused_cpu() is not None)


def _disjoint(*tensors) -> bool:
    """Whether the memory spans of these contiguous tensors overlap nowhere."""
    spans = sorted((x.data_ptr(), x.data_ptr() + x.numel() * x.element_size()) for x in tensors)
    return all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))


def _fused(m, acc, g, beta, epsilon, beta2, nesterov, in_place: bool, plan=None, weight=None):
    """The compiled pass (on zero-copy NumPy views) into ``m`` and ``acc`` or new tensors; the
    norm as a 0-d tensor; with a ``plan``, g's and F's blocks (views of one new tensor each)
    too. ``NotImplemented`` for all but :func:`_fusable` arguments, ``m`` and ``acc`` that
    cannot be written (``in_place``), and plans whose cut is no copy
    (``fused_cpu.cuts_in_one_pass``)."""
    if not (_fusable(m, acc, g, beta, epsilon, beta2, nesterov)
            and (not in_place or (_writable(m) and _writable(acc)))
            and (plan is None or load_fused_cpu().cuts_in_one_pass(plan, g.shape, weight))):
        return NotImplemented
    fused = load_fused_cpu()
    new_m, new_acc = (m, acc) if in_place else (torch.empty_like(m), torch.empty_like(acc))
    cut = None
    if plan is not None:
        cut = tuple(torch.empty(g.numel(), dtype=g.dtype, device=g.device) for _ in range(2))

    def flat(x):
        return x.reshape(-1).numpy()

    norm = fused.ema_plus_square_norm(flat(g), flat(m), flat(acc), beta, epsilon,
                                      beta2=beta2, nesterov=nesterov,
                                      out=None if in_place else (flat(new_m), flat(new_acc)),
                                      cut=None if cut is None else (plan, weight, flat(cut[0]), flat(cut[1])))
    result = (new_m, new_acc, torch.tensor(norm, dtype=m.dtype, device=m.device))
    return result if cut is None else result + (fused.cut_stacks(cut[0], plan), fused.cut_stacks(cut[1], plan))


def ema_plus_square_norm(m, acc, g, beta: float, epsilon, beta2=None, nesterov=None):
    """The new first moment, the new accumulator and the grafted norm by one compiled pass that
    reads ``m`` and ``acc`` and writes new tensors (``backends.fused_cpu``), with NumPy's bits
    (``backends.numpy_backend.ema_plus_square_norm``, with or without ``beta2``): every operation
    rounded on its own, where torch's vectorized ``lerp`` and ``addcmul`` fuse a multiply and an
    add, so that an entry may differ from theirs by an ulp. Declines where numba is not
    installed, and all but :func:`_fusable` arguments."""
    return _fused(m, acc, g, beta, epsilon, beta2, nesterov, in_place=False)


def ema_plus_square_norm_split(m, acc, g, plan, beta: float, epsilon, weight, beta2=None, nesterov=None):
    """``backends.numpy_backend.ema_plus_square_norm_split`` for :func:`_fusable` CPU tensors: the
    pass of :func:`ema_plus_square_norm` that also cuts g·``weight`` and the new m (or Nesterov's
    F) into ``plan``'s blocks, with ``split_groups``' bits."""
    return _fused(m, acc, g, beta, epsilon, beta2, nesterov, in_place=False, plan=plan, weight=weight)


def _squares(x) -> float:
    # the sum of squares of a contiguous CPU tensor: dots of PIECE_ENTRIES-entry pieces in float64
    return sum(float(torch.dot(piece, piece)) for piece in x.reshape(-1).split(PIECE_ENTRIES))


def norm(x):
    """‖x‖₂ of a contiguous float32/float64 tensor from BLAS dots, which
    ``torch.linalg.vector_norm`` matches in time but not in accuracy (on 4M float32 Gaussian
    entries 8.0e-5 relative error). On the CPU, the dots of pieces of ``PIECE_ENTRIES`` entries
    summed in float64: one dot over all 4M entries was 3.5e-6 off on an Intel CPU but 2.8e-5 on
    an AMD one with one MKL thread, the pieces 6.3e-8 (11.6M entries: 2.0 against 1.4 ms). On a
    GPU, and for tensors autograd records, one dot."""
    if not (isinstance(x, torch.Tensor) and x.dtype in _REAL and x.ndim > 0 and x.is_contiguous()):
        return NotImplemented
    flat = x.reshape(-1)
    if x.device.type != "cpu" or x.requires_grad:
        return torch.sqrt(torch.dot(flat, flat))
    return torch.tensor(math.sqrt(_squares(flat)), dtype=x.dtype, device=x.device)


def scaled_copy(x, scale):
    """scale·x written into a new contiguous tensor, in torch's result dtype of ``x * scale``."""
    if not isinstance(x, torch.Tensor) or x.requires_grad or getattr(scale, "requires_grad", False):
        return NotImplemented
    out = torch.empty(x.shape, dtype=torch.result_type(x, scale), device=x.device)
    return torch.mul(x, scale, out=out)


def scaled_plus_product(c, a, b, beta: float, alpha: float = 1.0):
    """β·C + α·A·B in one ``addmm`` (``baddbmm`` for stacks): 1506 statistics of 128×128 took
    88.6 ms against 102.8 ms as ``beta * c + a @ b``, with the same bits (larger products round
    differently: BLAS adds β·C to partial sums, and applies α to a sum it has partly formed).
    More than one batch axis declines: ``baddbmm`` takes one.

    On the CPU a stack goes a few blocks at a time: each piece of C is copied into the new tensor
    and ``baddbmm_`` adds its products there while it is in cache, where ``baddbmm`` copies all of
    C first and reads the copy back from memory (the same bits; docs/performance.md, "torch's new
    statistics a few blocks at a time")."""
    if not _tensors(c, a, b) or c.ndim > 3:
        return NotImplemented
    if (c.ndim < 3 or c.device.type != "cpu" or any(x.requires_grad for x in (c, a, b))
            or not (c.dtype == a.dtype == b.dtype and c.shape[0] == a.shape[0] == b.shape[0])):
        return (torch.baddbmm if c.ndim == 3 else torch.addmm)(c, a, b, beta=beta, alpha=alpha)
    out = torch.empty(c.shape, dtype=c.dtype, device=c.device)
    step = max(1, PIECE_ENTRIES // max(1, c.shape[-2] * c.shape[-1]))
    for i in range(0, c.shape[0], step):
        piece = out[i:i + step]
        piece.copy_(c[i:i + step])
        piece.baddbmm_(a[i:i + step], b[i:i + step], beta=beta, alpha=alpha)
    return out


# The least m²·k of an (m, k) block for which ``syrk`` pays, and then only for k >= m: below it,
# or with fewer columns than rows, one block's ``syrk`` and mirror took 1.05-1.6x ``baddbmm``'s
# time on an AMD EPYC (OpenBLAS, Haswell kernels); above it 0.66-0.97x (docs/performance.md,
# "torch: the statistics by ``syrk``").
SYRK_MIN_WORK = 1 << 22


def syrk_pays(m: int, k: int) -> bool:
    """Whether the statistic of an (m, k) block (m×m, from A·Aᵀ) goes to BLAS's ``syrk`` rather
    than to ``baddbmm``: k >= m and m²·k >= :data:`SYRK_MIN_WORK` (from 128×256 and 192×192
    blocks up; not at ``block_size`` 128's 128×128)."""
    return k >= m and m * m * k >= SYRK_MIN_WORK


def gram_average(c, a, beta: float, alpha: float = 1.0):
    """β·C + α·A·Aᵀ of a symmetric C (``shampoo_core._xp.gram_average``) in a new tensor, by
    BLAS's ``syrk`` with β on zero-copy NumPy views (``backends.syrk_cpu``, NumPy's path): one
    triangle of each block computed and mirrored, where ``baddbmm`` forms the whole product.
    Where the blocks are large enough for that to pay (:func:`syrk_pays`): at ``bench step``'s
    block sizes 512 and 1024, not 128 (docs/performance.md, "torch: the statistics by
    ``syrk``"). Entries may differ from ``baddbmm``'s by an ulp. Declines smaller blocks, all but
    CPU float32/float64 tensors of one dtype that autograd does not record, Python β and α, and
    the cases :func:`backends.syrk_cpu.gram_average` declines (where numba is not installed,
    β = 0, or BLAS cannot read the blocks where they lie)."""
    return _gram_average(c, a, beta, alpha, in_place=False)


def gram_average_(c, a, beta: float, alpha: float = 1.0):
    """:func:`gram_average` written into ``c``, with the same bits."""
    return _gram_average(c, a, beta, alpha, in_place=True)


def _gram_average(c, a, beta, alpha, in_place: bool):
    # syrk_cpu loaded last: blocks too small for it never import numba's loop
    if not (_tensors(c, a) and a.ndim >= 2 and syrk_pays(*a.shape[-2:]) and c.dtype in _REAL and a.dtype == c.dtype
            and all(x.device.type == "cpu" and not x.requires_grad and not x.is_conj() and not x.is_neg()
                    for x in (c, a))
            and (not in_place or _writable(c)) and (syrk_cpu := load_syrk_cpu()) is not None):
        return NotImplemented
    cn = c.numpy()
    out = syrk_cpu.gram_average(cn, a.numpy(), beta, alpha, out=cn if in_place else None)
    if out is None:
        return NotImplemented
    return c if in_place else torch.from_numpy(out)


def precondition_merged(grids, preconditioners, plan, scale):
    """``shampoo_core.preconditioner.precondition_merged`` a block row at a time on the CPU, as
    NumPy's fast path runs it (``backends.precondition_rows``): each row's products go by
    ``matmul(out=)`` (batched, ``bmm``) into scratch tensors, the last straight into its place in
    the new merged tensor where the row's group spans every column (else it is copied there),
    its squares are summed (dots of pieces, in float64, as :func:`norm`) while it is in cache,
    and the merged tensor is then scaled in place.
    The separate steps write every product, read them again for the norm and a third time to
    merge them; P has the same bits. Declines all but CPU grids and preconditioners of one real
    floating dtype that autograd does not record."""
    tensors = list(grids) + [f for factors in preconditioners for f in factors]
    if not (_tensors(*tensors) and tensors[0].dtype in _REAL
            and all(x.dtype == tensors[0].dtype and x.device.type == "cpu" and not x.requires_grad
                    for x in tensors)):
        return NotImplemented
    dtype, device = tensors[0].dtype, tensors[0].device  # not the default device a context may set
    out = torch.empty(plan.merged_shape, dtype=dtype, device=device)
    total = precondition_rows(grids, preconditioners, plan, out, torch.matmul,
                              lambda shape: torch.empty(shape, dtype=dtype, device=device), _squares)
    factor = scale(torch.tensor(math.sqrt(total), dtype=dtype, device=device)) if callable(scale) else scale
    if torch.result_type(out, factor) != dtype:  # a wider scale promotes, as the merge copy would
        return (out * factor).reshape(plan.shape)
    out.mul_(factor)
    return out.reshape(plan.shape)


def _writable(target, *operands, same_shape: bool = True) -> bool:
    """Whether ``target`` may be written in place with a value computed from ``operands`` (of its
    shape and dtype unless ``same_shape=False``): tensors autograd does not record, and no
    broadcast of ``target`` (its storage then overlaps itself)."""
    return (_tensors(target, *operands) and not any(x.requires_grad for x in (target, *operands))
            and all(stride != 0 or size == 1 for stride, size in zip(target.stride(), target.shape))
            and (not same_shape or all(x.shape == target.shape and x.dtype == target.dtype for x in operands)))


def ema_(old, new, beta: float):
    """β·old + (1 - β)·new written into ``old`` by ``lerp_`` (as :func:`ema`)."""
    if not _writable(old, new):
        return NotImplemented
    return old.lerp_(new, 1.0 - beta)


def plus_square_(acc, g):
    """acc + g² written into ``acc`` by ``addcmul_``."""
    if not _writable(acc, g):
        return NotImplemented
    return acc.addcmul_(g, g)


def ema_plus_square_norm_(m, acc, g, beta: float, epsilon, beta2=None, nesterov=None):
    """:func:`ema_plus_square_norm` written into ``m`` and ``acc``, with the same bits."""
    return _fused(m, acc, g, beta, epsilon, beta2, nesterov, in_place=True)


def ema_plus_square_norm_split_(m, acc, g, plan, beta: float, epsilon, weight, beta2=None, nesterov=None):
    """:func:`ema_plus_square_norm_split` with m and acc written in place, with the same bits."""
    return _fused(m, acc, g, beta, epsilon, beta2, nesterov, in_place=True, plan=plan, weight=weight)


def scaled_plus_product_(c, a, b, beta: float, alpha: float = 1.0):
    """β·C + α·A·B written into ``C`` by ``addmm_`` (``baddbmm_`` for stacks of one batch axis)."""
    if c.ndim > 3 or not _writable(c, a, b, same_shape=False):
        return NotImplemented
    return (c.baddbmm_ if c.ndim == 3 else c.addmm_)(a, b, beta=beta, alpha=alpha)


# The matrix product's trait (alpha applied inside it) is read from its new-array form.
for _name in __all__:
    _xp.register_fast_path(NAMESPACE, _name, globals()[_name],
                           **({"alpha_in_product": True} if _name == "scaled_plus_product" else {}))
