"""The torch.optim adapter: same numbers as the functional core, and torch's conventions."""

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import shampoo_core as sc  # noqa: E402
from backends.torch_optim import Shampoo, _param_view  # noqa: E402

HP = dict(block_size=4, start_preconditioning_step=2, preconditioning_compute_steps=2, beta2=0.99)


def model_and_data(dtype=torch.float64):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(dtype)
    x = torch.randn(32, 6, dtype=dtype)
    y = torch.tanh(x @ torch.randn(6, 3, dtype=dtype))  # learnable targets
    return model, x, y


def loss_of(model, x, y):
    return torch.mean((model(x) - y) ** 2)


def train(opt, model, x, y, steps):
    for _ in range(steps):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()


def core_run(txs):
    """The parameters after one step of each of ``txs`` in turn, each parameter with its own state
    (as the adapter keeps it), from :func:`model_and_data`'s model and data. An item of ``txs`` may
    be a list: one transformation per parameter."""
    model, x, y = model_and_data()
    params = [p.detach().clone() for p in model.parameters()]
    per_param = [tx if isinstance(tx, list) else [tx] * len(params) for tx in txs]
    states = [tx.init(p) for tx, p in zip(per_param[0], params)]
    for step_txs in per_param:
        for p, q in zip(model.parameters(), params):
            p.data.copy_(q)
        model.zero_grad()
        loss_of(model, x, y).backward()
        for i, (p, tx) in enumerate(zip(model.parameters(), step_txs)):
            u, states[i] = tx.update(states[i], p.grad, params[i])
            params[i] = params[i] + u
    return params


def test_matches_functional_core():
    model, x, y = model_and_data()
    opt = Shampoo(model.parameters(), lr=0.05, **HP)
    train(opt, model, x, y, 6)
    for p, q in zip(model.parameters(), core_run([sc.shampoo(0.05, **HP)] * 6)):
        assert torch.equal(p.detach(), q)


def test_core_calls_are_bounded_in_size(monkeypatch):
    # A core call without donate_state holds the old and new state of its parameters at once: it
    # takes parameters up to _CALL_NUMEL entries (the model's are 30, 5, 15 and 3), a larger one alone.
    import backends.torch_optim as adapter

    monkeypatch.setattr(adapter, "_CALL_NUMEL", 20)
    calls = []
    joint = adapter._GroupTransform._joint_update
    monkeypatch.setattr(adapter._GroupTransform, "_joint_update",
                        lambda self, call: calls.append([p.numel() for p, _, _ in call]) or joint(self, call))
    model, x, y = model_and_data()
    opt = Shampoo(model.parameters(), lr=0.05, **HP)
    train(opt, model, x, y, 6)
    assert calls == [[30], [5, 15], [3]] * 6
    for p, q in zip(model.parameters(), core_run([sc.shampoo(0.05, **HP)] * 6)):
        assert torch.equal(p.detach(), q)


def test_closure_and_zero_grad():
    model, x, y = model_and_data()
    opt = Shampoo(model.parameters(), lr=0.05, **HP)
    losses = []

    def closure():
        opt.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        return loss

    for _ in range(60):
        losses.append(opt.step(closure).item())
    # step returns the closure's loss, evaluated before the update
    assert losses[-1] < 0.5 * losses[0]
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_param_groups_have_their_own_hyperparameters():
    model, x, y = model_and_data()
    opt = Shampoo([{"params": model[0].parameters(), "lr": 0.0},
                   {"params": model[2].parameters(), "graft_type": "sgd"}], lr=0.05, **HP)
    before = [p.detach().clone() for p in model[0].parameters()]
    loss_of(model, x, y).backward()
    opt.step()
    for p, b in zip(model[0].parameters(), before):
        assert torch.equal(p.detach(), b)
    assert opt.param_groups[1]["graft_type"] == "sgd"


def test_lr_scheduler_changes_the_step():
    model, x, y = model_and_data()
    opt = Shampoo(model.parameters(), lr=0.1, beta1=0.0, graft_type="sgd", start_preconditioning_step=100)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for expected_lr in (0.1, 0.05, 0.025):
        p = next(model.parameters())
        before = p.detach().clone()
        opt.zero_grad()
        loss_of(model, x, y).backward()
        g = p.grad.detach().clone()
        opt.step()
        sched.step()
        torch.testing.assert_close(p.detach(), before - expected_lr * g, rtol=1e-12, atol=1e-14)


