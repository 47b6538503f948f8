"""End-to-end tests of the LM experiment on a tiny config and a text file the tests write.

One uninterrupted single-process run (module fixture) is the reference for: interrupted and
resumed, 8 simulated devices, and two processes on localhost with gloo collectives.
"""

import importlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import topkast_jax as tk
from configs import demo
from experiments.common import export as export_lib
from experiments.common.checkpoint import Checkpointer
from experiments.common.guard import NonFiniteLossError
from experiments.common.metrics import read_metrics
from experiments.language_model import train

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
TINY = {
    "batch_size": 8,
    "seq_len": 8,
    "mem_len": 8,
    "num_train_steps": 6,
    "log_every_steps": 1,
    "eval_every_steps": 3,
    "eval_max_windows": 2,
    "checkpoint_every_steps": 3,
    "eval_batch_size": 8,
    "eval_seq_len": 8,
    "eval_mem_len": 16,
    "model.num_layers": 1,
    "model.d_model": 16,
    "model.num_heads": 2,
    "model.d_ff": 32,
    "model.dropout": 0.1,
    "optim.lr": 1e-2,
    "optim.warmup_steps": 2,
}


def tiny_config(text_path, **overrides):
    config = demo.get_config()
    config.data.name = "text"
    config.data.path = str(text_path)
    for key, value in {**TINY, **overrides}.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def cli_flags(text_path):
    flags = [f"--config={os.path.join(REPO, 'configs', 'demo.py')}"]
    flags += ["--config.data.name=text", f"--config.data.path={text_path}"]
    flags += [f"--config.{k}={v}" for k, v in TINY.items()]
    return flags


def train_losses(workdir):
    """The last logged train loss of each step (a resumed run may log a step twice)."""
    losses = {}
    for r in read_metrics(workdir):
        if "train/loss" in r:
            losses[r["step"]] = r["train/loss"]
    return [losses[s] for s in sorted(losses)]


