"""Eva / K-FAC on JAX: curvature from output taps, and whole jitted steps (no host reads)."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402

import shampoo_core as sc  # noqa: E402
from backends import jax_backend  # noqa: E402, F401  (registers lax.cond)
from backends.jax_curvature import Taps, value_grads_and_curvature  # noqa: E402
from helpers import XlaCompiles, compiled_copies, train  # noqa: E402


def mlp_loss(params, taps, x, y):
    h = jnp.tanh(taps.dense(params["w1"], x))
    return jnp.mean((taps.dense(params["w2"], h) * params["scale"] - y) ** 2)


def make_step(tx, loss_fn, *args, kind="eva"):
    """One training step: curvature from the taps, the transformation's update, applied."""

    def step(p, s):
        loss, grads, curv = value_grads_and_curvature(loss_fn, p, *args, kind=kind)
        updates, s = tx.update(s, grads, p, curvature=curv)
        return jax.tree_util.tree_map(lambda a, b: a + b, p, updates), s, loss

    return step


def problem(seed=0, batch=32):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((batch, 6)))
    y = jnp.asarray(np.tanh(rng.standard_normal((batch, 6)) @ rng.standard_normal((6, 3))))
    params = {"w1": jnp.asarray(rng.standard_normal((8, 7)) * 0.4), "w2": jnp.asarray(rng.standard_normal((3, 9)) * 0.4),
              "scale": jnp.ones(())}
    return params, x, y


