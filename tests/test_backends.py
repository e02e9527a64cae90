"""The same gradient sequence gives the same updates on every backend."""

import numpy as np
import pytest

import shampoo_core as sc
from helpers import to_np, to_xp

SHAPES = {"w": (9, 6), "conv": (4, 3, 2, 2), "b": (6,), "s": ()}
EPSILON = 1e-3


def run(xp, dtype, root_method):
    rng = np.random.default_rng(7)
    params = {k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}
    grads = [{k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()} for _ in range(6)]
    tx = sc.shampoo(0.1, block_size=4, epsilon=EPSILON, start_preconditioning_step=2,
                    preconditioning_compute_steps=2, graft_type="adam", beta2=0.99, root_method=root_method,
                    nonfinite="skip")
    p = to_xp(xp, params)
    state = tx.init(p)
    out = []
    for g in grads:
        u, state = tx.update(state, to_xp(xp, g), p)
        p = sc.apply_updates(p, u)
        out.append(to_np(u))
    return out


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("root_method", ["eigh", "newton"])
def test_updates_agree_with_numpy(xp, dtype, root_method):
    import array_api_compat.numpy as xnp

    reference = run(xnp, dtype, root_method)
    ours = run(xp, dtype, root_method)
    # Statistics rounding (~block_size·eps relative to λmax) is amplified by at most 1/epsilon in
    # the roots; the updates are O(lr).
    tol = 10 * 4 * float(np.finfo(dtype).eps) / EPSILON
    if root_method == "newton":
        tol = max(tol, 1e-5)  # λmax (hence the ridge) comes from power iteration to 1e-6 relative
    for a, b in zip(ours, reference):
        for k in SHAPES:
            assert a[k].dtype == np.dtype(dtype)
            np.testing.assert_allclose(a[k], b[k], rtol=tol, atol=tol * 0.1)


class _DeviceOnlyArray:
    """An array whose DLPack export refuses the host (as a device array of an older library does)."""

    def __init__(self, data):
        self._data = data

    def __dlpack__(self, **kwargs):
        raise BufferError("cannot export to the CPU through DLPack")

    def __dlpack_device__(self):
        return (2, 0)  # kDLCUDA

    def to_device(self, device, stream=None):
        assert device == "cpu"
        return self._data


def test_to_numpy_copies_device_arrays_to_the_host(xp):
    """Host copies (checkpoints, host roots) of arrays that DLPack cannot export to the CPU."""
    from shampoo_core import _xp

    a = np.arange(6.0).reshape(2, 3)
    host = _xp.to_numpy(_DeviceOnlyArray(a))
    assert isinstance(host, np.ndarray) and host.dtype == np.float64
    np.testing.assert_array_equal(host, a)
    assert not np.shares_memory(host, a)  # a copy: later changes on the device cannot reach it
    x = to_xp(xp, a)
    np.testing.assert_array_equal(_xp.to_numpy(x), a)


_DEVICE_KINDS = {"numpy": "cpu", "array_api_strict": "cpu", "array_api_strict:device1": "cpu",
                 "array_api_strict:no_float64": "cpu", "torch": "cpu", "jax": "cpu", "torch:cuda": "cuda",
                 "cupy": "cuda"}


def test_device_kind(xp, request):
    """The device kind keys the cost model of ``root_method="auto"``: a CPU table must not be
    used for a GPU statistic of the same library."""
    from shampoo_core import _xp

    from conftest import BACKENDS

    assert set(_DEVICE_KINDS) == set(BACKENDS)
    name = request.node.callspec.params["xp"]
    expected = _DEVICE_KINDS[name]
    if name == "jax":
        import jax

        expected = jax.default_backend()  # eager JAX arrays live on the default device
    assert _xp.device_kind(to_xp(xp, np.ones(3, dtype=np.float32))) == expected
