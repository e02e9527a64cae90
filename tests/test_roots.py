"""Inverse p-th roots: accuracy scaled by condition number, agreement, and hard inputs."""

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import shampoo_core as sc
from helpers import eps, examples_for, require_float64, spd_with_spectrum, to_np, to_xp

METHODS = ["eigh", "newton"]


def residual(x, a, p):
    """max |Xᵖ A - I| computed in float64."""
    x = to_np(x).astype(np.float64)
    return np.abs(np.linalg.matrix_power(x, p) @ a - np.eye(a.shape[0])).max()


@pytest.mark.parametrize("method", METHODS)
def test_root_residual_bounded_by_condition(xp, method):
    @settings(max_examples=examples_for(xp, settings().max_examples))
    @given(n=st.integers(1, 48), log_kappa=st.floats(0.0, 8.0), p=st.sampled_from([2, 4, 6]),
           seed=st.integers(0, 2**16))
    def check(n, log_kappa, p, seed):
        rng = np.random.default_rng(seed)
        kappa = 10.0**log_kappa
        a, _ = spd_with_spectrum(rng, n, kappa)
        out = sc.inverse_pth_root(to_xp(xp, a), p, epsilon=0.0, method=method, dtype=xp.float64)
        assert out.root.dtype == xp.float64
        # Backward-stable roots lose about log2(κ) bits: allow a few ulps per unit of κ and size.
        tol = 100.0 * n * eps(np.float64) * kappa
        assert residual(out.root, a, p) <= tol
        assert math.isfinite(float(out.error)) and float(out.error) <= 1e-6

    check()


def test_eigh_and_newton_agree(xp):
    @settings(max_examples=examples_for(xp, settings().max_examples))
    @given(n=st.integers(2, 40), log_kappa=st.floats(0.0, 6.0), seed=st.integers(0, 2**16))
    def check(n, log_kappa, seed):
        rng = np.random.default_rng(seed)
        kappa = 10.0**log_kappa
        a, _ = spd_with_spectrum(rng, n, kappa)
        r1 = to_np(sc.inverse_pth_root(to_xp(xp, a), 4, epsilon=0.0, method="eigh").root)
        r2 = to_np(sc.inverse_pth_root(to_xp(xp, a), 4, epsilon=0.0, method="newton").root)
        # The root's relative condition number is about κ/p.
        tol = 100.0 * n * eps(np.float64) * kappa
        assert np.abs(r1 - r2).max() <= tol * np.abs(r1).max()

    check()


@pytest.mark.parametrize("method", METHODS)
def test_float32_input_computed_in_float64(xp, method):
    require_float64(xp)
    rng = np.random.default_rng(0)
    a, _ = spd_with_spectrum(rng, 32, 1e5, dtype=np.float32)
    out = sc.inverse_pth_root(to_xp(xp, a), 4, epsilon=0.0, method=method, dtype=xp.float64)
    assert out.root.dtype == xp.float32
    # Only the final cast to float32 loses accuracy: a few float32 ulps scaled by κ^(1/4).
    exact = spd_power(a.astype(np.float64), -0.25)
    assert np.abs(to_np(out.root) - exact).max() <= 20 * eps(np.float32) * np.abs(exact).max()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_eigh_root_is_an_exactly_symmetric_gram_product(dtype):
    # B·Bᵀ with B = Q·diag(λ^(-1/2p)): NumPy's matmul takes it as BLAS's syrk, which computes one
    # triangle and mirrors it; Q·diag(λ^(-1/p))·Qᵀ by gemm rounds the two triangles apart
    rng = np.random.default_rng(3)
    a, _ = spd_with_spectrum(rng, 96, 1e6, dtype=dtype)
    out = sc.inverse_pth_root(a, 4, epsilon=1e-12, relative_epsilon=False, method="eigh")
    root = np.asarray(out.root)
    np.testing.assert_array_equal(root, root.T)
    # the same eigenpairs formed as Q·diag·Qᵀ: they differ by the products' rounding alone
    w, q = np.linalg.eigh((a + a.T) * dtype(0.5))
    expected = (q * (np.clip(w, 0.0, None) + 1e-12) ** -0.25) @ q.T
    assert np.abs(root - expected).max() <= 4 * 96 * eps(dtype) * np.abs(expected).max()


