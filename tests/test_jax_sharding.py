"""Parameters sharded over several JAX devices: state beside them, updates as on one device.

JAX fixes its device count when it starts, so the run is ``tests/sharded_job.py`` in its own
process with two forced host devices.
"""

import os
import subprocess
import sys

import pytest

pytest.importorskip("jax")
pytest.importorskip("optax")

HERE = os.path.dirname(os.path.abspath(__file__))


def test_sharded_and_replicated_parameters_train_as_on_one_device():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, os.path.join(HERE, "sharded_job.py")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    assert done.stdout.count("ok: ") == 12, done.stdout
