"""Every config rule of every experiment rejects a bad value with a ValueError naming the field and
the allowed range, through the CLI's validation only (nothing is built, nothing trains)."""

import math
import os
import subprocess
import sys
import zipfile

import pytest

from configs import demo
from configs.imagenet import tiny
from experiments.common import config_rules
from experiments.imagenet import train as imagenet_train
from experiments.language_model import train as lm_train

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))

#: One bad value per field, written here (not derived from the rules) so that a rule that stops
#: checking makes its case fail.
BAD_SHARED = {
    "batch_size": 0,
    "num_train_steps": -1,
    "checkpoint_every_steps": 0,
    "eval_every_steps": -1,
    "log_every_steps": 0,
    "seed": -5,
    "sparsity.method": "magic",
    "sparsity.forward": 1.0,
    "sparsity.backward": -0.1,
    "sparsity.refresh_every": 0,
    "sparsity.exploration_l2": math.nan,
    "sparsity.distribution": "gaussian",
    "sparsity.backward_selection": "largest",
    "sparsity.stop_exploration_step": -2,
    "sparsity.global_topk": "yes",
    "sparsity.track_reservoir": 1,
    "sparsity.structure": "2/4",
    "data.path": 3,
}
BAD_LM = {
    **BAD_SHARED,
    "data.name": "enwik9",
    "seq_len": 0,
    "mem_len": -1,
    "eval_batch_size": 0,
    "eval_seq_len": 0,
    "eval_mem_len": -1,
    "eval_max_windows": -1,
    "final_eval_max_windows": -1,
    "max_checkpoints_to_keep": 0,
    "mask_window_steps": 0,
    "model.vocab_size": 0,
    "model.num_layers": 0,
    "model.d_model": 0,
    "model.num_heads": 0,
    "model.d_head": 0,
    "model.d_ff": 0,
    "model.dropout": 1.5,
    "model.dropatt": -0.5,
    "model.div_val": 0,
    "model.clamp_len": -2,
    "model.d_embed": 0,
    "model.untie_r": "no",
    "model.same_length": 1,
    "eval_same_length": "yes",
    "export_at_end": "yes",
    "eval_clamp_len": -2,
    "optim.lr": -1.0,
    "optim.warmup_init_lr": math.inf,
    "optim.warmup_steps": -1,
    "optim.end_lr": -1e-3,
    "optim.grad_clip": 0.0,
    "optim.b1": 1.0,
    "optim.b2": -0.1,
    "optim.eps": 0.0,
    "optim.name": "lamb",
    "optim.momentum": 1.0,
}
BAD_IMAGENET = {
    **BAD_SHARED,
    "data.name": "",
    "data.train_split": "",
    "data.eval_split": None,
    "data.num_threads": 0,
    "data.num_workers": -1,
    "model": "",
    "num_classes": 0,
    "image_size": 0,
    "eval_resize_size": 0,
    "half_precision": 1,
    "export_at_end": "yes",
    "eval_batch_size": 0,
    "num_train_examples": 0,
    "num_eval_examples": -1,
    "reference_steps": 0,
    "mask_stats_every_steps": 0,
    "mask_window_steps": 0,
    "label_smoothing": 1.0,
    "optimizer.base_learning_rate": 0.0,
    "optimizer.momentum": -0.9,
    "optimizer.nesterov": "no",
    "optimizer.warmup_epochs": -1.0,
    "optimizer.decay_factor": 0.0,
    "optimizer.weight_decay": math.inf,
}


def _set(config, dotted, value):
    *parents, leaf = dotted.split(".")
    node = config
    for p in parents:
        node = node[p]
    with node.ignore_type():
        node[leaf] = value


def _lm_config():
    config = demo.get_config()
    config.data.name = "text"
    return config


EXPERIMENTS = {
    "lm": (lm_train, _lm_config, BAD_LM),
    "imagenet": (imagenet_train, lambda: tiny.get_config("0.8,0.5"), BAD_IMAGENET),
}
CASES = [(name, field) for name, (_, _, bad) in EXPERIMENTS.items() for field in bad]


@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
def test_every_rule_has_a_bad_value_here_and_defaults_pass(experiment):
    train, make_config, bad = EXPERIMENTS[experiment]
    assert sorted(config_rules.rule_fields(train.RULES)) == sorted(bad)
    train.validate_config(make_config())


@pytest.mark.parametrize("experiment, field", CASES)
def test_bad_value_fails_naming_field_and_range(experiment, field):
    train, make_config, bad = EXPERIMENTS[experiment]
    config = make_config()
    _set(config, field, bad[field])
    with pytest.raises(ValueError, match=rf"config\.{field}=.* is not allowed: it must") as info:
        train.validate_config(config)
    rule = next(r for r in train.RULES if getattr(r, "field", None) == field)
    assert rule.allowed in str(info.value)


