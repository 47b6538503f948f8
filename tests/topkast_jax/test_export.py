"""Compact export (issue 12): ``θ ⊙ A`` as values + bitmap or values + flat indices, saved and
loaded through orbax, densified bit for bit, and run as BCOO through ``sparse.sparsify``."""

from __future__ import annotations

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental import sparse

import topkast_jax as tk
from topkast_jax import export
from topkast_jax import nm as nm_lib

#: lax.top_k selects the same sets as the default (exact, ties to the lower index) and compiles
#: in a fraction of the time on these small leaves.
FAST = {"selection_method": "top_k"}
UNSTRUCTURED = ("bitmap", "indices")


def _params(seed: int = 0) -> dict:
    """A Dense kernel with -0.0 and exact ties, a conv kernel, a bfloat16 kernel, a bias."""
    rng = np.random.default_rng(seed)
    kernel = rng.normal(size=(12, 10)).astype(np.float32)
    kernel[0, :4] = -0.0
    kernel[1, :6] = 2.5  # ties across the threshold
    return {
        "Dense_0": {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(rng.normal(size=10))},
        "Conv_0": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)},
        "Half_0": {"kernel": jnp.asarray(rng.normal(size=(8, 6)), jnp.bfloat16)},
    }


def _bits(tree) -> list[np.ndarray]:
    """Every leaf as its raw bytes (so -0.0 and +0.0 differ)."""
    return [np.ascontiguousarray(x).view(np.uint8) for x in jax.tree.leaves(tree)]


