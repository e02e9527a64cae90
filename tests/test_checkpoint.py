"""Checkpoints: round trip, clear mismatch errors, atomic writes, exact resume across processes."""

import os
import subprocess
import sys

import numpy as np
import optree
import pytest

import shampoo_core as sc
from shampoo_core import checkpoint
from helpers import to_np, to_xp
import resume_job

HERE = os.path.dirname(__file__)


def trained_state(xp, tx, dtype="float64", steps=4):
    params = to_xp(xp, resume_job.initial_params(dtype))
    state = tx.init(params)
    for step in range(1, steps + 1):
        _, state = tx.update(state, to_xp(xp, resume_job.grads_at(step, resume_job.initial_params(dtype), dtype)), params)
    return params, state


def assert_states_equal(a, b):
    la, sa = optree.tree_flatten(a)
    lb, sb = optree.tree_flatten(b)
    assert sa == sb
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(to_np(x), to_np(y))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_round_trip(xp, tmp_path, dtype):
    tx = resume_job.make_tx()
    params, state = trained_state(xp, tx, dtype)
    path = tmp_path / "state.npz"
    sc.save_state(path, state, tx=tx)
    loaded = sc.load_state(path, like=tx.init(params), tx=tx)
    assert_states_equal(state, loaded)
    # Also from the parameters alone, with the transformation.
    assert_states_equal(state, sc.load_state(path, like=params, tx=tx))


@pytest.mark.parametrize("make", [lambda: sc.adam(0.1), lambda: sc.sgd(0.1, momentum=0.9),
                                  lambda: sc.adagrad(0.1), lambda: sc.full_matrix_adagrad(0.1)])
def test_round_trip_other_optimizers(tmp_path, make):
    tx = make()
    params = {"w": np.ones((3, 2)), "b": np.zeros(2)}
    state = tx.init(params)
    _, state = tx.update(state, {"w": np.full((3, 2), 0.5), "b": np.ones(2)}, params)
    sc.save_state(tmp_path / "s.npz", state, tx=tx)
    assert_states_equal(state, sc.load_state(tmp_path / "s.npz", like=params, tx=tx))


@pytest.mark.parametrize("half", ["bfloat16", "float16"])
def test_round_trip_of_half_precision_state(xp, tmp_path, half):
    """NumPy has no bfloat16: stored as float32 (exact), narrowed back on load, bit for bit."""
    if getattr(xp, half, None) is None:
        pytest.skip(f"{getattr(xp, '__name__', xp)} has no {half}")
    rng = np.random.default_rng(0)
    params = {"w": xp.astype(to_xp(xp, rng.standard_normal((6, 5)).astype(np.float32)), getattr(xp, half))}
    # epsilon 1e-3: the default 1e-8 is 0 in float16 (as for torch.optim.Adam on float16 weights)
    for tx in (sc.adam(0.1, epsilon=1e-3), sc.sgd(0.1, momentum=0.9), sc.shampoo(0.1, block_size=4)):
        state = tx.init(params)
        for _ in range(3):
            grads = {"w": xp.astype(to_xp(xp, rng.standard_normal((6, 5)).astype(np.float32)), getattr(xp, half))}
            _, state = tx.update(state, grads, params)
        sc.save_state(tmp_path / "s.npz", state, tx=tx)
        loaded = sc.load_state(tmp_path / "s.npz", like=params, tx=tx)
        la, lb = optree.tree_leaves(state), optree.tree_leaves(loaded)
        assert [x.dtype for x in la] == [y.dtype for y in lb]
        for x, y in zip(la, lb):
            assert bool(xp.all(x == y))


def test_bfloat16_checkpoint_into_a_float16_state_is_refused(tmp_path):
    torch = pytest.importorskip("torch")
    tx = sc.adam(0.1)
    p = torch.ones(3, 3, dtype=torch.bfloat16)
    sc.save_state(tmp_path / "s.npz", tx.init(p), tx=tx)
    with pytest.raises(sc.CheckpointError, match="checkpoint dtype bfloat16, the state expects torch.float16"):
        sc.load_state(tmp_path / "s.npz", like=p.half(), tx=tx)


def test_shape_mismatch_names_first_difference(tmp_path):
    tx = resume_job.make_tx()
    params = resume_job.initial_params("float64")
    sc.save_state(tmp_path / "s.npz", tx.init(params), tx=tx)
    other = dict(params, w=np.zeros((12, 8)))
    with pytest.raises(sc.CheckpointError, match=r"state\.params\[3\]\.momentum: checkpoint shape \(12, 7\).*expects \(12, 8\)"):
        sc.load_state(tmp_path / "s.npz", like=other, tx=tx)


def test_dtype_and_structure_mismatch(tmp_path):
    tx = resume_job.make_tx()
    params = resume_job.initial_params("float64")
    sc.save_state(tmp_path / "s.npz", tx.init(params), tx=tx)
    with pytest.raises(sc.CheckpointError, match="dtype float64.*expects float32"):
        sc.load_state(tmp_path / "s.npz", like=resume_job.initial_params("float32"), tx=tx)
    with pytest.raises(sc.CheckpointError, match=r"state\.params: checkpoint has 4 entries, the state 3"):
        sc.load_state(tmp_path / "s.npz", like={k: v for k, v in params.items() if k != "s"}, tx=tx)
    with pytest.raises(sc.CheckpointError, match="checkpoint has a ShampooState, the state a FirstOrderState"):
        sc.load_state(tmp_path / "s.npz", like=sc.adam(0.1).init(params))


