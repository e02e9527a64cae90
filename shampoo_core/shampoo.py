"""Distributed Shampoo as a pure gradient transformation (arXiv 2002.09018, Alg. 1 and Sec. 3-4).

Per step t (counting from 1), for each parameter W with gradient G:

1. Coupled weight decay: G ← G + λW (unless ``decoupled_weight_decay``).
2. Filtered gradient F = m̂_t, Adam's bias-corrected first moment with ``beta1`` (F = G if 0).
3. Kronecker statistics of each block, from G, every ``statistics_compute_steps`` steps:
   H_i ← beta2 H_i + (1 - beta2) G_(i) G_(i)ᵀ (plain sums when beta2 = 1), so the update at step t
   uses statistics that include G_t.
4. Inverse p-th roots (p = 2k for k preconditioned dims, or ``exponent_override``) every
   ``preconditioning_compute_steps`` steps from ``start_preconditioning_step`` on. A failed root
   keeps the previous preconditioner (identity before the first success) and is counted.
5. P = F ×₁ H₁^(-1/p) ×₂ ... per block; grafted to the norm of the grafting optimizer's
   direction D per layer or per block: U = P ‖D‖ / max(‖P‖, 1e-16). Before
   ``start_preconditioning_step`` (or with no preconditioned dim) U = D.
6. Decoupled weight decay: U ← U + λW. The update is -learning_rate · U.

``update`` returns a new state and leaves its inputs as they were, unless ``donate_state``: the
caller then gives the state up, and NumPy and torch write the new first moment, grafting
accumulator and statistics into its arrays (the kernels only ask the library's in-place fast
paths, ``shampoo_core._elementwise``; nothing else changes).

All of it runs in the state dtype (``state_dtype``: by default the parameter dtype, but float32
for float16 and bfloat16 parameters, whose 8- or 11-bit mantissas stall the β₂ averages); the
update is returned in the parameter dtype.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import NamedTuple

import optree

from . import _elementwise, _xp, blocking, grafting, momentum, preconditioner, roots, statistics, tree
from .cost_model import CostModel
from .base import (GradientTransformation, check_against_state, check_leaf_count, check_leaves,
                   count_and_learning_rate, may_be_positive, record_hyperparameters, scalar_as,
                   shape_and_dtype, weight_decay_for_update, zero_count)
from .nonfinite import check_mode, guard, skipped_step
from .options import (
    GraftGranularity,
    GraftType,
    RootMethod,
    check_bool,
    check_injectable,
    check_int,
    check_learning_rate,
    check_real,
    parse_enum,
)

__all__ = ["shampoo", "ShampooConfig", "ShampooState", "ParamState", "BlockState"]

# the grafting optimizers whose accumulator and norm go in one pass with the first moment
_DIAGONAL = grafting.DIAGONAL


class BlockState(NamedTuple):
    """State of a group of n equal-shaped blocks (:class:`~shampoo_core.blocking.BlockGroup`),
    stacked along a leading block axis, blocks row-major over the group's grid.

    Attributes:
        statistics: one ``(n, d_i, d_i)`` array per preconditioned dim, state dtype.
        preconditioners: the matching inverse p-th roots, ``(n, d_i, d_i)``, state dtype.
        failures: ``(n,)`` int32, per block the root computations rejected so far (summed over
            dims).
        last_error: ``(n,)``, state dtype, per block the largest root error at the last
            computation.
        lambda_max: ``(n,)``, state dtype, per block the largest λmax among its statistics at the
            last computation.
    """

    statistics: tuple
    preconditioners: tuple
    failures: object
    last_error: object
    lambda_max: object


class ParamState(NamedTuple):
    """State of one parameter: first moment (``None`` if beta1 = 0), grafting state, one
    :class:`BlockState` per group of equal-shaped blocks; every array in the state dtype (see
    :func:`shampoo`'s ``state_dtype``)."""

    momentum: object
    graft: grafting.GraftState
    blocks: tuple


class ShampooState(NamedTuple):
    """``count``: 0-d int32, updates applied so far; ``params``: one :class:`ParamState` per
    leaf; ``skipped``: 0-d int32, steps skipped for non-finite gradients (``nonfinite="skip"``)."""

    count: object
    params: tuple
    skipped: object


@dataclasses.dataclass(frozen=True)
class ShampooConfig:
    """Validated hyperparameters of :func:`shampoo` (see its docstring for meanings)."""

    learning_rate: object
    block_size: int
    beta1: float
    beta2: float
    epsilon: float
    relative_epsilon: bool
    diagonal_epsilon: float
    weight_decay: object
    decoupled_weight_decay: bool
    nesterov: bool
    start_preconditioning_step: int
    preconditioning_compute_steps: int
    statistics_compute_steps: int
    graft_type: GraftType
    graft_beta2: float
    graft_granularity: GraftGranularity
    exponent_override: int | None
    merge_small_dims: bool
    skip_preconditioning_dim_size_gt: int | None
    root_method: RootMethod
    root_dtype: str | None
    state_dtype: str | None
    inverse_failure_threshold: float
    nonfinite: str
    cost_model: CostModel = dataclasses.field(compare=False)  # configs compare by hyperparameters only
    async_preconditioners: object = dataclasses.field(compare=False, default=None)
    donate_state: bool = dataclasses.field(compare=False, default=False)

    def plan(self, shape: tuple[int, ...]) -> blocking.BlockPlan:
        return blocking.make_plan(
            shape,
            self.block_size,
            merge_small_dims_=self.merge_small_dims,
            skip_preconditioning_dim_size_gt=self.skip_preconditioning_dim_size_gt,
        )

    def exponent(self, plan: blocking.BlockPlan) -> int:
        return self.exponent_override or 2 * plan.num_preconditioned


def shampoo(
    learning_rate=1e-3,
    *,
    block_size: int = 128,
    beta1: float = 0.9,
    beta2: float = 0.999,
    epsilon: float = 1e-6,
    relative_epsilon: bool = True,
    diagonal_epsilon: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = True,
    nesterov: bool = False,
    start_preconditioning_step: int = 10,
    preconditioning_compute_steps: int = 10,
    statistics_compute_steps: int = 1,
    graft_type="adagrad",
    graft_beta2: float | None = None,
    graft_granularity="layer",
    exponent_override: int | None = None,
    merge_small_dims: bool = True,
    skip_preconditioning_dim_size_gt: int | None = 4096,
    root_method="eigh",
    root_dtype: str | None = "float64",
    state_dtype: str | None = None,
    inverse_failure_threshold: float = 0.1,
    nonfinite: str = "raise",
    cost_model: CostModel | None = None,
    async_preconditioners=None,
    donate_state: bool = False,
) -> GradientTransformation:
    """Distributed Shampoo (Anil et al., arXiv 2002.09018) as ``(init, update)``.

    Args:
        learning_rate: float >= 0, a 0-d real array (checked when readable, may be traced: what
            ``optax.inject_hyperparams`` passes; cast to the state dtype), or a schedule
            ``count -> float`` called with the number of previous updates (as optax does).
        block_size: largest statistic dimension; larger dims are split into blocks (Sec. 4).
        beta1: first-moment decay in [0, 1); the preconditioners act on Adam's m̂.
        beta2: statistics decay in (0, 1]; 1.0 sums as in AdaGrad.
        epsilon: ridge (>= 0) added to each statistic before its root.
        relative_epsilon: scale the ridge by the statistic's λmax.
        diagonal_epsilon: ε (>= 0) of the diagonal grafting optimizers.
        weight_decay: λ >= 0, a float or a 0-d real array (may be traced, as the learning rate:
            ``optax.inject_hyperparams`` can schedule it). decoupled_weight_decay: AdamW-style
            (added after preconditioning, multiplied by the learning rate once) instead of added
            to the gradient.
        nesterov: Nesterov form of the first moment (NAdam).
        start_preconditioning_step: first step (1-based) that uses Shampoo's direction; before it
            the grafting optimizer runs alone.
        preconditioning_compute_steps: roots are recomputed every this many steps.
        statistics_compute_steps: statistics are updated every this many steps.
        graft_type: "none", "sgd", "adagrad", "rmsprop", "adam", "sqrt_n" (or :class:`GraftType`).
        graft_beta2: second-moment decay of rmsprop/adam grafting in (0, 1); default ``beta2``.
        graft_granularity: "layer" (paper) or "block": the unit whose norm is grafted.
        exponent_override: root order p to use instead of 2k.
        merge_small_dims: merge adjacent dims while the product stays <= block_size.
        skip_preconditioning_dim_size_gt: dims larger than this get no statistic (one-sided).
        root_method: "eigh", "newton", or "auto" (per statistic size, backend, device kind and
            dtype, the fastest accurate method of ``cost_model``; eigh where nothing was measured).
        cost_model: a :class:`~shampoo_core.cost_model.CostModel` for ``root_method="auto"``.
        async_preconditioners: an :class:`~shampoo_core.async_roots.AsyncPreconditioners` to
            compute roots in background threads while steps use the previous ones (eager arrays
            only). Roots then arrive up to its ``max_staleness`` steps late (Sec. 5 of the paper).
        root_dtype: dtype name roots are computed in ("float64" default; ``None`` = the state
            dtype). Falls back to the state dtype on devices without float64.
        state_dtype: dtype name of the optimizer state ("float32", "float64"), in which the whole
            step is computed; the update comes back in the parameter dtype. ``None`` (default):
            the parameter dtype, except float32 for float16 and bfloat16 parameters. In 8 bits of
            mantissa (bfloat16) β₂ = 0.999 cannot move a running average (0.999·H rounds to H),
            so half-precision statistics stop following the gradients; Meta's Distributed
            Shampoo also keeps its factor matrices in float32. ValueError at ``init`` for
            "float64" on a device without it.
        inverse_failure_threshold: a root whose error exceeds this (or is non-finite) is rejected.
        nonfinite: what a gradient with NaN or inf does: "raise" (ValueError naming the leaf,
            state untouched), "skip" (zero updates, the state unchanged but ``skipped`` + 1;
            selected with ``where``, no Python branch on the data) or "ignore" (no check, as in
            ``torch.optim``: a NaN enters the state; for callers that check themselves).
        donate_state: ``update`` may write the new state into the arrays of the state it is
            given, as ``torch.optim`` does, instead of allocating a second one: the first moment,
            the grafting accumulator and the statistics, where the library has in-place kernels
            (NumPy, torch; elsewhere, e.g. JAX, whose ``jax.jit(..., donate_argnums=0)`` does
            this, nothing changes). The caller must not use the state it passed in again: its
            arrays may hold the new values. The updates have the same bits either way. Inputs are
            checked, non-finite gradients caught (``nonfinite="raise"``/``"skip"``) and failed
            asynchronous roots raised before anything is written, so a rejected step leaves the
            state as it was. Not part of the checkpointed hyperparameters: it changes no value.

    Returns:
        :class:`GradientTransformation` over an array or a dict/list/tuple tree of arrays.

    Raises:
        ValueError / TypeError: a hyperparameter out of range or of the wrong type, naming it.
    """
    graft_type = parse_enum("graft_type", graft_type, GraftType)
    if graft_beta2 is None:
        graft_beta2 = beta2
    if graft_type in (GraftType.RMSPROP, GraftType.ADAM):
        check_real("graft_beta2", graft_beta2, low=0.0, high=1.0, high_open=True)
    for name, value in (("root_dtype", root_dtype), ("state_dtype", state_dtype)):
        if value is not None and value not in ("float32", "float64"):
            raise ValueError(f"{name} must be 'float32', 'float64' or None; got {value!r}")
    if exponent_override is not None:
        check_int("exponent_override", exponent_override, low=1)
    check_mode(nonfinite)
    if skip_preconditioning_dim_size_gt is not None:
        check_int("skip_preconditioning_dim_size_gt", skip_preconditioning_dim_size_gt, low=0)
    config = ShampooConfig(
        learning_rate=check_learning_rate(learning_rate),
        block_size=check_int("block_size", block_size, low=1),
        beta1=check_real("beta1", beta1, low=0.0, high=1.0, high_open=True),
        beta2=check_real("beta2", beta2, low=0.0, high=1.0, low_open=True),
        epsilon=check_real("epsilon", epsilon, low=0.0),
        relative_epsilon=check_bool("relative_epsilon", relative_epsilon),
        diagonal_epsilon=check_real("diagonal_epsilon", diagonal_epsilon, low=0.0),
        weight_decay=check_injectable("weight_decay", weight_decay),
        decoupled_weight_decay=check_bool("decoupled_weight_decay", decoupled_weight_decay),
        nesterov=check_bool("nesterov", nesterov),
        start_preconditioning_step=check_int("start_preconditioning_step", start_preconditioning_step, low=1),
        preconditioning_compute_steps=check_int(
            "preconditioning_compute_steps", preconditioning_compute_steps, low=1
        ),
        statistics_compute_steps=check_int("statistics_compute_steps", statistics_compute_steps, low=1),
        graft_type=graft_type,
        graft_beta2=float(graft_beta2),
        graft_granularity=parse_enum("graft_granularity", graft_granularity, GraftGranularity),
        exponent_override=exponent_override,
        merge_small_dims=check_bool("merge_small_dims", merge_small_dims),
        skip_preconditioning_dim_size_gt=skip_preconditioning_dim_size_gt,
        root_method=parse_enum("root_method", root_method, RootMethod),
        root_dtype=root_dtype,
        state_dtype=state_dtype,
        inverse_failure_threshold=check_real("inverse_failure_threshold", inverse_failure_threshold, low=0.0),
        nonfinite=nonfinite,
        cost_model=cost_model if cost_model is not None else CostModel(),
        async_preconditioners=async_preconditioners,
        donate_state=check_bool("donate_state", donate_state),
    )

    def init(params) -> ShampooState:
        leaves, _ = tree.flatten(params)
        check_leaves("params", leaves, tree.leaf_paths(params))
        states = tuple(_init_param(config, p) for p in leaves)
        if not leaves:
            return ShampooState(0, states, 0)
        xp = _xp.namespace(*leaves)
        dev = _xp.placement(leaves[0])
        return ShampooState(zero_count(xp, dev), states, zero_count(xp, dev))

    def update(state: ShampooState, grads, params=None):
        g_leaves, spec = tree.flatten(grads)
        paths = tree.leaf_paths(grads)
        check_leaf_count("grads", g_leaves, len(state.params))
        p_leaves = None
        if params is not None:
            p_leaves = tree.check_same_structure("params", params, spec)
            check_leaves("params", p_leaves, paths)
        weight_decay = weight_decay_for_update(config.weight_decay, params)
        check_leaves("grads", g_leaves, paths, reference=p_leaves)
        check_against_state(g_leaves, paths, [_expected_leaf(s) for s in state.params],
                            [_reference_leaf(s) for s in state.params], p_leaves,
                            state_dtype=lambda g: _state_dtype(config, _xp.namespace(g), g.dtype))
        for g, s, path in zip(g_leaves, state.params, paths):
            _check_blocks(config, g, s, path)
        if not g_leaves:
            return grads, state
        xp = _xp.namespace(*g_leaves)
        verdict = guard(xp, [(f"grads{path}", g) for path, g in zip(paths, g_leaves)], config.nonfinite)

        def step():
            schedule = _schedule(config, state.count, weight_decay, verdict.finite)
            # Finished asynchronous roots, all taken (and a worker's failure raised) before any
            # array is written: a donated state stays whole when a step raises.
            collected = _collect_roots(config, state, schedule)
            updates, new_states = [], []
            for i, (g, s) in enumerate(zip(g_leaves, state.params)):
                p = None if p_leaves is None else p_leaves[i]
                u, ns = _update_param(config, s, verdict.clean(xp, g), p, schedule, i, collected)
                updates.append(u)
                new_states.append(ns)
            return tree.unflatten(spec, updates), ShampooState(state.count + 1, tuple(new_states), state.skipped)

        if verdict.finite is None:
            return verdict.run(xp, step, lambda: skipped_step(xp, state, g_leaves, spec))
        return _gated_step(xp, verdict, step(), skipped_step(xp, state, g_leaves, spec))

    tx = GradientTransformation(init, update)
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
              if f.name not in ("cost_model", "async_preconditioners", "donate_state")}
    values["async_preconditioners"] = async_preconditioners is not None
    return record_hyperparameters(tx, "shampoo", values)


