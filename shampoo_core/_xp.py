"""Array-namespace helpers shared by the kernels.

Everything here goes through ``array_api_compat`` so that the kernels run unchanged on any
array library that implements the Python array API standard (NumPy, array_api_strict, PyTorch,
JAX, CuPy). What one library does differently is registered here by its module in ``backends``
(control flow, placement, device kinds, fast paths); the first array of NumPy or torch that
:func:`namespace` meets imports that library's module (``backends.numpy_backend``,
``backends.torch_backend``), so their fast paths need no import by the user.
"""

from __future__ import annotations

import importlib

import array_api_compat
import optree

__all__ = [
    "namespace",
    "device_of",
    "placement",
    "register_placement",
    "device_kind",
    "register_device_kind",
    "is_real_floating",
    "is_half",
    "dtype_name",
    "supports_float64",
    "eye_like",
    "norm",
    "scaled_plus_product",
    "product_takes_scale",
    "joint_norm",
    "block_norms",
    "map_stack",
    "loop_stack",
    "register_map",
    "at_least",
    "scalar",
    "is_lazy",
    "concrete",
    "to_numpy",
    "register_cond",
    "register_fast_path",
    "fast_path",
    "fast_value",
    "cond",
]

# Namespace name -> cond(pred, true_fn, false_fn, operand); registered by backends (JAX: lax.cond).
_CONDS: dict = {}
_MAPS: dict = {}
# Namespace name -> fn(array) -> device kind, for arrays whose device cannot be read (traced JAX).
_DEVICE_KINDS: dict = {}
# Namespace name -> fn(array) -> where new arrays of other shapes beside it go (sharded JAX arrays).
_PLACEMENTS: dict = {}
_PLACEMENT_OF_TYPE: dict = {}  # array type -> its rule or None; placement runs per leaf per step


_NAMESPACE_OF_TYPE: dict = {}  # array type -> its namespace; asked for several times per leaf per step
# (namespace name, operation) -> fn: a library's faster way to compute one of the core's expressions.
_FAST_PATHS: dict = {}
_FAST_PATH_TRAITS: dict = {}
# The module of ``backends`` that registers a namespace's fast paths, imported when the namespace is
# first met. JAX's (``backends.jax_backend``, control flow and placement) is imported by its adapters.
_BACKEND_MODULES = {
    "array_api_compat.numpy": "backends.numpy_backend",
    "array_api_compat.torch": "backends.torch_backend",
}


def namespace(*arrays):
    """Return the array-API namespace shared by ``arrays`` (raises TypeError if they mix libraries).

    ``array_api_compat.array_namespace``, remembered per array type: it depends on the type only.
    The first time a namespace is met, its module of ``backends`` (if it has one) is imported.
    """
    kind = type(arrays[0]) if arrays and all(type(a) is type(arrays[0]) for a in arrays) else None
    xp = _NAMESPACE_OF_TYPE.get(kind)
    if xp is None:
        xp = array_api_compat.array_namespace(*arrays)
        module = _BACKEND_MODULES.get(getattr(xp, "__name__", ""))
        if module is not None:
            importlib.import_module(module)
        if kind is not None:
            _NAMESPACE_OF_TYPE[kind] = xp
    return xp


def register_fast_path(namespace_name: str, operation: str, fn, **traits) -> None:
    """Register ``fn`` as the way arrays of ``namespace_name`` compute ``operation``, one of the
    core's expressions (``_elementwise.ema``, ``plus_square``, ``over_root_plus``, ``scaled_copy``,
    ``ema_plus_square_norm``; ``blocking.ema_plus_square_norm_split``; :func:`scaled_plus_product`;
    ``preconditioner.precondition_merged``).
    ``fn`` takes the operation's arguments and returns its value as a new array, leaving its
    inputs as they were, or ``NotImplemented`` to leave these arguments to the array-API
    expression. ``traits`` describe it (``alpha_in_product=True``: see
    :func:`product_takes_scale`; ``block_views=True``: :func:`takes_block_views`).

    An operation named with a trailing underscore (``"ema_"``, ``"plus_square_"``,
    ``"scaled_plus_product_"``) is the in-place form of the one without: ``fn`` writes the value
    into its first argument, a running average whose caller has given it up (``donate_state``),
    and returns that argument, with the bits of the new-array form; or ``NotImplemented``, and the
    core computes the new-array form instead. The core itself never writes into an array."""
    _FAST_PATHS[(namespace_name, operation)] = fn
    _FAST_PATH_TRAITS[(namespace_name, operation)] = traits