def test_tensor_lr_steps_as_the_float_lr():
    """torch.optim accepts ``lr=torch.tensor(...)``, which schedulers then change in place."""
    runs = []
    for lr in (0.125, torch.tensor(0.125, dtype=torch.float64)):
        model, x, y = model_and_data()
        opt = Shampoo(model.parameters(), lr=lr, **HP)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        for _ in range(5):
            opt.zero_grad()
            loss_of(model, x, y).backward()
            opt.step()
            sched.step()
        runs.append([p.detach().clone() for p in model.parameters()])
    assert torch.is_tensor(opt.param_groups[0]["lr"]) and float(opt.param_groups[0]["lr"]) == 0.125 / 4
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"learning_rate must be in \[0.0, inf\)"):
        Shampoo(model.parameters(), lr=torch.tensor(-0.1))


def test_state_dict_round_trip_is_exact():
    model, x, y = model_and_data(torch.float32)
    opt = Shampoo(model.parameters(), lr=0.05, **HP)
    train(opt, model, x, y, 3)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    train(opt, model, x, y, 4)
    expected = [p.detach().clone() for p in model.parameters()]

    model2, _, _ = model_and_data(torch.float32)
    model2.load_state_dict(saved_model)
    opt2 = Shampoo(model2.parameters(), lr=0.05, **HP)
    opt2.load_state_dict(saved_opt)
    for _ in range(4):
        opt2.zero_grad()
        loss_of(model2, x, y).backward()
        opt2.step()
    for p, e in zip(model2.parameters(), expected):
        assert torch.equal(p.detach(), e)


def test_state_dict_with_cost_model_and_executor_loads_with_weights_only(tmp_path):
    # Param groups hold the live CostModel and executor; the state dict holds plain data, which
    # torch.load reads with weights_only=True (its default), and the resumed run is exact.
    cm = sc.CostModel({"array_api_compat.torch": {"cpu": {"float64": [[4, {"newton": 1e-6, "eigh": 2e-6}]]}}})

    def optimizer(model):
        executor = sc.AsyncPreconditioners(max_staleness=1, deterministic=True)
        return Shampoo(model.parameters(), lr=0.05, root_method="auto", cost_model=cm,
                       async_preconditioners=executor, **HP), executor

    def steps(model, opt, n):
        train(opt, model, x, y, n)

    model, x, y = model_and_data()
    opt, executor = optimizer(model)
    train(opt, model, x, y, 3)  # roots submitted at step 2 were swapped in at step 3: none in flight
    assert executor.pending == 0
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    assert isinstance(opt.param_groups[0]["cost_model"], sc.CostModel)  # the live groups keep theirs
    train(opt, model, x, y, 4)

    model2, _, _ = model_and_data()
    opt2, executor2 = optimizer(model2)
    saved = torch.load(tmp_path / "ckpt.pt")
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    assert opt2.param_groups[0]["cost_model"] == cm
    assert opt2.param_groups[0]["async_preconditioners"] is executor2
    train(opt2, model2, x, y, 4)
    for p, q in zip(model2.parameters(), model.parameters()):
        assert torch.equal(p, q)
    executor.close()
    executor2.close()

    bad = opt.state_dict()
    bad["param_groups"][0]["cost_model"] = {"format_version": 1, "timings": {}}
    before = copy.deepcopy(opt2.state_dict())
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['cost_model'\] is a cost model of format_version 1"):
        opt2.load_state_dict(bad)
    after = opt2.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert all(torch.equal(a, b) for k in before["state"] for a, b in zip(before["state"][k].values(), after["state"][k].values()))


def test_grad_scaler_skips_inf_steps():
    model, x, y = model_and_data(torch.float32)
    opt = Shampoo(model.parameters(), lr=0.05, **HP)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for _ in range(3):
        opt.zero_grad()
        scaler.scale(loss_of(model, x, y)).backward()
        scaler.step(opt)
        scaler.update()
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    scaler.scale(loss_of(model, x, y) * float("inf")).backward()
    scaler.step(opt)  # inf gradients: the scaler does not call opt.step()
    scaler.update()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)
    assert all(np.isfinite(p.detach().numpy()).all() for p in model.parameters())