def test_linear_curvature_matches_hand_derivation():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((16, 5)), rng.standard_normal((16, 3))
    w = rng.standard_normal((3, 6))

    def loss_fn(p, taps):
        return jnp.mean((taps.dense(p["w"], jnp.asarray(x)) - jnp.asarray(y)) ** 2)

    loss, grads, (curv_eva,) = [v if i < 2 else (v["w"],) for i, v in
                                enumerate(value_grads_and_curvature(loss_fn, {"w": jnp.asarray(w)}))]
    _, _, curv_kfac = value_grads_and_curvature(loss_fn, {"w": jnp.asarray(w)}, kind="kfac")
    z = x @ w[:, :5].T + w[:, 5]
    dz = 2 * (z - y) / (16 * 3)  # dL/dz of the mean loss
    xa = np.concatenate([x, np.ones((16, 1))], axis=1)
    np.testing.assert_allclose(float(loss), np.mean((z - y) ** 2), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(grads["w"]), dz.T @ xa, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(np.asarray(curv_eva[0]), (16 * dz).mean(0), rtol=1e-10)
    np.testing.assert_allclose(np.asarray(curv_eva[1]), xa.mean(0), rtol=1e-12)
    s, a = curv_kfac["w"]
    np.testing.assert_allclose(np.asarray(s), (16 * dz).T @ (16 * dz) / 16, rtol=1e-10)
    np.testing.assert_allclose(np.asarray(a), xa.T @ xa / 16, rtol=1e-12)


def test_patches_count_as_samples():
    """Input (batch, positions, n): ḡ sums output gradients over positions, ā averages inputs."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((4, 5, 3)))
    w = jnp.asarray(rng.standard_normal((2, 4)))

    def loss_fn(p, taps):
        return jnp.mean(jnp.sum(taps.dense(p["w"], x) ** 2, axis=(1, 2)))

    _, _, curv = value_grads_and_curvature(loss_fn, {"w": w})
    z = np.asarray(x) @ np.asarray(w)[:, :3].T + np.asarray(w)[:, 3]  # (4, 5, 2)
    per_sample = 2 * z  # d(sum z²)/dz, per sample (the loss is the batch mean)
    np.testing.assert_allclose(np.asarray(curv["w"][0]), per_sample.sum(1).mean(0), rtol=1e-10)
    np.testing.assert_allclose(np.asarray(curv["w"][1][:3]), np.asarray(x).reshape(-1, 3).mean(0), rtol=1e-12)


def test_taps_errors_and_plain_mode():
    params, x, y = problem()
    plain = mlp_loss(params, Taps(), x, y)
    loss, _, curv = value_grads_and_curvature(mlp_loss, params, x, y)
    np.testing.assert_allclose(float(loss), float(plain), rtol=1e-14)
    assert curv["scale"] is None and curv["w1"][1].shape == (7,)
    with pytest.raises(ValueError, match="parameter leaf passed unchanged"):
        value_grads_and_curvature(lambda p, taps: jnp.sum(taps.dense(p["w1"] * 1.0, x)), params)
    with pytest.raises(ValueError, match=r"w must have shape \(m, 7\)"):
        Taps().dense(jnp.zeros((3, 6)), x)
    with pytest.raises(ValueError, match="kind must be"):
        value_grads_and_curvature(mlp_loss, params, x, y, kind="shampoo")


@pytest.mark.parametrize("kind, make", [
    ("eva", lambda: sc.eva(0.3, nonfinite="skip")),
    ("eva", lambda: sc.eva(0.3, variant="eva_f", nonfinite="skip")),
    ("eva", lambda: sc.eva(0.3, two_sided=True, kl_clip=None, damping=1.0, nonfinite="skip")),
    ("kfac", lambda: sc.kfac(0.3, inverse_steps=3, nonfinite="skip")),
    ("kfac", lambda: sc.kfac(0.3, variant="foof", inverse_steps=2, nonfinite="skip")),
])
def test_jitted_step_equals_eager_and_learns(kind, make):
    params, x, y = problem()
    tx = make()
    step = make_step(tx, mlp_loss, x, y, kind=kind)
    jitted = jax.jit(step)
    p_eager = p_jit = params
    s_eager = s_jit = tx.init(params)
    losses = []
    for _ in range(12):
        p_eager, s_eager, _ = step(p_eager, s_eager)
        p_jit, s_jit, loss = jitted(p_jit, s_jit)
        losses.append(float(loss))
    for k in params:
        np.testing.assert_allclose(np.asarray(p_jit[k]), np.asarray(p_eager[k]), rtol=1e-9, atol=1e-12)
    assert int(s_jit.count) == 12
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("kind, make", [
    ("eva", lambda: sc.eva(0.3, nonfinite="skip")),
    ("kfac", lambda: sc.kfac(0.3, inverse_steps=2, nonfinite="skip")),
])
def test_jitted_step_compiles_once(kind, make):
    """``init``'s state has the signature of the state the jitted step returns (no second compile)."""
    params, x, y = problem()
    tx = make()
    jitted = jax.jit(make_step(tx, mlp_loss, x, y, kind=kind))
    p, s, _ = jitted(params, tx.init(params))
    with XlaCompiles() as compiles:
        for _ in range(3):
            p, s, _ = jitted(p, s)
    assert compiles.count == 0


def test_eva_s_jits_with_a_schedule():
    params, x, y = problem()
    tx = sc.eva_s(lambda count: 0.5 / (1.0 + count), nonfinite="skip")
    grads = jax.grad(lambda p: mlp_loss(p, Taps(), x, y))(params)
    s1 = s2 = tx.init(params)
    for _ in range(3):
        u1, s1 = tx.update(s1, grads, params)
        u2, s2 = jax.jit(tx.update)(s2, grads, params)
        for k in params:
            np.testing.assert_allclose(np.asarray(u2[k]), np.asarray(u1[k]), rtol=1e-12, atol=1e-14)


def conv_problem(seed=4):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((6, 2, 7, 7)))
    kernel = rng.standard_normal((3, 2, 3, 3)) * 0.3  # OIHW
    bias = rng.standard_normal(3) * 0.1
    w = jnp.asarray(np.concatenate([kernel.reshape(3, -1), bias[:, None]], axis=1))
    return x, kernel, bias, w


