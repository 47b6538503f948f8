"""The supported Flax NNX path: ``tk.nnx.Optimizer`` + ``tk.nnx.value_and_grad``.

A small CNN with ``nnx.BatchNorm``, ``nnx.Dropout`` and an ``nnx.scan`` stack of three layers
(stacked by ``nnx.vmap`` with the ``"layers"`` axis metadata, selected per layer).  Each step is
checked against Flax itself run on a copy of the model whose kernels are ``θ ⊙ A`` with ``A`` from
the numpy reference: the masks, the loss, ``∂L/∂α`` (non-zero on ``B ∖ A``), the BatchNorm
statistics and the dropout RNG count.  The misuses — ``nnx.grad`` gradients, a plain
``nnx.Optimizer`` around Top-KAST, the optimizer's raw ``opt_state`` — raise clear errors.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference
from flax import nnx

import topkast_jax as tk

FS, BS = 0.7, 0.4
WIDTH, LAYERS, CLASSES = 16, 3, 3
STEPS = 3


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp"))
        self.linear = nnx.Linear(WIDTH, WIDTH, kernel_init=init, rngs=rngs)

    def __call__(self, x_BxD):
        return x_BxD + nnx.relu(self.linear(x_BxD))


class CNN(nnx.Module):
    """Conv → BatchNorm → ReLU → Dropout → pool → scan over 3 blocks → Linear."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, momentum=0.9, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)

        @nnx.split_rngs(splits=LAYERS)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def stack(rngs):
            return Block(rngs)

        self.blocks = stack(rngs)
        self.head = nnx.Linear(WIDTH, CLASSES, rngs=rngs)

    def __call__(self, x_BxHxWx1):
        h = self.drop(nnx.relu(self.bn(self.conv(x_BxHxWx1))))
        h_BxD = nnx.avg_pool(h, (2, 2), strides=(2, 2)).reshape(h.shape[0], WIDTH)

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def run(x_BxD, block):
            return block(x_BxD)

        return self.head(run(h_BxD, self.blocks))


def loss_fn(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def make_model():
    with nnx.use_eager_sharding(False):
        return CNN(nnx.Rngs(0, dropout=1))


def make_tx():
    return tk.topkast(
        optax.adam(0.02), forward_sparsity=FS, backward_sparsity=BS, exploration_l2=1e-4
    )


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4, 4, 1)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(rng.integers(0, CLASSES, size=32))


SPARSE = {"conv/kernel": None, "blocks/linear/kernel": 0, "head/kernel": None}  # layer axis


def pure_leaves(state):
    """``{path: numpy array}`` of an ``nnx.State`` (or its ``nnx.as_pure``)."""
    flat = jax.tree_util.tree_flatten_with_path(nnx.as_pure(state))[0]
    return {tk.tree.path_name(path): np.asarray(x) for path, x in flat}


def reference_masks(theta):
    """Per sparse leaf ``(A, B)`` of the numpy reference (per layer for the scan stack)."""
    return {
        name: reference.slice_masks(theta[name], axis, 1 - FS, 1 - BS)
        for name, axis in SPARSE.items()
    }


flax_value_and_grad = nnx.jit(nnx.value_and_grad(loss_fn))


def flax_on_alpha(model, masks, x, y):
    """Flax's own ``nnx.value_and_grad`` on a copy of ``model`` with kernels ``θ ⊙ A``:
    ``(loss, grads, copy)`` — the copy holds the BatchNorm statistics and RNG counts after."""
    copy = nnx.clone(model)
    theta = pure_leaves(nnx.state(copy, nnx.Param))
    alpha = nnx.state(copy, nnx.Param)
    flat, treedef = jax.tree_util.tree_flatten_with_path(nnx.as_pure(alpha))
    leaves = [
        theta[tk.tree.path_name(p)] * masks[tk.tree.path_name(p)][0]
        if tk.tree.path_name(p) in masks
        else x_
        for p, x_ in flat
    ]
    nnx.update(copy, jax.tree.unflatten(treedef, leaves))
    loss, grads = flax_value_and_grad(copy, x, y)
    return float(loss), pure_leaves(grads), copy


