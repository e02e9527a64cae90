"""Shared fixtures: one ``xp`` fixture over every array backend that is installed.

The fixture has module scope so hypothesis' ``@given`` can use it (a function-scoped
parametrized fixture fails hypothesis' health check).
"""

from __future__ import annotations

import importlib
import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=40,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors],
)
settings.register_profile("dev", deadline=None, max_examples=20)
settings.register_profile("thorough", deadline=None, max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def _numpy():
    import array_api_compat.numpy as xp

    return xp


def _strict():
    return importlib.import_module("array_api_strict")


def _torch():
    importlib.import_module("torch")
    import array_api_compat.torch as xp

    return xp


def _jax():
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as xp

    return xp


def _torch_cuda():
    torch = importlib.import_module("torch")
    if not torch.cuda.is_available():
        raise ImportError("no CUDA device")
    import array_api_compat.torch as xp

    return DeviceNamespace(xp, torch.device("cuda"))


def _cupy():
    cupy = importlib.import_module("cupy")
    if cupy.cuda.runtime.getDeviceCount() < 1:
        raise ImportError("no CUDA device")
    import array_api_compat.cupy as xp

    return xp


class DeviceNamespace:
    """A namespace whose test arrays are created on ``device`` (see ``helpers.to_xp``).

    The kernels never see this object: they take the namespace from the arrays, so any array
    they create without ``device=`` lands on the default device and array_api_strict refuses to
    mix it with the test's arrays.
    """

    def __init__(self, module, device):
        self._module = module
        self.test_device = device
        self.__name__ = f"{module.__name__}[{device}]"

    def __getattr__(self, name):
        return getattr(self._module, name)


def _strict_device(name):
    def make():
        strict = _strict()
        return DeviceNamespace(strict, strict.Device(name))

    return make


BACKENDS = {
    "numpy": _numpy,
    "array_api_strict": _strict,
    "array_api_strict:device1": _strict_device("device1"),
    "array_api_strict:no_float64": _strict_device("no_float64"),
    "torch": _torch,
    "jax": _jax,
    "torch:cuda": _torch_cuda,
    "cupy": _cupy,
}


@pytest.fixture(scope="module", params=list(BACKENDS))
def xp(request):
    """The array-API namespace of one backend; skipped with the reason when unavailable."""
    try:
        return BACKENDS[request.param]()
    except Exception as err:  # ImportError, or CUDA runtime errors with no GPU present
        pytest.skip(f"{request.param} unavailable: {type(err).__name__}: {err}")
