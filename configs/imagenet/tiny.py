"""A tiny ResNet on synthetic 32×32 images: the ImageNet code path end to end on a CPU.

Command (CPU, ~30 s including compilation; no data needed)::

  python -m experiments.imagenet.main --config configs/imagenet/tiny.py:0.8,0.5 \\
      --workdir /tmp/imagenet_tiny

Same trainer as ``resnet50.py`` (Top-KAST around SGD + momentum, warmup + step decay, label
smoothing, checkpoint/resume, mask statistics, summary.json), with a two-stage 8-filter ResNet and
random images and labels generated on the device, so the accuracy is chance (≈ 10%): it checks the
machinery, not the paper. Point it at real data with ``--config.data.name=imagenet2012``.
"""

import ml_collections

from configs.imagenet import resnet50


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``resnet50.get_config(arg)`` shrunk to a CPU-sized model, batch and run."""
    c = resnet50.get_config(arg)
    c.model = "resnet_tiny"
    c.num_classes = 10
    c.image_size = 32
    c.eval_resize_size = 36
    c.half_precision = False
    c.batch_size = 16
    c.eval_batch_size = 16
    c.num_train_steps = 20
    c.reference_steps = 20
    c.num_train_examples = 16 * 10  # 10 steps per "epoch"
    c.num_eval_examples = 32
    c.optimizer.base_learning_rate = 25.6  # peak 25.6 · 16/4096 = 0.1, so masks move in 20 steps
    c.optimizer.warmup_epochs = 0.5
    c.optimizer.decay_epochs = (1.0, 1.5)
    c.checkpoint_every_steps = 10
    c.eval_every_steps = 10
    c.log_every_steps = 5
    c.mask_stats_every_steps = 5
    c.mask_window_steps = 10
    c.data.name = "synthetic"
    c.data.num_threads = 2
    return c
