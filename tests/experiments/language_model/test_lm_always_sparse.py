"""``--config.sparsity.always_sparse=True``: the LM trained with only B on the device.

The exactness test runs the LM's own masked train step (``train.make_train_step``: dropout, memory
reset, clip + Adam with its schedule, Top-KAST) beside the always-sparse step of
``experiments/language_model/always_sparse.py`` on a small Transformer-XL from the same initial
params, both compiled without FMA contraction (``NO_FMA``):

* clip threshold never reached (``no_clip``): identical A and B at every one of 300 steps and
  bitwise equal loss, ``grad_norm``, params and memory, as on the MLP
  (tests/topkast_jax/test_always_sparse.py);
* clip at 0.25 (``clip``): ``clip_by_global_norm`` sums the squared gradient over the dense masked
  leaves in one mode and over the ``k_B``-vectors in the other, so its norm, hence the update,
  differs in the last bit (measured: the params differ after the first step); Adam amplifies
  such 1-ulp differences on weights whose second moment is tiny, and at step 126 one flips an
  exact near-tie at the top-k boundary (measured: the first step whose A/B differ).  This case
  runs 100 steps: identical A and B at each, the loss to 1e-6, ``grad_norm``, params and memory
  to 1e-5.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import topkast_jax as tk
from configs import demo
from experiments.common import always_sparse_stats
from experiments.common.metrics import read_metrics
from experiments.language_model import always_sparse, models, train

NO_FMA = {"xla_backend_optimization_level": 0}
SMALL = {
    "batch_size": 4,
    "seq_len": 8,
    "mem_len": 8,
    "num_train_steps": 300,
    "model.num_layers": 2,
    "model.d_model": 16,
    "model.num_heads": 2,
    "model.d_ff": 32,
    "model.dropout": 0.1,
    "optim.lr": 1e-2,
    "optim.warmup_steps": 5,
    "sparsity.forward": 0.8,
    "sparsity.backward": 0.5,
    "sparsity.refresh_every": 7,
    "sparsity.exploration_l2": 1e-3,
}


def small_config(**overrides):
    config = demo.get_config()
    for key, value in {**SMALL, **overrides}.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def _masks_equal(masked, sparse):
    pairs = ((masked.forward, sparse.forward), (masked.backward, sparse.backward))
    for a_tree, b_tree in pairs:
        leaves_a = jax.tree.leaves(a_tree, is_leaf=lambda x: x is None)
        leaves_b = jax.tree.leaves(b_tree, is_leaf=lambda x: x is None)
        for a, b in zip(leaves_a, leaves_b, strict=True):
            if (a is None) != (b is None) or (a is not None and not np.array_equal(a, b)):
                return False
    return True


@pytest.mark.parametrize(
    ("grad_clip", "steps", "tol"), [(1e6, 300, 0.0), (0.25, 100, 1e-5)], ids=["no_clip", "clip"]
)
def test_always_sparse_step_equals_the_masked_lm_step(grad_clip, steps, tol):
    config = small_config(**{"optim.grad_clip": grad_clip})
    model = models.model_from_config(config.model)
    tx, schedule = train.make_optimizer(config, train.sparsify_fn(config))
    masked_step = jax.jit(train.make_train_step(model, tx, schedule), compiler_options=NO_FMA)
    state = jax.jit(lambda: train.init_state(config, model, tx))()

    sparse_config = small_config(**{"sparsity.always_sparse": True, "optim.grad_clip": grad_clip})
    sparse, _ = train.make_optimizer(sparse_config, train.sparsify_fn(sparse_config))
    assert isinstance(sparse, tk.AlwaysSparse)
    s_state, rng = sparse.init(state["params"]), state["rng"]  # the same start, bit for bit
    s_step = sparse.make_step(
        always_sparse.make_loss(model), has_aux=True, grad_norm=True, compiler_options=NO_FMA
    )
    mems = train.zero_mems(model, config.batch_size, config.mem_len)

    data = np.random.default_rng(0)
    for t in range(steps):
        assert _masks_equal(tk.get_masks(state["opt_state"]), sparse.masks(s_state)), f"step {t}"
        tokens = data.integers(0, 256, size=(config.batch_size, config.seq_len + 1))
        batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}
        reset = t % 50 == 0
        state, metrics = masked_step(state, batch, np.asarray(reset))
        rng, dropout = jax.random.split(rng)
        mems = jnp.zeros_like(mems) if reset else mems
        s_state, (loss, mems), grad_norm = s_step(s_state, dict(batch, mems=mems, dropout=dropout))
        for name, got, rtol in (("loss", loss, min(tol, 1e-6)), ("grad_norm", grad_norm, tol)):
            want = float(metrics[name])
            np.testing.assert_allclose(float(got), want, rtol=rtol, err_msg=f"{name}, step {t}")
    assert _masks_equal(tk.get_masks(state["opt_state"]), sparse.masks(s_state))
    # With clipping the two steps sum the global norm in different orders, and Adam's division
    # by sqrt(v) amplifies that rounding where a weight's gradients stay near zero: after 100
    # steps one of 256 weights of a 16 x 16 kernel (|θ| <= 0.18) differs by 1.06e-5 on a 2-core
    # VM (2026-11-23; every other weight by at most 2.7e-6), so the params get 3x the tolerance.
    for a, b in zip(
        jax.tree.leaves(sparse.dense_params(s_state)), jax.tree.leaves(state["params"]), strict=True
    ):
        np.testing.assert_allclose(a, np.asarray(b), rtol=tol, atol=3 * tol)
    np.testing.assert_allclose(np.asarray(mems), np.asarray(state["mems"]), rtol=tol, atol=tol)


def test_dry_run_lists_device_bytes_per_leaf(tmp_path):
    config = small_config(**{"sparsity.always_sparse": True})
    record = train.dry_run(config, str(tmp_path))
    rows = {r["name"]: r for r in record["layers"]}
    kernel = rows["layer_0/ff/ff_1/kernel"]
    # k_B × (4 value + 4 index + 1 flag + 8 Adam moments)
    assert kernel["device_bytes"] == kernel["backward_nonzero"] * 17
    bias = rows["layer_0/ff/ff_1/bias"]
    assert bias["device_bytes"] == bias["params"] * 12  # dense: value + Adam moments
    assert record["device_state_bytes"] >= sum(r["device_bytes"] for r in record["layers"])


def run_config(text_path, **overrides):
    """A 6-step always-sparse run on a small text file, checkpoints every 3 steps."""
    config = small_config(
        **{
            "sparsity.always_sparse": True,
            "num_train_steps": 6,
            "log_every_steps": 3,
            "checkpoint_every_steps": 3,
            "eval_every_steps": 3,
            "eval_max_windows": 1,
            "eval_batch_size": 4,
            "eval_seq_len": 8,
            "eval_mem_len": 8,
            "final_eval_max_windows": 2,
            **overrides,
        }
    )
    config.data.name = "text"
    config.data.path = str(text_path)
    return config


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_bytes(bytes(np.random.default_rng(0).integers(32, 127, size=6000, dtype=np.uint8)))
    return path


@pytest.fixture(scope="module")
def reference(text_file, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    return train.train_and_evaluate(run_config(text_file), str(workdir)), workdir


def test_training_run_end_to_end(reference):
    summary, workdir = reference
    assert summary["always_sparse"] is True and summary["steps"] == 6
    assert np.isfinite(summary["valid_bpc"]) and np.isfinite(summary["test_bpc"])
    assert summary["device_state_bytes"] > 0
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]


def test_interrupted_and_resumed_equals_uninterrupted(reference, text_file, tmp_path):
    want, _ = reference
    config = run_config(text_file)
    assert train.train_and_evaluate(config, str(tmp_path), stop_at_step=3) is None
    got = train.train_and_evaluate(config, str(tmp_path))
    with open(tmp_path / "resumes.jsonl") as f:  # it really resumed (not a fresh 6-step run)
        assert [json.loads(line)["step"] for line in f] == [3]
    for key in ("valid_loss", "test_loss", "valid_bpc", "test_bpc"):
        assert got[key] == want[key], key
    assert _window_records(tmp_path) == _window_records(reference[1])


def _window_records(workdir):
    """The Figure-3 records of a run (its snapshot is checkpointed, so a resume keeps them)."""
    return [
        {k: v for k, v in r.items() if k == "step" or k.startswith("masks/window_")}
        for r in read_metrics(str(workdir))
        if "masks/window_steps" in r
    ]


def test_metrics_summary_and_provenance_follow_the_shared_schema(reference, metric_schema):
    """Every name of the shared scheme, ``train/grad_norm`` and ``masks/reservoir_activated``
    included (none declared absent), and the masked trainer's ``masks/mask_change*``."""
    summary, workdir = reference
    metric_schema(str(workdir), summary, "tokens", ("bpc",))
    records = read_metrics(str(workdir))
    assert [r["step"] for r in records if "eval/bpc" in r] == [3]  # eval_every_steps, not at end
    logged = [r for r in records if "train/learning_rate" in r]
    assert [r["step"] for r in logged] == [3, 6]
    schedule = train.learning_rate_schedule(run_config("unused"))
    for r in logged:
        np.testing.assert_allclose(r["train/learning_rate"], float(schedule(r["step"] - 1)))
        assert r["train/exploration_penalty"] > 0 and r["train/tokens_per_second"] > 0
    masks = [r for r in records if "masks/forward_density" in r]
    np.testing.assert_allclose(masks[-1]["masks/forward_density"], 0.2, atol=0.01)
    np.testing.assert_allclose(masks[-1]["masks/backward_density"], 0.5, atol=0.01)
    for r in logged:
        assert np.isfinite(r["train/grad_norm"]) and r["train/grad_norm"] > 0
    for r in masks:
        assert 0 <= r["masks/reservoir_activated"] <= 1
        assert 0 <= r["masks/mask_change_min"] <= r["masks/mask_change"]
        assert r["masks/mask_change"] <= r["masks/mask_change_max"]


