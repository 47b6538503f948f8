"""N:M structured Top-KAST (issue 12; an extension of the paper's method) against the numpy
reference ``reference.nm_masks``: the selection, the invariants, one jitted trajectory, errors."""

import os
import subprocess
import sys

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference
import tk_harness
from hypothesis import given, settings
from hypothesis import strategies as st

import topkast_jax as tk

#: "b" is dense under the default sparsify; kernels' axis -2 has lengths 8 and 4.
SHAPES = {"b": (5,), "w1": (8, 5), "w2": (3, 4, 2)}


def _nm_configs(params, n, n_b, m, axis=None):
    """Reference leaf configs: N:M on leaves of rank >= 2 along ``axis`` (default -2)."""
    cfgs = []
    for p in jax.tree.leaves(params):
        sparse = np.ndim(p) >= 2
        ax = (np.ndim(p) - 2 if axis is None else axis % np.ndim(p)) if sparse else None
        cfgs.append(
            reference.LeafConfig(
                sparse=sparse,
                forward_density=n / m,
                backward_density=n_b / m,
                nm=(n, n_b, m, ax) if sparse else None,
            )
        )
    return cfgs


def _sets(x, structure):
    """``(A, B)`` as numpy bool arrays of one leaf ``x`` through ``tk.topkast``'s init."""
    tx = tk.topkast(optax.sgd(0.1), structure=structure, sparsify=lambda p: True)
    masks = tk.get_masks(tk_harness.init(tx, jnp.asarray(x)))
    return np.asarray(masks.forward), np.asarray(masks.backward)


@pytest.mark.parametrize(
    "shape, structure, axis",
    [
        ((8, 6), tk.NM(2, 4, n_backward=3), 0),  # Dense [in, out]: default axis -2 = in
        ((3, 3, 8, 4), tk.NM(1, 4, n_backward=2), 2),  # HWIO conv: input channels
        ((4, 16), tk.NM(2, 8, axis=-1), 1),  # explicit axis; n_backward=None: B everything
        ((12,), tk.NM(1, 3, n_backward=2), 0),  # vector: axis 0
    ],
)
def test_sets_equal_reference(shape, structure, axis):
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    a, b = _sets(x, structure)
    want_a, want_b = reference.nm_masks(x, structure.n, structure.n_b, structure.m, axis)
    np.testing.assert_array_equal(a, want_a)
    np.testing.assert_array_equal(b, want_b)
    assert a.sum() == x.size * structure.n // structure.m
    assert b.sum() == x.size * structure.n_b // structure.m


def test_ties_go_to_the_lower_index_and_nan_ranks_as_zero():
    x = np.ones((8, 2), np.float32)  # all tied: rows 0, 1 (A) and 2 (B) of each group of 4
    x[5, 1] = np.nan  # NaN ranks as magnitude 0, below the tied ones
    x[1, 0] = -1.0  # sign is ignored: still tied
    a, b = _sets(x, tk.NM(2, 4, n_backward=3))
    np.testing.assert_array_equal(np.nonzero(a[:, 0])[0], [0, 1, 4, 5])
    np.testing.assert_array_equal(np.nonzero(b[:, 0])[0], [0, 1, 2, 4, 5, 6])
    np.testing.assert_array_equal(np.nonzero(a[:, 1])[0], [0, 1, 4, 6])
    np.testing.assert_array_equal(np.nonzero(b[:, 1])[0], [0, 1, 2, 4, 6, 7])


@st.composite
def _cases(draw):
    m = draw(st.sampled_from([1, 2, 3, 4, 8]))
    n = draw(st.integers(1, m))
    n_b = draw(st.integers(n, m))
    # One shape (24 is a multiple of every m): one compilation per (n, n_B, m).  Few distinct
    # magnitudes (many ties), both signs, zeros.
    x = draw(hnp.arrays(np.float32, (24, 2), elements=st.sampled_from([0, 1, -1, 2.5])))
    return x, n, n_b, m


