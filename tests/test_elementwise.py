"""The elementwise averages and divisions of ``_elementwise`` and the stacked statistics average of
``_xp.scaled_plus_product``: whatever pass the library takes (torch's fused kernels, NumPy's
arithmetic in place), the value is the expression's, in a new array, with the inputs untouched."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import eps, to_np, to_xp
from shampoo_core import _elementwise, _xp

SHAPES = [(), (1,), (7,), (33, 17), (4, 3, 2, 2)]


def _inputs(shape, seed, dtype, positive=False):
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal(shape), rng.standard_normal(shape)
    if positive:
        a, b = np.abs(a), np.abs(b)
    return np.asarray(a, dtype=dtype), np.asarray(b, dtype=dtype)


def _check_new_and_untouched(xp, out, inputs, copies, like):
    assert out.shape == like.shape and out.dtype == like.dtype
    for x, before in zip(inputs, copies):
        assert x is not out
        np.testing.assert_array_equal(to_np(x), before)


@pytest.mark.parametrize("shape", SHAPES)
@given(beta=st.sampled_from([0.0, 0.1, 0.5, 0.9, 0.999, 1.0]), seed=st.integers(0, 2**16))
def test_ema_is_the_running_average(xp, shape, beta, seed):
    old, new = _inputs(shape, seed, np.float32)
    xo, xn = to_xp(xp, old), to_xp(xp, new)
    out = _elementwise.ema(xo, xn, beta)
    _check_new_and_untouched(xp, out, (xo, xn), (old, new), xo)
    exact = beta * old.astype(np.float64) + (1.0 - beta) * new.astype(np.float64)
    # β and 1 - β round to float32, and the interpolation rounds two or three times more, each
    # within u of max(|old|, |new|).
    bound = 6 * eps("float32") * np.maximum(np.abs(old), np.abs(new))
    assert np.all(np.abs(to_np(out) - exact) <= bound)


@pytest.mark.parametrize("beta, expected", [(0.0, "new"), (1.0, "old")])
def test_ema_is_exact_at_the_ends(xp, beta, expected):
    old, new = _inputs((50,), 3, np.float32)
    out = to_np(_elementwise.ema(to_xp(xp, old), to_xp(xp, new), beta))
    np.testing.assert_array_equal(out, {"old": old, "new": new}[expected])


def test_ema_from_zero_keeps_its_relative_accuracy(xp):
    """The first step of Adam's v from zero state: (1 - β)·g² with β = 0.999. Interpolating the
    wrong way round, g² + β(0 - g²), cancels 3 of float32's 7 digits."""
    g2 = np.linspace(0.5, 4.0, 64, dtype=np.float32)
    out = to_np(_elementwise.ema(to_xp(xp, np.zeros_like(g2)), to_xp(xp, g2), 0.999))
    exact = 0.001 * g2.astype(np.float64)  # (1 - 0.999) rounds to float32 once, within 2u
    np.testing.assert_allclose(out, exact, rtol=4 * eps("float32"))


@pytest.mark.parametrize("shape", SHAPES)
@given(seed=st.integers(0, 2**16))
def test_plus_square_is_adagrads_sum(xp, shape, seed):
    acc, g = _inputs(shape, seed, np.float32)
    acc = np.abs(acc)
    xa, xg = to_xp(xp, acc), to_xp(xp, g)
    out = _elementwise.plus_square(xa, xg)
    _check_new_and_untouched(xp, out, (xa, xg), (acc, g), xa)
    exact = acc.astype(np.float64) + g.astype(np.float64) ** 2
    assert np.all(np.abs(to_np(out) - exact) <= 2 * eps("float32") * exact)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("epsilon_kind", ["float", "array"])
@given(seed=st.integers(0, 2**16), epsilon=st.sampled_from([0.0, 1e-8, 0.3]))
def test_over_root_plus_is_the_diagonal_step(xp, shape, epsilon_kind, seed, epsilon):
    f, acc = _inputs(shape, seed, np.float32, positive=False)
    acc = np.abs(acc) + np.float32(0.01)
    xf, xa = to_xp(xp, f), to_xp(xp, acc)
    e = epsilon if epsilon_kind == "float" else to_xp(xp, np.asarray(epsilon, dtype=np.float32))
    out = _elementwise.over_root_plus(xp, xf, xa, e)
    _check_new_and_untouched(xp, out, (xf, xa), (f, acc), xf)
    exact = f.astype(np.float64) / (np.sqrt(acc.astype(np.float64)) + np.float64(np.float32(epsilon)))
    assert np.all(np.abs(to_np(out) - exact) <= 5 * eps("float32") * np.abs(exact))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("epsilon_kind", ["float", "array"])