def fast_path(xp, operation: str):
    """The function registered with :func:`register_fast_path` for ``operation`` on namespace
    ``xp``, or ``None``."""
    return _FAST_PATHS.get((getattr(xp, "__name__", ""), operation))


def fast_value(operation: str, x, *args, donate: bool = False):
    """``operation`` of ``x`` and ``args`` by the fast path of ``x``'s namespace, or
    ``NotImplemented`` where there is none or it declines: the caller computes the expression.

    ``donate``: ``x`` may be overwritten with the value. The in-place form (``operation + "_"``)
    is tried first, then the new-array form."""
    xp = namespace(x)
    if donate:
        fn = fast_path(xp, operation + "_")
        out = NotImplemented if fn is None else fn(x, *args)
        if out is not NotImplemented:
            return out
    fn = fast_path(xp, operation)
    return NotImplemented if fn is None else fn(x, *args)


def device_of(x):
    """Device on which ``x`` lives (``array_api_compat.device``)."""
    return array_api_compat.device(x)


def placement(x, *, same_shape: bool = False):
    """The ``device=`` for new arrays that go with ``x`` (state, identities, counters).

    ``x``'s device, unless its library registered a rule with :func:`register_placement`. JAX does
    (``backends.jax_backend``): new arrays follow ``x``'s commitment, so that a jitted step's state
    keeps one signature, and the "device" of an array sharded over several devices is its sharding,
    which fits only arrays of its rank, so new arrays of other shapes are replicated over those
    devices. ``same_shape=True`` asks for arrays of ``x``'s shape, which may share its sharding.
    """
    kind = type(x)
    if kind not in _PLACEMENT_OF_TYPE:
        _PLACEMENT_OF_TYPE[kind] = _PLACEMENTS.get(namespace(x).__name__)
    rule = _PLACEMENT_OF_TYPE[kind]
    return device_of(x) if rule is None else rule(x, same_shape)


def register_placement(namespace_name: str, fn) -> None:
    """Register ``fn(array, same_shape) -> device`` as :func:`placement` for arrays of ``namespace_name``."""
    _PLACEMENTS[namespace_name] = fn
    _PLACEMENT_OF_TYPE.clear()


def device_kind(x) -> str:
    """The kind of device ``x`` lives on: ``"cpu"``, ``"cuda"`` (CuPy, torch), ``"gpu"``/``"tpu"``
    (JAX platforms), ``"mps"``, ...; ``"unknown"`` where it cannot be told (a traced array whose
    library registered no rule with :func:`register_device_kind`).

    Host libraries (NumPy, array_api_strict, Dask) are ``"cpu"`` whatever their device objects.
    """
    if array_api_compat.is_cupy_array(x):
        return "cuda"
    if array_api_compat.is_numpy_array(x) or array_api_compat.is_dask_array(x):
        return "cpu"
    xp = namespace(x)
    if array_api_compat.is_array_api_strict_namespace(xp):
        return "cpu"
    dev = device_of(x)
    if dev is None:
        fn = _DEVICE_KINDS.get(getattr(xp, "__name__", ""))
        return fn(x) if fn is not None else "unknown"
    for attr in ("type", "platform"):  # torch.device.type; jax.Device.platform
        kind = getattr(dev, attr, None)
        if isinstance(kind, str):
            return kind
    return str(dev)