def test_bad_hyperparameters_raise_at_construction():
    model, _, _ = model_and_data()
    with pytest.raises(ValueError, match="block_size"):
        Shampoo(model.parameters(), lr=0.1, block_size=0)
    with pytest.raises(TypeError, match="lr="):
        Shampoo(model.parameters(), learning_rate=0.1)


def test_parameter_without_state_support_updates_no_parameter():
    """A complex parameter after a real one: the step is refused before the real one moves."""
    real = torch.nn.Parameter(torch.ones(3, 3, dtype=torch.float64))
    complex_ = torch.nn.Parameter(torch.ones(3, 3, dtype=torch.complex128))
    real.grad, complex_.grad = torch.ones_like(real), torch.ones_like(complex_)
    opt = Shampoo([real, complex_], lr=0.1)
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[1\]: .*complex128; no parameter was updated"):
        opt.step()
    assert torch.equal(real.detach(), torch.ones(3, 3, dtype=torch.float64))
    assert not any(opt.state[p] for p in (real, complex_))


def test_sparse_gradients_rejected():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = Shampoo(emb.parameters(), lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse"):
        opt.step()


def test_unhashable_hyperparameters_and_group_changes():
    model, x, y = model_and_data()
    opt = Shampoo(model.parameters(), lr=0.05, root_method="auto", cost_model=sc.CostModel(), **HP)
    train(opt, model, x, y, 3)
    tx_before = opt._transform(opt.param_groups[0])
    opt.param_groups[0]["graft_type"] = "sgd"  # a changed group rebuilds its transformation
    assert opt._transform(opt.param_groups[0]) is not tx_before
    assert opt._transform(opt.param_groups[0]) is opt._transform(opt.param_groups[0])


def _steps(model, opt, x, y, n):
    train(opt, model, x, y, n)


def _snapshot(model, opt):
    return ([p.detach().clone() for p in model.parameters()],
            {id(p): {k: t.clone() for k, t in st.items()} for p, st in opt.state.items()})


def _assert_unchanged(model, opt, snapshot):
    params, states = snapshot
    for p, b in zip(model.parameters(), params):
        assert torch.equal(p.detach(), b)
    for p, st in opt.state.items():
        assert st.keys() == states[id(p)].keys()
        assert all(torch.equal(t, states[id(p)][k]) for k, t in st.items())


def test_layout_changing_hyperparameter_is_named_and_changes_nothing():
    model, x, y = model_and_data()
    opt = Shampoo(model.parameters(), lr=0.05, **HP)
    _steps(model, opt, x, y, 2)
    snapshot = _snapshot(model, opt)
    opt.param_groups[0]["betas"] = (0.0, 0.99)  # no momentum array: another state layout
    with pytest.raises(ValueError, match=r"^param_groups\[0\]\['params'\]\[0\]: the stored optimizer state .* "
                       r"does not have the layout .* betas \(0\.9, 0\.99\) -> \(0\.0, 0\.99\)"):
        _steps(model, opt, x, y, 1)
    _assert_unchanged(model, opt, snapshot)
    opt.param_groups[0]["betas"] = (0.9, 0.9)  # same layout: takes effect at the next step
    _steps(model, opt, x, y, 1)


def test_state_dict_of_other_block_size_is_refused():
    model, x, y = model_and_data()
    opt = Shampoo(model.parameters(), lr=0.05, **HP)
    _steps(model, opt, x, y, 2)
    other = Shampoo(model.parameters(), lr=0.05, **{**HP, "block_size": 2})
    other.load_state_dict(opt.state_dict())  # torch copies the group values too: block_size 4
    other.param_groups[0]["block_size"] = 2
    with pytest.raises(ValueError, match="does not have the layout"):
        _steps(model, other, x, y, 1)


def test_nonfinite_gradient_updates_no_parameter():
    model, x, y = model_and_data()
    opt = Shampoo(model.parameters(), lr=0.05, **HP)
    _steps(model, opt, x, y, 2)
    snapshot = _snapshot(model, opt)
    opt.zero_grad()
    loss_of(model, x, y).backward()
    last = list(model.parameters())[-1]
    last.grad[0] = float("nan")
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[3\] has non-finite values"):
        opt.step()
    _assert_unchanged(model, opt, snapshot)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_parameters_keep_their_state_on_the_gpu():
    model, x, y = model_and_data()
    gpu_model = copy.deepcopy(model).cuda()
    gx, gy = x.cuda(), y.cuda()
    opt = Shampoo(model.parameters(), lr=0.05, **HP)
    gpu_opt = Shampoo(gpu_model.parameters(), lr=0.05, **HP)
    for _ in range(6):
        for o, m, a, b in ((opt, model, x, y), (gpu_opt, gpu_model, gx, gy)):
            o.zero_grad()
            loss_of(m, a, b).backward()
            o.step()
    for p in gpu_model.parameters():
        assert p.is_cuda
        tensors = [v for v in gpu_opt.state[p].values() if isinstance(v, torch.Tensor)]
        assert tensors and all(v.is_cuda for v in tensors)
    # cuBLAS/cuSOLVER and CPU LAPACK round differently; 6 float64 steps stay far inside 1e-9.
    for p, q in zip(model.parameters(), gpu_model.parameters()):
        np.testing.assert_allclose(q.detach().cpu().numpy(), p.detach().numpy(), rtol=1e-9, atol=1e-12)


def test_betas_as_torch_spells_them():
    """``betas=(beta1, beta2)`` as in torch.optim.Adam; the core's beta1=/beta2= are stored as betas."""
    runs = []
    for kwargs in (dict(betas=(0.5, 0.9)), dict(beta1=0.5, beta2=0.9), dict(betas=[0.5, 0.9])):
        model, x, y = model_and_data()
        opt = Shampoo(model.parameters(), lr=0.05, block_size=4, start_preconditioning_step=2, **kwargs)
        assert opt.param_groups[0]["betas"] == (0.5, 0.9) and "beta1" not in opt.param_groups[0]
        _steps(model, opt, x, y, 4)
        runs.append([p.detach().clone() for p in model.parameters()])
    params = core_run([sc.shampoo(0.05, block_size=4, start_preconditioning_step=2, beta1=0.5, beta2=0.9)] * 4)
    for run in runs:
        for a, b in zip(run, params):
            assert torch.equal(a, b)
    # A group given in the core's spelling gets betas too, from its own values and the defaults.
    group = {"params": [torch.nn.Parameter(torch.ones(2))], "beta2": 0.8}
    opt = Shampoo([group], lr=0.1, betas=(0.7, 0.95))
    assert opt.param_groups[0] is group  # as torch keeps the dict it was given
    assert group["betas"] == (0.7, 0.8) and "beta2" not in group
    bad = {"params": [torch.nn.Parameter(torch.ones(2))], "beta2": 0.0}
    with pytest.raises(ValueError, match=r"param_groups\[1\]: beta2 must be in"):
        opt.add_param_group(bad)
    assert bad["beta2"] == 0.0 and "betas" not in bad and len(opt.param_groups) == 1


def test_bad_betas_are_named():
    model, x, y = model_and_data()
    with pytest.raises(TypeError, match=r"give betas=\(beta1, beta2\) or beta1, not both"):
        Shampoo(model.parameters(), betas=(0.9, 0.99), beta1=0.9)
    with pytest.raises(TypeError, match=r"betas must be a pair \(beta1, beta2\); got float 0.9"):
        Shampoo(model.parameters(), betas=0.9)
    with pytest.raises(ValueError, match=r"beta1 must be in \[0.0, 1.0\)"):
        Shampoo(model.parameters(), betas=(1.0, 0.99))
    with pytest.raises(ValueError, match=r"param_groups\[1\]: beta2 must be in \(0.0, 1.0\]"):
        Shampoo([{"params": model[0].parameters()}, {"params": model[2].parameters(), "betas": (0.9, 0.0)}])
    opt = Shampoo(model.parameters(), lr=0.05, **HP)
    _steps(model, opt, x, y, 2)
    snapshot = _snapshot(model, opt)
    opt.param_groups[0]["beta2"] = 0.9  # the core's spelling, set after construction
    with pytest.raises(ValueError, match=r"param_groups\[0\] has 'beta2': .* group\['betas'\]"):
        _steps(model, opt, x, y, 1)
    del opt.param_groups[0]["beta2"]
    opt.param_groups[0]["betas"] = (0.9,)
    with pytest.raises(TypeError, match=r"param_groups\[0\]: betas must be a pair"):
        _steps(model, opt, x, y, 1)
    _assert_unchanged(model, opt, snapshot)


def test_state_dict_in_the_core_spelling_loads():
    """A state dict whose groups hold beta1/beta2 (as the core names them) loads as betas."""
    model, x, y = model_and_data()
    opt = Shampoo(model.parameters(), lr=0.05, **HP)
    _steps(model, opt, x, y, 2)
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        group["beta1"], group["beta2"] = group.pop("betas")
    other = Shampoo(model.parameters(), lr=0.05, **HP)
    other.load_state_dict(saved)
    assert other.param_groups[0]["betas"] == (0.9, 0.99) and "beta1" not in other.param_groups[0]
    _steps(model, other, x, y, 1)


def _schedulers():
    s = torch.optim.lr_scheduler
    return {
        "LambdaLR": lambda o: s.LambdaLR(o, lambda e: 0.9**e),
        "MultiplicativeLR": lambda o: s.MultiplicativeLR(o, lambda e: 0.9),
        "StepLR": lambda o: s.StepLR(o, step_size=2),
        "MultiStepLR": lambda o: s.MultiStepLR(o, milestones=[1, 3]),
        "ConstantLR": lambda o: s.ConstantLR(o, factor=0.5, total_iters=2),
        "LinearLR": lambda o: s.LinearLR(o, start_factor=0.1, total_iters=3),
        "ExponentialLR": lambda o: s.ExponentialLR(o, gamma=0.8),
        "PolynomialLR": lambda o: s.PolynomialLR(o, total_iters=4),
        "CosineAnnealingLR": lambda o: s.CosineAnnealingLR(o, T_max=4),
        "CosineAnnealingWarmRestarts": lambda o: s.CosineAnnealingWarmRestarts(o, T_0=2),
        "CyclicLR": lambda o: s.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=2),
        "OneCycleLR": lambda o: s.OneCycleLR(o, max_lr=0.1, total_steps=6),
        "SequentialLR": lambda o: s.SequentialLR(o, [s.ConstantLR(o, factor=0.5, total_iters=2),
                                                     s.ExponentialLR(o, gamma=0.9)], milestones=[2]),
        "ChainedScheduler": lambda o: s.ChainedScheduler([s.ConstantLR(o, factor=0.5, total_iters=2),
                                                          s.ExponentialLR(o, gamma=0.9)]),
        "ReduceLROnPlateau": lambda o: s.ReduceLROnPlateau(o, patience=0),
    }


