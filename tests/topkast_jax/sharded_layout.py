"""Compiles one Top-KAST step for a leaf sharded ``P(None, 'model')`` over 8 host devices and
writes, as JSON to ``argv[1]``, the layout of the sets and the collectives of the program.

Run as a subprocess by ``test_sharded_layout.py`` (the device count must be set before jax loads).
"""

import json
import os
import re
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import topkast_jax as tk  # noqa: E402

WIDTH = 512
COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
DTYPE_BYTES = {"f32": 4, "s32": 4, "u32": 4, "u8": 1, "pred": 1, "bf16": 2, "f16": 2}


def collective_sizes(hlo: str) -> dict[str, list[int]]:
    """Bytes of every collective's result, by kind (each array of a combined collective's tuple
    counts as one)."""
    out: dict[str, list[int]] = {}
    for kind in COLLECTIVES:
        pattern = r"= (\([^)]*\)|\w+\[[\d,]*\]\S*) " + kind + r"(?:-start)?\("
        for result in re.findall(pattern, hlo):
            for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", result):
                size = 1
                for d in filter(None, dims.split(",")):
                    size *= int(d)
                out.setdefault(kind, []).append(size * DTYPE_BYTES.get(dtype, 4))
    return out


def main(path: str) -> None:
    mesh = jax.make_mesh((8,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
    leaf = NamedSharding(mesh, P(None, "model"))
    params = {"w": jax.device_put(jax.random.normal(jax.random.PRNGKey(0), (WIDTH, WIDTH)), leaf)}
    tx = tk.topkast(optax.adam(1e-3), forward_sparsity=0.8, backward_sparsity=0.5)
    state = jax.jit(tx.init)(params)
    x_BxW = jnp.ones((8, WIDTH))

    def step(params, state):
        alpha = tk.forward_params(params, state)
        grads = jax.grad(lambda a: jnp.sum((x_BxW @ a["w"]) ** 2))(alpha)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state).compile()
    new_params, new_state = compiled(params, state)
    result = {
        "init_spec": str(state.sets["w"].bits.sharding.spec),
        "step_spec": str(new_state.sets["w"].bits.sharding.spec),
        "params_spec": str(new_params["w"].sharding.spec),
        "leaf_bytes": WIDTH * WIDTH * 4,
        "collectives": collective_sizes(compiled.as_text()),
    }
    with open(path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
