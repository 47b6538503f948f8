"""``tk.AlwaysSparse`` is the masked ``tk.topkast`` computed with only ``B`` on the device.

Exactness: with the same inner optimizer, data and ``refresh_every``, the two runs have identical
``A`` and ``B`` at every one of 300 steps.  Compiled without FMA contraction (``NO_FMA``) the two
are the same float arithmetic, so their parameters are bitwise equal; with XLA's default
optimisations they agree to float32 reassociation.
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
    side_by_side,
)

import topkast_jax as tk
from topkast_jax import always_sparse_device as dev
from topkast_jax import always_sparse_host as host
from topkast_jax import selection

STEPS = 300
BASE = dict(forward_sparsity=0.8, backward_sparsity=0.5, exploration_l2=1e-2)
EXACT_CASES = {
    "refresh1": dict(BASE, refresh_every=1),
    "refresh7": dict(BASE, refresh_every=7),
    "refresh100": dict(BASE, refresh_every=100),
    "0.9_0.8_refresh7": dict(BASE, forward_sparsity=0.9, backward_sparsity=0.8, refresh_every=7),
    "backward0": dict(BASE, backward_sparsity=0.0, refresh_every=3),
    "erk": dict(BASE, distribution="erk", refresh_every=7),
    "global_topk": dict(BASE, global_topk=True, refresh_every=7),
    "random_backward": dict(BASE, backward_selection="random", seed=5, refresh_every=7),
    "stop_exploration": dict(BASE, stop_exploration_step=150, refresh_every=7),
}


def _assert_trees_equal(x, y, rtol=0.0, atol=0.0):
    for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", sorted(EXACT_CASES))
def test_bitwise_equal_to_masked_without_fma(name):
    run = side_by_side(optax.adam(1e-2), EXACT_CASES[name], STEPS, NO_FMA)
    assert run.mask_mismatch is None, f"A/B differ from step {run.mask_mismatch}"
    _assert_trees_equal(run.sparse_params, run.masked_params)


@pytest.mark.parametrize("name", ["refresh1", "0.9_0.8_refresh7"])
def test_clip_adam_with_default_compilation_matches_masked(name):
    """clip_by_global_norm sums the gradient norm in another order: reassociation only, far below
    the weights' scale (O(0.1–1)), so 1e-6 absolute is 1e-6 relative to the weights."""
    inner = optax.chain(optax.clip_by_global_norm(0.5), optax.adam(1e-2))
    run = side_by_side(inner, EXACT_CASES[name], STEPS, None)
    assert run.mask_mismatch is None, f"A/B differ from step {run.mask_mismatch}"
    _assert_trees_equal(run.sparse_params, run.masked_params, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The host selection and the B layout.


@pytest.mark.parametrize("seed", range(4))
def test_host_top_k_is_the_stable_argsort_order(seed):
    rng = np.random.default_rng(seed)
    x = rng.choice(np.float32([0.0, -0.0, 1.0, -1.0, 2.0, 0.5, -0.5]), size=200)  # many ties
    keys = host.magnitude_keys(x)
    for k in (1, 7, 100, 199, 200):
        want = np.zeros(200, bool)
        want[np.argsort(-np.abs(x.astype(np.float64)), kind="stable")[:k]] = True
        np.testing.assert_array_equal(host.top_k_flat(keys, k), want, f"k={k}")
    valid = rng.random(200) < 0.5
    k = int(valid.sum()) // 2
    order = [i for i in np.argsort(-np.abs(x.astype(np.float64)), kind="stable") if valid[i]]
    want = np.zeros(200, bool)
    want[order[:k]] = True
    np.testing.assert_array_equal(host.top_k_flat(keys, k, valid), want)


def test_host_keys_equal_the_library_keys():
    rng = np.random.default_rng(3)
    special = np.float32([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1e-45, -3.0])
    x = np.concatenate([special, rng.normal(size=50).astype(np.float32)]).reshape(2, 29)
    np.testing.assert_array_equal(
        host.magnitude_keys(x), np.asarray(selection.magnitude_keys(jnp.asarray(x)))
    )


def test_carry_positions_keep_staying_entries_and_zero_entering_ones():
    old = np.array([1, 4, 6, 9], np.int32)
    new = np.array([0, 4, 9, 10], np.int32)
    pos, found = host.carry_positions(old, new, 12)
    np.testing.assert_array_equal(found, [False, True, True, False])
    np.testing.assert_array_equal(old[pos[found]], new[found])


def test_state_layout_holds_only_b_with_sorted_indices_and_a_as_top_of_b():
    params = mlp_params()
    sparse = tk.AlwaysSparse(optax.adam(1e-2), **BASE)
    state = sparse.init(params)
    masks = sparse.masks(state)
    plan = {leaf.path: leaf for leaf in sparse.plan(params)}
    for name in ("l0", "l1", "l2"):
        kernel = np.asarray(params[name]["kernel"])
        idx = np.asarray(state.device.indices[name]["kernel"])
        in_a = np.asarray(state.device.in_a[name]["kernel"])
        values = np.asarray(state.device.params[name]["kernel"])
        leaf = plan[f"{name}/kernel"]
        assert idx.dtype == np.int32 and np.all(np.diff(idx) > 0)
        assert idx.shape == (leaf.k_backward,) and int(in_a.sum()) == leaf.k_forward
        np.testing.assert_array_equal(values, kernel.ravel()[idx])
        np.testing.assert_array_equal(masks.backward[name]["kernel"].ravel()[idx], True)
        assert masks.forward[name]["kernel"].sum() == leaf.k_forward
        # A is the top-k_A of B by magnitude, ties to the lower index.
        want_a = np.argsort(-np.abs(values.astype(np.float64)), kind="stable")[: leaf.k_forward]
        np.testing.assert_array_equal(np.flatnonzero(in_a), np.sort(want_a))
        assert state.device.indices[name]["bias"] is None
        assert state.device.params[name]["bias"].shape == params[name]["bias"].shape
    # No device array has the size of a sparse leaf, and device_bytes counts what is there.
    largest = max(np.size(params[n]["kernel"]) for n in ("l0", "l1", "l2"))
    assert all(x.size < largest for x in jax.tree.leaves(state.device))
    assert sparse.device_bytes(state) == sum(x.nbytes for x in jax.tree.leaves(state.device))
    per_leaf = sparse.device_bytes_per_leaf(params)
    assert sum(per_leaf.values()) == sparse.device_bytes(state)
    k_b = plan["l0/kernel"].k_backward
    assert per_leaf["l0/kernel"] == k_b * (4 + 4 + 1 + 2 * 4)  # values, index, flag, Adam


def test_dense_params_and_masks_before_and_after_steps():
    params = mlp_params()
    sparse = tk.AlwaysSparse(optax.sgd(0.1), **BASE, refresh_every=1000)
    state = sparse.init(params)
    _assert_trees_equal(sparse.dense_params(state), params)
    step = sparse.make_step(mlp_loss, donate=False)
    before = sparse.masks(state)
    new_state, loss = step(state, batch_at(0))
    assert np.isfinite(float(loss)) and int(new_state.count) == 1
    after = sparse.dense_params(new_state)
    for name in ("l0", "l1", "l2"):  # only B moved
        moved = np.asarray(after[name]["kernel"]) != np.asarray(params[name]["kernel"])
        assert moved.any() and not (moved & ~before.backward[name]["kernel"]).any()
    _assert_trees_equal(sparse.dense_params(state), params)  # donate=False: input kept


def test_inner_state_is_carried_for_staying_entries_and_zero_for_entering():
    params = mlp_params()
    sparse = tk.AlwaysSparse(optax.adam(1e-1), **BASE, refresh_every=5)
    state = sparse.init(params)
    step = sparse.make_step(mlp_loss, donate=False)
    for t in range(4):
        state, _ = step(state, batch_at(t))
    old_idx = np.asarray(state.device.indices["l1"]["kernel"])
    old_mu = np.asarray(state.device.inner_state[0].mu["l1"]["kernel"])
    state_after, _ = step(state, batch_at(4))  # refresh after this step
    # The step alone (no refresh) on the old layout, for the moments the refresh starts from.
    no_refresh = tk.AlwaysSparse(optax.adam(1e-1), **BASE, refresh_every=1000)
    stepped, _ = no_refresh.make_step(mlp_loss, donate=False)(state, batch_at(4))
    mu_before = np.asarray(stepped.device.inner_state[0].mu["l1"]["kernel"])
    new_idx = np.asarray(state_after.device.indices["l1"]["kernel"])
    new_mu = np.asarray(state_after.device.inner_state[0].mu["l1"]["kernel"])
    assert not np.array_equal(new_idx, old_idx), "the refresh should change B here"
    for j, flat in enumerate(new_idx):
        hit = np.flatnonzero(old_idx == flat)
        assert new_mu[j] == (mu_before[hit[0]] if hit.size else 0.0)
    assert np.any(old_mu != 0)


def test_errors_name_the_argument():
    inner = optax.sgd(0.1)
    with pytest.raises(ValueError, match="refresh_every"):
        tk.AlwaysSparse(inner, forward_sparsity=0.5, refresh_every=0)
    with pytest.raises(ValueError, match="backward_sparsity"):
        tk.AlwaysSparse(inner, forward_sparsity=0.5, backward_sparsity=0.7)
    with pytest.raises(ValueError, match="exploration_l2"):
        tk.AlwaysSparse(inner, forward_sparsity=0.5, exploration_l2=-1.0)
    with pytest.raises(ValueError, match="backward_selection"):
        tk.AlwaysSparse(inner, forward_sparsity=0.5, backward_selection="grow")
    for method in ("histogram", "sort", "nonsense"):  # the host selection is numpy's, not these
        with pytest.raises(ValueError, match="selection_method"):
            tk.AlwaysSparse(inner, forward_sparsity=0.5, selection_method=method)


def test_orbax_restore_gives_identical_continuation(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    params = mlp_params()
    sparse = tk.AlwaysSparse(
        optax.adam(1e-2), **BASE, refresh_every=3, backward_selection="random", seed=9
    )
    step = sparse.make_step(mlp_loss, donate=False)
    state = sparse.init(params)
    for t in range(4):  # the restore lands between refreshes, with host θ stale on B
        state, _ = step(state, batch_at(t))
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(4, args=ocp.args.StandardSave(state))
        manager.wait_until_finished()
        restored = manager.restore(4, args=ocp.args.StandardRestore(state))
    assert isinstance(restored, tk.AlwaysSparseState)
    assert isinstance(restored.host_params["l0"]["kernel"], np.ndarray)
    _assert_trees_equal(restored, state)
    a, b = state, restored
    for t in range(4, 10):
        a, loss_a = step(a, batch_at(t))
        b, loss_b = step(b, batch_at(t))
        assert float(loss_a) == float(loss_b)
    _assert_trees_equal(sparse.dense_params(b), sparse.dense_params(a))
    _assert_trees_equal(b.device, a.device)


def test_linen_layerwise_alpha_gives_the_same_run():
    """``lazy_alpha`` + ``always_sparse_linen.layerwise`` only moves where α is built."""
    nn = pytest.importorskip("flax.linen")
    from topkast_jax import always_sparse_linen

    dense = always_sparse_linen.layerwise(nn.Dense)

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, h):
            h = nn.relu(dense(16)(h))
            return dense(4)(h)

    def loss(params, batch):
        x, y = batch
        return jnp.mean((MLP().apply({"params": params}, x) - y) ** 2)

    x, y = batch_at(0)
    params = MLP().init(jax.random.PRNGKey(0), x)["params"]
    kw = dict(BASE, refresh_every=3)
    lazy = tk.AlwaysSparse(optax.adam(1e-2), lazy_alpha=True, **kw)
    eager = tk.AlwaysSparse(optax.adam(1e-2), **kw)
    a, b = lazy.init(params), eager.init(params)
    step_a, step_b = lazy.make_step(loss), eager.make_step(loss)
    for t in range(10):
        a, loss_a = step_a(a, batch_at(t))
        b, loss_b = step_b(b, batch_at(t))
        assert float(loss_a) == float(loss_b)
    _assert_trees_equal(lazy.dense_params(a), eager.dense_params(b))
    # The model really received SparseLeaf values: densifying is the layer's job.
    seen = []
    probe = tk.AlwaysSparse(optax.sgd(0.0), lazy_alpha=True, **kw)
    probe.make_step(lambda p, batch: seen.append(p) or loss(p, batch))(probe.init(params), (x, y))
    kernels = [leaf for leaf in jax.tree.leaves(seen[0], is_leaf=dev.is_sparse_leaf)]
    assert any(dev.is_sparse_leaf(leaf) for leaf in kernels)


def test_bfloat16_leaves_match_masked():
    """Host θ keeps the leaf dtype; selection widens to float32 exactly, as the library does."""
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), mlp_params())

    def loss(p, batch):
        return mlp_loss(jax.tree.map(lambda x: x.astype(jnp.float32), p), batch)

    kw = dict(BASE, refresh_every=2)
    tx = tk.topkast(optax.sgd(0.05), **kw)
    m_step, m_state, m_params = masked_step(tx, loss, NO_FMA), jax.jit(tx.init)(params), params
    sparse = tk.AlwaysSparse(optax.sgd(0.05), **kw)
    s_state, s_step = sparse.init(params), sparse.make_step(loss, compiler_options=NO_FMA)
    for t in range(30):
        m_params, m_state, _ = m_step(m_params, m_state, batch_at(t))
        s_state, _ = s_step(s_state, batch_at(t))
        for a, b in zip(
            jax.tree.leaves(tk.get_masks(m_state).backward),
            jax.tree.leaves(sparse.masks(s_state).backward),
            strict=True,
        ):
            np.testing.assert_array_equal(np.asarray(a), b, f"B at step {t}")
    dense = sparse.dense_params(s_state)
    assert dense["l0"]["kernel"].dtype == jnp.bfloat16
    _assert_trees_equal(
        jax.tree.map(lambda x: np.asarray(x, np.float32), dense),
        jax.tree.map(lambda x: np.asarray(x, np.float32), m_params),
    )


def test_step_compiles_once_across_refreshes(caplog):
    """Every array the step receives is committed alike, before and after a refresh: a mix would
    make ``jax.jit`` compile the device step again after each refresh (seconds on a real model).
    (With ``global_topk`` the per-leaf ``k_B`` change at a refresh, and so do the shapes.)"""
    sparse = tk.AlwaysSparse(optax.adam(1e-3), **dict(BASE, refresh_every=3))
    state = sparse.init(mlp_params())
    step = sparse.make_step(mlp_loss)
    with jax.log_compiles(True), caplog.at_level("WARNING"):
        for i in range(8):  # refreshes after steps 3 and 6
            state, _ = step(state, batch_at(i))
    compiles = [r for r in caplog.records if "Compiling jit(device_step)" in r.getMessage()]
    assert len(compiles) == 1, [r.getMessage()[:120] for r in compiles]
