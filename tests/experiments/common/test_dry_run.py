"""Dry-run table: natural order of layer names, rounded densities."""

import json

import jax
import jax.numpy as jnp

import topkast_jax as tk
from experiments.common import dry_run


def _abstract_params():
    names = ["layer_10", "layer_2", "layer_1", "embed"]
    params = {n: {"kernel": jnp.zeros((10, 10)), "bias": jnp.zeros(10)} for n in names}
    return jax.eval_shape(lambda: params)


def test_natural_key_orders_numbers_by_value():
    names = ["layer_10/w", "layer_2/w", "layer_1/b", "layer_1/a", "embed"]
    assert sorted(names, key=dry_run.natural_key) == [
        "embed",
        "layer_1/a",
        "layer_1/b",
        "layer_2/w",
        "layer_10/w",
    ]


def test_rows_in_natural_order_with_rounded_densities(tmp_path):
    rows = dry_run.layer_rows(
        _abstract_params(),
        sparsify=tk.sparsify.kernels(),
        forward_sparsity=0.8,
        backward_sparsity=0.5,
    )
    assert [r["name"] for r in rows] == [
        f"{n}/{leaf}"
        for n in ("embed", "layer_1", "layer_2", "layer_10")
        for leaf in ("bias", "kernel")
    ]
    kernel = rows[1]
    assert kernel["forward_nonzero"] == 20
    assert kernel["forward_density"] == 0.2  # 1 - 0.8 rounded, not 0.19999999999999996
    assert kernel["backward_density"] == 0.5
    record = dry_run.write_dry_run(str(tmp_path), rows)
    on_disk = json.loads((tmp_path / "dry_run.json").read_text())
    assert on_disk["forward_density"] == round((4 * 20 + 40) / 440, 6)
    assert record["forward_density"] == on_disk["forward_density"]
    table = dry_run.format_table(rows, dry_run.totals(rows)).splitlines()
    assert table[2].startswith("embed/bias") and table[-4].startswith("layer_10/kernel")
    fwd, bwd = (4 * 20 + 40) / 440, (4 * 50 + 40) / 440  # 4 kernels of 100, 4 dense biases
    assert table[-1] == f"forward density {fwd:.3f} | backward density {bwd:.3f}"


def test_table_shows_stacked_layers_and_the_sparsify_rule():
    params = jax.eval_shape(
        lambda: {"blocks": {"kernel": jnp.zeros((4, 10, 10)), "scale": jnp.zeros((4, 10))}}
    )
    rows = dry_run.layer_rows(
        params, sparsify=tk.sparsify.default(), forward_sparsity=0.8, backward_sparsity=0.5,
        layer_axis=0,
    )  # fmt: skip
    kernel, scale = rows
    assert kernel["layers"] == 4 and kernel["forward_nonzero"] == 4 * 20  # k per layer
    assert not scale["sparse"] and scale["layers"] == 1  # a stacked scale stays dense
    rule = dry_run.sparsify_rule(None)
    assert rule == tk.sparsify.describe(None) and "kernel or embedding" in rule
    lines = dry_run.format_table(rows, dry_run.totals(rows), "topkast", rule).splitlines()
    assert lines[0].split()[-1] == "layers" and lines[2].split()[-1] == "4"
    assert lines[-2:] == [f"sparse leaves: {rule}", "method topkast"]
