"""Trains a Linen model whose params carry partition boxes (``nn.Partitioned`` with mesh axis
names, or ``nn.with_logical_partitioning`` + ``nn.scan`` over ``"layers"``) on 8 host devices,
with the shardings of params *and* optimizer state taken from the boxes (``nn.get_sharding`` /
``nn.logical_to_mesh_sharding`` of ``nn.get_partition_spec``, as nanodo does); and selects a
sharded stack per layer on explicit and auto meshes.  Writes what it got as JSON to ``argv[1]``.

Run as a subprocess by ``test_partitioned.py`` (the device count must be set before jax loads).
"""

import json
import os
import sys
import traceback

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import topkast_jax as tk  # noqa: E402
from topkast_jax import baselines  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import reference  # noqa: E402

WIDTH, LAYERS = 16, 4
RULES = (("embed", "data"), ("mlp", "model"), ("layers", None))


class Block(nn.Module):
    partition: callable

    @nn.compact
    def __call__(self, x_BxD, _):
        init = nn.initializers.lecun_normal()
        h_BxD = nn.Dense(WIDTH, kernel_init=self.partition(init, ("embed", "mlp")))(x_BxD)
        h_BxD = nn.LayerNorm(scale_init=self.partition(nn.initializers.ones, ("mlp",)))(h_BxD)
        return x_BxD + nn.Dense(WIDTH, kernel_init=self.partition(init, ("mlp", "embed")))(
            nn.relu(h_BxD)
        ), None


class Model(nn.Module):
    """Logical names and a scan over "layers", or mesh axis names and two plain blocks."""

    logical: bool

    @nn.compact
    def __call__(self, x_BxD):
        if self.logical:
            stack = nn.scan(
                Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=LAYERS,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )  # fmt: skip
            x_BxD, _ = stack(nn.with_logical_partitioning, name="blocks")(x_BxD, None)
        else:
            mesh_names = {"embed": "data", "mlp": "model"}

            def partition(init, names):
                return nn.with_partitioning(init, tuple(mesh_names[n] for n in names))

            for i in range(2):
                x_BxD, _ = Block(partition, name=f"block_{i}")(x_BxD, None)
        return jnp.sum(x_BxD, axis=-1)


def spec_of(x) -> str:
    return str(tuple(x.sharding.spec))


def run(logical: bool, tx) -> dict:
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    model = Model(logical)
    x_BxD = jnp.ones((8, WIDTH))

    def init(rng):
        params = model.init(rng, x_BxD)["params"]
        return params, tx.init(params)

    rng = jax.random.PRNGKey(0)
    abstract = jax.eval_shape(init, rng)
    if logical:
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, RULES)
    else:
        shardings = nn.get_sharding(abstract, mesh)
    params, state = jax.jit(init, out_shardings=shardings)(rng)

    def step(params, state):
        def loss(alpha):
            return jnp.mean(model.apply({"params": alpha}, x_BxD) ** 2)

        grads = jax.grad(loss)(tk.forward_params(params, state))
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(step, in_shardings=shardings, out_shardings=shardings, donate_argnums=(0, 1))
    for _ in range(2):
        params, state = step(params, state)
    sparse = find(state)
    kernel_path = ("blocks", "Dense_0", "kernel") if logical else ("block_0", "Dense_0", "kernel")
    kernel = get(params, kernel_path)
    forward = get(tk.get_masks(state).forward, kernel_path)
    out = {
        "kernel_spec": spec_of(kernel),
        "density_specs": sorted({spec_of(d) for d in jax.tree.leaves(sparse.densities)}),
        "density_shapes": sorted({str(d.shape) for d in jax.tree.leaves(sparse.densities)}),
        "changed_specs": sorted({spec_of(c) for c in jax.tree.leaves(sparse.stats.changed)}),
        "mu_spec": spec_of(get(find_adam(sparse.inner_state).mu, kernel_path)),
        "per_layer_forward": jnp.sum(forward, axis=(-2, -1)).reshape(-1).tolist(),
        "slice_size": WIDTH * WIDTH,
    }
    if hasattr(sparse, "sets"):
        out["sets_spec"] = spec_of(get(sparse.sets, kernel_path).bits)
    return out


def get(tree, path):
    for key in path:
        tree = tree[key]
    return tree.value if isinstance(tree, nn.Partitioned) else tree


def find(state):
    return tk.find_sparse_state(state)


def find_adam(inner_state):
    return next(s for s in jax.tree.leaves(inner_state, is_leaf=lambda s: hasattr(s, "mu"))
                if hasattr(s, "mu"))  # fmt: skip


def stacked_sharded() -> dict:
    """A stack of 8 layers sharded along each of its axes, on explicit and auto meshes: are the
    sets selected per layer exactly as numpy's stable argsort per slice?"""
    rng = np.random.default_rng(0)
    x = np.round(rng.normal(size=(8, 16, 32)) * 2).astype(np.float32)  # ties
    out = {}
    for axis_type in (jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto):
        mesh = jax.make_mesh((8,), ("model",), axis_types=(axis_type,))
        for sharded_axis in range(3):
            spec = tuple("model" if d == sharded_axis else None for d in range(3))
            w = jax.device_put(jnp.asarray(x), NamedSharding(mesh, P(*spec)))
            tx = tk.topkast(optax.adam(1e-3), forward_sparsity=0.75, backward_sparsity=0.5,
                            layer_axis=0)  # fmt: skip
            with jax.set_mesh(mesh):
                masks = tk.get_masks(jax.jit(tx.init)({"w": w}))
            want_a, want_b = reference.slice_masks(x, 0, 0.25, 0.5)
            out[f"{axis_type.name}/{spec}"] = bool(
                np.array_equal(masks.forward["w"], want_a)
                and np.array_equal(masks.backward["w"], want_b)
            )
    return out


def main(path: str) -> None:
    cases = {
        "topkast_logical": (True, tk.topkast(optax.adam(1e-3), forward_sparsity=0.75,
                                             backward_sparsity=0.5)),
        "topkast_mesh_names": (False, tk.topkast(optax.adam(1e-3), forward_sparsity=0.75)),
        "static_logical": (True, baselines.static_sparse(optax.adam(1e-3), sparsity=0.75)),
    }  # fmt: skip
    result = {}
    for name, (logical, tx) in cases.items():
        try:
            result[name] = run(logical, tx)
        except Exception:  # reported to the test, which fails with it
            result[name] = {"error": traceback.format_exc()[-3000:]}
    try:
        result["stacked_sharded"] = stacked_sharded()
    except Exception:
        result["stacked_sharded"] = {"error": traceback.format_exc()[-3000:]}
    with open(path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
