"""The Eva family: Sherman–Morrison closed forms equal dense solves; transformations behave."""

import numpy as np
import optree
import pytest
from hypothesis import given, settings, strategies as st

import shampoo_core as sc
import importlib

ev = importlib.import_module("shampoo_core.eva")  # the module; shampoo_core.eva is the function
from helpers import examples_for, to_np, to_xp

cases = st.tuples(st.integers(1, 7), st.integers(1, 7), st.integers(0, 2**16), st.floats(1e-3, 1.0))


def data(m, n, seed):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((m, n)), rng.standard_normal(n) * rng.uniform(0.1, 3), rng.standard_normal(m)


def test_closed_forms_equal_dense_solves(xp):
    @settings(max_examples=examples_for(xp, settings().max_examples))
    @given(case=cases)
    def check(case):
        m, n, seed, gamma = case
        g, a, gb = data(m, n, seed)
        G, A, GB = (to_xp(xp, x) for x in (g, a, gb))
        tol = dict(rtol=1e-9, atol=1e-9 * np.abs(g).max() / gamma**2)
        # Eva: (āāᵀ ⊗ ḡḡᵀ + γI)⁻¹ vec(G), row-major vec(ḡāᵀ) = ḡ ⊗ ā.
        u = np.kron(gb, a)
        dense = np.linalg.solve(np.outer(u, u) + gamma * np.eye(m * n), g.ravel()).reshape(m, n)
        np.testing.assert_allclose(to_np(ev.eva_precondition(xp, G, A, GB, gamma)), dense, **tol)
        # Eva-f: γ G (āāᵀ + γI)⁻¹.
        dense_f = gamma * g @ np.linalg.inv(np.outer(a, a) + gamma * np.eye(n))
        np.testing.assert_allclose(to_np(ev.eva_f_precondition(xp, G, A, gamma)), dense_f, **tol)
        # Two-sided: (ḡḡᵀ + γI)⁻¹ G (āāᵀ + γI)⁻¹.
        dense_2 = np.linalg.inv(np.outer(gb, gb) + gamma * np.eye(m)) @ g @ np.linalg.inv(np.outer(a, a) + gamma * np.eye(n))
        np.testing.assert_allclose(to_np(ev.two_sided_precondition(xp, G, A, GB, gamma)), dense_2, **tol)
        # Eva-s: its dense Kronecker form, rescaled to ‖G‖.
        l, r = g.mean(axis=1), g.mean(axis=0)
        v = np.kron(l, r)
        dense_s = np.linalg.solve(np.outer(v, v) + gamma * np.eye(m * n), g.ravel()).reshape(m, n)
        dense_s *= np.linalg.norm(g) / np.linalg.norm(dense_s)
        got = to_np(ev.eva_s_precondition(xp, G, to_xp(xp, l), to_xp(xp, r), gamma))
        np.testing.assert_allclose(got, dense_s, rtol=1e-9, atol=1e-9 * np.abs(g).max())

    check()


def test_two_sided_differs_from_eva():
    g, a, gb = data(4, 3, 0)
    import array_api_compat.numpy as xnp

    one = ev.eva_precondition(xnp, g, a, gb, 0.03)
    two = ev.two_sided_precondition(xnp, g, a, gb, 0.03)
    assert not np.allclose(one, two)


def test_eva_kl_clip_and_momentum(xp):
    rng = np.random.default_rng(1)
    params = {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal(4)}
    grads = {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal(4)}
    g_bar, a_bar = rng.standard_normal(4), rng.standard_normal(3)
    lr, kl = 1.0, 1e-3
    tx = sc.eva(lr, kl_clip=kl, momentum=0.9)
    state = tx.init(to_xp(xp, params))
    curv = {"w": (to_xp(xp, g_bar), to_xp(xp, a_bar)), "b": None}
    u, state = tx.update(state, to_xp(xp, grads), to_xp(xp, params), curvature=curv)
    v = ev.eva_precondition(np, grads["w"], a_bar, g_bar, 0.03)
    nu = min(1.0, np.sqrt(kl / (lr**2 * np.sum(v * grads["w"]))))
    assert nu < 1.0  # the clip is active at this learning rate
    np.testing.assert_allclose(to_np(u["w"]), -lr * nu * v, rtol=1e-10)
    np.testing.assert_allclose(nu**2 * lr**2 * np.sum(v * grads["w"]), kl, rtol=1e-10)
    np.testing.assert_allclose(to_np(u["b"]), -lr * grads["b"], rtol=1e-12)  # no curvature: SGD
    # Second step: momentum 0.9 on the clipped direction; running vectors decay by 0.95.
    u2, state = tx.update(state, to_xp(xp, grads), to_xp(xp, params), curvature=curv)
    np.testing.assert_allclose(to_np(state.left[1]), g_bar, rtol=1e-12)