def read_summary(workdir):
    with open(os.path.join(workdir, "summary.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "import", "value", "if", "else", "for", "in", "(x)", ":"]
    text = " ".join(rng.choice(words, size=6000)) + "\n"
    path = tmp_path_factory.mktemp("data") / "tiny.txt"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def reference(text_file, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("reference"))
    summary = train.train_and_evaluate(tiny_config(text_file), workdir)
    return workdir, summary


def test_end_to_end_workdir_contents(reference):
    workdir, summary = reference
    for key in (
        "valid_bpc",
        "test_bpc",
        "total_params",
        "forward_density",
        "backward_density",
        "steps",
        "wall_seconds",
    ):
        assert key in summary, key
    assert summary["steps"] == 6
    assert np.isfinite(summary["test_bpc"]) and 0 < summary["test_bpc"] < 8
    assert summary == read_summary(workdir)
    # 80% forward / 50% backward sparsity on the sparse leaves, dense leaves count fully
    assert 0.2 < summary["forward_density"] < 0.3
    assert 0.5 < summary["backward_density"] < 0.6
    assert len(train_losses(workdir)) == 6
    records = read_metrics(workdir)
    assert any("eval/bpc" in r for r in records)
    assert any("final/test_bpc" in r for r in records)
    assert os.path.exists(os.path.join(workdir, "config.json"))
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    assert Checkpointer(os.path.join(workdir, "checkpoints")).latest_step() == 6


def test_metric_names_and_summary_follow_the_shared_schema(reference, metric_schema):
    workdir, summary = reference
    metric_schema(workdir, summary, "tokens", ("bpc",))
    assert summary["experiment"] == "language_model" and summary["method"] == "topkast"
    # Figure 3 from an LM run (the enwik8 config cites Fig. 3c)
    png = os.path.join(workdir, "fig3.png")
    out = subprocess.run(
        [sys.executable, "scripts/plot_mask_dynamics.py", workdir, "--out", png],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _final_params(workdir, config):
    model = train.models.model_from_config(config.model, vocab_size=256)
    tx, _ = train.make_optimizer(config, train.sparsify_fn(config))
    abstract = jax.eval_shape(lambda: train.init_state(config, model, tx))
    state, meta = Checkpointer(os.path.join(workdir, "checkpoints")).restore(abstract)
    return state, meta


def test_interrupted_and_resumed_equals_uninterrupted(reference, text_file, tmp_path):
    ref_dir, ref_summary = reference
    workdir = str(tmp_path / "resumed")
    config = tiny_config(text_file)
    assert train.train_and_evaluate(config, workdir, stop_at_step=4) is None
    # the process "dies" after step 4 before its checkpoint lands: remove it, resume from 3
    shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
    summary = train.train_and_evaluate(config, workdir)
    assert train_losses(workdir) == train_losses(ref_dir)
    for key in ("valid_bpc", "test_bpc", "forward_density", "backward_density", "steps"):
        assert summary[key] == ref_summary[key], key
    state, meta = _final_params(workdir, config)
    ref_state, ref_meta = _final_params(ref_dir, config)
    assert meta["position"] == ref_meta["position"] == 6
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(text_file, tmp_path):
    config = tiny_config(
        text_file,
        **{
            "optim.lr": 1e30,
            "optim.warmup_steps": 0,
            "checkpoint_every_steps": 1,
            "optim.warmup_init_lr": 1e30,
            "eval_every_steps": 0,
        },
    )
    workdir = str(tmp_path / "nan")
    with pytest.raises(NonFiniteLossError, match="non-finite training loss") as info:
        train.train_and_evaluate(config, workdir)
    last = Checkpointer(os.path.join(workdir, "checkpoints")).latest_step()
    assert last is not None and f"step {last}" in str(info.value)
    state, _ = _final_params(workdir, config)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))
    assert not os.path.exists(os.path.join(workdir, "summary.json"))


def test_missing_data_fails_before_training(tmp_path):
    config = tiny_config(tmp_path / "x.txt")
    config.data.name = "enwik8"
    config.data.path = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="scripts/download_data.sh enwik8"):
        train.train_and_evaluate(config, str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w" / "checkpoints")


@pytest.mark.parametrize(
    "module, arg, total, forward_nonzero",
    [
        ("configs.enwik8.transformer_xl_24l", "0.8,0.0", 277e6, 55e6),
        ("configs.enwik8.transformer_xl_small", "0.8,0.6", 69e6, 14e6),
        ("configs.wikitext103.transformer_xl_18l", "0.8,0.6", 285e6, 57e6),
    ],
)
def test_dry_run_paper_model_counts(module, arg, total, forward_nonzero, tmp_path):
    """Paper: 277M / 69M / 285M dense; 80% forward sparsity leaves 55M / 14M / 57M."""
    config = importlib.import_module(module).get_config(arg)
    record = train.dry_run(config, str(tmp_path))
    # the paper rounds to whole millions (28.5M / 1.4M aside)
    assert record["total_params"] == pytest.approx(total, abs=0.5e6)
    assert record["forward_nonzero"] == pytest.approx(forward_nonzero, abs=0.7e6)
    # the paper's counting: 20% of all parameters survive 80% forward sparsity
    assert record["forward_nonzero"] == pytest.approx(0.2 * record["total_params"], rel=0.01)
    with open(tmp_path / "dry_run.json") as f:
        saved = json.load(f)
    assert saved["total_params"] == record["total_params"]
    assert saved["backward_nonzero"] >= saved["forward_nonzero"]
    assert saved["sparse_params"] > 0.99 * saved["total_params"]


def _run(args, extra_env):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.update(extra_env)
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.language_model.main", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait(proc, timeout=400):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def test_eight_simulated_devices_match_one(reference, text_file, tmp_path):
    ref_dir, ref_summary = reference
    workdir = str(tmp_path / "eight")
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    _wait(_run([*cli_flags(text_file), f"--workdir={workdir}"], env))
    np.testing.assert_allclose(train_losses(workdir), train_losses(ref_dir), rtol=2e-5)
    summary = read_summary(workdir)
    assert summary["test_bpc"] == pytest.approx(ref_summary["test_bpc"], rel=2e-5)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_with_gloo_match_one(reference, text_file, tmp_path):
    ref_dir, ref_summary = reference
    workdir = str(tmp_path / "gloo")
    port = _free_port()
    env = {"JAX_PLATFORMS": "cpu"}
    procs = [
        _run(
            [
                *cli_flags(text_file),
                f"--workdir={workdir}",
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
                "--cpu_collectives=gloo",
            ],
            env,
        )
        for i in range(2)
    ]
    try:
        for p in procs:
            _wait(p)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    np.testing.assert_allclose(train_losses(workdir), train_losses(ref_dir), rtol=2e-5)
    summary = read_summary(workdir)
    assert summary["test_bpc"] == pytest.approx(ref_summary["test_bpc"], rel=2e-5)


def _checkpoint_steps(workdir):
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def test_sigkill_mid_run_then_resume_equals_uninterrupted(text_file, tmp_path):
    """A real crash: SIGKILL once a mid-run checkpoint is on disk, rerun the same command, and the
    resumed run logs the same losses and ends with the same BPC as an uninterrupted run."""
    steps = ["--config.num_train_steps=240", "--config.checkpoint_every_steps=20"]
    env = {"JAX_PLATFORMS": "cpu"}
    ref_dir, killed_dir = str(tmp_path / "uninterrupted"), str(tmp_path / "killed")
    _wait(_run([*cli_flags(text_file), *steps, f"--workdir={ref_dir}"], env))

    args = [*cli_flags(text_file), *steps, f"--workdir={killed_dir}"]
    proc = _run(args, env)
    try:
        deadline = time.monotonic() + 300
        while not [s for s in _checkpoint_steps(killed_dir) if s >= 40]:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint at step >= 40 within 300 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(killed_dir, "summary.json")), "killed after the end"
    last = max(_checkpoint_steps(killed_dir))
    assert 40 <= last < 240

    out = _wait(_run(args, env))
    assert f"resumed from step {last}" in out
    np.testing.assert_array_equal(train_losses(killed_dir), train_losses(ref_dir))
    summary, ref_summary = read_summary(killed_dir), read_summary(ref_dir)
    for key in ("valid_bpc", "test_bpc", "forward_density", "backward_density", "steps"):
        assert summary[key] == ref_summary[key], key