def register_device_kind(namespace_name: str, fn) -> None:
    """Register ``fn(x) -> str`` giving the device kind of arrays of ``namespace_name`` whose device
    cannot be read (``backends.jax_backend``: traced arrays run on JAX's default backend)."""
    _DEVICE_KINDS[namespace_name] = fn


def is_real_floating(xp, x) -> bool:
    return xp.isdtype(x.dtype, "real floating")


# (dtype type, dtype) -> is_half, read for every leaf at every step. The type keeps dtypes of
# different libraries apart (array_api_strict warns when its dtypes are compared with NumPy's).
_HALF: dict = {}


def is_half(xp, dtype) -> bool:
    """Whether ``dtype`` is a real floating dtype narrower than 32 bits (float16, bfloat16)."""
    key = (type(dtype), dtype)
    try:
        return _HALF[key]
    except KeyError:
        half = _HALF[key] = xp.finfo(dtype).bits < 32
        return half
    except TypeError:  # an unhashable dtype object
        return xp.finfo(dtype).bits < 32


def dtype_name(dtype) -> str:
    """The dtype's name in any library: "float32" for numpy.float32 or np.dtype("float32"),
    "bfloat16" for torch.bfloat16 or a JAX array's dtype, "float64" for array_api_strict.float64."""
    name = getattr(dtype, "name", None)  # NumPy dtype instances; the scalar classes have __name__
    if isinstance(name, str):
        return name
    return getattr(dtype, "__name__", None) or str(dtype).rsplit(".", 1)[-1]


def supports_float64(xp, device) -> bool:
    """Whether ``device`` of namespace ``xp`` can hold float64 arrays (array API inspection)."""
    try:
        dtypes = xp.__array_namespace_info__().dtypes(device=device, kind="real floating")
    except (AttributeError, TypeError, ValueError):
        return True
    return "float64" in dtypes


def eye_like(xp, n: int, like):
    """Identity of size ``n`` with the dtype and device of ``like``."""
    return xp.eye(n, dtype=like.dtype, device=placement(like))


def norm(xp, x):
    """The 2-norm of all of ``x``'s entries, as a 0-d array of ``x``'s dtype (real floating).

    ``xp.linalg.vector_norm(x)``, but with two differences:

    * For NumPy (and array_api_strict, which runs on it), float32 and float64 arrays: an inner
      product of the flattened array, the BLAS dot that ``numpy.linalg.norm(x)`` uses. NumPy's
      ``vector_norm`` squares ``x`` into a temporary and reduces it: 8.5 ms against 1.1 ms for
      11.6M float32 entries on one core.
    * Half dtypes (float16, bfloat16) are summed in float32: NumPy's ``vector_norm`` sums the
      squares in float16, so a norm of 256 or more came out inf.

    A library may register a fast path (``"norm"``): torch's is the BLAS dot too, for accuracy
    (``backends.torch_backend.norm``).
    """
    if is_half(xp, x.dtype):
        return xp.astype(norm(xp, xp.astype(x, xp.float32)), x.dtype)
    out = fast_value("norm", x)
    if out is not NotImplemented:
        return out
    if array_api_compat.is_numpy_array(x) or array_api_compat.is_array_api_strict_namespace(xp):
        v = xp.reshape(x, (-1,))
        return xp.sqrt(v @ v)  # 1-D @ 1-D: the BLAS dot, without vecdot's wrapper
    return xp.linalg.vector_norm(x)


def block_norms(xp, x):
    """Per block, the 2-norm of ``x[i]`` for a stack ``x`` of shape ``(n, ...)``: an ``(n,)``
    array of ``x``'s dtype (half dtypes summed in float32, as :func:`norm`)."""
    if is_half(xp, x.dtype):
        return xp.astype(block_norms(xp, xp.astype(x, xp.float32)), x.dtype)
    return xp.linalg.vector_norm(x, axis=tuple(range(1, x.ndim)))


