"""The main job runs end to end (tiny budget) and writes its report."""

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")


def test_demo_writes_report(tmp_path):
    from bench.__main__ import main

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "30", "--eval-every", "10", "--lrs", "1",
                 "--no-progress", "--optimizers", "shampoo,adam"]) == 0
    report = json.loads((out / "results.json").read_text())
    assert {r["optimizer"] for r in report["summary"]} == {"shampoo", "adam"}
    for run in report["runs"]:
        assert run["steps"] == [10, 20, 30]
        assert all(loss > 0 for loss in run["losses"])
    # Both start from the same weights and data, so they must differ only through the optimizer.
    shampoo, adam = report["runs"]
    assert shampoo["losses"] != adam["losses"]
    assert (out / "loss_curves.png").stat().st_size > 1000
    assert "| shampoo |" in (out / "summary.md").read_text()


def test_demo_rejects_unknown_optimizer(tmp_path):
    from bench.__main__ import main

    with pytest.raises(SystemExit, match="unknown"):
        main(["demo", "--out", str(tmp_path), "--optimizers", "lbfgs"])