def test_split_refresh_steps_equal_the_transforms_own_decision(text_file, tmp_path, monkeypatch):
    """At ``refresh_every > 1`` the loop compiles a non-refresh step and runs the refresh program
    after the steps ``sparsity.refresh_schedule`` names; resumed at an odd step, it trains
    exactly as the single step whose ``tk.topkast`` decides inside ``lax.cond``
    (``separate_refresh`` off)."""
    from experiments.common import sparsity as sparsity_lib

    config = tiny_config(text_file, **{"sparsity.refresh_every": 2})
    assert sparsity_lib.separate_refresh(config.sparsity)
    due = sparsity_lib.refresh_schedule(config.sparsity)
    assert [due(s) for s in range(5)] == [False, True, False, True, False]
    split = str(tmp_path / "split")
    assert train.train_and_evaluate(config, split, stop_at_step=3) is None
    train.train_and_evaluate(config, split)
    with monkeypatch.context() as m:
        m.setattr(sparsity_lib, "separate_refresh", lambda sparsity: False)
        cond = str(tmp_path / "cond")
        train.train_and_evaluate(config, cond)
    assert train_losses(split) == train_losses(cond)
    state, _ = _final_params(split, config)
    ref_state, _ = _final_params(cond, config)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------- compact export
# Issue 12: the reference run writes <workdir>/export (config.export_at_end, on by default).


def _assert_bitwise(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))


def test_export_at_end_holds_theta_times_a(reference, text_file):
    """<workdir>/export is θ ⊙ A of the final checkpoint bit for bit, compact, and smaller on
    disk than that checkpoint."""
    workdir, _ = reference
    path = os.path.join(workdir, export_lib.EXPORT_DIR)
    _, abstract = export_lib.abstract_train_state(export_lib.read_config(workdir))
    state, _ = Checkpointer(os.path.join(workdir, "checkpoints")).restore(abstract)
    alpha = jax.device_get(tk.forward_params(state["params"], state["opt_state"]))
    _assert_bitwise(tk.export.densify(tk.export.load(path, like=state["params"])), alpha)
    leaves = jax.tree.leaves(tk.export.load(path), is_leaf=tk.export.is_compact)
    assert any(isinstance(x, tk.export.BitmapLeaf) for x in leaves)
    checkpoint = os.path.join(workdir, "checkpoints", "6")
    assert tk.export.disk_bytes(path) < tk.export.disk_bytes(checkpoint)


def test_eval_from_export_gives_the_final_scores(reference, text_file, tmp_path):
    """``--eval_only --from_export=PATH`` (the CLI, in a subprocess) gives the run's final
    valid and test BPC exactly; a path that holds no export is an error naming export.json."""
    workdir, summary = reference
    command = [sys.executable, "-m", "experiments.language_model.main", *cli_flags(text_file)]
    export = os.path.join(workdir, export_lib.EXPORT_DIR)
    out = subprocess.run(
        [*command, f"--workdir={tmp_path}", "--eval_only", f"--from_export={export}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    with open(tmp_path / train.EVAL_FROM_EXPORT_FILE) as f:
        results = json.load(f)
    assert results["test_bpc"] == summary["test_bpc"]
    assert results["valid_bpc"] == summary["valid_bpc"]
    assert f"bpc {summary['test_bpc']:.4f}" in out.stdout.splitlines()[-1]
    with pytest.raises(FileNotFoundError, match="export.json"):
        train.evaluate_export(tiny_config(text_file), str(tmp_path), str(tmp_path))


def test_export_script_on_a_workdir(reference, tmp_path, capsys):
    """scripts/export.py WORKDIR OUT writes the run's export again from its checkpoint and
    prints the sizes; an OUT that exists and a directory that is no workdir are errors."""
    workdir, _ = reference
    spec = importlib.util.spec_from_file_location("export_script", f"{REPO}/scripts/export.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = str(tmp_path / "out")
    assert script.main([workdir, out]) == 0
    printed = capsys.readouterr().out
    assert "checkpoint step 6" in printed and "dense theta*A through orbax" in printed
    _assert_bitwise(
        tk.export.densify(tk.export.load(out)),
        tk.export.densify(tk.export.load(os.path.join(workdir, export_lib.EXPORT_DIR))),
    )
    with pytest.raises(ValueError, match="exists"):
        script.main([workdir, out])
    with pytest.raises(FileNotFoundError, match="no config.json"):
        script.main([str(tmp_path), str(tmp_path / "out2")])