def _reference_leaf(s: ParamState):
    if s.momentum is not None:
        return s.momentum
    if s.graft.accumulator is not None:
        return s.graft.accumulator
    return s.blocks[0].failures if s.blocks else None


def _expected_leaf(s: ParamState) -> tuple:
    """``(shape, dtype)`` of the parameter ``s`` was built for, as far as its arrays tell."""
    ref = s.momentum if s.momentum is not None else s.graft.accumulator
    if ref is not None:
        return shape_and_dtype(ref)
    # Without momentum or a grafting accumulator the statistics still fix the dtype; the shape is
    # checked against the blocks by _check_blocks.
    return (None, s.blocks[0].statistics[0].dtype) if s.blocks else (None, None)


def _check_blocks(config: ShampooConfig, g, s: ParamState, path: str) -> None:
    """The blocks of ``g``'s shape must be those the state holds statistics for."""
    want = config.plan(tuple(g.shape)).group_statistic_sizes
    got = tuple((b.failures.shape[0], tuple(h.shape[-1] for h in b.statistics)) for b in s.blocks)
    if want != got:
        raise ValueError(
            f"grads{path} of shape {tuple(g.shape)} splits into groups of (blocks, statistic sizes) {want}; "
            f"the state holds {got}"
        )


def _state_dtype(config: ShampooConfig, xp, dtype):
    """The dtype of the state (and of the step's arithmetic) for a parameter of ``dtype``."""
    if config.state_dtype is not None:
        return getattr(xp, config.state_dtype)
    return xp.float32 if _xp.is_half(xp, dtype) else dtype


