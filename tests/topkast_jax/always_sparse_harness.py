"""A tiny MLP problem run side by side by the masked ``tk.topkast`` and ``tk.AlwaysSparse``."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import topkast_jax as tk

SIZES = (12, 16, 16, 4)
# Without LLVM's optimisations XLA contracts no multiply-add into an FMA, so the two modes
# (different fusions of the same arithmetic) round identically: the runs are bitwise equal.
NO_FMA = {"xla_backend_optimization_level": 0}


def mlp_params(seed: int = 0, sizes: tuple[int, ...] = SIZES) -> dict[str, Any]:
    """``{"l<i>": {"kernel", "bias"}}`` float32 params of a tanh MLP."""
    rng = np.random.default_rng(seed)
    params = {}
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        params[f"l{i}"] = {
            "kernel": jnp.asarray(rng.normal(size=(n_in, n_out)) / np.sqrt(n_in), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=n_out) * 0.1, jnp.float32),
        }
    return params


def mlp_loss(params: Any, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Mean squared error of the tanh MLP on ``batch = (x[B, in], y[B, out])``."""
    h, y = batch
    for i in range(len(params)):
        h = h @ params[f"l{i}"]["kernel"] + params[f"l{i}"]["bias"]
        if i < len(params) - 1:
            h = jnp.tanh(h)
    return jnp.mean((h - y) ** 2)


def batch_at(t: int, sizes: tuple[int, ...] = SIZES, rows: int = 8) -> tuple[jax.Array, ...]:
    """The batch of step ``t`` (deterministic)."""
    rng = np.random.default_rng(1000 + t)
    x = jnp.asarray(rng.normal(size=(rows, sizes[0])), jnp.float32)
    return x, jnp.asarray(rng.normal(size=(rows, sizes[-1])), jnp.float32)


def masked_step(tx: optax.GradientTransformation, loss_fn: Any, compiler_options=None) -> Any:
    """Jitted ``(params, opt_state, batch) -> (params, opt_state, loss)`` of ``tk.topkast``."""

    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(tk.forward_params(params, opt_state), batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, compiler_options=compiler_options)


@dataclasses.dataclass
class SideBySide:
    """Both runs after ``steps`` steps; ``mask_mismatch`` is the first step whose A/B differ."""

    masked_params: Any
    sparse_params: Any
    mask_mismatch: int | None
    steps: int


def _masks_equal(masked: tk.Masks, sparse: tk.Masks) -> bool:
    for mine, theirs in ((masked.forward, sparse.forward), (masked.backward, sparse.backward)):
        for a, b in zip(
            jax.tree.leaves(mine, is_leaf=lambda x: x is None),
            jax.tree.leaves(theirs, is_leaf=lambda x: x is None),
            strict=True,
        ):
            if (a is None) != (b is None) or (a is not None and not np.array_equal(a, b)):
                return False
    return True


def side_by_side(
    inner: optax.GradientTransformation,
    tx_kwargs: dict[str, Any],
    steps: int,
    compiler_options: dict[str, Any] | None = NO_FMA,
) -> SideBySide:
    """Runs masked and always-sparse Top-KAST on the MLP, comparing A and B at every step."""
    params = mlp_params()
    tx = tk.topkast(inner, **tx_kwargs)
    m_step = masked_step(tx, mlp_loss, compiler_options)
    m_state = jax.jit(tx.init)(params)
    sparse = tk.AlwaysSparse(inner, **tx_kwargs)
    s_state = sparse.init(params)
    s_step = sparse.make_step(mlp_loss, compiler_options=compiler_options)
    mismatch = None
    for t in range(steps + 1):
        if mismatch is None and not _masks_equal(tk.get_masks(m_state), sparse.masks(s_state)):
            mismatch = t
        if t == steps:
            break
        params, m_state, _ = m_step(params, m_state, batch_at(t))
        s_state, _ = s_step(s_state, batch_at(t))
    return SideBySide(params, sparse.dense_params(s_state), mismatch, steps)


def orbax_roundtrip(state: Any, directory: Any) -> Any:
    """``state`` saved with orbax under ``directory`` and restored with itself as the target."""
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(directory) as manager:
        manager.save(0, args=ocp.args.StandardSave(state))
        manager.wait_until_finished()
        return manager.restore(0, args=ocp.args.StandardRestore(state))
