"""The grafted first-order optimizer's three passes (the first moment, the accumulator of AdaGrad,
RMSProp or Adam, and the norm of the grafting direction) as one: ``_elementwise.ema_plus_square_norm``, and numba's
one-pass kernel (``backends.fused_cpu``) behind NumPy's and torch's fast paths; with the cuts of
g and the new first moment into blocks, ``blocking.ema_plus_square_norm_split``."""

import copy
import importlib
import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import backends
import shampoo_core as sc
from helpers import eps, to_np, to_xp
from shampoo_core import _elementwise, _xp, blocking, momentum

SHAPES = [(1,), (7,), (33, 17), (4, 3, 2, 2), (1000,)]
EPSILON = 1e-6
BETA2S = [None, 0.3, 0.999]  # AdaGrad's sum; the average of the squares in both of its forms
# the first moment itself; Nesterov's F = c₁·m' + c₂·g at steps 1 and 7 of β₁ = 0.9
NESTEROVS = [None, momentum.nesterov_coefficients(0.9, 1), momentum.nesterov_coefficients(0.9, 7)]


def _inputs(shape, seed, dtype=np.float32):
    rng = np.random.default_rng(seed)
    m, g = rng.standard_normal(shape), rng.standard_normal(shape)
    acc = np.abs(rng.standard_normal(shape)) * rng.choice([1e-8, 1.0, 1e3], size=shape)
    return tuple(np.asarray(x, dtype=dtype) for x in (m, acc, g))


def _quotient_norm(new_m, new_acc, epsilon, dtype, g=None, nesterov=None):
    """‖F / (√acc + ε)‖ in float64 of the quotients as ``dtype`` rounds them, F = m or (given
    ``nesterov``) Nesterov's c₁·m + c₂·g as NumPy rounds it."""
    f = new_m if nesterov is None else _nesterov_f(new_m, g, nesterov)
    q = f / (np.sqrt(new_acc) + dtype(epsilon))
    return float(np.sqrt(np.sum(q.astype(np.float64) ** 2)))


def _nesterov_f(m, g, nesterov):
    """Nesterov's F = c₁·m + c₂·g as ``momentum.filtered_gradient`` forms it."""
    return nesterov[0] * m + nesterov[1] * g


@pytest.mark.parametrize("shape", SHAPES)
@given(beta=st.sampled_from([0.0, 0.3, 0.5, 0.9, 1.0]), beta2=st.sampled_from(BETA2S + [0.0, 1.0]),
       nesterov=st.sampled_from(NESTEROVS), seed=st.integers(0, 2**16))
def test_one_pass_is_the_three_passes(xp, shape, beta, beta2, nesterov, seed):
    m, acc, g = _inputs(shape, seed)
    xm, xa, xg = to_xp(xp, m), to_xp(xp, acc), to_xp(xp, g)
    new_m, new_acc, norm = _elementwise.ema_plus_square_norm(xp, xm, xa, xg, beta, EPSILON, beta2=beta2,
                                                             nesterov=nesterov)
    for x, before in zip((xm, xa, xg), (m, acc, g)):
        np.testing.assert_array_equal(to_np(x), before)  # inputs untouched
    new_m, new_acc = to_np(new_m), to_np(new_acc)
    assert new_m.shape == shape and new_m.dtype == np.float32 and new_acc.dtype == np.float32
    # the running average within the bound of test_elementwise's, the sum of squares within an ulp
    exact_m = beta * m.astype(np.float64) + (1.0 - beta) * g.astype(np.float64)
    assert np.all(np.abs(new_m - exact_m) <= 6 * eps("float32") * np.maximum(np.abs(m), np.abs(g)))
    square = g.astype(np.float64) ** 2
    if beta2 is None:
        exact_acc = acc.astype(np.float64) + square
        assert np.all(np.abs(new_acc - exact_acc) <= eps("float32") * exact_acc)
    else:  # the average of g² (rounded once more than g) within the first moment's bound
        exact_acc = beta2 * acc.astype(np.float64) + (1.0 - beta2) * square
        assert np.all(np.abs(new_acc - exact_acc) <= 7 * eps("float32") * np.maximum(acc, square))
    # the norm of the quotients it returns with (of Nesterov's F, given its coefficients), its
    # squares summed to float32's accuracy or better
    ref = _quotient_norm(new_m, new_acc, EPSILON, np.float32, g, nesterov)
    assert abs(float(to_np(norm)) - ref) <= (m.size + 2) * eps("float32") * ref


