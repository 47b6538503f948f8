r"""Training FLOPs of a sparse run relative to a dense run (the x-axis of the paper's Figure 2a).

A layer whose forward pass is one matrix multiplication (a dense layer, or a convolution seen as a
matmul over its output positions) costs, per example, :math:`c_\ell` multiply-adds:

* dense layer: :math:`c_\ell = d_\text{in} d_\text{out}` (times the number of positions it is
  applied at, e.g. the sequence length);
* convolution: :math:`c_\ell = k_h k_w C_\text{in} C_\text{out} \cdot H_\text{out} W_\text{out}`,
  i.e. ``kernel.size × output positions``.

Training on one example costs three matmuls per layer: the forward pass :math:`y = xW`, the
activation gradient :math:`\partial L/\partial x = (\partial L/\partial y) W^\top` and the weight
gradient :math:`\partial L/\partial W = x^\top (\partial L/\partial y)`. With Top-KAST the forward
pass and the activation gradient use :math:`\alpha = \theta \odot A`, whose density is the forward
density :math:`D_\ell`, and the weight gradient is only needed on :math:`B`, whose density is the
backward density :math:`D_\ell + M_\ell`. A dense layer has :math:`D_\ell = D_\ell + M_\ell = 1`.
So, for a run of :math:`s` times the reference number of steps,

.. math::

    \text{train\_flops\_vs\_dense} = s \cdot
      \frac{\sum_\ell c_\ell \,(2 D_\ell + (D_\ell + M_\ell))}{\sum_\ell 3\, c_\ell}.

Conventions (those of RigL, Evci et al. 2020, which the paper's Figure 2 follows): only the
matmul/convolution FLOPs count — BatchNorm, activations, pooling, the loss, the optimizer update
and the top-k selection are ignored (they are a small fraction for ResNet-50); the activation
gradient of the very first layer is counted although nobody needs it; the masks are assumed to be
used by kernels that skip zeros, so the figure is the *theoretical* cost. Example: a model whose
every layer has forward sparsity 0.8 and backward sparsity 0.5 costs
:math:`(2\cdot 0.2 + 0.5)/3 = 0.3` of dense per step; ResNet-50 with dense first and last layers
costs 0.3206 (its first convolution holds 2.9% of the multiply-adds).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """One matmul-like layer: its per-example multiply-adds and its densities.

    Attributes:
      path: name of the layer's weight (for reports).
      macs: :math:`c_\\ell`, forward multiply-adds per example at full density.
      forward: :math:`D_\\ell`, fraction of the weight used in the forward pass (1 for dense).
      backward: :math:`D_\\ell + M_\\ell`, fraction of the weight that receives gradients
        (1 for dense).
    """

    path: str
    macs: float
    forward: float = 1.0
    backward: float = 1.0

    def __post_init__(self) -> None:
        if not self.macs >= 0:
            raise ValueError(f"LayerCost {self.path!r}: macs must be >= 0, got {self.macs}")
        if not 0.0 <= self.forward <= 1.0:
            raise ValueError(
                f"LayerCost {self.path!r}: forward must be in [0, 1], got {self.forward}"
            )
        if not self.forward <= self.backward <= 1.0:
            raise ValueError(
                f"LayerCost {self.path!r}: backward density must be in [forward, 1] = "
                f"[{self.forward}, 1], got {self.backward}"
            )


def matmul_macs(kernel_shape: Sequence[int], output_shape: Sequence[int]) -> int:
    """Per-example multiply-adds of a dense layer or convolution.

    The layer applies its kernel (of ``prod(kernel_shape)`` weights, e.g. kh×kw×Cin×Cout for a
    convolution or din×dout for a dense layer) once per output position; with a channels-last
    ``output_shape`` = (batch, *positions, Cout) the number of positions is
    ``prod(output_shape[1:-1])`` (1 for a (batch, Cout) dense output).

    Args:
      kernel_shape: shape of the weight.
      output_shape: shape of the layer's output, batch first and channels last.

    Returns:
      ``prod(kernel_shape) * prod(output_shape[1:-1])``.

    Raises:
      ValueError: ``output_shape`` has fewer than 2 dimensions.
    """
    if len(output_shape) < 2:
        raise ValueError(
            f"output_shape must be (batch, ..., channels) with >= 2 dims, got {tuple(output_shape)}"
        )
    return math.prod(kernel_shape) * math.prod(output_shape[1:-1])


def step_flops_vs_dense(layers: Iterable[LayerCost]) -> float:
    r"""Training FLOPs of one step relative to a dense step: :math:`\sum c(2D + B) / \sum 3c`.

    Args:
      layers: the model's matmul-like layers (sparse and dense).

    Raises:
      ValueError: no layers, or all layers have zero cost.
    """
    layers = list(layers)
    dense = sum(3.0 * layer.macs for layer in layers)
    if not layers or dense <= 0:
        raise ValueError("layers must contain at least one layer with macs > 0")
    sparse = sum(layer.macs * (2.0 * layer.forward + layer.backward) for layer in layers)
    return sparse / dense


def train_flops_vs_dense(layers: Iterable[LayerCost], steps_multiplier: float = 1.0) -> float:
    """Training FLOPs of a sparse run relative to a dense run of the reference length.

    Args:
      layers: the model's matmul-like layers with their densities (see module docstring).
      steps_multiplier: s, training length relative to the dense reference run (1, 2 or 5 for the
        paper's 1×/2×/5× runs); see :func:`steps_multiplier`.

    Returns:
      :math:`s \\cdot \\sum_\\ell c_\\ell (2 D_\\ell + D_\\ell + M_\\ell) / \\sum_\\ell 3 c_\\ell`.

    Raises:
      ValueError: ``steps_multiplier`` <= 0, or see :func:`step_flops_vs_dense`.
    """
    if not steps_multiplier > 0:
        raise ValueError(f"steps_multiplier must be > 0, got {steps_multiplier}")
    return steps_multiplier * step_flops_vs_dense(layers)


def steps_multiplier(num_train_steps: int, reference_steps: int) -> float:
    """Training length relative to the reference: ``num_train_steps / reference_steps``.

    Args:
      num_train_steps: steps of the run (e.g. 64,000 for the paper's 2× ImageNet runs).
      reference_steps: steps of the dense reference run (32,000 for ImageNet).

    Raises:
      ValueError: either argument is not positive.
    """
    if num_train_steps <= 0 or reference_steps <= 0:
        raise ValueError(
            "num_train_steps and reference_steps must be > 0, got "
            f"{num_train_steps} and {reference_steps}"
        )
    return num_train_steps / reference_steps
