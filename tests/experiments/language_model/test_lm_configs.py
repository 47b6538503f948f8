"""Tests of the LM configs, their validation and the results-table collector."""

import importlib
import json

import pytest

from configs import demo
from experiments.language_model import collect_table, train

PAPER_CONFIGS = (
    "configs.enwik8.transformer_xl_24l",
    "configs.enwik8.transformer_xl_small",
    "configs.wikitext103.transformer_xl_18l",
)


@pytest.mark.parametrize("module", PAPER_CONFIGS)
def test_paper_configs_follow_appendix_a(module):
    config = importlib.import_module(module).get_config("0.9,0.8")
    train.validate_config(config)
    assert (config.sparsity.method, config.sparsity.forward, config.sparsity.backward) == (
        "topkast",
        0.9,
        0.8,
    )
    assert config.optim.lr == 2e-4 and config.optim.warmup_init_lr == 1e-7
    assert config.optim.warmup_steps == 4000 and config.optim.grad_clip == 0.25
    dense = importlib.import_module(module).get_config("0,0")
    assert dense.sparsity.method == "dense"


def test_demo_config_is_valid_topkast_80_50():
    config = demo.get_config()
    train.validate_config(config)
    assert config.data.name == "pystdlib"
    assert (config.sparsity.forward, config.sparsity.backward) == (0.8, 0.5)


def test_validate_config_names_bad_lm_fields():
    config = demo.get_config()
    config.model.num_heads = 3
    with pytest.raises(ValueError, match="config.model.num_heads=3"):
        train.validate_config(config)
    config = demo.get_config()
    config.seq_len = 0
    with pytest.raises(ValueError, match="config.seq_len"):
        train.validate_config(config)


def test_learning_rate_schedule_warmup_then_cosine():
    config = importlib.import_module(PAPER_CONFIGS[0]).get_config()
    schedule = train.learning_rate_schedule(config)
    assert float(schedule(0)) == pytest.approx(1e-7)
    assert float(schedule(4000)) == pytest.approx(2e-4)
    assert float(schedule(2000)) == pytest.approx((1e-7 + 2e-4) / 2, rel=1e-3)
    assert float(schedule(config.num_train_steps)) == pytest.approx(0.0, abs=1e-12)


def test_collect_table_rows(tmp_path, capsys):
    done = tmp_path / "fwd0.8_bwd0.5"
    done.mkdir()
    summary = {
        "forward_sparsity": 0.8,
        "backward_sparsity": 0.5,
        "forward_nonzero": 55.4e6,
        "test_bpc": 1.0123,
    }
    (done / "summary.json").write_text(json.dumps(summary))
    collect_table.main(["x", "bpc", str(done), str(tmp_path / "unfinished")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == "| fwd0.8_bwd0.5 | 80% | 50% | 55.4M | 1.012 |"
    assert lines[3] == "| unfinished | - | - | - | - |"
