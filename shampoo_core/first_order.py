"""The grafting optimizers on their own: SGD (heavy-ball), AdaGrad and Adam.

They share the grafting and first-moment kernels with :func:`shampoo_core.shampoo`, so Shampoo
before ``start_preconditioning_step`` is exactly the matching optimizer here. Semantics follow
``torch.optim`` (SGD: buf = μ buf + g; AdaGrad: ε outside the root; Adam: ε outside the root,
bias-corrected moments; L2 weight decay added to the gradient, or AdamW-style when decoupled).
``learning_rate`` is taken as by :func:`shampoo_core.shampoo`: a float, a 0-d array or a schedule;
``weight_decay`` a float or a 0-d array (which may be traced: ``optax.inject_hyperparams``).
``adagrad`` and ``adam`` take ``donate_state``: ``update`` may write the new accumulator and first
moment into the arrays of the state it is given, as :func:`shampoo_core.shampoo`'s option does
(NumPy and torch, with the bits of a new state; elsewhere new arrays). ``sgd``'s heavy-ball buffer,
β·buf + g, has no in-place kernel and is always a new array.
"""

from __future__ import annotations

from typing import NamedTuple

from . import _xp, grafting, momentum, tree
from .base import (GradientTransformation, check_against_state, check_leaf_count, check_leaves,
                   count_and_learning_rate, may_be_positive, record_hyperparameters, scalar_as,
                   shape_and_dtype, weight_decay_for_update, zero_count)
from .options import GraftType, check_bool, check_injectable, check_learning_rate, check_real

__all__ = ["sgd", "adagrad", "adam", "FirstOrderState"]


class FirstOrderState(NamedTuple):
    """``count``: 0-d int32 updates done; ``momentum`` and ``graft``: one entry per leaf."""

    count: object
    momentum: tuple
    graft: tuple


def _transform(learning_rate, graft_type, *, beta1, beta2, epsilon, weight_decay, decoupled, nesterov, heavy_ball,
               donate, initial_accumulator_value=0.0):
    learning_rate = check_learning_rate(learning_rate)
    hyperparameters = dict(learning_rate=learning_rate, beta1=beta1, beta2=beta2, epsilon=epsilon,
                           weight_decay=weight_decay, decoupled_weight_decay=decoupled, nesterov=nesterov,
                           initial_accumulator_value=initial_accumulator_value)

    def init(params):
        leaves, _ = tree.flatten(params)
        check_leaves("params", leaves, tree.leaf_paths(params))
        moms = tuple(_xp.namespace(p).zeros_like(p) if beta1 > 0.0 else None for p in leaves)
        grafts = tuple(
            grafting.init_graft(_xp.namespace(p), graft_type, p, initial_accumulator_value) for p in leaves
        )
        count = 0
        if leaves:
            xp = _xp.namespace(*leaves)
            count = zero_count(xp, _xp.placement(leaves[0]))
        return FirstOrderState(count, moms, grafts)

    def update(state, grads, params=None):
        g_leaves, spec = tree.flatten(grads)
        paths = tree.leaf_paths(grads)
        check_leaf_count("grads", g_leaves, len(state.graft))
        p_leaves = None
        if params is not None:
            p_leaves = tree.check_same_structure("params", params, spec)
        wd = weight_decay_for_update(weight_decay, params)
        decay = may_be_positive(wd)
        check_leaves("grads", g_leaves, paths, reference=p_leaves)
        refs = [m if m is not None else a.accumulator for m, a in zip(state.momentum, state.graft)]
        check_against_state(g_leaves, paths, [shape_and_dtype(r) for r in refs], refs, p_leaves)
        count, lr = count_and_learning_rate(learning_rate, state.count)
        step = count + 1
        updates, moms, grafts = [], [], []
        for i, g in enumerate(g_leaves):
            xp = _xp.namespace(g)
            step_i = step if isinstance(step, int) else xp.astype(step, g.dtype)
            p = None if p_leaves is None else p_leaves[i]
            wd_i = scalar_as(xp, wd, g.dtype) if decay else 0.0
            if decay and not decoupled:
                g = g + wd_i * p
            m = state.momentum[i]
            graft = grafting.update_graft(graft_type, state.graft[i], g, beta2, donate)
            scale = 1.0  # the direction is scale · d: per-step scalars join the learning rate
            if heavy_ball:
                d = g
            else:
                f, f_scale = g, 1.0
                if m is not None:
                    m = momentum.ema(m, g, beta1, donate)
                    f, f_scale = momentum.filtered_gradient(m, g, beta1, step_i, nesterov)
                d, scale = grafting.graft_direction(xp, graft_type, graft, f, epsilon=epsilon, beta2=beta2,
                                                    step=step_i, f_scale=f_scale)
            if heavy_ball and m is not None:
                m = beta1 * m + g  # the buffer starts at zero, so step 1 gives m = g as in torch
                d = g + beta1 * m if nesterov else m
            neg_lr = -scalar_as(xp, lr, d.dtype)
            u = d * (neg_lr * scale)
            if decay and decoupled:
                u = u + (neg_lr * wd_i) * p
            updates.append(u)
            moms.append(m)
            grafts.append(graft)
        return tree.unflatten(spec, updates), FirstOrderState(state.count + 1, tuple(moms), tuple(grafts))

    name = "sgd" if heavy_ball else graft_type.value
    return record_hyperparameters(GradientTransformation(init, update), name, hyperparameters)


