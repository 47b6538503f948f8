"""A leaf sharded ``P(None, 'model')`` keeps its layout through Top-KAST (issue 8): the packed
sets are sharded like the leaf, and the selection's collectives are histogram- or chunk-sized,
never a gather of the leaf.  Equality with one device is pinned by ``test_sharding.py``."""

import json
import os
import subprocess
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(os.path.dirname(_HERE))


def test_sets_keep_the_leaf_sharding_and_no_leaf_is_gathered(tmp_path):
    out = tmp_path / "layout.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([_REPO, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, os.path.join(_HERE, "sharded_layout.py"), str(out)],
        env=env, cwd=_REPO, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    layout = json.loads(out.read_text())
    want = "P(None, 'model')"
    assert layout["init_spec"] == layout["step_spec"] == layout["params_spec"] == want, layout
    collectives = layout["collectives"]
    assert set(collectives) <= {"all-gather", "all-reduce"}, collectives
    histogram_bytes = 65536 * 4
    assert collectives.get("all-reduce"), "the histograms are summed across devices"
    assert all(size <= 2 * histogram_bytes for size in collectives["all-reduce"]), collectives
    # The only gather allowed is one chunk of keys in the rare tie path, never a whole leaf.
    assert all(size < layout["leaf_bytes"] / 2 for size in collectives.get("all-gather", [])), (
        collectives
    )
