"""The shared summary schema, realised densities and provenance record."""

import json
import os

import jax
import numpy as np
import optax
import pytest

import topkast_jax as tk
from experiments.common import summary as summary_lib


def _topkast_state():
    params = {"w": jax.random.normal(jax.random.key(0), (10, 20)), "b": np.zeros(5, np.float32)}
    tx = tk.topkast(optax.sgd(0.1), forward_sparsity=0.8, backward_sparsity=0.5)
    return params, tx.init(params)


def test_realised_densities_count_masks_and_dense_leaves():
    params, opt_state = _topkast_state()
    d = summary_lib.realised_densities(params, opt_state)
    masks = tk.get_masks(opt_state)
    fwd = int(np.sum(masks.forward["w"])) + 5  # the 1-d bias is dense
    bwd = int(np.sum(masks.backward["w"])) + 5
    assert (fwd, bwd) == (40 + 5, 100 + 5)
    assert d == {
        "total_params": 205,
        "forward_nonzero": fwd,
        "backward_nonzero": bwd,
        "forward_density": fwd / 205,
        "backward_density": bwd / 205,
    }


def _summary(**overrides):
    params, opt_state = _topkast_state()
    kwargs = dict(
        experiment="language_model",
        data="pystdlib",
        method="topkast",
        forward_sparsity=0.8,
        backward_sparsity=0.5,
        densities=summary_lib.realised_densities(params, opt_state),
        train_flops_vs_dense=0.3,
        steps=10,
        wall_seconds=1.5,
        final={"test_bpc": np.float32(2.5), "valid_bpc": 2.4},
        extra={"final_eval_max_windows": 0},
    )
    kwargs.update(overrides)
    return summary_lib.build_summary(**kwargs)


def test_summary_has_every_schema_key_and_flat_final_metrics(tmp_path):
    s = _summary()
    assert set(summary_lib.SUMMARY_KEYS) <= set(s)
    assert s["final_metrics"] == ["test_bpc", "valid_bpc"]
    assert s["test_bpc"] == 2.5 and type(s["test_bpc"]) is float
    assert s["final_eval_max_windows"] == 0
    path = summary_lib.write_summary(str(tmp_path), s)
    assert path == os.path.join(tmp_path, "summary.json")
    assert summary_lib.read_summary(str(tmp_path)) == json.loads(json.dumps(s))
    assert summary_lib.read_summary(str(tmp_path / "absent")) is None


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"final": {}}, "final must hold"),
        ({"densities": {"total_params": 1}}, "densities is missing"),
        ({"extra": {"steps": 3}}, r"extra would overwrite summary keys \['steps'\]"),
        ({"final": {"method": 1.0}}, r"final would overwrite summary keys \['method'\]"),
    ],
)
def test_summary_rejects_incomplete_or_clashing_fields(overrides, match):
    with pytest.raises(ValueError, match=match):
        _summary(**overrides)


def test_provenance_records_versions_commit_and_devices(tmp_path):
    record = summary_lib.write_provenance(str(tmp_path))
    on_disk = json.loads((tmp_path / "provenance.json").read_text())
    assert on_disk == record
    assert record["packages"]["jax"] == jax.__version__
    assert record["packages"]["optax"] == optax.__version__
    assert record["topkast_jax"] == tk.__version__
    assert record["device_count"] == jax.device_count()
    assert record["device_kind"] == jax.devices()[0].device_kind
    assert record["process_count"] == jax.process_count()
    sha = record["git"]["commit"]
    assert sha is None or (len(sha) == 40 and int(sha, 16) >= 0)
    # a second run (a resume) keeps the previous record beside the new one
    summary_lib.write_provenance(str(tmp_path))
    kept = [n for n in os.listdir(tmp_path) if n.startswith("provenance.") and n[11:] != "json"]
    assert len(kept) == 1


def test_git_state_outside_a_repository_is_none(tmp_path):
    assert summary_lib.git_state(str(tmp_path)) == {"commit": None, "dirty": None}


def test_package_versions_of_a_missing_package_is_none():
    assert summary_lib.package_versions(("no-such-package-xyz",)) == {"no-such-package-xyz": None}


def test_exploration_penalty_is_topkasts_and_zero_for_a_baseline():
    params, _ = _topkast_state()
    tx = tk.topkast(optax.sgd(0.1), forward_sparsity=0.8, backward_sparsity=0.5, exploration_l2=0.1)
    opt_state = tx.init(params)
    value = float(summary_lib.exploration_penalty(params, opt_state))
    assert value > 0 and value == float(tk.exploration_penalty(params, opt_state))
    static = tk.baselines.static_sparse(optax.sgd(0.1), sparsity=0.8)
    assert float(summary_lib.exploration_penalty(params, static.init(params))) == 0.0
