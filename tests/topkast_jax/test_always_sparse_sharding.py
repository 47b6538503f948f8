"""Always-sparse Top-KAST on a data-parallel mesh of 8 host devices equals one device.

Each device count runs in a subprocess (``XLA_FLAGS`` must be set before jax is imported).
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from test_sharding import _load  # the same result files: <axis_type>.npz or .error

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(os.path.dirname(_HERE))


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([_REPO, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    script = os.path.join(_HERE, "always_sparse_sharded_run.py")
    dirs = {}
    for n in (1, 8):  # one after the other: the machine has few cores
        out_dir = tmp_path_factory.mktemp(f"devices{n}")
        proc = subprocess.run(
            [sys.executable, script, str(n), str(out_dir)],
            env=env,
            cwd=_REPO,
            capture_output=True,
            text=True,
            timeout=400,
        )
        assert proc.returncode == 0, f"{n}-device run crashed:\n{proc.stdout}{proc.stderr}"
        dirs[n] = out_dir
    return dirs


@pytest.mark.parametrize("axis_type", ["auto", "explicit"])
def test_eight_devices_match_one_device(run_dirs, axis_type):
    one, eight = _load(run_dirs[1], axis_type), _load(run_dirs[8], axis_type)
    assert int(one["devices"]) == 1 and int(eight["devices"]) == 8
    assert int(eight["w1_devices"]) == 8  # the B-state is replicated over the mesh
    for key in one:
        if key.startswith(("forward_", "backward_")):
            np.testing.assert_array_equal(eight[key], one[key], err_msg=key)
        elif key.startswith("param_") or key == "losses":
            np.testing.assert_allclose(eight[key], one[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert one["losses"][-1] < one["losses"][0]
