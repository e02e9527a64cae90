"""JAX: ``tx.update`` under ``jax.jit`` (branch-free), whole jitted steps, and the optax adapter."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402

import shampoo_core as sc  # noqa: E402
from backends import optax_adapter  # noqa: E402
from shampoo_core import _xp  # noqa: E402
from helpers import XlaCompiles, compiled_copies, train  # noqa: E402

HP = dict(block_size=4, start_preconditioning_step=3, preconditioning_compute_steps=2,
          statistics_compute_steps=1, beta2=0.99, graft_type="adam", nonfinite="skip", epsilon=1e-3)


def params_and_grads(dtype, steps=7):
    rng = np.random.default_rng(0)
    shapes = {"w": (6, 5), "t": (2, 3, 4), "b": (5,), "s": ()}
    params = {k: jnp.asarray(rng.standard_normal(s), dtype=dtype) for k, s in shapes.items()}
    grads = [{k: jnp.asarray(rng.standard_normal(s), dtype=dtype) for k, s in shapes.items()} for _ in range(steps)]
    return params, grads


@pytest.mark.parametrize(
    "root_method, dtype, with_cond",
    [("eigh", jnp.float32, True), ("eigh", jnp.float64, True), ("eigh", jnp.float64, False),
     ("eigh", jnp.float32, False), ("newton", jnp.float64, True)],
)
def test_jit_update_equals_eager(root_method, dtype, with_cond, monkeypatch):
    if not with_cond:  # the where-fallback must give the same numbers as lax.cond
        monkeypatch.setattr(_xp, "_CONDS", {})
    tx = sc.shampoo(0.1, root_method=root_method, **HP)
    params, grads = params_and_grads(dtype)
    jitted = jax.jit(tx.update)
    s_eager = s_jit = tx.init(params)
    # Rounding of the statistics (~block_size·eps relative to λmax) is amplified by κ ≤ 1/epsilon
    # in the root of the smallest eigenvalues.
    tol = 10 * HP["block_size"] * float(jnp.finfo(dtype).eps) / HP["epsilon"]
    for g in grads:
        u_eager, s_eager = tx.update(s_eager, g, params)
        u_jit, s_jit = jitted(s_jit, g, params)
        for k in params:
            np.testing.assert_allclose(np.asarray(u_jit[k]), np.asarray(u_eager[k]), rtol=tol, atol=tol)
    assert int(s_jit.count) == len(grads)
    np.testing.assert_array_equal(np.asarray(s_jit.params[0].blocks[0].failures),
                                  np.asarray(s_eager.params[0].blocks[0].failures))


def test_whole_training_step_jits_and_learns():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((64, 8)))
    y = jnp.tanh(x @ jnp.asarray(rng.standard_normal((8, 3))))
    params = {"w1": jnp.asarray(rng.standard_normal((8, 16)) * 0.3), "b1": jnp.zeros(16),
              "w2": jnp.asarray(rng.standard_normal((16, 3)) * 0.3), "b2": jnp.zeros(3)}

    def loss(p):
        h = jnp.tanh(x @ p["w1"] + p["b1"])
        return jnp.mean((h @ p["w2"] + p["b2"] - y) ** 2)

    tx = optax_adapter.shampoo(0.02, block_size=8, start_preconditioning_step=5, preconditioning_compute_steps=5)

    @jax.jit
    def step(p, s):
        value, g = jax.value_and_grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, value

    params, state, losses = train(step, params, tx.init(params), 60)
    assert losses[-1] < 0.2 * losses[0]
    assert int(state.count) == 60


def test_optax_chain_and_schedule():
    params, grads = params_and_grads(jnp.float64, steps=4)
    schedule = optax.linear_schedule(0.1, 0.01, transition_steps=4)
    chained = optax.chain(optax.clip_by_global_norm(1.0), optax_adapter.shampoo(schedule, **HP))
    direct = sc.shampoo(schedule, **HP)
    s_chain = chained.init(params)
    s_direct = direct.init(params)
    # Both jitted: an optax schedule evaluates in float32 for a traced int32 count.
    update = jax.jit(chained.update)
    direct_update = jax.jit(direct.update)
    for g in grads:
        u_chain, s_chain = update(g, s_chain, params)
        clipped, _ = optax.clip_by_global_norm(1.0).update(g, optax.EmptyState())
        u_direct, s_direct = direct_update(s_direct, clipped, params)
        for k in params:
            np.testing.assert_allclose(np.asarray(u_chain[k]), np.asarray(u_direct[k]), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bad_step", [2, 3], ids=["statistics step", "root step"])
@pytest.mark.parametrize("with_cond", [True, False], ids=["lax.cond", "where"])
def test_nonfinite_skip_under_jit(monkeypatch, with_cond, bad_step):
    """The finiteness flag selects between the step, computed on zeroed inputs, and the skip, with
    the roots' lax.cond registered or not. The statistics and the roots are gated on the flag
    inside the step, so a skipped root step (step 3 of ``HP``) must leave them as they were."""
    if not with_cond:
        monkeypatch.setattr(_xp, "_CONDS", {})
    tx = optax_adapter.shampoo(0.1, **HP)
    params, grads = params_and_grads(jnp.float64, steps=bad_step + 1)
    update = jax.jit(tx.update)
    state = tx.init(params)
    for g in grads[:bad_step - 1]:
        _, state = update(g, state, params)
    bad = dict(grads[bad_step - 1], w=grads[bad_step - 1]["w"].at[0, 0].set(jnp.nan))
    u, new_state = update(bad, state, params)
    assert all(not np.any(np.asarray(v)) for v in u.values())
    assert int(new_state.skipped) == 1 and int(new_state.count) == bad_step - 1
    for a, b in zip(jax.tree_util.tree_leaves(new_state.params), jax.tree_util.tree_leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The next finite step is the step the bad one never disturbed, as taken eagerly.
    u_jit, _ = update(grads[bad_step], new_state, params)
    u_eager, _ = tx.update(grads[bad_step], state, params)
    for k in params:
        np.testing.assert_allclose(np.asarray(u_jit[k]), np.asarray(u_eager[k]), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("graft_type", ["adagrad", "rmsprop", "adam", "sgd", "none"])
@pytest.mark.parametrize("beta1, nesterov, weight_decay", [(0.9, False, 0.0), (0.9, True, 0.0), (0.0, False, 0.0),
                                                           (0.9, False, 0.1)],
                         ids=["momentum", "nesterov", "no momentum", "coupled decay"])
def test_traced_skip_gates_the_averages_in_place(graft_type, beta1, nesterov, weight_decay):
    """Under jit, "skip" gates the first moment and the grafting accumulator inside their running
    averages instead of selecting the old state after the step. A bad step (a statistics step and
    a root step) must still leave every array of the state as it was, and a finite step must
    give what "ignore", which gates nothing, gives (to rounding: XLA fuses the two programs, and
    contracts their multiply-adds, differently)."""
    hp = dict(HP, graft_type=graft_type, beta1=beta1, nesterov=nesterov, weight_decay=weight_decay,
              decoupled_weight_decay=weight_decay == 0.0)
    skip, ignore = sc.shampoo(0.1, **hp), sc.shampoo(0.1, **dict(hp, nonfinite="ignore"))
    params, grads = params_and_grads(jnp.float64, steps=6)
    update, reference = jax.jit(skip.update), jax.jit(ignore.update)
    state = ref_state = skip.init(params)
    tol = 10 * HP["block_size"] * float(jnp.finfo(jnp.float64).eps) / HP["epsilon"]  # as in test_jit_update_equals_eager
    for i, g in enumerate(grads):
        if i in (1, 2):  # steps 2 (statistics) and 3 (roots; HP computes roots every 2 steps from 3)
            bad = dict(g, t=g["t"].at[1, 2, 3].set(jnp.inf if i == 1 else jnp.nan))
            u, new_state = update(state, bad, params)
            assert not any(np.any(np.asarray(v)) for v in u.values())
            for a, b in zip(jax.tree_util.tree_leaves(new_state.params), jax.tree_util.tree_leaves(state.params)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            state = new_state
        u, state = update(state, g, params)
        r, ref_state = reference(ref_state, g, params)
        for k in params:
            np.testing.assert_allclose(np.asarray(u[k]), np.asarray(r[k]), rtol=tol, atol=tol)
        for a, b in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(ref_state.params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)
    assert int(state.skipped) == 2 and int(state.count) == len(grads)


def _compiled_copies(tx, params, grads) -> int:
    """Array copies in the compiled HLO of a whole training step that donates the parameters and
    the state, and returns them in the places they came from (JAX pairs a donated input with an
    output of the same shape, in order)."""

    def train_step(params, state, grads):
        updates, state = tx.update(state, grads, params)
        return sc.apply_updates(params, updates), state

    return compiled_copies(train_step, params, tx.init(params), grads, donate_argnums=(0, 1))


def test_donated_jitted_step_with_skip_copies_no_state():
    """With the state donated to ``jax.jit``, "skip" must let XLA write it in place: a select
    between the new and the old state after the step keeps the old arrays alive to the end, and
    XLA copies them first (6 copies here when the first moment and the accumulator were selected
    so). "skip" may add no copy to the step of "ignore"."""
    rng = np.random.default_rng(0)
    shapes = {"w": (64, 32), "v": (32, 64), "b": (32,)}
    params = {k: jnp.asarray(rng.standard_normal(s), dtype=jnp.float32) for k, s in shapes.items()}
    grads = {k: jnp.asarray(rng.standard_normal(s), dtype=jnp.float32) for k, s in shapes.items()}
    for graft_type in ("adagrad", "adam"):
        copies = {mode: _compiled_copies(sc.shampoo(1e-3, nonfinite=mode, block_size=32, start_preconditioning_step=1,
                                                    graft_type=graft_type), params, grads)
                  for mode in ("skip", "ignore")}
        assert copies["skip"] == copies["ignore"], (graft_type, copies)


def test_nonfinite_raise_under_jit_explains():
    tx = sc.shampoo(0.1, block_size=4)
    params, grads = params_and_grads(jnp.float64, steps=1)
    with pytest.raises(ValueError, match="pass nonfinite='skip'"):
        jax.jit(tx.update)(tx.init(params), grads[0], params)


def test_first_order_optimizers_jit():
    params, grads = params_and_grads(jnp.float64, steps=3)
    for tx in (sc.adam(0.1), sc.sgd(0.1, momentum=0.9), sc.adagrad(0.1)):
        s1 = s2 = tx.init(params)
        for g in grads:
            u1, s1 = tx.update(s1, g, params)
            u2, s2 = jax.jit(tx.update)(s2, g, params)
            for k in params:
                np.testing.assert_allclose(np.asarray(u2[k]), np.asarray(u1[k]), rtol=1e-12, atol=1e-14)


def test_device_kind_of_traced_arrays(monkeypatch):
    """Under jit a statistic has no readable device: ``backends.jax_backend`` says JAX's default
    backend; without a registered rule the kind is "unknown" and ``auto`` falls back to eigh."""
    seen = []
    jax.jit(lambda x: seen.append(_xp.device_kind(x)) or x)(jnp.ones(3))
    monkeypatch.setattr(_xp, "_DEVICE_KINDS", {})
    jax.jit(lambda x: seen.append(_xp.device_kind(x)) or x)(jnp.ones(4))
    assert seen == [jax.default_backend(), "unknown"]


def _inject(factory, **hyperparameters):
    return optax.inject_hyperparams(factory, static_args=optax_adapter.static_args(factory))(**hyperparameters)


def test_inject_hyperparams_learning_rate_can_be_read_and_changed():
    """optax.inject_hyperparams over the adapter: the injected learning rate is the state's, under
    jit; changing it between steps gives the steps of the same change made by a schedule."""
    params, grads = params_and_grads(jnp.float64, steps=6)
    tx = _inject(optax_adapter.shampoo, learning_rate=0.1, **HP)
    reference = optax_adapter.shampoo(optax.piecewise_constant_schedule(0.1, {3: 0.5}), **HP)
    state, ref_state = tx.init(params), reference.init(params)
    update, ref_update = jax.jit(tx.update), jax.jit(reference.update)
    for i, g in enumerate(grads):
        if i == 3:
            state.hyperparams["learning_rate"] = 0.05
        u, state = update(g, state, params)
        r, ref_state = ref_update(g, ref_state, params)
        assert float(state.hyperparams["learning_rate"]) == (0.1 if i < 3 else 0.05)
        for k in params:
            np.testing.assert_array_equal(np.asarray(u[k]), np.asarray(r[k]))


@pytest.mark.parametrize("name", ["shampoo", "eva_s"])
def test_inject_hyperparams_weight_decay_follows_an_optax_schedule(name):
    """weight_decay is injectable, as in optax.adamw: an optax schedule of it, under jit and
    compiled once, gives the updates of the core rebuilt at every step with that step's float."""
    params, grads = params_and_grads(jnp.float64, steps=6)
    schedule = optax.linear_schedule(0.1, 0.0, transition_steps=4)
    factory = getattr(optax_adapter, name)
    hp = dict(HP, decoupled_weight_decay=True) if name == "shampoo" else {}
    tx = _inject(factory, learning_rate=0.1, weight_decay=schedule, **hp)
    state = tx.init(params)
    ref_state = factory(0.1, **hp).init(params)
    update = jax.jit(tx.update)
    update(grads[0], state, params)  # compiles
    runs = []
    with XlaCompiles() as compiles:
        for g in grads:
            u, state = update(g, state, params)
            runs.append((u, float(state.hyperparams["weight_decay"])))  # the value this update used
    assert compiles.count == 0
    for i, (g, (u, wd)) in enumerate(zip(grads, runs)):
        assert wd == pytest.approx(float(schedule(i)), rel=1e-7, abs=1e-9)
        r, ref_state = factory(0.1, weight_decay=wd, **hp).update(g, ref_state, params)
        for k in params:
            np.testing.assert_allclose(np.asarray(u[k]), np.asarray(r[k]), rtol=1e-11, atol=1e-14)
    with pytest.raises(ValueError, match=r"params are required when weight_decay > 0 \(or an array\)"):
        update(grads[0], state)


