"""Training and evaluation of Transformer-XL with Top-KAST (or dense), one workdir per run.

The workdir holds: ``checkpoints/`` (orbax: params, optimizer + mask state, memory, RNG, step;
JSON meta: data position, accumulated wall time), ``config.json``, ``metrics.jsonl`` and
``tensorboard/``, and at the end ``summary.json``. Rerunning the same command resumes from the
latest checkpoint and continues exactly as an uninterrupted run would.

One step (all inside one ``jax.jit`` over the data mesh, state donated):

  alpha = tk.forward_params(params, opt_state)            # theta * A
  (loss, mems), g = value_and_grad(mean NLL)(alpha)       # memory reset at epoch starts
  updates, opt_state = tx.update(g, opt_state, params)    # Top-KAST around clip + Adam
  params = params + updates
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

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
from experiments.common.progress import ProgressLogger, format_duration
from experiments.common.sparsity import make_sparse_optimizer, planned_densities
from experiments.language_model import always_sparse, input_pipeline, models

LN2 = math.log(2.0)


# ----------------------------------------------------------------------------- configuration
#: Every LM config field with a constraint (the shared ones first); checked before anything is
#: built, so a bad value fails in well under a second.
RULES: tuple[config_rules.Rule | config_rules.Relation, ...] = config_rules.SHARED_RULES + (
    config_rules.one_of("data.name", input_pipeline.DATASETS),
    config_rules.int_at_least("seq_len", 1),
    config_rules.int_at_least("mem_len", 0),
    config_rules.int_at_least("eval_batch_size", 1),
    config_rules.int_at_least("eval_seq_len", 1),
    config_rules.int_at_least("eval_mem_len", 0),
    config_rules.int_at_least("eval_max_windows", 0, "0: every window", optional=True),
    config_rules.int_at_least("final_eval_max_windows", 0, "0: every window", optional=True),
    config_rules.int_at_least("max_checkpoints_to_keep", 1, optional=True),
    config_rules.int_at_least("mask_window_steps", 1, "Fig. 3 window", optional=True),
    config_rules.int_at_least("model.vocab_size", 1, optional=True),
    config_rules.int_at_least("model.num_layers", 1),
    config_rules.int_at_least("model.d_model", 2),
    config_rules.Relation(
        ("model.d_model",), "config.model.d_model even (sinusoidal positions)", lambda d: d % 2 == 0
    ),
    config_rules.int_at_least("model.num_heads", 1),
    config_rules.int_at_least("model.d_head", 1, optional=True, allow_none=True),
    config_rules.Relation(
        ("model.d_model", "model.num_heads", "model.d_head"),
        "config.model.d_model divisible by config.model.num_heads (or set config.model.d_head)",
        lambda d, h, d_head: d_head is not None or d % h == 0,
    ),
    config_rules.int_at_least("model.d_ff", 1),
    config_rules.real_in("model.dropout", 0.0, 1.0),
    config_rules.real_in("model.dropatt", 0.0, 1.0, optional=True),
    config_rules.int_at_least("model.div_val", 1, optional=True),
    config_rules.int_at_least("model.clamp_len", -1, "-1: no clamping", optional=True),
    config_rules.int_at_least("model.d_embed", 1, optional=True, allow_none=True),
    config_rules.boolean("model.untie_r"),
    config_rules.boolean("model.same_length"),
    config_rules.boolean("eval_same_length"),
    config_rules.boolean("export_at_end"),
    config_rules.int_at_least("eval_clamp_len", -1, "-1: no clamping", optional=True),
    config_rules.Relation(
        ("eval_same_length", "eval_mem_len"),
        "config.eval_mem_len > 0 with config.eval_same_length (a query sees M + 1 keys)",
        lambda same, mem: not same or mem > 0,
    ),
    config_rules.Relation(
        ("model.same_length", "mem_len"),
        "config.mem_len > 0 with config.model.same_length (a query sees M + 1 keys)",
        lambda same, mem: not same or mem > 0,
    ),
    config_rules.real_in("optim.lr", 0.0, low_open=True),
    config_rules.real_in("optim.warmup_init_lr", 0.0, optional=True),
    config_rules.int_at_least("optim.warmup_steps", 0),
    config_rules.real_in("optim.end_lr", 0.0, optional=True),
    config_rules.real_in("optim.grad_clip", 0.0, low_open=True),
    config_rules.real_in("optim.b1", 0.0, 1.0, optional=True),
    config_rules.real_in("optim.b2", 0.0, 1.0, optional=True),
    config_rules.real_in("optim.eps", 0.0, low_open=True, optional=True),
    config_rules.one_of("optim.name", ("adam", "sgd"), optional=True),
    config_rules.real_in("optim.momentum", 0.0, 1.0, high_open=True, optional=True),
)


def validate_config(config: ml_collections.ConfigDict) -> None:
    """The CLI's validation: :data:`RULES` plus the batch sizes against the device count.

    Raises:
      ValueError: naming the bad field, its value and the allowed range.
    """
    config_utils.validate_shared(config)
    config_rules.check_rules(config, RULES)
    mesh_lib.check_batch_divisible(config.batch_size, "config.batch_size")
    mesh_lib.check_batch_divisible(config.eval_batch_size, "config.eval_batch_size")


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup ``warmup_init_lr -> lr`` over ``warmup_steps``, then cosine to ``end_lr``
    at ``num_train_steps`` (paper App. A: 1e-7 -> 2e-4 over 4000 steps, then cosine)."""
    o = config.optim
    return optax.warmup_cosine_decay_schedule(
        init_value=o.get("warmup_init_lr", 1e-7),
        peak_value=o.lr,
        warmup_steps=o.warmup_steps,
        decay_steps=max(config.num_train_steps, o.warmup_steps + 1),
        end_value=o.get("end_lr", 0.0),
    )


