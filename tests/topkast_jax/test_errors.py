"""Bad input: a clear ValueError naming the argument or leaf; a warning when nothing is sparse."""

import warnings

import jax.numpy as jnp
import optax
import pytest

import topkast_jax as tk

PARAMS = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}, "emb": jnp.ones((5, 2))}


def _make(**kwargs):
    args = dict(forward_sparsity=0.8, backward_sparsity=0.5)
    args.update(kwargs)
    return tk.topkast(optax.sgd(0.1), **args)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(forward_sparsity=1.0), "forward_sparsity"),
        (dict(forward_sparsity=1.5), "forward_sparsity"),
        (dict(forward_sparsity=-0.1), "forward_sparsity"),
        (dict(backward_sparsity=-0.1), "backward_sparsity"),
        (dict(forward_sparsity=0.5, backward_sparsity=0.6), "backward_sparsity"),
        (dict(refresh_every=0), "refresh_every"),
        (dict(refresh_every=-3), "refresh_every"),
        (dict(refresh_every=1.5), "refresh_every"),
        (dict(exploration_l2=-1e-4), "exploration_l2"),
        (dict(distribution="lognormal"), "distribution"),
        (dict(backward_selection="gradient"), "backward_selection"),
    ],
)
def test_bad_hyperparameters_raise_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _make(**kwargs)


def test_sparsify_tree_with_wrong_structure():
    bad = {"dense": {"kernel": True}, "emb": True}  # missing "bias"
    with pytest.raises(ValueError, match="sparsify"):
        _make(sparsify=bad).init(PARAMS)


def test_sparsify_callable_with_wrong_structure():
    with pytest.raises(ValueError, match="sparsify"):
        _make(sparsify=lambda params: [True, False, True]).init(PARAMS)


def test_integer_leaf_marked_sparse_names_the_leaf():
    params = {"w": jnp.ones((4, 4)), "step_table": jnp.ones((4, 4), jnp.int32)}
    with pytest.raises(ValueError, match="step_table"):
        _make(sparsify={"w": True, "step_table": True}).init(params)


def test_boolean_leaf_marked_sparse_names_the_leaf():
    params = {"w": jnp.ones((4, 4)), "flags": jnp.ones((4, 4), bool)}
    with pytest.raises(ValueError, match="flags"):
        _make(sparsify={"w": True, "flags": True}).init(params)


def test_integer_leaf_is_skipped_by_default_sparsify():
    params = {"w": jnp.ones((4, 4)), "table": jnp.ones((4, 4), jnp.int32)}
    masks = tk.get_masks(_make().init(params))
    assert masks.forward["table"] is None and masks.forward["w"] is not None


def test_sparsify_selecting_no_leaf_warns():
    with pytest.warns(UserWarning, match="sparsify"):
        _make(sparsify=lambda p: {"dense": {"kernel": False, "bias": False}, "emb": False}).init(
            PARAMS
        )


def test_valid_sparsify_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _make(sparsify={"dense": {"kernel": True, "bias": False}, "emb": False}).init(PARAMS)


def test_layer_densities_validates_like_topkast():
    with pytest.raises(ValueError, match="forward_sparsity"):
        tk.layer_densities(PARAMS, sparsify=tk.sparsify.kernels(), forward_sparsity=1.0)
    with pytest.raises(ValueError, match="sparsify"):
        tk.layer_densities(PARAMS, sparsify={"emb": True}, forward_sparsity=0.5)
