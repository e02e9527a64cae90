"""Conversions between NumPy (where test data is made) and the backend under test."""

from __future__ import annotations

import numpy as np


def to_xp(xp, a, dtype=None):
    """NumPy array (or tree of them) -> backend array with the same dtype."""
    if isinstance(a, dict):
        return {k: to_xp(xp, v, dtype) for k, v in a.items()}
    if isinstance(a, (list, tuple)):
        return type(a)(to_xp(xp, v, dtype) for v in a)
    a = np.asarray(a) if dtype is None else np.asarray(a, dtype=dtype)
    device = getattr(xp, "test_device", None)
    if device is not None:
        supported = xp.__array_namespace_info__().dtypes(device=device)
        if a.dtype.name not in supported:
            import pytest

            pytest.skip(f"{a.dtype.name} is not available on {device}")
        return xp.asarray(a, dtype=getattr(xp, a.dtype.name), device=device)
    return xp.asarray(a, dtype=getattr(xp, a.dtype.name))


def to_np(x):
    """Backend array (or tree) -> NumPy, via DLPack where possible."""
    if isinstance(x, dict):
        return {k: to_np(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_np(v) for v in x)
    if hasattr(x, "get") and type(x).__module__.startswith("cupy"):
        return x.get()
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    try:
        return np.from_dlpack(x)
    except (TypeError, AttributeError, BufferError, RuntimeError):
        return np.asarray(x)


def eps(dtype) -> float:
    return float(np.finfo(np.dtype(dtype)).eps)


def spd_with_spectrum(rng, n: int, kappa: float, dtype=np.float64, rank: int | None = None):
    """Symmetric PSD matrix with eigenvalues log-spaced in [1/kappa, 1] (zeros past ``rank``)."""
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.logspace(0.0, -np.log10(kappa), n)
    if rank is not None:
        lam[rank:] = 0.0
    return ((q * lam) @ q.T).astype(dtype), lam


def examples_for(xp, n: int) -> int:
    """Hypothesis budget for a backend: JAX compiles a kernel per new shape, so it gets fewer."""
    name = getattr(xp, "__name__", "")
    return max(3, n // 6) if name.startswith("jax") else n


def require_float64(xp):
    """Skip on a device that has no float64 (e.g. array_api_strict's "no_float64")."""
    device = getattr(xp, "test_device", None)
    if device is not None and "float64" not in xp.__array_namespace_info__().dtypes(device=device):
        import pytest

        pytest.skip(f"float64 is not available on {device}")


def train(step, params, state, steps: int):
    """``steps`` calls of ``step(params, state) -> (params, state, loss)``; losses as floats."""
    losses = []
    for _ in range(steps):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    return params, state, losses


def compiled_copies(fn, *args, donate_argnums=()) -> int:
    """Array copies in the compiled HLO of ``jax.jit(fn, donate_argnums=...)`` on ``args``: what
    XLA adds where a donated buffer cannot be written in place."""
    import re

    import jax

    text = jax.jit(fn, donate_argnums=donate_argnums).lower(*args).compile().as_text()
    entry = text[text.index("ENTRY"):]
    return sum(1 for line in entry.splitlines() if re.search(r"= \S+\[[^\]]+\]\S* copy\(", line))


class XlaCompiles:
    """Counts JAX's XLA compilations while active (``jax.monitoring``'s backend-compile events)."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __enter__(self):
        import jax.monitoring

        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def _listen(self, name, duration, **kwargs):
        self.count += name == self.EVENT

    def __exit__(self, *exc):
        import jax.monitoring

        jax.monitoring.unregister_event_duration_listener(self._listen)
