"""Eva and K-FAC on torch models through module hooks (bias folded in as an input column)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import shampoo_core as sc  # noqa: E402
from backends.torch_curvature import CurvatureOptimizer  # noqa: E402


def test_linear_layer_matches_manual_eva():
    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 3).double()
    x = torch.randn(16, 5, dtype=torch.float64)
    y = torch.randn(16, 3, dtype=torch.float64)
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    opt = CurvatureOptimizer(layer, sc.eva(0.5, momentum=0.0, kl_clip=None))
    torch.mean((layer(x) - y) ** 2).backward()
    opt.step()

    # Manual: combined [W | b], ā = mean [x, 1], ḡ = mean per-sample dL/dz.
    z = x @ w0.T + b0
    dz = 2 * (z - y) / (16 * 3)
    g = torch.cat([dz.T @ x, dz.sum(0)[:, None]], dim=1)
    a_bar = torch.cat([x.mean(0), torch.ones(1, dtype=x.dtype)])
    g_bar = (dz * 16).mean(0)
    import array_api_compat.torch as xt

    ev = __import__("importlib").import_module("shampoo_core.eva")
    v = ev.eva_precondition(xt, g, a_bar, g_bar, 0.03)
    torch.testing.assert_close(layer.weight.detach(), w0 - 0.5 * v[:, :-1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.bias.detach(), b0 - 0.5 * v[:, -1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind, make", [("eva", lambda: sc.eva(0.05)), ("kfac", lambda: sc.kfac(0.05)),
                                        ("kfac", lambda: sc.kfac(1.0, variant="foof"))])
def test_conv_net_trains(kind, make):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 2), torch.nn.LayerNorm(2))
    x = torch.randn(32, 1, 6, 6)
    y = torch.randn(32, 2)
    opt = CurvatureOptimizer(model, make(), kind=kind)
    losses = []
    for _ in range(30):
        model.zero_grad()
        loss = torch.mean((model(x) - y) ** 2)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and losses[-1] < 0.9 * losses[0]
    # LayerNorm's parameters are outside Linear/Conv2d: updated without curvature.
    assert opt.others and all(p.grad is not None for p in opt.others)


def test_step_before_backward_is_an_error():
    layer = torch.nn.Linear(2, 2)
    opt = CurvatureOptimizer(layer, sc.eva(0.1))
    with pytest.raises(ValueError, match="forward and a backward pass"):
        layer.weight.grad = torch.zeros(2, 2)
        layer.bias.grad = torch.zeros(2)
        opt.step()
    with pytest.raises(ValueError, match="kind"):
        CurvatureOptimizer(layer, sc.eva(0.1), kind="shampoo")


def test_gradient_only_kind_runs_eva_s_on_folded_weights():
    torch.manual_seed(2)
    layer = torch.nn.Linear(4, 3).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    opt = CurvatureOptimizer(layer, sc.eva_s(0.1, momentum=0.0), kind=None)
    torch.mean((layer(x) - y) ** 2).backward()
    g = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], dim=1)
    opt.step()
    import array_api_compat.torch as xt

    ev = __import__("importlib").import_module("shampoo_core.eva")
    p = ev.eva_s_precondition(xt, g, g.mean(1), g.mean(0), 0.03)
    torch.testing.assert_close(layer.weight.detach(), w0 - 0.1 * p[:, :-1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.bias.detach(), b0 - 0.1 * p[:, -1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind, make", [("eva", lambda: sc.eva(0.05)), ("kfac", lambda: sc.kfac(0.05))])
def test_trains_under_bfloat16_autocast(kind, make):
    """Autocast records bfloat16 inputs and output gradients for float32 weights; curvature is
    computed in float32 (it used to reach the optimizer as bfloat16 and be refused)."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    x, y = torch.randn(64, 6), torch.randn(64, 2)
    opt = CurvatureOptimizer(model, make(), kind=kind)
    losses = []
    for _ in range(25):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        assert out.dtype == torch.bfloat16
        loss = torch.mean((out.float() - y) ** 2)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(leaf.dtype == torch.float32 for leaf in opt.state.momentum)
    assert np.isfinite(losses).all() and losses[-1] < 0.9 * losses[0]


def test_a_non_finite_gradient_names_the_module_and_updates_nothing():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2), torch.nn.LayerNorm(2))
    opt = CurvatureOptimizer(model, sc.eva(0.1))
    x = torch.randn(8, 3)
    model(x).sum().backward()
    model[2].weight.grad[0, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"grads\['layers'\]\['2'\] has non-finite values"):
        opt.step()
    for a, p in zip(before, model.parameters()):
        torch.testing.assert_close(p.detach(), a, rtol=0, atol=0)
    model[2].weight.grad[0, 0] = 0.0
    model[3].bias.grad[1] = float("inf")
    with pytest.raises(ValueError, match=r"grads\['others'\]\['3.bias'\] has non-finite values"):
        opt.step()
    model[3].bias.grad[1] = 0.0
    opt.step()  # finite again: the step goes through
    assert int(opt.state.count) == 1


def _mlp(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3), torch.nn.LayerNorm(3))


@pytest.mark.parametrize("kind, make", [("eva", lambda: sc.eva(0.1)), ("kfac", lambda: sc.kfac(0.1, inverse_steps=2)),
                                        (None, lambda: sc.eva_s(0.1))])
def test_state_dict_resumes_exactly(kind, make):
    import io

    x, y = torch.randn(16, 5, generator=torch.Generator().manual_seed(0)), torch.randn(16, 3)

    def train(model, opt, steps):
        for _ in range(steps):
            model.zero_grad()
            torch.mean((model(x) - y) ** 2).backward()
            opt.step()

    model = _mlp(0)
    opt = CurvatureOptimizer(model, make(), kind=kind)
    train(model, opt, 5)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train(model, opt, 4)

    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = _mlp(1)
    resumed.load_state_dict(saved["model"])
    opt2 = CurvatureOptimizer(resumed, make(), kind=kind)
    opt2.load_state_dict(saved["opt"])
    assert int(opt2.state.count) == 5
    train(resumed, opt2, 4)
    for a, b in zip(model.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_load_state_dict_refuses_another_layout():
    model = _mlp(0)
    eva = CurvatureOptimizer(model, sc.eva(0.1))
    kfac = CurvatureOptimizer(model, sc.kfac(0.1), kind="kfac")
    before = eva.state_dict()
    with pytest.raises(ValueError, match="made with kind='kfac'; this optimizer has kind='eva'"):
        eva.load_state_dict(kfac.state_dict())
    with pytest.raises(ValueError, match=r"holds \d+ arrays; this optimizer's state has \d+"):
        eva.load_state_dict(dict(kfac.state_dict(), kind="eva"))
    other = CurvatureOptimizer(torch.nn.Sequential(torch.nn.Linear(5, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3),
                                                   torch.nn.LayerNorm(3)), sc.eva(0.1))
    with pytest.raises(ValueError, match=r"state_dict\['leaves'\]\[\d+\] has shape"):
        eva.load_state_dict(other.state_dict())
    for a, b in zip(before["leaves"], eva.state_dict()["leaves"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