def sgd(learning_rate=1e-2, *, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0):
    """SGD with heavy-ball momentum (torch.optim.SGD semantics, dampening 0).

    Raises:
        ValueError: momentum outside [0, 1), negative weight_decay or learning_rate.
    """
    check_real("momentum", momentum, low=0.0, high=1.0, high_open=True)
    check_bool("nesterov", nesterov)
    return _transform(
        learning_rate, GraftType.SGD, beta1=momentum, beta2=1.0, epsilon=0.0,
        weight_decay=check_injectable("weight_decay", weight_decay), decoupled=False,
        nesterov=nesterov, heavy_ball=True, donate=False,
    )


def adagrad(learning_rate=1e-2, *, epsilon: float = 1e-10, initial_accumulator_value: float = 0.0, weight_decay: float = 0.0,
            donate_state: bool = False):
    """Diagonal AdaGrad (Duchi, Hazan, Singer 2011): W ← W - lr g / (√Σg² + ε). ``donate_state``:
    the accumulator may be written in place (module docstring)."""
    return _transform(
        learning_rate, GraftType.ADAGRAD, beta1=0.0, beta2=1.0,
        epsilon=check_real("epsilon", epsilon, low=0.0),
        weight_decay=check_injectable("weight_decay", weight_decay), decoupled=False, nesterov=False,
        heavy_ball=False, donate=check_bool("donate_state", donate_state),
        initial_accumulator_value=check_real("initial_accumulator_value", initial_accumulator_value, low=0.0),
    )


def adam(learning_rate=1e-3, *, beta1: float = 0.9, beta2: float = 0.999, epsilon: float = 1e-8,
         weight_decay: float = 0.0, decoupled_weight_decay: bool = False, nesterov: bool = False,
         donate_state: bool = False):
    """Adam (Kingma & Ba 2015, Alg. 1); AdamW with ``decoupled_weight_decay=True``; NAdam with nesterov.
    ``donate_state``: both moments may be written in place (module docstring)."""
    return _transform(
        learning_rate, GraftType.ADAM,
        beta1=check_real("beta1", beta1, low=0.0, high=1.0, high_open=True),
        beta2=check_real("beta2", beta2, low=0.0, high=1.0, high_open=True),
        epsilon=check_real("epsilon", epsilon, low=0.0),
        weight_decay=check_injectable("weight_decay", weight_decay),
        decoupled=check_bool("decoupled_weight_decay", decoupled_weight_decay),
        nesterov=check_bool("nesterov", nesterov), heavy_ball=False,
        donate=check_bool("donate_state", donate_state),
    )
