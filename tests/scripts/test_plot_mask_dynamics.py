"""scripts/plot_mask_dynamics.py: several runs overlaid, window length and run names on the
figure, clear errors."""

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location(
    "plot_mask_dynamics", os.path.join(ROOT, "scripts", "plot_mask_dynamics.py")
)
plot_lib = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plot_lib)


def _write_run(workdir, window, changes, reservoir):
    """metrics.jsonl as a trainer writes it: masks/ records at window ends and log steps."""
    os.makedirs(workdir)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        for i, (c1, c2) in enumerate(changes, start=1):
            step = i * window
            record = {"step": step, "masks/window_change/l1/kernel": c1}
            record.update({"masks/window_change/l2/kernel": c2, "masks/window_steps": window})
            f.write(json.dumps(record) + "\n")
        for step, value in reservoir:
            f.write(json.dumps({"step": step, "masks/reservoir_activated": value}) + "\n")


def test_series_are_min_mean_max_over_layers_in_percent(tmp_path):
    _write_run(tmp_path / "r", 100, [(0.1, 0.3), (0.05, 0.15)], [(50, 0.2), (100, 0.4)])
    run = plot_lib.load_run(str(tmp_path / "r"), "r")
    assert run["change"]["step"] == [100, 200]
    assert run["change"]["mean"] == pytest.approx([20.0, 10.0])
    assert run["change"]["min"] == pytest.approx([10.0, 5.0])
    assert run["change"]["max"] == pytest.approx([30.0, 15.0])
    assert run["reservoir"] == {"step": [50, 100], "value": pytest.approx([20.0, 40.0])}
    assert run["window"] == 100


def test_several_runs_overlaid_with_names_and_window(tmp_path):
    _write_run(tmp_path / "a", 100, [(0.1, 0.3)] * 3, [(100, 0.1), (300, 0.2)])
    _write_run(tmp_path / "b", 100, [(0.2, 0.2)] * 3, [(100, 0.3), (300, 0.5)])
    runs = [plot_lib.load_run(str(tmp_path / n), f"{n} 90% sparse") for n in ("a", "b")]
    fig = plot_lib.build_figure(runs)
    ax_a, ax_b = fig.axes
    assert "100-step windows" in ax_a.get_title()
    for ax in (ax_a, ax_b):
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert labels == ["a 90% sparse", "b 90% sparse"]
        colors = [line.get_color() for line in ax.get_lines()]
        assert colors == ["C0", "C1"]  # one colour per run, the same in both panels
    out = plot_lib.plot([str(tmp_path / "a"), str(tmp_path / "b")], out=str(tmp_path / "f.png"))
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_different_windows_go_into_the_legend(tmp_path):
    _write_run(tmp_path / "a", 100, [(0.1, 0.3)], [])
    _write_run(tmp_path / "b", 500, [(0.1, 0.3)], [])
    fig = plot_lib.build_figure([plot_lib.load_run(str(tmp_path / n), n) for n in ("a", "b")])
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["a (window 100 steps)", "b (window 500 steps)"]


def test_errors_name_the_run_or_the_mismatch(tmp_path):
    os.makedirs(tmp_path / "empty")
    (tmp_path / "empty" / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/loss": 1}))
    with pytest.raises(ValueError, match="run 'empty'.*masks/reservoir_activated"):
        plot_lib.plot([str(tmp_path / "empty")])
    with pytest.raises(ValueError, match="--names has 2 names for 1 workdirs"):
        plot_lib.plot([str(tmp_path / "empty")], names=["x", "y"])
    assert plot_lib.main([str(tmp_path / "absent")]) == 1