def test_eva_f_and_eva_s_transformations(xp):
    rng = np.random.default_rng(2)
    g = rng.standard_normal((5, 4))
    tx = sc.eva(0.1, variant="eva_f", kl_clip=None, momentum=0.0)
    a_bar = rng.standard_normal(4)
    state = tx.init(to_xp(xp, np.zeros((5, 4))))
    u, _ = tx.update(state, to_xp(xp, g), curvature=(to_xp(xp, np.zeros(5)), to_xp(xp, a_bar)))
    np.testing.assert_allclose(to_np(u), -0.1 * ev.eva_f_precondition(np, g, a_bar, 0.03), rtol=1e-10)
    tx = sc.eva_s(0.1, momentum=0.0)
    state = tx.init(to_xp(xp, {"w": np.zeros((5, 4)), "b": np.zeros(4)}))
    u, state = tx.update(state, to_xp(xp, {"w": g, "b": np.ones(4)}))
    assert np.linalg.norm(to_np(u["w"])) == pytest.approx(0.1 * np.linalg.norm(g), rel=1e-10)
    np.testing.assert_allclose(to_np(u["b"]), -0.1 * np.ones(4))
    np.testing.assert_allclose(to_np(state.left[1]), g.mean(axis=1), rtol=1e-12)


def test_eva_bad_input():
    with pytest.raises(ValueError, match="damping"):
        sc.eva(damping=0.0)
    with pytest.raises(ValueError, match="variant"):
        sc.eva(variant="kfac")
    tx = sc.eva(0.1)
    state = tx.init(np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"curvature must be \(g_bar of shape \(3,\), a_bar of shape \(2,\)\)"):
        tx.update(state, np.ones((3, 2)), curvature=(np.ones(2), np.ones(3)))


@pytest.mark.parametrize("make, good", [
    (lambda: sc.eva(0.1), lambda: (np.ones(3), np.ones(2))),
    (lambda: sc.eva(0.1, variant="eva_f"), lambda: (np.ones(3), np.ones(2))),
    (lambda: sc.kfac(0.1), lambda: (np.eye(3), np.eye(2))),
], ids=["eva", "eva_f", "kfac"])
def test_curvature_is_checked_before_it_enters_the_state(make, good):
    """float32 or integer curvature would otherwise become the float64 state's dtype (the first
    running average takes it as is); curvature for a leaf that keeps none would be dropped."""
    tx = make()
    params = {"w": np.zeros((3, 2)), "b": np.zeros(3)}
    grads = {"w": np.ones((3, 2)), "b": np.ones(3)}
    state = tx.init(params)
    g_bar, a_bar = good()
    with pytest.raises(ValueError, match=r"curvature\['w'\]: .* has dtype float32; the gradient has float64"):
        tx.update(state, grads, curvature={"w": (g_bar.astype(np.float32), a_bar.astype(np.float32)), "b": None})
    with pytest.raises(ValueError, match=r"curvature\['w'\]: .* has dtype int64"):
        tx.update(state, grads, curvature={"w": (g_bar.astype(np.int64), a_bar.astype(np.int64)), "b": None})
    with pytest.raises(ValueError, match=r"curvature\['w'\] must be a pair"):
        tx.update(state, grads, curvature={"w": g_bar, "b": None})
    with pytest.raises(ValueError, match=r"curvature\['b'\] is given, but only 2-D leaves keep curvature"):
        tx.update(state, grads, curvature={"w": (g_bar, a_bar), "b": (np.ones(3), np.ones(1))})
    _, new = tx.update(state, grads, curvature={"w": (g_bar, a_bar), "b": None})
    assert all(leaf.dtype == np.float64 for leaf in optree.tree_leaves(new) if leaf.ndim > 0)


