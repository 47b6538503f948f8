"""ImageNet training and evaluation of a Top-KAST ResNet (paper §4, Appendix B).

One jitted, donated step over a data-parallel ``Mesh`` (params and optimizer state replicated, the
batch sharded along ``"data"``)::

  α = tk.forward_params(θ, opt_state)                      # θ ⊙ A on sparse kernels
  logits_BxK, stats' = ResNet(α, stats, normalize(images_BxSxSx3), train=True)
  g = ∂ CE(logits, smooth(labels, 0.1)) / ∂α
  u, opt_state = tx.update(g, opt_state, θ)               # Top-KAST around SGD + momentum
  θ ← θ + u

Evaluation uses α with BatchNorm running averages; top-1 / top-5 are counted over exactly the
examples of the split (padding masked). The workdir holds ``config.json``, ``metrics.jsonl`` (+
TensorBoard events), ``checkpoints/`` (state + data position + elapsed wall time; a rerun resumes
from the latest), and at the end ``summary.json``. A non-finite training loss stops the run before
anything is saved, keeping the last good checkpoint.

Mask dynamics for Figure 3: every ``mask_stats_every_steps`` the library's ``tk.mask_stats`` are
logged under ``masks/`` (``reservoir_activated`` = fraction of the initial reservoir C₀ that has
entered A); every ``mask_window_steps`` (5000) the per-layer fraction of the forward mask that
differs from the mask one window earlier, :math:`\\sum (m^t - m^{t-5000})^2 / |\\theta_\\ell|`, is
logged as ``masks/window_change/<layer>`` (+ ``_min`` / ``_mean`` / ``_max`` over layers). The
previous window's mask lives in the checkpointed state, so resumed runs log the same numbers.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

import topkast_jax as tk
from experiments.common import config_rules, config_utils, guard, mask_dynamics
from experiments.common import dry_run as dry_run_lib
from experiments.common import export as export_lib
from experiments.common import mesh as mesh_lib
from experiments.common import sparsity as sparsity_lib
from experiments.common import summary as summary_lib
from experiments.common import updates as updates_lib
from experiments.common import workdir as workdir_lib
from experiments.common.checkpoint import Checkpointer
from experiments.common.metrics import MetricsWriter
from experiments.common.progress import ProgressLogger
from experiments.imagenet import costs, input_pipeline, models
from experiments.imagenet.optimizer import make_optimizer
from topkast_jax import flops

State = dict[str, Any]
Batch = dict[str, jax.Array]

#: ``summary.json`` keys: the shared schema (``experiments/common/summary.py``) and the final
#: evaluation on the validation split (accuracies in %).
SUMMARY_KEYS = summary_lib.SUMMARY_KEYS + ("valid_top1", "valid_top5", "valid_loss")


# --------------------------------------------------------------------------------------------------
# Model, sparsity and FLOPs (no weights needed).
# --------------------------------------------------------------------------------------------------


def compute_dtype(config: ml_collections.ConfigDict) -> Any:
    """bfloat16 if ``config.half_precision`` else float32."""
    return jnp.bfloat16 if config.get("half_precision", False) else jnp.float32


def create_model(config: ml_collections.ConfigDict) -> models.ResNet:
    """The configured ResNet."""
    return models.create_model(
        config.model, num_classes=config.num_classes, dtype=compute_dtype(config)
    )


def sparsify_fn(config: ml_collections.ConfigDict) -> Callable[[Any], Any]:
    """Sparse leaves: every kernel, except the first conv and the classifier unless
    ``sparsity.sparse_first_last``. BatchNorm scales/biases and the classifier bias stay dense."""
    if config.sparsity.get("sparse_first_last", False):
        return tk.sparsify.kernels(min_ndim=2)
    return tk.sparsify.kernels_except((models.FIRST_LAYER_NAME, models.LAST_LAYER_NAME), min_ndim=2)


def abstract_variables(model: models.ResNet, image_size: int) -> Any:
    """``{"params", "batch_stats"}`` as ``jax.ShapeDtypeStruct`` (nothing allocated)."""
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)


def layer_rows(config: ml_collections.ConfigDict, params: Any) -> list[dict[str, Any]]:
    """Per-leaf rows (name, shape, params, sparse, forward/backward density) for the plan."""
    return dry_run_lib.plan_rows(params, config.sparsity, sparsify_fn(config))


def training_cost(
    config: ml_collections.ConfigDict, model: models.ResNet, variables: Any, rows: list[dict]
) -> dict[str, float]:
    """``train_flops_vs_dense`` (and its parts) from the per-layer densities and multiply-adds."""
    macs = costs.layer_macs(model, variables, (1, config.image_size, config.image_size, 3))
    by_name = {r["name"]: r for r in rows}
    layers = [
        flops.LayerCost(
            name,
            c,
            by_name[name]["forward_density"],
            by_name[name]["backward_density"],
        )
        for name, c in macs.items()
    ]
    multiplier = flops.steps_multiplier(
        config.num_train_steps, config.get("reference_steps", config.num_train_steps)
    )
    return {
        "train_flops_vs_dense": flops.train_flops_vs_dense(layers, multiplier),
        "step_flops_vs_dense": flops.step_flops_vs_dense(layers),
        "steps_multiplier": multiplier,
        "forward_gmacs_per_example": sum(macs.values()) / 1e9,
    }


def dry_run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Report parameters, per-layer densities and training FLOPs without materialising weights.

    Prints the table and writes ``<workdir>/dry_run.json`` (``total_params``, densities,
    ``train_flops_vs_dense``, ``layers``).
    """
    model = create_model(config)
    variables = abstract_variables(model, config.image_size)
    rows = layer_rows(config, variables["params"])
    extra = {"model": config.model, "sparsity": config.sparsity.to_dict()}
    extra.update(training_cost(config, model, variables, rows))
    record = dry_run_lib.write_dry_run(workdir, rows, extra)
    if mesh_lib.is_primary():
        rule = dry_run_lib.sparsify_rule(sparsify_fn(config))
        print(
            dry_run_lib.format_table(rows, dry_run_lib.totals(rows), config.sparsity.method, rule)
        )
        print(
            f"train_flops_vs_dense {record['train_flops_vs_dense']:.4f} "
            f"(per step {record['step_flops_vs_dense']:.4f} × {record['steps_multiplier']:g} "
            f"the {config.get('reference_steps', config.num_train_steps)} reference steps)"
        )
    return record