@pytest.mark.parametrize("stride, padding", [((1, 1), "VALID"), ((2, 2), "SAME")])
def test_conv2d_is_the_convolution_and_its_curvature_is_over_patches(stride, padding):
    x, kernel, bias, w = conv_problem()
    expected = jax.lax.conv_general_dilated(x, jnp.asarray(kernel), stride, padding) + bias[None, :, None, None]
    y = Taps().conv2d(w, x, (3, 3), stride=stride, padding=padding)
    np.testing.assert_allclose(np.asarray(y), np.asarray(expected), rtol=1e-12, atol=1e-12)

    def loss_fn(p, taps):
        return jnp.mean(jnp.sum(taps.conv2d(p["w"], x, (3, 3), stride=stride, padding=padding) ** 2, axis=(1, 2, 3)))

    _, grads, curv = value_grads_and_curvature(loss_fn, {"w": w})
    _, _, curv_kfac = value_grads_and_curvature(loss_fn, {"w": w}, kind="kfac")
    patches = np.moveaxis(np.asarray(jax.lax.conv_general_dilated_patches(x, (3, 3), stride, padding)), 1, -1)
    pa = np.concatenate([patches.reshape(-1, 18), np.ones((patches[..., 0].size, 1))], axis=1)
    per_sample = 2 * np.moveaxis(np.asarray(y), 1, -1)  # d(sum y²)/dy per sample, (6, h', w', 3)
    np.testing.assert_allclose(np.asarray(curv["w"][0]), per_sample.sum((1, 2)).mean(0), rtol=1e-10)
    np.testing.assert_allclose(np.asarray(curv["w"][1]), pa.mean(0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.asarray(curv_kfac["w"][1]), pa.T @ pa / pa.shape[0], rtol=1e-12, atol=1e-14)
    # The weight gradient is the dense layer's over patch positions.
    ps = per_sample.reshape(-1, 3) / 6
    np.testing.assert_allclose(np.asarray(grads["w"]), ps.T @ pa, rtol=1e-10, atol=1e-12)


def test_conv2d_errors_and_jitted_eva_on_a_conv_net():
    x, _, _, w = conv_problem()
    with pytest.raises(ValueError, match="x must be"):
        Taps().conv2d(w, x[0], (3, 3))
    with pytest.raises(ValueError, match=r"w must have shape \(m, 19\)"):
        Taps().conv2d(w[:, 1:], x, (3, 3))
    rng = np.random.default_rng(5)
    params = {"conv": w, "head": jnp.asarray(rng.standard_normal((1, 3 * 25 + 1)) * 0.1)}
    target = jnp.asarray(rng.standard_normal((6, 1)))

    def loss_fn(p, taps, x, y):
        h = jnp.tanh(taps.conv2d(p["conv"], x, (3, 3)))
        return jnp.mean((taps.dense(p["head"], h.reshape(h.shape[0], -1)) - y) ** 2)

    tx = sc.eva(0.1, nonfinite="skip")
    step = jax.jit(make_step(tx, loss_fn, x, target))
    _, _, losses = train(step, params, tx.init(params), 30)
    assert losses[-1] < 0.5 * losses[0]


FAMILY = {
    "eva": ("eva", lambda **kw: sc.eva(0.3, **kw)),
    "eva_f": ("eva", lambda **kw: sc.eva(0.3, variant="eva_f", **kw)),
    "two_sided": ("eva", lambda **kw: sc.eva(0.3, two_sided=True, kl_clip=None, damping=1.0, weight_decay=0.1, **kw)),
    "eva_s": (None, lambda **kw: sc.eva_s(0.3, weight_decay=0.1, **kw)),
    "kfac": ("kfac", lambda **kw: sc.kfac(0.3, inverse_steps=2, **kw)),
    "foof": ("kfac", lambda **kw: sc.kfac(0.3, variant="foof", inverse_steps=2, **kw)),
}


def _update(tx, kind, state, grads, params, curv):
    """``tx.update``, with the curvature where the optimizer reads one (Eva-s reads none)."""
    if kind is None:
        return tx.update(state, grads, params)
    return tx.update(state, grads, params, curvature=curv)


def _family_update(tx, kind, params):
    """``update(state, grads, curvature)`` of ``tx`` on ``params`` under jax.jit."""
    return jax.jit(lambda s, g, c: _update(tx, kind, s, g, params, c))


@pytest.mark.parametrize("with_cond", [True, False], ids=["lax.cond", "where"])
@pytest.mark.parametrize("bad_step", [1, 3])
@pytest.mark.parametrize("bad", ["grads", "curvature"])
@pytest.mark.parametrize("name", list(FAMILY))
def test_traced_nonfinite_input_is_skipped_without_a_host_read(monkeypatch, name, bad, bad_step, with_cond):
    """Under jax.jit ``nonfinite="skip"`` keeps the old state bit for bit, on the first step and
    on a later one where K-FAC's inverses are due again (under lax.cond or not), and a finite step
    after it equals one where the bad step never came; ``"raise"`` says it cannot read traced
    inputs. The state is gated inside the step, not selected after it (``eva.run_step``)."""
    kind, make = FAMILY[name]
    if kind is None and bad == "curvature":
        pytest.skip("Eva-s reads no curvature")
    if not with_cond:
        from shampoo_core import _xp

        monkeypatch.setattr(_xp, "_CONDS", {})
    params, x, y = problem()
    tx = make(nonfinite="skip")
    _, grads, curv = value_grads_and_curvature(mlp_loss, params, x, y, kind=kind or "eva")
    curv = None if kind is None else curv
    update = _family_update(tx, kind, params)
    state = tx.init(params)
    for _ in range(bad_step - 1):
        _, state = update(state, grads, curv)
    if bad == "grads":
        bad_grads, bad_curv = dict(grads, w1=grads["w1"].at[0, 0].set(jnp.inf)), curv
    else:
        bad_grads, bad_curv = grads, dict(curv, w2=(curv["w2"][0], curv["w2"][1].at[0].set(jnp.nan)))
    updates, new = update(state, bad_grads, bad_curv)
    assert int(new.skipped) == 1 and int(new.count) == bad_step - 1
    for u in jax.tree_util.tree_leaves(updates):
        np.testing.assert_array_equal(np.asarray(u), 0.0)
    for a, b in zip(jax.tree_util.tree_leaves(state._replace(skipped=None)),
                    jax.tree_util.tree_leaves(new._replace(skipped=None))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    u_after, s_after = update(new, grads, curv)
    u_never, s_never = update(state, grads, curv)
    for a, b in zip(jax.tree_util.tree_leaves((u_after, s_after._replace(skipped=None))),
                    jax.tree_util.tree_leaves((u_never, s_never._replace(skipped=None)))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    strict = make()
    with pytest.raises(ValueError, match="traced arrays .*pass nonfinite='skip'"):
        _family_update(strict, kind, params)(strict.init(params), grads, curv)


def test_traced_skip_matches_ignore_on_finite_steps():
    """Gated inside the averages, a finite step under "skip" is the step of "ignore" (same
    programs up to XLA's fusion: the tolerance of the jitted-against-eager test above)."""
    params, x, y = problem()
    for name, (kind, make) in FAMILY.items():
        _, grads, curv = value_grads_and_curvature(mlp_loss, params, x, y, kind=kind or "eva")
        curv = None if kind is None else curv
        runs = []
        for mode in ("skip", "ignore"):
            tx = make(nonfinite=mode)
            update, state, out = _family_update(tx, kind, params), tx.init(params), []
            for _ in range(3):
                updates, state = update(state, grads, curv)
                out.append(updates)
            runs.append(jax.tree_util.tree_leaves((out, state._replace(skipped=None))))
        for a, b in zip(*runs):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("name", list(FAMILY))
def test_donated_jitted_step_with_skip_copies_no_state(name):
    """With the state donated to ``jax.jit``, "skip" must let XLA write it in place, as in
    ``sc.shampoo`` (tests/test_jax.py): "skip" may add no copy to the step of "ignore"."""
    kind, make = FAMILY[name]
    params, x, y = problem()
    _, grads, curv = value_grads_and_curvature(mlp_loss, params, x, y, kind=kind or "eva")
    curv = None if kind is None else curv

    def copies(tx):
        def train_step(params, state, grads, curv):
            updates, state = _update(tx, kind, state, grads, params, curv)
            return sc.apply_updates(params, updates), state

        return compiled_copies(train_step, params, tx.init(params), grads, curv, donate_argnums=(0, 1))

    counts = {mode: copies(make(nonfinite=mode)) for mode in ("skip", "ignore")}
    assert counts["skip"] == counts["ignore"], counts


def _optax_adapter():
    pytest.importorskip("optax")
    from backends import optax_adapter

    return optax_adapter


@pytest.mark.parametrize("kind, adapted, core", [
    ("eva", lambda: _optax_adapter().eva(0.3), lambda: sc.eva(0.3, nonfinite="skip")),
    ("kfac", lambda: _optax_adapter().kfac(0.3, inverse_steps=2), lambda: sc.kfac(0.3, inverse_steps=2, nonfinite="skip")),
    ("kfac", lambda: _optax_adapter().kfac(0.3, variant="foof"), lambda: sc.kfac(0.3, variant="foof", nonfinite="skip")),
])
def test_optax_adapter_in_a_jitted_chain_equals_the_core(kind, adapted, core):
    """``optax.chain(clip, eva)`` passes ``curvature`` through to the member that takes it; the
    result is the core's update of the clipped gradients."""
    optax = pytest.importorskip("optax")
    params, x, y = problem()
    clip = optax.clip_by_global_norm(0.05)
    chain = optax.chain(clip, adapted())
    tx = core()

    @jax.jit
    def chained(p, s):
        _, grads, curv = value_grads_and_curvature(mlp_loss, p, x, y, kind=kind)
        updates, s = chain.update(grads, s, p, curvature=curv)
        return optax.apply_updates(p, updates), s

    p_chain, s_chain = params, chain.init(params)
    p_core, s_core = params, tx.init(params)
    for _ in range(5):
        p_chain, s_chain = chained(p_chain, s_chain)
        _, grads, curv = value_grads_and_curvature(mlp_loss, p_core, x, y, kind=kind)
        clipped, _ = clip.update(grads, clip.init(p_core))
        updates, s_core = tx.update(s_core, clipped, p_core, curvature=curv)
        p_core = optax.apply_updates(p_core, updates)
    for k in params:
        np.testing.assert_allclose(np.asarray(p_chain[k]), np.asarray(p_core[k]), rtol=1e-9, atol=1e-12)
    assert int(s_chain[1].count) == 5


def test_optax_adapter_eva_s_takes_a_schedule_and_ignores_curvature():
    optax = pytest.importorskip("optax")
    optax_adapter = _optax_adapter()
    params, x, y = problem()
    schedule = optax.exponential_decay(0.5, transition_steps=1, decay_rate=0.5)
    clip = optax.clip_by_global_norm(0.05)
    chain = optax.chain(clip, optax_adapter.eva_s(schedule))
    core = sc.eva_s(schedule)
    _, grads, curv = value_grads_and_curvature(mlp_loss, params, x, y)
    clipped, _ = clip.update(grads, clip.init(params))
    s_chain, s_core = chain.init(params), core.init(params)
    for _ in range(3):
        u_chain, s_chain = jax.jit(lambda s: chain.update(grads, s, params, curvature=curv))(s_chain)
        u_core, s_core = core.update(s_core, clipped, params)
        for k in params:
            np.testing.assert_allclose(np.asarray(u_chain[k]), np.asarray(u_core[k]), rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="damping"):
        optax_adapter.eva(0.1, damping=0.0)


@pytest.mark.parametrize("kind, factory", [("eva", "eva"), ("kfac", "kfac"), ("eva", "eva_s")])
def test_custom_jax_pytrees_train_as_plain_dicts(kind, factory):
    """Parameters in nodes only JAX's registry knows (here a registered dataclass; flax structs and
    equinox modules alike): curvature and updates keep that structure, and the steps are those of
    the same leaves in a plain dict."""
    import dataclasses

    optax = pytest.importorskip("optax")

    @jax.tree_util.register_dataclass
    @dataclasses.dataclass
    class Net:
        w1: jax.Array
        w2: jax.Array
        scale: jax.Array

    def net_loss(net, taps, x, y):
        return mlp_loss({"w1": net.w1, "w2": net.w2, "scale": net.scale}, taps, x, y)

    params, x, y = problem()
    runs = []
    for p, loss_fn in ((params, mlp_loss), (Net(**params), net_loss)):
        tx = getattr(_optax_adapter(), factory)(0.3)

        @jax.jit
        def step(p, s, tx=tx, loss_fn=loss_fn):
            _, grads, curv = value_grads_and_curvature(loss_fn, p, x, y, kind=kind)
            updates, s = tx.update(grads, s, p, curvature=curv)
            return optax.apply_updates(p, updates), s

        s = tx.init(p)
        for _ in range(3):
            p, s = step(p, s)
        runs.append(p)
    assert isinstance(runs[1], Net)
    for k in params:
        np.testing.assert_array_equal(np.asarray(getattr(runs[1], k)), np.asarray(runs[0][k]))
