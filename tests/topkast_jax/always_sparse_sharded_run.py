"""Runs always-sparse Top-KAST steps on a data-parallel mesh of N host devices; writes results.

Usage: ``python always_sparse_sharded_run.py NUM_DEVICES OUT_DIR``.  For each mesh axis type it
writes ``OUT_DIR/<axis_type>.npz`` (final params, masks, losses) or ``OUT_DIR/<axis_type>.error``.
Run in a subprocess by test_always_sparse_sharding.py (``XLA_FLAGS`` must precede the jax import).
"""

import os
import sys
import traceback


def run(num_devices: int, axis_type: str, out_path: str) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import topkast_jax as tk

    assert jax.device_count() == num_devices, jax.devices()
    types = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}
    mesh = jax.make_mesh((num_devices,), ("data",), axis_types=(types[axis_type],))
    rng = np.random.default_rng(0)
    params = {
        "b": jnp.asarray(rng.normal(size=8), jnp.float32),
        "w1": jnp.asarray(rng.normal(size=(6, 16)), jnp.float32),
        "w2": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32) * 0.3,
    }
    params = jax.device_put(params, NamedSharding(mesh, P()))
    batch = NamedSharding(mesh, P("data"))
    x = jax.device_put(jnp.asarray(rng.normal(size=(32, 6)), jnp.float32), batch)
    y = jax.device_put(jnp.asarray(rng.normal(size=(32, 8)), jnp.float32), batch)
    sparse = tk.AlwaysSparse(
        optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.05)),
        forward_sparsity=0.8,
        backward_sparsity=0.5,
        exploration_l2=0.01,
        refresh_every=2,
    )

    def loss_fn(alpha, batch):
        x, y = batch
        out = jnp.tanh(x @ alpha["w1"]) @ alpha["w2"] + alpha["b"]
        return jnp.mean((out - y) ** 2)

    with jax.set_mesh(mesh):
        state = sparse.init(params)
        step = sparse.make_step(loss_fn)
        losses = []
        for _ in range(7):
            state, loss = step(state, (x, y))
            losses.append(float(loss))
        w1_devices = len(state.device.params["w1"].sharding.device_set)
    masks = sparse.masks(state)
    dense = sparse.dense_params(state)
    np.savez(
        out_path,
        devices=jax.device_count(),
        w1_devices=w1_devices,
        losses=np.asarray(losses),
        **{f"param_{k}": np.asarray(v) for k, v in dense.items()},
        **{f"forward_{k}": masks.forward[k] for k in ("w1", "w2")},
        **{f"backward_{k}": masks.backward[k] for k in ("w1", "w2")},
    )


def main(num_devices: int, out_dir: str) -> None:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    for axis_type in ("auto", "explicit"):
        try:
            run(num_devices, axis_type, os.path.join(out_dir, f"{axis_type}.npz"))
        except Exception:  # noqa: BLE001 - reported to the test through the file
            with open(os.path.join(out_dir, f"{axis_type}.error"), "w") as f:
                f.write(traceback.format_exc())


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
