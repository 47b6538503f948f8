"""Runs a few Top-KAST steps with params sharded over N host devices; writes results to files.

Usage: ``python sharded_run.py NUM_DEVICES OUT_DIR``.  For each mesh axis type — ``auto`` and
``explicit`` (what ``jax.make_mesh`` gives by default in this JAX) — it writes
``OUT_DIR/<axis_type>.npz`` with the final numbers, or ``OUT_DIR/<axis_type>.error`` with the
traceback.  Run in a subprocess by test_sharding.py, because ``XLA_FLAGS`` must be set before jax
is imported.
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
    specs = {"b": P(), "w1": P(None, "data"), "w2": P("data", None)}
    params = jax.device_put(params, {k: NamedSharding(mesh, s) for k, s in specs.items()})
    batch = NamedSharding(mesh, P("data"))
    x = jax.device_put(jnp.asarray(rng.normal(size=(32, 6)), jnp.float32), batch)
    y = jax.device_put(jnp.asarray(rng.normal(size=(32, 8)), jnp.float32), batch)
    tx = tk.topkast(
        optax.sgd(0.05, momentum=0.9),
        forward_sparsity=0.8,
        backward_sparsity=0.5,
        exploration_l2=0.01,
        track_reservoir=True,
    )

    def loss_fn(alpha, x, y):
        if axis_type == "explicit":  # FSDP-style: gather the sharded weights for the matmuls
            alpha = jax.tree.map(lambda a: jax.sharding.reshard(a, P()), alpha)
        out = jnp.tanh(x @ alpha["w1"]) @ alpha["w2"] + alpha["b"]
        return jnp.mean((out - y) ** 2)

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(tk.forward_params(params, opt_state), x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    with jax.set_mesh(mesh):
        opt_state = jax.jit(tx.init)(params)
        losses = []
        for _ in range(6):
            params, opt_state, loss = step(params, opt_state, x, y)
            losses.append(float(loss))
        masks = tk.get_masks(opt_state)
        stats = tk.mask_stats(opt_state)
        penalty = float(tk.exploration_penalty(params, opt_state))
    np.savez(
        out_path,
        devices=jax.device_count(),
        w1_devices=len(params["w1"].sharding.device_set),
        w2_spec=str(params["w2"].sharding.spec),
        losses=np.asarray(losses),
        penalty=penalty,
        mask_change=float(stats["mask_change"]),
        reservoir=float(stats["reservoir_activated"]),
        **{f"param_{k}": np.asarray(v) for k, v in params.items()},
        **{f"forward_{k}": np.asarray(masks.forward[k]) for k in ("w1", "w2")},
        **{f"backward_{k}": np.asarray(masks.backward[k]) for k in ("w1", "w2")},
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