def test_hyperparameter_mismatch(tmp_path):
    tx = resume_job.make_tx()
    params = resume_job.initial_params("float64")
    sc.save_state(tmp_path / "s.npz", tx.init(params), tx=tx)
    other = sc.shampoo(0.05, block_size=6, start_preconditioning_step=2, preconditioning_compute_steps=3,
                       graft_type="adam", beta2=0.99)
    with pytest.raises(sc.CheckpointError, match="hyperparameter 'block_size': checkpoint has 5, the optimizer has 6"):
        sc.load_state(tmp_path / "s.npz", like=params, tx=other)


def test_format_version_checked(tmp_path, monkeypatch):
    tx = sc.sgd(0.1)
    params = np.ones(3)
    monkeypatch.setattr(checkpoint, "FORMAT_VERSION", 99)
    sc.save_state(tmp_path / "s.npz", tx.init(params))
    monkeypatch.setattr(checkpoint, "FORMAT_VERSION", 1)
    with pytest.raises(sc.CheckpointError, match="format version 99"):
        sc.load_state(tmp_path / "s.npz", like=tx.init(params))


def test_state_saved_by_another_version_names_its_fields(tmp_path):
    """A state type that gained a field (EvaState.skipped) cannot read an older file: the error
    names the fields on both sides (it used to be a bare KeyError)."""
    import json

    tx = sc.eva(0.1)
    state = tx.init(np.ones((3, 2)))
    sc.save_state(tmp_path / "s.npz", state)
    with np.load(tmp_path / "s.npz") as f:
        arrays = dict(f)
    header = json.loads(bytes(arrays["__header__"]).decode())
    del header["structure"]["fields"]["skipped"]
    arrays["__header__"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    np.savez(tmp_path / "old.npz", **arrays)
    with pytest.raises(sc.CheckpointError, match=r"state: the checkpoint's EvaState has fields "
                       r"\['count', 'momentum', 'left', 'right'\].*missing: \['skipped'\]"):
        sc.load_state(tmp_path / "old.npz", like=state)


def test_no_pickle_in_file(tmp_path):
    tx = resume_job.make_tx()
    sc.save_state(tmp_path / "s.npz", tx.init(resume_job.initial_params("float64")), tx=tx)
    with np.load(tmp_path / "s.npz", allow_pickle=False) as data:
        assert all(data[k].dtype != object for k in data.files)


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    tx = resume_job.make_tx()
    params = resume_job.initial_params("float64")
    _, state = trained_state(np, tx)
    path = tmp_path / "s.npz"
    sc.save_state(path, state, tx=tx)
    good = path.read_bytes()

    def crash(f, **arrays):
        f.write(b"partial garbage")
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        sc.save_state(path, tx.init(params), tx=tx)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["s.npz"]


@pytest.mark.parametrize("use_async", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_resume_in_fresh_process_is_bit_exact(tmp_path, dtype, use_async):
    # Roots are submitted at steps 2, 5, 8, ... and swapped in 2 steps later, so after n = 6 steps
    # the roots of step 5 are still in flight when the first process saves.
    n, m = 6, 6
    ckpt, saved = str(tmp_path / "state.npz"), str(tmp_path / "params.npz")
    job = [sys.executable, os.path.join(HERE, "resume_job.py"), "--dtype", dtype, "--checkpoint", ckpt, "--params", saved]
    if use_async:
        job.append("--async-roots")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    subprocess.run(job + ["--steps", str(n)], check=True, env=env)
    subprocess.run(job + ["--steps", str(m), "--resume"], check=True, env=env)
    resumed = dict(np.load(saved))

    executor = resume_job.make_executor(use_async)
    tx = resume_job.make_tx(executor=executor)
    params = resume_job.initial_params(dtype)
    params, _ = resume_job.train(tx, params, tx.init(params), 1, n + m, dtype)
    if executor is not None:
        assert sc.read_header(ckpt)["pending_roots"]  # the save really had roots in flight
        executor.close()
    for k, v in params.items():
        assert resumed[k].dtype == v.dtype
        np.testing.assert_array_equal(resumed[k], v)


def test_pending_roots_need_an_executor(tmp_path):
    with sc.AsyncPreconditioners(max_staleness=2, deterministic=True) as ex:
        tx = resume_job.make_tx(executor=ex)
        params = resume_job.initial_params("float64")
        state = tx.init(params)
        for step in range(1, 3):
            _, state = tx.update(state, resume_job.grads_at(step, params, "float64"), params)
        sc.save_state(tmp_path / "s.npz", state, tx=tx, async_preconditioners=ex)
    with pytest.raises(sc.CheckpointError, match="in flight: pass async_preconditioners="):
        sc.load_state(tmp_path / "s.npz", like=params, tx=tx)
