"""Top-KAST with optax's own wrappers: ``optax.multi_transform`` / ``optax.masked`` around it
(several Top-KAST states, one per group), Top-KAST around ``multi_transform`` and
``optax.contrib.muon``, ``tk.inner_state``, ``optax.inject_hyperparams`` and ``optax.MultiSteps``.

Every leaf of the least-squares problem (:mod:`tk_harness`) trains independently with per-leaf
top-k, so each group is checked against a reference run with that group's settings.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference
import tk_harness

import topkast_jax as tk
from topkast_jax.state import find_sparse_states

LR, LAM, STEPS = 0.05, 0.05, 6
LABELS = {"b": "dense", "w1": "attn", "w2": "mlp"}  # leaves 0, 1, 2 (sorted keys)
ATTN = dict(forward_sparsity=0.8, backward_sparsity=0.5, exploration_l2=LAM)
MLP = dict(forward_sparsity=0.5, backward_sparsity=0.25, exploration_l2=2 * LAM, refresh_every=2)


def _momentum(lr):
    return optax.sgd(lr, momentum=0.9)


def _reference(params, problem, sparse, kwargs, lr, momentum):
    """Reference trajectory with the leaves named in ``sparse`` sparse under ``kwargs``."""
    cfgs = [
        reference.LeafConfig(
            sparse=name in sparse,
            forward_density=1.0 - kwargs.get("forward_sparsity", 0.0),
            backward_density=1.0 - kwargs.get("backward_sparsity", 0.0),
        )
        for name in sorted(params)
    ]
    run = reference.run(
        [np.asarray(p) for p in jax.tree.leaves(params)],
        cfgs,
        problem.grad_np,
        STEPS,
        learning_rate=lr,
        momentum=momentum,
        exploration_l2=kwargs.get("exploration_l2", 0.0),
        refresh_every=kwargs.get("refresh_every", 1),
    )
    return run, cfgs


def _leaf_penalty(ref_params, ref_state, cfgs, i, lam):
    cfg = cfgs[i]
    return reference.penalty(
        ref_params[i], ref_state.a[i], ref_state.b[i], lam, cfg.forward_density
    )


def _assert_leaf_matches(got, ref, i, sparse):
    """Leaf ``i``'s params (and masks, if ``sparse``) at every step equal the reference run."""
    for t, (snap, (ref_params, ref_state)) in enumerate(zip(got, ref, strict=True)):
        np.testing.assert_allclose(
            snap.params[i], ref_params[i], rtol=2e-5, atol=2e-5, err_msg=f"step {t} leaf {i}"
        )
        if sparse:
            np.testing.assert_array_equal(snap.forward[i], ref_state.a[i], f"A step {t} leaf {i}")
            np.testing.assert_array_equal(snap.backward[i], ref_state.b[i], f"B step {t} leaf {i}")
        else:
            assert snap.forward[i] is None and snap.backward[i] is None


def _train(tx, params, loss_fn, num_steps=STEPS):
    """:func:`tk_harness.train`, with the masks in the params' structure (``None`` also on leaves
    no Top-KAST state sees)."""

    @jax.jit
    def step(params, opt_state):
        grads = jax.grad(loss_fn)(tk.forward_params(params, opt_state))
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def snap(params, opt_state):
        masks = tk.get_masks(opt_state, params)
        return tk_harness.Snapshot(
            params=[np.asarray(p) for p in jax.tree.leaves(params)],
            forward=tk_harness.np_leaves(masks.forward),
            backward=tk_harness.np_leaves(masks.backward),
            penalty=float(tk.exploration_penalty(params, opt_state)),
            state=opt_state,
        )

    opt_state = tk_harness.init(tx, params)
    out = [snap(params, opt_state)]
    for _ in range(num_steps):
        params, opt_state = step(params, opt_state)
        out.append(snap(params, opt_state))
    return out


@functools.cache
def _two_groups():
    """Top-KAST per ``multi_transform`` group (attention 80%, MLP 50% sparse) and the plain
    optimizer on the bias: the library's run and a reference run per group."""
    params = tk_harness.make_params(seed=3)
    problem = tk_harness.make_problem(params, seed=4)
    tx = optax.multi_transform(
        {
            "attn": tk.topkast(_momentum(LR), **ATTN),
            "mlp": tk.topkast(_momentum(2 * LR), **MLP),
            "dense": optax.sgd(LR),
        },
        LABELS,
    )
    got = _train(tx, params, problem.loss)
    refs = {
        "attn": _reference(params, problem, {"w1"}, ATTN, LR, 0.9),
        "mlp": _reference(params, problem, {"w2"}, MLP, 2 * LR, 0.9),
        "dense": _reference(params, problem, set(), {}, LR, 0.0),
    }
    return got, refs


def test_two_topkast_groups_in_multi_transform_match_the_reference_per_group():
    got, refs = _two_groups()
    _assert_leaf_matches(got, refs["dense"][0], 0, sparse=False)
    _assert_leaf_matches(got, refs["attn"][0], 1, sparse=True)
    _assert_leaf_matches(got, refs["mlp"][0], 2, sparse=True)
    # The combined penalty is the sum of each group's, with its own λ and D.
    (attn, attn_cfgs), (mlp, mlp_cfgs) = refs["attn"], refs["mlp"]
    for t, snap in enumerate(got):
        want = _leaf_penalty(*attn[t], attn_cfgs, 1, ATTN["exploration_l2"]) + _leaf_penalty(
            *mlp[t], mlp_cfgs, 2, MLP["exploration_l2"]
        )
        np.testing.assert_allclose(snap.penalty, want, rtol=1e-5, atol=1e-7, err_msg=f"step {t}")