def spd_power(a, e):
    w, q = np.linalg.eigh(a)
    return (q * w**e) @ q.T


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_extreme_condition_number_is_finite(xp, method, dtype):
    rng = np.random.default_rng(3)
    a, _ = spd_with_spectrum(rng, 64, 1e12, dtype=np.dtype(dtype))
    out = sc.inverse_pth_root(to_xp(xp, a), 4, epsilon=1e-12, method=method, dtype=getattr(xp, dtype))
    assert np.all(np.isfinite(to_np(out.root)))


@pytest.mark.parametrize("method", METHODS)
def test_one_by_one(xp, method):
    out = sc.inverse_pth_root(to_xp(xp, np.array([[16.0]])), 4, epsilon=0.0, method=method)
    assert abs(to_np(out.root)[0, 0] - 0.5) <= 1e3 * eps(np.float64)


@pytest.mark.parametrize("method", METHODS)
def test_all_zero_statistic_uses_absolute_ridge(xp, method):
    out = sc.inverse_pth_root(to_xp(xp, np.zeros((5, 5))), 4, epsilon=1e-4, method=method)
    np.testing.assert_allclose(to_np(out.root), np.eye(5) * 1e-4**-0.25, rtol=1e-8)
    assert out.lambda_max == 0.0


@pytest.mark.parametrize("method", METHODS)
def test_rank_deficient(xp, method):
    rng = np.random.default_rng(5)
    a, lam = spd_with_spectrum(rng, 20, 1e3, rank=4)
    eps_rel = 1e-3
    out = sc.inverse_pth_root(to_xp(xp, a), 4, epsilon=eps_rel, method=method, dtype=xp.float64)
    ridge = eps_rel * lam.max()
    exact = spd_power(a + ridge * np.eye(20), -0.25)
    # λmax comes from power iteration for Newton (relative tolerance 1e-6 on λmax).
    assert np.abs(to_np(out.root) - exact).max() <= 1e-5 * np.abs(exact).max()
    assert abs(out.lambda_max - lam.max()) <= 1e-5 * lam.max()


def test_relative_epsilon_scales_with_lambda_max(xp):
    a = np.diag([1e6, 0.0])
    out = sc.inverse_pth_root(to_xp(xp, a), 2, epsilon=1e-6, relative_epsilon=True)
    np.testing.assert_allclose(np.diag(to_np(out.root)), [(1e6 + 1.0) ** -0.5, 1.0], rtol=1e-10)


def test_power_iteration_relative_tolerance():
    import array_api_compat.numpy as xnp
    from shampoo_core.roots import max_eigenvalue

    # A tiny statistic: an absolute tolerance would stop long before λmax is found.
    a = np.diag(np.linspace(1e-9, 7e-9, 30))
    a = a + 6.9e-9 * np.ones((30, 30)) / 30
    assert abs(max_eigenvalue(xnp, a) - np.linalg.eigvalsh(a).max()) <= 1e-5 * np.linalg.eigvalsh(a).max()


