"""Bad hyperparameters and inputs raise clear errors naming what is wrong."""

import numpy as np
import pytest

import shampoo_core as sc
from helpers import to_xp


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(learning_rate=-1.0), ValueError, "learning_rate"),
        (dict(block_size=0), ValueError, "block_size"),
        (dict(block_size=2.5), TypeError, "block_size"),
        (dict(beta1=1.0), ValueError, "beta1"),
        (dict(beta1=-0.1), ValueError, "beta1"),
        (dict(beta2=0.0), ValueError, "beta2"),
        (dict(beta2=1.5), ValueError, "beta2"),
        (dict(epsilon=-1e-6), ValueError, "epsilon"),
        (dict(diagonal_epsilon=-1.0), ValueError, "diagonal_epsilon"),
        (dict(weight_decay=-0.1), ValueError, "weight_decay"),
        (dict(start_preconditioning_step=0), ValueError, "start_preconditioning_step"),
        (dict(preconditioning_compute_steps=0), ValueError, "preconditioning_compute_steps"),
        (dict(statistics_compute_steps=0), ValueError, "statistics_compute_steps"),
        (dict(graft_type="adafactor"), ValueError, "graft_type"),
        # An int must not silently select a grafting type.
        (dict(graft_type=1), ValueError, "graft_type"),
        (dict(graft_granularity="tensor"), ValueError, "graft_granularity"),
        (dict(root_method="svd"), ValueError, "root_method"),
        (dict(root_dtype="float16"), ValueError, "root_dtype"),
        (dict(exponent_override=0), ValueError, "exponent_override"),
        (dict(graft_type="adam", beta2=1.0), ValueError, "graft_beta2"),
        (dict(inverse_failure_threshold=-1.0), ValueError, "inverse_failure_threshold"),
        (dict(nesterov=1), TypeError, "nesterov"),
        (dict(epsilon=float("nan")), ValueError, "epsilon"),
    ],
)
def test_bad_hyperparameters(kwargs, error, match):
    with pytest.raises(error, match=match):
        sc.shampoo(**kwargs)


def test_enums_and_strings_are_equivalent():
    a = sc.shampoo(graft_type=sc.GraftType.ADAM, root_method=sc.RootMethod.NEWTON)
    b = sc.shampoo(graft_type="ADAM", root_method="newton")
    assert a.init.hyperparameters == b.init.hyperparameters
    assert a.init.hyperparameters["graft_type"] == "adam"
    assert a.init.hyperparameters["root_method"] == "newton"


def test_first_order_bad_hyperparameters():
    with pytest.raises(ValueError, match="momentum"):
        sc.sgd(0.1, momentum=1.0)
    with pytest.raises(ValueError, match="beta2"):
        sc.adam(beta2=1.0)
    with pytest.raises(ValueError, match="epsilon"):
        sc.adagrad(epsilon=-1.0)


def test_arrays_of_two_libraries_are_refused():
    # The namespace is remembered per array type: a tree mixing libraries is still refused once
    # both types are known.
    torch = pytest.importorskip("torch")
    from shampoo_core import _xp

    tx = sc.shampoo()
    a, b = np.ones((2, 2)), torch.ones((2, 2), dtype=torch.float64)
    tx.init(a), tx.init(b)
    assert _xp.namespace(a, a) is _xp.namespace(a) and _xp.namespace(b) is not _xp.namespace(a)
    with pytest.raises(TypeError, match="Multiple namespaces"):
        _xp.namespace(a, b)
    with pytest.raises(TypeError, match="Multiple namespaces"):
        tx.init({"a": a, "b": b})


def test_integer_params_rejected(xp):
    tx = sc.shampoo()
    with pytest.raises(TypeError, match=r"params\['w'\].*real floating"):
        tx.init({"w": to_xp(xp, np.ones((2, 2), dtype=np.int32))})


