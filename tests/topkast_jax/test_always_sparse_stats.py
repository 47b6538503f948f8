"""``AlwaysSparse.mask_stats`` equals ``tk.mask_stats`` of the masked run, step by step.

The masked ``tk.topkast(track_reservoir=True)`` keeps the history in its packed sets on the
device; ``tk.AlwaysSparse(track_reservoir=True)`` keeps it on the host, updated at each refresh
from the old and new ``B``-layouts.  Same seed, data and schedule: the same numbers.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from always_sparse_harness import (
    NO_FMA,
    batch_at,
    masked_step,
    mlp_loss,
    mlp_params,
    orbax_roundtrip,
)

import topkast_jax as tk
from topkast_jax import always_sparse_history as history_lib
from topkast_jax import always_sparse_host as host

BASE = dict(forward_sparsity=0.8, backward_sparsity=0.5, exploration_l2=1e-2, refresh_every=3)
CASES = {
    "base": BASE,
    "global_random_stop": dict(
        BASE, global_topk=True, backward_selection="random", seed=3, stop_exploration_step=10
    ),
}
STEPS = 24


def _masked_stats(state) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(tk.mask_stats(state)).items()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_mask_stats_equal_the_masked_transform_at_every_step(name):
    kw = dict(CASES[name], track_reservoir=True)
    inner = optax.adam(5e-2)  # large steps: A changes at every refresh
    params = mlp_params()
    tx = tk.topkast(inner, **kw)
    m_step, m_state = masked_step(tx, mlp_loss, NO_FMA), jax.jit(tx.init)(params)
    sparse = tk.AlwaysSparse(inner, **kw)
    s_state, s_step = sparse.init(params), sparse.make_step(mlp_loss, compiler_options=NO_FMA)
    reservoir = []
    for t in range(STEPS + 1):
        want, got = _masked_stats(m_state), sparse.mask_stats(s_state)
        assert got.keys() == want.keys(), f"step {t}"
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-6, err_msg=f"{key}, step {t}")
        reservoir.append(got["reservoir_activated"])
        if t < STEPS:
            params, m_state, _ = m_step(params, m_state, batch_at(t))
            s_state, _ = s_step(s_state, batch_at(t))
    assert reservoir[0] == 0.0 and reservoir[-1] > 0, reservoir  # the statistic moved
    assert np.all(np.diff(reservoir) >= 0)  # ever-active only grows


def test_without_track_reservoir_no_history_and_no_key():
    sparse = tk.AlwaysSparse(optax.sgd(0.1), **BASE)
    state = sparse.init(mlp_params())
    assert state.history.ever_active is None and state.history.reservoir is None
    stats = sparse.mask_stats(state, per_leaf=False)
    assert "reservoir_activated" not in stats
    assert set(stats) == {
        "forward_density",
        "backward_density",
        "mask_change",
        "mask_change_min",
        "mask_change_max",
    }


def test_history_is_packed_host_bits_of_a_and_not_b():
    """Two bits per weight on the host, none on the device; the bits are ``A₀`` and ``¬B₀``."""
    params = mlp_params()
    sparse = tk.AlwaysSparse(optax.sgd(0.1), **BASE, track_reservoir=True)
    state = sparse.init(params)
    masks = sparse.masks(state)
    forward = [m for m in jax.tree.leaves(masks.forward) if m is not None]
    backward = [m for m in jax.tree.leaves(masks.backward) if m is not None]
    for e, r, a, b in zip(
        state.history.ever_active, state.history.reservoir, forward, backward, strict=True
    ):
        assert isinstance(e, np.ndarray) and e.dtype == np.uint8 and e.shape == (-(-a.size // 8),)
        np.testing.assert_array_equal(np.unpackbits(e, count=a.size).astype(bool), a.ravel())
        np.testing.assert_array_equal(np.unpackbits(r, count=b.size).astype(bool), ~b.ravel())
    plain = tk.AlwaysSparse(optax.sgd(0.1), **BASE).init(params)
    assert sparse.device_bytes(state) == sparse.device_bytes(plain)
    abstract = sparse.abstract_state(params).history
    assert jax.tree.map(lambda x: (x.shape, x.dtype), abstract) == jax.tree.map(
        lambda x: (x.shape, x.dtype), state.history
    )


def test_fraction_changed_counts_entering_forward_weights():
    old = host.Layout(np.array([1, 3, 5, 7], np.int32), np.array([True, True, False, True]))
    new = host.Layout(np.array([1, 2, 5, 8], np.int32), np.array([True, True, True, False]))
    # A_old = {1, 3, 7}, A_new = {1, 2, 5}: 2 entered of 3.
    assert history_lib.fraction_changed(old, new) == np.float32(2) / np.float32(3)
    empty = host.Layout(np.array([4], np.int32), np.array([False]))
    assert history_lib.fraction_changed(empty, new) == 3.0


def test_orbax_restores_the_history(tmp_path):
    pytest.importorskip("orbax.checkpoint")
    sparse = tk.AlwaysSparse(optax.adam(5e-2), **BASE, track_reservoir=True)
    state = sparse.init(mlp_params())
    step = sparse.make_step(mlp_loss)
    for t in range(7):
        state, _ = step(state, batch_at(t))
    restored = orbax_roundtrip(state, tmp_path / "ckpt")
    assert sparse.mask_stats(restored) == sparse.mask_stats(state)
    for a, b in zip(jax.tree.leaves(restored.history), jax.tree.leaves(state.history), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


def _masked_grad_norm_step(tx):
    """The masked trainers' step, returning ``optax.tree.norm(∂L/∂α)`` (their ``grad_norm``)."""

    def step(params, state, batch):
        grads = jax.grad(mlp_loss)(tk.forward_params(params, state), batch)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, optax.tree.norm(grads)

    return jax.jit(step, compiler_options=NO_FMA)