@given(seed=st.integers(0, 2**16), epsilon=st.sampled_from([0.0, 1e-8, 0.3]))
def test_norm_over_root_plus_is_the_norm_of_the_diagonal_step(xp, shape, epsilon_kind, seed, epsilon):
    f, acc = _inputs(shape, seed, np.float32)
    acc = np.abs(acc) + np.float32(0.01)
    xf, xa = to_xp(xp, f), to_xp(xp, acc)
    e = epsilon if epsilon_kind == "float" else to_xp(xp, np.asarray(epsilon, dtype=np.float32))
    out = _elementwise.norm_over_root_plus(xp, xf, xa, e)
    assert out.shape == () and out.dtype == xf.dtype
    _check_new_and_untouched(xp, out, (xf, xa), (f, acc), out)
    exact = np.linalg.norm(f.astype(np.float64) / (np.sqrt(acc.astype(np.float64)) + np.float64(np.float32(epsilon))))
    # each quotient within 5u, the sum of n squares within (n - 1)u, the root within u
    assert abs(float(to_np(out)) - exact) <= (7 + f.size / 2) * eps("float32") * exact


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("size", [1, 100, 1050])
def test_norm_over_root_plus_reads_pieces_without_writing_the_quotient(backend, size, monkeypatch):
    """NumPy's and torch's fast paths never form the whole quotient, and every piece counts, the
    last, ragged one included (100 entries a piece here)."""
    lib = pytest.importorskip(backend)
    module = pytest.importorskip(f"backends.{backend}_backend")
    monkeypatch.setattr(module, "PIECE_ENTRIES", 100)
    monkeypatch.setattr(_elementwise, "over_root_plus", lambda *a: pytest.fail("the quotient was written"))
    f, acc = _inputs((size,), 5, np.float32)
    acc = np.abs(acc) + np.float32(0.01)
    out = _elementwise.norm_over_root_plus(_xp.namespace(lib.asarray(f)), lib.asarray(f), lib.asarray(acc), 1e-8)
    exact = np.linalg.norm(f.astype(np.float64) / (np.sqrt(acc.astype(np.float64)) + np.float64(np.float32(1e-8))))
    assert abs(float(out) - exact) <= (7 + 50) * eps("float32") * exact


def test_torch_norm_is_the_accurate_dot():
    """``torch.linalg.vector_norm`` of 4M float32 Gaussian entries is 8e-5 off; the norm of a
    layer's update sets the grafted step size."""
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).standard_normal(1 << 22).astype(np.float32)
    exact = np.linalg.norm(x.astype(np.float64))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as bench runs it; MKL's one-thread dot over all of x was 2.8e-5 off on an AMD CPU
    try:
        for shaped in (x, x.reshape(1024, 4096)):
            out = _xp.norm(_xp.namespace(torch.from_numpy(shaped)), torch.from_numpy(shaped))
            assert abs(float(out) - exact) <= 2e-5 * exact
    finally:
        torch.set_num_threads(threads)
    t = torch.from_numpy(x.reshape(1024, 4096)).T  # not contiguous: torch's own norm, as accurate as it is
    assert abs(float(_xp.norm(_xp.namespace(t), t)) - exact) <= 2e-4 * exact


def test_torch_division_that_autograd_records_is_differentiable():
    """A result autograd needs for its backward pass must not be overwritten."""
    torch = pytest.importorskip("torch")
    f = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    acc = torch.tensor([4.0, 1.0, 9.0], requires_grad=True)
    out = _elementwise.over_root_plus(torch, f, acc, 1.0)
    out.sum().backward()
    torch.testing.assert_close(f.grad, 1.0 / (acc.detach().sqrt() + 1.0))
    torch.testing.assert_close(acc.grad, -f.detach() / (acc.detach().sqrt() + 1.0) ** 2 / (2 * acc.detach().sqrt()))


