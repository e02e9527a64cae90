"""The Eva family: rank-one Kronecker-vector preconditioners inverted by Sherman–Morrison.

Source: Zhang, Shi, Li, "Eva: A General Vectorized Approximation Framework for Second-order
Optimization". For a layer weight G of shape (m, n) = (out, in) with mean layer input ā (length n)
and mean output gradient ḡ (length m), K-FAC's factors A = E[aaᵀ] and S = E[ggᵀ] are replaced by
āāᵀ and ḡḡᵀ, so the damped inverse needs no decomposition, only O(mn) work:

* Eva: (āāᵀ ⊗ ḡḡᵀ + γI)⁻¹ vec(G) = (G - (ḡᵀGā)/(‖ā‖²‖ḡ‖² + γ) · ḡāᵀ) / γ.
* Eva-f (vectorized FOOF, input side only): G - (Gā)āᵀ/(‖ā‖² + γ) = γ G (āāᵀ + γI)⁻¹.
* Two-sided (each factor damped separately, K-FAC style):
  (ḡḡᵀ + γI)⁻¹ G (āāᵀ + γI)⁻¹ = (1/γ²)(I - ḡḡᵀ/(γ + ‖ḡ‖²)) G (I - āāᵀ/(γ + ‖ā‖²)).
* Eva-s (vectorized Shampoo, gradients only): l, r = running row and column means of G;
  P = G - (lᵀGr)/(γ + ‖l‖²‖r‖²) · lrᵀ, rescaled to ‖G‖.

vec is row-major throughout (vec(ḡāᵀ) = ḡ ⊗ ā). The default for ``eva`` is the published
one-sided form: it is the exact damped inverse of the rank-one Kronecker approximation; the
two-sided form inverts a different matrix, (ḡḡᵀ + γI) ⊗ (āāᵀ + γI), which adds γ(ḡḡᵀ ⊗ I + I ⊗ āāᵀ)
and so damps far more strongly along ā and ḡ.
"""

from __future__ import annotations

from typing import NamedTuple

from . import _elementwise, _xp, tree
from .base import (GradientTransformation, check_against_state, check_leaf_count, check_leaves,
                   count_and_learning_rate, may_be_positive, record_hyperparameters, scalar_as,
                   shape_and_dtype, weight_decay_for_update, zero_count)
from .nonfinite import Guard, check_mode, guard, skipped_step
from .options import check_bool, check_injectable, check_learning_rate, check_real

__all__ = [
    "eva_precondition",
    "eva_f_precondition",
    "two_sided_precondition",
    "eva_s_precondition",
    "eva",
    "eva_s",
    "EvaState",
]


def eva_precondition(xp, g, a_bar, g_bar, damping: float):
    """(āāᵀ ⊗ ḡḡᵀ + γI)⁻¹ vec(G) as an (m, n) array; G (m, n), ā (n,), ḡ (m,), γ > 0."""
    coef = (g_bar @ g @ a_bar) / (xp.sum(a_bar * a_bar) * xp.sum(g_bar * g_bar) + damping)
    return (g - coef * (g_bar[:, None] * a_bar[None, :])) * (1.0 / damping)


def eva_f_precondition(xp, g, a_bar, damping: float):
    """G - (Gā)āᵀ/(‖ā‖² + γ) = γ G (āāᵀ + γI)⁻¹."""
    return g - ((g @ a_bar)[:, None] * a_bar[None, :]) / (xp.sum(a_bar * a_bar) + damping)


def two_sided_precondition(xp, g, a_bar, g_bar, damping: float):
    """(ḡḡᵀ + γI)⁻¹ G (āāᵀ + γI)⁻¹ by two Sherman–Morrison inverses."""
    left = g - g_bar[:, None] * (g_bar @ g)[None, :] / (damping + xp.sum(g_bar * g_bar))
    both = left - (left @ a_bar)[:, None] * a_bar[None, :] / (damping + xp.sum(a_bar * a_bar))
    return both * (1.0 / damping**2)