@pytest.mark.parametrize("name", list(_schedulers()))
def test_every_lr_scheduler_drives_it_as_it_drives_adam(name):
    """Each scheduler of torch.optim.lr_scheduler, defaults included (OneCycleLR and CyclicLR
    cycle betas[0]), sets the same lr and betas per step as on torch.optim.Adam, and the step uses
    them: the parameters equal the core's, rebuilt each step with that step's lr and beta1."""
    make = _schedulers()[name]
    model, x, y = model_and_data()
    shampoo = Shampoo(model.parameters(), lr=0.05, **HP)
    adam = torch.optim.Adam(copy.deepcopy(model).parameters(), lr=0.05, betas=(0.9, 0.99))
    s_shampoo, s_adam = make(shampoo), make(adam)
    seen = []
    for step in range(6):
        group, adam_group = shampoo.param_groups[0], adam.param_groups[0]
        assert group["lr"] == pytest.approx(adam_group["lr"], rel=1e-12)
        assert group["betas"] == pytest.approx(adam_group["betas"], rel=1e-12)
        seen.append((group["lr"], group["betas"][0]))
        _steps(model, shampoo, x, y, 1)
        adam.step()
        for sched in (s_shampoo, s_adam):
            sched.step(*([1.0] if name == "ReduceLROnPlateau" else []))
    if name in ("OneCycleLR", "CyclicLR"):
        assert len({b for _, b in seen}) > 1, "betas[0] should have been cycled"
    params = core_run([sc.shampoo(lr, **{**HP, "beta1": beta1}) for lr, beta1 in seen])
    for a, b in zip(model.parameters(), params):
        torch.testing.assert_close(a.detach(), b, rtol=1e-12, atol=1e-14)