@pytest.mark.parametrize("name", ["shampoo", "eva", "eva_s", "kfac"])
def test_adapters_have_their_core_signature(name):
    """inject_hyperparams binds arguments by name: each factory must list its core's keywords."""
    import inspect

    factory, core = getattr(optax_adapter, name), getattr(sc, name)
    assert list(inspect.signature(factory).parameters) == list(inspect.signature(core).parameters)
    assert inspect.signature(factory).parameters["nonfinite"].default == "skip"
    params, grads = params_and_grads(jnp.float64, steps=1)
    tx = _inject(factory, learning_rate=0.1)
    state = tx.init(params)
    assert set(state.hyperparams) == {"learning_rate", "weight_decay"}
    if name in ("shampoo", "eva_s"):  # the others take their curvature from taps (test_jax_curvature)
        u, _ = jax.jit(tx.update)(grads[0], state, params)
        u_ref, _ = getattr(optax_adapter, name)(0.1).update(grads[0], getattr(optax_adapter, name)(0.1).init(params), params)
        for k in params:
            np.testing.assert_allclose(np.asarray(u[k]), np.asarray(u_ref[k]), rtol=1e-12, atol=1e-15)


def test_inject_hyperparams_without_static_args_names_them():
    params, _ = params_and_grads(jnp.float32, steps=1)
    with pytest.raises(TypeError, match=r"block_size must be a Python value, not an array .*"
                       r"static_args=optax_adapter.static_args\(optax_adapter.shampoo\)"):
        optax.inject_hyperparams(optax_adapter.shampoo)(learning_rate=0.1).init(params)
    with pytest.raises(TypeError, match=r"damping .*static_args\(optax_adapter.eva_s\)"):
        optax_adapter.eva_s(0.1, damping=jnp.asarray(0.1))