def base_optimizer(o: ml_collections.ConfigDict, schedule: Any) -> optax.GradientTransformation:
    """``config.optim.name``: ``"adam"`` (the paper's, the default) or ``"sgd"`` (heavy-ball
    momentum ``config.optim.momentum``, default 0.9; issue 15's Adam-vs-SGD diagnostic)."""
    if o.get("name", "adam") == "sgd":
        return optax.sgd(schedule, momentum=o.get("momentum", 0.9))
    return optax.adam(schedule, b1=o.get("b1", 0.9), b2=o.get("b2", 0.999), eps=o.get("eps", 1e-8))


def make_optimizer(config: ml_collections.ConfigDict, sparsify: Any):
    """``(tx, schedule)``: Top-KAST (or dense) around global-norm clipping + Adam (or SGD).

    No dense weight decay: the only regulariser is Top-KAST's exploration penalty.
    """
    schedule = learning_rate_schedule(config)
    inner = optax.chain(
        optax.clip_by_global_norm(config.optim.grad_clip), base_optimizer(config.optim, schedule)
    )
    tx = make_sparse_optimizer(
        inner, config.sparsity, sparsify, seed=config.seed, num_train_steps=config.num_train_steps
    )
    return tx, schedule


def sparsify_fn(config: ml_collections.ConfigDict):
    """Sparse leaves: every kernel / embedding (ndim >= 2) except ``config.sparsity.exclude``."""
    import topkast_jax as tk

    exclude = tuple(config.sparsity.get("exclude", ("r_w_bias", "r_r_bias")))
    return tk.sparsify.kernels_except(exclude, min_ndim=2)


# ----------------------------------------------------------------------------- state
def zero_mems(model: models.TransformerXL, batch_size: int, mem_len: int) -> jax.Array:
    return jnp.zeros((model.num_layers, batch_size, mem_len, model.d_model), jnp.float32)


def init_params(config, model) -> tuple[Any, jax.Array]:
    """The model's initial params and the training key left after drawing them."""
    rng, init_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    dummy = jnp.zeros((1, config.seq_len), jnp.int32)
    params = model.init(init_rng, dummy, dummy, zero_mems(model, 1, config.mem_len))["params"]
    return params, rng


def init_state(config, model, tx) -> dict[str, Any]:
    """The train state: ``step``, ``params``, ``opt_state``, ``mems_LxBxMxD``, ``rng`` and
    ``mask_snapshot`` (the forward mask at the last mask-dynamics window, for Figure 3)."""
    import topkast_jax as tk

    params, rng = init_params(config, model)
    opt_state = tx.init(params)
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": opt_state,
        "mems": zero_mems(model, config.batch_size, config.mem_len),
        "rng": rng,
        "mask_snapshot": tk.get_masks(opt_state).forward,
    }


