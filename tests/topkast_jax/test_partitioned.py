"""Params in Linen partition boxes (issue 14): the whole train state — params and optimizer state —
gets its shardings from the boxes, as nanodo does (``nn.get_sharding`` of mesh-axis names, or
``nn.logical_to_mesh_sharding`` of logical names with ``nn.scan`` over ``"layers"``), on 8 host
devices.  Sets and optimizer moments are sharded like their kernel; per-leaf densities and
mask-change fractions are replicated (in the kernel's box they were given the kernel's rank-3
spec and the run failed); the scanned stack keeps exactly ``k`` per layer."""

import json
import os
import subprocess
import sys

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(os.path.dirname(_HERE))


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    out = tmp_path_factory.mktemp("partitioned") / "layout.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([_REPO, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, os.path.join(_HERE, "partitioned_layout.py"), str(out)],
        env=env, cwd=_REPO, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", ["topkast_logical", "topkast_mesh_names", "static_logical"])
def test_state_shardings_fit_each_leaf(layout, case):
    got = layout[case]
    assert "error" not in got, got.get("error")
    kernel = got["kernel_spec"]
    assert "'data'" in kernel and "'model'" in kernel  # really partitioned
    assert got["mu_spec"] == kernel
    if case.startswith("topkast"):
        assert got["sets_spec"] == kernel
    assert got["density_specs"] == got["changed_specs"] == ["()"]
    layers = len(got["per_layer_forward"])
    assert layers == (4 if case.endswith("logical") else 1)
    if layers > 1:  # the 'layers' name: D per slice, k per slice
        assert got["density_shapes"] == ["(4, 1, 1)"]
    assert got["per_layer_forward"] == [got["slice_size"] // 4] * layers  # k = 0.25 · 256


def test_sharded_stack_is_selected_per_layer_exactly(layout):
    """A stack sharded along its layer axis or either slice axis, explicit or auto mesh: per
    layer exactly numpy's stable argsort (ties included)."""
    got = layout["stacked_sharded"]
    assert "error" not in got, got.get("error")
    assert len(got) == 6 and all(got.values()), got