def test_float64_learning_rate_keeps_float32_updates_under_jit():
    """A float64 learning rate (inject_hyperparams' hyperparam_dtype, or a schedule) must not widen
    float32 updates: it is cast to the state dtype."""
    params, grads = params_and_grads(jnp.float32, steps=3)
    lr64 = jnp.asarray(0.125, jnp.float64)  # exact in float32: the runs must agree bit for bit
    for make in (lambda lr: sc.shampoo(lr, **HP), sc.adam, lambda lr: sc.sgd(lr, momentum=0.9), sc.adagrad,
                 lambda lr: sc.eva_s(lr, nonfinite="skip")):
        tx64, tx = make(lambda count: lr64), make(0.125)
        s64, s = tx64.init(params), tx.init(params)
        for g in grads:
            u64, s64 = jax.jit(tx64.update)(s64, g, params)
            u, s = jax.jit(tx.update)(s, g, params)
            for k in params:
                assert u64[k].dtype == jnp.float32, make
                np.testing.assert_array_equal(np.asarray(u64[k]), np.asarray(u[k]))
    tx = optax.inject_hyperparams(optax_adapter.shampoo, static_args=optax_adapter.static_args(optax_adapter.shampoo),
                                  hyperparam_dtype=jnp.float64)(learning_rate=0.125, **HP)
    u, _ = jax.jit(tx.update)(grads[0], tx.init(params), params)
    assert all(v.dtype == jnp.float32 for v in u.values())