def _init_param(config: ShampooConfig, p) -> ParamState:
    xp = _xp.namespace(p)
    plan = config.plan(tuple(p.shape))
    dev = _xp.device_of(p)
    dtype = _state_dtype(config, xp, p.dtype)
    if config.state_dtype == "float64" and not _xp.supports_float64(xp, dev):
        raise ValueError(f"state_dtype='float64' is not available on device {dev} of {xp.__name__} "
                         "(for JAX, enable jax_enable_x64)")
    place = _xp.placement(p)  # statistics have other shapes than p
    blocks = []
    for n, dims in plan.group_statistic_sizes:
        blocks.append(
            BlockState(
                statistics=tuple(xp.zeros((n, d, d), dtype=dtype, device=place) for d in dims),
                preconditioners=tuple(xp.zeros((n, d, d), dtype=dtype, device=place)
                                      + xp.eye(d, dtype=dtype, device=place) for d in dims),
                failures=xp.zeros((n,), dtype=xp.int32, device=place),
                last_error=xp.zeros((n,), dtype=dtype, device=place),
                lambda_max=xp.zeros((n,), dtype=dtype, device=place),
            )
        )
    like = p if p.dtype == dtype else xp.zeros_like(p, dtype=dtype)
    return ParamState(
        momentum=xp.zeros_like(like) if config.beta1 > 0.0 else None,
        graft=grafting.init_graft(xp, config.graft_type, like),
        blocks=tuple(blocks),
    )