def eva_s_precondition(xp, g, left, right, damping: float):
    """P = G - (lᵀGr)/(γ + ‖l‖²‖r‖²) · lrᵀ rescaled to ‖G‖ (l: (m,), r: (n,))."""
    coef = (left @ g @ right) / (damping + xp.sum(left * left) * xp.sum(right * right))
    p = g - coef * (left[:, None] * right[None, :])
    return p * (_xp.norm(xp, g) / _xp.at_least(xp, _xp.norm(xp, p), 1e-16))


class EvaState(NamedTuple):
    """``count``: 0-d int32; ``momentum``: per leaf; ``left``/``right``: per leaf running vectors
    (ḡ and ā for Eva, row and column means for Eva-s; ``None`` for leaves without them);
    ``skipped``: 0-d int32, steps skipped for non-finite inputs (``nonfinite="skip"``)."""

    count: object
    momentum: tuple
    left: tuple
    right: tuple
    skipped: object


def ema(xp, old, new, decay: float, first, gate=None):
    """Running average; the first update takes ``new`` as is (``first``: bool or 0-d bool array).

    ``gate``: None, or the traced verdict of ``nonfinite="skip"`` (a 0-d bool array); where False
    the result is ``old``'s values, computed in the one expression (see :func:`run_step`).
    """
    if gate is not None:
        avg = _elementwise.ema(old, new, decay, gate=gate)
        return avg if first is False else xp.where(gate if first is True else first & gate, new, avg)
    if isinstance(first, bool):
        return new if first else decay * old + (1.0 - decay) * new
    return xp.where(first, new, decay * old + (1.0 - decay) * new)


def _init(params, want_vectors):
    leaves, _ = tree.flatten(params)
    check_leaves("params", leaves, tree.leaf_paths(params))
    xp = _xp.namespace(*leaves)
    dev = _xp.placement(leaves[0])
    left = tuple(xp.zeros((p.shape[0],), dtype=p.dtype, device=dev) if want_vectors(p) else None for p in leaves)
    right = tuple(xp.zeros((p.shape[1],), dtype=p.dtype, device=dev) if want_vectors(p) else None for p in leaves)
    moms = tuple(xp.zeros_like(p) for p in leaves)
    return EvaState(zero_count(xp, dev), moms, left, right, zero_count(xp, dev))


def param_leaves(params, spec, n):
    if params is None:
        return [None] * n
    return tree.check_same_structure("params", params, spec)


class UpdateInputs(NamedTuple):
    """What every Eva-family ``update`` starts from (see :func:`begin_update`)."""

    g_leaves: list
    spec: object
    paths: list
    p_leaves: list  # ``None`` entries when params are not given
    c_leaves: list  # curvature per leaf, checked; ``None`` where a leaf has none
    count: object  # updates before this one: int, or a 0-d array when traced
    learning_rate: object
    xp: object
    verdict: Guard  # of the non-finite check over grads and curvature
    weight_decay: object  # a float, or the traced 0-d array