_NM_CODES = jax.jit(tk.nm.nm_codes, static_argnums=1)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(case=_cases())
def test_every_group_holds_exactly_n_in_a_and_n_b_in_b(case):
    x, n, n_b, m = case
    code = np.asarray(_NM_CODES(jnp.asarray(x), tk.nm.LeafNM(n, n_b, m, 0)))
    a, b = code == 3, (code & 1) == 1
    assert set(np.unique(code)) <= {0, 1, 3}  # A ⊆ B: code 2 never occurs
    per_group = lambda mask: mask.reshape(-1, m, mask.shape[1]).sum(axis=1)  # noqa: E731
    assert (per_group(a) == n).all() and (per_group(b) == n_b).all()
    want_a, want_b = reference.nm_masks(x, n, n_b, m, 0)
    np.testing.assert_array_equal(a, want_a)
    np.testing.assert_array_equal(b, want_b)


_PARAMS = tk_harness.make_params(seed=2, shapes=SHAPES)
_TX = tk.topkast(
    optax.sgd(0.1, momentum=0.9), structure=tk.NM(1, 4, n_backward=2), exploration_l2=0.1
)
_UPDATE = jax.jit(_TX.update)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16))
def test_nothing_outside_b_moves_and_sets_stay_structured(seed):
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), _PARAMS)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), _PARAMS)
    state = tk_harness.init(_TX, params)
    backward = tk.get_masks(state).backward
    updates, state = _UPDATE(grads, state, params)
    for name in ("w1", "w2"):
        outside = ~np.asarray(backward[name])
        assert not np.asarray(updates[name])[outside].any()
        new = np.asarray(optax.apply_updates(params, updates)[name])
        a, b = reference.nm_masks(new, 1, 2, 4, new.ndim - 2)
        masks = tk.get_masks(state)
        np.testing.assert_array_equal(np.asarray(masks.forward[name]), a)
        np.testing.assert_array_equal(np.asarray(masks.backward[name]), b)


@pytest.mark.parametrize(
    "structure, refresh_every, stop",
    [
        (tk.NM(2, 4, n_backward=3), 1, None),
        (tk.NM(1, 4, n_backward=2), 3, None),
        (tk.NM(2, 4), 1, 4),  # dense B, then B = A from step 4 (stop-exploration ablation)
    ],
)
def test_trajectory_matches_reference(structure, refresh_every, stop):
    params = tk_harness.make_params(seed=0, shapes=SHAPES)
    problem = tk_harness.make_problem(params, seed=1)
    lam, lr, steps = 0.05, 0.05, 8
    tx = tk.topkast(
        optax.sgd(lr, momentum=0.9),
        structure=structure,
        exploration_l2=lam,
        refresh_every=refresh_every,
        stop_exploration_step=stop,
        track_reservoir=True,
    )
    got = tk_harness.train(tx, params, problem.loss, steps)
    cfgs = _nm_configs(params, structure.n, structure.n_b, structure.m)
    want = reference.run(
        [np.asarray(p) for p in jax.tree.leaves(params)],
        cfgs,
        problem.grad_np,
        steps,
        learning_rate=lr,
        momentum=0.9,
        exploration_l2=lam,
        refresh_every=refresh_every,
        stop_exploration_step=stop,
    )
    tk_harness.assert_matches_reference(got, want, cfgs, {"exploration_l2": lam}, stop)
    moved = any(not np.array_equal(s.forward[1], got[0].forward[1]) for s in got[1:])
    assert moved, "A never changed: the trajectory does not exercise refreshes"
    stats = tk.mask_stats(got[-1].state)
    np.testing.assert_allclose(stats["forward_density"], structure.n / structure.m)
    want_b = structure.n / structure.m if stop is not None else structure.n_b / structure.m
    np.testing.assert_allclose(stats["backward_density"], want_b)
    ever = sum(int(np.sum(r.reservoir[i] & r.ever_in_a[i])) for r in [want[-1][1]] for i in (1, 2))
    reservoir = sum(int(np.sum(want[-1][1].reservoir[i])) for i in (1, 2))
    if reservoir:
        np.testing.assert_allclose(stats["reservoir_activated"], ever / reservoir, rtol=1e-6)


