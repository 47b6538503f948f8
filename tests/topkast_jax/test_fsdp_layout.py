"""Selection per shard (issue 14, "Sharding at scale"): leaves sharded along their first axis
(FSDP), their last, or both, on explicit and auto meshes of 8 host devices, and a Linen model
sharded as nanodo's FSDP.  The Top-KAST step compiles to no all-gather, all-to-all,
collective-permute or reduce-scatter that the dense step does not have — the selection adds only
histogram-sized all-reduces, its tie pass included — the sets are sharded like their leaf, and
they are numpy's exact selection (ties included, per layer for a stack, and global top-k)."""

import collections
import json
import os
import subprocess
import sys

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(os.path.dirname(_HERE))
# What the selection may sum across devices: the histograms of every slice (7) for both sets.
_MAX_ALL_REDUCE_BYTES = 7 * 2 * 65536 * 4
_MOVING = ("all-gather", "all-to-all", "collective-permute", "reduce-scatter")


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "layout.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([_REPO, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, os.path.join(_HERE, "fsdp_layout.py"), str(out)],
        env=env, cwd=_REPO, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rematerialization" not in proc.stderr, proc.stderr[-3000:]
    return json.loads(out.read_text())


def _assert_only_histograms_added(dense: dict, topkast: dict) -> None:
    for kind in _MOVING:
        assert topkast.get(kind, []) == dense.get(kind, []), (kind, dense, topkast)
    added = collections.Counter(topkast.get("all-reduce", []))
    added.subtract(collections.Counter(dense.get("all-reduce", [])))
    assert all(n >= 0 for n in added.values()), (dense, topkast)  # the dense ones are all there
    assert added.total() > 0, "the histograms are summed across devices"
    assert all(size <= _MAX_ALL_REDUCE_BYTES for size, n in added.items() if n), (dense, topkast)


@pytest.mark.parametrize("case", ["Explicit", "Auto", "Explicit/global"])
def test_leaves_selected_per_shard_exactly(layout, case):
    """Leaves sharded along their first axis, their last, both, and a stack of layers, in one
    program (per-leaf and global top-k)."""
    got = layout[case]
    assert "error" not in got, got.get("error")
    _assert_only_histograms_added(got["dense"], got["topkast"])
    assert got["sets_specs"] == got["leaf_specs"], got
    assert all(got["exact"].values()), got["exact"]


def test_linen_fsdp_model(layout):
    got = layout["linen_fsdp"]
    assert "error" not in got, got.get("error")
    assert "'data'" in got["kernel_spec"]
    assert got["sets_spec"] == got["kernel_spec"]
    _assert_only_histograms_added(got["dense"], got["topkast"])
