"""The benchmark commands run (tiny sizes) and report what they claim to measure."""

import json
import os

import pytest

from bench.__main__ import main


def test_roots_benchmark_and_cost_model(tmp_path):
    pytest.importorskip("scipy")
    model_path = tmp_path / "model.json"
    assert main(["roots", "--out", str(tmp_path), "--sizes", "16,32", "--kappas", "1e2,1e6", "--batches", "4x16",
                 "--repeats", "2", "--budget", "0.05", "--no-plot", "--save-cost-model", str(model_path),
                 "--methods", "numpy eigh f64 (plain LAPACK),core eigh f64,core newton f64,scipy evd f32"]) == 0
    report = json.loads((tmp_path / "roots.json").read_text())
    rows = report["rows"]
    assert {r["n"] for r in rows} == {16, 32}
    for r in rows:
        assert r["seconds"] > 0 and r["matmul_units"] > 0
        if r["dtype"] == "float64":
            assert r["rel_error"] < 1e-8  # float64 roots of κ <= 1e6 against the exact root
    assert any(r["batch"] == 4 for r in rows)
    assert next(r for r in rows if r["method"] == "core newton f64")["iterations"] > 0
    import shampoo_core as sc

    model = sc.CostModel.load(model_path)
    assert set(model.table("array_api_compat.numpy", "cpu", "float64")[0][1]) == {"eigh", "newton"}
    assert all(device == "cpu" for _, device, _ in model.entries())  # this machine has no GPU for NumPy