def _spy(monkeypatch):
    """Record ``(entries, "cut" or "flat")`` for each call of the compiled kernel (skips where
    numba is not installed)."""
    pytest.importorskip("numba")
    fused = backends.load_fused_cpu()
    assert fused is not None
    calls = []
    kernel = fused.ema_plus_square_norm

    def spy(g, *args, **kwargs):
        calls.append((g.size, "flat" if kwargs.get("cut") is None else "cut"))
        return kernel(g, *args, **kwargs)

    monkeypatch.setattr(fused, "ema_plus_square_norm", spy)
    return calls


def _lib(name):
    if name == "torch":
        torch = pytest.importorskip("torch")
        return torch.from_numpy
    return np.array


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.9])
@pytest.mark.parametrize("beta2", BETA2S)
@pytest.mark.parametrize("nesterov", NESTEROVS[:2])
def test_numba_kernel_has_numpys_bits_and_a_float64_sum(monkeypatch, lib, dtype, beta, beta2, nesterov):
    """NumPy arrays and torch CPU tensors take the compiled pass: the new m and acc (AdaGrad's
    sum, or the average of the squares) have the bits of NumPy's passes
    (``backends.numpy_backend``), donated or not, and the norm's squares are summed in float64,
    so it is within 2u of the float64 norm of its quotients (and the float64 sum's own rounding,
    which float64 arrays see); of Nesterov's F, as NumPy rounds it, given its coefficients."""
    calls = _spy(monkeypatch)
    from backends import numpy_backend

    conv = _lib(lib)
    m, acc, g = _inputs((301, 7), 5, dtype)
    want_m, want_acc = numpy_backend.ema(m, g, beta), _numpy_acc(acc, g, beta2)
    for donate in (False, True):
        xm, xa, xg = conv(m.copy()), conv(acc.copy()), conv(g.copy())
        new_m, new_acc, norm = _elementwise.ema_plus_square_norm(_xp.namespace(xm), xm, xa, xg, beta, EPSILON, donate,
                                                                 beta2, nesterov)
        assert (new_m is xm and new_acc is xa) == donate
        np.testing.assert_array_equal(to_np(new_m), want_m)
        np.testing.assert_array_equal(to_np(new_acc), want_acc)
        if not donate:
            np.testing.assert_array_equal(to_np(xm), m)
            np.testing.assert_array_equal(to_np(xa), acc)
        ref = _quotient_norm(want_m, want_acc, EPSILON, dtype, g, nesterov)
        assert to_np(norm).dtype == dtype and to_np(norm).shape == ()
        # float64 sums in another order: up to n/16 roundings in each of the kernel's 16 lanes
        assert abs(float(to_np(norm)) - ref) <= (2 * eps(dtype) + m.size / 16 * eps(np.float64)) * ref
    assert calls == [(m.size, "flat")] * 2


def _numpy_acc(acc, g, beta2):
    """NumPy's accumulator pass: AdaGrad's sum, or (``beta2``) the average of g²."""
    from backends import numpy_backend

    return numpy_backend.plus_square(acc, g) if beta2 is None else numpy_backend.ema(acc, g * g, beta2)


def _f64(x):
    """float64 NumPy copy of an array or tensor (of any real dtype, bfloat16 included)."""
    return x.detach().double().numpy() if hasattr(x, "detach") else np.asarray(x, dtype=np.float64)