@pytest.mark.parametrize("n, d", [(1, 4), (7, 8), (9, 128), (3, 300)])
@pytest.mark.parametrize("beta", [0.0, 0.999, 1.0])
@pytest.mark.parametrize("alpha", [1.0, 1e-3])
def test_stacked_average_of_products(xp, n, d, beta, alpha):
    """β·C + α·A·B for stacks whose length is not a multiple of the blocks NumPy adds at a time
    (four of 128×128), with the bits of the plain expression in float32 on NumPy."""
    rng = np.random.default_rng(n * d)
    a = rng.standard_normal((n, d, d)).astype(np.float32)
    c = rng.standard_normal((n, d, d)).astype(np.float32)
    xa, xc = to_xp(xp, a), to_xp(xp, c)
    out = _xp.scaled_plus_product(xp, xc, xa, xa.mT, beta, alpha)
    _check_new_and_untouched(xp, out, (xa, xc), (a, c), xc)
    product = a @ a.transpose(0, 2, 1)
    plain = (c if beta == 1.0 else np.float32(beta) * c) + (product if alpha == 1.0 else np.float32(alpha) * product)
    if type(xa) is np.ndarray:
        np.testing.assert_array_equal(to_np(out), plain)
    exact = beta * c.astype(np.float64) + alpha * (a.astype(np.float64) @ a.transpose(0, 2, 1).astype(np.float64))
    scale = np.abs(c) + alpha * (np.abs(a).astype(np.float64) @ np.abs(a).transpose(0, 2, 1))
    # d + 2 roundings of the average, one more for a product scaled by α != 1
    assert np.all(np.abs(to_np(out) - exact) <= (d + 2 + (alpha != 1.0)) * eps("float32") * scale)


@pytest.mark.parametrize("alpha", [1.0, 0.25])
def test_matrix_average_of_products(xp, alpha):
    """The 2-D case (torch's ``addmm``), with α applied."""
    rng = np.random.default_rng(5)
    a = rng.standard_normal((6, 9)).astype(np.float32)
    c = rng.standard_normal((6, 6)).astype(np.float32)
    out = to_np(_xp.scaled_plus_product(xp, to_xp(xp, c), to_xp(xp, a), to_xp(xp, a).mT, 0.5, alpha))
    exact = 0.5 * c.astype(np.float64) + alpha * (a.astype(np.float64) @ a.T.astype(np.float64))
    scale = np.abs(c) + alpha * (np.abs(a).astype(np.float64) @ np.abs(a).T)
    assert np.all(np.abs(out - exact) <= 12 * eps("float32") * scale)


def test_product_scale_is_free_only_on_torch(xp):
    x = to_xp(xp, np.zeros(2, dtype=np.float32))
    assert _xp.product_takes_scale(_xp.namespace(x)) == type(x).__module__.startswith("torch")


@pytest.mark.parametrize("scale_kind", ["float", "array"])
@pytest.mark.parametrize("shape, axes", [((6, 5), (1, 0)), ((2, 3, 4, 5), (0, 2, 1, 3)), ((7,), (0,))])
def test_scaled_copy_reorders_and_scales_in_one_new_array(xp, scale_kind, shape, axes):
    """A permuted view times a scalar: the expression's values and dtype, in a new array, and
    in the view's row-major order on NumPy and torch (so a reshape after it copies nothing)."""
    x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) - 3.5
    xx = to_xp(xp, x)
    view = xp.permute_dims(xx, axes)
    scale = 0.37 if scale_kind == "float" else to_xp(xp, np.asarray(0.37, dtype=np.float32))
    out = _elementwise.scaled_copy(view, scale)
    expected = view * scale
    assert out.dtype == expected.dtype and tuple(out.shape) == tuple(expected.shape)
    np.testing.assert_array_equal(to_np(out), to_np(expected))
    np.testing.assert_array_equal(to_np(xx), x)
    if isinstance(out, np.ndarray):
        assert out.flags.c_contiguous
    if type(out).__module__.startswith("torch"):
        assert out.is_contiguous()


def test_scaled_copy_keeps_numpys_type_promotion():
    """A float64 0-d scale promotes a float32 array, as ``x * scale`` does: no silent
    narrowing into an output of the array's dtype."""
    x = np.ones((3, 4), dtype=np.float32).T
    out = _elementwise.scaled_copy(x, np.asarray(1.0 + 2.0**-40))
    assert out.dtype == np.float64 and out[0, 0] == 1.0 + 2.0**-40