def test_start_jax_starts_the_client_with_the_bench_flags_and_reports_them():
    """A fresh process starts JAX's CPU client with ``xla_flags`` (or the environment's
    ``XLA_FLAGS``, as it is) and leaves nothing in the environment; a client that already runs
    is reported as such (None), since it keeps its own settings."""
    import subprocess
    import sys

    pytest.importorskip("jax")
    from bench.timing import start_jax, xla_flags

    script = ("import json, os; from bench.timing import start_jax; r = {}; start_jax(1, r); "
              "print(json.dumps([r['xla_flags'], os.environ.get('XLA_FLAGS')]))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    for given, expected, left in ((None, xla_flags(1), None), ("--xla_cpu_use_xnnpack=true",) * 3):
        run_env = env if given is None else dict(env, XLA_FLAGS=given)
        out = subprocess.run([sys.executable, "-c", script], cwd=root, env=run_env, capture_output=True, text=True,
                             check=True)
        assert json.loads(out.stdout.strip().splitlines()[-1]) == [expected, left]
    assert xla_flags(1) == "--xla_cpu_multi_thread_eigen=false" and xla_flags(2) == ""
    import jax

    jax.devices()
    report = {}
    assert start_jax(1, report) is jax and report == {"xla_flags": None}


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is set on Linux only")
def test_roots_benchmark_runs_every_thread_on_its_cpus(tmp_path, monkeypatch):
    """JAX's jitted root (XLA runs independent operations on a pool of one thread per core) and the
    BLAS calls share ``--threads`` CPUs while timed; the process gets its CPUs back after."""
    pytest.importorskip("jax")
    before = os.sched_getaffinity(0)
    seen = []

    import bench.roots as roots

    real = roots._median_time

    def spy(fn, repeats, budget):
        seen.append(os.sched_getaffinity(0))
        return real(fn, repeats, budget)

    monkeypatch.setattr(roots, "_median_time", spy)
    assert main(["roots", "--out", str(tmp_path), "--sizes", "16", "--kappas", "1e2", "--batches", "",
                 "--repeats", "2", "--budget", "0.05", "--no-plot", "--methods", "core eigh f64 (jax.jit)"]) == 0
    report = json.loads((tmp_path / "roots.json").read_text())
    cpus = sorted(before)[:1]
    assert report["threads"]["cpus"] == cpus and report["threads"]["threads"] == 1
    assert seen and all(s == set(cpus) for s in seen)  # the floor and the method, timed on one CPU
    assert os.sched_getaffinity(0) == before


def test_step_benchmark(tmp_path):
    assert main(["step", "--out", str(tmp_path), "--small", "--block-sizes", "8,32", "--steps", "2"]) == 0
    report = json.loads((tmp_path / "step.json").read_text())
    assert [r["block_size"] for r in report["rows"]] == [8, 32]
    for r in report["rows"]:
        assert r["floor_ms"] > 0 and r["nonroot_ms"] > 0 and r["hot_floor_ms"] > 0
        assert r["amortized_ms"]["1"] >= r["amortized_ms"]["100"]
        assert r["block_matmuls_loop_ms"] > 0 and r["block_matmuls_batched_ms"] > 0  # 64x256 splits evenly
        assert r["pass_ms"] > 0 and report["pass_ms"] > 0
        assert r["cold_pass_ms"] == report["cold_pass_ms"] > 0
        assert r["cold_passes_above_floor"] == pytest.approx((r["nonroot_ms"] - r["floor_ms"]) / r["cold_pass_ms"])
        assert r["passes_above_floor"] == pytest.approx((r["nonroot_ms"] - r["floor_ms"]) / r["pass_ms"])
        assert r["passes_left_by_target"] == pytest.approx(0.25 * r["floor_ms"] / r["pass_ms"])
        assert r["donated_ratio_to_floor"] == pytest.approx(r["donated_nonroot_ms"] / r["floor_ms"])
        assert r["donated_passes_above_floor"] == pytest.approx((r["donated_nonroot_ms"] - r["floor_ms"]) / r["pass_ms"])
        assert r["plain_donated_ratio_to_floor"] == pytest.approx(r["plain_donated_nonroot_ms"] / r["floor_ms"])
        assert r["plain_donated_passes_above_floor"] == pytest.approx(
            (r["plain_donated_nonroot_ms"] - r["floor_ms"]) / r["pass_ms"])
        assert r["grafted_optimizer_ms"] == pytest.approx(r["donated_nonroot_ms"] - r["plain_donated_nonroot_ms"])


@pytest.mark.parametrize("ratio, text", [
    (1.13, "1.13x the floor, within 1.25x"),
    (1.254, "1.254x the floor, above 1.25x"),  # not "1.25x": rounding must not hide a miss
    (1.2502, "1.2502x the floor, above 1.25x"),
    (1.2499, "1.2499x the floor, within 1.25x"),
    (1.25, "1.25x the floor, within 1.25x"),
    (1.64, "1.64x the floor, above 1.25x"),
])
def test_step_ratios_print_their_side_of_the_target(ratio, text):
    from bench.step import ratio_text
    assert ratio_text(ratio, " the floor") == text


@pytest.mark.parametrize("graft", [[], ["--graft-type", "adam"], ["--graft-type", "adam", "--nesterov"]])
def test_step_benchmark_times_plain_shampoo_donated(tmp_path, monkeypatch, graft):
    """The plain row is the donated step of Shampoo without grafting or a first moment, beside
    the default donated step on the same blocks; ``--graft-type`` and ``--nesterov`` set the
    grafting and the first moment of the step and of the donated step, not of the plain one."""
    import shampoo_core as sc

    built = []
    real = sc.shampoo
    monkeypatch.setattr(sc, "shampoo", lambda *a, **k: built.append(k) or real(*a, **k))
    assert main(["step", "--out", str(tmp_path), "--small", "--block-sizes", "32", "--steps", "2", *graft]) == 0
    graft_type = graft[1] if graft else "adagrad"
    nesterov = "--nesterov" in graft
    assert [(k.get("graft_type"), k.get("beta1"), bool(k.get("nesterov")), bool(k.get("donate_state")))
            for k in built] == [(graft_type, None, nesterov, False), (graft_type, None, nesterov, True),
                                ("none", 0.0, False, True)]
    assert all(k["block_size"] == 32 for k in built)
    report = json.loads((tmp_path / "step.json").read_text())
    assert (report["graft_type"], report["nesterov"]) == (graft_type, nesterov)
    # the kernels NumPy's BLAS runs, which the floor is only as fast as (threadpoolctl)
    pytest.importorskip("threadpoolctl")
    assert any(b["internal_api"] == "openblas" and b["architecture"] for b in report["blas"])


@pytest.mark.parametrize("lib", ["torch", "jax"])
def test_step_benchmark_on_other_libraries(tmp_path, lib):
    pytest.importorskip(lib)
    assert main(["step", "--out", str(tmp_path), "--small", "--block-sizes", "32", "--steps", "2", "--library", lib]) == 0
    report = json.loads((tmp_path / "step.json").read_text())
    (row,) = report["rows"]
    assert report["library"] == lib and row["blocks"] == 57
    assert row["floor_ms"] > 0 and row["nonroot_ms"] > 0 and row["pass_ms"] > 0
    assert ("first_call_s" in row) == (lib == "jax") and ("amortized_ms" in row) == (lib == "torch")
    assert ("hot_floor_ms" in row) == (lib == "torch")  # from cache: eager calls only
    assert row["donated_nonroot_ms"] > 0  # donate_state=True on torch, donate_argnums under jax.jit
    assert row["plain_donated_nonroot_ms"] > 0
    assert report["threads"]["cpus"] == sorted(os.sched_getaffinity(0))[:1]
    assert ("xla_flags" in report["threads"]) == (lib == "jax")


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is set on Linux only")
def test_pinned_cpus_pins_threads_already_running_and_gives_the_cpus_back():
    """XLA's runtime pool starts with the JAX client, before a bench run pins: its threads must be
    pinned too, and every thread must get its CPUs back after the run (the test session goes on)."""
    import threading

    from bench.timing import pinned_cpus

    before = os.sched_getaffinity(0)
    seen: dict = {}
    go, done = threading.Event(), threading.Event()

    def worker():  # started before the pin
        go.wait()
        seen["inside"] = os.sched_getaffinity(0)  # pid 0: the calling thread
        done.wait()
        seen["after"] = os.sched_getaffinity(0)

    thread = threading.Thread(target=worker)
    thread.start()
    with pinned_cpus(1) as cpus:
        assert cpus == sorted(before)[:1]
        assert os.sched_getaffinity(0) == set(cpus)
        go.set()
        while "inside" not in seen:
            thread.join(0.01)
    done.set()
    thread.join()
    assert seen["inside"] == set(cpus) and seen["after"] == before
    assert os.sched_getaffinity(0) == before


def test_step_floor_gives_every_block_operands_of_its_own(monkeypatch):
    # The step meets each block's data from memory; a floor timing one block per shape from
    # cache and multiplying would undercount (hot_floor_seconds keeps that figure apart).
    from bench import step

    made = []
    real = step._operands
    monkeypatch.setattr(step, "_operands", lambda *a: made.append(a[1]) or real(*a))
    assert step.floor_seconds(32, step.model_problem(step.SMALL_SHAPES)[0], 1) > 0
    assert len(made) == 57  # every block, as the step's state holds them
    made.clear()
    step.hot_floor_seconds(32, step.model_problem(step.SMALL_SHAPES)[0], 1)
    assert len(made) == len(set(made)) < 57  # one per distinct shape


def test_torch_floor_forms_gram_products_as_its_step_does():
    # Where torch's step takes its statistics by BLAS's syrk (backends.torch_backend.gram_average),
    # its floor's Gram products are syrk's too, not torch's full product, which takes longer;
    # where its step keeps baddbmm (small blocks), the floor keeps torch's product.
    torch = pytest.importorskip("torch")
    pytest.importorskip("numba")
    import numpy as np

    from bench import step

    gram = step.gram_product(step.Library("torch", torch.from_numpy, lambda fn: fn))
    for shape, by_syrk in [((128, 300), True), ((128, 128), False)]:
        m = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
        out = gram(torch.from_numpy(m))
        assert isinstance(out, torch.Tensor)
        expected = torch.from_numpy(m @ m.T) if by_syrk else torch.from_numpy(m) @ torch.from_numpy(m).T
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert step.floor_seconds(32, step.model_problem(step.SMALL_SHAPES)[0], 1,
                              step.Library("torch", torch.from_numpy, lambda fn: fn)) > 0


def test_adapters_benchmark(tmp_path):
    pytest.importorskip("torch")
    assert main(["adapters", "--out", str(tmp_path), "--steps", "3", "--warmup", "1"]) == 0
    rows = json.loads((tmp_path / "adapters.json").read_text())["rows"]
    assert {"core on NumPy", "torch.optim adapter"} <= {r["case"] for r in rows}


def test_pipeline_benchmark(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    assert main(["pipeline", "--out", str(tmp_path), "--scale", "32", "--block-size", "16", "--every", "3,5",
                 "--steps", "12", "--train-steps", "20", "--staleness", "2", "--rounds", "2"]) == 0
    report = json.loads((tmp_path / "pipeline.json").read_text())
    assert [r["every"] for r in report["runs"]] == [3, 5]
    for run in report["runs"]:
        assert set(run["step_ms"]) == {"none", "sync", "async"}
        assert len(run["rounds"]) == 2 and run["over_none"]["async"] > 0
        faults = run["minor_faults_per_step"]
        assert set(faults) == {"none", "sync", "async"}
        assert all(f is None or f >= 0 for f in faults.values())
        # 12 timed steps hold a root step whose job is due within them: its busy time is counted
        assert all(r["none"]["busy"] is None and r["async"]["busy"] > 0 for r in run["rounds"])
        assert 0 < run["worker_load"] and run["waited_ms_per_step"] >= 0
    assert report["digits"]["sync"][-1][0] == 20


def test_pipeline_every_must_be_positive_integers(tmp_path):
    with pytest.raises(SystemExit, match="--every"):
        main(["pipeline", "--out", str(tmp_path), "--every", "10,x"])
    with pytest.raises(SystemExit, match="--every"):
        main(["pipeline", "--out", str(tmp_path), "--every", "0"])


def test_pipeline_workers(tmp_path, capsys):
    pytest.importorskip("torch")
    assert main(["pipeline", "--out", str(tmp_path), "--scale", "32", "--block-size", "16", "--every", "3",
                 "--steps", "6", "--train-steps", "0", "--rounds", "1", "--workers", "2"]) == 0
    report = json.loads((tmp_path / "pipeline.json").read_text())
    assert report["workers"] == 2 and "digits" not in report
    assert "2 workers:" in capsys.readouterr().out
    for bad in ("0", "x"):
        with pytest.raises(SystemExit):
            main(["pipeline", "--out", str(tmp_path), "--workers", bad])
        assert f"--workers: an integer >= 1 expected; got '{bad}'" in capsys.readouterr().err


def test_minor_faults_count_fresh_pages():
    from bench.pipeline import minor_faults

    np = pytest.importorskip("numpy")
    pytest.importorskip("resource")
    before = minor_faults()
    # 64 MiB, above any mmap threshold of glibc: fresh pages, faulted in as they are written (by
    # 2 MiB where the kernel backs them with huge pages)
    pages = np.ones(64 << 20, dtype=np.uint8)
    assert minor_faults() - before >= 16 and int(pages[::4096].sum()) == (64 << 20) // 4096


def test_memory_benchmark(tmp_path):
    assert main(["memory", "--out", str(tmp_path)]) == 0
    rows = {r["optimizer"]: r["bytes_per_parameter"] for r in json.loads((tmp_path / "memory.json").read_text())["rows"]}
    # Adam keeps two float32 moments per parameter plus a counter; Eva's vectors add little to SGD's buffer.
    assert 8.0 <= rows["adam"] < 8.01
    assert 4.0 <= rows["eva"] < rows["kfac"]
    peaks = {r["optimizer"]: r["step_peak_bytes_per_parameter"]
             for r in json.loads((tmp_path / "memory.json").read_text())["rows"]}
    # Every step allocates its float32 updates; a donated one, not its first moment, grafting
    # accumulator (4 bytes per parameter each) and statistics anew.
    assert all(peak >= 4.0 for peak in peaks.values())
    assert peaks["shampoo, donate_state=True"] + 8.0 < peaks["shampoo (block 128, demo settings)"]


def test_gpu_benchmark_harness_on_the_cpu(tmp_path):
    """``bench gpu`` runs its device harness on NumPy and reports absent GPU backends as skipped."""
    model_path = tmp_path / "model.json"
    assert main(["gpu", "--out", str(tmp_path), "--backends", "numpy,cupy,torch:cuda", "--sizes", "16,32",
                 "--batches", "4x8,3x16", "--scale", "32", "--block-size", "16", "--floor-block-sizes", "8,16", "--every", "2", "--steps", "3",
                 "--repeats", "2", "--budget", "0.05", "--save-cost-model", str(model_path)]) == 0
    report = json.loads((tmp_path / "gpu.json").read_text())
    import importlib.util

    if importlib.util.find_spec("cupy") is None:
        assert "cupy" in report["skipped"]
    methods = {r["method"] for r in report["roots"]}
    assert {"plain eigh f64 (numpy)", "core eigh f64 (numpy)", "core newton f32 (numpy)"} <= methods
    for r in report["roots"]:
        assert r["seconds"] > 0 and r["matmul_units"] > 0
        if r["dtype"] == "float64":
            assert r["rel_error"] < 1e-8
    assert [(r["count"], r["n"]) for r in report["batched"]] == [(4, 8), (3, 16)]
    for r in report["batched"]:
        assert r["max_relative_eigenvalue_difference"] < 1e-12  # same eigenvalues either way
    assert set(report["step"]["numpy"]) == {"none", "device_roots", "host_roots_async"}
    host = report["step"]["numpy"]["host_roots_async"]
    assert host["worker_busy_ms"] > 0 and 0 < host["worker_load"] and host["waited_ms"] >= 0
    assert "worker_load" not in report["step"]["numpy"]["device_roots"]
    assert [r["block_size"] for r in report["step_floor"]["numpy"]] == [8, 16]
    for r in report["step_floor"]["numpy"]:
        assert r["floor_ms"] == min(r["floor_loop_ms"], r["floor_batched_ms"]) > 0
        assert r["ratio_to_floor"] == pytest.approx(r["nonroot_ms"] / r["floor_ms"])
        assert r["passes_above_floor"] == pytest.approx((r["nonroot_ms"] - r["floor_ms"]) / r["pass_ms"])
        assert r["passes_left_by_target"] == pytest.approx(0.25 * r["floor_ms"] / r["pass_ms"])
        assert r["donated_ratio_to_floor"] == pytest.approx(r["donated_nonroot_ms"] / r["floor_ms"])
    assert report["adamw_ms"]["numpy"] == {}  # AdamW runs on torch backends only
    assert (tmp_path / "gpu.png").stat().st_size > 0
    import shampoo_core as sc

    model = sc.CostModel.load(model_path)
    assert [n for n, _ in model.table("array_api_compat.numpy", "cpu", "float64")] == [16, 32]


def test_console_script_runs_the_bench_commands():
    """Installing the package adds ``shampoo-bench``, the same commands as ``python -m bench``."""
    import importlib.metadata
    import os
    import shutil
    import subprocess
    import sys

    try:
        importlib.metadata.distribution("shampoo-core")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("shampoo-core is not installed in this environment")
    (entry,) = importlib.metadata.entry_points(group="console_scripts", name="shampoo-bench")
    assert entry.load() is main
    script = shutil.which("shampoo-bench", path=os.path.dirname(sys.executable))
    assert script, "shampoo-bench is not next to this Python"
    out = subprocess.run([script, "roots", "--help"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("usage: shampoo-bench roots")
    assert "--save-cost-model" in out.stdout


def test_pass_is_one_new_array_per_parameter(monkeypatch):
    # The unit of the work beside the matmuls reads every parameter once and writes each anew.
    import numpy as np

    from bench import step

    calls = []
    monkeypatch.setattr(step, "_median", lambda fn, n: calls.append(fn()) or 1.0)
    params = {"a": np.ones((3, 4), np.float32), "b": np.ones(5, np.float32)}
    assert step.pass_seconds(params, 1) == 1.0
    (out,) = calls
    assert [o.shape for o in out] == [(3, 4), (5,)]
    assert all(not np.shares_memory(o, p) for o, p in zip(out, params.values()))
    assert step.passes(dict(pass_ms=2.0, nonroot_ms=15.0, floor_ms=10.0)) == dict(
        passes_above_floor=2.5, passes_left_by_target=1.25)


def test_cold_pass_empties_the_caches_before_each_timed_pass(monkeypatch):
    # The pass from memory: a read of a buffer larger than the caches before every timed pass,
    # outside the timing, and the pass itself the unit pass.
    import numpy as np

    from bench import step

    events = []
    monkeypatch.setattr(step, "read_all", lambda buffer: events.append(("read", buffer.nbytes)))
    real_pass = step.one_pass
    monkeypatch.setattr(step, "one_pass", lambda arrays: events.append(("pass",)) or real_pass(arrays))
    params = {"a": np.ones((3, 4), np.float32), "b": np.ones(5, np.float32)}
    assert step.cold_pass_seconds(params, 3, evict_bytes=1 << 20) > 0
    assert events == [("pass",)] + [("read", 1 << 20), ("pass",)] * 3
    rows = step.passes(dict(pass_ms=2.0, cold_pass_ms=5.0, nonroot_ms=15.0, floor_ms=10.0))
    assert rows == dict(passes_above_floor=2.5, passes_left_by_target=1.25,
                        cold_passes_above_floor=1.0, cold_passes_left_by_target=0.5)


@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_device_floor_multiplies_what_the_step_keeps(block_size):
    """The device floor multiplies what the step must: per preconditioned dim of every block a
    symmetric H of the order of the statistic that ``sc.shampoo`` keeps for it (the floor stacks
    equal blocks of all parameters together, the core those of each parameter), and M holding
    every entry of the parameter once per preconditioned dim."""
    from collections import Counter

    import numpy as np

    import shampoo_core as sc
    from bench import device_step, gpu, step
    from shampoo_core import tree

    params = step.model_problem(step.SMALL_SHAPES)[0]
    operands = device_step.floor_operands(gpu.load_backend("numpy"), block_size, params)
    state = sc.shampoo(1e-3, block_size=block_size).init(params)
    def orders(shapes):
        out = Counter()
        for count, d, _ in shapes:
            out[d] += count
        return out

    kept = [s.shape for p in state.params for b in p.blocks for s in b.statistics if s is not None]
    assert orders(h.shape for _, h in operands) == orders(kept)
    for m, h in operands:
        assert m.shape[:2] == h.shape[:2]
        np.testing.assert_array_equal(h, np.swapaxes(h, -1, -2))
    # each preconditioned dim of a parameter multiplies every entry of the parameter once
    leaves, _ = tree.flatten(params)
    assert sum(m.size for m, _ in operands) == sum(
        leaf.size * sum(s is not None for s in p.blocks[0].statistics)
        for leaf, p in zip(leaves, state.params) if p.blocks)


def test_device_floor_row_and_adamw_on_torch():
    """The floor rows run on torch tensors (the path CUDA takes), with AdamW beside them."""
    pytest.importorskip("torch")
    from bench import device_step, gpu, step

    backend = gpu.load_backend("torch")
    shapes = step.scaled_shapes(32)
    row = device_step.floor_row(backend, *step.model_problem(shapes), 16, steps=2, repeats=2, budget=0.05)
    assert row["blocks"] == sum(step._block_counts(16, step.model_problem(shapes)[0]).values()) > 0
    assert row["floor_ms"] == min(row["floor_loop_ms"], row["floor_batched_ms"]) > 0
    assert row["nonroot_ms"] > 0 and row["pass_ms"] > 0 and row["donated_nonroot_ms"] > 0
    adamw = device_step.adamw_ms(backend, *step.model_problem(shapes), 2)
    assert adamw["default"] > 0