def _declined_cases(lib):
    m, acc, g = _inputs((12, 10), 2)
    if lib == "numpy":
        buffer = np.abs(np.concatenate([m.reshape(-1), acc.reshape(-1)]))
        overlapping = buffer[: m.size].reshape(m.shape), buffer[m.size // 2: m.size // 2 + m.size].reshape(m.shape)
        return {
            "strided": (np.asfortranarray(m), acc, g),
            "overlapping": (*overlapping, g),
            "float16": (m.astype(np.float16), acc.astype(np.float16), g.astype(np.float16)),
            "array epsilon": (m, acc, g),
            "array coefficients": (m, acc, g),
        }
    torch = pytest.importorskip("torch")
    t = [torch.from_numpy(x) for x in (m, acc, g)]
    return {
        "strided": (t[0].t().contiguous().t(), t[1], t[2]),
        "autograd": (t[0], t[1], t[2].clone().requires_grad_(True)),
        "bfloat16": tuple(x.to(torch.bfloat16) for x in t),
        "array epsilon": tuple(t),
        "array coefficients": tuple(t),
    }


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("beta2", [None, 0.999])
def test_numba_kernel_declines_what_it_cannot_read_as_one_flat_array(monkeypatch, lib, beta2):
    """Strided arrays, arrays that overlap, half dtypes, tensors autograd records, and an ε or
    Nesterov's coefficients given as arrays (Adam's bias-corrected ε and Nesterov's step-dependent
    coefficients under ``jax.jit``) are left to the three passes, with their values."""
    calls = _spy(monkeypatch)
    for name, (m, acc, g) in _declined_cases(lib).items():
        xp = _xp.namespace(m)
        new_acc = (_elementwise.plus_square(acc, g) if beta2 is None else _elementwise.ema(acc, g * g, beta2))
        expected = [_f64(x) for x in (_elementwise.ema(m, g, 0.9), new_acc)]
        before = [_f64(copy.deepcopy(x)) for x in (m, acc)]
        epsilon = xp.asarray(EPSILON, dtype=m.dtype) if name == "array epsilon" else EPSILON
        nesterov = None
        if name == "array coefficients":
            nesterov = tuple(xp.asarray(c, dtype=m.dtype) for c in NESTEROVS[1])
        new_m, new_acc, norm = _elementwise.ema_plus_square_norm(xp, m, acc, g, 0.9, epsilon, beta2=beta2,
                                                                 nesterov=nesterov)
        assert calls == [], name
        np.testing.assert_array_equal(_f64(new_m), expected[0], err_msg=name)
        np.testing.assert_array_equal(_f64(new_acc), expected[1], err_msg=name)
        assert np.isfinite(_f64(norm)), name
        for x, b in zip((m, acc), before):
            np.testing.assert_array_equal(_f64(x), b, err_msg=name)


@pytest.mark.parametrize("beta2", [None, 0.999])
@pytest.mark.parametrize("nesterov", NESTEROVS[:2])
def test_without_numba_the_step_takes_the_three_passes(monkeypatch, beta2, nesterov):
    """Where numba is missing (or does not import) the fast paths decline, and the result is
    the three passes' own, bit for bit (the norm of Nesterov's F as ``momentum`` forms it)."""
    monkeypatch.setattr(backends, "_FUSED_CPU", [None])
    m, acc, g = _inputs((40, 9), 4)
    new_m, new_acc, norm = _elementwise.ema_plus_square_norm(_xp.namespace(m), m, acc, g, 0.9, EPSILON, beta2=beta2,
                                                             nesterov=nesterov)
    want_m = _elementwise.ema(m, g, 0.9)
    want_acc = _elementwise.plus_square(acc, g) if beta2 is None else _elementwise.ema(acc, g * g, beta2)
    np.testing.assert_array_equal(new_m, want_m)
    np.testing.assert_array_equal(new_acc, want_acc)
    f = want_m if nesterov is None else momentum.filtered_gradient(want_m, g, 0.9, 1, True)[0]
    assert float(norm) == float(_elementwise.norm_over_root_plus(np, f, want_acc, EPSILON))


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("graft_type", ["adagrad", "rmsprop", "adam"])
@pytest.mark.parametrize("nesterov", [False, True])
def test_layer_grafted_preconditioned_steps_take_the_one_pass(monkeypatch, lib, graft_type, nesterov):
    """Shampoo's default step (β₁ > 0, AdaGrad grafting per layer; RMSProp's or Adam's alike, and
    Nesterov's first moment) takes the compiled pass once per preconditioned parameter on
    preconditioned steps, donated or not (the matrix, split into two column blocks, with its
    cuts on torch; NumPy's products read its blocks where they lie, and it takes the pass
    without cuts), and its new first moment and accumulator are NumPy's passes over the old
    ones; steps that need the grafting direction itself, or no first moment, do not take it."""
    calls = _spy(monkeypatch)
    from backends import numpy_backend

    conv = _lib(lib)
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((20, 12)).astype(np.float32), "b": rng.standard_normal(12).astype(np.float32)}
    grads = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()} for _ in range(3)]
    p = {k: conv(v.copy()) for k, v in params.items()}
    beta2 = None if graft_type == "adagrad" else 0.99

    def run(donate=False, **options):
        options = {"graft_type": graft_type, "graft_beta2": beta2, "nesterov": nesterov, **options}
        tx = sc.shampoo(0.1, block_size=8, start_preconditioning_step=2, donate_state=donate, **options)
        state = tx.init(p)
        for g in grads:
            old = [(to_np(s.momentum).copy(), to_np(s.graft.accumulator).copy()) for s in state.params]
            updates, state = tx.update(state, {k: conv(v.copy()) for k, v in g.items()}, p)
            assert all(np.all(np.isfinite(to_np(u))) for u in updates.values())
        return old, state

    for donate in (False, True):
        calls.clear()
        old, state = run(donate)
        # step 1 is AdaGrad's (not preconditioned); steps 2 and 3 precondition both leaves
        matrix = "flat" if lib == "numpy" else "cut"
        assert sorted(calls) == [(12, "flat"), (12, "flat"), (240, matrix), (240, matrix)]
        # the last step's new state from the old (leaves in the tree's order: b, w)
        for (m, acc), s, g in zip(old, state.params, (grads[-1]["b"], grads[-1]["w"])):
            np.testing.assert_array_equal(to_np(s.momentum), numpy_backend.ema(m, g, 0.9))
            np.testing.assert_array_equal(to_np(s.graft.accumulator), _numpy_acc(acc, g, beta2))
    for options in (dict(graft_granularity="block"), dict(graft_type="sgd"), dict(beta1=0.0)):
        calls.clear()
        run(**options)
        assert calls == [], options


