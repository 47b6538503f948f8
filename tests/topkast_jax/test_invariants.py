"""Invariants that hold for any optimizer, shape and sparsity (issue 2, semantics 1 and 3d).

* ``|A| = k_A``, ``|B| = k_B``, ``A ⊆ B``, and after a refresh both are the top-k of the new ``θ``;
* a weight outside ``B`` never moves, not even through momentum;
* the inner optimizer's param-shaped state is zero outside ``B``.
"""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import reference
import tk_harness
from hypothesis import given, settings
from hypothesis import strategies as st

import topkast_jax as tk

INNERS = {
    "momentum": (lambda: optax.sgd(0.3, momentum=0.9), ("trace",)),
    "nesterov": (lambda: optax.sgd(0.3, momentum=0.5, nesterov=True), ("trace",)),
    "adam": (lambda: optax.adam(0.1), ("mu", "nu")),
}
SPARSITIES = (0.0, 0.3, 0.5, 0.8, 0.95)


@st.composite
def _configs(draw):
    shapes = draw(
        st.lists(
            hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=5), min_size=1, max_size=2
        )
    )
    fs = draw(st.sampled_from(SPARSITIES))
    bs = draw(st.sampled_from([s for s in SPARSITIES if s <= fs]))
    return dict(
        shapes=shapes,
        fs=fs,
        bs=bs,
        refresh_every=draw(st.integers(1, 3)),
        inner=draw(st.sampled_from(sorted(INNERS))),
        lam=draw(st.sampled_from([0.0, 0.1])),
        seed=draw(st.integers(0, 2**16)),
    )


def _state_leaves(opt_state, names):
    return [
        jax.tree.leaves(optax.tree_utils.tree_get(opt_state, name))[1:] for name in names
    ]  # [1:] drops the dense bias leaf "a_bias" (sorted first)


@settings(max_examples=6, deadline=None, derandomize=True)
@given(cfg=_configs())
def test_property_nothing_outside_b_moves_and_state_is_sparse(cfg):
    rng = np.random.default_rng(cfg["seed"])
    params = {"a_bias": jnp.asarray(rng.normal(size=3), jnp.float32)}
    for i, shape in enumerate(cfg["shapes"]):
        params[f"w{i}"] = jnp.asarray(rng.normal(size=shape), jnp.float32)
    make_inner, state_names = INNERS[cfg["inner"]]
    tx = tk.topkast(
        make_inner(),
        forward_sparsity=cfg["fs"],
        backward_sparsity=cfg["bs"],
        exploration_l2=cfg["lam"],
        refresh_every=cfg["refresh_every"],
    )

    @jax.jit
    def step(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), updates, opt_state

    opt_state = tk_harness.init(tx, params)
    for t in range(5):
        masks = tk.get_masks(opt_state)
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
        new_params, updates, opt_state = step(params, opt_state, grads)
        new_masks = tk.get_masks(opt_state)
        sparse_names = sorted(k for k in params if k != "a_bias")
        for name in sparse_names:
            a, b = np.asarray(masks.forward[name]), np.asarray(masks.backward[name])
            old, new = np.asarray(params[name]), np.asarray(new_params[name])
            k_a, k_b = reference.mask_counts(old.size, 1 - cfg["fs"], 1 - cfg["bs"])
            assert a.sum() == k_a and b.sum() == k_b and not np.any(a & ~b)
            if t == 0:  # init: the top-k of θ₀
                np.testing.assert_array_equal(a, reference.top_k_mask(old, k_a))
                np.testing.assert_array_equal(b, reference.top_k_mask(old, k_b))
            np.testing.assert_array_equal(new[~b], old[~b], f"moved outside B at step {t}")
            assert not np.any(np.asarray(updates[name])[~b])
            new_a, new_b = np.asarray(new_masks.forward[name]), np.asarray(new_masks.backward[name])
            if (t + 1) % cfg["refresh_every"] == 0:
                np.testing.assert_array_equal(new_a, reference.top_k_mask(new, k_a))
                np.testing.assert_array_equal(new_b, reference.top_k_mask(new, k_b))
            else:
                np.testing.assert_array_equal(new_a, a)
                np.testing.assert_array_equal(new_b, b)
        for leaves in _state_leaves(opt_state, state_names):
            for name, leaf in zip(sparse_names, leaves, strict=True):
                b = np.asarray(masks.backward[name])
                assert not np.any(np.asarray(leaf)[~b]), f"inner state nonzero outside B ({name})"
        params = new_params


def test_momentum_never_moves_a_weight_outside_b_and_restarts_at_zero():
    """A hand-computed run with lr 1, momentum 0.9, k_A = 1, k_B = 2 (row |θ| = 3, 2, 1, 0.01).

    Step 1 pushes w[1] (in B) from 2 to 0.1: it leaves B with momentum 1.9.  Step 2 pushes w[2]
    from 1 to 0.05: w[1] re-enters B.  With zero gradients at step 3, a dense-momentum
    implementation would move w[1] by 0.9·1.9 and w[2] by 0.9·0.95; Top-KAST moves neither.
    """
    params = {"w": jnp.array([[3.0, 2.0, 1.0, 0.01]])}
    tx = tk.topkast(
        optax.sgd(1.0, momentum=0.9),
        forward_sparsity=0.75,
        backward_sparsity=0.5,
        sparsify={"w": True},
    )
    state = tk_harness.init(tx, params)
    trajectory = [params]
    grads_per_step = [[0.0, 1.9, 0.0, 0.0], [0.0, 0.0, 0.95, 0.0], [0.0, 0.0, 0.0, 0.0]]
    backwards = [np.asarray(tk.get_masks(state).backward["w"][0])]
    update = jax.jit(tx.update)
    for g in grads_per_step:
        updates, state = update({"w": jnp.array([g])}, state, params)
        params = optax.apply_updates(params, updates)
        trajectory.append(params)
        backwards.append(np.asarray(tk.get_masks(state).backward["w"][0]))
    w = [np.asarray(p["w"][0]) for p in trajectory]
    np.testing.assert_array_equal(backwards[0], [True, True, False, False])
    np.testing.assert_array_equal(backwards[1], [True, False, True, False])
    np.testing.assert_array_equal(backwards[2], [True, True, False, False])
    np.testing.assert_allclose(w[2], [3.0, 0.1, 0.05, 0.01], atol=1e-6)
    assert w[2][1] == w[1][1], "w[1] moved while outside B (momentum leaked)"
    np.testing.assert_array_equal(w[3], w[2])
    trace = np.asarray(optax.tree_utils.tree_get(state, "trace")["w"])
    np.testing.assert_array_equal(trace, np.zeros_like(trace))