class _Schedule(NamedTuple):
    """What this step does: Python values for eager arrays, 0-d arrays for lazy ones."""

    count: object  # updates before this one (int, or 0-d int array)
    step: object  # count + 1
    statistics: object  # update the statistics
    roots: object  # recompute the inverse roots
    precondition: object  # use Shampoo's direction (else the grafting optimizer's)
    learning_rate: object
    weight_decay: object  # a float, or the traced 0-d array
    finite: object = None  # the traced verdict of nonfinite="skip", gating the running averages


def _gated_step(xp, verdict, new, skipped):
    """``new`` where the traced verdict found the inputs finite, else ``skipped``: both
    ``(updates, state)``, selected as :meth:`~shampoo_core.nonfinite.Guard.run` does, except the
    arrays of each parameter's state. They are taken from ``new`` as they are: the step gated
    them on the verdict itself (``_Schedule.finite``). The statistics and roots through their
    flags (:func:`_schedule`), where the select joins the statistics update and an untaken
    ``cond`` returns the old preconditioners; the first moment and the grafting accumulator
    inside their averages (:mod:`shampoo_core._elementwise`, ``gate``). A select over them here
    would be a pass of its own over each (XLA cannot fuse it into the ``cond``, nor into an
    average the update reads too), and would keep the old state alive to the end of the step, so
    that a donated state (``jax.jit(..., donate_argnums=...)``) is copied instead of written in
    place (docs/performance.md)."""

    def select(a, b):
        return verdict.select(xp, a, b)

    (new_updates, new_state), (old_updates, old_state) = new, skipped
    return select(new_updates, old_updates), ShampooState(
        select(new_state.count, old_state.count), new_state.params, select(new_state.skipped, old_state.skipped))