def begin_update(state, grads, params, curvature, learning_rate, weight_decay, *, nonfinite: str,
                 curvature_shapes=None, curvature_names=("g_bar", "a_bar")) -> UpdateInputs:
    """Flatten and check ``grads``, ``params`` and ``curvature``; resolve the count and learning
    rate; check the inputs for NaN and inf (``nonfinite``, see :mod:`shampoo_core.nonfinite`).

    ``curvature_shapes(i, g)``: the shapes leaf ``i``'s curvature members must have (see
    :func:`checked_curvature`), or ``None`` where the leaf keeps no curvature.

    Raises:
        ValueError: params missing while ``weight_decay > 0``, leaves that do not match the
            params or the state (number, shape, dtype), curvature of another structure than
            ``grads`` or rejected by :func:`checked_curvature`, or (``nonfinite="raise"``) a
            gradient or curvature with NaN or inf, named.
    """
    g_leaves, spec = tree.flatten(grads)
    paths = tree.leaf_paths(grads)
    check_leaf_count("grads", g_leaves, len(state.momentum))
    weight_decay = weight_decay_for_update(weight_decay, params)
    p_leaves = param_leaves(params, spec, len(g_leaves))
    check_leaves("grads", g_leaves, paths, reference=None if params is None else p_leaves)
    check_against_state(g_leaves, paths, [shape_and_dtype(m) for m in state.momentum], state.momentum,
                        None if params is None else p_leaves)
    c_leaves = [None] * len(g_leaves) if curvature is None else curvature_leaves(curvature, spec)
    shapes = [None if curvature_shapes is None else curvature_shapes(i, g) for i, g in enumerate(g_leaves)]
    c_leaves = [checked_curvature(c, g, path, curvature_names, sh)
                for c, g, path, sh in zip(c_leaves, g_leaves, paths, shapes)]
    count, lr = count_and_learning_rate(learning_rate, state.count)
    xp = _xp.namespace(*g_leaves)
    named = [(f"grads{path}", g) for path, g in zip(paths, g_leaves)]
    for c, path, sh in zip(c_leaves, paths, shapes):
        if c is not None:  # members the optimizer ignores (FOOF's S) are not read
            named += [(f"curvature{path}: {n}", x) for n, x, s in zip(curvature_names, c, sh) if s is not None]
    verdict = guard(xp, named, nonfinite)
    g_leaves = [verdict.clean(xp, g) for g in g_leaves]
    c_leaves = [c if c is None else tuple(None if s is None else verdict.clean(xp, x) for x, s in zip(c, sh))
                for c, sh in zip(c_leaves, shapes)]
    return UpdateInputs(g_leaves, spec, paths, p_leaves, c_leaves, count, lr, xp, verdict, weight_decay)


def run_step(state, inputs: UpdateInputs, step):
    """``step(state, inputs)`` where the inputs are finite, else a skipped step (see ``Guard.run``).

    Traced (``nonfinite="skip"`` under ``jax.jit``), ``step`` gates the arrays of its state on the
    verdict itself (``inputs.verdict.finite``: the running averages and momentum buffers through
    ``gate``, K-FAC's inverses through the flag of their ``cond``), and only the updates and the
    counters are selected here, as in ``sc.shampoo``: a select over the state after the step would
    be a pass of its own over each buffer and would keep the old state alive to the end of the
    step, so that a state donated to ``jax.jit`` is copied instead of written in place.
    """
    xp, verdict = inputs.xp, inputs.verdict

    def skipped():
        return skipped_step(xp, state, inputs.g_leaves, inputs.spec)

    if verdict.finite is None:
        return verdict.run(xp, lambda: step(state, inputs), skipped)
    (updates, new), (no_updates, old) = step(state, inputs), skipped()
    return verdict.select(xp, updates, no_updates), new._replace(
        count=verdict.select(xp, new.count, old.count), skipped=verdict.select(xp, new.skipped, old.skipped))


def check_variant_and_clip(variant, allowed, kl_clip):
    """Validate ``variant`` against ``allowed`` and return ``kl_clip`` (> 0, or None)."""
    if variant not in allowed:
        raise ValueError(f"variant must be one of {', '.join(map(repr, allowed))}; got {variant!r}")
    return None if kl_clip is None else check_real("kl_clip", kl_clip, low=0.0, low_open=True)


def validate(learning_rate, damping, stat_decay, momentum, weight_decay, nonfinite):
    return (check_learning_rate(learning_rate), check_real("damping", damping, low=0.0, low_open=True),
            check_real("stat_decay", stat_decay, low=0.0, high=1.0, high_open=True),
            check_real("momentum", momentum, low=0.0, high=1.0, high_open=True),
            check_injectable("weight_decay", weight_decay), check_mode(nonfinite))


