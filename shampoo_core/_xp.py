"""Array-namespace helpers shared by the kernels.

Everything here goes through ``array_api_compat`` so that the kernels run unchanged on any
array library that implements the Python array API standard (NumPy, array_api_strict, PyTorch,
JAX, CuPy).
"""

from __future__ import annotations

import array_api_compat

__all__ = [
    "namespace",
    "device_of",
    "is_real_floating",
    "supports_float64",
    "eye_like",
    "scalar",
]


def namespace(*arrays):
    """Return the array-API namespace shared by ``arrays`` (raises TypeError if they mix libraries)."""
    return array_api_compat.array_namespace(*arrays)


def device_of(x):
    """Device on which ``x`` lives (``array_api_compat.device``)."""
    return array_api_compat.device(x)


def is_real_floating(xp, x) -> bool:
    return xp.isdtype(x.dtype, "real floating")


def supports_float64(xp, device) -> bool:
    """Whether ``device`` of namespace ``xp`` can hold float64 arrays (array API inspection)."""
    try:
        dtypes = xp.__array_namespace_info__().dtypes(device=device, kind="real floating")
    except (AttributeError, TypeError, ValueError):
        return True
    return "float64" in dtypes


def eye_like(xp, n: int, like):
    """Identity of size ``n`` with the dtype and device of ``like``."""
    return xp.eye(n, dtype=like.dtype, device=device_of(like))


def scalar(x) -> float:
    """Python float of a 0-d array (forces evaluation on lazy backends)."""
    return float(x)