def test_structure_is_static_in_the_state_and_layer_axis_slices_are_counted():
    params = tk_harness.make_params(seed=0, shapes=SHAPES)
    tx = tk.topkast(optax.adam(1e-3), structure=tk.NM(2, 4, n_backward=3), layer_axis={
        "b": None, "w1": None, "w2": 0})  # fmt: skip
    state = tk_harness.init(tx, params)
    found = tk.nm.structures(optax.chain(optax.identity()).init(params) + (state,))
    assert found == {"b": None, "w1": tk.nm.LeafNM(2, 3, 4, 0), "w2": tk.nm.LeafNM(2, 3, 4, 1)}
    stats = tk.mask_stats(state)
    for i in range(3):
        np.testing.assert_allclose(stats[f"forward_density/w2/{i}"], 0.5)
        np.testing.assert_allclose(stats[f"backward_density/w2/{i}"], 0.75)
    plain = tk_harness.init(tk.topkast(optax.sgd(0.1), forward_sparsity=0.5), params)
    assert tk.nm.structures(plain) == {"b": None, "w1": None, "w2": None}


@pytest.mark.parametrize(
    "text, want",
    [
        ("2:4", tk.NM(2, 4)),
        ("2:4/3:4", tk.NM(2, 4, n_backward=3)),
        (" 1 : 8 / 2 : 8 ", tk.NM(1, 8, n_backward=2)),
    ],
)
def test_parse(text, want):
    got = tk.NM.parse(text)
    assert got == want
    assert tk.NM.parse(str(got)) == tk.NM(want.n, want.m, n_backward=want.n_b)


@pytest.mark.parametrize(
    "text, match",
    [
        ("2/4", "'n:m' or 'n:m/n_B:m'"),
        ("2:4/3:8", "share the group size"),
        ("5:4", "n must be in"),
        ("2:4/1:4", "n_backward must be in"),
        ("1:64", "m must be in"),
    ],
)
def test_parse_errors(text, match):
    with pytest.raises(ValueError, match=match):
        tk.NM.parse(text)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(forward_sparsity=0.8), "forward_sparsity=0.8 conflicts with structure=2:4/3:4"),
        (dict(backward_sparsity=0.0), "backward_sparsity=0.0 conflicts"),
        (dict(global_topk=True), "global_topk=True is not supported with structure"),
        (dict(distribution="erk"), "distribution='erk' is not supported"),
        (dict(backward_selection="random"), "backward_selection='random' is not supported"),
        (dict(selection_method="sort"), "selection_method='sort' is not supported"),
    ],
)
def test_conflicting_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tk.topkast(optax.sgd(0.1), structure=tk.NM(2, 4, n_backward=3), **kwargs)


def test_consistent_sparsities_and_missing_forward_sparsity():
    tk.topkast(optax.sgd(0.1), structure=tk.NM(2, 4, n_backward=3), forward_sparsity=0.5,
               backward_sparsity=0.25)  # fmt: skip
    with pytest.raises(ValueError, match="forward_sparsity is required"):
        tk.topkast(optax.sgd(0.1))
    with pytest.raises(ValueError, match="structure must be tk.NM"):
        tk.topkast(optax.sgd(0.1), structure="2:4")
    with pytest.raises(ValueError, match="NM: axis must be an int, None, or a pytree"):
        tk.NM(2, 4, axis="in")


def test_structures_join_several_sparse_states():
    params = {"a": jnp.ones((8, 4)), "b": jnp.ones((8, 4)), "c": jnp.ones((8, 4))}
    tx = optax.multi_transform(
        {
            "a": tk.topkast(optax.sgd(0.1), forward_sparsity=0.5),
            "b": tk.topkast(optax.sgd(0.1), structure=tk.NM(2, 4, n_backward=3)),
            "c": optax.sgd(0.1),
        },
        {"a": "a", "b": "b", "c": "c"},
    )
    got = tk.nm.structures(tx.init(params))
    assert got["a"] is None
    assert got["b"] == tk.nm.LeafNM(n=2, n_backward=3, m=4, axis=0)
    assert isinstance(got["c"], optax.MaskedNode)


