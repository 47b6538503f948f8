"""An orbax checkpoint of an older Top-KAST state format fails with an error naming the format
(issue 8), not a raw structure error, and is neither moved aside nor deleted."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
import pytest

import topkast_jax as tk
from experiments.common.checkpoint import Checkpointer, CheckpointError
from topkast_jax import codes
from topkast_jax.state import PackedSets, legacy_format, packing_changed, without_key_history


class UnguessedTopKastState(NamedTuple):
    """The state before the warm start: packed sets, no ``key_history``."""

    count: Any
    sets: Any
    densities: Any
    exploration_l2: Any
    stats: Any
    rng: Any
    inner_state: Any


class OldTopKastState(NamedTuple):
    """topkast-jax 0.1's state: bool masks and per-weight statistics."""

    count: Any
    masks: tk.Masks
    densities: Any
    exploration_l2: Any
    stats: tk.MaskStats
    rng: Any
    inner_state: Any


def _params():
    return {"w": jnp.arange(1.0, 25.0).reshape(4, 6), "b": jnp.zeros(6)}


def _old_state(params):
    forward = {"w": jnp.abs(params["w"]) > 20, "b": None}
    backward = {"w": jnp.abs(params["w"]) > 10, "b": None}
    stats = tk.MaskStats({"w": jnp.zeros(()), "b": None}, forward, {"w": ~backward["w"], "b": None})
    return OldTopKastState(
        count=jnp.zeros((), jnp.int32),
        masks=tk.Masks(forward, backward),
        densities={"w": jnp.float32(0.2), "b": None},
        exploration_l2=jnp.float32(0.0),
        stats=stats,
        rng=jax.random.PRNGKey(0),
        inner_state=optax.sgd(0.1).init(params),
    )


def test_old_format_checkpoint_names_the_format(tmp_path):
    params = _params()
    directory = str(tmp_path / "checkpoints")
    old = Checkpointer(directory)
    old.save(7, {"params": params, "opt_state": _old_state(params)}, {"step": 7})
    old.close()
    tx = tk.topkast(optax.sgd(0.1), forward_sparsity=0.8, backward_sparsity=0.5)
    target = {"params": params, "opt_state": tx.init(params)}
    new = Checkpointer(directory)
    with pytest.raises(CheckpointError, match="format of topkast-jax 0.1") as error:
        new.restore_latest(target, log=lambda _: None)
    assert "checkpoint 7" in str(error.value) and directory in str(error.value)
    assert new.all_steps() == [7]  # kept where it was


def test_legacy_format_flags_only_an_old_topkast_state():
    old = ["opt_state/masks/forward/w", "opt_state/exploration_l2", "params/w"]
    new = ["opt_state/sets/w/bits", "opt_state/exploration_l2", "params/w"]
    baseline = ["opt_state/masks/forward/w", "opt_state/count", "params/w"]
    assert "topkast-jax 0.1" in legacy_format(old, new)
    assert legacy_format(new, new) is None
    assert legacy_format(baseline, baseline) is None
    assert legacy_format(old, old) is None


def test_sets_packed_along_another_axis_name_the_format(tmp_path):
    """A state whose sets an earlier version packed along the first axis (a byte per weight on
    a ``(1, 1, I, O)`` kernel) fails with an error that says so."""
    params = {"conv": {"kernel": jnp.arange(1.0, 49.0).reshape(1, 1, 8, 6)}}
    tx = tk.topkast(optax.sgd(0.1), forward_sparsity=0.8, backward_sparsity=0.5)
    state = tx.init(params)
    packed = state.sets["conv"]["kernel"]
    old_sets = {"conv": {"kernel": PackedSets(codes.pack(packed.codes(), 0), packed.shape, 0)}}
    old = state._replace(sets=old_sets)
    directory = str(tmp_path / "checkpoints")
    writer = Checkpointer(directory)
    writer.save(3, {"params": params, "opt_state": old}, {"step": 3})
    writer.close()
    reader = Checkpointer(directory)
    with pytest.raises(CheckpointError, match="packs along the axis that pads least"):
        reader.restore_latest({"params": params, "opt_state": state}, log=lambda _: None)
    assert reader.all_steps() == [3]


def test_packing_changed_flags_only_other_packed_shapes():
    saved = {"opt_state/sets/conv/kernel/bits": (1, 1, 8, 6), "params/conv/kernel": (1, 1, 8, 6)}
    same = dict(saved)
    now = {"opt_state/sets/conv/kernel/bits": (1, 1, 2, 6), "params/conv/kernel": (1, 1, 8, 6)}
    assert "first axis" in packing_changed(saved, now)
    assert packing_changed(same, saved) is None


def test_state_without_key_history_names_the_format(tmp_path):
    """A checkpoint of the packed-sets state written before the warm start (no
    ``key_history``) fails with an error that names the missing field, and is kept."""
    params = _params()
    tx = tk.topkast(optax.sgd(0.1), forward_sparsity=0.8, backward_sparsity=0.5)
    state = tx.init(params)
    fields = {k: v for k, v in state._asdict().items() if k != "key_history"}
    directory = str(tmp_path / "checkpoints")
    writer = Checkpointer(directory)
    writer.save(5, {"params": params, "opt_state": UnguessedTopKastState(**fields)}, {"step": 5})
    writer.close()
    reader = Checkpointer(directory)
    with pytest.raises(CheckpointError, match="without 'key_history'") as error:
        reader.restore_latest({"params": params, "opt_state": state}, log=lambda _: None)
    assert "'opt_state'" in str(error.value) and "checkpoint 5" in str(error.value)
    assert reader.all_steps() == [5]


def test_without_key_history_flags_only_a_state_that_lacks_it():
    before = ["opt_state/0/sets/w/bits", "opt_state/0/count", "params/w"]
    now = ["opt_state/0/sets/w/bits", "opt_state/0/key_history", "params/w"]
    top_level = ["sets/w/bits", "key_history"]
    assert "opt_state/0" in without_key_history(before, now)
    assert "the top level" in without_key_history(["sets/w/bits"], top_level)
    assert without_key_history(now, now) is None
    assert without_key_history(before, before) is None  # N:M or random B∖A: no history wanted
    assert without_key_history(["params/w"], now) is None  # no Top-KAST state saved
