"""First-moment filtering of gradients (Adam's m̂; Kingma & Ba 2015, Alg. 1; NAdam for Nesterov).

Shampoo and its grafting optimizer both precondition the filtered gradient m̂_t, as in Adam,
so that ``graft_type="adam"`` before ``start_preconditioning_step`` is exactly Adam.
"""

from __future__ import annotations

from . import _elementwise

__all__ = ["ema", "filtered_gradient", "nesterov_coefficients"]


def ema(m, g, beta1: float, donate: bool = False, gate=None):
    """m_t = beta1 m_{t-1} + (1 - beta1) g_t, as a new array of ``m``'s shape and dtype (``m`` and
    ``g`` of one shape and dtype); with ``donate``, possibly written into ``m``; ``gate``: the
    traced verdict of ``nonfinite="skip"``, where False m_{t-1} is kept
    (:func:`shampoo_core._elementwise.ema`)."""
    return _elementwise.ema(m, g, beta1, donate, gate)


def filtered_gradient(m, g, beta1: float, step, nesterov: bool):
    """Bias-corrected first moment at ``step`` (1-based), as ``(f, scale)``: m̂_t = ``f · scale``.

    Plain: m_t / (1 - beta1^t). Nesterov (optax's ``nesterov=True`` form of NAdam):
    beta1 m_t / (1 - beta1^(t+1)) + (1 - beta1) g_t / (1 - beta1^t).

    The plain bias correction 1/(1 - beta1^t) is returned instead of applied, so that a caller
    that scales its result anyway saves a pass over the parameter. ``scale`` is a float, or a 0-d
    array when ``step`` is one; 1.0 for beta1 = 0 and for Nesterov's form.
    """
    if beta1 == 0.0:
        return g, 1.0
    if nesterov:
        # in the operations of the one pass (_elementwise.nesterov_f; backends.fused_cpu), to its bits
        return _elementwise.nesterov_f(m, g, nesterov_coefficients(beta1, step)), 1.0
    return m, 1.0 / (1.0 - beta1**step)


def nesterov_coefficients(beta1: float, step):
    """``(c₁, c₂)`` of Nesterov's filtered gradient F = c₁·m_t + c₂·g_t at ``step`` (1-based):
    c₁ = beta1 / (1 - beta1^(t+1)), c₂ = (1 - beta1) / (1 - beta1^t) (:func:`filtered_gradient`;
    NAdam, Dozat 2016, in optax's ``nesterov=True`` form).

    Args:
        beta1: a float in (0, 1).
        step: a positive int (then Python floats are returned), or an array of the step.
    """
    return beta1 / (1.0 - beta1 ** (step + 1)), (1.0 - beta1) / (1.0 - beta1**step)
