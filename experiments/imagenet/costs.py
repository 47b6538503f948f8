"""Per-layer multiply-adds of a Flax Linen model, found without materialising anything.

``layer_macs`` runs ``model.apply`` under ``jax.eval_shape`` with
``capture_intermediates=True``, so every ``nn.Conv`` / ``nn.Dense`` reports its output shape; the
per-example multiply-adds of a layer are then ``kernel.size × output positions``
(:func:`topkast_jax.flops.matmul_macs`). Combined with the per-leaf densities this gives
``train_flops_vs_dense`` (see :mod:`topkast_jax.flops`).
"""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from topkast_jax import flops


def _path_str(path: tuple[str, ...]) -> str:
    return "/".join(path)


def layer_macs(
    model: nn.Module, variables: Mapping[str, Any], input_shape: tuple[int, ...]
) -> dict[str, int]:
    """Per-example multiply-adds of every matmul-like layer (a leaf named ``kernel``).

    Args:
      model: a Linen model called as ``model.apply(variables, x, train=False)``.
      variables: its variables, concrete or ``jax.ShapeDtypeStruct`` (from ``jax.eval_shape``).
      input_shape: shape of one input batch, e.g. (1, 224, 224, 3).

    Returns:
      ``{"path/to/module/kernel": macs}`` with paths joined by "/" (e.g.
      ``"stage1_block1/conv1/kernel"``).

    Raises:
      ValueError: a kernel has no captured output (its module was not called).
    """

    def run(v: Mapping[str, Any]) -> Any:
        _, state = model.apply(
            v,
            jnp.zeros(input_shape, jnp.float32),
            train=False,
            capture_intermediates=True,
            mutable=["intermediates"],
        )
        return state["intermediates"]

    intermediates = jax.eval_shape(run, variables)
    outputs = {
        tuple(k.key for k in path[:-2]): leaf.shape
        for path, leaf in jax.tree_util.tree_flatten_with_path(intermediates)[0]
        if path[-2].key == "__call__"
    }
    macs: dict[str, int] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables["params"])[0]:
        names = tuple(k.key for k in path)
        if names[-1] != "kernel":
            continue
        module = names[:-1]
        if module not in outputs:
            raise ValueError(f"no captured output for layer {_path_str(module)!r}")
        macs[_path_str(names)] = flops.matmul_macs(leaf.shape, outputs[module])
    return macs