def _gate(flag, finite):
    """``flag`` and ``finite`` for a Python or 0-d array ``flag``; ``finite`` is None or a traced
    0-d bool."""
    if finite is None or flag is False:
        return flag
    return finite if flag is True else flag & finite


def _schedule(config: ShampooConfig, count, wd, finite=None) -> _Schedule:
    """``wd``: this update's weight decay, from :func:`~shampoo_core.base.weight_decay_for_update`;
    ``finite``: the traced verdict of ``nonfinite="skip"`` (None when read on the host), which gates
    the statistics and the roots: a skipped step leaves them as they were."""
    start, n, k = config.start_preconditioning_step, config.preconditioning_compute_steps, config.statistics_compute_steps
    count, lr = count_and_learning_rate(config.learning_rate, count)
    step = count + 1
    if isinstance(count, int):
        return _Schedule(count, step, _gate((step - 1) % k == 0, finite),
                         _gate(step >= start and (step - start) % n == 0, finite), step >= start, lr, wd, finite)
    return _Schedule(
        count,
        step,
        _gate(True if k == 1 else (step - 1) % k == 0, finite),
        _gate((step >= start) & ((step - start) % n == 0), finite),
        True if start <= 1 else step >= start,
        lr,
        wd,
        finite,
    )


def _select(xp, flag, new_fn, old):
    """``new_fn()`` where ``flag`` holds, else ``old`` (a value, or a function computing it); a
    Python flag decides without computing the other side."""
    if isinstance(flag, bool):
        if flag:
            return new_fn()
        return old() if callable(old) else old
    return optree.tree_map(lambda a, b: xp.where(flag, a, b), new_fn(), old() if callable(old) else old)


_WARNED_NO_FLOAT64: set = set()


def _root_dtype(config: ShampooConfig, xp, like):
    if config.root_dtype is None:
        return like.dtype
    device = _xp.device_of(like)
    if config.root_dtype == "float64" and not _xp.supports_float64(xp, device):
        key = (getattr(xp, "__name__", ""), str(device))
        if key not in _WARNED_NO_FLOAT64:
            _WARNED_NO_FLOAT64.add(key)
            where = "the default device" if device is None else f"device {device}"  # traced: no device
            warnings.warn(
                f"root_dtype='float64' is not available on {where} of {key[0]} (for JAX, enable "
                f"jax_enable_x64); inverse roots are computed in {like.dtype}",
                stacklevel=4,
            )
        return like.dtype
    return getattr(xp, config.root_dtype)


def _as_array(xp, value, like):
    """``value`` (per block: a tuple of Python floats, or an array) as an array like ``like``."""
    if isinstance(value, (tuple, list)):
        return xp.asarray([float(v) for v in value], dtype=like.dtype, device=_xp.placement(like))
    return xp.astype(value, like.dtype)