def test_always_sparse_refuses_a_structure():
    with pytest.raises(ValueError, match="not supported by AlwaysSparse"):
        tk.AlwaysSparse(optax.sgd(0.1), forward_sparsity=0.5, structure=tk.NM(2, 4))


def test_per_leaf_axis_as_pytree_or_callable():
    """An embedding grouped along its features (axis -1), the kernel by the default rule."""
    rng = np.random.default_rng(0)
    params = {"emb": jnp.asarray(rng.normal(size=(6, 8)), jnp.float32),
              "w": jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)}  # fmt: skip
    for axis in ({"emb": -1, "w": None}, lambda p: {"emb": -1, "w": None}):
        tx = tk.topkast(optax.sgd(0.1), structure=tk.NM(1, 4, axis=axis, n_backward=2))
        state = tk_harness.init(tx, params)
        assert tk.nm.structures(state) == {
            "emb": tk.nm.LeafNM(1, 2, 4, 1), "w": tk.nm.LeafNM(1, 2, 4, 0)}  # fmt: skip
        masks = tk.get_masks(state)
        for name, ax in (("emb", 1), ("w", 0)):
            a, b = reference.nm_masks(np.asarray(params[name]), 1, 2, 4, ax)
            np.testing.assert_array_equal(np.asarray(masks.forward[name]), a)
            np.testing.assert_array_equal(np.asarray(masks.backward[name]), b)
    bad = {"w": 0}
    with pytest.raises(ValueError, match="NM: axis must be an int, None, or a pytree"):
        tk.topkast(optax.sgd(0.1), structure=tk.NM(1, 4, axis=bad)).init(params)
    with pytest.raises(ValueError, match="the axis of leaf 'emb' must be an int or None"):
        tx = tk.topkast(optax.sgd(0.1), structure=tk.NM(1, 4, axis={"emb": 1.0, "w": None}))
        tx.init(params)


@pytest.mark.parametrize(
    "shape, structure, layer_axis, match",
    [
        ((6, 5), tk.NM(2, 4), None, r"leaf 'w' of shape \(6, 5\) has length 6 along axis 0"),
        ((8, 5), tk.NM(2, 4, axis=3), None, "axis 3 is out of range for leaf 'w'"),
        ((4, 8, 5), tk.NM(2, 4, axis=0), 0, "group axis 0 of leaf 'w' is its layer axis"),
    ],
)
def test_bad_leaves_are_named(shape, structure, layer_axis, match):
    tx = tk.topkast(optax.sgd(0.1), structure=structure, layer_axis=layer_axis)
    with pytest.raises(ValueError, match=match):
        tx.init({"w": jnp.ones(shape)})


_SHARDED_SCRIPT = """
import jax, numpy as np, optax, topkast_jax as tk
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
tx = tk.topkast(optax.sgd(0.1), structure=tk.NM(2, 4, n_backward=3), exploration_l2=0.01)
step = jax.jit(lambda g, s, x: tx.update(g, s, x))
mesh = jax.make_mesh((4,), ("d",), axis_types=(AxisType.Explicit,))
def run(x):
    state = jax.jit(tx.init)(x)
    updates, state = step(jax.tree.map(lambda p: p * 0 + 1.0, x), state, x)
    masks = tk.get_masks(state)
    return [np.asarray(a) for a in jax.tree.leaves((updates, masks))]
# (8, 32) along axis 0 on 4 devices: 2 rows a shard, the groups of 4 straddle devices.
for shape, spec in (((8, 32), P("d", None)), ((64, 32), P("d", None)), ((64, 32), P(None, "d"))):
    x = {"w": jax.random.normal(jax.random.key(0), shape)}
    want = run(x)
    with jax.set_mesh(mesh):
        got = run(jax.device_put(x, NamedSharding(mesh, spec)))
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True)), (shape, spec)
print("ok")
"""


def test_explicitly_sharded_leaves_select_as_one_device():
    """4 host devices, explicit mesh axes: the sets and the update of a leaf sharded along its
    group axis (whole groups per shard, or groups straddling shards) or along the other axis
    equal the unsharded leaf's."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run(
        [sys.executable, "-c", _SHARDED_SCRIPT], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr
