"""ImageNet trainer: dry run, schedule, L2 mask, and a tiny ResNet end to end on synthetic data."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import topkast_jax as tk
from configs.imagenet import grid, resnet50, tiny
from experiments.common.metrics import read_metrics
from experiments.imagenet import optimizer as opt_lib
from experiments.imagenet import report, train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


# ---- dry run --------------------------------------------------------------------------------


def test_dry_run_cli_reports_resnet50(tmp_path):
    workdir = tmp_path / "dry"
    out = subprocess.run(
        [sys.executable, "-m", "experiments.imagenet.main",
         "--config", "configs/imagenet/resnet50.py:0.8,0.5", "--workdir", str(workdir),
         "--dry_run"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "total params 25,557,032" in out.stdout
    assert not (workdir / "checkpoints").exists()  # nothing trained, no weights
    record = json.loads((workdir / "dry_run.json").read_text())
    assert record["total_params"] == 25_557_032
    layers = {row["name"]: row for row in record["layers"]}
    assert len(layers) == 161
    for name, row in layers.items():
        dense = name.startswith(("conv_init/", "head/")) or len(row["shape"]) == 1
        expected = (1.0, 1.0) if dense else (0.2, 0.5)
        got = (row["forward_density"], row["backward_density"])
        assert got == pytest.approx(expected), name
        assert row["sparse"] == (not dense)
    # FLOPs from the per-layer table, by hand: Σ c(2D + B) / Σ 3c.
    assert record["steps_multiplier"] == 1.0
    assert 0.3 < record["train_flops_vs_dense"] < 0.33
    assert record["forward_gmacs_per_example"] == pytest.approx(4.089, abs=1e-3)


def _hand_flops(record, macs):
    rows = {r["name"]: r for r in record["layers"]}
    num = sum(c * (2 * rows[n]["forward_density"] + rows[n]["backward_density"])
              for n, c in macs.items())  # fmt: skip
    return num / sum(3 * c for c in macs.values())


def test_dry_run_first_last_sparse_and_longer_training(tmp_path):
    from experiments.imagenet import costs

    config = resnet50.get_config("0.9,0.8")
    config.sparsity.sparse_first_last = True
    config.num_train_steps = 2 * resnet50.REFERENCE_STEPS
    record = train.dry_run(config, str(tmp_path))
    layers = {r["name"]: r for r in record["layers"]}
    for name in ("conv_init/kernel", "head/kernel"):
        assert layers[name]["sparse"]
        assert layers[name]["forward_density"] == pytest.approx(0.1)
        assert layers[name]["backward_density"] == pytest.approx(0.2)
    assert not layers["head/bias"]["sparse"]
    model = train.create_model(config)
    macs = costs.layer_macs(model, train.abstract_variables(model, 224), (1, 224, 224, 3))
    assert record["steps_multiplier"] == 2.0
    # Every matmul layer is at (0.1, 0.2): per step (2·0.1 + 0.2)/3, and twice the steps.
    assert record["step_flops_vs_dense"] == pytest.approx(0.4 / 3)
    assert record["train_flops_vs_dense"] == pytest.approx(2 * _hand_flops(record, macs))


# ---- optimizer pieces -----------------------------------------------------------------------


def test_learning_rate_schedule_appendix_b():
    config = resnet50.get_config("0.8,0.5")
    schedule = opt_lib.learning_rate_schedule(config)
    spe = resnet50.NUM_TRAIN_EXAMPLES / 4096
    assert float(schedule(0)) == 0.0
    warmup = round(5 * spe)
    assert float(schedule(warmup // 2)) == pytest.approx(0.8, rel=1e-3)
    assert float(schedule(warmup)) == pytest.approx(1.6)
    assert float(schedule(round(30 * spe) - 1)) == pytest.approx(1.6)
    assert float(schedule(round(30 * spe) + 1)) == pytest.approx(0.16)
    assert float(schedule(round(70 * spe) + 1)) == pytest.approx(0.016)
    assert float(schedule(round(90 * spe) + 1)) == pytest.approx(0.0016)
    assert float(schedule(31_999)) == pytest.approx(0.0016)
    # Linear scaling with the batch, and a stretched schedule for a 2× run.
    config.batch_size = 1024
    assert float(opt_lib.learning_rate_schedule(config)(10**6)) == pytest.approx(0.4e-3)
    config = resnet50.get_config("0.8,0.5")
    config.num_train_steps = 64_000
    stretched = opt_lib.learning_rate_schedule(config)
    assert float(stretched(round(30 * spe) + 1)) == pytest.approx(1.6)
    assert float(stretched(round(60 * spe) + 1)) == pytest.approx(0.16)


def test_l2_only_on_dense_kernels():
    config = tiny.get_config("0.8,0.5")
    params = train.abstract_variables(train.create_model(config), 16)["params"]
    flags = train.sparsify_fn(config)(params)
    mask = opt_lib.l2_mask(params, flags, "topkast")
    assert mask["conv_init"]["kernel"] and mask["head"]["kernel"]
    assert not mask["head"]["bias"] and not mask["bn_init"]["scale"]
    assert not mask["stage1_block1"]["conv1"]["kernel"]  # sparse: exploration penalty instead
    dense = opt_lib.l2_mask(params, flags, "dense")
    assert dense["stage1_block1"]["conv1"]["kernel"] and not dense["bn_init"]["bias"]


# ---- configs --------------------------------------------------------------------------------


def test_grid_configs_are_valid_and_carry_their_options():
    for table, runs in grid.RUNS.items():
        for name, run in runs.items():
            config = grid.get_config(f"{table}/{name}")
            train.validate_config(config)
            assert (config.sparsity.forward, config.sparsity.backward) == (
                run.forward,
                run.backward,
            )
    assert grid.get_config("table1/random_90_80").sparsity.backward_selection == "random"
    assert grid.get_config("table1/stop_t5000_90_0").sparsity.stop_exploration_step == 5000
    assert grid.get_config("table6/n100_95_90").sparsity.refresh_every == 100
    assert grid.get_config("figure2/f80_b20_5x").num_train_steps == 160_000
    with pytest.raises(ValueError, match="TABLE/RUN"):
        grid.get_config("table1/nope")


def test_bad_config_argument():
    with pytest.raises(ValueError, match="fwd,bwd"):
        resnet50.get_config("0.8")
    config = tiny.get_config("0.5,0.8")
    with pytest.raises(ValueError, match="backward"):
        train.validate_config(config)


def test_report_table(tmp_path):
    run_dir = tmp_path / "table6" / "n1_80_50"
    run_dir.mkdir(parents=True)
    summary = dict.fromkeys(train.SUMMARY_KEYS, 0.0)
    summary.update(valid_top1=74.9, valid_top5=92.1, train_flops_vs_dense=0.32, steps=32000,
                   wall_seconds=7200)  # fmt: skip
    (run_dir / "summary.json").write_text(json.dumps(summary))
    text = report.markdown_table("table6", str(tmp_path))
    assert (
        "| n1_80_50 | 0.8 | 0.5 | refresh_every=1 | 75.03 | 74.90 | 92.10 | 0.320 | 32000 | 2.00 |"
        in text
    )
    assert "| n100_80_50 | 0.8 | 0.5 | refresh_every=100 | 75.14 | not run |" in text


# ---- end to end -----------------------------------------------------------------------------


TINY_FLAGS = {
    "image_size": 16,
    "batch_size": 8,
    "eval_batch_size": 8,
    "num_eval_examples": 16,
    "num_train_examples": 32,
    "checkpoint_every_steps": 3,
    "eval_every_steps": 0,
    "log_every_steps": 1,
    "mask_stats_every_steps": 2,
    "mask_window_steps": 2,
    "reference_steps": 6,
}


def _cli(workdir, steps, cache_dir, **overrides):
    """``(command, environment)`` of ``experiments.imagenet.main`` on ``configs/imagenet/tiny.py``
    shrunk further.

    The runs of a test share a persistent compilation cache (a temporary directory), so the
    unchanged step functions are compiled once.
    """
    flags = dict(TINY_FLAGS, num_train_steps=steps, **overrides)
    cmd = [sys.executable, "-m", "experiments.imagenet.main",
           "--config", "configs/imagenet/tiny.py:0.8,0.5", "--workdir", workdir]  # fmt: skip
    cmd += [f"--config.{k}={v}" for k, v in flags.items()]
    env = dict(
        os.environ,
        JAX_COMPILATION_CACHE_DIR=cache_dir,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    return cmd, env


def _run_cli(workdir, steps, cache_dir, **overrides):
    cmd, env = _cli(workdir, steps, cache_dir, **overrides)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_sigterm_checkpoints_the_current_step_and_the_rerun_finishes(tmp_path):
    workdir, cache = str(tmp_path / "run"), str(tmp_path / "jax_cache")
    cmd, env = _cli(workdir, 100_000, cache, checkpoint_every_steps=100_000)
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 300
        while len([r for r in read_metrics(workdir) if "train/loss" in r]) < 3:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, out[-3000:]
    (step,) = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))]
    assert f"stopped by SIGTERM at step {step}; checkpoint {step} is in" in out
    rerun = _run_cli(workdir, step + 2, cache, checkpoint_every_steps=100_000)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from step {step}" in rerun.stdout
    steps = [r["step"] for r in read_metrics(workdir) if "train/loss" in r]
    assert steps == list(range(1, step + 3))


def test_tiny_resnet_trains_resumes_and_stops_on_nan(tmp_path, metric_schema):
    workdir, cache = str(tmp_path / "run"), str(tmp_path / "jax_cache")
    # 1) Six steps from scratch.
    out = _run_cli(workdir, 6, cache)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(open(os.path.join(workdir, "summary.json")).read())
    assert set(train.SUMMARY_KEYS) <= set(summary)
    assert summary["steps"] == 6 and summary["total_params"] == 8402
    assert summary["valid_examples"] == 16 and 0 <= summary["valid_top1"] <= 100
    assert summary["valid_top1"] <= summary["valid_top5"]
    assert summary["sparse_forward_density"] == pytest.approx(0.2, abs=0.01)
    assert summary["sparse_backward_density"] == pytest.approx(0.5, abs=0.01)
    assert summary["forward_density"] < summary["backward_density"] < 1.0
    assert 0.3 < summary["train_flops_vs_dense"] < 0.5
    records = read_metrics(workdir)
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses) == 6 and all(np.isfinite(losses))
    window = [r for r in records if "masks/window_change_mean" in r]
    assert [r["step"] for r in window] == [2, 4, 6]
    assert any(k.startswith("masks/window_change/stage") for k in window[0])
    assert any("masks/reservoir_activated" in r for r in records)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
    metric_schema(workdir, summary, "examples", None)  # the LM's names and summary schema
    assert all(0 <= r["train/top1"] <= 100 for r in records if "train/top1" in r)  # in %

    # 2) Another learning rate is another experiment: the workdir refuses it, naming the field.
    out = _run_cli(workdir, 9, cache, **{"optimizer.base_learning_rate": 1e30})
    assert out.returncode != 0
    assert "config.optimizer.base_learning_rate: 25.6 -> 1e+30" in out.stderr
    #    Branched into a new workdir (its checkpoints copied), the absurd learning rate makes the
    #    state non-finite: training stops and the newest checkpoint is still the good one, step 6.
    branch = str(tmp_path / "branch")
    shutil.copytree(os.path.join(workdir, "checkpoints"), os.path.join(branch, "checkpoints"))
    out = _run_cli(branch, 9, cache, **{"optimizer.base_learning_rate": 1e30})
    assert out.returncode != 0
    assert "NonFiniteLossError" in out.stderr and "last good checkpoint (step 6)" in out.stderr
    assert "repeats the divergence" in out.stderr
    assert sorted(os.listdir(os.path.join(branch, "checkpoints"))) == ["3", "6"]

    # 3) Rerunning the normal command resumes from step 6 and finishes at step 8.
    out = _run_cli(workdir, 8, cache, reference_steps=8)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from step 6" in out.stdout
    summary = json.loads(open(os.path.join(workdir, "summary.json")).read())
    assert summary["steps"] == 8 and summary["wall_seconds"] > 0
    steps = [r["step"] for r in read_metrics(workdir) if "train/loss" in r]
    assert steps[-2:] == [7, 8]

    # 4) Figure 3 from the logged run.
    out = subprocess.run(
        [sys.executable, "scripts/plot_mask_dynamics.py", workdir],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    png = os.path.join(workdir, "mask_dynamics.png")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_script_explains_missing_metrics(tmp_path):
    out = subprocess.run(
        [sys.executable, "scripts/plot_mask_dynamics.py", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 1 and "metrics.jsonl not found" in out.stderr
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/loss": 1.0}) + "\n")
    out = subprocess.run(
        [sys.executable, "scripts/plot_mask_dynamics.py", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 1 and "masks/reservoir_activated" in out.stderr


def test_sparsity_options_reach_topkast():
    """stop_exploration_step=0: B = A after the first update; defaults go through the shared
    make_sparse_optimizer; options with a non-topkast method are rejected."""
    import optax

    from experiments.common.sparsity import make_sparse_optimizer, topkast_options

    config = tiny.get_config("0.8,0.5")
    params = {"w": jax.random.normal(jax.random.key(0), (16, 16)), "b": jax.numpy.zeros(16)}
    sparsify = tk.sparsify.kernels()
    assert topkast_options(config.sparsity) == {}
    config.sparsity.stop_exploration_step = 0
    config.sparsity.backward_selection = "random"
    assert topkast_options(config.sparsity) == {"stop_exploration_step": 0,
                                                "backward_selection": "random"}  # fmt: skip
    tx = make_sparse_optimizer(optax.sgd(0.1), config.sparsity, sparsify)
    state = jax.jit(tx.init)(params)
    grads = jax.tree.map(lambda p: p * 0 + 1.0, params)
    _, state = jax.jit(tx.update)(grads, state, params)
    masks = tk.get_masks(state)
    np.testing.assert_array_equal(masks.backward["w"], masks.forward["w"])
    config.sparsity.method = "dense"
    with pytest.raises(ValueError, match="only apply to method 'topkast'"):
        make_sparse_optimizer(optax.sgd(0.1), config.sparsity, sparsify)


def test_split_refresh_steps_equal_the_transforms_own_decision():
    """At ``refresh_every > 1`` the trainer's ``updates.Updates`` runs a non-refresh step and,
    after the steps ``sparsity.refresh_schedule`` names (of the updates done so far), the
    refresh program (``updates.make_refresh_step``): the same run, bit for bit, as the one step
    in which ``tk.topkast`` decides inside ``lax.cond``, and the same logged metrics."""
    from experiments.common import sparsity as sparsity_lib
    from experiments.common import updates as updates_lib
    from experiments.common.progress import ProgressLogger

    config = tiny.get_config("0.8,0.5")
    config.image_size, config.sparsity.refresh_every = 16, 2
    model = train.create_model(config)
    variables = train.abstract_variables(model, config.image_size)
    tx, schedule = opt_lib.make_optimizer(config, variables["params"], train.sparsify_fn(config))
    due = sparsity_lib.refresh_schedule(config.sparsity)
    steps = {
        d: jax.jit(train.make_train_step(model, tx, schedule, config, refresh_masks=d))
        for d in (None, False)
    }
    update = updates_lib.Updates(
        steps[False], jax.jit(updates_lib.make_refresh_step(tx)), due, ProgressLogger(5)
    )
    assert sparsity_lib.separate_refresh(config.sparsity)
    cond = split = jax.jit(lambda: train.init_state(model, tx, config))()
    rng = np.random.default_rng(0)
    for t in range(5):
        batch = {
            "image": rng.integers(0, 256, (8, 16, 16, 3)).astype(np.uint8),
            "label": rng.integers(0, config.num_classes, 8).astype(np.int32),
        }
        cond, cond_metrics = steps[None](cond, batch)
        split, split_metrics = update(t, split, batch)
        for key, value in cond_metrics.items():
            np.testing.assert_array_equal(value, split_metrics[key], err_msg=key)
    for a, b in zip(jax.tree.leaves(cond), jax.tree.leaves(split), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    first, last = tk.get_masks(cond["opt_state"]).forward, cond["mask_snapshot"]
    assert any((np.asarray(a) != np.asarray(b)).any() for a, b in
               zip(jax.tree.leaves(first), jax.tree.leaves(last), strict=True))  # fmt: skip