def _root_results(config: ShampooConfig, stats, exponent, dtype_name: str) -> list:
    """Inverse roots of each stack of statistics in ``stats`` (pure: runs in a worker thread for
    async preconditioners).

    Returns:
        Per stack ``(n, d, d)``, a :class:`~shampoo_core.roots.RootResult` of stacks: ``root``
        ``(n, d, d)``; ``error``, ``lambda_max`` and ``iterations`` per block, as tuples of Python
        numbers on eager arrays and ``(n,)`` arrays on lazy ones (``iterations`` 0 there).
    """
    out = []
    for h in stats:
        xp = _xp.namespace(h)
        method = config.root_method.value
        if config.root_method is RootMethod.AUTO:
            method = config.cost_model.choose(xp.__name__, h.shape[-1], dtype_name, _xp.device_kind(h))

        def one(a, method=method, xp=xp):
            return roots.inverse_pth_root(
                a, exponent, epsilon=config.epsilon, relative_epsilon=config.relative_epsilon,
                method=method, dtype=getattr(xp, dtype_name),
            )

        if _xp.is_lazy(h):  # one traced root for the whole stack under jax.jit (jax.lax.map)
            root, error, lam_max = _xp.map_stack(xp, lambda a: tuple(one(a)[:3]), h)
            out.append(roots.RootResult(root, error, lam_max, 0))
            continue
        results = [one(h[i, ...]) for i in range(h.shape[0])]
        out.append(roots.RootResult(
            xp.stack([r.root for r in results]), tuple(float(r.error) for r in results),
            tuple(float(r.lambda_max) for r in results), tuple(int(r.iterations) for r in results)))
    return out


def _apply_roots(config: ShampooConfig, xp, block: BlockState, results) -> BlockState:
    """Accept each root or keep the old one (non-finite or above the failure threshold)."""
    preconditioners = []
    failures, worst, lam = block.failures, None, None
    for result, old in zip(results, block.preconditioners):
        error = _as_array(xp, result.error, block.last_error)
        lam_max = _as_array(xp, result.lambda_max, block.lambda_max)
        lam_max = xp.where(xp.isfinite(lam_max), lam_max, xp.zeros_like(lam_max))
        ok = xp.isfinite(error) & (error <= config.inverse_failure_threshold)
        preconditioners.append(xp.where(ok[:, None, None], xp.astype(result.root, old.dtype), old))
        failures = failures + xp.astype(~ok, failures.dtype)
        worst = error if worst is None else xp.maximum(worst, error)
        lam = lam_max if lam is None else xp.maximum(lam, lam_max)
    return BlockState(block.statistics, tuple(preconditioners), failures, worst, lam)


def _collect_roots(config: ShampooConfig, state: ShampooState, schedule: _Schedule) -> dict | None:
    """The asynchronous roots due at this step, ``{(leaf, group): results}`` (``None`` without an
    executor).

    Raises:
        ValueError: an executor with traced arrays (``jax.jit``).
        RuntimeError: a root failed in its worker.
    """
    executor = config.async_preconditioners
    if executor is None:
        return None
    if not isinstance(schedule.roots, bool):
        raise ValueError("async_preconditioners needs eager arrays; under jax.jit roots are gated by lax.cond")
    collected = {}
    for i, s in enumerate(state.params):
        for j in range(len(s.blocks)):
            results = executor.collect((i, j), schedule.step, config.preconditioning_compute_steps)
            if results is not None:
                collected[(i, j)] = results
    return collected


def _update_block(config, xp, block: BlockState, g, plan, schedule: _Schedule, key,
                  product_scale: float = 1.0, collected: dict | None = None, grid: bool = False) -> BlockState:
    """``g``: the group's stack of blocks of the gradient weighted by
    ``statistics.statistics_weight(beta2)``, or unweighted with ``product_scale`` = 1 - β₂
    (``statistics.accumulate_weighted``), or with ``grid`` its unweighted blocks where they lie
    (``blocking.block_grids``); ``None`` on a step that leaves the statistics as they are (a
    Python ``False`` flag). ``collected``: :func:`_collect_roots`' results."""
    accumulate_ = statistics.accumulate_grid if grid else statistics.accumulate_weighted

    def accumulate():
        return accumulate_(xp, block.statistics, g, plan.preconditioned, config.beta2, product_scale,
                           config.donate_state)

    block = block._replace(statistics=_select(xp, schedule.statistics, accumulate, block.statistics))
    if schedule.roots is False and config.async_preconditioners is None:
        return block  # the common step: no root work, nothing more to resolve

    exponent = config.exponent(plan)
    dtype_name = _xp.dtype_name(_root_dtype(config, xp, block.statistics[0]))  # the state dtype

    def results_of(stats):
        return _root_results(config, stats, exponent, dtype_name)

    def compute(b):
        return _apply_roots(config, xp, b, results_of(b.statistics))

    executor = config.async_preconditioners
    if executor is not None:
        results = collected.get(key)
        if results is not None:
            block = _apply_roots(config, xp, block, results)
        if schedule.roots:  # a worker reads the statistics later: a copy, where later steps write them
            executor.submit(key, schedule.step, results_of, block.statistics, snapshot=config.donate_state)
        return block
    if schedule.roots is True:
        return compute(block)
    return _xp.cond(xp, schedule.roots, compute, lambda b: b, block)