@pytest.mark.parametrize("n, ratio", [(2, 0.55), (8, 0.5), (64, 0.9)])
def test_power_iteration_does_not_stall_at_a_lower_eigenvalue(xp, n, ratio):
    """A start vector nearly orthogonal to the top eigenvector: the Rayleigh quotient first sits at
    λ₂ and barely moves, which a stopping rule on its change alone takes for convergence. Found by
    tests/test_reference.py on a 2×2 statistic: λmax 10.78 (its largest diagonal entry) for 11.56."""
    from shampoo_core import _xp
    from shampoo_core.roots import max_eigenvalue

    require_float64(xp)
    h = np.array([[7.14944869, -1.85476154], [-1.85476154, 10.78098548]])
    if n > 2:
        # The same fixed start vector the iteration uses, and a top eigenvector at 1e-5 to it.
        start = 1.0 + 0.5 * np.cos(np.arange(n) * 2.399963)
        start /= np.linalg.norm(start)
        rng = np.random.default_rng(n)
        q, _ = np.linalg.qr(np.column_stack([start, rng.standard_normal((n, n - 1))]))
        top = q[:, 1] + 1e-5 * q[:, 0]
        q[:, 1] = top / np.linalg.norm(top)
        q, _ = np.linalg.qr(q[:, [1, 0] + list(range(2, n))])
        lam = np.concatenate([[1.0, ratio], np.linspace(ratio / 2, 1e-3, n - 2)])
        h = (q * lam) @ q.T
    exact = np.linalg.eigvalsh(h).max()
    got = max_eigenvalue(_xp.namespace(to_xp(xp, h)), to_xp(xp, h))
    assert abs(got - exact) <= 1e-5 * exact


