"""Tests of experiments.common: checkpointing, metrics, guard, config, mesh (progress:
test_progress.py)."""

import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from experiments.common import config_utils, guard
from experiments.common import mesh as mesh_lib
from experiments.common.checkpoint import Checkpointer
from experiments.common.metrics import MetricsWriter, read_metrics


def _adam_state():
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    tx = optax.adam(1e-2)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, state = tx.update(grads, state, params)
    return {"params": params, "opt": state, "step": jnp.asarray(7, jnp.int32)}


def test_checkpointer_roundtrip_keeps_namedtuples_and_meta(tmp_path):
    state = _adam_state()
    ckpt = Checkpointer(str(tmp_path / "ckpt"), max_to_keep=2)
    assert ckpt.latest_step() is None
    ckpt.save(3, state, {"position": 11, "epoch": 0})
    ckpt.save(5, jax.tree.map(lambda x: x + 1, state), {"position": 13, "epoch": 1})
    ckpt.wait()
    assert ckpt.latest_step() == 5
    abstract = jax.eval_shape(lambda: state)
    restored, meta = ckpt.restore(abstract)
    assert meta == {"position": 13, "epoch": 1}
    assert type(restored["opt"][0]).__name__ == "ScaleByAdamState"
    expected = jax.tree.map(lambda x: x + 1, state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    old, meta3 = ckpt.restore(state, step=3)
    assert meta3["position"] == 11
    np.testing.assert_array_equal(old["params"]["w"], state["params"]["w"])
    ckpt.close()


def test_checkpointer_keeps_at_most_max_to_keep(tmp_path):
    ckpt = Checkpointer(str(tmp_path / "c"), max_to_keep=2)
    for s in (1, 2, 3):
        ckpt.save(s, {"x": jnp.full((2,), float(s))}, {})
    ckpt.close()
    assert sorted(int(d) for d in os.listdir(tmp_path / "c") if d.isdigit()) == [2, 3]


def test_checkpointer_restore_without_checkpoint_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Checkpointer(str(tmp_path / "empty")).restore({"x": jnp.zeros(2)})


def test_metrics_writer_writes_jsonl_and_tensorboard(tmp_path):
    writer = MetricsWriter(str(tmp_path))
    writer.write(1, {"loss": jnp.asarray(2.5), "acc": 0.5}, prefix="train/")
    writer.write(2, {"loss": float("nan")}, prefix="train/")
    writer.close()
    records = read_metrics(str(tmp_path))
    assert records[0] == {"step": 1, "train/loss": 2.5, "train/acc": 0.5}
    assert records[1]["train/loss"] == "nan"
    events = os.listdir(tmp_path / "tensorboard")
    assert any(e.startswith("events.out.tfevents") for e in events)


def test_metrics_writer_disabled_writes_nothing(tmp_path):
    writer = MetricsWriter(str(tmp_path / "w"), enabled=False)
    writer.write(1, {"loss": 1.0})
    assert not os.path.exists(tmp_path / "w")


def test_metrics_writer_rejects_non_scalars(tmp_path):
    with pytest.raises(ValueError, match="scalar"):
        MetricsWriter(str(tmp_path), tensorboard=False).write(1, {"x": np.ones(3)})


def test_check_finite_raises_on_nan_and_inf():
    guard.check_finite(1.0, step=3)
    with pytest.raises(guard.NonFiniteLossError, match="step 9.*step 8"):
        guard.check_finite(float("nan"), step=9, last_good_checkpoint=8)
    with pytest.raises(guard.NonFiniteLossError, match="no checkpoint"):
        guard.check_finite(math.inf, step=1)


def _shared_config():
    c = ml_collections.ConfigDict()
    c.batch_size = 8
    c.num_train_steps = 10
    c.checkpoint_every_steps = 5
    c.eval_every_steps = 0
    c.log_every_steps = 1
    c.seed = 0
    c.sparsity = ml_collections.ConfigDict(
        dict(method="topkast", forward=0.8, backward=0.5, refresh_every=1, exploration_l2=1e-4)
    )
    c.data = ml_collections.ConfigDict(dict(name="pystdlib", path=""))
    return c


def test_validate_shared_accepts_good_config():
    config_utils.validate_shared(_shared_config())


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("batch_size", 0, "config.batch_size"),
        ("num_train_steps", -3, "config.num_train_steps"),
        ("sparsity.forward", 1.0, "config.sparsity.forward"),
        ("sparsity.backward", 0.9, "config.sparsity.backward=0.9, config.sparsity.forward=0.8"),
        ("sparsity.exploration_l2", -1.0, "exploration_l2"),
    ],
)
def test_validate_shared_names_bad_field(field, value, message):
    c = _shared_config()
    parent, _, leaf = field.rpartition(".")
    node = c[parent] if parent else c
    node[leaf] = value
    with pytest.raises(ValueError, match=message):
        config_utils.validate_shared(c)


def test_validate_shared_names_missing_field():
    c = _shared_config()
    del c.data["path"]
    with pytest.raises(ValueError, match="config.data.path"):
        config_utils.validate_shared(c)


def test_parse_sparsity_arg():
    assert config_utils.parse_sparsity_arg("0.8,0.5", (0.0, 0.0)) == (0.8, 0.5)
    assert config_utils.parse_sparsity_arg(None, (0.1, 0.0)) == (0.1, 0.0)
    with pytest.raises(ValueError, match="fwd,bwd"):
        config_utils.parse_sparsity_arg("0.8", (0.0, 0.0))


def test_save_config_writes_json(tmp_path):
    path = config_utils.save_config(_shared_config(), str(tmp_path))
    with open(path) as f:
        assert json.load(f)["sparsity"]["forward"] == 0.8


def test_mesh_helpers_single_process():
    mesh = mesh_lib.make_data_mesh()
    n = jax.device_count()
    assert mesh.shape == {"data": n}
    assert mesh_lib.local_batch_slice(4 * n) == slice(0, 4 * n)
    local = np.arange(4 * n * 3).reshape(4 * n, 3)
    arr = mesh_lib.global_batch(local, mesh, 4 * n)
    assert arr.shape == (4 * n, 3)
    np.testing.assert_array_equal(np.asarray(arr), local)
    assert mesh_lib.is_primary()
    tree = mesh_lib.put_replicated({"w": np.ones((2, 2)), "s": np.float32(3.0)}, mesh)
    assert tree["w"].sharding.is_fully_replicated and float(tree["s"]) == 3.0
    with pytest.raises(ValueError, match="my_batch=0"):
        mesh_lib.check_batch_divisible(0, "my_batch")
    with pytest.raises(ValueError, match="batch_axis"):
        mesh_lib.batch_sharded(mesh, 2, batch_axis=2)
