"""Tests of the Transformer-XL pieces against plain references and invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.language_model import models


def test_rel_shift_matches_reference():
    rng = np.random.default_rng(0)
    T, M = 3, 4
    K = T + M
    x = rng.normal(size=(2, 1, T, K)).astype(np.float32)
    out = np.asarray(models.rel_shift(jnp.asarray(x)))
    for i in range(T):
        for j in range(M + i + 1):  # the unmasked part
            distance = M + i - j
            assert out[0, 0, i, j] == x[0, 0, i, K - 1 - distance]


def test_causal_mask():
    mask = np.asarray(models.causal_mask(2, 3))
    np.testing.assert_array_equal(mask, [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])


def _tiny(**kw):
    args = dict(vocab_size=30, num_layers=2, d_model=16, num_heads=2, d_ff=32, dropout=0.0)
    args.update(kw)
    return models.TransformerXL(**args)


def _init(model, B=2, T=4, M=3):
    z = jnp.zeros((B, T), jnp.int32)
    mems = jnp.zeros((model.num_layers, B, M, model.d_model))
    return model.init(jax.random.PRNGKey(0), z, z, mems)


@pytest.mark.parametrize("cutoffs, div_val", [((), 1), ((10, 20), 2)])
def test_softmax_normalises(cutoffs, div_val):
    """exp(-NLL) summed over every possible target of one context is 1 (adaptive or not)."""
    model = _tiny(cutoffs=cutoffs, div_val=div_val)
    variables = _init(model)
    V = model.vocab_size
    inputs = jnp.full((V, 1), 3, jnp.int32)  # the same context in every row
    targets = jnp.arange(V)[:, None]  # each row scores a different next token
    nll, _ = model.apply(variables, inputs, targets, jnp.zeros((2, V, 3, 16)))
    assert float(jnp.exp(-nll).sum()) == pytest.approx(1.0, abs=1e-4)


def test_parameter_count_formula():
    D, F, L, V = 16, 32, 2, 30
    variables = _init(_tiny())
    n = sum(x.size for x in jax.tree.leaves(variables["params"]))
    per_layer = 5 * D * D + 2 * D * F + F + D + 4 * D + 2 * D
    assert n == L * per_layer + V * D + V


def test_memory_continues_the_sequence():
    """Two windows with memory == one long window (with the same zero memory in front)."""
    model = _tiny()
    variables = _init(model)
    B, T = 2, 4
    x = jax.random.randint(jax.random.PRNGKey(1), (B, 2 * T + 1), 0, 30)
    inputs, targets = x[:, :-1], x[:, 1:]
    zeros = jnp.zeros((2, B, T, 16))
    nll_long, _ = model.apply(variables, inputs, targets, zeros)
    nll_1, mems_1 = model.apply(variables, inputs[:, :T], targets[:, :T], zeros)
    mems_2 = jnp.concatenate([zeros, mems_1], axis=2)  # [zeros, window-1 layer inputs]
    nll_2, _ = model.apply(variables, inputs[:, T:], targets[:, T:], mems_2)
    np.testing.assert_allclose(nll_1, nll_long[:, :T], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(nll_2, nll_long[:, T:], rtol=1e-5, atol=1e-5)


def test_causal_and_no_gradient_through_memory():
    model = _tiny()
    variables = _init(model)
    apply = jax.jit(model.apply)
    x = jax.random.randint(jax.random.PRNGKey(2), (2, 6), 0, 30)
    mems = jax.random.normal(jax.random.PRNGKey(3), (2, 2, 3, 16))
    nll, _ = apply(variables, x[:, :5], x[:, 1:], mems)
    changed = x.at[:, 4].set((x[:, 4] + 1) % 30)
    nll2, _ = apply(variables, changed[:, :5], x[:, 1:], mems)
    np.testing.assert_array_equal(nll[:, :4], nll2[:, :4])  # earlier positions unaffected
    assert not np.allclose(nll[:, 4], nll2[:, 4])

    def sums(m):
        nll_m, new_mems = model.apply(variables, x[:, :5], x[:, 1:], m)
        return jnp.stack([new_mems.sum(), nll_m.sum()])

    jac_2x_mems = jax.jit(jax.jacrev(sums))(mems)
    assert float(jnp.abs(jac_2x_mems[0]).sum()) == 0.0  # new memory: no gradient to the old
    assert float(jnp.abs(jac_2x_mems[1]).sum()) > 0.0  # the loss itself does see the memory


def test_bad_cutoffs_raise():
    with pytest.raises(ValueError, match="cutoffs"):
        models.cluster_bounds(30, (20, 10))
