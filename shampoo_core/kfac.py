"""K-FAC and FOOF, the baselines of the Eva family, through the same roots module.

K-FAC (Martens & Grosse 2015): for a layer weight G (m, n) = (out, in), running averages of
S = E[ggᵀ] (m, m; output gradients) and A = E[aaᵀ] (n, n; layer inputs); every ``inverse_steps``
steps the damped inverses (S + √γ I)⁻¹ and (A + √γ I)⁻¹ are recomputed by eigendecomposition
(``shampoo_core.roots``, p = 1; a failed one keeps the previous inverse);
V = (S + √γ I)⁻¹ G (A + √γ I)⁻¹. FOOF (Benzing 2022) keeps only the input side:
V = G (A + γI)⁻¹. Then KL clipping over all layers and SGD with momentum, as in ``sc.eva``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from . import _xp, roots, tree
from .base import GradientTransformation, check_leaves, record_hyperparameters, zero_count
from .eva import begin_update, check_variant_and_clip, clipped_momentum_step, ema, run_step, validate
from .options import check_int

__all__ = ["kfac", "KFACState"]


class KFACState(NamedTuple):
    """Per leaf: momentum; running factors ``s_factor`` (m, m) and ``a_factor`` (n, n) and their
    damped inverses (``None`` for leaves without curvature, and S for FOOF). ``count`` and
    ``skipped`` (steps skipped for non-finite inputs): 0-d int32."""

    count: object
    momentum: tuple
    s_factor: tuple
    a_factor: tuple
    s_inverse: tuple
    a_inverse: tuple
    skipped: object


def kfac(learning_rate=0.1, *, damping: float = 0.03, kl_clip: float | None = 0.001, stat_decay: float = 0.95,
         momentum: float = 0.9, weight_decay: float = 0.0, inverse_steps: int = 10, variant: str = "kfac",
         nonfinite: str = "raise"):
    """K-FAC (``variant="kfac"``) or FOOF (``variant="foof"``).

    ``update(state, grads, params, curvature=...)``: a curvature leaf is ``None`` or ``(S, A)``
    for a 2-D leaf (m, n): the batch's output-gradient second moment (m, m) and input second
    moment (n, n) (FOOF ignores S; it may be ``None``). ``nonfinite``: as in ``sc.eva`` (a NaN
    factor would otherwise stay in the running average, and every later decomposition of it would
    fail and keep the old inverse). ``learning_rate`` and ``weight_decay`` may be 0-d arrays,
    traced or not (as in ``sc.eva``).

    Raises:
        ValueError: bad hyperparameters; curvature of the wrong structure, not a pair, of another
            shape, dtype or device than its gradient, or given for a leaf that is not 2-D; with
            ``nonfinite="raise"``, a non-finite input (named) or a traced one.
    """
    learning_rate, damping, stat_decay, momentum, weight_decay, nonfinite = validate(
        learning_rate, damping, stat_decay, momentum, weight_decay, nonfinite)
    kl_clip = check_variant_and_clip(variant, ("kfac", "foof"), kl_clip)
    inverse_steps = check_int("inverse_steps", inverse_steps, low=1)
    # K-FAC splits the damping between its two factors; FOOF damps its one factor fully.
    factor_damping = math.sqrt(damping) if variant == "kfac" else damping

    def init(params):
        leaves, _ = tree.flatten(params)
        check_leaves("params", leaves, tree.leaf_paths(params))
        xp = _xp.namespace(*leaves)
        dev = _xp.placement(leaves[0])

        two = variant == "kfac"

        def factor(p, axis, wanted, make):
            return make(p.shape[axis], p.dtype) if p.ndim == 2 and wanted else None

        def zeros(d, dtype):
            return xp.zeros((d, d), dtype=dtype, device=dev)

        def eye(d, dtype):
            return xp.eye(d, dtype=dtype, device=dev)

        return KFACState(
            zero_count(xp, dev), tuple(xp.zeros_like(p) for p in leaves),
            tuple(factor(p, 0, two, zeros) for p in leaves), tuple(factor(p, 1, True, zeros) for p in leaves),
            tuple(factor(p, 0, two, eye) for p in leaves), tuple(factor(p, 1, True, eye) for p in leaves),
            zero_count(xp, dev),
        )

    def curvature_shapes(state):
        def shapes(i, g):
            if state.a_factor[i] is None:
                return None
            return ((g.shape[0],) * 2 if state.s_factor[i] is not None else None, (g.shape[1],) * 2)
        return shapes

    def inverse(h, old):
        """Damped inverse of ``h``; a failed decomposition (non-finite) keeps ``old``."""
        xp = _xp.namespace(h)
        dtype = xp.float64 if _xp.supports_float64(xp, _xp.device_of(h)) else None
        result = roots.inverse_pth_root(h, 1, epsilon=factor_damping, relative_epsilon=False, dtype=dtype)
        if isinstance(result.error, float):
            return result.root if math.isfinite(result.error) else old
        # Traced: the error is already inf wherever the root is not finite (roots module).
        return xp.where(xp.isfinite(result.error), result.root, old)

    def inverses(xp, recompute, factors, old):
        def compute(fs):
            return tuple(None if f is None else inverse(f, o) for f, o in zip(fs, old))

        if isinstance(recompute, bool):
            return compute(factors) if recompute else old
        # Traced step (jax.jit): decompose only on the steps that are due (lax.cond once registered).
        return _xp.cond(xp, recompute, compute, lambda fs: old, factors)

    def update(state, grads, params=None, curvature=None):
        inputs = begin_update(state, grads, params, curvature, learning_rate, weight_decay, nonfinite=nonfinite,
                              curvature_shapes=curvature_shapes(state), curvature_names=("S", "A"))
        return run_step(state, inputs, step)

    def step(state, inputs):
        g_leaves, spec, _, p_leaves, c_leaves, count, lr, xp, verdict, wd = inputs
        first, recompute, gate = count == 0, count % inverse_steps == 0, verdict.finite
        if gate is not None:  # traced "skip": a skipped step keeps the inverses (run_step)
            recompute = recompute & gate
        vs, s_f, a_f, s_i, a_i = [], [], [], [], []
        for i, (g, c) in enumerate(zip(g_leaves, c_leaves)):
            s_fac, a_fac, s_inv, a_inv = state.s_factor[i], state.a_factor[i], state.s_inverse[i], state.a_inverse[i]
            if c is not None:
                s_new, a_new = c
                a_fac = ema(xp, a_fac, a_new, stat_decay, first, gate)
                if s_fac is not None:
                    s_fac = ema(xp, s_fac, s_new, stat_decay, first, gate)
                a_inv, s_inv = inverses(xp, recompute, (a_fac, s_fac), (a_inv, s_inv))
                v = g @ a_inv
                if s_inv is not None:
                    v = s_inv @ v
                if variant == "foof":
                    v = v * damping  # γ G (A + γI)⁻¹, the scale of Eva-f
                vs.append(v)
            else:
                vs.append(g)
            s_f.append(s_fac)
            a_f.append(a_fac)
            s_i.append(s_inv)
            a_i.append(a_inv)
        updates, moms = clipped_momentum_step(xp, vs, g_leaves, c_leaves, state.momentum, p_leaves, lr=lr,
                                              kl_clip=kl_clip, momentum=momentum, weight_decay=wd, gate=gate)
        new = KFACState(state.count + 1, tuple(moms), tuple(s_f), tuple(a_f), tuple(s_i), tuple(a_i), state.skipped)
        return tree.unflatten(spec, updates), new

    return record_hyperparameters(GradientTransformation(init, update), variant, dict(
        learning_rate=learning_rate, damping=damping, kl_clip=kl_clip, stat_decay=stat_decay, momentum=momentum,
        weight_decay=weight_decay, inverse_steps=inverse_steps, nonfinite=nonfinite))