def test_curvature_on_another_device_is_refused():
    strict = pytest.importorskip("array_api_strict")
    tx = sc.eva(0.1)
    state = tx.init(strict.zeros((3, 2)))
    other = strict.Device("device1")
    with pytest.raises(ValueError, match=r"curvature: g_bar is on device .*device1.*the gradient is on"):
        tx.update(state, strict.ones((3, 2)), curvature=(strict.ones(3, device=other), strict.ones(2, device=other)))


def test_eva_state_checkpoints(tmp_path):
    tx = sc.eva_s(0.1)
    params = {"w": np.ones((3, 2)), "b": np.zeros(2)}
    state = tx.init(params)
    _, state = tx.update(state, {"w": np.full((3, 2), 0.5), "b": np.ones(2)})
    sc.save_state(tmp_path / "e.npz", state, tx=tx)
    loaded = sc.load_state(tmp_path / "e.npz", like=params, tx=tx)
    np.testing.assert_array_equal(loaded.left[1], state.left[1])


def spd(rng, n):
    x = rng.standard_normal((n, 2 * n))
    return x @ x.T / (2 * n)


def test_kfac_and_foof_against_dense_inverses(xp):
    rng = np.random.default_rng(3)
    g = rng.standard_normal((4, 3))
    s1, a1, s2, a2 = spd(rng, 4), spd(rng, 3), spd(rng, 4), spd(rng, 3)
    gamma = 0.03
    tx = sc.kfac(0.1, damping=gamma, kl_clip=None, momentum=0.0, inverse_steps=2, stat_decay=0.5)
    params = to_xp(xp, np.zeros((4, 3)))
    state = tx.init(params)
    u1, state = tx.update(state, to_xp(xp, g), params, curvature=(to_xp(xp, s1), to_xp(xp, a1)))
    r = np.sqrt(gamma)
    v1 = np.linalg.inv(s1 + r * np.eye(4)) @ g @ np.linalg.inv(a1 + r * np.eye(3))
    np.testing.assert_allclose(to_np(u1), -0.1 * v1, rtol=1e-9)
    # Step 2: factors are averaged (decay 0.5) but inverses are only recomputed every 2 steps.
    u2, state = tx.update(state, to_xp(xp, g), params, curvature=(to_xp(xp, s2), to_xp(xp, a2)))
    np.testing.assert_allclose(to_np(u2), -0.1 * v1, rtol=1e-9)
    np.testing.assert_allclose(to_np(state.a_factor[0]), 0.5 * a1 + 0.5 * a2, rtol=1e-12)
    u3, state = tx.update(state, to_xp(xp, g), params, curvature=(to_xp(xp, s2), to_xp(xp, a2)))
    s3, a3 = 0.25 * s1 + 0.75 * s2, 0.25 * a1 + 0.75 * a2
    v3 = np.linalg.inv(s3 + r * np.eye(4)) @ g @ np.linalg.inv(a3 + r * np.eye(3))
    np.testing.assert_allclose(to_np(u3), -0.1 * v3, rtol=1e-9)

    foof = sc.kfac(0.1, damping=gamma, kl_clip=None, momentum=0.0, variant="foof")
    state = foof.init(params)
    u, state = foof.update(state, to_xp(xp, g), params, curvature=(None, to_xp(xp, a1)))
    np.testing.assert_allclose(to_np(u), -0.1 * gamma * g @ np.linalg.inv(a1 + gamma * np.eye(3)), rtol=1e-9)
    assert state.s_factor[0] is None


def test_kfac_bad_input():
    with pytest.raises(ValueError, match="variant"):
        sc.kfac(variant="eva")
    with pytest.raises(ValueError, match="inverse_steps"):
        sc.kfac(inverse_steps=0)
    tx = sc.kfac(0.1)
    state = tx.init(np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"curvature must be \(S of shape \(3, 3\), A of shape \(2, 2\)\)"):
        tx.update(state, np.ones((3, 2)), curvature=(np.eye(2), np.eye(3)))


@pytest.mark.parametrize("make", [lambda: sc.kfac(0.1), lambda: sc.kfac(0.1, variant="foof"),
                                  lambda: sc.eva(0.1), lambda: sc.eva_s(0.1)])