def scaled_plus_product(xp, c, a, b, beta: float, alpha: float = 1.0, donate: bool = False):
    """``beta * c + alpha * (a @ b)`` for ``a`` (m, k), ``b`` (k, n) and ``c`` (m, n) of one
    dtype, or stacks of them (the same leading batch axes on all three, one or more: a group's
    blocks as a stack, or as a grid, ``blocking.block_grids``): a Shampoo statistic's running
    average. A new array, the inputs left as they were; with ``donate``, the caller gives ``c``
    up and a library's in-place fast path may write the value into it.

    A library's fast path (:func:`register_fast_path`) may compute it with fewer passes:
    torch's ``addmm``/``baddbmm`` add ``beta * c`` and apply ``alpha`` in the product
    (``backends.torch_backend``), NumPy adds the products of a stack a few blocks at a time into
    the new ``beta * c`` while they are in cache (``backends.numpy_backend``).
    """
    out = fast_value("scaled_plus_product", c, a, b, beta, alpha, donate=donate)
    if out is not NotImplemented:
        return out
    product = a @ b
    return (c if beta == 1.0 else beta * c) + (product if alpha == 1.0 else alpha * product)


def gram_average(xp, c, a, beta: float, alpha: float = 1.0, donate: bool = False):
    """``beta * c + alpha * (a @ a.mT)`` for a symmetric ``c``: a Shampoo statistic's running
    average (arXiv 2002.09018, Sec. 3), with :func:`scaled_plus_product`'s shapes and ``donate``.

    A library's fast path may read only one triangle of ``c`` and mirror the result (NumPy, and
    torch's CPU tensors of large enough blocks: BLAS's ``syrk`` with β, ``backends.syrk_cpu``), so
    ``c`` must be symmetric; the result is. Where
    none takes it, :func:`scaled_plus_product` of ``a`` and ``a.mT`` computes it.
    """
    out = fast_value("gram_average", c, a, beta, alpha, donate=donate)
    if out is not NotImplemented:
        return out
    return scaled_plus_product(xp, c, a, a.mT, beta, alpha, donate)


def product_takes_scale(xp) -> bool:
    """Whether :func:`scaled_plus_product` applies its ``alpha`` inside the matrix product
    (torch's ``addmm``/``baddbmm``), so that scaling the product costs no pass of its own: the
    trait ``alpha_in_product`` of the namespace's registered fast path."""
    traits = _FAST_PATH_TRAITS.get((getattr(xp, "__name__", ""), "scaled_plus_product"), {})
    return bool(traits.get("alpha_in_product", False))


def takes_block_views(xp) -> bool:
    """Whether the namespace's matrix products read a parameter's blocks where they lie: batches
    of strided blocks (``blocking.block_grids``, rows a parameter's row length apart) taken as
    they are, without a contiguous copy, by :func:`scaled_plus_product` and ``@``. The trait
    ``block_views`` of the namespace's registered ``scaled_plus_product``: NumPy's ``matmul``
    hands each block to BLAS with its row stride. (torch's batched products copy such batches,
    and JAX has no views.)"""
    traits = _FAST_PATH_TRAITS.get((getattr(xp, "__name__", ""), "scaled_plus_product"), {})
    return bool(traits.get("block_views", False))


def joint_norm(xp, arrays):
    """The 2-norm of the entries of all ``arrays`` together (as if concatenated), a 0-d array of
    their common dtype: :func:`norm` of one, the root of the sum of the squared norms of several
    (for half dtypes summed in float32, where a square of 256 would overflow float16)."""
    if len(arrays) == 1:
        return norm(xp, arrays[0])
    dtype = arrays[0].dtype
    if is_half(xp, dtype):
        return xp.astype(joint_norm(xp, [xp.astype(x, xp.float32) for x in arrays]), dtype)
    return xp.sqrt(sum(norm(xp, x) ** 2 for x in arrays))