def test_grad_norm_equals_the_masked_trainers_dense_gradient_norm():
    """``‖∂L/∂α‖`` over the dense gradient, outside ``B`` too: bitwise equal without FMA."""
    kw = BASE
    params = mlp_params()
    tx = tk.topkast(optax.adam(5e-2), **kw)
    m_step, m_state = _masked_grad_norm_step(tx), jax.jit(tx.init)(params)
    sparse = tk.AlwaysSparse(optax.adam(5e-2), **kw)
    s_state = sparse.init(params)
    s_step = sparse.make_step(mlp_loss, compiler_options=NO_FMA, grad_norm=True)
    for t in range(7):  # past two refreshes
        params, m_state, want = m_step(params, m_state, batch_at(t))
        s_state, _, got = s_step(s_state, batch_at(t))
        assert float(got) == float(want), f"step {t}"
    # The norm of the k_B-vectors alone would be smaller: the check above sees outside B.
    masks = sparse.masks(s_state).backward
    alpha = tk.forward_params(params, m_state)
    grads = jax.grad(mlp_loss)(alpha, batch_at(7))
    on_b = jax.tree.map(lambda g, b: g if b is None else g * b, grads, masks)
    norm_on_b, norm = float(optax.tree.norm(on_b)), float(optax.tree.norm(grads))
    assert norm_on_b < norm


def test_grad_norm_through_linen_layerwise_alpha():
    """With ``lazy_alpha`` each layer densifies inside ``nn.remat``: the same norm."""
    nn = pytest.importorskip("flax.linen")
    from topkast_jax import always_sparse_linen

    dense = always_sparse_linen.layerwise(nn.Dense)

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, h):
            return dense(4)(nn.tanh(dense(16)(h)))

    def loss(params, batch):
        x, y = batch
        return jnp.mean((MLP().apply({"params": params}, x) - y) ** 2)

    params = MLP().init(jax.random.PRNGKey(0), batch_at(0)[0])["params"]
    lazy = tk.AlwaysSparse(optax.adam(5e-2), lazy_alpha=True, **BASE)
    eager = tk.AlwaysSparse(optax.adam(5e-2), **BASE)
    a, b = lazy.init(params), eager.init(params)
    step_a = lazy.make_step(loss, grad_norm=True, compiler_options=NO_FMA)
    step_b = eager.make_step(loss, grad_norm=True, compiler_options=NO_FMA)
    for t in range(4):
        a, _, norm_a = step_a(a, batch_at(t))
        b, _, norm_b = step_b(b, batch_at(t))
        np.testing.assert_allclose(float(norm_a), float(norm_b), rtol=1e-6, err_msg=f"step {t}")
        assert float(norm_a) > 0
