"""First-moment filtering of gradients (Adam's m̂; Kingma & Ba 2015, Alg. 1; NAdam for Nesterov).

Shampoo and its grafting optimizer both precondition the filtered gradient m̂_t, as in Adam,
so that ``graft_type="adam"`` before ``start_preconditioning_step`` is exactly Adam.
"""

from __future__ import annotations

__all__ = ["ema", "filtered_gradient"]


def ema(m, g, beta1: float):
    """m_t = beta1 m_{t-1} + (1 - beta1) g_t."""
    return beta1 * m + (1.0 - beta1) * g


def filtered_gradient(m, g, beta1: float, step: int, nesterov: bool):
    """Bias-corrected first moment at ``step`` (1-based).

    Plain: m_t / (1 - beta1^t). Nesterov (optax's ``nesterov=True`` form of NAdam):
    beta1 m_t / (1 - beta1^(t+1)) + (1 - beta1) g_t / (1 - beta1^t).
    """
    if beta1 == 0.0:
        return g
    if nesterov:
        return (beta1 / (1.0 - beta1 ** (step + 1))) * m + ((1.0 - beta1) / (1.0 - beta1**step)) * g
    return m * (1.0 / (1.0 - beta1**step))
