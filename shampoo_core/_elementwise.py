"""The optimizer's elementwise running averages and divisions, in as few passes as the library allows.

Each function computes one expression of the array API on arrays of one shape and dtype (only
the division takes the namespace ``xp``, for its square root); its result is a new array and
its inputs are left as they were. Over Shampoo's parameters these passes cost as much as the
block matmuls at block size 128 (docs/performance.md), so a library may register a faster way
to compute each (``_xp.register_fast_path``, from its module in ``backends``):

* torch (``backends.torch_backend``): the fused kernels of ``torch.optim``'s own optimizers
  (``lerp``, ``addcmul``), one pass where the expression takes two to four.
* NumPy (``backends.numpy_backend``): the arithmetic runs in place on the one new array the
  function returns. Each temporary NumPy allocates for an expression is a fresh, page-faulting
  buffer as large as the parameter, which costs about as much as the arithmetic itself.
* Anything else (JAX, whose compiler fuses them; array_api_strict; CuPy), and what a fast path
  declines (0-d NumPy arrays, a division autograd records): the expression below.

The running averages also take ``donate``: the caller (``donate_state``) gives up the old
average, and a library's in-place fast path (NumPy's and torch's) writes the new one into it,
with the same bits, instead of allocating a new array. This module never writes into an array
itself, so JAX and the other libraries compute the new array as before.

They also take ``gate``: ``None``, or the traced verdict of ``nonfinite="skip"`` (a 0-d bool
array). Where it is False the step is skipped and the result holds ``old``'s values: the
coefficients of the average become 1 and 0 and ``new`` is replaced by zeros, inside the one
expression. A ``where`` between the new and the old average after it would be a pass of its own
whenever the new average has another reader (the first moment feeds the update), and it keeps
the old average alive past the new one, so that ``jax.jit`` cannot write a donated state in
place (docs/reliability.md). Where ``gate`` is True the bits are those of the ungated expression.
"""

from __future__ import annotations

from . import _xp

__all__ = ["ema", "plus_square", "over_root_plus", "norm_over_root_plus", "ema_plus_square_norm",
           "ema_plus_square_norm_with_f", "nesterov_f", "scaled_copy", "gated"]


def ema(old, new, beta: float, donate: bool = False, gate=None):
    """β·old + (1 - β)·new, the running average of ``new`` (Adam's m and v; Kingma & Ba 2015).

    Args:
        old, new: arrays of one shape and real floating dtype.
        beta: a float in [0, 1].
        donate: ``old`` may be overwritten with the result (see the module docstring).
        gate: None, or a 0-d bool array; where False, the result is ``old``'s values (see the
            module docstring).

    Returns:
        A new array of ``old``'s shape and dtype (``old`` itself, overwritten, where donated to an
        in-place fast path). A fast path computes it as a linear
        interpolation, old + (1 - β)(new - old) for β > 1/2 and new + β(old - new) otherwise
        (torch's ``lerp`` and its choice of form), which is exact at β = 0 and β = 1. The weight
        is 1 - β, computed in float64 before it is rounded to the arrays' dtype: for β = 0.999,
        rounding β first and taking 1 - β in float32 misplaces Adam's (1 - β₂)·g² by 1.3e-5
        relative.
    """
    if gate is not None:
        xp = _xp.namespace(old)
        keep, take = gated(xp, gate, beta, old.dtype), gated(xp, gate, 1.0 - beta, old.dtype, 0.0)
        return keep * old + take * xp.where(gate, new, xp.zeros_like(new))
    out = _xp.fast_value("ema", old, new, beta, donate=donate)
    if out is not NotImplemented:
        return out
    return beta * old + (1.0 - beta) * new


def gated(xp, gate, value: float, dtype, otherwise: float = 1.0):
    """The 0-d array ``value`` where ``gate``, else ``otherwise``, in ``dtype``: each rounded
    once, as a Python float is when it multiplies an array of ``dtype``."""
    return xp.where(gate, xp.asarray(value, dtype=dtype), xp.asarray(otherwise, dtype=dtype))


def plus_square(acc, g, donate: bool = False, gate=None):
    """acc + g², AdaGrad's sum of squared gradients (Duchi, Hazan, Singer 2011).

    Args:
        acc, g: arrays of one shape and real floating dtype.
        donate: ``acc`` may be overwritten with the result (see the module docstring).
        gate: None, or a 0-d bool array; where False, ``g`` counts as zeros and the result is
            ``acc``'s values (see the module docstring).

    Returns:
        A new array of ``acc``'s shape and dtype (``acc`` itself where donated and written in place).
    """
    if gate is not None:
        xp = _xp.namespace(acc)
        g = xp.where(gate, g, xp.zeros_like(g))
        return acc + g * g
    out = _xp.fast_value("plus_square", acc, g, donate=donate)
    if out is not NotImplemented:
        return out
    return acc + g * g


def over_root_plus(xp, f, acc, epsilon):
    """f / (√acc + ε), the diagonal preconditioner applied to ``f`` (AdaGrad, RMSProp, Adam).

    Args:
        f, acc: arrays of one shape and real floating dtype, ``acc >= 0``.
        epsilon: a float >= 0, or a 0-d array of ``f``'s dtype (Adam's ε√(1 - β₂ᵗ) under jit).

    Returns:
        A new array of ``f``'s shape and dtype.
    """
    out = _xp.fast_value("over_root_plus", f, acc, epsilon)
    if out is not NotImplemented:
        return out
    return f / (xp.sqrt(acc) + epsilon)