def test_mismatched_grads(xp):
    tx = sc.shampoo(weight_decay=0.0)
    params = {"w": to_xp(xp, np.ones((3, 2))), "b": to_xp(xp, np.ones(2))}
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"grads\['w'\] has shape \(2, 3\); expected \(3, 2\)"):
        tx.update(state, {"w": to_xp(xp, np.ones((2, 3))), "b": to_xp(xp, np.ones(2))}, params)
    with pytest.raises(ValueError, match="grads has 1 leaves but the optimizer state was built for 2"):
        tx.update(state, {"w": to_xp(xp, np.ones((3, 2)))}, params)
    with pytest.raises(ValueError, match=r"grads\['b'\] has dtype"):
        tx.update(state, {"w": to_xp(xp, np.ones((3, 2))), "b": to_xp(xp, np.ones(2, dtype=np.float32))}, params)
    with pytest.raises(ValueError, match=r"grads\['w'\] has shape \(2, 3\); the state holds \(3, 2\)"):
        tx.update(state, {"w": to_xp(xp, np.ones((2, 3))), "b": to_xp(xp, np.ones(2))})


OPTIMIZERS = {
    "shampoo": lambda: sc.shampoo(1e-2, block_size=4),
    "shampoo_stateless_graft": lambda: sc.shampoo(1e-2, block_size=4, beta1=0.0, graft_type="sgd"),
    "adam": lambda: sc.adam(1e-2),
    "adagrad": lambda: sc.adagrad(1e-2),
    "sgd_momentum": lambda: sc.sgd(1e-2, momentum=0.9),
    "full_matrix_adagrad": lambda: sc.full_matrix_adagrad(1e-2),
    "eva": lambda: sc.eva(1e-2),
    "eva_s": lambda: sc.eva_s(1e-2),
    "kfac": lambda: sc.kfac(1e-2),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_grads_must_match_the_state_without_params(xp, name):
    """Without params to compare against, grads are checked against the state itself: a float64
    gradient must not promote a float32 state, another shape must not reach a broadcast."""
    tx = OPTIMIZERS[name]()
    params = to_xp(xp, {"w": np.ones((4, 2), np.float32), "b": np.ones(3, np.float32)})
    state = tx.init(params)
    with pytest.raises(ValueError, match="grads has 1 leaves but the optimizer state was built for 2"):
        tx.update(state, to_xp(xp, {"w": np.ones((4, 2), np.float32)}))
    if name != "full_matrix_adagrad":  # it sees only vec(G): a reshape with as many entries is its business
        with pytest.raises(ValueError, match=r"grads\['w'\] (has shape|of shape) \(2, 4\)"):
            tx.update(state, to_xp(xp, {"w": np.ones((2, 4), np.float32), "b": np.ones(3, np.float32)}))
    with pytest.raises(ValueError, match=r"grads\['w'\] has 6 entries|grads\['w'\] (has shape|of shape) \(3, 2\)"):
        tx.update(state, to_xp(xp, {"w": np.ones((3, 2), np.float32), "b": np.ones(3, np.float32)}))
    updates, new_state = tx.update(state, to_xp(xp, {"w": np.ones((4, 2), np.float32), "b": np.ones(3, np.float32)}))
    assert updates["b"].dtype == params["b"].dtype
    with pytest.raises(ValueError, match=r"grads\['b'\] has dtype .*float64.*; the state holds .*float32"):
        tx.update(state, to_xp(xp, {"w": np.ones((4, 2), np.float32), "b": np.ones(3, np.float64)}))


def test_weight_decay_needs_params(xp):
    tx = sc.shampoo(weight_decay=0.1)
    p = to_xp(xp, np.ones(3))
    state = tx.init(p)
    with pytest.raises(ValueError, match="params are required"):
        tx.update(state, p)


def test_full_matrix_adagrad_size_guard():
    tx = sc.full_matrix_adagrad(max_size=10)
    with pytest.raises(ValueError, match="max_size"):
        tx.init({"w": np.ones((4, 4))})
