"""Saving and loading optimizer state: NumPy ``.npz`` (no pickle), atomic, versioned.

The file holds every array of the state (keys ``a0``, ``a1``, ...) and one JSON header
(``__header__``) with the format version, the state's structure (our state NamedTuples by name),
and the hyperparameters of the transformation when given. Writes go to a temporary file in the
same folder and are renamed over the target (``os.replace``), so a crash mid-save leaves the
previous checkpoint intact. Arrays go through DLPack to the host and come back with their dtype
and onto the device of the ``like`` arrays, bit for bit. NumPy has no bfloat16: such arrays are
stored as float32 (which holds every bfloat16 value exactly) with their dtype in the header.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np

from . import _xp

__all__ = ["save_state", "load_state", "FORMAT_VERSION", "CheckpointError"]

FORMAT_VERSION = 2  # 2: blocks of equal shape stacked (BlockState), per-block root results
_HEADER = "__header__"


class CheckpointError(ValueError):
    """A checkpoint does not match the state, parameters or hyperparameters it is loaded into."""


def _state_types():
    from .eva import EvaState
    from .first_order import FirstOrderState
    from .kfac import KFACState
    from .full_matrix import FullMatrixState
    from .grafting import GraftState
    from .shampoo import BlockState, ParamState, ShampooState

    types = (ShampooState, ParamState, BlockState, GraftState, FirstOrderState, FullMatrixState, EvaState, KFACState)
    return {t.__name__: t for t in types}


def _is_array(x) -> bool:
    try:
        _xp.namespace(x)
    except TypeError:
        return False
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _encode(node, arrays: list):
    if node is None:
        return None
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        name = type(node).__name__
        if name not in _state_types():
            raise TypeError(f"cannot save a {name}: not an optimizer state type of shampoo_core")
        return {"type": name, "fields": {f: _encode(getattr(node, f), arrays) for f in node._fields}}
    if isinstance(node, (tuple, list)):
        return {type(node).__name__: [_encode(v, arrays) for v in node]}
    if _is_array(node):
        entry = {"array": f"a{len(arrays)}"}
        xp = _xp.namespace(node)
        if _xp.is_real_floating(xp, node) and _xp.is_half(xp, node.dtype) and _xp.dtype_name(node.dtype) != "float16":
            entry["dtype"] = _xp.dtype_name(node.dtype)  # bfloat16: widened exactly, narrowed back on load
            node = xp.astype(node, xp.float32)
        arrays.append(node)
        return entry
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return {"scalar": node}
    raise TypeError(f"cannot save a {type(node).__name__} in optimizer state")


def save_state(path, state, *, tx=None, async_preconditioners=None) -> None:
    """Write ``state`` (and ``tx``'s hyperparameters, if given) to ``path`` atomically.

    Args:
        path: file path; ``.npz`` is the natural suffix (nothing is appended).
        state: a state returned by ``init``/``update`` of a shampoo_core transformation.
        tx: the transformation, to store its hyperparameters for checking at load time.
        async_preconditioners: the executor of an asynchronous run: its roots in flight are
            waited for and stored, so that resuming is exact.

    Raises:
        TypeError: ``state`` holds something that is not a shampoo_core state or an array.
    """
    arrays: list = []
    structure = _encode(state, arrays)
    pending = []
    if async_preconditioners is not None:
        for key, submitted, results in async_preconditioners.export_pending():
            pending.append({"key": list(key), "step": submitted, "results": [
                {"root": _encode(r.root, arrays)["array"], "error": [float(e) for e in r.error],
                 "lambda_max": [float(v) for v in r.lambda_max], "iterations": [int(k) for k in r.iterations]}
                for r in results]})
    header = {"format_version": FORMAT_VERSION, "structure": structure,
              "hyperparameters": _hyperparameters(tx), "pending_roots": pending}
    payload = {f"a{i}": _xp.to_numpy(a) for i, a in enumerate(arrays)}
    payload[_HEADER] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _hyperparameters(tx):
    if tx is None:
        return None
    hp = getattr(tx.init, "hyperparameters", None)
    if hp is None:
        raise TypeError("tx has no recorded hyperparameters (not made by a shampoo_core constructor)")
    return hp


def read_header(path) -> dict:
    """The JSON header of a checkpoint (format version, structure, hyperparameters)."""
    with np.load(path, allow_pickle=False) as data:
        return json.loads(bytes(data[_HEADER]).decode())


def load_state(path, like, *, tx=None, async_preconditioners=None):
    """Read a state saved by :func:`save_state`, checked against ``like``.

    Args:
        path: checkpoint file.
        like: a state of the same optimizer and model (e.g. ``tx.init(params)``), which gives
            the expected structure, shapes, dtypes, array library and device; or the parameters
            themselves when ``tx`` is given (the template is then ``tx.init(like)``).
        tx: the transformation about to use the state; its hyperparameters must equal the
            stored ones (when both exist).
        async_preconditioners: the executor of the resumed run; required when the checkpoint
            holds roots that were in flight, which are queued on it.

    Returns:
        The state, with arrays of ``like``'s library, dtype and device.

    Raises:
        CheckpointError: unknown format version, or the first mismatch (structure, shape, dtype
            or hyperparameter), named by its path in the state.
    """
    with np.load(path, allow_pickle=False) as data:
        header = json.loads(bytes(data[_HEADER]).decode())
        if header.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"{path}: format version {header.get('format_version')!r}; this version reads {FORMAT_VERSION}"
            )
        if tx is not None:
            _compare_hyperparameters(header.get("hyperparameters"), _hyperparameters(tx))
            if not (isinstance(like, tuple) and type(like).__name__ in _state_types()):
                like = tx.init(like)
        state = _decode(header["structure"], like, data, "state")
        pending = header.get("pending_roots") or []
        if pending:
            if async_preconditioners is None:
                raise CheckpointError(
                    f"{path} holds {len(pending)} asynchronous root results in flight: "
                    "pass async_preconditioners= to resume them"
                )
            async_preconditioners.import_pending(_decode_pending(pending, state, data))
        return state


def _decode_pending(pending, state, data) -> list:
    from .roots import RootResult

    out = []
    for entry in pending:
        i, j = entry["key"]
        block = state.params[i].blocks[j]
        results = []
        for r, like in zip(entry["results"], block.preconditioners):
            xp = _xp.namespace(like)
            root = data[r["root"]]
            results.append(RootResult(xp.asarray(root, device=_xp.placement(like, same_shape=True)), r["error"],
                                      r["lambda_max"], r["iterations"]))
        out.append(((i, j), entry["step"], results))
    return out


def _compare_hyperparameters(stored, current) -> None:
    if stored is None or current is None:
        return
    for key in sorted(set(stored) | set(current)):
        a, b = stored.get(key, "<missing>"), current.get(key, "<missing>")
        if a == "<missing>" and b is None:
            continue  # an option added since, at its default None; arrays it gives another dtype fail below
        if a != b:
            raise CheckpointError(f"hyperparameter {key!r}: checkpoint has {a!r}, the optimizer has {b!r}")


def _decode(node, like, data, path: str):
    if node is None:
        if like is not None:
            raise CheckpointError(f"{path}: checkpoint has nothing, the state expects {type(like).__name__}")
        return None
    if "type" in node:
        if type(like).__name__ != node["type"]:
            raise CheckpointError(f"{path}: checkpoint has a {node['type']}, the state a {type(like).__name__}")
        cls = type(like)
        missing = [f for f in cls._fields if f not in node["fields"]]
        extra = [f for f in node["fields"] if f not in cls._fields]
        if missing or extra:
            raise CheckpointError(
                f"{path}: the checkpoint's {node['type']} has fields {list(node['fields'])}, this version's "
                f"{list(cls._fields)} (missing: {missing}, unknown: {extra}); it was saved by another version")
        return cls(*(_decode(node["fields"][f], getattr(like, f), data, f"{path}.{f}") for f in cls._fields))
    for kind in ("tuple", "list"):
        if kind in node:
            items = node[kind]
            if not isinstance(like, (tuple, list)) or len(items) != len(like):
                n = len(like) if isinstance(like, (tuple, list)) else type(like).__name__
                raise CheckpointError(f"{path}: checkpoint has {len(items)} entries, the state {n}")
            out = [_decode(v, l, data, f"{path}[{i}]") for i, (v, l) in enumerate(zip(items, like))]
            return tuple(out) if kind == "tuple" else out
    if "scalar" in node:
        return node["scalar"]
    array = data[node["array"]]
    if not _is_array(like):
        raise CheckpointError(f"{path}: checkpoint has an array, the state a {type(like).__name__}")
    if tuple(array.shape) != tuple(like.shape):
        raise CheckpointError(f"{path}: checkpoint shape {tuple(array.shape)}, the state expects {tuple(like.shape)}")
    xp = _xp.namespace(like)
    stored = node.get("dtype", array.dtype.name)
    if stored != _xp.dtype_name(like.dtype):
        raise CheckpointError(f"{path}: checkpoint dtype {stored}, the state expects {like.dtype}")
    if "dtype" in node:
        return xp.astype(xp.asarray(array, device=_xp.placement(like, same_shape=True)), like.dtype)
    return xp.asarray(array, dtype=like.dtype, device=_xp.placement(like, same_shape=True))


