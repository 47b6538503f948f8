r"""Mask dynamics for the paper's Figure 3, shared by every trainer.

Every ``window`` steps a trainer logs, per sparse layer, the fraction of the forward mask that
differs from the mask one window earlier,

.. math:: \frac{\sum (m^t - m^{t-w})^2}{|\theta_\ell|},

as ``masks/window_change/<layer>`` plus ``masks/window_change_{min,mean,max}`` over the layers,
and ``masks/window_steps`` = ``w`` (so a plot can name the window). The previous window's mask
lives in the checkpointed train state (``mask_snapshot``), so a resumed run logs the same numbers.
The reservoir panel reads ``masks/reservoir_activated`` from ``tk.mask_stats``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

#: The paper's window (Figure 3: 5000 steps).
PAPER_WINDOW_STEPS = 5000


def window_steps(config: Any) -> int:
    """``config.mask_window_steps`` if set, else the paper's 5000 steps or a tenth of the run,
    whichever is shorter (so short runs still log a few windows)."""
    value = config.get("mask_window_steps", None)
    if value is not None:
        return int(value)
    return max(1, min(PAPER_WINDOW_STEPS, int(config.num_train_steps) // 10))


def _sparse_pairs(previous: Any, current: Any) -> list[tuple[str, tuple[Any, Any]]]:
    flat_old = jax.tree_util.tree_flatten_with_path(previous, is_leaf=lambda x: x is None)[0]
    flat_new = jax.tree.leaves(current, is_leaf=lambda x: x is None)
    return [
        ("/".join(str(getattr(k, "key", k)) for k in path), (old, new))
        for (path, old), new in zip(flat_old, flat_new, strict=True)
        if old is not None
    ]


def window_change(previous: Any, current: Any) -> dict[str, jax.Array]:
    """Per sparse leaf (``"layer/kernel"``), the fraction of positions where the two forward
    masks differ (float32 scalars; dense leaves, ``None`` in the mask trees, are skipped)."""
    return {
        path: jnp.mean(old != new, dtype=jnp.float32)
        for path, (old, new) in _sparse_pairs(previous, current)
    }


def jitted_window_fns(state_shardings: Any) -> tuple[Any, Any]:
    """``(change_fn, snapshot_fn)`` on a train-state dict holding ``opt_state`` and
    ``mask_snapshot``: ``change_fn(state)`` is :func:`window_change` from the snapshot to the
    current forward mask; ``snapshot_fn(state)`` returns the state with the current forward mask
    as the new snapshot (state donated, ``state_shardings`` kept)."""
    import topkast_jax as tk

    change_fn = jax.jit(
        lambda s: window_change(s["mask_snapshot"], tk.get_masks(s["opt_state"]).forward)
    )
    snapshot_fn = jax.jit(
        lambda s: dict(s, mask_snapshot=tk.get_masks(s["opt_state"]).forward),
        out_shardings=state_shardings,
        donate_argnums=0,
    )
    return change_fn, snapshot_fn


def window_metrics(change: dict[str, float], window: int) -> dict[str, float]:
    """The logged record (names without the ``masks/`` prefix): ``window_change/<layer>``,
    ``window_change_{min,mean,max}`` and ``window_steps``; empty when no leaf is sparse."""
    if not change:
        return {}
    values = np.array(list(change.values()), dtype=np.float64)
    out = {f"window_change/{k}": float(v) for k, v in change.items()}
    out.update(
        {
            "window_change_min": float(values.min()),
            "window_change_mean": float(values.mean()),
            "window_change_max": float(values.max()),
            "window_steps": float(window),
        }
    )
    return out