def test_optax_adapter_takes_custom_jax_pytrees():
    """Nodes only JAX's registry knows (flax structs, equinox modules, registered dataclasses) reach
    the core as a dict of their leaves keyed by JAX path; the updates come back in the parameters'
    structure, equal to those of the same leaves in plain dicts; errors name the JAX path."""
    import dataclasses

    @jax.tree_util.register_dataclass
    @dataclasses.dataclass
    class Layer:
        w: jax.Array
        b: jax.Array

    def custom(t):
        return {"layer": Layer(t["w"], t["b"]), "rest": [t["t"], t["s"]]}

    params, grads = params_and_grads(jnp.float64, steps=4)
    tx = optax_adapter.shampoo(0.1, **HP)
    update = jax.jit(tx.update)
    s_plain, s_custom = tx.init(params), tx.init(custom(params))
    for g in grads:
        u_plain, s_plain = update(g, s_plain, params)
        u_custom, s_custom = update(custom(g), s_custom, custom(params))
        assert jax.tree_util.tree_structure(u_custom) == jax.tree_util.tree_structure(custom(params))
        for a, b in zip(jax.tree_util.tree_leaves(u_custom), jax.tree_util.tree_leaves(custom(u_plain))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    bad = custom(dict(grads[0], w=jnp.zeros((5, 6))))
    with pytest.raises(ValueError, match=r"""grads\["\['layer'\]\.w"\]"""):
        tx.update(bad, s_custom, None)
    with pytest.raises(ValueError, match="params does not have the structure of the gradients"):
        tx.update(custom(grads[0]), s_custom, params)


COMPILE_ONCE = {
    "shampoo": lambda: sc.shampoo(0.1, **HP),
    "shampoo_bf16_params": lambda: sc.shampoo(0.1, **HP),
    "shampoo_state_float32": lambda: sc.shampoo(0.1, state_dtype="float32", **HP),
    "adam": lambda: sc.adam(0.1),
    "sgd": lambda: sc.sgd(0.1, momentum=0.9),
    "adagrad": lambda: sc.adagrad(0.1),
    "eva_s": lambda: sc.eva_s(0.1, nonfinite="skip"),
    "optax_shampoo": lambda: optax_adapter.shampoo(0.1, **{k: v for k, v in HP.items() if k != "nonfinite"}),
}


@pytest.mark.parametrize("committed", [False, True], ids=["uncommitted", "committed"])
@pytest.mark.parametrize("name", sorted(COMPILE_ONCE))
def test_jitted_update_compiles_once(name, committed):
    """``init``'s state has the signature of the state a jitted step returns: a state mixing
    committed and uncommitted arrays compiled the step a second time (a minute for a large model)."""
    dtype = jnp.bfloat16 if name == "shampoo_bf16_params" else jnp.float64
    params, grads = params_and_grads(dtype, steps=4)
    if committed:
        params, grads = jax.device_put((params, grads), jax.devices()[0])
    tx = COMPILE_ONCE[name]()
    state = tx.init(params)
    leaves = jax.tree_util.tree_leaves(state)
    assert [x.committed for x in leaves if isinstance(x, jax.Array)] == [committed] * len(leaves)
    if name.startswith("optax"):
        step = jax.jit(lambda s, g, p: tx.update(g, s, p))
    else:
        step = jax.jit(tx.update)
    _, state = step(state, grads[0], params)
    with XlaCompiles() as compiles:
        for g in grads[1:]:
            _, state = step(state, g, params)
    assert compiles.count == 0


def test_restored_state_keeps_the_jitted_signature(tmp_path):
    tx = sc.shampoo(0.1, **HP)
    params, grads = params_and_grads(jnp.float64, steps=3)
    step = jax.jit(tx.update)
    _, state = step(tx.init(params), grads[0], params)
    sc.save_state(tmp_path / "s.npz", state, tx=tx)
    restored = sc.load_state(tmp_path / "s.npz", like=tx.init(params), tx=tx)
    with XlaCompiles() as compiles:
        _, state = step(restored, grads[1], params)
        _, state = step(state, grads[2], params)
    assert compiles.count == 0


@pytest.mark.parametrize("root_method", ["eigh", "newton"])
def test_jitted_step_does_not_grow_with_the_number_of_blocks(root_method):
    """A 64×40 parameter at block 8 is 40 blocks of 8×8 in one group (stacked state): its jitted
    update holds as many matrix products, eigendecompositions and conds as that of one 8×8
    block, and equals the eager update. With one array per block it held 40 times as many, and
    compile time grew with the block count (110 s for 753 blocks, docs/backends.md)."""
    tx = sc.shampoo(0.1, block_size=8, start_preconditioning_step=1, preconditioning_compute_steps=1,
                    root_method=root_method, nonfinite="skip", epsilon=1e-3)
    rng = np.random.default_rng(0)

    def program(shape):
        params = jnp.asarray(rng.standard_normal(shape))
        state = tx.init(params)
        text = jax.jit(tx.update).lower(state, params, params).as_text()
        return state, {op: text.count(op) for op in ("dot_general", "eigh", "stablehlo.case")}

    state, many = program((64, 40))
    assert [(b.failures.shape[0], tuple(h.shape[-1] for h in b.statistics)) for b in state.params[0].blocks] == [
        (40, (8, 8))]
    _, one = program((8, 8))
    assert many == one and many["dot_general"] > 0
    params, grads = (jnp.asarray(rng.standard_normal((64, 40))) for _ in range(2))
    state = tx.init(params)
    u_jit, _ = jax.jit(tx.update)(state, grads, params)
    u_eager, _ = tx.update(state, grads, params)
    np.testing.assert_allclose(np.asarray(u_jit), np.asarray(u_eager), rtol=1e-9, atol=1e-12)