# --------------------------------------------------------------------------------------------------
# Loss, steps.
# --------------------------------------------------------------------------------------------------


def cross_entropy(logits_BxK: jax.Array, labels_B: jax.Array, smoothing: float) -> jax.Array:
    """Mean cross-entropy against one-hot labels smoothed by ``smoothing`` (scalar, float32)."""
    one_hot_BxK = jax.nn.one_hot(labels_B, logits_BxK.shape[-1])
    targets_BxK = optax.smooth_labels(one_hot_BxK, smoothing) if smoothing else one_hot_BxK
    return jnp.mean(optax.softmax_cross_entropy(logits_BxK, targets_BxK))


def topk_correct(logits_BxK: jax.Array, labels_B: jax.Array, k: int) -> jax.Array:
    """bool[B]: label among the ``k`` largest logits."""
    k = min(k, logits_BxK.shape[-1])
    _, top_BxK = jax.lax.top_k(logits_BxK, k)
    return jnp.any(top_BxK == labels_B[:, None], axis=-1)


def make_train_step(
    model: models.ResNet,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    config: ml_collections.ConfigDict,
    refresh_masks: bool | None = None,
) -> Callable[[State, Batch], tuple[State, dict[str, jax.Array]]]:
    """The (un-jitted) train step ``(state, batch) -> (state, metrics)``; ``refresh_masks`` is
    passed to Top-KAST's ``update`` when not ``None`` (``False`` where the loop refreshes A and B
    in a program of its own, :mod:`experiments.common.updates`)."""
    static = {} if refresh_masks is None else {"refresh_masks": refresh_masks}
    dtype = compute_dtype(config)
    smoothing = float(config.label_smoothing)

    def train_step(state: State, batch: Batch) -> tuple[State, dict[str, jax.Array]]:
        params, opt_state = state["params"], state["opt_state"]
        alpha = tk.forward_params(params, opt_state)
        images = input_pipeline.normalize_images(batch["image"], dtype)

        def loss_fn(alpha: Any) -> tuple[jax.Array, tuple[jax.Array, Any]]:
            logits_BxK, updated = model.apply(
                {"params": alpha, "batch_stats": state["batch_stats"]},
                images,
                train=True,
                mutable=["batch_stats"],
            )
            loss = cross_entropy(logits_BxK, batch["label"], smoothing)
            return loss, (logits_BxK, updated["batch_stats"])

        (loss, (logits_BxK, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(alpha)
        updates, opt_state = tx.update(grads, opt_state, params, **static)
        params = optax.apply_updates(params, updates)
        new_state = dict(
            state,
            step=state["step"] + 1,
            params=params,
            batch_stats=batch_stats,
            opt_state=opt_state,
            loss_sum=state["loss_sum"] + loss,
        )
        metrics = {
            "loss": loss,
            "top1": 100.0 * jnp.mean(topk_correct(logits_BxK, batch["label"], 1)),
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": schedule(state["step"]),
            "exploration_penalty": summary_lib.exploration_penalty(params, opt_state),
        }
        return new_state, metrics

    return train_step


def make_eval_step(
    model: models.ResNet, config: ml_collections.ConfigDict
) -> Callable[[State, Batch], dict[str, jax.Array]]:
    """``(state, batch) -> {"count", "top1", "top5", "loss"}`` sums over valid examples."""
    dtype = compute_dtype(config)

    def eval_step(state: State, batch: Batch) -> dict[str, jax.Array]:
        alpha = tk.forward_params(state["params"], state["opt_state"])
        logits_BxK = model.apply(
            {"params": alpha, "batch_stats": state["batch_stats"]},
            input_pipeline.normalize_images(batch["image"], dtype),
            train=False,
        )
        mask_B = batch.get("mask", jnp.ones_like(batch["label"])).astype(jnp.float32)
        one_hot = jax.nn.one_hot(batch["label"], logits_BxK.shape[-1])
        return {
            "count": jnp.sum(mask_B),
            "top1": jnp.sum(mask_B * topk_correct(logits_BxK, batch["label"], 1)),
            "top5": jnp.sum(mask_B * topk_correct(logits_BxK, batch["label"], 5)),
            "loss": jnp.sum(mask_B * optax.softmax_cross_entropy(logits_BxK, one_hot)),
        }

    return eval_step


# --------------------------------------------------------------------------------------------------
# State.
# --------------------------------------------------------------------------------------------------


def init_state(
    model: models.ResNet, tx: optax.GradientTransformation, config: ml_collections.ConfigDict
) -> State:
    """Fresh train state (call under ``jax.jit``)."""
    images = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
    variables = model.init(jax.random.key(config.seed), images, train=False)
    opt_state = tx.init(variables["params"])
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": variables["params"],
        "batch_stats": variables["batch_stats"],
        "opt_state": opt_state,
        "mask_snapshot": tk.get_masks(opt_state).forward,
        "loss_sum": jnp.zeros((), jnp.float32),
    }


# --------------------------------------------------------------------------------------------------
# Data.
# --------------------------------------------------------------------------------------------------


def train_iterator(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, start_step: int
) -> Iterator[Batch]:
    """Global, sharded train batches starting at ``start_step`` (real or synthetic)."""
    global_bs = config.batch_size
    if config.data.name == "synthetic":
        sharding = {
            "image": mesh_lib.batch_sharded(mesh, 4),
            "label": mesh_lib.batch_sharded(mesh, 1),
        }
        make = jax.jit(
            lambda key: input_pipeline.synthetic_batch(
                key, global_bs, config.image_size, config.num_classes
            ),
            out_shardings=sharding,
        )
        key = jax.random.key(config.seed + 1)

        def synthetic() -> Iterator[Batch]:
            step = start_step
            while True:
                yield make(jax.random.fold_in(key, step))
                step += 1

        return synthetic()

    source = input_pipeline.data_source(config.data.name, config.data.train_split, config.data.path)
    local = input_pipeline.train_batches(
        source,
        batch_size=global_bs // jax.process_count(),
        image_size=config.image_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        start_step=start_step,
        num_threads=config.data.num_threads,
        num_workers=config.data.num_workers,
    )
    return (
        {k: mesh_lib.global_batch(v, mesh, global_bs) for k, v in batch.items()} for batch in local
    )


def eval_iterator(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Iterator[Batch]:
    """Global, sharded eval batches covering the eval split once (synthetic: a few random ones)."""
    global_bs = config.eval_batch_size
    mesh_lib.check_batch_divisible(global_bs, "eval_batch_size")
    if config.data.name == "synthetic":
        key = jax.random.key(config.seed + 2)
        num = max(1, -(-config.num_eval_examples // global_bs))
        return (
            jax.device_put(
                input_pipeline.synthetic_batch(
                    jax.random.fold_in(key, i), global_bs, config.image_size, config.num_classes
                ),
                {
                    "image": mesh_lib.batch_sharded(mesh, 4),
                    "label": mesh_lib.batch_sharded(mesh, 1),
                },
            )
            for i in range(num)
        )
    source = input_pipeline.data_source(config.data.name, config.data.eval_split, config.data.path)
    local = input_pipeline.eval_batches(
        source,
        batch_size=global_bs // jax.process_count(),
        image_size=config.image_size,
        resize_size=config.eval_resize_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        num_threads=config.data.num_threads,
        num_examples=config.num_eval_examples or None,
    )
    return (
        {k: mesh_lib.global_batch(v, mesh, global_bs) for k, v in batch.items()} for batch in local
    )


def evaluate(
    eval_step: Callable[[State, Batch], dict[str, jax.Array]],
    state: State,
    batches: Iterator[Batch],
) -> tuple[dict[str, float], int]:
    """``({"top1", "top5" (in %), "loss"}, examples)`` over all valid examples of the split."""
    totals: dict[str, float] = {}
    for batch in batches:
        for k, v in eval_step(state, batch).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    count = max(totals.get("count", 0.0), 1.0)
    scores = {
        "top1": 100.0 * totals.get("top1", 0.0) / count,
        "top5": 100.0 * totals.get("top5", 0.0) / count,
        "loss": totals.get("loss", 0.0) / count,
    }
    return scores, int(totals.get("count", 0.0))


def evaluations_left(config: ml_collections.ConfigDict) -> Callable[[int], float]:
    """``step -> evaluations still to run`` (periodic ones at ``step`` and later, plus the final
    one unless the last periodic one falls on the last step), for the progress ETA; every
    evaluation covers the same examples, so one evaluation is the unit."""
    every, total = config.eval_every_steps, config.num_train_steps

    def left(step: int) -> float:
        periodic = 0
        if every:
            first = -(-step // every) * every
            periodic = 0 if first > total else (total - first) // every + 1
        return periodic + (0 if every and total % every == 0 else 1)

    return left


# --------------------------------------------------------------------------------------------------
# The loop.
# --------------------------------------------------------------------------------------------------


#: Every ImageNet config field with a constraint (the shared ones first); checked before anything
#: is built, so a bad value fails in well under a second.
RULES: tuple[config_rules.Rule | config_rules.Relation, ...] = config_rules.SHARED_RULES + (
    config_rules.nonempty_string("data.name"),
    config_rules.nonempty_string("data.train_split"),
    config_rules.nonempty_string("data.eval_split"),
    config_rules.int_at_least("data.num_threads", 1),
    config_rules.int_at_least("data.num_workers", 0),
    config_rules.nonempty_string("model"),
    config_rules.int_at_least("num_classes", 1),
    config_rules.int_at_least("image_size", 1),
    config_rules.int_at_least("eval_resize_size", 1),
    config_rules.Relation(
        ("eval_resize_size", "image_size"),
        "config.eval_resize_size >= config.image_size (the centre crop)",
        lambda resize, size: resize >= size,
    ),
    config_rules.boolean("half_precision"),
    config_rules.boolean("export_at_end"),
    config_rules.int_at_least("eval_batch_size", 1),
    config_rules.int_at_least("num_train_examples", 1),
    config_rules.int_at_least("num_eval_examples", 0, "0: the whole split"),
    config_rules.int_at_least("reference_steps", 1, optional=True),
    config_rules.int_at_least("mask_stats_every_steps", 1),
    config_rules.int_at_least("mask_window_steps", 1),
    config_rules.real_in("label_smoothing", 0.0, 1.0),
    config_rules.real_in("optimizer.base_learning_rate", 0.0, low_open=True),
    config_rules.real_in("optimizer.momentum", 0.0, 1.0),
    config_rules.boolean("optimizer.nesterov"),
    config_rules.real_in("optimizer.warmup_epochs", 0.0),
    config_rules.real_in("optimizer.decay_factor", 0.0, 1.0, low_open=True, high_open=False),
    config_rules.real_in("optimizer.weight_decay", 0.0),
)


def validate_config(config: ml_collections.ConfigDict) -> None:
    """The CLI's validation: :data:`RULES`, the batch sizes against the device count, and an
    existing ``data.path`` directory for real data.

    Raises:
      ValueError: naming the bad field, its value and the allowed range.
    """
    config_utils.validate_shared(config)
    config_rules.check_rules(config, RULES)
    mesh_lib.check_batch_divisible(config.batch_size, "config.batch_size")
    mesh_lib.check_batch_divisible(config.eval_batch_size, "config.eval_batch_size")
    if config.data.name != "synthetic" and config.data.get("path") is not None:
        if not os.path.isdir(os.path.expanduser(config.data.path)):
            raise ValueError(f"config.data.path={config.data.path!r} is not a directory")


def check_data_prepared(config: ml_collections.ConfigDict) -> None:
    """Fail within seconds, before any model is built, if the real dataset is not prepared.

    Raises:
      FileNotFoundError / ValueError: see ``input_pipeline.find_prepared`` (the message holds
        the ``tfds build`` command).
    """
    if config.data.name != "synthetic":
        input_pipeline.find_prepared(config.data.name, config.data.path)


def _host_metrics(metrics: dict[str, jax.Array]) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Train (resuming from ``workdir`` if it holds a checkpoint), evaluate, write summary.json.

    Returns:
      The summary dict (see ``SUMMARY_KEYS``).

    Raises:
      ValueError: a bad config field.
      FileNotFoundError: the dataset is not prepared (message has the ``tfds build`` command).
      workdir.WorkdirError: the workdir is in use or holds another experiment.
      guard.NonFiniteLossError: the loss or state became NaN/Inf (last good checkpoint kept).
      checkpoint.CheckpointError: no checkpoint restores, or a save failed.
      signals.Interrupted: SIGTERM/SIGINT; a checkpoint of the current step was saved.
    """
    validate_config(config)
    check_data_prepared(config)
    with workdir_lib.session(workdir, config, mesh_lib.is_primary(), _log) as run:
        if run.finished is not None:
            _log(f"{run.workdir} already finished; returning its summary.json (delete it to redo)")
            return run.finished
        with contextlib.ExitStack() as closing:
            return _train(config, run, closing)


#: What to change after a divergence (the NaN guard's advice).
DIVERGENCE_HINT = (
    "a lower --config.optimizer.base_learning_rate or a longer --config.optimizer.warmup_epochs"
)


def _log(message: str) -> None:
    if mesh_lib.is_primary():
        print(message, flush=True)


def _train(
    config: ml_collections.ConfigDict, run: workdir_lib.Session, closing: contextlib.ExitStack
) -> dict[str, Any]:
    """The body of :func:`train_and_evaluate` once the workdir is held (``run``)."""
    workdir = run.workdir
    mesh = mesh_lib.make_data_mesh()
    primary = run.primary
    model = create_model(config)
    variables = abstract_variables(model, config.image_size)
    sparsify = sparsify_fn(config)
    tx, schedule = make_optimizer(config, variables["params"], sparsify)
    rows = layer_rows(config, variables["params"])
    cost = training_cost(config, model, variables, rows)

    replicated = mesh_lib.replicated(mesh)
    abstract_state = jax.eval_shape(lambda: init_state(model, tx, config))
    state_sharding = jax.tree.map(lambda _: replicated, abstract_state)
    abstract_state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        abstract_state,
        state_sharding,
    )

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=2, primary=primary)
    closing.callback(ckpt.close)
    ckpt.check_free_space(abstract_state)
    wall_before = 0.0
    restored = ckpt.restore_latest(abstract_state, log=_log)
    if restored is not None:
        state, meta = restored
        wall_before = float(meta.get("wall_seconds", 0.0))
        _log(f"resumed from step {int(meta['step'])} in {workdir}")
        run.resumed(int(meta["step"]))
    else:
        state = jax.jit(lambda: init_state(model, tx, config), out_shardings=state_sharding)()
    start_step = int(jax.device_get(state["step"]))
    last_good = ckpt.latest_step()

    split = sparsity_lib.separate_refresh(config.sparsity)
    train_step = jax.jit(
        make_train_step(model, tx, schedule, config, refresh_masks=False if split else None),
        out_shardings=(state_sharding, replicated),
        donate_argnums=0,
    )
    refresh_step = None
    if split:  # jitted lazily: compiled at the first refresh
        refresh_step = jax.jit(
            updates_lib.make_refresh_step(tx),
            out_shardings=(state_sharding, replicated),
            donate_argnums=0,
        )
    eval_step = jax.jit(make_eval_step(model, config))
    stats_fn = jax.jit(lambda s: tk.mask_stats(s["opt_state"]))
    window_fn, snapshot_fn = mask_dynamics.jitted_window_fns(state_sharding)
    reset_loss_fn = jax.jit(
        lambda s: dict(s, loss_sum=jnp.zeros((), jnp.float32)),
        out_shardings=state_sharding,
        donate_argnums=0,
    )

    writer = MetricsWriter(workdir, enabled=primary, start_step=start_step)
    closing.callback(writer.close)
    if primary:
        summary_lib.write_provenance(workdir)
    progress = ProgressLogger(
        config.num_train_steps, start_step, eval_units_after=evaluations_left(config)
    )
    update = updates_lib.Updates(
        train_step, refresh_step, sparsity_lib.refresh_schedule(config.sparsity), progress
    )
    batches = train_iterator(config, mesh, start_step)
    t_start = time.monotonic()
    steps_since_check = 0
    final: tuple[dict[str, float], int] | None = None

    def check_loss(step: int) -> None:
        nonlocal state, steps_since_check
        if steps_since_check == 0:
            return
        loss_sum = float(jax.device_get(state["loss_sum"]))
        guard.check_finite(loss_sum, step, last_good, DIVERGENCE_HINT)
        state = reset_loss_fn(state)
        steps_since_check = 0

    def run_eval() -> tuple[dict[str, float], int]:
        jax.block_until_ready(state["params"])  # pending training steps count as training
        with progress.excluded("eval", eval_units=1):
            return evaluate(eval_step, state, eval_iterator(config, mesh))

    if start_step < config.num_train_steps and run.should_stop(at_sync_point=True):
        raise run.stop.interrupted(start_step, ckpt.directory, saved=False)
    for step in range(start_step + 1, config.num_train_steps + 1):
        state, metrics = update(step - 1, state, next(batches))  # step - 1 updates done
        steps_since_check += 1
        due_log = step % config.log_every_steps == 0 or step == config.num_train_steps
        stopping = run.should_stop(at_sync_point=due_log)
        if due_log:
            host = _host_metrics(metrics)
            guard.check_finite(host["loss"], step, last_good, DIVERGENCE_HINT)
            check_loss(step)
            line = progress.line(step, {"loss": host["loss"], "top1": host["top1"]})
            host.update(
                summary_lib.throughput(progress.steps_per_second, config.batch_size, "examples")
            )
            writer.write(step, host, prefix="train/")
            _log(line)
        if step % config.mask_stats_every_steps == 0 or step == config.num_train_steps:
            writer.write(step, _host_metrics(stats_fn(state)), prefix="masks/")
        if step % config.mask_window_steps == 0:
            change = _host_metrics(window_fn(state))
            writer.write(
                step, mask_dynamics.window_metrics(change, config.mask_window_steps), "masks/"
            )
            state = snapshot_fn(state)
        if config.eval_every_steps and step % config.eval_every_steps == 0 and not stopping:
            scores, examples = run_eval()
            writer.write(step, scores, prefix="eval/")
            _log(f"eval at step {step} ({examples} examples): {json.dumps(scores)}")
            if step == config.num_train_steps:
                final = (scores, examples)
        if step % config.checkpoint_every_steps == 0 or step == config.num_train_steps or stopping:
            check_loss(step)
            guard.check_state_finite(state, step, last_good, DIVERGENCE_HINT)
            wall = wall_before + time.monotonic() - t_start
            with progress.excluded("checkpoint"):
                ckpt.save(step, state, {"step": step, "wall_seconds": wall})
            last_good = step
        writer.flush()
        if stopping:
            raise run.stop.interrupted(step, ckpt.directory)

    if final is None and run.should_stop(at_sync_point=True):  # final state is checkpointed
        raise run.stop.interrupted(config.num_train_steps, ckpt.directory, saved=False)
    scores, examples = final if final is not None else run_eval()
    writer.write(config.num_train_steps, {f"valid_{k}": v for k, v in scores.items()}, "final/")
    wall_seconds = wall_before + time.monotonic() - t_start
    rate = progress.rate()
    summary = build_summary(config, state, cost, scores, examples, wall_seconds, rate)
    if primary and config.get("export_at_end", True):  # before the summary (see the LM)
        checkpoint = os.path.join(ckpt.directory, str(config.num_train_steps))
        export_lib.export_state(
            workdir, state["params"], state["opt_state"], checkpoint, _log, state["batch_stats"]
        )
    if primary:
        summary_lib.write_summary(workdir, summary)
        print(json.dumps(summary, indent=1, sort_keys=True))
    return summary


def build_summary(
    config: ml_collections.ConfigDict,
    state: State,
    cost: dict[str, float],
    scores: dict[str, float],
    examples: int,
    wall_seconds: float,
    steps_per_second: float,
) -> dict[str, Any]:
    """``summary.json`` in the shared schema (``experiments/common/summary.py``): final
    ``valid_top1`` / ``valid_top5`` (in %) and ``valid_loss``, realised densities over all
    parameters, training FLOPs vs dense, steps, time; plus ``valid_examples``, the densities over
    the sparse leaves only (``sparse_forward_density`` / ``sparse_backward_density``) and the
    training throughput of this session.
    """
    stats = _host_metrics(tk.mask_stats(state["opt_state"], per_leaf=False))
    return summary_lib.summary_of_run(
        "imagenet",
        config,
        state["params"],
        state["opt_state"],
        train_flops_vs_dense=cost["train_flops_vs_dense"],
        steps=int(jax.device_get(state["step"])),
        wall_seconds=wall_seconds,
        final={f"valid_{k}": v for k, v in scores.items()},
        extra={
            "valid_examples": examples,
            "sparse_forward_density": stats.get("forward_density", 1.0),
            "sparse_backward_density": stats.get("backward_density", 1.0),
            **summary_lib.throughput(steps_per_second, config.batch_size, "examples"),
        },
    )