def clipped_momentum_step(xp, vs, g_leaves, c_leaves, buffers, p_leaves, *, lr, kl_clip, momentum, weight_decay,
                          gate=None):
    """KL clipping over all preconditioned layers, then SGD with momentum; returns (updates, buffers).

    ν = min(1, sqrt(kl_clip / Σ_l lr²⟨V_l, G_l⟩)) over the leaves with curvature (``kl_clip=None``:
    ν = 1). Leaves without curvature use their gradient unscaled. ``gate``: as in :func:`ema`; where
    False the buffers keep their values.
    """
    nu = kl_scale(xp, vs, g_leaves, c_leaves, lr, kl_clip)
    updates, out = [], []
    for v, c, buf, p in zip(vs, c_leaves, buffers, p_leaves):
        buf = _sgd_step(xp, nu * v if c is not None else v, buf, p, momentum, weight_decay, gate)
        updates.append((-scalar_as(xp, lr, buf.dtype)) * buf)
        out.append(buf)
    return updates, out


def kl_scale(xp, vs, g_leaves, c_leaves, lr, kl_clip):
    """ν = min(1, sqrt(kl_clip / Σ_l lr²⟨V_l, G_l⟩)) as a 0-d array (1 where the sum is not > 0).

    Computed on the device without a host read, so it runs under ``jax.jit`` and does not
    synchronize a GPU stream.
    """
    if kl_clip is None:
        return 1.0
    terms = [xp.sum(v * g) for v, g, c in zip(vs, g_leaves, c_leaves) if c is not None]
    if not terms:
        return 1.0
    total = sum(terms[1:], terms[0])
    lr = scalar_as(xp, lr, total.dtype)
    quad = (lr * lr) * total
    ok = quad > 0.0
    safe = xp.where(ok, quad, xp.ones_like(quad))
    return xp.where(ok, xp.clip(xp.sqrt(kl_clip / safe), max=1.0), xp.ones_like(quad))


def _finish(state, inputs: UpdateInputs, vs, lefts, rights, *, kl_clip, momentum):
    """The step of ``sc.eva``/``sc.eva_s`` from the directions ``vs``: updates and the new state."""
    updates, moms = clipped_momentum_step(
        inputs.xp, vs, inputs.g_leaves, inputs.c_leaves, state.momentum, inputs.p_leaves,
        lr=inputs.learning_rate, kl_clip=kl_clip, momentum=momentum, weight_decay=inputs.weight_decay,
        gate=inputs.verdict.finite)
    return tree.unflatten(inputs.spec, updates), EvaState(state.count + 1, tuple(moms), tuple(lefts), tuple(rights),
                                                          state.skipped)


def _sgd_step(xp, d, buf, p, momentum, weight_decay, gate=None):
    if may_be_positive(weight_decay):
        d = d + scalar_as(xp, weight_decay, d.dtype) * p
    if gate is not None:  # momentum and d where gate, else 1 and 0: buf's values, one expression
        return _elementwise.gated(xp, gate, momentum, buf.dtype) * buf + xp.where(gate, d, xp.zeros_like(d))
    buf = momentum * buf + d
    return buf