@nnx.jit
def train_step(model, optimizer, x, y):
    loss, grads = tk.nnx.value_and_grad(loss_fn)(model, optimizer, x, y)
    optimizer.update(model, grads)
    return loss, grads


def test_value_and_grad_trains_theta_through_alpha_with_batchnorm_dropout_and_scan():
    x, y = data()
    model = make_model()
    optimizer = tk.nnx.Optimizer(model, make_tx())
    for _ in range(STEPS):
        theta = pure_leaves(nnx.state(model, nnx.Param))
        state = tk.nnx.optimizer_state(optimizer, nnx.state(model, nnx.Param))
        got_a = pure_leaves(tk.get_masks(state).forward)
        got_b = pure_leaves(tk.get_masks(state).backward)
        masks = reference_masks(theta)
        assert set(got_a) == set(SPARSE)  # BatchNorm scale/bias, biases: dense
        for name, (a, b) in masks.items():
            np.testing.assert_array_equal(got_a[name], a, name)
            np.testing.assert_array_equal(got_b[name], b, name)
        want_loss, want_grads, copy = flax_on_alpha(model, masks, x, y)

        loss, grads = train_step(model, optimizer, x, y)

        np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
        grads = pure_leaves(grads.state)
        assert set(grads) == set(want_grads)
        for name, g in grads.items():
            np.testing.assert_allclose(g, want_grads[name], rtol=1e-4, atol=1e-6, err_msg=name)
        for name, (a, b) in masks.items():  # exploration: B ∖ A gets its gradient (not all:
            # ReLU units that are off for the whole batch give zero, as in Flax's gradient)
            assert np.count_nonzero(grads[name][b & ~a]) > 0.5 * np.sum(b & ~a), name
        kinds = nnx.Any(nnx.BatchStat, nnx.RngCount)
        rest, want_rest = (pure_leaves(nnx.state(m, kinds)) for m in (model, copy))
        for name in ("bn/mean", "bn/var", "drop/rngs/count"):
            np.testing.assert_allclose(rest[name], want_rest[name], rtol=1e-5, err_msg=name)
        new_theta = pure_leaves(nnx.state(model, nnx.Param))
        for name, (_, b) in masks.items():  # the update moves θ inside B only
            np.testing.assert_array_equal(new_theta[name][~b], theta[name][~b], name)
            assert np.all(new_theta[name][b] != theta[name][b]), name
    assert int(rest["drop/rngs/count"]) == STEPS  # a fresh dropout key each step

    sparse = tk.nnx.sparse_model(*tk.nnx.split(model), optimizer)
    sparse.eval()
    final = reference_masks(pure_leaves(nnx.state(model, nnx.Param)))
    kernels = pure_leaves(nnx.state(sparse, nnx.Param))
    for name, (a, _) in final.items():
        np.testing.assert_array_equal(kernels[name] != 0, a, name)
    assert np.isfinite(np.asarray(sparse(x))).all()


def tiny():
    """A model and a loss for the misuse checks (no compile of the CNN's step)."""
    model = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8)), jnp.float32)
    return model, lambda m: jnp.mean(m(x) ** 2)


def test_dense_gradients_are_refused():
    model, loss = tiny()
    optimizer = tk.nnx.Optimizer(model, make_tx())
    with pytest.raises(TypeError, match=r"AlphaGrads of tk\.nnx\.value_and_grad.*nnx\.grad"):
        optimizer.update(model, nnx.grad(loss)(model))
    plain = nnx.Optimizer(model, make_tx(), wrt=nnx.Param)
    with pytest.raises(TypeError, match=r"optimizer must be a tk\.nnx\.Optimizer"):
        tk.nnx.value_and_grad(loss)(model, plain)
    params = nnx.state(model, nnx.Param)
    with pytest.raises(ValueError, match=r"pass the optimizer itself"):
        tk.nnx.forward_params(params, optimizer.opt_state)
    with pytest.raises(ValueError, match=r"pass the optimizer itself"):
        tk.nnx.sparse_model(*tk.nnx.split(model), optimizer.opt_state)
    with pytest.raises(ValueError, match=r"tk\.nnx\.forward_params\(params, optimizer\)"):
        tk.forward_params(params, optimizer.opt_state)


