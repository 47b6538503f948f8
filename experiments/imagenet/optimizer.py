"""The ImageNet optimizer (Appendix B): SGD + momentum, warmup + step decay, L2 on kernels.

The learning rate for a global batch ``b`` is :math:`\\eta = 1.6 \\cdot b / 4096`, ramped linearly
from 0 over the first 5 epochs and multiplied by 0.1 at epochs 30, 70 and 90. For runs longer or
shorter than the reference 32,000 steps (Figure 2's 2× and 5× runs) every epoch boundary is
stretched by ``num_train_steps / reference_steps``, so the schedule keeps its shape.

Weight decay 1e-4 is plain L2 (``optax.add_decayed_weights`` before momentum, i.e. coupled L2 like
the paper's) on every kernel, except Top-KAST's sparse kernels, where it is the λ of the
exploration penalty (applied inside ``tk.topkast``). The baselines (static, pruning, SET, RigL)
decay their sparse kernels as RigL's ImageNet recipe does (google-research/rigl
``imagenet_train_eval.py``: ``--weight_decay 1e-4``, an ``l2_regularizer`` on every convolution and
the classifier kernel, added to the loss): the L2 gradient ``λθ`` enters the masked inner
optimizer, so the active weights decay and the inactive ones stay exactly 0. Biases and BatchNorm
parameters are not decayed.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax

from experiments.common.sparsity import make_sparse_optimizer


def learning_rate_schedule(config: Any) -> optax.Schedule:
    """Linear warmup to ``base · batch/4096`` then ×``decay_factor`` at each decay epoch.

    Args:
      config: the experiment config (``optimizer.*``, ``batch_size``, ``num_train_examples``,
        ``num_train_steps``, ``reference_steps``).

    Raises:
      ValueError: decay epochs not increasing, or negative warmup.
    """
    opt = config.optimizer
    steps_per_epoch = config.num_train_examples / config.batch_size
    stretch = config.num_train_steps / config.get("reference_steps", config.num_train_steps)
    peak = opt.base_learning_rate * config.batch_size / 4096
    if opt.warmup_epochs < 0:
        raise ValueError(f"config.optimizer.warmup_epochs must be >= 0, got {opt.warmup_epochs}")
    decay_epochs = tuple(opt.decay_epochs)
    if list(decay_epochs) != sorted(decay_epochs):
        raise ValueError(f"config.optimizer.decay_epochs must increase, got {decay_epochs}")
    warmup_steps = int(round(opt.warmup_epochs * steps_per_epoch * stretch))
    boundaries = {
        int(round(e * steps_per_epoch * stretch)) - warmup_steps: opt.decay_factor
        for e in decay_epochs
    }
    constant = optax.piecewise_constant_schedule(peak, boundaries)
    if warmup_steps == 0:
        return constant
    warmup = optax.linear_schedule(0.0, peak, warmup_steps)
    return optax.join_schedules([warmup, constant], [warmup_steps])


def l2_mask(params: Any, sparse_flags: Any, method: str) -> Any:
    """Bool pytree: which leaves get plain L2 — every kernel (ndim ≥ 2) but Top-KAST's sparse
    ones (their L2 is the exploration penalty); the baselines' sparse kernels included."""
    return jax.tree.map(
        lambda p, sparse: bool(np.ndim(p) >= 2 and (method != "topkast" or not sparse)),
        params,
        sparse_flags,
    )


def make_optimizer(
    config: Any, params: Any, sparsify: Any
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Top-KAST (or dense) around SGD + momentum with the Appendix B schedule.

    Args:
      config: experiment config.
      params: params pytree (arrays or ``jax.ShapeDtypeStruct``), for the L2 mask.
      sparsify: callable params -> bool pytree of sparse leaves.

    Returns:
      ``(tx, schedule)``.
    """
    schedule = learning_rate_schedule(config)
    opt = config.optimizer
    decay = l2_mask(params, sparsify(params), config.sparsity.method)
    inner = optax.chain(
        optax.add_decayed_weights(opt.weight_decay, mask=decay),
        optax.sgd(schedule, momentum=opt.momentum, nesterov=opt.nesterov),
    )
    tx = make_sparse_optimizer(
        inner, config.sparsity, sparsify, seed=config.seed, num_train_steps=config.num_train_steps
    )
    return tx, schedule