def eva(learning_rate=0.1, *, damping: float = 0.03, kl_clip: float | None = 0.001, stat_decay: float = 0.95,
        momentum: float = 0.9, weight_decay: float = 0.0, variant: str = "eva", two_sided: bool = False,
        nonfinite: str = "raise"):
    """Eva or Eva-f with KL clipping across layers (the published defaults).

    ``update(state, grads, params, curvature=...)``: ``curvature`` has the tree structure of
    ``grads``; each leaf is ``None`` (the parameter is updated by SGD with momentum, e.g. a bias)
    or ``(g_bar, a_bar)`` for a 2-D leaf of shape (m, n): the batch-mean output gradient (m,) and
    the batch-mean layer input (n,) (for Eva-f only ``a_bar`` is used). Running averages decay by
    ``stat_decay``. Each preconditioned V is scaled by ν = min(1, sqrt(kl_clip / Σ lr²⟨V, G⟩)) over
    all layers (``kl_clip=None`` disables it), then SGD with momentum and L2 weight decay.
    ``learning_rate`` and ``weight_decay`` may be 0-d arrays, traced or not (as in ``sc.shampoo``).

    ``nonfinite``: a gradient or curvature with NaN or inf either raises (``"raise"``, naming it;
    the state is untouched) or skips the step (``"skip"``: zero updates, state unchanged but
    ``skipped`` + 1; the checking mode that works under ``jax.jit``); ``"ignore"`` checks nothing.
    Without a check, one bad batch stays in the momentum and the running averages for good.

    Raises:
        ValueError: bad hyperparameters; curvature of the wrong structure, not a pair, of another
            shape, dtype or device than its gradient, or given for a leaf that is not 2-D; with
            ``nonfinite="raise"``, a non-finite input or a traced one.
    """
    learning_rate, damping, stat_decay, momentum, weight_decay, nonfinite = validate(
        learning_rate, damping, stat_decay, momentum, weight_decay, nonfinite)
    kl_clip = check_variant_and_clip(variant, ("eva", "eva_f"), kl_clip)
    check_bool("two_sided", two_sided)

    def init(params):
        return _init(params, lambda p: p.ndim == 2)

    def update(state, grads, params=None, curvature=None):
        inputs = begin_update(state, grads, params, curvature, learning_rate, weight_decay, nonfinite=nonfinite,
                              curvature_shapes=lambda i, g: vector_shapes(state.left[i], g))
        return run_step(state, inputs, step)

    def step(state, inputs):
        g_leaves, c_leaves, xp, gate = inputs.g_leaves, inputs.c_leaves, inputs.xp, inputs.verdict.finite
        first = inputs.count == 0
        vs, lefts, rights = [], [], []
        for g, c, left, right in zip(g_leaves, c_leaves, state.left, state.right):
            if c is None:
                vs.append(g)
                lefts.append(left)
                rights.append(right)
                continue
            g_bar, a_bar = c
            left, right = ema(xp, left, g_bar, stat_decay, first, gate), ema(xp, right, a_bar, stat_decay, first, gate)
            if variant == "eva_f":
                v = eva_f_precondition(xp, g, right, damping)
            elif two_sided:
                v = two_sided_precondition(xp, g, right, left, damping)
            else:
                v = eva_precondition(xp, g, right, left, damping)
            vs.append(v)
            lefts.append(left)
            rights.append(right)
        return _finish(state, inputs, vs, lefts, rights, kl_clip=kl_clip, momentum=momentum)

    return record_hyperparameters(GradientTransformation(init, update), variant, dict(
        learning_rate=learning_rate, damping=damping, kl_clip=kl_clip, stat_decay=stat_decay, momentum=momentum,
        weight_decay=weight_decay, two_sided=two_sided, nonfinite=nonfinite))


def vector_shapes(left, g):
    """Shapes of Eva's (ḡ, ā) for gradient ``g``; ``None`` where the leaf keeps no vectors."""
    return None if left is None else ((g.shape[0],), (g.shape[1],))