def test_torch_scaled_copy_that_autograd_records_is_differentiable():
    torch = pytest.importorskip("torch")
    x = torch.ones((3, 4), requires_grad=True)
    out = _elementwise.scaled_copy(x.mT, 2.0)
    out.sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3, 4), 2.0))


@pytest.mark.parametrize("beta, alpha", [(0.999, 1e-3), (1.0, 1.0), (0.0, 1.0)])
@pytest.mark.parametrize("donate", [False, True])
def test_numpy_average_of_products_on_a_grid_of_strided_blocks(beta, alpha, donate):
    """NumPy's pieces over a grid of blocks read where they lie (two batch axes, each block's rows
    a parameter's row apart; a row of six 128×128 blocks, added four at a time): the plain
    expression's bits, as a new array or written into C."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2 * 128, 6 * 128)).astype(np.float32)
    grid = x.reshape(2, 128, 6, 128).transpose(0, 2, 1, 3)
    c = rng.standard_normal((2, 6, 128, 128)).astype(np.float32)
    product = grid @ grid.mT
    plain = (c if beta == 1.0 else np.float32(beta) * c) + (product if alpha == 1.0 else np.float32(alpha) * product)
    given = c.copy()
    out = _xp.scaled_plus_product(_xp.namespace(given), given, grid, grid.mT, beta, alpha, donate)
    np.testing.assert_array_equal(out, plain)
    assert (out is given) == donate
    if not donate:
        np.testing.assert_array_equal(given, c)


def _symmetric(rng, shape, dtype):
    x = rng.standard_normal(shape)
    return (x + np.swapaxes(x, -1, -2)).astype(dtype)


def _gram_operands_of_every_layout(rng, dtype):
    """``(name, c, a)``: the blocks a NumPy step hands to ``_xp.gram_average``."""
    x = rng.standard_normal((2 * 128, 6 * 128)).astype(dtype)
    grid = x.reshape(2, 128, 6, 128).transpose(0, 2, 1, 3)  # blocks where they lie, rows 768 apart
    stack = rng.standard_normal((3, 8, 20)).astype(dtype)  # cut blocks
    vectors = rng.standard_normal((5, 7)).astype(dtype)  # full-matrix AdaGrad's outer products
    return [("grid, G Gᵀ", _symmetric(rng, (2, 6, 128, 128), dtype), grid),
            ("grid, Gᵀ G", _symmetric(rng, (2, 6, 128, 128), dtype), grid.swapaxes(-1, -2)),
            ("stack, G Gᵀ", _symmetric(rng, (3, 8, 8), dtype), stack),
            ("stack, Gᵀ G", _symmetric(rng, (3, 20, 20), dtype), stack.swapaxes(-1, -2)),
            ("outer products", _symmetric(rng, (5, 7, 7), dtype), vectors[:, :, None])]


def _large_gram_operands(rng, dtype):
    """``(name, c, a)``: blocks whose statistics torch's step gives to ``syrk``
    (``backends.torch_backend.syrk_pays``)."""
    x = rng.standard_normal((2 * 256, 3 * 256)).astype(dtype)
    grid = x.reshape(2, 256, 3, 256).transpose(0, 2, 1, 3)
    wide = rng.standard_normal((3, 128, 300)).astype(dtype)
    tall = rng.standard_normal((3, 200, 160)).astype(dtype)
    return [("grid, G Gᵀ", _symmetric(rng, (2, 3, 256, 256), dtype), grid),
            ("grid, Gᵀ G", _symmetric(rng, (2, 3, 256, 256), dtype), grid.swapaxes(-1, -2)),
            ("stack, G Gᵀ", _symmetric(rng, (3, 128, 128), dtype), wide),
            ("stack, Gᵀ G", _symmetric(rng, (3, 160, 160), dtype), tall.swapaxes(-1, -2))]


@pytest.mark.parametrize("library", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("beta, alpha", [(0.999, 1e-3), (1.0, 1.0), (0.5, 2.0)])
@pytest.mark.parametrize("donate", [False, True])
def test_gram_average_by_blas_syrk(library, dtype, beta, alpha, donate):
    """NumPy's and torch's CPU statistic update by BLAS's ``syrk`` with β
    (``backends.syrk_cpu``; torch's tensors as zero-copy NumPy views), on every layout a step
    gives it (torch: of blocks large enough for ``syrk`` to pay): β·C + α·A·Aᵀ to within the roundings of the average, exactly symmetric, as a new
    array (C untouched) or written into C; both libraries with the same bits."""
    pytest.importorskip("numba")
    if library == "torch":
        torch = pytest.importorskip("torch")
        from backends import torch_backend as backend

        wrap, unwrap = torch.from_numpy, lambda x: x.numpy()
    else:
        from backends import numpy_backend as backend

        wrap = unwrap = lambda x: x
    rng = np.random.default_rng(11)
    layouts = _large_gram_operands if library == "torch" else _gram_operands_of_every_layout
    for name, c, a in layouts(rng, dtype):
        given = wrap(c.copy())
        fn = backend.gram_average_ if donate else backend.gram_average
        out = fn(given, wrap(a), beta, alpha)
        assert out is not NotImplemented, name
        assert (out is given) == donate, name
        out = unwrap(out)
        if not donate:
            np.testing.assert_array_equal(unwrap(given), c)
            assert out.flags.c_contiguous and out.shape == c.shape
        np.testing.assert_array_equal(out, np.swapaxes(out, -1, -2))
        a64 = a.astype(np.float64)
        exact = beta * c.astype(np.float64) + alpha * (a64 @ np.swapaxes(a64, -1, -2))
        scale = beta * np.abs(c) + alpha * (np.abs(a64) @ np.abs(np.swapaxes(a64, -1, -2)))
        k = a.shape[-1]
        assert np.all(np.abs(out - exact) <= (k + 3) * eps(dtype) * scale), name
        # the core's dispatch takes it (the state written in place where it is given up)
        state = wrap(c.copy())
        via_core = _xp.gram_average(_xp.namespace(state), state, wrap(a), beta, alpha, donate)
        assert (via_core is state) == donate, name
        np.testing.assert_array_equal(unwrap(via_core), out)
        if library == "torch":
            from backends import numpy_backend

            np.testing.assert_array_equal(numpy_backend.gram_average(c, a, beta, alpha), out)


def test_numpy_gram_average_declines_what_blas_cannot_take():
    """β = 0 (BLAS would not read C: a NaN in it would vanish), blocks with no axis of unit
    stride, integer scalars and mixed dtypes fall back to the expression, with its bits."""
    pytest.importorskip("numba")
    from backends import numpy_backend

    rng = np.random.default_rng(12)
    c = _symmetric(rng, (4, 6, 6), np.float32)
    a = rng.standard_normal((4, 6, 9)).astype(np.float32)
    strided = rng.standard_normal((4, 12, 18)).astype(np.float32)[:, ::2, ::2]
    for args in [(c, a, 0.0, 1.0), (c, strided, 0.5, 1.0), (c, a, 1, 1.0), (c.astype(np.float64), a, 0.5, 1.0)]:
        assert numpy_backend.gram_average(*args) is NotImplemented
    nan = c.copy()
    nan[0, 0, 0] = np.nan
    out = _xp.gram_average(_xp.namespace(nan), nan, a, 0.0, 1.0)
    np.testing.assert_array_equal(out, np.float32(0.0) * nan + a @ np.swapaxes(a, -1, -2))
    out = _xp.gram_average(_xp.namespace(c), c, strided, 0.5, 1.0)
    np.testing.assert_array_equal(out, np.float32(0.5) * c + strided @ np.swapaxes(strided, -1, -2))


def test_torch_gram_average_declines_what_blas_cannot_take():
    """torch's ``syrk`` path leaves to ``baddbmm`` (its bits, its errors) blocks too small for
    ``syrk`` to pay (``block_size`` 128's 128×128, and fewer columns than rows), a C or A that
    autograd records, mixed dtypes, integer scalars, β = 0 and blocks with no axis of unit
    stride; a C it may not write (a broadcast) is given a new tensor, not written."""
    pytest.importorskip("numba")
    torch = pytest.importorskip("torch")
    from backends import torch_backend

    gen = torch.Generator().manual_seed(3)
    x = torch.randn((4, 128, 128), generator=gen, dtype=torch.float64)
    c = x + x.mT
    a = torch.randn((4, 128, 300), generator=gen, dtype=torch.float64)
    assert torch_backend.gram_average(c, a, 0.5, 1.0) is not NotImplemented
    small, tall = a[:, :, :128], torch.randn((4, 128, 100), generator=gen, dtype=torch.float64)
    strided = torch.randn((4, 256, 600), generator=gen, dtype=torch.float64)[:, ::2, ::2]
    grad = a.clone().requires_grad_(True)
    for args in [(c, small, 0.5, 1.0), (c, tall, 0.5, 1.0), (c, grad, 0.5, 1.0), (c, a.float(), 0.5, 1.0),
                 (c, a, 1, 1.0), (c, a, 0.0, 1.0), (c, strided, 0.5, 1.0)]:
        assert torch_backend.gram_average(*args) is NotImplemented
        assert torch_backend.gram_average_(c.clone(), *args[1:]) is NotImplemented
    ns = _xp.namespace(c)
    for operand in (small, strided):
        out = _xp.gram_average(ns, c, operand, 0.5, 1.0)
        torch.testing.assert_close(out, torch.baddbmm(c, operand, operand.mT, beta=0.5, alpha=1.0), rtol=0, atol=0)
    out = _xp.gram_average(ns, c, grad, 0.5, 2.0)
    out.sum().backward()  # autograd recorded it
    assert grad.grad is not None
    with pytest.raises(RuntimeError):
        _xp.gram_average(ns, c, a.float(), 0.5, 1.0)
    broadcast = c[:1].expand(4, 128, 128)
    assert torch_backend.gram_average_(broadcast, a, 0.5, 1.0) is NotImplemented
    before = broadcast.clone()
    out = _xp.gram_average(ns, broadcast, a, 0.5, 1.0, donate=True)
    torch.testing.assert_close(broadcast, before, rtol=0, atol=0)
    torch.testing.assert_close(out, torch.baddbmm(before, a, a.mT, beta=0.5, alpha=1.0))


@pytest.mark.parametrize("n, d", [(9, 128), (3, 300), (5, 8)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torch_new_average_of_products_a_few_blocks_at_a_time(n, d, dtype):
    """torch's new β·C + α·A·B of a CPU stack, a few blocks at a time (nine 128×128 blocks, four
    at a time): ``baddbmm``'s bits and those of the in-place form, in a new tensor, C untouched.
    On one thread, as bench runs it: with two, torch splits one call over all nine blocks
    between its threads otherwise than over the pieces, and 3% of the entries differ by an ulp."""
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(n * d)
    a = torch.randn((n, d, d), generator=gen, dtype=getattr(torch, dtype))
    c = torch.randn((n, d, d), generator=gen, dtype=getattr(torch, dtype))
    before = c.clone()
    ns = _xp.namespace(c)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = _xp.scaled_plus_product(ns, c, a, a.mT, 0.999, 1e-3)
        assert out.data_ptr() != c.data_ptr() and out.is_contiguous()
        torch.testing.assert_close(out, torch.baddbmm(c, a, a.mT, beta=0.999, alpha=1e-3), rtol=0, atol=0)
        torch.testing.assert_close(c, before, rtol=0, atol=0)
        in_place = _xp.scaled_plus_product(ns, c.clone(), a, a.mT, 0.999, 1e-3, donate=True)
        torch.testing.assert_close(out, in_place, rtol=0, atol=0)
    finally:
        torch.set_num_threads(threads)


def test_torch_average_of_products_that_autograd_records_is_differentiable():
    torch = pytest.importorskip("torch")
    a = torch.ones((2, 3, 3), requires_grad=True)
    out = _xp.scaled_plus_product(_xp.namespace(a), torch.zeros((2, 3, 3)), a, a.mT.detach(), 0.5, 2.0)
    out.sum().backward()
    torch.testing.assert_close(a.grad, torch.full((2, 3, 3), 6.0))


def test_torch_average_of_products_leaves_broadcasts_and_mixed_dtypes_to_baddbmm():
    """A C that ``baddbmm`` broadcasts over the batch gets its result; operands of another dtype
    its error, not a partly written tensor."""
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(1)
    a = torch.randn((6, 5, 5), generator=gen)
    c = torch.randn((1, 5, 5), generator=gen)
    out = _xp.scaled_plus_product(_xp.namespace(a), c, a, a.mT, 0.5, 2.0)
    torch.testing.assert_close(out, torch.baddbmm(c, a, a.mT, beta=0.5, alpha=2.0), rtol=0, atol=0)
    with pytest.raises(RuntimeError):
        _xp.scaled_plus_product(_xp.namespace(a), c.double().expand(6, 5, 5).contiguous(), a, a.mT, 0.5, 2.0)
