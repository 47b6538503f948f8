"""Top-KAST with optax's own wrappers: ``optax.multi_transform`` / ``optax.masked`` around it
(several Top-KAST or baseline states, one per group; Flax-boxed params), Top-KAST around
``multi_transform`` and ``optax.contrib.muon``, ``tk.inner_state`` (schedule-free),
``optax.inject_hyperparams``, the placement of ``optax.MultiSteps`` and of clipping.

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
FAST = dict(selection_method="top_k")  # exact like the default, cheaper to compile


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

    @jax.jit
    def observe(params, opt_state):
        return tk.get_masks(opt_state, params), tk.exploration_penalty(params, opt_state)

    def snap(params, opt_state):
        masks, penalty = observe(params, opt_state)
        return tk_harness.Snapshot(
            params=[np.asarray(p) for p in jax.tree.leaves(params)],
            forward=tk_harness.np_leaves(masks.forward),
            backward=tk_harness.np_leaves(masks.backward),
            penalty=float(penalty),
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
        tk.topkast(optax.sgd(LR), forward_sparsity=0.5, **FAST),
        tk.topkast(optax.sgd(LR), forward_sparsity=0.8, **FAST),
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
        tk.topkast(optax.sgd(LR), forward_sparsity=0.5, sparsify=only("w1"), **FAST),
        tk.topkast(optax.sgd(LR), forward_sparsity=0.75, sparsify=only("w2"), **FAST),
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
    got = _train(tk.topkast(inner, **kwargs, **FAST), params, problem.loss)
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


def test_masked_with_a_prefix_mask_around_topkast():
    """``optax.masked`` with a prefix mask: a whole subtree is one ``MaskedNode`` in the state;
    its leaves get the raw gradient as update (what ``masked`` passes through)."""
    flat = tk_harness.make_params(seed=9, shapes={"w1": (6, 5), "w2": (4, 3, 2), "b": (5,)})
    params = {"body": {"w1": flat["w1"], "w2": flat["w2"]}, "head": {"b": flat["b"]}}
    problem = tk_harness.make_problem(params, seed=10)
    kwargs = dict(forward_sparsity=0.6, backward_sparsity=0.3, exploration_l2=LAM)
    tx = optax.masked(tk.topkast(_momentum(LR), **kwargs), {"body": True, "head": False})
    got = _train(tx, params, problem.loss)
    leaves = {"body/w1": 0, "body/w2": 1, "head/b": 2}  # jax.tree.leaves order
    cfgs = [
        reference.LeafConfig(sparse=name != "head/b", forward_density=0.4, backward_density=0.7)
        for name in leaves
    ]
    x0 = [np.asarray(p) for p in jax.tree.leaves(params)]
    sparse = reference.run(
        x0, cfgs, problem.grad_np, STEPS, learning_rate=LR, momentum=0.9, exploration_l2=LAM
    )
    passed = reference.run(x0, cfgs, problem.grad_np, STEPS, learning_rate=-1.0)  # θ + g
    _assert_leaf_matches(got, sparse, 0, sparse=True)
    _assert_leaf_matches(got, sparse, 1, sparse=True)
    _assert_leaf_matches(got, passed, 2, sparse=False)
    state = got[-1].state
    assert isinstance(tk.get_masks(state).forward["head"], optax.MaskedNode)
    stats = tk.mask_stats(state)
    assert {k for k in stats if k.startswith("forward_density/")} == {
        "forward_density/body/w1",
        "forward_density/body/w2",
    }


def _fixed_grads(params, steps, seed=11):
    rng = np.random.default_rng(seed)
    return [
        jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
        for _ in range(steps)
    ]


def _apply(tx, params, grads_list):
    """``[(params, state)]`` after each update of ``tx`` on fixed gradients."""
    state = tk_harness.init(tx, params)
    update = jax.jit(tx.update)
    out = []
    for g in grads_list:
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
        out.append((params, state))
    return out


def test_muon_inside_topkast_with_every_weight_updated_equals_muon():
    """``B`` = every weight and λ = 0: Top-KAST's updates are Muon's on the same gradients;
    ``A`` is the top-k of the new θ."""
    params = tk_harness.make_params(seed=12)
    grads = _fixed_grads(params, 3)
    muon = optax.contrib.muon(0.05)
    got = _apply(tk.topkast(muon, forward_sparsity=0.6, **FAST), params, grads)
    want = _apply(muon, params, grads)
    for (p_got, s_got), (p_want, _) in zip(got, want, strict=True):
        for name in params:
            np.testing.assert_allclose(p_got[name], p_want[name], rtol=1e-6, atol=1e-7)
        for name in ("w1", "w2"):
            a, _ = reference.magnitude_masks(np.asarray(p_got[name]), 0.4, 1.0)
            np.testing.assert_array_equal(tk.get_masks(s_got).forward[name], a)


def test_muon_inside_topkast_keeps_updates_and_moments_zero_outside_b():
    params = tk_harness.make_params(seed=13)
    grads = _fixed_grads(params, 4, seed=14)
    kwargs = dict(forward_sparsity=0.6, backward_sparsity=0.3, exploration_l2=LAM, **FAST)
    tx = tk.topkast(optax.contrib.muon(0.3), **kwargs)
    state = tk_harness.init(tx, params)
    update = jax.jit(tx.update)
    changed = False
    for g in grads:
        b = tk.get_masks(state).backward
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
        # Muon's momentum (w1) and Adam's moments (w2, the 3-D leaf) in its partition.
        found = [
            v
            for key in ("mu", "nu")
            for _, v in optax.tree_utils.tree_get_all_with_path(tk.inner_state(state), key)
        ]
        for name in ("w1", "w2"):
            outside = ~np.asarray(b[name])
            assert not np.any(np.asarray(updates[name])[outside]), name
            moments = [v[name] for v in found if not isinstance(v[name], optax.MaskedNode)]
            assert len(moments) == (1 if name == "w1" else 2)  # Muon's mu; Adam's mu and nu
            for m in moments:
                assert not np.any(np.asarray(m)[outside]), name
        changed |= bool(np.any(np.asarray(tk.get_masks(state).backward["w1"]) != b["w1"]))
    assert changed  # B moved, so a moment left outside B would have been seen


def test_schedule_free_z_restarts_at_theta_outside_b():
    """A sparse ``B``: outside the ``B`` an update uses (the one stored before it), the inner
    state is what ``inner.init(params)`` gives it, so schedule-free's ``z`` equals the current
    ``θ`` there: a weight entering ``B`` starts afresh at its value, not at 0."""
    params = tk_harness.make_params(seed=17)
    grads = _fixed_grads(params, 4, seed=18)
    sf = optax.contrib.schedule_free_sgd(0.1)
    tx = tk.topkast(sf, forward_sparsity=0.75, backward_sparsity=0.5, **FAST)
    backward = tk.get_masks(tk_harness.init(tx, params), params).backward
    checked = 0
    for p, state in _apply(tx, params, grads):
        z = tk.inner_state(state).z
        for name in params:
            if backward[name] is None:
                continue
            outside = ~np.asarray(backward[name])
            got, want = np.asarray(z[name])[outside], np.asarray(p[name])[outside]
            np.testing.assert_array_equal(got, want)
            checked += int(np.count_nonzero(want))
        backward = tk.get_masks(state, p).backward
    assert checked > 0  # nonzero θ outside B: a reset to 0 would have failed


def test_inner_state_gives_schedule_free_its_eval_params():
    """``B`` = every weight, λ = 0: Top-KAST's inner state is schedule-free's own, so its
    evaluation params equal those of schedule-free alone on the same gradients."""
    params = tk_harness.make_params(seed=15)
    grads = _fixed_grads(params, 3, seed=16)
    sf = optax.contrib.schedule_free_sgd(0.1)
    tx = optax.chain(optax.clip_by_global_norm(1e3), tk.topkast(sf, forward_sparsity=0.5, **FAST))
    got = _apply(tx, params, grads)
    want = _apply(optax.chain(optax.clip_by_global_norm(1e3), sf), params, grads)
    for (p_got, s_got), (p_want, s_want) in zip(got, want, strict=True):
        eval_got = optax.contrib.schedule_free_eval_params(tk.inner_state(s_got), p_got)
        eval_want = optax.contrib.schedule_free_eval_params(s_want[1], p_want)
        for name in params:
            np.testing.assert_allclose(eval_got[name], eval_want[name], rtol=1e-6, atol=1e-7)
    for name in params:  # after the first step, x (evaluation) differs from y (training)
        assert not np.allclose(eval_got[name], p_got[name], rtol=1e-3), name
    with pytest.raises(ValueError, match="found 0"):
        tk.inner_state(sf.init(params))
    groups = {
        "attn": tk.topkast(sf, forward_sparsity=0.5, **FAST),
        "mlp": tk.topkast(sf, forward_sparsity=0.5, **FAST),
    }
    two = tk_harness.init(optax.multi_transform({**groups, "dense": sf}, LABELS), params)
    with pytest.raises(ValueError, match="found 2"):
        tk.inner_state(two)


def test_inject_hyperparams_without_static_args_names_them():
    params = tk_harness.make_params(seed=17)
    make = optax.inject_hyperparams(tk.topkast)
    with pytest.raises(ValueError) as err:
        make(optax.sgd(LR), forward_sparsity=0.8, backward_sparsity=0.5).init(params)
    names = ("forward_sparsity", "backward_sparsity", "refresh_every")
    assert f"static_args={names!r}" in str(err.value)
    with pytest.raises(ValueError) as err:
        make(optax.sgd(LR), forward_sparsity=0.8, stop_exploration_step=3).init(params)
    assert "static_args=('forward_sparsity', 'refresh_every', 'stop_exploration_step')" in str(
        err.value
    )
    # The suggested static_args work; exploration_l2 stays injected.
    tx = optax.inject_hyperparams(tk.topkast, static_args=names)(
        optax.sgd(LR), forward_sparsity=0.8, backward_sparsity=0.5, exploration_l2=LAM
    )
    state = tk_harness.init(tx, params)
    assert set(state.hyperparams) == {"exploration_l2", "seed"}
    jax.jit(tx.update)(params, state, params)


def _count_refreshes(monkeypatch):
    """Counts every selection of ``A`` and ``B`` that runs (a callback in the selection)."""
    from topkast_jax import transform

    calls = []
    select = transform.select_sets

    def counted(*args, **kwargs):
        jax.debug.callback(lambda: calls.append(1))
        return select(*args, **kwargs)

    monkeypatch.setattr(transform, "select_sets", counted)
    return calls


@pytest.mark.parametrize(
    "placement, selections, refreshes",
    [("multisteps_outside", 9, 3), ("multisteps_outside_refresh_masks", 3, 3), ("inside", 9, 9)],
)
def test_multisteps_placement_and_refresh_count(monkeypatch, placement, selections, refreshes):
    """3 optimizer steps of 3 micro-steps.  ``MultiSteps(topkast(...))`` keeps one refresh per
    optimizer step (count 3), but optax's MultiSteps computes its inner update at every
    micro-step and keeps it at the last: the selection runs 9 times, unless the loop passes
    ``refresh_masks`` (3 times).  ``topkast(MultiSteps(...))`` refreshes at every micro-step (count
    9, ``refresh_every`` in micro-steps).  The masks and params agree in all three."""
    params = tk_harness.make_params(seed=18)
    kwargs = dict(forward_sparsity=0.8, backward_sparsity=0.5, exploration_l2=LAM, **FAST)
    if placement == "inside":
        tx = tk.topkast(optax.MultiSteps(_momentum(LR), every_k_schedule=3), **kwargs)
    else:
        tx = optax.MultiSteps(tk.topkast(_momentum(LR), **kwargs), every_k_schedule=3)
    calls = _count_refreshes(monkeypatch)
    state = tk_harness.init(tx, params)
    jax.effects_barrier()
    calls.clear()  # the selection at init
    update = jax.jit(tx.update, static_argnames="refresh_masks")
    for i, g in enumerate(_fixed_grads(params, 9, seed=19)):
        extra = {"refresh_masks": i % 3 == 2} if placement.endswith("refresh_masks") else {}
        updates, state = update(g, state, params, **extra)
        params = optax.apply_updates(params, updates)
    jax.effects_barrier()
    assert len(calls) == selections
    assert int(tk.find_sparse_state(state).count) == refreshes
    _MULTISTEPS_RESULTS[placement] = (params, tk.get_masks(state))
    if len(_MULTISTEPS_RESULTS) == 3:
        (p0, m0), *others = _MULTISTEPS_RESULTS.values()
        for p, m in others:
            for name in params:
                np.testing.assert_allclose(p[name], p0[name], rtol=1e-6, atol=1e-7)
            for name in ("w1", "w2"):
                np.testing.assert_array_equal(m.forward[name], m0.forward[name])


_MULTISTEPS_RESULTS: dict = {}


def test_clipping_inside_topkast_measures_the_norm_of_what_is_applied():
    """``topkast(chain(clip, sgd))`` clips the masked gradient: the update's norm is
    ``lr * max_norm``; ``chain(clip, topkast(sgd))`` clips the dense gradient, then drops the
    part outside ``B``, so the applied step is shorter."""
    params = {"w": jnp.asarray(np.random.default_rng(20).normal(size=(8, 8)), jnp.float32)}
    grads = {"w": jnp.full((8, 8), 10.0)}
    kwargs = dict(forward_sparsity=0.75, backward_sparsity=0.5, **FAST)
    clip = optax.clip_by_global_norm(1.0)
    inside = tk.topkast(optax.chain(clip, optax.sgd(1.0)), **kwargs)
    outside = optax.chain(clip, tk.topkast(optax.sgd(1.0), **kwargs))
    norms = [
        float(optax.tree.norm(jax.jit(tx.update)(grads, tk_harness.init(tx, params), params)[0]))
        for tx in (inside, outside)
    ]
    np.testing.assert_allclose(norms, [1.0, np.sqrt(0.5)], rtol=1e-5)  # B: half the weights


def test_baseline_states_in_multi_transform_combine():
    """The baselines' states (bool masks) combine like Top-KAST's: a static sparse mask per
    group."""
    params = tk_harness.make_params(seed=21)
    static = functools.partial(tk.baselines.static_sparse, sparsity=0.5)
    groups = {"attn": static(_momentum(LR)), "mlp": static(optax.sgd(LR)), "dense": optax.sgd(LR)}
    tx = optax.multi_transform(groups, LABELS)
    [(params, state)] = _apply(tx, params, _fixed_grads(params, 1, seed=22))
    masks = tk.get_masks(state, params)
    alpha = tk.forward_params(params, state)
    assert masks.forward["b"] is None
    np.testing.assert_array_equal(alpha["b"], params["b"])
    for name in ("w1", "w2"):
        m = np.asarray(masks.forward[name])
        assert m.sum() == reference.round_half_up(0.5 * m.size), name
        np.testing.assert_array_equal(alpha[name], np.where(m, params[name], 0.0))
    assert float(tk.exploration_penalty(params, state)) == 0.0
    assert float(tk.mask_stats(state)["forward_density"]) == 0.5  # 15 of 30 and 12 of 24


def test_tree_helpers_on_masked_nodes():
    """``cover`` puts the params' structure back under ``MaskedNode`` (one leaf or a subtree);
    ``sparse_leaves`` refuses trees that do not align instead of pairing the wrong leaves."""
    from topkast_jax.tree import cover, sparse_leaves

    params = {"a": {"x": jnp.ones(2), "y": jnp.ones(3)}, "b": jnp.ones((2, 2))}
    masks = {"a": optax.MaskedNode(), "b": jnp.eye(2, dtype=bool)}
    covered = cover(masks, params)
    assert covered["a"] == {"x": None, "y": None}
    assert covered["b"] is masks["b"]
    assert [name for name, *_ in sparse_leaves(covered, params)] == ["b"]
    with pytest.raises(ValueError, match="do not align"):
        sparse_leaves(masks, params)


def test_groups_of_boxed_linen_params_keep_their_layer_axis():
    """nanodo's layout: ``nn.Partitioned`` params, a scan stack named ``"layers"`` in one group.
    Each group's Top-KAST selects per slice (found from the box inside ``multi_transform``)."""
    nn = pytest.importorskip("flax.linen")
    rng = np.random.default_rng(23)

    def boxed(shape, names):
        return nn.Partitioned(jnp.asarray(rng.normal(size=shape), jnp.float32), names)

    params = {
        "attn": {"kernel": boxed((3, 6, 5), ("layers", None, None))},
        "mlp": {"bias": boxed((4,), (None,)), "kernel": boxed((6, 4), (None, None))},
    }
    groups = {
        "a": tk.topkast(optax.sgd(LR), forward_sparsity=0.8, backward_sparsity=0.4, **FAST),
        "m": tk.topkast(optax.sgd(LR), forward_sparsity=0.5, **FAST),
    }
    tx = optax.multi_transform(groups, {"attn": "a", "mlp": "m"})
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    [(params, state)] = _apply(tx, params, [grads])
    theta = nn.unbox(params)
    masks = nn.unbox(tk.get_masks(state, params))
    alpha = nn.unbox(tk.forward_params(params, state))
    for group, density, backward, axis in (("attn", 0.2, 0.6, 0), ("mlp", 0.5, 1.0, None)):
        a, b = reference.slice_masks(np.asarray(theta[group]["kernel"]), axis, density, backward)
        np.testing.assert_array_equal(masks.forward[group]["kernel"], a, err_msg=group)
        np.testing.assert_array_equal(masks.backward[group]["kernel"], b, err_msg=group)
        np.testing.assert_array_equal(
            alpha[group]["kernel"], np.where(a, theta[group]["kernel"], 0.0), err_msg=group
        )
    np.testing.assert_array_equal(alpha["mlp"]["bias"], theta["mlp"]["bias"])
    stats = tk.mask_stats(state)
    per_layer = [stats[f"forward_density/attn/kernel/{i}"] for i in range(3)]
    np.testing.assert_allclose(per_layer, 0.2, rtol=1e-6)  # 6 of 30 in every layer
