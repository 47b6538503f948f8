"""Compiles the dense step and the Top-KAST step for leaves sharded along their first axis (FSDP),
their last, or both, and a stack of layers, on explicit and auto meshes of 8 host devices, and a
Linen FSDP model as nanodo shards it; writes, as JSON to ``argv[1]``, the collectives of each
compiled program, the layout of the sets and whether the sets are numpy's exact selection.

Run as a subprocess by ``test_fsdp_layout.py`` (the device count must be set before jax loads).
Chunks are made small (``streaming.CHUNK``) so that every leaf is walked in several chunks per
device, and the weights are rounded so that ties straddle every boundary (the tie pass runs).
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
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import topkast_jax as tk  # noqa: E402
from topkast_jax import streaming  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.dirname(_HERE))
import reference  # noqa: E402
from sharded_layout import collective_sizes  # noqa: E402

LEAVES = {  # name: (shape, spec); in tree order; "stack" has 4 layers along axis 0
    "both": ((64, 48), ("data", "model")),
    "first": ((64, 48), ("data", None)),
    "last": ((64, 48), (None, "model")),
    "stack": ((4, 32, 48), (None, "data", "model")),
}
AXES = {"both": None, "first": None, "last": None, "stack": 0}
FORWARD, BACKWARD = 0.75, 0.5


def spec_of(x: jax.Array) -> str:
    """The partition spec of ``x`` without trailing ``None`` (``P('data', None)`` is
    ``P('data')``)."""
    spec = list(x.sharding.spec)
    while spec and spec[-1] is None:
        spec.pop()
    return str(tuple(spec))


def compiled_collectives(step, *args) -> dict[str, list[int]]:
    """Bytes of every collective of ``jit(step)`` compiled for ``args``, by kind, sorted."""
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(*args).compile()
    return {kind: sorted(sizes) for kind, sizes in collective_sizes(compiled.as_text()).items()}


def leaf_case(axis_type: AxisType, global_topk: bool) -> dict:
    """The leaves of :data:`LEAVES` in one program: collectives of the dense and the Top-KAST
    step, specs of the sets, and whether the sets are numpy's selection."""
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(axis_type,) * 2)
    rng = np.random.default_rng(0)
    values = {
        k: np.round(rng.normal(size=s) * 2).astype(np.float32) for k, (s, _) in LEAVES.items()
    }
    params = {
        k: jax.device_put(jnp.asarray(values[k]), NamedSharding(mesh, P(*spec)))
        for k, (_, spec) in LEAVES.items()
    }
    x_BxI = jax.device_put(jnp.ones((8, 64)), NamedSharding(mesh, P("data")))

    def loss(alpha, x_BxI):
        if axis_type == AxisType.Explicit:  # FSDP: gather the weights for the matmuls
            alpha = jax.tree.map(lambda a: jax.sharding.reshard(a, P()), alpha)
        out = sum(jnp.sum((x_BxI @ alpha[k]) ** 2) for k in ("both", "first", "last"))
        return out + jnp.sum(jnp.einsum("bi,lio->blo", x_BxI[:, :32], alpha["stack"]))

    txs = {
        "dense": optax.adam(1e-3),
        "topkast": tk.topkast(
            optax.adam(1e-3), forward_sparsity=FORWARD, backward_sparsity=BACKWARD,
            layer_axis=AXES, global_topk=global_topk,
        ),
    }  # fmt: skip
    out = {}
    with jax.set_mesh(mesh):
        for name, tx in txs.items():
            state = jax.jit(tx.init)(params)

            def step(params, state, x_BxI, tx=tx, name=name):
                alpha = tk.forward_params(params, state) if name == "topkast" else params
                updates, state = tx.update(jax.grad(loss)(alpha, x_BxI), state, params)
                return optax.apply_updates(params, updates), state

            out[name] = compiled_collectives(step, params, state, x_BxI)
        masks = tk.get_masks(state)  # the Top-KAST init's sets of the params above
        out["sets_specs"] = {k: spec_of(state.sets[k].bits) for k in LEAVES}
    out["leaf_specs"] = {k: spec_of(params[k]) for k in LEAVES}
    thetas, axes = list(values.values()), list(AXES.values())
    if global_topk:
        want = reference.global_slice_masks(thetas, axes, 1 - FORWARD, 1 - BACKWARD)
    else:
        want = [reference.slice_masks(v, a, 1 - FORWARD, 1 - BACKWARD)
                for v, a in zip(thetas, axes, strict=True)]  # fmt: skip
    out["exact"] = {
        k: bool(np.array_equal(masks.forward[k], a) and np.array_equal(masks.backward[k], b))
        for k, (a, b) in zip(LEAVES, want, strict=True)
    }
    return out


