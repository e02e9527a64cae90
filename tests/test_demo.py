"""The main job runs end to end (tiny budget) and writes its report, on every framework."""

import importlib.util
import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

FRAMEWORKS = ["torch", "numpy"] + (["jax"] if importlib.util.find_spec("optax") else [])


def run_tiny(out, *argv):
    """30 steps at the middle learning rate; the report as a dict."""
    from bench.__main__ import main

    assert main(["demo", "--out", str(out), "--steps", "30", "--eval-every", "10", "--lrs", "1",
                 "--no-progress", *argv]) == 0
    return json.loads((out / "results.json").read_text())


def run_demo(out, framework):
    return run_tiny(out, "--optimizers", "shampoo,adam", "--framework", framework)


def torch_losses(reports):
    return {r["optimizer"]: r["losses"] for r in reports["torch"][0]["runs"]}


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    return {fw: (run_demo(tmp_path_factory.mktemp(fw), fw), None) for fw in FRAMEWORKS}


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_demo_writes_report(reports, framework, tmp_path):
    report, _ = reports[framework]
    assert {r["optimizer"] for r in report["summary"]} == {"shampoo", "adam"}
    for run in report["runs"]:
        assert run["steps"] == [10, 20, 30]
        assert all(loss > 0 for loss in run["losses"])
    # Same weights and data: the runs differ only through the optimizer.
    shampoo, adam = (next(r for r in report["runs"] if r["optimizer"] == n) for n in ("shampoo", "adam"))
    assert shampoo["losses"] != adam["losses"]
    assert report["machine"]["framework"] == framework


def test_frameworks_reach_the_same_losses(reports):
    curves = {fw: next(r for r in rep["runs"] if r["optimizer"] == "shampoo")["losses"]
              for fw, (rep, _) in reports.items()}
    reference = curves["torch"]
    for fw, losses in curves.items():
        # float32 models: the frameworks round differently, nothing else differs.
        assert losses == pytest.approx(reference, rel=1e-3), fw


def test_demo_files(tmp_path):
    report = run_demo(tmp_path, "numpy")
    assert (tmp_path / "loss_curves.png").stat().st_size > 1000
    assert "| shampoo |" in (tmp_path / "summary.md").read_text()
    assert report["summary"][0]["optimizer"] in ("shampoo", "adam")


def test_demo_rejects_unknown_optimizer(tmp_path):
    from bench.__main__ import main

    with pytest.raises(SystemExit, match="unknown"):
        main(["demo", "--out", str(tmp_path), "--optimizers", "lbfgs"])


def test_demo_runs_the_eva_family_through_hooks_and_taps(tmp_path):
    """torch: nn.Module hooks; jax: output taps under jit. Same model, data and weights: same losses."""
    from bench.__main__ import main

    losses = {}
    for framework in ("torch", "jax"):
        if framework == "jax":
            pytest.importorskip("jax")
        out = tmp_path / framework
        assert main(["demo", "--out", str(out), "--steps", "20", "--eval-every", "10", "--lrs", "1",
                     "--no-progress", "--framework", framework, "--optimizers", "eva,eva-s,eva-f,kfac,foof"]) == 0
        report = json.loads((out / "results.json").read_text())
        assert {r["optimizer"] for r in report["summary"]} == {"adam", "eva", "eva_s", "eva_f", "kfac", "foof"}
        for run in report["runs"]:
            assert len(run["losses"]) == 2 and all(0 < loss < 1 for loss in run["losses"])
        losses[framework] = {r["optimizer"]: r["losses"] for r in report["runs"]}
    if "jax" in losses:
        for name, values in losses["torch"].items():
            np.testing.assert_allclose(losses["jax"][name], values, rtol=1e-3)


def test_device_is_for_the_torch_framework_only(tmp_path):
    from bench.__main__ import main

    with pytest.raises(SystemExit, match="--device cuda"):
        main(["demo", "--out", str(tmp_path), "--framework", "numpy", "--device", "cuda"])


@pytest.mark.skipif(not importlib.util.find_spec("torch") or not __import__("torch").cuda.is_available(),
                    reason="no CUDA device")
def test_demo_on_cuda_reaches_the_cpu_losses(reports, tmp_path):
    report = run_tiny(tmp_path, "--optimizers", "shampoo,adam,eva", "--device", "cuda")
    assert report["machine"]["device"] == "cuda"
    cpu = torch_losses(reports)
    for r in report["runs"]:
        if r["optimizer"] in cpu:  # float32 on another device: rounding, not different steps
            np.testing.assert_allclose(r["losses"], cpu[r["optimizer"]], rtol=1e-3)


def test_bfloat16_demo_follows_the_float32_run(reports, tmp_path):
    report = run_tiny(tmp_path, "--optimizers", "shampoo,adam", "--dtype", "bfloat16")
    assert report["config"]["dtype"] == "bfloat16"
    f32 = torch_losses(reports)
    for r in report["runs"]:  # bfloat16 weights and data: the float32 run within bfloat16 rounding
        assert np.all(np.isfinite(r["losses"]))
        np.testing.assert_allclose(r["losses"], f32[r["optimizer"]], rtol=0.05)


@pytest.mark.parametrize("argv", [["--framework", "numpy"], ["--optimizers", "eva"]])
def test_bfloat16_demo_is_for_torch_without_the_eva_family(tmp_path, argv):
    from bench.__main__ import main

    with pytest.raises(SystemExit, match="--dtype bfloat16"):
        main(["demo", "--out", str(tmp_path), "--dtype", "bfloat16", *argv])


@pytest.mark.parametrize("optimizer", ["shampoo", "eva"])
def test_jitted_demo_step_writes_parameters_and_state_in_place(tmp_path, monkeypatch, optimizer):
    """The jax framework's step donates its parameters and optimizer state (as a JAX training
    step should): the buffers it is given are gone after a call, for Shampoo, the Eva family and
    the optax baselines."""
    pytest.importorskip("optax")
    import jax

    from bench import demo

    donated = []
    real = demo._run_jitted

    def spy(step, params, state, *rest):
        given = jax.tree_util.tree_map(jax.numpy.copy, jax.device_put((params, state), jax.devices()[0]))
        step(*given, jax.numpy.arange(4))
        donated.append(all(x.is_deleted() for x in jax.tree_util.tree_leaves(given)))
        return real(step, params, state, *rest)

    monkeypatch.setattr(demo, "_run_jitted", spy)
    run_tiny(tmp_path, "--framework", "jax", "--optimizers", optimizer)
    assert donated == [True, True]  # the optimizer, then Adam