def test_combined_helpers_equal_each_state_applied_separately():
    got, _ = _two_groups()
    opt_state = got[-1].state
    params = jax.tree.unflatten(
        jax.tree.structure(LABELS), [jnp.asarray(p) for p in got[-1].params]
    )
    first, second = find_sparse_states(opt_state)
    # Each state alone: its leaves masked, the other group's leaves (MaskedNode to it) unchanged.
    alone = tk.forward_params(tk.forward_params(params, first), second)
    combined = tk.forward_params(params, opt_state)
    for name in LABELS:
        np.testing.assert_array_equal(combined[name], alone[name], err_msg=name)
    np.testing.assert_array_equal(tk.forward_params(params, first)["w2"], params["w2"])
    np.testing.assert_allclose(
        tk.exploration_penalty(params, opt_state),
        tk.exploration_penalty(params, first) + tk.exploration_penalty(params, second),
        rtol=1e-6,
    )
    stats = tk.mask_stats(opt_state)
    parts = [tk.mask_stats(first), tk.mask_stats(second)]
    for part in parts:
        for key, value in part.items():
            if "/" in key:
                np.testing.assert_allclose(stats[key], value, err_msg=key)
    sizes = [params["w1"].size, params["w2"].size]
    for key in ("forward_density", "backward_density"):
        want = sum(p[key] * n for p, n in zip(parts, sizes, strict=True)) / sum(sizes)
        np.testing.assert_allclose(stats[key], want, rtol=1e-6, err_msg=key)
    changes = [p["mask_change"] for p in parts]
    np.testing.assert_allclose(stats["mask_change"], np.mean(changes), rtol=1e-6)
    np.testing.assert_allclose(stats["mask_change_min"], min(changes))
    np.testing.assert_allclose(stats["mask_change_max"], max(changes))
    assert sum(float(c) for c in changes) > 0  # the masks moved: the comparison can fail
    masks = tk.get_masks(opt_state)
    assert isinstance(masks.forward["b"], optax.MaskedNode)  # no Top-KAST state sees it
    assert tk.get_masks(opt_state, params).forward["b"] is None
    for name, state in (("w1", first), ("w2", second)):
        np.testing.assert_array_equal(masks.forward[name], tk.get_masks(state).forward[name])
        np.testing.assert_array_equal(masks.backward[name], tk.get_masks(state).backward[name])


def test_a_leaf_sparse_in_two_states_is_a_clear_error():
    params = tk_harness.make_params(seed=5)
    tx = optax.chain(
        tk.topkast(optax.sgd(LR), forward_sparsity=0.5),
        tk.topkast(optax.sgd(LR), forward_sparsity=0.8),
    )
    state = tk_harness.init(tx, params)
    for helper in (
        lambda: tk.forward_params(params, state),
        lambda: tk.get_masks(state),
        lambda: tk.mask_stats(state),
        lambda: tk.exploration_penalty(params, state),
    ):
        with pytest.raises(ValueError, match="leaf 'w1' is made sparse by two"):
            helper()


def test_states_over_disjoint_sparse_leaves_of_the_whole_tree_combine():
    """Two Top-KASTs in a chain, each seeing every leaf but making a different one sparse."""
    params = tk_harness.make_params(seed=6)
    only = lambda name: {k: k == name for k in params}  # noqa: E731
    tx = optax.chain(
        tk.topkast(optax.sgd(LR), forward_sparsity=0.5, sparsify=only("w1")),
        tk.topkast(optax.sgd(LR), forward_sparsity=0.75, sparsify=only("w2")),
    )
    state = tk_harness.init(tx, params)
    alpha = tk.forward_params(params, state)
    for name, density in (("w1", 0.5), ("w2", 0.25)):
        a, _ = reference.magnitude_masks(np.asarray(params[name]), density, 1.0)
        np.testing.assert_array_equal(alpha[name], np.where(a, params[name], 0.0), err_msg=name)
    np.testing.assert_array_equal(alpha["b"], params["b"])


def test_topkast_around_multi_transform_matches_the_reference_per_group():
    params = tk_harness.make_params(seed=7)
    problem = tk_harness.make_problem(params, seed=8)
    kwargs = dict(forward_sparsity=0.7, backward_sparsity=0.4, exploration_l2=LAM, refresh_every=2)
    inner = optax.multi_transform(
        {"attn": _momentum(LR), "mlp": _momentum(2 * LR), "dense": optax.sgd(LR)}, LABELS
    )
    got = _train(tk.topkast(inner, **kwargs), params, problem.loss)
    both = {"w1", "w2"}
    attn, cfgs = _reference(params, problem, both, kwargs, LR, 0.9)
    mlp, _ = _reference(params, problem, both, kwargs, 2 * LR, 0.9)
    dense, _ = _reference(params, problem, both, kwargs, LR, 0.0)
    _assert_leaf_matches(got, dense, 0, sparse=False)
    _assert_leaf_matches(got, attn, 1, sparse=True)
    _assert_leaf_matches(got, mlp, 2, sparse=True)
    for t, snap in enumerate(got):
        want = _leaf_penalty(*attn[t], cfgs, 1, LAM) + _leaf_penalty(*mlp[t], cfgs, 2, LAM)
        np.testing.assert_allclose(snap.penalty, want, rtol=1e-5, atol=1e-7, err_msg=f"step {t}")
