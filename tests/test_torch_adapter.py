"""The torch.optim adapter: same numbers as the functional core, and torch's conventions."""

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import shampoo_core as sc  # noqa: E402
from backends.torch_optim import Shampoo  # noqa: E402

HP = dict(block_size=4, start_preconditioning_step=2, preconditioning_compute_steps=2, beta2=0.99)


def model_and_data(dtype=torch.float64):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(dtype)
    x = torch.randn(32, 6, dtype=dtype)
    y = torch.tanh(x @ torch.randn(6, 3, dtype=dtype))  # learnable targets
    return model, x, y


def loss_of(model, x, y):
    return torch.mean((model(x) - y) ** 2)


def test_matches_functional_core():
    model, x, y = model_and_data()
    reference = copy.deepcopy(model)
    opt = Shampoo(model.parameters(), lr=0.05, **HP)
    tx = sc.shampoo(0.05, **HP)
    params = [p.detach().clone() for p in reference.parameters()]
    states = [tx.init(p) for p in params]
    for _ in range(6):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()
        for p, q in zip(reference.parameters(), params):
            p.data.copy_(q)
        reference.zero_grad()
        loss_of(reference, x, y).backward()
        for i, p in enumerate(reference.parameters()):
            u, states[i] = tx.update(states[i], p.grad, params[i])
            params[i] = params[i] + u
    for p, q in zip(model.parameters(), params):
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
    for _ in range(3):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    for _ in range(4):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()
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
    for _ in range(3):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()
    tx_before = opt._transform(opt.param_groups[0])
    opt.param_groups[0]["graft_type"] = "sgd"  # a changed group rebuilds its transformation
    assert opt._transform(opt.param_groups[0]) is not tx_before
    assert opt._transform(opt.param_groups[0]) is opt._transform(opt.param_groups[0])


def _steps(model, opt, x, y, n):
    for _ in range(n):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()


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
    opt.param_groups[0]["beta1"] = 0.0  # no momentum array: another state layout
    with pytest.raises(ValueError, match=r"does not have the layout .* beta1 0\.9 -> 0\.0"):
        _steps(model, opt, x, y, 1)
    _assert_unchanged(model, opt, snapshot)
    opt.param_groups[0]["beta1"] = 0.9
    opt.param_groups[0]["beta2"] = 0.9  # same layout: takes effect at the next step
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