class FsdpModel(nn.Module):
    """nanodo's FSDP layout: an embedding and MLP kernels sharded along ``'data'``."""

    @nn.compact
    def __call__(self, tokens_BxL):
        fsdp = nn.with_partitioning
        init = nn.initializers.normal(1.0)
        embed = nn.Embed(64, 32, embedding_init=fsdp(init, ("data", None)))
        h_BxLxD = embed(tokens_BxL)
        up = nn.Dense(64, use_bias=False, kernel_init=fsdp(init, ("data", None)))
        down = nn.Dense(32, use_bias=False, kernel_init=fsdp(init, (None, "data")))
        h_BxLxD = h_BxLxD + down(nn.relu(up(h_BxLxD)))
        return embed.attend(h_BxLxD)


def linen_case() -> dict:
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    model = FsdpModel()
    tokens_BxL = jnp.arange(8 * 4).reshape(8, 4) % 64
    out = {}
    for name, tx in (
        ("dense", optax.adamw(1e-3)),
        ("topkast", tk.topkast(optax.adamw(1e-3), forward_sparsity=FORWARD)),
    ):

        def init(rng, tx=tx):
            params = model.init(rng, tokens_BxL)["params"]
            return params, tx.init(params)

        shardings = nn.get_sharding(jax.eval_shape(init, jax.random.PRNGKey(0)), mesh)
        params, state = jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(0))

        def step(params, state, tx=tx, name=name):
            def loss(alpha):
                logits = model.apply({"params": alpha}, tokens_BxL)
                return optax.softmax_cross_entropy_with_integer_labels(logits, tokens_BxL).mean()

            alpha = tk.forward_params(params, state) if name == "topkast" else params
            updates, state = tx.update(jax.grad(loss)(alpha), state, params)
            return optax.apply_updates(params, updates), state

        compiled = (
            jax.jit(step, in_shardings=shardings, out_shardings=shardings, donate_argnums=(0, 1))
            .lower(params, state)
            .compile()
        )
        out[name] = {k: sorted(v) for k, v in collective_sizes(compiled.as_text()).items()}
        if name == "topkast":
            new_params, new_state = compiled(params, state)
            sets = nn.unbox(new_state.sets["Dense_0"]["kernel"])
            out["sets_spec"] = spec_of(sets.bits)
            out["kernel_spec"] = spec_of(nn.unbox(new_params["Dense_0"]["kernel"]))
    return out


def main(path: str) -> None:
    streaming.CHUNK = 64  # several chunks per device for every leaf
    result = {}
    cases = [(AxisType.Explicit, False), (AxisType.Auto, False), (AxisType.Explicit, True)]
    for axis_type, global_topk in cases:
        name = axis_type.name + ("/global" if global_topk else "")
        try:
            result[name] = leaf_case(axis_type, global_topk)
        except Exception:  # reported to the test, which fails with it
            result[name] = {"error": traceback.format_exc()[-3000:]}
    try:
        result["linen_fsdp"] = linen_case()
    except Exception:
        result["linen_fsdp"] = {"error": traceback.format_exc()[-3000:]}
    with open(path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
