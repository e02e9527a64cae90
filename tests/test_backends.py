"""The same gradient sequence gives the same updates on every backend."""

import contextlib

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


_ARRAY_LIBRARIES = ("torch", "jax", "jaxlib", "cupy", "cupyx", "scipy", "numpy", "array_api_strict")
# NumPy is the host format: checkpoints (.npz) and host copies of device arrays.
_NUMPY_ALLOWED = {"checkpoint.py": "<module>", "_xp.py": "to_numpy"}


def test_core_imports_no_array_library_by_name():
    """shampoo_core holds array-API code only; what one library does differently (fast paths,
    control flow, placement) lives in its module of ``backends`` and is registered with the core."""
    import ast
    import pathlib

    found = []
    for path in sorted(pathlib.Path(sc.__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text())
        scopes = {}
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    scopes.setdefault(id(inner), node.name)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                scope = scopes.get(id(node), "<module>")
                if top in _ARRAY_LIBRARIES and not (top == "numpy" and _NUMPY_ALLOWED.get(path.name) == scope):
                    found.append(f"{path.name}:{node.lineno} ({scope}) imports {name}")
    assert not found, found


def test_numpy_and_torch_fast_paths_load_on_first_use():
    """A NumPy user gets NumPy's fast paths without importing ``backends`` and without torch
    being imported; a torch tensor brings torch's."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np, shampoo_core as sc\n"
        "assert 'backends.numpy_backend' not in sys.modules\n"
        "tx = sc.shampoo(block_size=4, start_preconditioning_step=1, preconditioning_compute_steps=1)\n"
        "p = np.ones((6, 5), np.float32)\n"
        "tx.update(tx.init(p), p, p)\n"
        "from shampoo_core import _xp\n"
        "import backends.numpy_backend as nb\n"
        "assert _xp.fast_path(_xp.namespace(p), 'ema') is nb.ema\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'jax', 'backends')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    # numba's one-pass kernel, where installed, for the layer-grafted preconditioned step, and
    # its loop of BLAS calls for the statistics
    import importlib.util

    fused = ["backends.fused_cpu", "backends.syrk_cpu"] if importlib.util.find_spec("numba") else []
    assert out.strip() == str(sorted(["backends", "backends.numpy_backend", *fused]))
    torch = pytest.importorskip("torch")
    from shampoo_core import _xp

    import backends.torch_backend as tb

    t = torch.ones(3)
    assert _xp.fast_path(_xp.namespace(t), "ema") is tb.ema
    assert _xp.product_takes_scale(_xp.namespace(t)) and not _xp.product_takes_scale(_xp.namespace(np.ones(3)))


def test_registered_fast_path_is_used_or_declines(monkeypatch):
    """A fast path's value is the result; ``NotImplemented`` leaves the arguments to the expression."""
    strict = pytest.importorskip("array_api_strict")
    from shampoo_core import _elementwise, _xp

    old, new = strict.asarray([1.0, 2.0]), strict.asarray([3.0, 6.0])
    xp = _xp.namespace(old)
    assert _xp.fast_path(xp, "ema") is None  # array_api_strict: the expression
    calls = []

    def spy(o, n, beta):
        calls.append(beta)
        return NotImplemented if beta == 0.5 else o

    monkeypatch.setitem(_xp._FAST_PATHS, (xp.__name__, "ema"), spy)
    assert _elementwise.ema(old, new, 0.25) is old  # the fast path's value, even a wrong one
    np.testing.assert_array_equal(np.asarray(_elementwise.ema(old, new, 0.5)), [2.0, 4.0])
    assert calls == [0.25, 0.5]


@pytest.mark.parametrize("options", [{}, {"donate_state": True}, {"graft_type": "rmsprop"}, {"beta1": 0.0},
                                     {"nesterov": True}, {"graft_granularity": "block"}])
def test_torch_fast_paths_keep_cpu_tensors_on_the_cpu_under_a_default_device(options):
    """torch's fast paths allocate their scratch, outputs and norms on their inputs' device, not
    on the default one a ``with torch.device(...)`` context sets (here "meta", where any tensor
    left on it could not meet the CPU ones): the steps are those taken outside the context."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    params = {"w": rng.standard_normal((20, 12)), "b": rng.standard_normal(300)}
    grads = [{k: rng.standard_normal(v.shape) for k, v in params.items()} for _ in range(3)]
    p = {k: torch.from_numpy(v.astype(np.float32)) for k, v in params.items()}

    def run(context):
        tx = sc.shampoo(0.1, block_size=8, start_preconditioning_step=2, **options)
        state, out = tx.init(p), []
        for g in grads:
            with context():
                u, state = tx.update(state, {k: torch.from_numpy(v.astype(np.float32)) for k, v in g.items()}, p)
            assert all(x.device.type == "cpu" for x in u.values())
            out.append(to_np(u))
        return out

    for got, want in zip(run(lambda: torch.device("meta")), run(contextlib.nullcontext)):
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