@pytest.mark.parametrize("graft_type", ["adagrad", "rmsprop", "adam"])
@pytest.mark.parametrize("donate", [False, True])
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("statistics_steps", [1, 2])
def test_one_pass_steps_update_as_the_separate_passes(monkeypatch, graft_type, donate, nesterov, statistics_steps):
    """A step through the compiled pass updates as the same step through the separate passes
    (the first moment, the grafting statistic, then the norm of the direction), up to the
    rounding of the grafted norm (its squares summed in another order): the norm carries the
    grafting optimizer's own scale and ε (Adam's √(1 - β₂ᵗ) and ε√(1 - β₂ᵗ)), and is of
    Nesterov's F where the first moment is Nesterov's, whose blocks are preconditioned; with the
    statistics every step (F cut in the pass) or every other (F formed after it). NumPy, where
    the new m and acc are the same bits either way."""
    calls = _spy(monkeypatch)
    rng = np.random.default_rng(3)
    params = {"w": rng.standard_normal((24, 40)).astype(np.float32), "b": rng.standard_normal(40).astype(np.float32)}
    grads = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()} for _ in range(4)]

    def updates():
        # an ε near √acc, so that Adam's bias-corrected ε shows in the norm
        tx = sc.shampoo(0.1, block_size=16, graft_type=graft_type, diagonal_epsilon=0.3, start_preconditioning_step=2,
                        preconditioning_compute_steps=1, statistics_compute_steps=statistics_steps,
                        donate_state=donate, nesterov=nesterov)
        state, out = tx.init(params), []
        for g in grads:
            u, state = tx.update(state, {k: v.copy() for k, v in g.items()}, params)
            out.append(u)
        return out

    fused = updates()
    assert len(calls) == 6  # steps 2-4, both leaves
    # the separate passes: the step's branch for the other grafting optimizers, without numba
    monkeypatch.setattr(importlib.import_module("shampoo_core.shampoo"), "_DIAGONAL", ())
    monkeypatch.setattr(backends, "_FUSED_CPU", [None])
    separate = updates()
    assert len(calls) == 6
    for got, want in zip(fused, separate):
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=4 * eps("float32"), atol=0, err_msg=k)


# Shapes and block sizes whose plans cut g and m with copies (2-D merged, several column blocks,
# ragged last blocks, a conv kernel merged to (8, 36)) and some whose cuts are views or 3-D.
CUT_CASES = [((20, 12), 8), ((33, 17), 4), ((5, 70), 16), ((8, 4, 3, 3), 16), ((40, 9), 3), ((3, 100), 7),
             ((64, 64), 16), ((12, 10), 64), ((50, 7), 8), ((300,), 16), ((6, 70, 90), 64)]