def _assert_bitwise(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y, ax, ay in zip(
        _bits(a), _bits(b), jax.tree.leaves(a), jax.tree.leaves(b), strict=True
    ):
        assert np.asarray(ax).dtype == np.asarray(ay).dtype
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def trained():
    tx = tk.topkast(optax.sgd(0.1), forward_sparsity=0.8, backward_sparsity=0.5, **FAST)
    params = _params()
    return params, tx.init(params)


@pytest.mark.parametrize("layout", UNSTRUCTURED)
def test_round_trip_is_bitwise(trained, tmp_path, layout):
    """export -> save -> load -> densify == θ ⊙ A (forward_params) bit for bit; dense leaves
    come back unchanged; the compact arrays are the numpy reference's."""
    params, state = trained
    alpha = tk.forward_params(params, state)
    exported = export.sparse_params(params, state, layout=layout)
    forward = tk.get_masks(state).forward
    for name in ("Dense_0", "Conv_0", "Half_0"):
        leaf, a = exported[name]["kernel"], np.asarray(forward[name]["kernel"]).reshape(-1)
        theta = np.asarray(params[name]["kernel"]).reshape(-1)
        np.testing.assert_array_equal(leaf.values.view(np.uint8), theta[a].view(np.uint8))
        if layout == "bitmap":
            np.testing.assert_array_equal(leaf.bitmap, np.packbits(a, bitorder="little"))
        else:
            np.testing.assert_array_equal(leaf.indices, np.flatnonzero(a))
            assert leaf.indices.dtype == np.int32
    assert exported["Dense_0"]["bias"] is params["Dense_0"]["bias"]
    export.save(str(tmp_path / "export"), exported)
    loaded = export.load(str(tmp_path / "export"), like=params)
    _assert_bitwise(export.densify(loaded), alpha)
    _assert_bitwise(export.densify(export.load(str(tmp_path / "export"))), alpha)


def test_bcoo_runs_and_equals_dense(trained):
    """to_bcoo: BCOO leaves whose todense is θ ⊙ A, and a matmul through sparse.sparsify that
    equals the dense one."""
    params, state = trained
    alpha = tk.forward_params(params, state)
    bcoo = export.to_bcoo(export.sparse_params(params, state))
    kernel = bcoo["Dense_0"]["kernel"]
    assert isinstance(kernel, sparse.BCOO) and kernel.nse == int(
        np.sum(tk.get_masks(state).forward["Dense_0"]["kernel"])
    )
    _assert_bitwise(
        jax.tree.map(
            lambda x: x.todense() if isinstance(x, sparse.BCOO) else x,
            bcoo,
            is_leaf=lambda x: isinstance(x, sparse.BCOO),
        ),
        alpha,
    )
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 12))
    got = sparse.sparsify(lambda w, x: x @ w)(kernel, x)
    np.testing.assert_allclose(got, x @ alpha["Dense_0"]["kernel"], rtol=1e-6, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    theta=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=1, max_dims=3, max_side=9),
        elements=st.floats(-4, 4, width=32),
    ),
    data=st.data(),
    layout=st.sampled_from(UNSTRUCTURED),
)
def test_compact_leaf_property(theta, data, layout):
    """For any leaf and mask: densify(compact) == where(A, θ, +0) bitwise, k values stored,
    the bitmap layout ⌈n/8⌉ bytes of support, the index layout 4k."""
    mask = data.draw(hnp.arrays(np.bool_, theta.shape))
    leaf = export._leaf_from_mask(theta, mask, "w", layout)
    expected = np.where(mask, theta, np.float32(0))
    np.testing.assert_array_equal(
        np.asarray(export.densify(leaf)).view(np.uint8), expected.view(np.uint8)
    )
    assert leaf.values.shape == (int(mask.sum()),)
    support = export.nbytes(leaf) - leaf.values.nbytes
    assert support == (-(-theta.size // 8) if layout == "bitmap" else 4 * int(mask.sum()))


def test_stacked_leaf(tmp_path):
    """A layer-axis stack (per-slice top-k) exports as one leaf over all its slices."""
    rng = np.random.default_rng(1)
    params = {"stack": jnp.asarray(rng.normal(size=(3, 8, 5)), jnp.float32), "w": jnp.ones((4, 4))}
    tx = tk.topkast(
        optax.sgd(0.1),
        forward_sparsity=0.75,
        backward_sparsity=0.5,
        layer_axis={"stack": 0, "w": None},
        **FAST,
    )
    state = tx.init(params)
    exported = export.sparse_params(params, state)
    assert exported["stack"].shape == (3, 8, 5) and exported["stack"].values.shape == (30,)
    export.save(str(tmp_path / "e"), exported)
    _assert_bitwise(
        export.densify(export.load(str(tmp_path / "e"), like=params)),
        tk.forward_params(params, state),
    )


def test_several_sparse_states():
    """Top-KAST per optax.multi_transform group (two sparsities, one 2:4 group): each leaf
    exported by the state that makes it sparse, with its own layout."""
    rng = np.random.default_rng(5)
    params = {
        "a": {"kernel": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)},
        "b": {"kernel": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)},
    }
    tx = optax.multi_transform(
        {
            "a": tk.topkast(optax.sgd(0.1), forward_sparsity=0.75, backward_sparsity=0.5, **FAST),
            "b": tk.topkast(optax.sgd(0.1), structure=tk.NM(2, 4)),
        },
        {"a": "a", "b": "b"},
    )
    state = tx.init(params)
    exported = export.sparse_params(params, state)
    assert isinstance(exported["a"]["kernel"], export.BitmapLeaf)
    assert isinstance(exported["b"]["kernel"], export.NMLeaf)
    _assert_bitwise(export.densify(exported), tk.forward_params(params, state))


def test_always_sparse_state():
    """An AlwaysSparseState exports from its B-state: the same θ ⊙ A as its forward_params."""
    params = _params(2)
    params = {k: v for k, v in params.items() if k != "Half_0"}
    sparse_tx = tk.AlwaysSparse(optax.sgd(0.1), forward_sparsity=0.8, backward_sparsity=0.5)
    state = sparse_tx.init(params)
    x = jnp.ones((2, 12))
    step = sparse_tx.make_step(
        lambda p, x: (
            jnp.sum((x @ p["Dense_0"]["kernel"]) ** 2) + jnp.sum(p["Conv_0"]["kernel"] ** 2)
        )
    )
    state, _ = step(state, x)
    _assert_bitwise(export.densify(export.sparse_params(state)), sparse_tx.forward_params(state))


