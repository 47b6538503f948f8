"""The result ``configs/demo.py`` states is the result of the recorded run in ``docs/demo_run``,
and that run used the demo config as it is now (re-record both when the config changes)."""

import json
import os
import re

import pytest

from configs import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "docs", "demo_run")


def _load(name):
    with open(os.path.join(RUN, name)) as f:
        return json.load(f)


def test_stated_bpc_and_steps_are_the_recorded_run():
    m = re.search(r"test BPC (\d\.\d{4}), valid BPC (\d\.\d{4}) after (\d+) steps", demo.__doc__)
    assert m, "configs/demo.py must state 'test BPC x.xxxx, valid BPC x.xxxx after N steps'"
    summary = _load("summary.json")
    assert float(m[1]) == round(summary["test_bpc"], 4)
    assert float(m[2]) == round(summary["valid_bpc"], 4)
    assert int(m[3]) == summary["steps"] == demo.get_config().num_train_steps


def test_stated_size_and_density_are_the_recorded_run():
    m = re.search(r"(\d+)k\s+parameters of which (\d+\.\d)% are nonzero", demo.__doc__)
    assert m
    summary = _load("summary.json")
    assert int(m[1]) == round(summary["total_params"] / 1000)
    assert float(m[2]) == pytest.approx(round(100 * summary["forward_density"], 1))


def test_recorded_run_used_the_current_demo_config():
    config = demo.get_config()
    config.model.vocab_size = 256  # set from the data (bytes) by the trainer
    current = json.loads(json.dumps(config.to_dict(), sort_keys=True, default=str))
    assert _load("config.json") == current, "the demo config changed: re-record docs/demo_run"
    provenance = _load("provenance.json")
    assert provenance["packages"]["jax"] and provenance["git"]["commit"]