def norm_over_root_plus(xp, f, acc, epsilon):
    """‖f / (√acc + ε)‖₂ over all entries: the norm of :func:`over_root_plus`'s result, which a
    fast path computes in pieces small enough to stay in cache, reading ``f`` and ``acc`` once
    and writing nothing of their size (NumPy's and torch's: four passes over memory become one).

    Args:
        f, acc: arrays of one shape and real floating dtype, ``acc >= 0``.
        epsilon: a float >= 0, or a 0-d array of ``f``'s dtype.

    Returns:
        A 0-d array of ``f``'s dtype. A fast path sums the squares of its pieces in float64,
        which is more accurate than the whole array's norm in ``f``'s dtype.
    """
    out = _xp.fast_value("norm_over_root_plus", f, acc, epsilon)
    if out is not NotImplemented:
        return out
    return _xp.norm(xp, over_root_plus(xp, f, acc, epsilon))


def ema_plus_square_norm(xp, m, acc, g, beta: float, epsilon, donate: bool = False, beta2: float | None = None,
                         nesterov=None):
    """The first moment, the grafting accumulator and the norm of the grafting direction of a
    layer-grafted step, together: ``(m', acc', ‖F / (√acc' + ε)‖₂)`` with m' = :func:`ema` of
    ``m`` and ``g``, acc' = :func:`plus_square` of ``acc`` and ``g`` (AdaGrad), or, given
    ``beta2``, :func:`ema` of ``acc`` and g² (RMSProp, Adam), and F = m', or, given
    ``nesterov``, Nesterov's filtered gradient c₁·m' + c₂·g.

    The three read ``g``, ``m`` and ``acc`` three times as separate passes; a library's fast path
    may compute them in one (``backends.fused_cpu``, where numba is installed: NumPy arrays and
    torch CPU tensors). Its m' and acc' have the bits of NumPy's :func:`ema` and
    :func:`plus_square`, its norm the accuracy of :func:`norm_over_root_plus`'s.

    Args:
        m, acc, g: arrays of one shape and real floating dtype, ``acc >= 0``.
        beta: a float in [0, 1] (the first moment's β₁).
        epsilon: a float >= 0, or a 0-d array of ``m``'s dtype (Adam's ε√(1 - β₂ᵗ) under jit,
            which the fast paths decline).
        donate: ``m`` and ``acc`` may be overwritten with m' and acc' (see the module docstring).
        beta2: ``None`` for AdaGrad's sum, or a float in [0, 1]: the accumulator's β₂.
        nesterov: ``None``, or ``(c₁, c₂)`` (``shampoo_core.momentum.nesterov_coefficients``:
            floats, or 0-d arrays under jit, which the fast paths decline).

    Returns:
        ``(m', acc', norm)``: m' and acc' of ``m``'s shape and dtype (new arrays, or ``m`` and
        ``acc`` themselves where donated and written in place), ``norm`` a 0-d array of that dtype.
    """
    return ema_plus_square_norm_with_f(xp, m, acc, g, beta, epsilon, donate, beta2, nesterov)[:3]


def ema_plus_square_norm_with_f(xp, m, acc, g, beta: float, epsilon, donate: bool = False,
                                beta2: float | None = None, nesterov=None):
    """:func:`ema_plus_square_norm`'s ``(m', acc', norm)``, and F (:func:`nesterov_f`; m' itself
    without ``nesterov``): formed once, by the separate passes for the norm, or after a fast path,
    which does not write it."""
    out = _xp.fast_value("ema_plus_square_norm", m, acc, g, beta, epsilon, beta2, nesterov, donate=donate)
    if out is not NotImplemented:
        return out + (nesterov_f(out[0], g, nesterov),)
    new_m = ema(m, g, beta, donate)
    new_acc = plus_square(acc, g, donate) if beta2 is None else ema(acc, g * g, beta2, donate)
    f = nesterov_f(new_m, g, nesterov)
    return new_m, new_acc, norm_over_root_plus(xp, f, new_acc, epsilon), f


def nesterov_f(m, g, nesterov):
    """Nesterov's filtered gradient F = c₁·m + c₂·g for ``nesterov = (c₁, c₂)``
    (``shampoo_core.momentum.nesterov_coefficients``), in ``momentum.filtered_gradient``'s
    operations; ``m`` itself for ``nesterov=None``."""
    return m if nesterov is None else nesterov[0] * m + nesterov[1] * g


def scaled_copy(x, scale):
    """scale·x as a new array laid out in the row-major order of ``x``'s shape, whatever ``x``'s
    strides: a transposed view is reordered and scaled in the same pass.

    Cutting a parameter into blocks and merging them back in place are copies of permuted views
    anyway, and a scalar meets each: the statistics weight √(1 - β₂) and the grafted scale. As
    ``x * scale``, NumPy and torch would keep the view's strides, and reshaping the result would
    copy a second time; their fast paths write the product into a new C-contiguous array.

    Args:
        x: an array of real floating dtype, any strides.
        scale: a float, or an array of ``x``'s namespace and device that broadcasts to ``x``'s
            shape without growing it (0-d, or one entry per block along some axes).

    Returns:
        A new array of ``x``'s shape, in the dtype of ``x * scale``; C-contiguous on NumPy and
        torch (any layout elsewhere: the caller's reshape copies, where the library copies).
    """
    out = _xp.fast_value("scaled_copy", x, scale)
    if out is not NotImplemented:
        return out
    return x * scale