def _update_param(config: ShampooConfig, s: ParamState, g, p, schedule: _Schedule, index: int,
                  collected: dict | None = None):
    xp = _xp.namespace(g)
    out_dtype = g.dtype
    dtype = _state_dtype(config, xp, g.dtype)
    if dtype != g.dtype:
        g = xp.astype(g, dtype)
    decay = may_be_positive(schedule.weight_decay)
    wd = scalar_as(xp, schedule.weight_decay, dtype) if decay else 0.0
    if decay and p.dtype != dtype:
        p = xp.astype(p, dtype)
    step = schedule.step
    if not isinstance(step, int):
        step = xp.astype(step, g.dtype)  # bias corrections in the parameter dtype
    if decay and not config.decoupled_weight_decay:
        g = g + wd * p

    plan = config.plan(tuple(g.shape))
    # A matrix's blocks read where they lie, not cut out, where the products take strided blocks
    # (blocking.block_grids); then (1-β₂) scales their products, as where a product scales for
    # free. Else √(1-β₂) weights the blocks in the copy that cuts them: no pass of its own.
    grid = bool(plan.num_preconditioned) and len(plan.merged_shape) == 2 and _xp.takes_block_views(xp)

    def blocks_of(x, scale=None):  # scale: only where blocks are cut (a copy to weight them in)
        return blocking.block_grids(xp, x, plan) if grid else blocking.split_groups(xp, x, plan, scale)

    weight, product_scale = statistics.statistics_weight(config.beta2), 1.0
    if weight == 1.0 or schedule.statistics is False:
        weight = None
    elif len(plan.preconditioned) == 2 and (grid or _xp.product_takes_scale(xp)):
        weight, product_scale = None, 1.0 - config.beta2
    # F = f_scale · f and the grafting direction D = d_scale · d: per-step scalars are applied with
    # the learning rate, not in passes of their own.
    new_m, f, f_scale, layer_norm = None, g, 1.0, None
    g_blocks = f_blocks = None  # cut with the first-order pass (blocking.ema_plus_square_norm_split)
    d_scale = 1.0  # the diagonal direction's own scale (Adam's bias correction), beside layer_norm
    if (s.momentum is not None and schedule.finite is None
            and config.graft_type in _DIAGONAL and config.graft_granularity is GraftGranularity.LAYER
            and plan.num_preconditioned and schedule.precondition is True):
        # A preconditioned step needs of the diagonal direction (for F = m̂) only its layer norm:
        # the first moment, the accumulator and that norm in one pass where the library has one,
        # and with them the cuts of g and F into blocks where the statistics are due (none where
        # the products read the blocks where they lie).
        eps, d_scale = grafting.diagonal_terms(config.graft_type, config.diagonal_epsilon, config.graft_beta2, step)
        beta2 = None if config.graft_type is GraftType.ADAGRAD else config.graft_beta2
        nesterov = momentum.nesterov_coefficients(config.beta1, step) if config.nesterov else None
        args = (xp, s.momentum, s.graft.accumulator, g)
        if schedule.statistics is True and not grid:
            new_m, acc, layer_norm, g_blocks, f_blocks = blocking.ema_plus_square_norm_split(
                *args, plan, config.beta1, eps, weight, config.donate_state, beta2, nesterov)
            f = None  # F in its blocks only: a layer-grafted preconditioned step reads nothing more
        else:
            new_m, acc, layer_norm, f = _elementwise.ema_plus_square_norm_with_f(
                *args, config.beta1, eps, config.donate_state, beta2, nesterov)
        new_graft = grafting.GraftState(acc)
        if nesterov is None:  # F = m̂ = m' with its bias correction as a scalar: no pass
            f, f_scale = momentum.filtered_gradient(new_m, g, config.beta1, step, False)
    else:
        if s.momentum is not None:
            new_m = momentum.ema(s.momentum, g, config.beta1, config.donate_state, schedule.finite)
            f, f_scale = momentum.filtered_gradient(new_m, g, config.beta1, step, config.nesterov)
        new_graft = grafting.update_graft(config.graft_type, s.graft, g, config.graft_beta2, config.donate_state,
                                          schedule.finite)
    diagonal = dict(epsilon=config.diagonal_epsilon, beta2=config.graft_beta2, step=step, f_scale=f_scale)

    def direction():  # written only where a step uses it: a layer's grafting needs only its norm
        return grafting.graft_direction(xp, config.graft_type, new_graft, f, **diagonal)

    def direction_norm():
        if layer_norm is not None:  # the scalars in grafting.direction_norm's order
            return (f_scale * d_scale) * layer_norm
        return grafting.direction_norm(xp, config.graft_type, new_graft, f, **diagonal)

    new_blocks = s.blocks
    neg_lr = -scalar_as(xp, schedule.learning_rate, dtype)

    def first_order():
        d, d_scale = direction()
        return d * (neg_lr * d_scale)

    u = None
    if plan.num_preconditioned:
        if g_blocks is None:
            g_blocks = (None,) * len(s.blocks)
            if schedule.statistics is not False:
                g_blocks = blocks_of(g, weight)
        new_blocks = tuple(
            _update_block(config, xp, b, gb, plan, schedule, (index, j), product_scale, collected, grid)
            for j, (b, gb) in enumerate(zip(s.blocks, g_blocks))
        )

        def preconditioned():
            # The first moment's blocks where the first-order pass cut them. Without a first
            # moment F is G, already cut into blocks for the statistics (weighted by w = √(1-β₂)
            # where the products take no scale): preconditioning is linear, so P(w·G) with the
            # scale f_scale / w is P(G) with f_scale, and G is cut only once.
            if f_blocks is not None:
                blocks, p_scale = f_blocks, f_scale
            elif f is g and g_blocks[0] is not None:
                blocks, p_scale = g_blocks, f_scale if weight is None else f_scale / weight
            else:
                blocks, p_scale = blocks_of(f), f_scale
            return _preconditioned_update(config, xp, new_blocks, blocks, p_scale, direction, direction_norm,
                                          plan, neg_lr, grid)

        u = _select(xp, schedule.precondition, preconditioned, first_order)
    else:
        u = first_order()

    if decay and config.decoupled_weight_decay:
        u = u + (neg_lr * wd) * p
    if u.dtype != out_dtype:
        u = xp.astype(u, out_dtype)
    return u, ParamState(new_m, new_graft, new_blocks)