def _separate(xp, m, acc, g, plan, beta, weight, beta2=None, nesterov=None):
    """The pass without its cuts, then ``split_groups`` of g and of F (the new m, or Nesterov's)."""
    new_m, new_acc, norm = _elementwise.ema_plus_square_norm(xp, m, acc, g, beta, EPSILON, beta2=beta2,
                                                             nesterov=nesterov)
    f = new_m if nesterov is None else _nesterov_f(new_m, g, nesterov)
    return new_m, new_acc, norm, blocking.split_groups(xp, g, plan, weight), blocking.split_groups(xp, f, plan)


def _assert_same(got, want):
    for a, b in zip(got[:3], want[:3]):
        np.testing.assert_array_equal(to_np(a), to_np(b))
    for got_blocks, want_blocks in zip(got[3:], want[3:]):
        assert len(got_blocks) == len(want_blocks)
        for a, b in zip(got_blocks, want_blocks):
            assert tuple(a.shape) == tuple(b.shape)
            np.testing.assert_array_equal(to_np(a), to_np(b))


@pytest.mark.parametrize("case", CUT_CASES)
@given(beta=st.sampled_from([0.0, 0.3, 0.9]), weight=st.sampled_from([None, 0.0316]), beta2=st.sampled_from(BETA2S),
       nesterov=st.sampled_from(NESTEROVS), seed=st.integers(0, 2**16))
def test_cut_pass_is_the_pass_and_split_groups(xp, case, beta, weight, beta2, nesterov, seed):
    """On every backend the joined form returns the separate calls' values: the new m, acc and
    norm, and the blocks of g (weighted) and of F (the new m, or Nesterov's), as
    ``split_groups`` cuts them."""
    shape, block_size = case
    plan = blocking.make_plan(shape, block_size, skip_preconditioning_dim_size_gt=80)
    m, acc, g = (to_xp(xp, x) for x in _inputs(shape, seed))
    _assert_same(blocking.ema_plus_square_norm_split(xp, m, acc, g, plan, beta, EPSILON, weight, beta2=beta2,
                                                     nesterov=nesterov),
                 _separate(xp, m, acc, g, plan, beta, weight, beta2, nesterov))


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CUT_CASES)
def test_numba_kernel_cuts_rows_while_it_has_them(monkeypatch, lib, dtype, case):
    """NumPy arrays and torch CPU tensors whose cuts are copies take the kernel with its cuts,
    donated or not: bit for bit the separate calls, inputs untouched unless donated, the blocks
    stacks of their own; plans whose cuts are views, or not 2-D, take the pass without them."""
    calls = _spy(monkeypatch)
    conv = _lib(lib)
    shape, block_size = case
    plan = blocking.make_plan(shape, block_size, skip_preconditioning_dim_size_gt=80)
    m, acc, g = _inputs(shape, 9, dtype)
    cuts = len(plan.merged_shape) == 2 and len(plan.bounds[1]) > 1
    for weight, beta2, nesterov, donate in itertools.product((None, 0.0316), (None, 0.999), NESTEROVS[:2],
                                                            (False, True)):
        calls.clear()
        want = _separate(_xp.namespace(conv(m)), conv(m.copy()), conv(acc.copy()), conv(g.copy()), plan, 0.9,
                         weight, beta2, nesterov)
        xm, xa, xg = conv(m.copy()), conv(acc.copy()), conv(g.copy())
        got = blocking.ema_plus_square_norm_split(_xp.namespace(xm), xm, xa, xg, plan, 0.9, EPSILON, weight, donate,
                                                  beta2, nesterov)
        assert calls == [(m.size, "flat"), (m.size, "cut" if cuts else "flat")], (weight, beta2, nesterov, donate)
        _assert_same(got, want)
        assert (got[0] is xm and got[1] is xa) == donate
        np.testing.assert_array_equal(to_np(xg), g)
        if not donate:
            np.testing.assert_array_equal(to_np(xm), m)
            np.testing.assert_array_equal(to_np(xa), acc)
        assert all(tuple(b.shape) == (n,) + tuple(d) for b, (n, d) in
                   zip(got[3], [(grp.num_blocks, grp.block_shape) for grp in plan.groups]))


