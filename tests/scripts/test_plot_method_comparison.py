"""scripts/plot_method_comparison.py: runs from workdirs or from the recorded results table, one
fixed colour and proper name per method, Top-KAST's backward sparsity in the legend."""

import importlib.util
import json
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location(
    "plot_method_comparison", os.path.join(ROOT, "scripts", "plot_method_comparison.py")
)
plot_lib = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plot_lib)


def test_runs_from_the_recorded_table_of_the_docs():
    runs = plot_lib.runs_from_markdown(os.path.join(ROOT, "docs", "method_comparison.md"))
    assert len(runs) == 33  # dense once, 5 methods x 2 sparsities, 3 seeds each
    topkast_90 = [r for r in runs if r["method"] == "topkast" and r["sparsity"] == 0.9]
    assert [r["test_bpc"] for r in topkast_90] == [3.216, 3.18, 3.258]
    assert {r["backward"] for r in topkast_90} == {0.8}
    assert [r["test_bpc"] for r in runs if r["method"] == "dense"] == [2.817, 2.805, 2.842]


def _write_run(root, name, method, forward, backward, seed, bpc):
    os.makedirs(root / name)
    summary = {"method": method, "forward_sparsity": forward, "backward_sparsity": backward}
    (root / name / "summary.json").write_text(json.dumps(dict(summary, test_bpc=bpc)))
    (root / name / "config.json").write_text(json.dumps({"seed": seed}))


def test_figure_names_colours_and_topkast_backward(tmp_path):
    _write_run(tmp_path, "d", "dense", 0.0, 0.0, 0, 2.8)
    _write_run(tmp_path, "s", "set", 0.8, 0.8, 0, 3.2)
    _write_run(tmp_path, "r", "rigl", 0.8, 0.8, 0, 3.1)
    _write_run(tmp_path, "t0", "topkast", 0.8, 0.6, 0, 3.0)
    _write_run(tmp_path, "t1", "topkast", 0.8, 0.6, 1, 3.05)
    runs = plot_lib.runs_from_workdirs(str(tmp_path))
    fig = plot_lib.build_figure(runs)
    legend = fig.axes[0].get_legend()
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == ["SET", "RigL", "Top-KAST (backward 60% at 80%)", "dense"]
    colors = [h.get_color() for h in legend.legend_handles]
    assert colors == [plot_lib.METHODS[m][1] for m in ("set", "rigl", "topkast", "dense")]
    means = [line.get_ydata()[0] for line in fig.axes[0].get_lines() if line.get_marker() == "_"]
    assert means == pytest.approx([3.2, 3.1, 3.025])
    assert plot_lib.main([str(tmp_path), "--out", str(tmp_path / "p.png")]) == 0
    with open(tmp_path / "p.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_markdown_without_a_table_is_an_error(tmp_path):
    (tmp_path / "x.md").write_text("# nothing\n")
    with pytest.raises(ValueError, match=re.escape("no '| method | ... sparse |' results table")):
        plot_lib.runs_from_markdown(str(tmp_path / "x.md"))
