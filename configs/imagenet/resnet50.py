"""ResNet-50 on ImageNet with Top-KAST (paper §4, Appendix B). Argument: ``fwd,bwd`` sparsities.

Command (forward sparsity 80%, backward 50%; the paper's Figure 2 / Table 6 default)::

  python -m experiments.imagenet.main --config configs/imagenet/resnet50.py:0.8,0.5 \\
      --workdir /tmp/imagenet/topkast_80_50 --config.data.path=$TFDS_DATA_DIR

Check the model and its densities and training FLOPs without data or weights (CPU, seconds)::

  python -m experiments.imagenet.main --config configs/imagenet/resnet50.py:0.8,0.5 \\
      --workdir /tmp/imagenet/dry --dry_run

Data: TFDS ``imagenet2012`` prepared once as array_record (needs the manually downloaded tars and,
for that step only, TensorFlow)::

  tfds build imagenet2012 --manual_dir=$MANUAL_DIR --file_format=array_record \\
      --data_dir=$TFDS_DATA_DIR

Setup (Appendix B): batch 4096, 32,000 steps (≈102 epochs of 1,281,167 images), SGD with momentum
0.9, learning rate 1.6 · batch/4096 with a linear warmup over 5 epochs and ×0.1 at epochs 30, 70
and 90, label smoothing 0.1, weight decay 1e-4 — the exploration penalty's λ on Top-KAST's sparse
kernels and plain L2 on the other kernels (first convolution, classifier; every kernel of the
baselines, as RigL's recipe). First and last layers stay dense
unless ``--config.sparsity.sparse_first_last=True``; BatchNorm parameters are always dense.

Accelerator: written for 8×A100/H100 80 GB (or a TPU v3-32 slice) with bfloat16
(``half_precision=True``, the default), one process per host, the batch split over all devices,
and ~80 host CPU cores for JPEG decoding (Pillow decode + crop ran at ~250 images/s per core
here; raise ``--config.data.num_workers``). Expected time:
≈ 2–3 h for 32,000 steps on 8×A100 — an estimate from the usual bf16 ResNet-50 throughput
(~2,500 images/s per A100; 32,000 × 4096 = 131M images), not a measurement: no accelerator was
available when this was written. The masks are applied densely (θ ⊙ A), so sparsity does not make
a step faster; measure with ``--config.data.name=synthetic`` first.

Paper results (top-1 on the validation split, first/last dense): 80/50 → 75.03 (Table 6, N=1),
90/80 → 73.03, 95/90 → 70.42 (Table 1); 80/0 (dense backward) and the other points of Figure 2 are
only plotted in the paper, not tabulated.
"""

import ml_collections

from experiments.common.baselines_config import add_baseline_fields
from experiments.common.config_utils import parse_sparsity_arg

#: Paper reference values.
NUM_TRAIN_EXAMPLES = 1_281_167
NUM_EVAL_EXAMPLES = 50_000
REFERENCE_STEPS = 32_000
REFERENCE_BATCH = 4096


def steps_per_epoch(batch_size: int) -> float:
    """Optimizer steps in one pass over the 1,281,167 training images."""
    return NUM_TRAIN_EXAMPLES / batch_size


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """ResNet-50 / ImageNet / Top-KAST config; ``arg`` = ``"fwd,bwd"`` (default ``"0.8,0.5"``)."""
    forward, backward = parse_sparsity_arg(arg, (0.8, 0.5))
    c = ml_collections.ConfigDict()

    c.model = "resnet50"
    c.num_classes = 1000
    c.image_size = 224
    c.eval_resize_size = 256
    c.half_precision = True  # bfloat16 activations and inputs; float32 params and optimizer
    c.export_at_end = True  # <workdir>/export: theta*A compact + batch_stats (tk.export)

    c.batch_size = REFERENCE_BATCH
    c.num_train_steps = REFERENCE_STEPS
    c.reference_steps = REFERENCE_STEPS  # the 1× length for train_flops_vs_dense
    c.num_train_examples = NUM_TRAIN_EXAMPLES
    c.num_eval_examples = NUM_EVAL_EXAMPLES  # 0: the whole split
    c.eval_batch_size = 1024
    c.checkpoint_every_steps = 1000
    c.eval_every_steps = 4000  # 0: only at the end
    c.log_every_steps = 100
    c.mask_stats_every_steps = 1000  # tk.mask_stats (reservoir activation, Figure 3b)
    c.mask_window_steps = 5000  # per-layer forward-mask change over this window (Figure 3a)
    c.seed = 0

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.base_learning_rate = 1.6  # at batch 4096; scaled linearly with the batch
    c.optimizer.momentum = 0.9
    c.optimizer.nesterov = False
    c.optimizer.warmup_epochs = 5.0
    c.optimizer.decay_epochs = (30.0, 70.0, 90.0)
    c.optimizer.decay_factor = 0.1
    c.optimizer.weight_decay = 1e-4  # plain L2 on kernels (not Top-KAST's sparse ones)
    c.label_smoothing = 0.1

    c.sparsity = ml_collections.ConfigDict()
    c.sparsity.method = "topkast"
    c.sparsity.forward = forward
    c.sparsity.backward = backward
    c.sparsity.refresh_every = 1
    c.sparsity.exploration_l2 = 1e-4  # λ of the exploration penalty = the weight decay
    c.sparsity.distribution = "uniform"
    c.sparsity.backward_selection = "magnitude"  # or "random" (Table 1)
    c.sparsity.stop_exploration_step = ml_collections.config_dict.placeholder(int)
    c.sparsity.global_topk = False
    c.sparsity.sparse_first_last = False
    # N:M Top-KAST (an extension of the paper): "2:4" or "2:4/3:4" (A n:m, B n_B:m per group of m
    # along each conv kernel's input channels); its n/m and n_B/m replace forward and backward.
    c.sparsity.structure = ml_collections.config_dict.placeholder(str)
    add_baseline_fields(c.sparsity)  # --config.sparsity.method=static|pruning|set|rigl

    c.data = ml_collections.ConfigDict()
    c.data.name = "imagenet2012"  # or "synthetic"
    c.data.path = ml_collections.config_dict.placeholder(str)  # TFDS data_dir
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.num_threads = 32
    c.data.num_workers = 0  # grain worker processes (raise to use many cores)
    return c