def _preconditioned_update(config, xp, blocks, f_blocks, f_scale, direction, direction_norm, plan, factor,
                           grid: bool = False):
    """Shampoo's direction for the filtered gradient F = ``f_scale`` · f, given as ``f_blocks``
    (:func:`~shampoo_core.blocking.split_groups` of f, or with ``grid`` its
    :func:`~shampoo_core.blocking.block_grids`), grafted to the norm of the grafting
    direction (``direction()`` as ``(d, scale)``, cut into blocks for per-block norms; for a
    layer ``direction_norm()``, its norm alone), times ``factor``.

    Preconditioning is linear, so it runs on f and the scalars meet in one multiply: with
    P = precondition(f), the grafted update is P · f_scale‖D‖ / max(f_scale‖P‖, 1e-16).
    """
    graft_type = config.graft_type
    floor = grafting.NORM_FLOOR

    def grafted(target, p_norm):
        return factor * f_scale * target / _xp.at_least(xp, f_scale * p_norm, floor)

    per_block = graft_type is not GraftType.NONE and config.graft_granularity is GraftGranularity.BLOCK
    # The layer's scale (or none) on the merged blocks, a row at a time: for grids, and for cut
    # stacks (as grids) where the library runs it so (preconditioner.precondition_merged).
    merged = grid or (len(plan.merged_shape) == 2 and _xp.fast_path(xp, "precondition_merged") is not None)
    if merged and not per_block:
        scale = factor * f_scale if graft_type is GraftType.NONE else (lambda p_norm: grafted(direction_norm(), p_norm))
        grids = f_blocks if grid else blocking.stacks_as_grids(xp, f_blocks, plan)
        return preconditioner.precondition_merged(xp, grids, [b.preconditioners for b in blocks], plan, scale)
    precondition = preconditioner.precondition_grid if grid else preconditioner.precondition_block
    pre = [precondition(xp, fb, b.preconditioners, plan.preconditioned) for fb, b in zip(f_blocks, blocks)]
    if graft_type is GraftType.NONE:
        return blocking.merge_groups(xp, pre, plan, factor * f_scale)
    if per_block:
        d, d_scale = direction()
        d_blocks = blocking.split_groups(xp, d, plan)
        scales = [grafted(grafting.graft_block_norms(xp, graft_type, db, d_scale), _xp.block_norms(xp, pb))
                  for pb, db in zip(pre, d_blocks)]
        return blocking.merge_groups(xp, pre, plan, block_scales=scales)  # scaled in the merge copy
    # The layer's norm from the stacks, so that the merge copy applies the grafted scale.
    scale = grafted(direction_norm(), _xp.joint_norm(xp, pre))
    return blocking.merge_groups(xp, pre, plan, scale)
