"""Flax Linen helper for always-sparse Top-KAST: each layer builds its own dense ``α``.

With ``tk.AlwaysSparse(..., lazy_alpha=True)`` the loss receives every sparse leaf as a
:class:`~topkast_jax.always_sparse_device.SparseLeaf` (``k_B`` values and indices).  A layer class
wrapped by :func:`layerwise` densifies its own sparse params when it runs (``nn.map_variables``)
and, with ``remat=True``, again in the backward pass (``nn.remat``), so one layer's dense ``α``
and ``∂L/∂α`` are live at a time instead of the whole model's::

    Dense = tk.always_sparse_linen.layerwise(nn.Dense)

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            for width in (4096, 4096):
                x = nn.relu(Dense(width)(x))
            return Dense(10)(x)

Dense params pass through unchanged, so the same model also runs with ``tk.topkast`` or
without sparsity.  Needs ``flax`` (imported when :func:`layerwise` is called).
"""

from __future__ import annotations

from typing import Any

from topkast_jax.always_sparse_device import densify_leaves


def layerwise(module_cls: Any, *, remat: bool = True) -> Any:
    """``module_cls`` whose :class:`SparseLeaf` params become dense ``α`` inside the layer.

    Args:
      module_cls: a Flax Linen module class (e.g. ``nn.Dense``, ``nn.Conv``, a block).
      remat: also rebuild the layer (and its ``α``) in the backward pass instead of keeping it.

    Returns:
      A module class with the same constructor arguments.
    """
    import flax.linen as nn

    mapped = nn.map_variables(module_cls, "params", trans_in_fn=densify_leaves, init=True)
    return nn.remat(mapped) if remat else mapped