def test_sizes_smaller_than_dense(tmp_path):
    """At 80/90/95% forward sparsity the export is smaller than the dense θ ⊙ A in memory
    (bitmap < indices < dense) and, at 90%, on disk against orbax's (compressed) dense save."""
    rng = np.random.default_rng(3)
    params = {"kernel": jnp.asarray(rng.normal(size=(256, 256)), jnp.float32)}
    dense_bytes = 256 * 256 * 4
    for s in (0.8, 0.9, 0.95):
        tx = tk.topkast(optax.sgd(0.1), forward_sparsity=s, backward_sparsity=s / 2, **FAST)
        state = tx.init(params)
        bitmap = export.nbytes(export.sparse_params(params, state))
        indices = export.nbytes(export.sparse_params(params, state, layout="indices"))
        k = round((1 - s) * 256 * 256)
        assert bitmap == 4 * k + 256 * 256 // 8 < indices == 8 * k < dense_bytes
    export.save(str(tmp_path / "e"), export.sparse_params(params, state))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(str(tmp_path / "dense"), jax.device_get(tk.forward_params(params, state)))
    checkpointer.wait_until_finished()
    checkpointer.close()
    assert export.disk_bytes(str(tmp_path / "e")) < export.disk_bytes(str(tmp_path / "dense"))


def test_errors(trained, tmp_path):
    params, state = trained
    with pytest.raises(ValueError, match="must contain a sparse-training state"):
        export.sparse_params(params, optax.sgd(0.1).init(params))
    with pytest.raises(ValueError, match="needs opt_state"):
        export.sparse_params(params)
    with pytest.raises(ValueError, match="layout"):
        export.sparse_params(params, state, layout="csr")
    wrong = jax.tree.map(lambda p: p, params)
    wrong["Conv_0"] = {"kernel": jnp.zeros((3, 3, 4, 2))}
    with pytest.raises(ValueError, match="Conv_0/kernel"):
        export.sparse_params(wrong, state)
    with pytest.raises(ValueError, match="structure"):
        export.sparse_params({"Dense_0": params["Dense_0"]}, state)
    with pytest.raises(FileNotFoundError, match="no export at path"):
        export.load(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="export.json"):
        export.load(str(tmp_path / "empty"))
    path = str(tmp_path / "e")
    export.save(path, export.sparse_params(params, state))
    with pytest.raises(FileExistsError, match="exists"):
        export.save(path, export.sparse_params(params, state))
    with pytest.raises(ValueError, match="'Conv_0/kernel' has shape"):
        export.load(path, like=wrong)
    with pytest.raises(ValueError, match="missing leaves"):
        export.load(path, like={**params, "Extra": {"kernel": jnp.zeros(2)}})


def test_docstring_example():
    """The module docstring's example runs as written."""
    import doctest

    assert doctest.testmod(export).failed == 0