def state_shardings(abstract_state, mesh):
    """Everything replicated except the memory, which is split over its batch axis."""
    shardings = jax.tree.map(lambda _: mesh_lib.replicated(mesh), abstract_state)
    shardings["mems"] = mesh_lib.batch_sharded(mesh, 4, batch_axis=1)
    return shardings


def with_shardings(abstract, shardings):
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


# ----------------------------------------------------------------------------- steps
def make_train_step(model, tx, schedule, refresh_masks=None):
    """The jittable ``train_step(state, batch, reset) -> (state, metrics)``.

    ``refresh_masks`` (a Python bool or ``None``) is passed to Top-KAST's ``update``: ``False``
    where the loop refreshes A and B in a program of its own (:mod:`experiments.common.updates`);
    ``None`` lets the transform decide.
    """
    import topkast_jax as tk

    static = {} if refresh_masks is None else {"refresh_masks": refresh_masks}

    def train_step(state, batch, reset):
        rng, dropout_rng = jax.random.split(state["rng"])
        mems = jnp.where(reset, jnp.zeros_like(state["mems"]), state["mems"])
        alpha = tk.forward_params(state["params"], state["opt_state"])

        def loss_fn(p):
            nll_BxT, new_mems = model.apply(
                {"params": p},
                batch["inputs"],
                batch["targets"],
                mems,
                deterministic=False,
                rngs={"dropout": dropout_rng},
            )
            return jnp.mean(nll_BxT), new_mems

        (loss, new_mems), grads = jax.value_and_grad(loss_fn, has_aux=True)(alpha)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"], **static)
        params = optax.apply_updates(state["params"], updates)
        new_state = dict(
            state,
            step=state["step"] + 1,
            params=params,
            opt_state=opt_state,
            mems=new_mems,
            rng=rng,
        )
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": schedule(state["step"]),
            "exploration_penalty": summary_lib.exploration_penalty(params, opt_state),
        }
        return new_state, metrics

    return train_step


def make_eval_step(model):
    import topkast_jax as tk

    def eval_step(params, opt_state, mems, batch):
        # opt_state None: params already are α (the always-sparse mode's forward params).
        alpha = params if opt_state is None else tk.forward_params(params, opt_state)
        nll_BxT, new_mems = model.apply(
            {"params": alpha}, batch["inputs"], batch["targets"], mems, deterministic=True
        )
        w = batch["weights"]
        return jnp.sum(nll_BxT * w), jnp.sum(w), new_mems

    return eval_step


def eval_model(config: ml_collections.ConfigDict, model: models.TransformerXL):
    """``model`` with the evaluation protocol: ``config.eval_same_length`` and
    ``config.eval_clamp_len`` (absent: the training model's). Same parameters."""
    return model.clone(
        same_length=config.get("eval_same_length", model.same_length),
        clamp_len=config.get("eval_clamp_len", model.clamp_len),
    )


def score(nll_per_token: float, metric: str) -> dict[str, float]:
    """``{"loss": nats, "bpc": nats/ln2}`` or ``{"loss": nats, "perplexity": exp(nats)}``."""
    if metric == "bpc":
        return {"loss": nll_per_token, "bpc": nll_per_token / LN2}
    return {"loss": nll_per_token, "perplexity": math.exp(min(nll_per_token, 700.0))}