def test_leaves_of_any_rank_without_curvature(make):
    """0-d, 1-D and 3-D leaves get SGD with momentum; only 2-D leaves carry factors or vectors."""
    params = {"s": np.ones(()), "b": np.ones(3), "t": np.ones((2, 3, 4)), "w": np.ones((3, 2))}
    grads = {k: np.full(v.shape, 0.5) for k, v in params.items()}
    tx = make()
    state = tx.init(params)
    u, state = tx.update(state, grads, params)
    for k in ("s", "b", "t"):
        np.testing.assert_allclose(u[k], -0.1 * grads[k])
    assert int(state.count) == 1


def test_kfac_keeps_the_previous_inverse_when_a_factor_is_not_finite():
    """A factor that is already non-finite (inputs are checked, so only a state built elsewhere
    can hold one) fails its decomposition, which keeps the previous inverse."""
    rng = np.random.default_rng(4)
    g, s, a = rng.standard_normal((3, 2)), spd(rng, 3), spd(rng, 2)
    tx = sc.kfac(0.1, kl_clip=None, momentum=0.0, inverse_steps=1, stat_decay=0.5)
    state = tx.init(np.zeros((3, 2)))
    _, state = tx.update(state, g, curvature=(s, a))
    kept = state.a_inverse[0].copy()
    bad = a.copy()
    bad[0, 1] = bad[1, 0] = np.inf
    u, state = tx.update(state._replace(a_factor=(bad,)), g, curvature=(s, a))
    np.testing.assert_array_equal(state.a_inverse[0], kept)
    assert np.all(np.isfinite(u))


# The Eva family with what each member reads: vectors (g_bar, a_bar), factors (S, A), or nothing.
FAMILY = {
    "eva": (lambda **kw: sc.eva(0.1, **kw), ("g_bar", "a_bar")),
    "eva_f": (lambda **kw: sc.eva(0.1, variant="eva_f", **kw), ("g_bar", "a_bar")),
    "eva_s": (lambda **kw: sc.eva_s(0.1, **kw), None),
    "kfac": (lambda **kw: sc.kfac(0.1, inverse_steps=1, **kw), ("S", "A")),
    "foof": (lambda **kw: sc.kfac(0.1, variant="foof", inverse_steps=1, **kw), ("S", "A")),
}


def family_step(name, rng):
    """Random finite grads and curvature (``None`` for Eva-s) for params {"w": (3, 2), "b": (3,)}."""
    grads = {"w": rng.standard_normal((3, 2)), "b": rng.standard_normal(3)}
    names = FAMILY[name][1]
    if names is None:
        return grads, None
    pair = (rng.standard_normal(3), rng.standard_normal(2)) if names[0] == "g_bar" else (spd(rng, 3), spd(rng, 2))
    return grads, {"w": pair, "b": None}


def family_update(xp, tx, state, grads, curvature, params):
    grads = to_xp(xp, grads)
    if curvature is None:
        return tx.update(state, grads, params)
    return tx.update(state, grads, params, curvature={"w": to_xp(xp, curvature["w"]), "b": None})