def checked_curvature(c, g, path: str, names: tuple[str, str], shapes: tuple | None):
    """``c``, one leaf's curvature, checked against its gradient ``g`` before it enters the state.

    Args:
        c: ``None`` or a pair of arrays named ``names``.
        shapes: the shape each member must have, ``None`` for a member the optimizer does not use
            (FOOF's S), which is then not checked; ``shapes=None``: the optimizer keeps no
            curvature for this leaf (only 2-D leaves have it).

    Returns:
        ``c`` as a tuple, or ``None``.

    Raises:
        ValueError: curvature for a leaf that keeps none, not a pair, or a member of another
            shape, dtype or device than the gradient's (it would silently change the state's
            dtype, or fail later inside a broadcast).
    """
    if c is None:
        return None
    if shapes is None:
        raise ValueError(f"curvature{path} is given, but only 2-D leaves keep curvature: pass None for this leaf")
    if not isinstance(c, (tuple, list)) or len(c) != 2:
        raise ValueError(f"curvature{path} must be a pair ({names[0]}, {names[1]}); got {type(c).__name__}")
    want = ", ".join(f"{n} of shape {s}" for n, s in zip(names, shapes) if s is not None)
    for x, name, shape in zip(c, names, shapes):
        if shape is None:
            continue
        got = tuple(getattr(x, "shape", ()))
        if not hasattr(x, "dtype") or got != shape:
            raise ValueError(f"curvature{path} must be ({want}); got {name} of shape {got}")
        if x.dtype != g.dtype:
            raise ValueError(f"curvature{path}: {name} has dtype {x.dtype}; the gradient has {g.dtype}")
        got, want = _xp.placement(x), _xp.placement(g)  # the devices, whatever the sharding
        if got is not None and want is not None and got != want:  # traced arrays have no device
            raise ValueError(f"curvature{path}: {name} is on device {got}; the gradient is on {want}")
    return tuple(c)


def curvature_leaves(curvature, spec):
    """Curvature leaves aligned with ``spec``: each entry ``None`` or a ``(g_bar, a_bar)`` pair."""
    try:
        return spec.flatten_up_to(curvature)
    except (ValueError, TypeError) as err:
        raise ValueError(f"curvature must have the structure of grads {spec}: {err}") from err


def eva_s(learning_rate=0.1, *, damping: float = 0.03, stat_decay: float = 0.95, momentum: float = 0.9,
          weight_decay: float = 0.0, nonfinite: str = "raise"):
    """Eva-s: vectorized Shampoo from gradients alone (no curvature argument).

    For each 2-D leaf, running row means l and column means r of G (decay ``stat_decay``) give
    P = G - (lᵀGr)/(γ + ‖l‖²‖r‖²) · lrᵀ, rescaled to ‖G‖; other leaves use G. Then SGD with
    momentum and L2 weight decay. ``nonfinite``, and arrays for ``learning_rate`` and
    ``weight_decay``: as in :func:`eva`.

    Raises:
        ValueError: bad hyperparameters; with ``nonfinite="raise"``, a non-finite gradient (named)
            or a traced one.
    """
    learning_rate, damping, stat_decay, momentum, weight_decay, nonfinite = validate(
        learning_rate, damping, stat_decay, momentum, weight_decay, nonfinite)

    def init(params):
        return _init(params, lambda p: p.ndim == 2)

    def update(state, grads, params=None):
        inputs = begin_update(state, grads, params, None, learning_rate, weight_decay, nonfinite=nonfinite)
        return run_step(state, inputs, step)

    def step(state, inputs):
        g_leaves, xp, first, gate = inputs.g_leaves, inputs.xp, inputs.count == 0, inputs.verdict.finite
        ds, lefts, rights = [], [], []
        for g, left, right in zip(g_leaves, state.left, state.right):
            if left is not None:
                left = ema(xp, left, xp.mean(g, axis=1), stat_decay, first, gate)
                right = ema(xp, right, xp.mean(g, axis=0), stat_decay, first, gate)
                g = eva_s_precondition(xp, g, left, right, damping)
            ds.append(g)
            lefts.append(left)
            rights.append(right)
        # No curvature leaves, so no KL clipping: SGD with momentum on each direction.
        return _finish(state, inputs, ds, lefts, rights, kl_clip=None, momentum=momentum)

    return record_hyperparameters(GradientTransformation(init, update), "eva_s", dict(
        learning_rate=learning_rate, damping=damping, stat_decay=stat_decay, momentum=momentum,
        weight_decay=weight_decay, nonfinite=nonfinite))