def test_cycled_betas_keep_the_state_layouts():
    """A change of betas alone rebuilds the group's transformation but keeps its layout cache
    (no state template per parameter shape per step); a block_size change drops it."""
    model, x, y = model_and_data()
    opt = Shampoo(model.parameters(), lr=0.05, **HP)
    _steps(model, opt, x, y, 2)  # the second step reads the stored state through the layouts
    group = opt.param_groups[0]
    before = opt._transform(group)
    group["betas"] = (0.8, 0.95)
    after = opt._transform(group)
    assert after is not before and after._layouts is before._layouts and before._layouts
    group["block_size"] = 2
    assert opt._transform(group)._layouts is not before._layouts


def test_errors_name_parameters_given_by_name():
    """With ``named_parameters()`` (torch >= 2.6 keeps ``param_names``) errors give the name too."""
    model, x, y = model_and_data()
    opt = Shampoo(model.named_parameters(), lr=0.05, **HP)
    if "param_names" not in opt.param_groups[0]:
        pytest.skip("this torch does not keep param_names")
    _steps(model, opt, x, y, 1)
    snapshot = _snapshot(model, opt)
    opt.zero_grad()
    loss_of(model, x, y).backward()
    model[2].weight.grad[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[2\] \('2\.weight'\) has non-finite"):
        opt.step()
    _assert_unchanged(model, opt, snapshot)


def test_state_dict_keeps_roots_in_flight(tmp_path):
    # Roots submitted at step 2 are swapped in at step 4 (max_staleness=2): a save after step 3
    # holds them, and the resumed run swaps them in at step 4 as the uninterrupted run does.
    def optimizer(model, executor):
        return Shampoo(model.named_parameters(), lr=0.05, async_preconditioners=executor, **HP)

    model, x, y = model_and_data()
    with sc.AsyncPreconditioners(max_staleness=2, deterministic=True) as ex:
        opt = optimizer(model, ex)
        train(opt, model, x, y, 3)
        in_flight = [_param_view(ex, p).pending for p in model.parameters()]
        assert sum(in_flight) == ex.pending > 0
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
        assert all("pending_roots" not in s for s in opt.state.values())  # the live state is untouched
        train(opt, model, x, y, 4)

    saved = torch.load(tmp_path / "ckpt.pt")  # weights_only=True
    assert [len(s.get("pending_roots", [])) for s in saved["opt"]["state"].values()] == in_flight
    model2, _, _ = model_and_data()
    model2.load_state_dict(saved["model"])
    opt2 = Shampoo(model2.named_parameters(), lr=0.05, **HP)
    with pytest.raises(ValueError, match=rf"param_groups\[0\]\['params'\]\[0\] has {in_flight[0]} roots in flight.*no async_preconditioners"):
        opt2.load_state_dict(saved["opt"])
    assert not opt2.state
    with sc.AsyncPreconditioners(max_staleness=2, deterministic=True) as ex2:
        opt2 = optimizer(model2, ex2)
        opt2.load_state_dict(saved["opt"])
        assert ex2.pending == sum(in_flight)
        train(opt2, model2, x, y, 4)
    for p, q in zip(model2.parameters(), model.parameters()):
        assert torch.equal(p, q)


def test_asynchronous_roots_are_each_parameters_own():
    # The core keys root jobs by leaf and block index, which every one-parameter state repeats:
    # without a view of the executor per parameter, only the first parameter's blocks got roots.
    model, x, y = model_and_data()
    with sc.AsyncPreconditioners(max_workers=2, max_staleness=2, deterministic=True) as ex:
        opt = Shampoo(model.parameters(), lr=0.05, async_preconditioners=ex, **HP)
        train(opt, model, x, y, 8)
    executors = [sc.AsyncPreconditioners(max_staleness=2, deterministic=True) for _ in model.parameters()]
    txs = [sc.shampoo(0.05, async_preconditioners=e, **HP) for e in executors]
    expected = core_run([txs] * 8)
    for e in executors:
        e.close()
    for p, q in zip(model.parameters(), expected):
        assert torch.equal(p.detach(), q)
    for p in model.parameters():  # every preconditioned block got roots of its own statistics
        block_arrays = [t for t in opt.state[p].values() if t.ndim == 3]  # stacks of blocks
        assert any(not torch.equal(t, torch.eye(t.shape[-1], dtype=t.dtype).expand_as(t))
                   for t in block_arrays[len(block_arrays) // 2:])


FAILED_ROOT_OF_FIRST_PARAM = r"param_groups\[0\]\['params'\]\[0\] \('0.weight'\).*inverse root computation"


@pytest.fixture
def broken_roots(monkeypatch):
    """Every inverse root computation fails (in the executor's worker)."""
    from shampoo_core import roots as roots_module

    def broken(*args, **kwargs):
        raise np.linalg.LinAlgError("broken")

    monkeypatch.setattr(roots_module, "inverse_pth_root", broken)


def test_failed_asynchronous_root_names_the_parameter(broken_roots):
    model, x, y = model_and_data()
    with sc.AsyncPreconditioners(max_staleness=1, deterministic=True) as ex:
        opt = Shampoo(model.named_parameters(), lr=0.05, async_preconditioners=ex, **HP)
        with pytest.raises(RuntimeError, match=FAILED_ROOT_OF_FIRST_PARAM):
            train(opt, model, x, y, 4)


def test_state_dict_names_the_parameter_whose_root_in_flight_failed(broken_roots):
    model, x, y = model_and_data()
    with sc.AsyncPreconditioners(max_staleness=2, deterministic=True) as ex:
        opt = Shampoo(model.named_parameters(), lr=0.05, async_preconditioners=ex, **HP)
        train(opt, model, x, y, 2)  # step 2 submits the roots, due at step 4
        with pytest.raises(RuntimeError, match=FAILED_ROOT_OF_FIRST_PARAM):
            opt.state_dict()


def test_parameters_with_different_step_counts_match_the_core():
    # Parameters are updated together while their step counts agree; one that had no gradient at
    # some steps falls behind and is updated on its own count, as by a state of its own.
    model, x, y = model_and_data()
    params = [p.detach().clone() for p in model.parameters()]
    opt = Shampoo(model.parameters(), lr=0.05, **HP)
    tx = sc.shampoo(0.05, **HP)
    states = [tx.init(p) for p in params]
    for t in range(8):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        if t % 3 == 1:
            model[2].weight.grad = None  # skipped by the step, as torch optimizers do
        grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
        opt.step()
        for i, g in enumerate(grads):
            if g is not None:
                u, states[i] = tx.update(states[i], g, params[i])
                params[i] = params[i] + u
    assert [int(s.count) for s in states] == [8, 8, 5, 8]
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p.detach(), q)


def test_changed_dtype_is_refused_before_any_update():
    model, x, y = model_and_data()
    opt = Shampoo(model.named_parameters(), lr=0.05, **HP)
    train(opt, model, x, y, 2)
    model[2].weight.data = model[2].weight.data.float()  # its state was made for float64
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in model.parameters()]
    state_before = copy.deepcopy(opt.state_dict()["state"])
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[2\] \('2.weight'\): the stored "
                       r"optimizer state of a parameter of dtype torch.float32 holds torch.float64 arrays"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    state_after = opt.state_dict()["state"]
    assert all(torch.equal(a, b) for k in state_before for a, b in zip(state_before[k].values(), state_after[k].values()))


def test_error_of_a_joint_core_call_names_the_parameter(monkeypatch):
    # Parameters with equal counts are one core call, whose errors name a list index; the adapter
    # names the parameter instead.
    import importlib

    shampoo_module = importlib.import_module("shampoo_core.shampoo")
    real = shampoo_module._check_blocks

    def refuse_3x5(config, g, s, path):
        if tuple(g.shape) == (3, 5):
            raise ValueError(f"grads{path} refused")
        real(config, g, s, path)

    model, x, y = model_and_data()
    opt = Shampoo(model.named_parameters(), lr=0.05, **HP)
    train(opt, model, x, y, 2)
    loss_of(model, x, y).backward()
    state_before = copy.deepcopy(opt.state_dict()["state"])
    monkeypatch.setattr(shampoo_module, "_check_blocks", refuse_3x5)
    with pytest.raises(ValueError, match=r"^param_groups\[0\]\['params'\]\[2\] \('2.weight'\): grads refused$"):
        opt.step()
    # Finding the parameter runs the others again, without writing their (donated) state.
    state_after = opt.state_dict()["state"]
    assert all(torch.equal(a, b) for k in state_before for a, b in zip(state_before[k].values(), state_after[k].values()))


def test_state_is_updated_in_place_with_the_bits_of_new_tensors():
    # donate_state (the default here) writes each step into the same tensors, as torch.optim
    # does; donate_state=False makes new ones. Parameters and state agree to the bit.
    runs = []
    for options in ({}, {"donate_state": False}):
        model, x, y = model_and_data()
        opt = Shampoo(model.parameters(), lr=0.05, **options, **HP)
        train(opt, model, x, y, 1)
        first = {id(p): {k: v for k, v in opt.state[p].items()} for p in model.parameters()}
        train(opt, model, x, y, 5)  # root steps 2, 4, 6 among them
        kept = [first[id(p)][k] is v for p in model.parameters() for k, v in opt.state[p].items()
                if k in first[id(p)] and v.ndim > 0]
        runs.append(([p.detach().clone() for p in model.parameters()],
                     [v.clone() for p in model.parameters() for v in opt.state[p].values()], kept))
    (params_in_place, state_in_place, kept), (params_new, state_new, kept_new) = runs
    assert all(torch.equal(a, b) for a, b in zip(params_in_place, params_new))
    assert all(torch.equal(a, b) for a, b in zip(state_in_place, state_new))
    # Momentum, grafting accumulator and statistics (4 per 2-D parameter, 3 per bias) stay put.
    assert sum(kept) >= 2 * 4 + 2 * 3 and not any(kept_new)


def test_load_state_dict_copies_the_state_it_is_given():
    model, x, y = model_and_data()
    opt = Shampoo(model.parameters(), lr=0.05, **HP)
    train(opt, model, x, y, 2)
    saved = opt.state_dict()
    kept = copy.deepcopy(saved["state"])
    other = Shampoo(model.parameters(), lr=0.05, **HP)
    other.load_state_dict(saved)
    train(other, model, x, y, 2)  # writes its own copies, not the dict's (nor opt's) tensors
    assert all(torch.equal(a, b) for k in kept for a, b in zip(kept[k].values(), saved["state"][k].values()))


@pytest.mark.parametrize("nonfinite", ["raise", "skip"])  # joint core calls, and one per parameter
def test_maximize_is_minimizing_the_negated_objective(nonfinite):
    """maximize=True on L takes the same steps, bit for bit, as minimizing -L (torch.optim.Adam's
    convention), and so climbs L."""
    hp = dict(HP, nonfinite=nonfinite)
    runs = []
    for maximize, sign in ((True, 1.0), (False, -1.0)):
        model, x, y = model_and_data()
        opt = Shampoo(model.parameters(), lr=0.05, maximize=maximize, **hp)
        start = loss_of(model, x, y).item()
        for _ in range(6):
            opt.zero_grad()
            (sign * loss_of(model, x, y)).backward()
            opt.step()
        runs.append(([p.detach().clone() for p in model.parameters()], loss_of(model, x, y).item()))
    (ascended, end), (descended_negated, _) = runs
    assert all(torch.equal(a, b) for a, b in zip(ascended, descended_negated))
    assert end > start


def test_maximize_per_group_in_state_dict_and_checked():
    model, x, y = model_and_data()
    first, *rest = list(model.parameters())
    opt = Shampoo([{"params": [first], "maximize": True}, {"params": rest}], lr=0.05, **HP)
    assert [g["maximize"] for g in opt.param_groups] == [True, False]
    _steps(model, opt, x, y, 2)
    saved = opt.state_dict()
    assert [g["maximize"] for g in saved["param_groups"]] == [True, False]
    for group in saved["param_groups"]:  # a state dict from before the adapter had maximize
        del group["maximize"]
    other = Shampoo([{"params": [first]}, {"params": rest}], lr=0.05, maximize=True, **HP)
    other.load_state_dict(saved)
    assert [g["maximize"] for g in other.param_groups] == [False, False]  # as torch.optim.Adam loads such a dict

    with pytest.raises(TypeError, match=r"^maximize must be a bool; got int 1"):
        Shampoo(model.parameters(), lr=0.05, maximize=1)
    with pytest.raises(TypeError, match=r"^param_groups\[2\]: maximize must be a bool; got str 'yes'"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "maximize": "yes"})
    assert len(opt.param_groups) == 2
    snapshot = _snapshot(model, opt)
    opt.param_groups[1]["maximize"] = None
    with pytest.raises(TypeError, match=r"^param_groups\[1\]: maximize must be a bool; got NoneType None"):
        _steps(model, opt, x, y, 1)
    _assert_unchanged(model, opt, snapshot)
    opt.param_groups[1]["maximize"] = True  # no other state layout: takes effect at the next step
    _steps(model, opt, x, y, 1)
