"""A learning rate or weight decay given as a 0-d array (what ``optax.inject_hyperparams``
passes), on every backend."""

import numpy as np
import pytest

import shampoo_core as sc
from helpers import to_np, to_xp

SHAMPOO = dict(block_size=4, start_preconditioning_step=2, preconditioning_compute_steps=2, graft_type="adam",
               epsilon=1e-3, weight_decay=0.01)
OPTIMIZERS = {
    "shampoo": lambda lr: sc.shampoo(lr, **SHAMPOO),
    "adam": lambda lr: sc.adam(lr, weight_decay=0.01),
    "sgd": lambda lr: sc.sgd(lr, momentum=0.9),
    "adagrad": sc.adagrad,
    "eva_s": sc.eva_s,
}


def _updates(xp, tx, steps=4):
    rng = np.random.default_rng(0)
    shapes = {"w": (6, 5), "b": (5,)}
    params = to_xp(xp, {k: rng.standard_normal(s) for k, s in shapes.items()}, np.float32)
    state = tx.init(params)
    out = []
    for _ in range(steps):
        grads = to_xp(xp, {k: rng.standard_normal(s) for k, s in shapes.items()}, np.float32)
        updates, state = tx.update(state, grads, params)
        out.append(to_np(updates))
    return out


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_array_learning_rate_gives_the_updates_of_the_float(xp, name):
    lr = 0.125  # exact in every float dtype, so the two runs must agree bit for bit
    with_array = _updates(xp, OPTIMIZERS[name](to_xp(xp, np.asarray(lr, np.float32))))
    with_float = _updates(xp, OPTIMIZERS[name](lr))
    for a, b in zip(with_array, with_float):
        for k in a:
            assert a[k].dtype == np.float32
            np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize(
    "value, error, match",
    [
        (-0.1, ValueError, r"learning_rate must be in \[0.0, inf\)"),
        (np.nan, ValueError, "learning_rate must not be NaN"),
        ([0.1, 0.2], ValueError, r"learning_rate must be a scalar \(0-d array\); got shape \(2,\)"),
        (True, TypeError, "learning_rate must have a real dtype; got bool"),
    ],
)
def test_bad_array_learning_rate_is_refused(xp, value, error, match):
    lr = to_xp(xp, np.asarray(value, np.bool_ if isinstance(value, bool) else np.float32))
    for make in (sc.shampoo, sc.adam, sc.eva_s, sc.full_matrix_adagrad):
        with pytest.raises(error, match=match):
            make(lr)


def test_array_learning_rate_is_recorded_as_its_value(tmp_path):
    """Checkpoints compare a constant learning rate: an array one is recorded as its float."""
    params = {"w": np.ones((3, 2), np.float32)}
    tx_array = sc.shampoo(np.asarray(0.125, np.float32), block_size=2)
    tx_float = sc.shampoo(0.125, block_size=2)
    assert tx_array.init.hyperparameters == tx_float.init.hyperparameters
    sc.save_state(tmp_path / "opt.npz", tx_array.init(params), tx=tx_array)
    sc.load_state(tmp_path / "opt.npz", like=params, tx=tx_float)
    with pytest.raises(sc.CheckpointError, match="learning_rate"):
        sc.load_state(tmp_path / "opt.npz", like=params, tx=sc.shampoo(np.asarray(0.25), block_size=2))


WEIGHT_DECAY = {
    "shampoo": lambda wd: sc.shampoo(0.125, **{**SHAMPOO, "weight_decay": wd}),
    "shampoo_coupled": lambda wd: sc.shampoo(0.125, **{**SHAMPOO, "weight_decay": wd, "decoupled_weight_decay": False}),
    "adamw": lambda wd: sc.adam(0.125, weight_decay=wd, decoupled_weight_decay=True),
    "adam": lambda wd: sc.adam(0.125, weight_decay=wd),
    "sgd": lambda wd: sc.sgd(0.125, momentum=0.9, weight_decay=wd),
    "adagrad": lambda wd: sc.adagrad(0.125, weight_decay=wd),
    "eva_s": lambda wd: sc.eva_s(0.125, weight_decay=wd),
}


@pytest.mark.parametrize("name", list(WEIGHT_DECAY))
def test_array_weight_decay_gives_the_updates_of_the_float(xp, name):
    wd = 0.25  # exact in every float dtype
    with_array = _updates(xp, WEIGHT_DECAY[name](to_xp(xp, np.asarray(wd, np.float32))))
    with_float = _updates(xp, WEIGHT_DECAY[name](wd))
    without = _updates(xp, WEIGHT_DECAY[name](0.0))
    for a, b, c in zip(with_array, with_float, without):
        for k in a:
            assert a[k].dtype == np.float32
            np.testing.assert_array_equal(a[k], b[k])
    assert any(not np.array_equal(b[k], c[k]) for b, c in zip(with_float, without) for k in b)


@pytest.mark.parametrize(
    "value, error, match",
    [
        (-0.1, ValueError, r"weight_decay must be in \[0.0, inf\)"),
        ([0.1, 0.2], ValueError, r"weight_decay must be a scalar \(0-d array\); got shape \(2,\)"),
        (True, TypeError, "weight_decay must have a real dtype; got bool"),
    ],
)
def test_bad_array_weight_decay_is_refused(xp, value, error, match):
    wd = to_xp(xp, np.asarray(value, np.bool_ if isinstance(value, bool) else np.float32))
    for make in (sc.shampoo, sc.adam, sc.sgd, sc.eva_s, sc.eva, sc.kfac):
        with pytest.raises(error, match=match):
            make(0.1, weight_decay=wd)


def test_readable_array_weight_decay_needs_params_when_positive():
    """A readable array is read (no decay pass at 0, params needed above it, as for a float); a
    traced one always needs params (tests/test_jax.py)."""
    params = {"w": np.ones((3, 2), np.float32)}
    for wd, needs in ((0.0, False), (0.5, True)):
        wd = np.asarray(wd, np.float32)
        for tx in (sc.shampoo(0.1, block_size=2, weight_decay=wd), sc.adam(0.1, weight_decay=wd),
                   sc.eva_s(0.1, weight_decay=wd)):
            state = tx.init(params)
            tx.update(state, params, params)
            if needs:
                with pytest.raises(ValueError, match=r"params are required when weight_decay > 0 \(or an array\)"):
                    tx.update(state, params)
            else:
                tx.update(state, params)