def test_plain_nnx_optimizer_around_topkast_says_what_to_use():
    model, loss = tiny()
    plain = nnx.Optimizer(model, make_tx(), wrt=nnx.Param)
    plain.update(model, nnx.grad(loss)(model))  # bare arrays: not detectable at this step
    with pytest.raises(ValueError, match=r"rewritten.*tk\.nnx\.Optimizer\(model, tx\)"):
        plain.update(model, nnx.grad(loss)(model))


def test_check_exploration_inside_the_nnx_optimizer():
    model, loss = tiny()
    tx = tk.check_exploration(make_tx(), patience=2)
    optimizer = tk.nnx.Optimizer(model, tx)
    zero = tk.nnx.AlphaGrads(jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param)))
    with pytest.warns(UserWarning, match=r"B∖A of kernel received exactly zero gradient"):
        for _ in range(2):
            optimizer.update(model, zero)
            jax.effects_barrier()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            optimizer.update(model, tk.nnx.value_and_grad(loss)(model, optimizer)[1])
            jax.effects_barrier()


def test_update_without_the_stack_metadata_init_saw_raises():
    """``nnx.Optimizer`` hands ``update`` bare arrays: without ``tk.nnx.Optimizer`` (or the
    params given to ``for_optimizer``) the scan stack's layer axis would be lost."""
    model = make_model()
    zeros = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
    plain = nnx.Optimizer(model, tk.nnx.for_optimizer(make_tx()), wrt=nnx.Param)
    with pytest.raises(ValueError, match=r"'blocks/linear/kernel' has layer axis None.*axis 0"):
        plain.update(model, zeros)


def _refresh_every_two(split: bool):
    """Four steps of the CNN at ``refresh_every=2``: by ``update`` itself, or (``split``) with
    ``refresh_masks=False`` and ``Optimizer.refresh`` jitted apart after the second and fourth;
    the params and the plain state after each step."""
    x, y = data()
    model = make_model()
    tx = tk.topkast(
        optax.adam(0.02), forward_sparsity=FS, backward_sparsity=BS, exploration_l2=1e-4,
        refresh_every=2,
    )  # fmt: skip
    optimizer = tk.nnx.Optimizer(model, tx)

    @nnx.jit(static_argnums=4)
    def step(model, optimizer, x, y, split):
        grads = tk.nnx.value_and_grad(loss_fn)(model, optimizer, x, y)[1]
        optimizer.update(model, grads, **({"refresh_masks": False} if split else {}))

    refresh = nnx.jit(lambda model, optimizer: optimizer.refresh(model))
    after = []
    for t in range(4):
        step(model, optimizer, x, y, split)
        if split and t % 2 == 1:
            refresh(model, optimizer)
        params = nnx.state(model, nnx.Param)
        after.append((pure_leaves(params), tk.nnx.optimizer_state(optimizer, params)))
    return after


def test_optimizer_refresh_equals_the_refresh_inside_update():
    """Per layer of the scan stack as well: the layer axis survives the refresh."""
    want, got = _refresh_every_two(split=False), _refresh_every_two(split=True)
    for (w_params, w_state), (g_params, g_state) in zip(want, got, strict=True):
        assert w_params.keys() == g_params.keys()
        for name in w_params:
            np.testing.assert_array_equal(w_params[name], g_params[name], name)
        for a, b in zip(jax.tree.leaves(w_state), jax.tree.leaves(g_state), strict=True):
            np.testing.assert_array_equal(a, b)
    masks = pure_leaves(tk.get_masks(want[-1][1]).forward)
    assert set(masks) == set(SPARSE)
    stack = masks["blocks/linear/kernel"]  # A per layer: D of every slice
    assert [int(layer.sum()) for layer in stack] == [round((1 - FS) * WIDTH * WIDTH)] * LAYERS
    first = pure_leaves(tk.get_masks(want[0][1]).forward)
    assert any((masks[n] != first[n]).any() for n in masks)  # a refresh moved A


def test_optimizer_refresh_needs_a_topkast_transformation():
    model, _ = tiny()
    optimizer = tk.nnx.Optimizer(model, optax.chain(make_tx()))
    with pytest.raises(ValueError, match="refresh_sets needs the transformation tk.topkast"):
        optimizer.refresh(model)
