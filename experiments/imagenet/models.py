"""ResNet v1 (bottleneck) in Flax Linen, as used for sparse ImageNet training.

The architecture is the ResNet-50 v1 that the paper's ImageNet numbers are compared against: RigL's
(Evci et al. 2020, ``rigl/imagenet_resnet/resnet_model.py`` in google-research/rigl, itself the
TPU reference ResNet that Gale et al. 2019 also used). Each choice follows that file:

- a 7×7/2 stem convolution (``initial_conv``), a 3×3/2 max-pool with TF ``SAME`` padding
  (``initial_max_pool``), four stages of bottleneck blocks ([3, 4, 6, 3] for ResNet-50;
  ``block_group1..4``) whose stride sits on the 3×3 convolution (``bottleneck_block_``; the "v1.5"
  placement), 1×1 projection shortcuts in the first block of a stage, global average pooling and
  one dense classifier;
- every convolution is ``conv2d_fixed_padding``: the input is padded by
  ``((k - 1) // 2, k - 1 - (k - 1) // 2)`` on each spatial side whatever the stride
  (:func:`fixed_padding`; ``fixed_padding`` there, also torchvision's ``(k - 1) // 2``). At stride
  1 this equals ``SAME``; at stride 2 on an even input ``SAME`` would pad (0, 1) instead of (1, 1)
  for the 3×3 convolutions, shifting the sampling grid by one pixel;
- no convolution bias; BatchNorm after every convolution with decay 0.9 and epsilon 1e-5
  (``BATCH_NORM_DECAY``, ``BATCH_NORM_EPSILON``), the last one of each residual branch starting at
  zero scale (``init_zero=True``).

Not followed: RigL initialises the classifier with ``normal(0.01)``; here it is Flax's default
(LeCun normal). With 1000 classes ResNet-50 has 25,557,032 parameters
(23,454,912 in convolution kernels, 2,049,000 in the classifier, 53,120 BatchNorm scales/biases).

Module names matter to the sparsity code: the stem convolution is ``conv_init`` and the classifier
is ``head``, so ``tk.sparsify.kernels_except(("conv_init", "head"))`` keeps the first and last
layers dense (the paper's main setting).

BatchNorm and data parallelism: under ``jax.jit`` over a ``Mesh`` with the batch sharded along the
``data`` axis, ``nn.BatchNorm`` computes its mean and variance with ``jnp.mean`` over the *global*
batch axis of a globally-sharded array, so XLA inserts the cross-device reduction itself; the
statistics are those of the whole global batch (what ``axis_name=`` achieves under ``pmap``). This
is verified by ``tests/experiments/imagenet/test_imagenet_models.py`` on 8 host devices.
"""

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

ModuleDef = Any

#: Number of residual blocks per stage for the standard depths.
STAGE_SIZES: dict[int, tuple[int, ...]] = {
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
}

#: Names of the first (stem) convolution and the final classifier.
FIRST_LAYER_NAME = "conv_init"
LAST_LAYER_NAME = "head"


def fixed_padding(kernel_size: int) -> tuple[int, int]:
    """``(before, after)`` zero padding of a ``kernel_size`` convolution on one spatial axis.

    ``before = (k - 1) // 2``, ``after = k - 1 - before``, independent of the stride and the input
    size (RigL's / the TPU ResNet's ``fixed_padding``). An ``H``-pixel axis convolved with stride
    ``s`` then gives ``floor((H - 1) / s) + 1`` outputs, output ``o`` centred on input ``s o``.
    """
    before = (kernel_size - 1) // 2
    return before, kernel_size - 1 - before


def fixed_padding_conv(conv: ModuleDef) -> Callable[..., nn.Module]:
    """``conv`` (a partially-applied ``nn.Conv``) with :func:`fixed_padding` on both axes."""

    def make(features: int, kernel_size: tuple[int, int], strides=(1, 1), **kw) -> nn.Module:
        padding = [fixed_padding(k) for k in kernel_size]
        return conv(features, kernel_size, strides, padding=padding, **kw)

    return make


