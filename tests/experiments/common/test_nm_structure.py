"""``config.sparsity.structure`` (N:M Top-KAST, issue 12) reaches ``tk.topkast`` in the LM and
ImageNet experiments: the trainers' own optimizer on their models' params (random values of the
abstract shapes) and two updates (random gradients: the optimizer is under test, not the model,
whose compilation would dominate) leave every
sparse kernel with exactly ``n`` of ``m`` in ``A`` and ``n_B`` of ``m`` in ``B`` per group along
its input axis."""

import jax
import numpy as np
import optax
import pytest

import topkast_jax as tk
from configs import demo
from configs.imagenet import tiny
from experiments.common import sparsity as sparsity_lib
from experiments.imagenet import optimizer as imagenet_optimizer
from experiments.imagenet import train as imagenet_train
from experiments.language_model import train as lm_train


def _assert_structured(opt_state, n, n_b, m):
    """Every sparse leaf: per group of ``m`` along axis -2, ``n`` in A and ``n_b`` in B."""
    masks = tk.get_masks(opt_state)
    found = tk.nm.structures(opt_state)
    pairs = [(a, b) for a, b in zip(jax.tree.leaves(masks.forward),
                                    jax.tree.leaves(masks.backward), strict=True)]  # fmt: skip
    assert pairs
    for (a, b), leaf in zip(pairs, jax.tree.leaves(found), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert leaf == tk.nm.LeafNM(n, n_b, m, a.ndim - 2)
        for mask, want in ((a, n), (b, n_b)):
            groups = np.moveaxis(mask, -2, -1).reshape(-1, m)
            np.testing.assert_array_equal(groups.sum(axis=1), want)


def _two_updates(tx, abstract_params):
    """The optimizer state after init and two jitted updates, random params and gradients."""
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(p.dtype), abstract_params)
    opt_state, update = jax.jit(tx.init)(params), jax.jit(tx.update)
    for _ in range(2):
        grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(p.dtype), params)
        updates, opt_state = update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return opt_state


def _lm_config():
    config = demo.get_config()
    config.data.name = "text"
    config.batch_size, config.seq_len, config.mem_len = 2, 8, 8
    config.model.num_layers, config.model.d_model, config.model.num_heads = 1, 16, 2
    config.model.d_embed, config.model.d_ff = 16, 32
    config.model.vocab_size = 32
    config.sparsity.structure = "2:4/3:4"
    return config


def test_lm_structure_reaches_topkast():
    config = _lm_config()
    lm_train.validate_config(config)
    assert sparsity_lib.planned_densities(config.sparsity) == (0.5, 0.25)
    model = lm_train.models.model_from_config(config.model)
    tx, _ = lm_train.make_optimizer(config, lm_train.sparsify_fn(config))
    dummy = jax.ShapeDtypeStruct((1, config.seq_len), np.int32)
    mems = jax.ShapeDtypeStruct((1, 1, config.mem_len, 16), np.float32)
    abstract = jax.eval_shape(model.init, jax.random.key(0), dummy, dummy, mems)["params"]
    opt_state = _two_updates(tx, abstract)
    _assert_structured(opt_state, 2, 3, 4)
    stats = tk.mask_stats(opt_state, per_leaf=False)
    np.testing.assert_allclose(stats["forward_density"], 0.5)
    np.testing.assert_allclose(stats["backward_density"], 0.75)


def test_imagenet_structure_reaches_topkast():
    config = tiny.get_config("0.8,0.5")
    config.image_size, config.sparsity.structure = 16, "1:4/2:4"
    imagenet_train.validate_config(config)
    model = imagenet_train.create_model(config)
    variables = imagenet_train.abstract_variables(model, config.image_size)
    tx, _ = imagenet_optimizer.make_optimizer(
        config, variables["params"], imagenet_train.sparsify_fn(config)
    )
    _assert_structured(_two_updates(tx, variables["params"]), 1, 2, 4)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"structure": "2:4/1:4"}, r"config\.sparsity\.structure='2:4/1:4' is not allowed"),
        ({"structure": "2:4", "method": "rigl"}, "config.sparsity.method='topkast'"),
        ({"structure": "2:4", "always_sparse": True}, "config.sparsity.always_sparse=False"),
        ({"structure": "2:4", "global_topk": True}, "config.sparsity.global_topk=False"),
        ({"structure": "2:4", "distribution": "erk"}, "config.sparsity.distribution='uniform'"),
    ],
)
def test_config_rules_refuse_structure_conflicts(fields, message):
    config = _lm_config()
    for field, value in fields.items():
        config.sparsity[field] = value
    with pytest.raises(ValueError, match=message):
        lm_train.validate_config(config)


def test_make_sparse_optimizer_refuses_structure_outside_masked_topkast():
    config = _lm_config()
    config.sparsity.method = "dense"
    with pytest.raises(ValueError, match=r"\['structure'\] only apply to method 'topkast'"):
        sparsity_lib.make_sparse_optimizer(optax.sgd(0.1), config.sparsity, None)
    config.sparsity.method, config.sparsity.always_sparse = "topkast", True
    with pytest.raises(ValueError, match="not supported with config.sparsity.always_sparse"):
        sparsity_lib.make_sparse_optimizer(optax.sgd(0.1), config.sparsity, None)
    config.sparsity.always_sparse, config.sparsity.structure = False, "2:4:8"
    with pytest.raises(ValueError, match=r"config\.sparsity\.structure='2:4:8'"):
        sparsity_lib.make_sparse_optimizer(optax.sgd(0.1), config.sparsity, None)