@pytest.mark.parametrize("name", list(FAMILY))
def test_eva_family_nonfinite_raise_names_the_input_and_keeps_the_state(xp, name):
    """Without the check one NaN gradient stays in the momentum (and a NaN factor in K-FAC's
    running average) for every later step."""
    make, names = FAMILY[name]
    rng = np.random.default_rng(0)
    tx = make()
    params = to_xp(xp, {"w": np.zeros((3, 2)), "b": np.zeros(3)})
    state = tx.init(params)
    _, state = family_update(xp, tx, state, *family_step(name, rng), params)
    before = [to_np(x).copy() for x in optree.tree_leaves(state)]
    grads, curvature = family_step(name, rng)
    grads["b"][1] = np.nan
    with pytest.raises(ValueError, match=r"grads\['b'\] has non-finite values \(nonfinite='raise'\)"):
        family_update(xp, tx, state, grads, curvature, params)
    if names is not None:
        grads, curvature = family_step(name, rng)
        bad = curvature["w"][1].copy()
        bad[0] = np.inf
        curvature["w"] = (curvature["w"][0], bad)
        with pytest.raises(ValueError, match=rf"curvature\['w'\]: {names[1]} has non-finite values"):
            family_update(xp, tx, state, grads, curvature, params)
    for a, b in zip(before, (to_np(x) for x in optree.tree_leaves(state))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("where", ["grads", "curvature"])
@pytest.mark.parametrize("name", list(FAMILY))
def test_eva_family_nonfinite_skip_is_a_step_that_never_happened(xp, name, where):
    make, names = FAMILY[name]
    if where == "curvature" and names is None:
        pytest.skip("Eva-s reads no curvature")
    rng = np.random.default_rng(1)
    tx = make(nonfinite="skip")
    params = to_xp(xp, {"w": np.zeros((3, 2)), "b": np.zeros(3)})
    state = tx.init(params)
    for _ in range(2):
        _, state = family_update(xp, tx, state, *family_step(name, rng), params)
    grads, curvature = family_step(name, rng)
    if where == "grads":
        grads["w"][2, 1] = np.nan
    else:
        curvature["w"] = (curvature["w"][0], np.full_like(curvature["w"][1], np.nan))
    updates, skipped = family_update(xp, tx, state, grads, curvature, params)
    for u in to_np(updates).values():
        np.testing.assert_array_equal(u, np.zeros_like(u))
    assert int(skipped.skipped) == int(state.skipped) + 1 == 1
    assert int(skipped.count) == int(state.count) == 2
    for a, b in zip(optree.tree_leaves(state._replace(skipped=None)), optree.tree_leaves(skipped._replace(skipped=None))):
        np.testing.assert_array_equal(to_np(a), to_np(b))
    good = family_step(name, rng)
    u1, _ = family_update(xp, tx, skipped, *good, params)
    u2, _ = family_update(xp, tx, state, *good, params)
    for k in ("w", "b"):
        np.testing.assert_array_equal(to_np(u1[k]), to_np(u2[k]))


def test_foof_does_not_read_s():
    """FOOF ignores S, so a NaN there is neither read nor refused."""
    tx = sc.kfac(0.1, variant="foof")
    state = tx.init(np.zeros((3, 2)))
    u, state = tx.update(state, np.ones((3, 2)), curvature=(np.full((3, 3), np.nan), np.eye(2)))
    assert np.all(np.isfinite(u)) and int(state.skipped) == 0


@pytest.mark.parametrize("make", [lambda: sc.eva(nonfinite="warn"), lambda: sc.eva_s(nonfinite=None),
                                  lambda: sc.kfac(nonfinite="Skip")])
def test_eva_family_nonfinite_is_validated(make):
    with pytest.raises(ValueError, match="nonfinite must be 'raise', 'skip' or 'ignore'"):
        make()


def test_layer_curvature_from_sample_rows(xp):
    """ā is the mean input with a trailing 1; ḡ the batch mean of per-sample output gradients
    summed over positions; K-FAC's A and S the second moments over all rows."""
    from shampoo_core.curvature import layer_curvature

    rng = np.random.default_rng(0)
    batch, positions, n, m = 3, 2, 4, 5
    a = rng.standard_normal((batch * positions, n)).astype(np.float32)
    g = rng.standard_normal((batch * positions, m)).astype(np.float32)
    a1 = np.concatenate([a, np.ones((batch * positions, 1), np.float32)], axis=1)
    per_sample = g * batch  # gradients of a batch-mean loss, scaled to per-sample gradients
    expected = {
        "eva": (per_sample.reshape(batch, positions, m).sum(1).mean(0), a1.mean(0)),
        "kfac": (per_sample.T @ per_sample / (batch * positions), a1.T @ a1 / (batch * positions)),
    }
    for kind, (left, right) in expected.items():
        got = layer_curvature(_xp_module(xp), kind, to_xp(xp, a), to_xp(xp, g), batch)
        np.testing.assert_allclose(to_np(got[0]), left, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(to_np(got[1]), right, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="kind must be 'eva' or 'kfac'"):
        layer_curvature(_xp_module(xp), "eva_s", to_xp(xp, a), to_xp(xp, g), batch)


def _xp_module(xp):
    from shampoo_core import _xp

    return _xp.namespace(to_xp(xp, np.zeros(1, np.float32)))