@pytest.mark.parametrize("experiment, field", [("lm", "seq_len"), ("imagenet", "batch_size")])
def test_missing_required_field_is_named(experiment, field):
    train, make_config, _ = EXPERIMENTS[experiment]
    config = make_config()
    del config[field]
    with pytest.raises(ValueError, match=f"config.{field}"):
        train.validate_config(config)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"sparsity.forward": 0.5, "sparsity.backward": 0.8}, "backward <= config.sparsity"),
        ({"model.num_heads": 3}, "divisible by config.model.num_heads"),
        ({"model.d_model": 127, "model.d_head": 16}, "d_model even"),
        ({"eval_same_length": True, "eval_mem_len": 0}, "eval_mem_len > 0 with config.eval_same"),
        ({"model.same_length": True, "mem_len": 0}, "mem_len > 0 with config.model.same_length"),
    ],
)
def test_lm_relations(fields, message):
    config = _lm_config()
    for field, value in fields.items():
        _set(config, field, value)
    with pytest.raises(ValueError, match=message):
        lm_train.validate_config(config)


def test_imagenet_relation_resize_at_least_image_size():
    config = tiny.get_config("0.8,0.5")
    config.eval_resize_size = config.image_size - 1
    with pytest.raises(ValueError, match="eval_resize_size >= config.image_size"):
        imagenet_train.validate_config(config)


@pytest.mark.parametrize("value", [0, None])
def test_allowed_boundary_values_pass(value):
    config = _lm_config()
    config.eval_max_windows = 0
    config.model.d_head = value if value is None else 32
    config.model.dropout = 0.0
    lm_train.validate_config(config)


def test_rules_reject_strings_and_bools_for_numbers():
    for value in ("0.8", True):
        with pytest.raises(ValueError, match="a finite number"):
            config_rules.check_rules({"x": value}, (config_rules.real_in("x", 0.0, 1.0),))
    with pytest.raises(ValueError, match="an integer >= 1"):
        config_rules.check_rules({"n": True}, (config_rules.int_at_least("n", 1),))


def test_cli_rejects_bad_flag_before_building_anything(tmp_path):
    """The real command line with ``--config.eval_max_windows=-1`` (which used to hang)."""
    workdir = tmp_path / "w"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.language_model.main",
            f"--config={os.path.join(REPO, 'configs', 'demo.py')}",
            "--config.eval_max_windows=-1",
            f"--workdir={workdir}",
        ],
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "config.eval_max_windows=-1 is not allowed" in proc.stderr
    assert not workdir.exists()


# ---- data that cannot serve the config: fails after reading it, before any model is built ----


def _tiny_text(tmp_path, size):
    path = tmp_path / "tiny.txt"
    path.write_bytes(bytes(range(256)) * (size // 256) + b"x" * (size % 256))
    return str(path)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"seq_len": 100_000}, r"config.seq_len=100000 is too long for the training split"),
        ({"eval_batch_size": 512}, r"the valid split has 1,000 tokens, too short"),
    ],
)
def test_lm_split_too_short_fails_before_training(tmp_path, overrides, message):
    config = _lm_config()
    config.data.path = _tiny_text(tmp_path, 20_000)  # splits 18,000 / 1,000 / 1,000
    config.num_train_steps = 2  # should the check be lost, the test ends quickly
    for field, value in overrides.items():
        _set(config, field, value)
    workdir = tmp_path / "w"
    with pytest.raises(ValueError, match=message):
        lm_train.train_and_evaluate(config, str(workdir))
    assert not workdir.exists()


def test_corrupt_enwik8_zip_names_file_and_refetch_command(tmp_path):
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w") as z:
        z.writestr("enwik8", b"abc" * 1000)
    data = tmp_path / "data"
    data.mkdir()
    (data / "enwik8.zip").write_bytes(good.read_bytes()[:-40])  # truncated: no central directory
    config = _lm_config()
    config.data.name, config.data.path = "enwik8", str(data)
    with pytest.raises(ValueError, match="enwik8.zip is not a readable enwik8 zip") as info:
        lm_train.train_and_evaluate(config, str(tmp_path / "w"))
    assert "bash scripts/download_data.sh enwik8" in str(info.value)
    assert not (tmp_path / "w").exists()


def test_imagenet_without_prepared_data_fails_before_the_model_and_leaves_no_workdir(tmp_path):
    config = tiny.get_config("0.8,0.5")
    config.data.name = "imagenet2012"
    config.data.path = str(tmp_path)
    workdir = tmp_path / "w"
    with pytest.raises(FileNotFoundError, match="tfds build imagenet2012"):
        imagenet_train.train_and_evaluate(config, str(workdir))
    assert not workdir.exists()


DEVICE_COUNT_CHECK = """
from configs.imagenet import tiny
from experiments.imagenet import train
config = tiny.get_config("0.8,0.5")
config.eval_batch_size = 12
try:
    train.validate_config(config)
except ValueError as e:
    print(e)
"""


def test_imagenet_eval_batch_not_divisible_by_devices_fails_in_validation():
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
    }
    out = subprocess.run(
        [sys.executable, "-c", DEVICE_COUNT_CHECK],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert (
        "config.eval_batch_size=12 must be a positive multiple of the device count 8" in out.stdout
    )
