"""Tests of make_sparse_optimizer and the dry-run table (through topkast_jax)."""

import jax
import jax.numpy as jnp
import ml_collections
import optax
import pytest

import topkast_jax as tk
from experiments.common import dry_run
from experiments.common.sparsity import make_sparse_optimizer, planned_densities


def _sparsity(method="topkast", forward=0.8, backward=0.5):
    return ml_collections.ConfigDict(
        dict(
            method=method,
            forward=forward,
            backward=backward,
            refresh_every=1,
            exploration_l2=1e-4,
            distribution="uniform",
        )
    )


def _params():
    return {"dense": {"kernel": jnp.arange(1.0, 101.0).reshape(10, 10), "bias": jnp.ones(10)}}


def test_topkast_method_gives_requested_densities():
    params = _params()
    tx = make_sparse_optimizer(optax.sgd(0.1), _sparsity(), tk.sparsify.kernels())
    state = tx.init(params)
    masks = tk.get_masks(state)
    assert int(masks.forward["dense"]["kernel"].sum()) == 20
    assert int(masks.backward["dense"]["kernel"].sum()) == 50
    assert masks.forward["dense"]["bias"] is None
    alpha = tk.forward_params(params, state)
    # the 20 largest magnitudes survive: 81..100
    assert float(alpha["dense"]["kernel"].sum()) == float(sum(range(81, 101)))


def test_dense_method_keeps_everything():
    params = _params()
    tx = make_sparse_optimizer(optax.sgd(0.1), _sparsity("dense"), tk.sparsify.kernels())
    state = tx.init(params)
    alpha = tk.forward_params(params, state)
    assert jnp.array_equal(alpha["dense"]["kernel"], params["dense"]["kernel"])
    assert planned_densities(_sparsity("dense")) == (0.0, 0.0)


def test_unknown_method_raises_naming_it():
    with pytest.raises(ValueError, match="'magic'"):
        make_sparse_optimizer(optax.sgd(0.1), _sparsity("magic"), tk.sparsify.kernels())


def test_dry_run_rows_and_totals_on_abstract_params(tmp_path):
    abstract = jax.eval_shape(_params)
    rows = dry_run.layer_rows(
        abstract, sparsify=tk.sparsify.kernels(), forward_sparsity=0.8, backward_sparsity=0.5
    )
    by_name = {r["name"]: r for r in rows}
    assert by_name["dense/kernel"]["sparse"] and by_name["dense/kernel"]["forward_nonzero"] == 20
    assert not by_name["dense/bias"]["sparse"]
    record = dry_run.write_dry_run(str(tmp_path), rows, {"note": 1})
    assert record["total_params"] == 110
    assert record["sparse_params"] == 100
    assert record["forward_nonzero"] == 30
    assert record["backward_nonzero"] == 60
    assert (tmp_path / "dry_run.json").exists()
    table = dry_run.format_table(rows, dry_run.totals(rows))
    assert "dense/kernel" in table and "total params 110" in table


def test_static_baseline_dispatch_uses_forward_sparsity():
    params = _params()
    sparsity = _sparsity("static", forward=0.8, backward=0.0)
    tx = make_sparse_optimizer(optax.sgd(0.1), sparsity, tk.sparsify.kernels(), num_train_steps=10)
    state = tx.init(params)
    alpha = tk.forward_params(params, state)
    assert int((alpha["dense"]["kernel"] != 0).sum()) == 20
    assert planned_densities(sparsity) == (0.8, 0.8)