def test_cut_layout_takes_only_2d_merged_plans():
    """The kernel's layout of blocks is for a 2-D merged shape; other plans are refused by name
    (the fast paths ask ``cuts_in_one_pass`` first and leave them to ``split_groups``)."""
    pytest.importorskip("numba")
    fused = backends.load_fused_cpu()
    for shape in ((300,), (6, 70, 90)):
        plan = blocking.make_plan(shape, 64)
        assert not fused.cuts_in_one_pass(plan, shape, None)
        with pytest.raises(ValueError, match="plan"):
            fused.cut_layout(plan)
    plan = blocking.make_plan((20, 12), 8)
    assert fused.cuts_in_one_pass(plan, (20, 12), None)
    assert not fused.cuts_in_one_pass(plan, (12, 20), None)  # another parameter's plan
    assert not fused.cuts_in_one_pass(plan, (20, 12), np.float32(0.5))  # only Python floats


@pytest.mark.parametrize("nesterov", NESTEROVS[:2])
def test_without_numba_the_cuts_are_split_groups(monkeypatch, nesterov):
    """Without numba the joined form is the three passes and ``split_groups``, bit for bit
    (Nesterov's F, formed once, as ``momentum`` forms it)."""
    monkeypatch.setattr(backends, "_FUSED_CPU", [None])
    m, acc, g = _inputs((20, 12), 4)
    plan = blocking.make_plan((20, 12), 8)
    got = blocking.ema_plus_square_norm_split(np, m, acc, g, plan, 0.9, EPSILON, 0.0316, nesterov=nesterov)
    want_m, want_acc = _elementwise.ema(m, g, 0.9), _elementwise.plus_square(acc, g)
    f = want_m if nesterov is None else momentum.filtered_gradient(want_m, g, 0.9, 1, True)[0]
    _assert_same(got, (want_m, want_acc, _elementwise.norm_over_root_plus(np, f, want_acc, EPSILON),
                       blocking.split_groups(np, g, plan, 0.0316), blocking.split_groups(np, f, plan)))


def test_compiled_loops_are_cached_once(tmp_path):
    """A second process loads the compiled loops from numba's disk cache instead of compiling
    them again (and adding a file to the cache each time, as loops built as closures did)."""
    pytest.importorskip("numba")
    import os
    import subprocess
    import sys

    script = (
        "import numpy as np\n"
        "from backends import fused_cpu\n"
        "from shampoo_core import blocking\n"
        "plan = blocking.make_plan((8, 8), 4)\n"
        "def a(): return np.ones(64, np.float32)\n"
        "for cut in (None, (plan, None, a(), a())):\n"
        "    for out in (None, (a(), a())):\n"
        "        for beta2 in (None, 0.999):\n"
        "            for nesterov in (None, (0.5, 0.1)):\n"
        "                fused_cpu.ema_plus_square_norm(a(), a(), a(), 0.9, 1e-8, out=out, cut=cut, beta2=beta2,\n"
        "                                               nesterov=nesterov)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), NUMBA_DEBUG_CACHE="1",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    logs = [subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True,
                           cwd=root).stdout for _ in range(2)]
    # 4 loops, each compiled for AdaGrad's sum and for the average of the squares, with the first
    # moment's norm and cut or Nesterov's
    assert logs[0].count("data saved") == 16
    assert logs[1].count("data saved") == 0 and logs[1].count("data loaded") == 16
    assert len(list(tmp_path.rglob("*.nbc"))) == 16


@pytest.mark.parametrize("cut", [False, True])
def test_donated_read_only_arrays_take_the_new_array_pass(monkeypatch, cut):
    """A donated m or acc that cannot be written (a read-only NumPy array) is left as it is: the
    in-place form declines and the pass writes new arrays, with the same values."""
    calls = _spy(monkeypatch)
    m, acc, g = _inputs((20, 12), 6)
    plan = blocking.make_plan((20, 12), 8)
    want = _separate(np, m, acc, g, plan, 0.9, None)
    for frozen in ("m", "acc"):
        xm, xa = m.copy(), acc.copy()
        (xm if frozen == "m" else xa).flags.writeable = False
        calls.clear()
        if cut:
            got = blocking.ema_plus_square_norm_split(np, xm, xa, g, plan, 0.9, EPSILON, None, donate=True)
        else:
            got = _elementwise.ema_plus_square_norm(np, xm, xa, g, 0.9, EPSILON, donate=True)
        assert calls == [(m.size, "cut" if cut else "flat")], frozen
        assert got[0] is not xm and got[1] is not xa
        _assert_same(got, want if cut else want[:3])
        np.testing.assert_array_equal(xm, m)
        np.testing.assert_array_equal(xa, acc)