def test_non_finite_input_reports_failure(xp):
    a = np.eye(3)
    a[0, 1] = a[1, 0] = np.nan
    for method in METHODS:
        out = sc.inverse_pth_root(to_xp(xp, a), 4, method=method)
        assert out.error == math.inf


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(p=0), "p must be > 0"),
        (dict(p=4, epsilon=-1.0), "epsilon must be >= 0"),
        (dict(p=4, method="svd"), "method must be"),
        (dict(p=2.5, method="newton"), "integer"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sc.inverse_pth_root(np.eye(3), **kwargs)


def test_non_square_rejected():
    with pytest.raises(ValueError, match="square"):
        sc.inverse_pth_root(np.ones((2, 3)), 4)


def test_auto_follows_the_cost_model(monkeypatch):
    from shampoo_core import roots as roots_module

    model = sc.CostModel({"array_api_compat.numpy": {"cpu": {"float64": [[8, {"eigh": 2.0, "newton": 1.0}],
                                                                         [64, {"eigh": 1.0, "newton": 3.0}]]}}})
    assert model.crossovers("array_api_compat.numpy", "float64") == [(8, "newton"), (64, "eigh")]
    assert model.choose("array_api_compat.torch", 8, "float64") == "eigh"  # nothing measured
    used = []
    real = roots_module.inverse_pth_root

    def spy(a, p, **kw):
        used.append((a.shape[0], kw["method"]))
        return real(a, p, **kw)

    monkeypatch.setattr(roots_module, "inverse_pth_root", spy)
    tx = sc.shampoo(0.1, root_method="auto", cost_model=model, block_size=64, merge_small_dims=False,
                    start_preconditioning_step=1)
    params = np.zeros((6, 60))
    state = tx.init(params)
    tx.update(state, np.ones((6, 60)), params)
    assert sorted(used) == [(6, "newton"), (60, "eigh")]


def test_cost_model_is_keyed_by_device():
    """A CPU measurement says nothing about a GPU: each device kind has its own table."""
    cpu = [[128, {"eigh": 1.0, "newton": 9.0}], [1024, {"eigh": 100.0, "newton": 800.0}]]
    gpu = [[128, {"eigh": 5.0, "newton": 1.0}], [1024, {"eigh": 20.0, "newton": 30.0}]]
    model = sc.CostModel({"array_api_compat.torch": {"cpu": {"float64": cpu}, "cuda": {"float64": gpu}}})
    torch_ns = "array_api_compat.torch"
    assert model.choose(torch_ns, 128, "float64") == "eigh"
    assert model.choose(torch_ns, 128, "float64", "cuda") == "newton"
    assert model.crossovers(torch_ns, "float64", "cuda") == [(128, "newton"), (1024, "eigh")]
    assert model.choose(torch_ns, 128, "float64", "mps") == "eigh"  # nothing measured there
    assert model.choose(torch_ns, 128, "float32", "cuda") == "eigh"
    assert sorted(model.entries()) == [(torch_ns, "cpu", "float64"), (torch_ns, "cuda", "float64")]


def test_auto_uses_the_table_of_the_statistics_device(monkeypatch, xp):
    """``root_method="auto"`` looks up the device kind of each statistic, not only its library."""
    from shampoo_core import _xp
    from shampoo_core import roots as roots_module

    a = to_xp(xp, np.ones((4, 6), dtype=np.float32))
    kind = _xp.device_kind(a)
    ns = _xp.namespace(a).__name__
    float64 = _xp.supports_float64(_xp.namespace(a), _xp.device_of(a))
    dtype = "float64" if float64 else "float32"
    other = "cpu" if kind != "cpu" else "cuda"
    model = sc.CostModel({ns: {kind: {dtype: [[4, {"newton": 1.0, "eigh": 2.0}]]},
                               other: {dtype: [[4, {"newton": 2.0, "eigh": 1.0}]]}}})
    used = []
    real = roots_module.inverse_pth_root

    def spy(h, p, **kw):
        used.append(kw["method"])
        return real(h, p, **kw)

    monkeypatch.setattr(roots_module, "inverse_pth_root", spy)
    tx = sc.shampoo(0.1, root_method="auto", cost_model=model, start_preconditioning_step=1,
                    merge_small_dims=False)
    tx.update(tx.init(a), a, a)
    assert used == ["newton", "newton"]


def test_cost_model_round_trip_and_merge(tmp_path):
    model = sc.CostModel({"jax.numpy": {"gpu": {"float32": [[128, {"eigh": 0.1}]]}}})
    model.save(tmp_path / "m.json")
    assert sc.CostModel.load(tmp_path / "m.json") == model
    cpu = sc.CostModel({"jax.numpy": {"cpu": {"float32": [[128, {"newton": 0.2}]]}},
                        "array_api_compat.numpy": {"cpu": {"float64": [[64, {"eigh": 0.3}]]}}})
    both = model.merged(cpu)
    assert both.choose("jax.numpy", 128, "float32", "gpu") == "eigh"
    assert both.choose("jax.numpy", 128, "float32", "cpu") == "newton"
    assert len(both.entries()) == 3 and len(model.entries()) == 1  # merged copies; the operands are unchanged
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(ValueError, match="not a shampoo_core cost model"):
        sc.CostModel.load(tmp_path / "bad.json")
    (tmp_path / "v1.json").write_text('{"format_version": 1, "timings": {"jax.numpy": {"float32": []}}}')
    with pytest.raises(ValueError, match="format_version 1.*measure it again"):
        sc.CostModel.load(tmp_path / "v1.json")


@pytest.mark.parametrize(
    "timings, match",
    [
        ([], "expected a dict"),
        ({"jax.numpy": {"float32": [[128, {"eigh": 0.1}]]}}, r"\['jax.numpy'\]\['float32'\].*no device level"),
        ({"np": {"cpu": {"float64": [[64, {"eigh": 1.0}], [32, {"eigh": 1.0}]]}}}, r"\[1\].*ascending"),
        ({"np": {"cpu": {"float64": [[64, {"qr": 1.0}]]}}}, "unknown method 'qr'"),
        ({"np": {"cpu": {"float64": [[64, {"eigh": float("nan")}]]}}}, "finite and >= 0"),
        ({"np": {"cpu": {"float64": [64, {"eigh": 1.0}]}}}, r"\[0\]: expected \[n"),
    ],
)
def test_cost_model_rejects_malformed_timings(timings, match):
    with pytest.raises(ValueError, match=match):
        sc.CostModel(timings)
