"""optax ``GradientTransformation`` over the functional core.

``backends.optax_adapter.shampoo(...)`` takes the keywords of :func:`shampoo_core.shampoo` and
follows optax's conventions: ``update(updates, state, params)`` argument order, usable in
``optax.chain``, learning rates may be optax schedules, and ``update`` can be traced by
``jax.jit`` (root computation is gated by ``lax.cond``). The returned updates already include
``-learning_rate``: apply them with ``optax.apply_updates``.

``eva``, ``eva_s`` and ``kfac`` do the same for the Eva family and K-FAC/FOOF. They are
``optax.GradientTransformationExtraArgs``: the layer curvature is passed as the keyword
``curvature`` of ``update``, which ``optax.chain`` hands to every member that takes extra
arguments (``backends.jax_curvature.value_grads_and_curvature`` computes it).

Each factory has the signature of its core function, so ``optax.inject_hyperparams`` can wrap it.
``learning_rate`` and ``weight_decay`` can be injected (they may be traced arrays, and optax
schedules of them work as for ``optax.adamw``); every other hyperparameter fixes the state's
layout or its validation at construction, and must be named in ``static_args``::

    tx = optax.inject_hyperparams(optax_adapter.shampoo,
                                  static_args=optax_adapter.static_args(optax_adapter.shampoo))(
        learning_rate=1e-3, weight_decay=optax.cosine_decay_schedule(1e-2, 10_000), block_size=128)
    state.hyperparams["learning_rate"] = 3e-4   # read and change it between steps, as in optax
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import array_api_compat
import jax
import optax
import optree

import shampoo_core as sc

from . import jax_backend  # noqa: F401  (registers lax.cond for traced updates)

__all__ = ["shampoo", "eva", "eva_s", "kfac", "static_args", "INJECTABLE"]

# Hyperparameters that may be (traced) 0-d arrays: the rest fix the state's layout or branches.
INJECTABLE = ("learning_rate", "weight_decay")


def static_args(factory) -> tuple[str, ...]:
    """The hyperparameters of ``factory`` (one of this module's) other than those in
    ``INJECTABLE``: the ``static_args`` that ``optax.inject_hyperparams`` needs to wrap it."""
    return tuple(name for name in inspect.signature(factory).parameters if name not in INJECTABLE)


def _check_not_arrays(factory: str, hyperparameters: dict) -> None:
    """Only ``INJECTABLE`` ones may be arrays; name the way out of ``optax.inject_hyperparams``."""
    for name, value in hyperparameters.items():
        if name not in INJECTABLE and array_api_compat.is_array_api_obj(value):
            raise TypeError(
                f"{name} must be a Python value, not an array ({value.dtype}): only "
                f"{' and '.join(INJECTABLE)} can change after construction. optax.inject_hyperparams "
                "makes arrays of every numeric argument, defaults included; pass it "
                f"static_args=optax_adapter.static_args(optax_adapter.{factory})"
            )


class _Layout(NamedTuple):
    """How a JAX pytree with nodes only JAX knows maps onto a dict of its leaves."""

    treedef: object  # jax.tree_util.PyTreeDef of the gradients
    keys: tuple  # each leaf's jax.tree_util.keystr path, in the treedef's leaf order


def _layout(tree) -> _Layout | None:
    """``None`` when the core (optree: dicts, lists, tuples, namedtuples) reads ``tree`` as JAX
    does, so such trees reach the core unchanged; else the layout of its JAX leaves (nodes that
    only JAX's registry knows: flax structs, equinox modules, registered dataclasses)."""
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    core_leaves = optree.tree_leaves(tree)
    if len(core_leaves) == len(with_paths) and all(a is b for a, (_, b) in zip(core_leaves, with_paths)):
        return None
    return _Layout(treedef, tuple(jax.tree_util.keystr(path) for path, _ in with_paths))


def _core_tree(tree, layout: _Layout | None, name: str = "updates"):
    """``tree`` as the core takes it: itself, or a dict of its leaves keyed by their JAX path (so
    that errors name each leaf by that path). ``params`` and ``curvature`` are cut along the
    gradients' structure (curvature holds a pair or ``None`` per gradient leaf)."""
    if layout is None or tree is None:
        return tree
    try:
        parts = layout.treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{name} does not have the structure of the gradients {layout.treedef}: {err}") from None
    return dict(zip(layout.keys, parts))


def _jax_tree(tree, layout: _Layout | None):
    return tree if layout is None else layout.treedef.unflatten([tree[k] for k in layout.keys])


def _adapter(core, learning_rate: float, curvature: bool | None, summary: str):
    """The optax factory over ``core``: its signature (``optax.inject_hyperparams`` binds arguments
    by name) with ``learning_rate`` and ``nonfinite="skip"`` as defaults, optax's argument order,
    and trees read through :func:`_layout`.

    ``curvature``: ``None`` gives a ``GradientTransformation`` (Shampoo); ``True`` an
    ``optax.GradientTransformationExtraArgs`` whose ``update`` hands its ``curvature`` to the core;
    ``False`` one that drops it (Eva-s). Other members' extra arguments, which ``optax.chain``
    passes along, are dropped.
    """
    name = core.__name__
    returns = optax.GradientTransformation if curvature is None else optax.GradientTransformationExtraArgs

    def factory(learning_rate=learning_rate, **hyperparameters):
        _check_not_arrays(name, hyperparameters)
        tx = core(learning_rate, **{"nonfinite": "skip", **hyperparameters})

        def init_fn(params):
            return tx.init(_core_tree(params, _layout(params)))

        def update_fn(updates, state, params=None, **extra_args):
            layout = _layout(updates)
            args = (state, _core_tree(updates, layout), _core_tree(params, layout, "params"))
            if curvature:
                new, state = tx.update(*args, curvature=_core_tree(extra_args.get("curvature"), layout, "curvature"))
            else:
                new, state = tx.update(*args)
            return _jax_tree(new, layout), state

        return returns(init_fn, update_fn)

    defaults = {"learning_rate": learning_rate, "nonfinite": "skip"}
    signature = inspect.signature(core)
    factory.__signature__ = signature.replace(
        parameters=[p.replace(default=defaults[p.name]) if p.name in defaults else p
                    for p in signature.parameters.values()],
        return_annotation=returns,
    )
    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"""{summary}

    The keywords of :func:`shampoo_core.{name}`. ``nonfinite`` defaults to ``"skip"`` here:
    ``"raise"`` cannot read traced gradients. ``learning_rate`` and ``weight_decay`` may also be
    0-d arrays, traced or not (``optax.inject_hyperparams``).

    Raises:
        ValueError / TypeError: invalid hyperparameters, naming the argument; TypeError for an
            array given for any hyperparameter but ``learning_rate`` and ``weight_decay``.
    """
    return factory


shampoo = _adapter(sc.shampoo, 1e-3, None, "Distributed Shampoo as an optax transformation.")
eva = _adapter(sc.eva, 0.1, True, ":func:`shampoo_core.eva` (Eva, Eva-f, two-sided) as an optax transformation; "
               "``update(updates, state, params, curvature=...)``.")
kfac = _adapter(sc.kfac, 0.1, True, ":func:`shampoo_core.kfac` (K-FAC, FOOF) as an optax transformation; "
                "``update(updates, state, params, curvature=...)``.")
eva_s = _adapter(sc.eva_s, 0.1, False, ":func:`shampoo_core.eva_s` (gradients only) as an optax transformation; a "
                 "``curvature`` passed along by ``optax.chain`` for another member is ignored.")