class Evaluator:
    """Evaluates one split with the eval batch size, window, memory length and protocol
    (:func:`eval_model`)."""

    def __init__(self, config, model, mesh, state_shard):
        model = eval_model(config, model)
        self.config, self.model, self.mesh = config, model, mesh
        mem_shard = mesh_lib.batch_sharded(mesh, 4, batch_axis=1)
        batch_shard = mesh_lib.batch_sharded(mesh, 2)
        rep = mesh_lib.replicated(mesh)
        self._step = jax.jit(
            make_eval_step(model),
            in_shardings=(state_shard["params"], state_shard["opt_state"], mem_shard, batch_shard),
            out_shardings=(rep, rep, mem_shard),
            donate_argnums=(2,),
        )
        self._zeros = jax.jit(
            lambda: zero_mems(model, config.eval_batch_size, config.eval_mem_len),
            out_shardings=mem_shard,
        )

    def _batcher(self, tokens_N) -> input_pipeline.StreamBatcher:
        c = self.config
        return input_pipeline.StreamBatcher(
            tokens_N,
            c.eval_batch_size,
            c.eval_seq_len,
            mesh_lib.local_batch_slice(c.eval_batch_size),
        )

    def num_windows(self, tokens_N, max_windows: int = 0) -> int:
        """Windows one evaluation of the split runs (its first ``max_windows``; 0: all)."""
        n = self._batcher(tokens_N).num_windows
        return n if not max_windows else min(max_windows, n)

    def __call__(self, params, opt_state, tokens_N, max_windows: int = 0) -> float:
        """Mean NLL (nats/token) over the split (or its first ``max_windows`` windows)."""
        c = self.config
        batcher = self._batcher(tokens_N)
        n = self.num_windows(tokens_N, max_windows)
        mems, total, count = self._zeros(), 0.0, 0.0
        for w in range(n):
            local = batcher.window(w)
            batch = {
                k: mesh_lib.global_batch(v, self.mesh, c.eval_batch_size) for k, v in local.items()
            }
            s, k, mems = self._step(params, opt_state, mems, batch)
            total, count = total + s, count + k
        return float(total) / float(count)


# ----------------------------------------------------------------------------- helpers
def _log(msg: str) -> None:
    if mesh_lib.is_primary():
        print(msg, flush=True)


def training_cost(
    config: ml_collections.ConfigDict, rows: list[dict[str, Any]]
) -> dict[str, float]:
    """Training FLOPs relative to dense (``topkast_jax.flops``) from the per-layer plan.

    Every weight matrix (a leaf with ndim >= 2: projections, feed-forward kernels, and the
    embedding table, which the tied softmax applies once per token) costs ``size`` multiply-adds
    per token; attention scores, norms and biases are not counted (the RigL convention), and the
    adaptive softmax's tail clusters are counted as if every token reached them.
    """
    from topkast_jax import flops

    layers = [
        flops.LayerCost(r["name"], r["params"], r["forward_density"], r["backward_density"])
        for r in rows
        if len(r["shape"]) >= 2
    ]
    multiplier = flops.steps_multiplier(
        config.num_train_steps, config.get("reference_steps", config.num_train_steps)
    )
    return {
        "train_flops_vs_dense": flops.train_flops_vs_dense(layers, multiplier),
        "step_flops_vs_dense": flops.step_flops_vs_dense(layers),
    }