def _nm_reference(theta: np.ndarray, mask: np.ndarray, n: int, m: int, axis: int):
    """Loops: the kept values and positions of every group, group axis shortened m -> n."""
    t, a = np.moveaxis(theta, axis, 0), np.moveaxis(mask, axis, 0)
    values = np.zeros((t.shape[0] // m * n, *t.shape[1:]), theta.dtype)
    positions = np.zeros(values.shape, np.int64)
    for rest in np.ndindex(*t.shape[1:]):
        for g in range(t.shape[0] // m):
            kept = [p for p in range(m) if a[(g * m + p, *rest)]]
            assert len(kept) == n
            for j, p in enumerate(kept):
                values[(g * n + j, *rest)] = t[(g * m + p, *rest)]
                positions[(g * n + j, *rest)] = p
    return np.moveaxis(values, 0, axis), np.moveaxis(positions, 0, axis)


@settings(max_examples=20, deadline=None)
@given(
    nm=st.sampled_from([(2, 4), (1, 4), (2, 8), (3, 8), (1, 2), (4, 4)]),
    rest=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    groups=st.integers(1, 3),
    data=st.data(),
)
def test_nm_leaf_property(nm, rest, groups, data):
    """Any n:m mask along any axis: the values and positions equal a loop reference, positions
    take ⌈log2 m⌉ bits each, and densify == where(A, θ, +0) bitwise."""
    n, m = nm
    axis = data.draw(st.integers(0, len(rest)))
    shape = (*rest[:axis], groups * m, *rest[axis:])
    theta = data.draw(hnp.arrays(np.float32, shape, elements=st.floats(-4, 4, width=32)))
    keys = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1))).random(shape)
    grouped = np.moveaxis(keys.reshape(*shape[:axis], groups, m, *shape[axis + 1 :]), axis + 1, -1)
    rank = np.argsort(np.argsort(grouped, axis=-1), axis=-1)
    mask = np.moveaxis(rank < n, -1, axis + 1).reshape(shape)
    leaf = export._nm_leaf(theta, mask, nm_lib.LeafNM(n, m, m, axis), "w")
    values, positions = _nm_reference(theta, mask, n, m, axis)
    np.testing.assert_array_equal(_bits(leaf.values)[0], _bits(values)[0])
    np.testing.assert_array_equal(leaf.in_group_positions(), positions)
    assert leaf.positions.nbytes == -(-values.size * max(1, (m - 1).bit_length()) // 8)
    expected = np.where(mask, theta, np.float32(0))
    np.testing.assert_array_equal(
        np.asarray(export.densify(leaf)).view(np.uint8), expected.view(np.uint8)
    )


def test_nm_round_trip(tmp_path):
    """A 2:4 Top-KAST state exports its structured leaves as values + 2-bit positions by
    default: half the values, one bit of positions per weight; save -> load -> densify and
    the BCOO view equal θ ⊙ A bitwise; layout='nm' on an unstructured state names the leaf."""
    rng = np.random.default_rng(4)
    params = {
        "Dense_0": {"kernel": jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)},
        "Conv_0": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 8, 4)), jnp.float32)},
        "bias": jnp.zeros(6),
    }
    tx = tk.topkast(optax.sgd(0.1), structure=tk.NM(2, 4, n_backward=3))
    state = tx.init(params)
    alpha = tk.forward_params(params, state)
    exported = export.sparse_params(params, state)
    dense_leaf = exported["Dense_0"]["kernel"]
    assert isinstance(dense_leaf, export.NMLeaf) and dense_leaf.values.shape == (4, 6)
    assert exported["Conv_0"]["kernel"].values.shape == (3, 3, 4, 4)
    assert dense_leaf.positions.nbytes == 8 * 6 // 8  # 2 bits x 2 kept per 4 weights
    export.save(str(tmp_path / "e"), exported)
    _assert_bitwise(export.densify(export.load(str(tmp_path / "e"), like=params)), alpha)
    bcoo = export.to_bcoo(exported)["Conv_0"]["kernel"]
    _assert_bitwise(bcoo.todense(), alpha["Conv_0"]["kernel"])
    assert isinstance(export.sparse_params(params, state, layout="bitmap")["bias"], jax.Array)
    _assert_bitwise(export.densify(export.sparse_params(params, state, layout="indices")), alpha)
    plain = tk.topkast(optax.sgd(0.1), forward_sparsity=0.5, backward_sparsity=0.0, **FAST)
    with pytest.raises(ValueError, match="layout='nm'.*'Conv_0/kernel'"):
        export.sparse_params(params, plain.init(params), layout="nm")