def _reference_stats(sparse, state):
    """Densities and exploration penalty from the dense host masks and θ (plain numpy)."""
    masks = sparse.masks(state)
    thetas = jax.tree.leaves(sparse.dense_params(state))
    plan = sparse.plan(sparse.abstract_params(state))
    forward = jax.tree.leaves(masks.forward, is_leaf=lambda x: x is None)
    backward = jax.tree.leaves(masks.backward, is_leaf=lambda x: x is None)
    n = n_a = n_b = 0
    penalty = 0.0
    for a, b, theta, leaf in zip(forward, backward, thetas, plan, strict=True):
        if a is None:
            continue
        n, n_a, n_b = n + a.size, n_a + a.sum(), n_b + b.sum()
        t2 = np.square(theta.astype(np.float64))
        penalty += t2[a].sum() + t2[b & ~a].sum() / leaf.forward
    return n_a / n, n_b / n, 0.5 * sparse.exploration_l2 * penalty


def test_stats_from_the_b_state_equal_dense_numpy_references():
    config = small_config(**{"sparsity.always_sparse": True})
    model = models.model_from_config(config.model)
    sparse, _ = train.make_optimizer(config, train.sparsify_fn(config))
    params, _ = train.init_params(config, model)
    state = sparse.init(params)
    step = sparse.make_step(always_sparse.make_loss(model), has_aux=True)
    mems = train.zero_mems(model, config.batch_size, config.mem_len)
    data = np.random.default_rng(1)
    for _ in range(9):  # past a refresh (every 7 steps)
        tokens = data.integers(0, 256, size=(config.batch_size, config.seq_len + 1))
        batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}
        state, (_, mems) = step(state, dict(batch, mems=mems, dropout=jax.random.PRNGKey(0)))
    got = always_sparse_stats.mask_densities(state)
    forward, backward, penalty = _reference_stats(sparse, state)
    np.testing.assert_allclose(got["forward_density"], forward, rtol=1e-12)
    np.testing.assert_allclose(got["backward_density"], backward, rtol=1e-12)
    kernel = sparse.masks(state).forward["layer_0"]["ff"]["ff_1"]["kernel"]
    assert got["forward_density/layer_0/ff/ff_1/kernel"] == kernel.mean()
    value = always_sparse_stats.penalty_fn(sparse, state)(state.device)
    np.testing.assert_allclose(float(value), penalty, rtol=1e-5)


