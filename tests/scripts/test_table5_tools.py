"""scripts/table5_sweep.py's plans and scripts/table5_report.py's arithmetic (issue 15), on
result lines the test writes; nothing is trained."""

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sweep = _script("table5_sweep")
report = _script("table5_report")


def _result(method, f, b, seed, bpc, l2=1e-5, rc=0, text=""):
    run = sweep.Run(method, f, b, seed, l2=l2, text=text, steps=1000)
    return {"name": run.name, **run._asdict(), "rc": rc, "test_bpc": bpc, "trace": []}


def test_plan_entries_choose_lambda_text_and_drop_repeats(monkeypatch):
    monkeypatch.setenv("PLAN", "table5:0,text5:1e-5,table5:0")
    monkeypatch.setenv("SEEDS", "0,1")
    monkeypatch.setenv("TEXT", "/data/prose.txt")
    runs = sweep.planned_runs()
    per_seed = 1 + len(sweep.PRUNE) + len(sweep.PAIRS)
    assert len(runs) == 2 * 2 * per_seed  # the repeated entry adds nothing
    assert {r.l2 for r in runs if r.method == "topkast"} == {0.0, 1e-5}
    assert {r.text for r in runs if r.l2 == 0.0 and r.method == "topkast"} == {""}
    assert {r.text for r in runs if r.l2 == 1e-5} == {"/data/prose.txt"}
    assert len({r.name for r in runs}) == len(runs)


def test_unknown_plan_entry_names_the_choices(monkeypatch):
    monkeypatch.setenv("PLAN", "table6")
    with pytest.raises(SystemExit, match="table6"):
        sweep.planned_runs()


def test_command_passes_the_run_to_the_trainer():
    run = sweep.Run("topkast", 0.9, 0.8, 2, lr=0.3, l2=0.0, refresh_every=100, optimizer="sgd",
                    text="/t.txt", steps=40)  # fmt: skip
    cmd = " ".join(sweep.command(run, "/w"))
    for flag in ("--config.seed=2", "--config.num_train_steps=40", "--config.optim.name=sgd",
                 "--config.optim.lr=0.3", "--config.sparsity.backward=0.8",
                 "--config.sparsity.exploration_l2=0.0", "--config.sparsity.refresh_every=100",
                 "--config.data.name=text", "--config.data.path=/t.txt"):  # fmt: skip
        assert flag in cmd


def test_report_ratios_sd_first_line_wins_and_failed_runs_ignored(tmp_path):
    lines = [
        _result("dense", 0.0, 0.0, 0, 2.0),
        _result("dense", 0.0, 0.0, 1, 2.2),
        _result("topkast", 0.9, 0.0, 0, 2.1),
        _result("topkast", 0.9, 0.0, 1, 2.31),
        _result("topkast", 0.9, 0.0, 1, 9.0),  # a repeat of seed 1: the first line counts
        _result("topkast", 0.9, 0.8, 0, 5.0, rc=1),  # failed: ignored
    ]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    runs = report.load(str(path))
    summary = report.summarize(runs)
    rows = summary[("pystdlib", "adam", 2e-3, 1000, 1)]
    got = rows[("topkast", 0.9, 0.0, 1e-5)]
    assert got["n"] == 2 and got["mean"] == pytest.approx(2.205)
    assert got["rel"] == pytest.approx(2.205 / 2.1)
    assert got["rel_sd"] == pytest.approx(abs(2.1 - 2.31) / 2.1 / 2**0.5)
    assert ("topkast", 0.9, 0.8, 1e-5) not in rows


def _rows(means):
    keys = [("dense", 0.0, 0.0, None)] + [("topkast", f, b, 0.0) for f, b in report.ORDER]
    return {k: {"mean": m} for k, m in zip(keys, means, strict=True)}


def test_order_check_names_each_inverted_pair():
    assert report.order_check(_rows([1, 2, 3, 4, 5, 6, 7]), 0.0) == "holds"
    got = report.order_check(_rows([1, 3, 2, 4, 5, 7, 6]), 0.0)
    assert got == "broken: 80/0 λ=0 ≥ 80/60 λ=0, 95/0 λ=0 ≥ 95/90 λ=0"
    assert report.order_check({}, 0.0).startswith("incomplete")


def test_figures_only_for_complete_settings(tmp_path, capsys):
    lines = [_result("dense", 0.0, 0.0, 0, 2.0)]
    lines += [_result("topkast", f, b, 0, 2.1 + f) for f, b in report.ORDER]
    lines += [_result("dense", 0.0, 0.0, 0, 2.0, text="/t/other.txt")]  # no Top-KAST rows
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    summary = report.summarize(report.load(str(path)))
    assert report.table5_settings(summary) == [("pystdlib", "adam", 2e-3, 1000, 1)]
    partial = tmp_path / "partial.jsonl"
    partial.write_text("".join(json.dumps(r) + "\n" for r in lines[:3]))
    report.main([str(partial), "--plots", str(tmp_path / "plots")])
    assert "no figures" in capsys.readouterr().out
    assert not (tmp_path / "plots").exists()