# ----------------------------------------------------------------------------- dry run
def dry_run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Per-layer table and totals from ``jax.eval_shape`` (no weights, no data); dry_run.json."""
    validate_config(config)
    model = models.model_from_config(config.model)
    dummy = jax.ShapeDtypeStruct((1, 2), jnp.int32)
    mems = jax.ShapeDtypeStruct((model.num_layers, 1, 2, model.d_model), jnp.float32)
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), dummy, dummy, mems)["params"]
    fwd, bwd = planned_densities(config.sparsity)
    rows = dry_run_lib.plan_rows(abstract, config.sparsity, sparsify_fn(config))
    device_bytes = {}
    if config.sparsity.get("always_sparse", False):  # what the device holds per leaf
        sparse, _ = make_optimizer(config, sparsify_fn(config))
        rows, device_bytes = dry_run_lib.with_device_bytes(
            rows, sparse.device_bytes_per_leaf(abstract)
        )
    extra = {
        "method": config.sparsity.method,
        "forward_sparsity": fwd,
        "backward_sparsity": bwd,
        "vocab_size": model.vocab_size,
        **training_cost(config, rows),
        **device_bytes,
    }
    record = dry_run_lib.write_dry_run(workdir, rows, extra) if mesh_lib.is_primary() else {}
    rule = dry_run_lib.sparsify_rule(sparsify_fn(config))
    _log(dry_run_lib.format_table(rows, dry_run_lib.totals(rows), config.sparsity.method, rule))
    _log(f"wrote {os.path.join(workdir, 'dry_run.json')}")
    return record or dict(dry_run_lib.totals(rows), layers=rows, **extra)


# ----------------------------------------------------------------------------- training
#: What to change after a divergence (the NaN guard's advice).
DIVERGENCE_HINT = (
    "a lower --config.optim.lr or --config.optim.grad_clip, or a longer --config.optim.warmup_steps"
)


def config_and_corpus(
    config: ml_collections.ConfigDict,
) -> tuple[ml_collections.ConfigDict, input_pipeline.Corpus]:
    """The config validated, its data checked present and loaded: ``(a copy of the config with
    model.vocab_size set from the data, the corpus)``.

    Raises:
      FileNotFoundError: data missing (names the file and ``scripts/download_data.sh``).
      ValueError: a bad config field.
    """
    validate_config(config)
    input_pipeline.check_data_present(config.data)
    corpus = input_pipeline.load_corpus(config.data)
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.vocab_size = corpus.vocab_size
    return config, corpus


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, stop_at_step: int | None = None
) -> dict[str, Any] | None:
    """Train (resuming from ``workdir`` if it holds checkpoints), evaluate, write summary.json.

    Everything that can be checked without a model is checked first (config, data files, split
    lengths); then the workdir is locked and its identity checked (``experiments.common.workdir``).
    A workdir whose run already finished returns its ``summary.json`` without recomputing.

    Args:
      config: the experiment config (see ``configs/demo.py``).
      workdir: the run's directory.
      stop_at_step: leave after saving a checkpoint at this step, as a preemption would (a time
        slot ending); rerunning resumes. None trains to ``config.num_train_steps``.

    Returns:
      The summary dict, or None when stopped at ``stop_at_step``.

    Raises:
      FileNotFoundError: data missing (names the file and ``scripts/download_data.sh``).
      ValueError: a bad config field, or data too short for it.
      workdir.WorkdirError: the workdir is in use or holds another experiment.
      guard.NonFiniteLossError: the loss or state became NaN/Inf (the last good checkpoint is kept).
      checkpoint.CheckpointError: no checkpoint restores, or a save failed.
      signals.Interrupted: SIGTERM/SIGINT; a checkpoint of the current step was saved.
    """
    start_time = time.monotonic()
    config, corpus = config_and_corpus(config)
    input_pipeline.check_split_lengths(
        corpus, config.batch_size, config.seq_len, config.eval_batch_size
    )
    _log(
        f"data {config.data.name}: train {len(corpus.train):,} valid {len(corpus.valid):,} "
        f"test {len(corpus.test):,} tokens, vocab {corpus.vocab_size:,}"
    )
    primary = mesh_lib.is_primary()
    with workdir_lib.session(workdir, config, primary, _log) as run:
        if run.finished is not None:
            _log(
                f"{run.workdir} already finished; its summary.json is returned (delete it to redo)"
            )
            return run.finished
        if config.sparsity.get("always_sparse", False):
            return always_sparse.train(config, run, corpus, stop_at_step)
        with contextlib.ExitStack() as closing:
            return _train(config, run, corpus, stop_at_step, start_time, closing)


def _train(config, run, corpus, stop_at_step, start_time, closing) -> dict[str, Any] | None:
    """The body of :func:`train_and_evaluate` once the workdir is held (``run``)."""
    workdir = run.workdir
    mesh = mesh_lib.make_data_mesh()
    model = models.model_from_config(config.model)
    tx, schedule = make_optimizer(config, sparsify_fn(config))
    init_fn = lambda: init_state(config, model, tx)
    abstract = jax.eval_shape(init_fn)
    shardings = state_shardings(abstract, mesh)

    ckpt = Checkpointer(
        os.path.join(workdir, "checkpoints"),
        config.get("max_checkpoints_to_keep", 2),
        primary=run.primary,
    )
    closing.callback(ckpt.close)
    ckpt.check_free_space(abstract)
    meta: dict[str, Any] = {"position": 0, "wall_seconds": 0.0}
    restored = ckpt.restore_latest(with_shardings(abstract, shardings), log=_log)
    if restored is not None:
        state, meta = restored
        _log(f"resumed from step {int(state['step'])} (data position {meta['position']})")
        run.resumed(int(state["step"]))
    else:
        state = jax.jit(init_fn, out_shardings=shardings)()
    step = int(state["step"])
    prior_wall = float(meta.get("wall_seconds", 0.0))

    rows = mesh_lib.local_batch_slice(config.batch_size)
    stream = input_pipeline.TrainStream(
        input_pipeline.StreamBatcher(corpus.train, config.batch_size, config.seq_len, rows),
        position=meta["position"],
    )
    batch_shard = mesh_lib.batch_sharded(mesh, 2)
    rep = mesh_lib.replicated(mesh)
    split = sparsity_lib.separate_refresh(config.sparsity)
    train_step = jax.jit(
        make_train_step(model, tx, schedule, refresh_masks=False if split else None),
        in_shardings=(shardings, batch_shard, rep),
        out_shardings=(shardings, rep),
        donate_argnums=(0,),
    )
    refresh_step = None
    if split:  # jitted lazily: compiled at the first refresh
        refresh_step = jax.jit(
            updates_lib.make_refresh_step(tx),
            in_shardings=(shardings,),
            out_shardings=(shardings, rep),
            donate_argnums=(0,),
        )
    evaluator = Evaluator(config, model, mesh, shardings)
    writer = MetricsWriter(workdir, enabled=run.primary, start_step=step)
    closing.callback(writer.close)
    if run.primary:
        summary_lib.write_provenance(workdir)
    final_windows = config.get("final_eval_max_windows", 0)
    progress = ProgressLogger(
        config.num_train_steps,
        start_step=step,
        eval_units_after=eval_plan(config, evaluator, corpus),
    )
    update = updates_lib.Updates(
        train_step, refresh_step, sparsity_lib.refresh_schedule(config.sparsity), progress
    )
    rows_plan = dry_run_lib.plan_rows(abstract["params"], config.sparsity, sparsify_fn(config))
    window = mask_dynamics.window_steps(config)
    import topkast_jax as tk

    stats_fn = jax.jit(lambda s: tk.mask_stats(s, per_leaf=False))
    window_fn, snapshot_fn = mask_dynamics.jitted_window_fns(shardings)
    last_good = ckpt.latest_step()
    loss_sum, loss_count = jnp.zeros(()), 0
    end = (
        config.num_train_steps
        if stop_at_step is None
        else min(stop_at_step, config.num_train_steps)
    )

    def elapsed() -> float:
        return prior_wall + time.monotonic() - start_time

    def save(at_step: int) -> None:
        guard.check_state_finite(state, at_step, last_good, DIVERGENCE_HINT)
        with progress.excluded("checkpoint"):
            ckpt.save(at_step, state, {**stream.state(), "wall_seconds": elapsed()})

    def evaluate(tokens_N, max_windows: int) -> tuple[dict[str, float], float]:
        return timed_evaluation(
            progress,
            evaluator,
            corpus.metric,
            (tokens_N, max_windows),
            state["params"],
            lambda: (state["params"], state["opt_state"]),
        )

    if step < end and run.should_stop(at_sync_point=True):
        raise run.stop.interrupted(step, ckpt.directory, saved=False)
    while step < end:
        local, reset = stream.next()
        batch = {
            k: mesh_lib.global_batch(local[k], mesh, config.batch_size)
            for k in ("inputs", "targets")
        }
        state, metrics = update(step, state, batch, np.asarray(reset))
        step += 1
        loss_sum, loss_count = loss_sum + metrics["loss"], loss_count + 1
        due_log = step % config.log_every_steps == 0 or step == end
        stopping = run.should_stop(at_sync_point=due_log)
        due_ckpt = step % config.checkpoint_every_steps == 0 or step == end or stopping
        if due_log or due_ckpt:
            mean_loss = float(loss_sum) / loss_count
            guard.check_finite(mean_loss, step, last_good, DIVERGENCE_HINT)
        if due_log:
            logged = {k: metrics[k] for k in ("grad_norm", "learning_rate", "exploration_penalty")}
            line = log_training(writer, progress, step, mean_loss, corpus.metric, logged, config)
            writer.write(step, stats_fn(state["opt_state"]), prefix="masks/")
            _log(line)
            loss_sum, loss_count = jnp.zeros(()), 0
        if step % window == 0:
            change = {k: float(v) for k, v in jax.device_get(window_fn(state)).items()}
            writer.write(step, mask_dynamics.window_metrics(change, window), prefix="masks/")
            state = snapshot_fn(state)
        if not stopping:
            periodic_evaluation(config, step, end, corpus, evaluate, writer)
        if due_ckpt:
            save(step)
            last_good = step
        if stopping:
            raise run.stop.interrupted(step, ckpt.directory)
    if stop_at_step is not None and step < config.num_train_steps:
        _log(f"stopped at step {step}; rerun the same command to resume")
        return None

    results = final_evaluation(run, step, ckpt.directory, corpus, evaluate, final_windows)
    writer.write(step, results, prefix="final/")
    summary = summary_lib.summary_of_run(
        "language_model",
        config,
        state["params"],
        state["opt_state"],
        train_flops_vs_dense=training_cost(config, rows_plan)["train_flops_vs_dense"],
        steps=step,
        wall_seconds=elapsed(),
        final=results,
        extra={
            "final_eval_max_windows": final_windows,
            **run_throughput(progress, config),
        },
    )
    if run.primary and config.get("export_at_end", True):  # before the summary: a finished
        checkpoint = os.path.join(ckpt.directory, str(step))  # run holds its export
        export_lib.export_state(workdir, state["params"], state["opt_state"], checkpoint, _log)
    if run.primary:
        path = summary_lib.write_summary(workdir, summary)
    shown = " ".join(f"{k} {summary[k]:.4f}" for k in sorted(results) if not k.endswith("_loss"))
    _log(
        f"done: {shown} | params {summary['total_params']:,} | forward density "
        f"{summary['forward_density']:.3f} | backward density {summary['backward_density']:.3f} "
        f"| {step} steps in {format_duration(summary['wall_seconds'])}"
    )
    if run.primary:
        _log(f"wrote {path}")
    return summary


# ----------------------------------------------------------------------------- shared by both loops
def _scores_text(scores: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in scores.items())


def log_training(
    writer: MetricsWriter,
    progress: ProgressLogger,
    step: int,
    mean_loss: float,
    metric: str,
    logged: dict[str, Any],
    config: ml_collections.ConfigDict,
) -> str:
    """Write the ``train/`` record of a log line — ``loss``, the score (``bpc`` or
    ``perplexity``), ``logged`` (learning rate, exploration penalty, ...) and the throughput
    (``steps_per_second``, ``tokens_per_second``) — and return the progress line."""
    train = {"loss": mean_loss, **score(mean_loss, metric)}
    line = progress.line(step, dict(train))
    train.update(logged)
    tokens_per_step = config.batch_size * config.seq_len
    train.update(summary_lib.throughput(progress.steps_per_second, tokens_per_step, "tokens"))
    writer.write(step, train, prefix="train/")
    return line


def run_throughput(progress: ProgressLogger, config: ml_collections.ConfigDict) -> dict:
    """The summary's ``steps_per_second`` and ``tokens_per_second`` over the whole run's
    training time (nan when no training step was timed)."""
    rate = progress.rate() if progress.training_seconds() > 0 else float("nan")
    return summary_lib.throughput(rate, config.batch_size * config.seq_len, "tokens")


def timed_evaluation(
    progress: ProgressLogger,
    evaluator: Evaluator,
    metric: str,
    split: tuple[Any, int],
    pending: Any,
    weights: Any,
) -> tuple[dict[str, float], float]:
    """Scores of one split ``(tokens_N, max_windows)`` and the seconds it took, excluded from
    the training rate. ``pending``: arrays of the last training step, waited for first (pending
    steps count as training); ``weights() -> (params, opt_state)``, called in the excluded time."""
    tokens_N, max_windows = split
    jax.block_until_ready(pending)
    eval_start = time.monotonic()
    with progress.excluded("eval", evaluator.num_windows(tokens_N, max_windows)):
        nll = evaluator(*weights(), tokens_N, max_windows)
    return score(nll, metric), time.monotonic() - eval_start


def periodic_evaluation(config, step: int, end: int, corpus, evaluate, writer) -> None:
    """Every ``config.eval_every_steps`` steps before ``end``: ``evaluate(valid tokens,
    config.eval_max_windows)`` logged under ``eval/``."""
    every = config.eval_every_steps
    if not (every and step % every == 0 and step < end):
        return
    scores, seconds = evaluate(corpus.valid, config.get("eval_max_windows", 0))
    writer.write(step, scores, prefix="eval/")
    _log(f"step {step} eval (valid) {_scores_text(scores)} ({seconds:.0f}s)")


def final_evaluation(run, step: int, directory: str, corpus, evaluate, max_windows: int):
    """``{"<split>_<metric>": value}`` for valid and test (``evaluate(tokens, max_windows)``);
    a stop request between splits raises ``run.stop.interrupted`` (the final state is the
    checkpoint of ``step``)."""
    results: dict[str, float] = {}
    for split in ("valid", "test"):
        if run.should_stop(at_sync_point=True):
            raise run.stop.interrupted(step, directory, saved=False)
        scores, seconds = evaluate(getattr(corpus, split), max_windows)
        results.update({f"{split}_{k}": v for k, v in scores.items()})
        _log(f"final {split}: {_scores_text(scores)} ({seconds:.0f}s)")
    return results


def eval_plan(config: ml_collections.ConfigDict, evaluator: Evaluator, corpus) -> Any:
    """``step -> eval windows still to run`` (periodic valid evaluations at ``step`` and later,
    then the final valid + test evaluation), for the progress ETA."""
    every = config.eval_every_steps
    total = config.num_train_steps
    periodic = evaluator.num_windows(corpus.valid, config.get("eval_max_windows", 0))
    final = sum(
        evaluator.num_windows(tokens, config.get("final_eval_max_windows", 0))
        for tokens in (corpus.valid, corpus.test)
    )

    def units(step: int) -> float:
        count = 0
        if every:
            first = -(-step // every) * every
            count = 0 if first >= total else (total - 1 - first) // every + 1
        return count * periodic + final

    return units


# ----------------------------------------------------------------------------- evaluation only
#: What ``--eval_only --from_export`` writes in the workdir.
EVAL_FROM_EXPORT_FILE = "eval_from_export.json"


def evaluate_export(config: ml_collections.ConfigDict, workdir: str, path: str) -> dict[str, float]:
    """``--eval_only --from_export=PATH``: the final evaluation (valid and test, the config's
    ``final_eval_max_windows``, batch, window, memory and protocol) of an export written by
    ``tk.export.save`` (e.g. ``<workdir>/export`` at the end of a run), densified on load.

    Gives the run's final scores: ``α`` of the export is its ``θ ⊙ A`` bit for bit.  Writes
    ``{"export": path, "<split>_<metric>": value, ...}`` to ``<workdir>/eval_from_export.json``.

    Raises:
      FileNotFoundError: data missing, or no export at ``path``.
      ValueError: a bad config field, or an export whose leaves or shapes are not this config's
        model's (naming the leaf).
    """
    import topkast_jax as tk

    config, corpus = config_and_corpus(config)
    model = models.model_from_config(config.model)
    abstract = jax.eval_shape(lambda: init_params(config, model)[0])
    mesh = mesh_lib.make_data_mesh()
    rep = mesh_lib.replicated(mesh)
    alpha = jax.device_put(tk.export.densify(tk.export.load(path, like=abstract)), rep)
    evaluator = Evaluator(config, model, mesh, {"params": rep, "opt_state": rep})
    windows = config.get("final_eval_max_windows", 0)
    results: dict[str, float] = {}
    for split in ("valid", "test"):
        scores = score(evaluator(alpha, None, getattr(corpus, split), windows), corpus.metric)
        results.update({f"{split}_{k}": v for k, v in scores.items()})
        _log(f"eval from export {path}, {split}: {_scores_text(scores)}")
    if mesh_lib.is_primary():
        os.makedirs(workdir, exist_ok=True)
        summary_lib.write_json(
            os.path.join(workdir, EVAL_FROM_EXPORT_FILE), {"export": path, **results}
        )
    return results


__all__ = ["dry_run", "evaluate_export", "train_and_evaluate", "validate_config"]