def test_window_change_from_packed_snapshots_equals_dense_numpy():
    config = small_config(**{"sparsity.always_sparse": True, "sparsity.refresh_every": 1})
    model = models.model_from_config(config.model)
    sparse, _ = train.make_optimizer(config, train.sparsify_fn(config))
    state = sparse.init(train.init_params(config, model)[0])
    before = sparse.masks(state).forward
    snapshot = always_sparse_stats.packed_forward_masks(state)
    step = sparse.make_step(always_sparse.make_loss(model), has_aux=True)
    mems = train.zero_mems(model, config.batch_size, config.mem_len)
    tokens = np.random.default_rng(2).integers(0, 256, size=(config.batch_size, config.seq_len + 1))
    batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}
    for _ in range(3):
        state, (_, mems) = step(state, dict(batch, mems=mems, dropout=jax.random.PRNGKey(0)))
    after = sparse.masks(state).forward
    got = always_sparse_stats.window_change(snapshot, state)
    flat_before = jax.tree_util.tree_flatten_with_path(before, is_leaf=lambda x: x is None)[0]
    want = {
        "/".join(k.key for k in path): float(np.mean(old != new))
        for (path, old), new in zip(
            flat_before, jax.tree.leaves(after, is_leaf=lambda x: x is None), strict=True
        )
        if old is not None
    }
    assert got == want and any(v > 0 for v in want.values())  # the masks did move
    assert always_sparse_stats.window_change(
        snapshot, sparse.init(train.init_params(config, model)[0])
    ) == dict.fromkeys(want, 0.0)


def test_export_at_end_evaluates_to_the_final_scores(reference, text_file, tmp_path):
    """The always-sparse run writes <workdir>/export from its B-state (issue 12); evaluated with
    ``train.evaluate_export`` it gives the run's final valid and test BPC."""
    summary, workdir = reference
    export = str(workdir / "export")
    leaves = jax.tree.leaves(tk.export.load(export), is_leaf=tk.export.is_compact)
    assert any(tk.export.is_compact(x) for x in leaves)
    results = train.evaluate_export(run_config(text_file), str(tmp_path), export)
    assert results["valid_bpc"] == summary["valid_bpc"]
    assert results["test_bpc"] == summary["test_bpc"]