class BottleneckBlock(nn.Module):
    """ResNet v1 bottleneck block: 1×1 → 3×3 (strided) → 1×1 (×4 channels), residual add, ReLU.

    RigL's ``bottleneck_block_``: the stride on the 3×3 convolution, a 1×1 projection shortcut
    (BatchNorm, no ReLU) where the shape changes, and the last BatchNorm of the residual branch
    initialised with zero scale, so every block starts as the identity (Goyal et al. 2017).

    Attributes:
      filters: F, channels of the bottleneck; the block outputs 4F channels.
      conv: builds an ``nn.Conv`` (no bias, given dtype, :func:`fixed_padding`) from
        ``(features, kernel_size, strides)``.
      norm: a partially-applied ``nn.BatchNorm`` (train/eval mode already set).
      strides: spatial stride of the 3×3 convolution and of the projection shortcut.
    """

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x_BxHxWxC: jnp.ndarray) -> jnp.ndarray:
        """Maps x_BxHxWxC to y_BxH'xW'x4F with H' = H / stride."""
        y = self.conv(self.filters, (1, 1), name="conv1")(x_BxHxWxC)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.filters, (3, 3), self.strides, name="conv2")(y)
        y = nn.relu(self.norm(name="bn2")(y))
        y = self.conv(self.filters * 4, (1, 1), name="conv3")(y)
        y = self.norm(scale_init=nn.initializers.zeros_init(), name="bn3")(y)
        residual = x_BxHxWxC
        if residual.shape != y.shape:
            residual = self.conv(self.filters * 4, (1, 1), self.strides, name="conv_proj")(residual)
            residual = self.norm(name="bn_proj")(residual)
        return nn.relu(residual + y)


class ResNet(nn.Module):
    """ResNet v1 with bottleneck blocks for NHWC images.

    Attributes:
      stage_sizes: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
      num_classes: K, number of output logits.
      num_filters: F0, bottleneck channels of the first stage (doubled at each stage) and stem
        channels.
      dtype: computation dtype (parameters stay float32).
      bn_momentum: BatchNorm running-average decay.
      bn_epsilon: BatchNorm variance epsilon.
      stem_kernel: stem convolution size (7 for ImageNet; tiny test models may use 3).
      stem_pool: whether to max-pool 3×3/2 after the stem.
    """

    stage_sizes: Sequence[int]
    num_classes: int
    num_filters: int = 64
    dtype: Any = jnp.float32
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    stem_kernel: int = 7
    stem_pool: bool = True

    @nn.compact
    def __call__(self, images_BxHxWx3: jnp.ndarray, train: bool = True) -> jnp.ndarray:
        """Returns logits_BxK for images_BxHxWx3 (normalised pixels).

        Args:
          images_BxHxWx3: input batch, NHWC.
          train: use batch statistics (and update ``batch_stats``) if True, running averages if
            False.
        """
        conv = fixed_padding_conv(partial(nn.Conv, use_bias=False, dtype=self.dtype))
        norm = partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
        )
        k = self.stem_kernel
        x = conv(self.num_filters, (k, k), (2, 2), name="conv_init")(images_BxHxWx3)
        x = nn.relu(norm(name="bn_init")(x))
        if self.stem_pool:
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        for stage, num_blocks in enumerate(self.stage_sizes):
            for block in range(num_blocks):
                strides = (2, 2) if stage > 0 and block == 0 else (1, 1)
                x = BottleneckBlock(
                    filters=self.num_filters * 2**stage,
                    conv=conv,
                    norm=norm,
                    strides=strides,
                    name=f"stage{stage + 1}_block{block + 1}",
                )(x)
        features_BxC = jnp.mean(x, axis=(1, 2))
        logits_BxK = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(features_BxC)
        return jnp.asarray(logits_BxK, jnp.float32)


ResNet50: Callable[..., ResNet] = partial(ResNet, stage_sizes=STAGE_SIZES[50])
ResNet101: Callable[..., ResNet] = partial(ResNet, stage_sizes=STAGE_SIZES[101])
#: Two one-block stages, 8 filters, 3×3 stem: a few thousand parameters, for CPU tests.
ResNetTiny: Callable[..., ResNet] = partial(
    ResNet, stage_sizes=(1, 1), num_filters=8, stem_kernel=3, stem_pool=False
)

_MODELS: dict[str, Callable[..., ResNet]] = {
    "resnet50": ResNet50,
    "resnet101": ResNet101,
    "resnet_tiny": ResNetTiny,
}


def create_model(name: str, *, num_classes: int, dtype: Any = jnp.float32) -> ResNet:
    """Builds the named model.

    Args:
      name: one of "resnet50", "resnet101", "resnet_tiny".
      num_classes: number of output logits.
      dtype: computation dtype, e.g. ``jnp.bfloat16``.

    Raises:
      ValueError: unknown ``name``.
    """
    if name not in _MODELS:
        raise ValueError(f"model name must be one of {sorted(_MODELS)}, got {name!r}")
    return _MODELS[name](num_classes=num_classes, dtype=dtype)