def at_least(xp, x, floor: float):
    """``max(x, floor)`` elementwise, for a Python float ``floor``.

    torch: ``clip``, which calls ``torch.clamp`` with the scalar (``maximum`` would first make a
    tensor of it on ``x``'s device). Elsewhere ``maximum``, which takes the scalar as it is:
    array_api_compat's ``clip`` for NumPy and CuPy runs several Python checks per call, 6.1 µs
    against 0.8 µs for ``maximum`` on a 0-d NumPy array.
    """
    if array_api_compat.is_torch_namespace(xp):
        return xp.clip(x, min=floor)
    return xp.maximum(x, floor)


def scalar(x) -> float:
    """Python float of a 0-d array (forces evaluation on lazy backends)."""
    return float(x)


def is_lazy(x) -> bool:
    """Whether reading ``x``'s value on the host is impossible or costly (JAX, Dask, traced arrays).

    Lazy arrays take the branch-free path: schedule decisions become array predicates.
    """
    return array_api_compat.is_lazy_array(x)


def register_cond(namespace_name: str, fn) -> None:
    """Register ``fn(pred, true_fn, false_fn, operand)`` for namespace ``namespace_name``.

    Backends call this (``backends.jax_backend`` registers ``jax.lax.cond``) so that costly work,
    such as root computation, runs only when its predicate holds, even under tracing.
    """
    _CONDS[namespace_name] = fn


def register_map(namespace_name: str, fn) -> None:
    """Register ``fn(f, xs)`` for namespace ``namespace_name``: ``f`` applied to each slice of
    ``xs`` along its leading axis, the results stacked (``backends.jax_backend`` registers
    ``jax.lax.map`` for traced arrays, which traces ``f`` once)."""
    _MAPS[namespace_name] = fn


def map_stack(xp, f, xs):
    """``f(xs[i])`` for every ``i`` along the leading axis of array ``xs``, stacked leaf by leaf
    (``f`` returns a tuple of arrays).

    Lazy arrays take the registered map primitive (one traced body for any number of slices);
    elsewhere a Python loop and ``stack``.
    """
    fn = _MAPS.get(getattr(xp, "__name__", ""))
    if fn is not None and is_lazy(xs):
        return fn(f, xs)
    return loop_stack(xp, f, xs)


def loop_stack(xp, f, xs):
    """:func:`map_stack` as a Python loop of calls on the slices of ``xs``, results stacked."""
    results = [f(xs[i, ...]) for i in range(xs.shape[0])]
    return tuple(xp.stack(parts) for parts in zip(*results))


def cond(xp, pred, true_fn, false_fn, operand):
    """``true_fn(operand)`` if ``pred`` else ``false_fn(operand)``, for an array predicate.

    Without a registered control-flow primitive both branches are computed and selected with
    ``where`` leaf by leaf (correct, but does the work of both).
    """
    fn = _CONDS.get(getattr(xp, "__name__", ""))
    if fn is not None:
        return fn(pred, true_fn, false_fn, operand)
    return optree.tree_map(lambda t, f: xp.where(pred, t, f), true_fn(operand), false_fn(operand))


def concrete(x, kind=int):
    """``kind(x)`` (``int`` or ``float``) when the value can be read on the host, ``None`` for a
    traced array (jax.jit)."""
    if isinstance(x, kind):
        return x
    try:
        return kind(x)
    except TypeError:  # JAX's ConcretizationTypeError subclasses TypeError
        return None


def to_numpy(x):
    """A host NumPy copy of ``x`` (DLPack with a CPU copy where needed; NumPy scalars too)."""
    import numpy as np

    if isinstance(x, np.generic):  # NumPy turns 0-d array arithmetic into scalars
        return np.array(x)
    try:
        return np.from_dlpack(x, device="cpu", copy=True)
    except (TypeError, BufferError, RuntimeError, ValueError):
        pass
    # Producers without cross-device DLPack export (older CuPy, torch): copy to the host first.
    try:
        x = array_api_compat.to_device(x, "cpu")
    except (TypeError, ValueError, RuntimeError, AttributeError, NotImplementedError):
        pass
    return np.array(x, copy=True)
