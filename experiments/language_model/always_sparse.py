"""Transformer-XL trained always-sparse (``--config.sparsity.always_sparse=True``).

The device holds only ``B`` (``tk.AlwaysSparse``): per sparse leaf the ``k_B`` values, their
int32 indices, the ``A``-flags and Adam's moments on those entries; the dense ``θ`` stays in host
memory and is touched at a refresh (every ``config.sparsity.refresh_every`` steps).  The step is
the masked trainer's (``train.make_train_step``) — same dropout keys, same memory reset — so the two
modes give the same ``A``, ``B`` and, up to float reassociation, the same parameters.

Metrics follow the shared scheme (``experiments/common/summary.py``) through the masked trainer's
helpers: ``train/`` loss, score, ``grad_norm`` (``‖∂L/∂α‖₂`` of the logged step, the masked
trainer's definition, from ``make_step(..., grad_norm=True)``), ``learning_rate``,
``exploration_penalty`` and throughput; ``masks/`` the names of ``tk.mask_stats`` from
``AlwaysSparse.mask_stats`` — forward and backward densities (total and per leaf) counted on the
``B``-state, the mask change at the last refresh and ``reservoir_activated`` (paper Fig. 3; kept on
the host, bit-packed, with ``config.sparsity.track_reservoir``, default on as in the masked
trainer) — and the Figure-3 window change (the previous window's forward mask is kept on the
host, bit-packed, and checkpointed as ``mask_snapshot``); ``eval/`` on the masked trainer's
cadence and ``final/``; ``provenance.json`` and ``summary.json``.  An evaluation builds the dense
``α = θ ⊙ A`` on the device for its duration (``AlwaysSparse.forward_params``).  Checkpoints and
resume work as in the masked trainer.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import topkast_jax as tk
from experiments.common import always_sparse_stats, mask_dynamics
from experiments.common import dry_run as dry_run_lib
from experiments.common import export as export_lib
from experiments.common import mesh as mesh_lib
from experiments.common import summary as summary_lib
from experiments.common.checkpoint import Checkpointer
from experiments.common.metrics import MetricsWriter
from experiments.common.progress import ProgressLogger


def make_loss(model: Any) -> Callable[[Any, dict[str, Any]], tuple[jax.Array, jax.Array]]:
    """``loss(alpha, batch) -> (mean NLL, new memory)``; ``batch`` holds ``inputs``,
    ``targets``, ``mems`` (already reset where an epoch starts) and the ``dropout`` key."""

    def loss(alpha, batch):
        nll_BxT, new_mems = model.apply(
            {"params": alpha},
            batch["inputs"],
            batch["targets"],
            batch["mems"],
            deterministic=False,
            rngs={"dropout": batch["dropout"]},
        )
        return jnp.mean(nll_BxT), new_mems

    return loss


def train(config: Any, run: Any, corpus: Any, stop_at_step: int | None) -> dict[str, Any] | None:
    """The always-sparse run of ``train.train_and_evaluate`` (the workdir is held by ``run``).

    Checkpoints (orbax, ``experiments.common.checkpoint``) hold the host ``θ``, the device
    ``B``-state, the memory, the key, the step and the previous window's forward mask (packed,
    Figure 3); the data position is in their metadata, so a rerun resumes exactly. Metrics,
    progress, periodic and final evaluation, ``provenance.json`` and ``summary.json`` go
    through the masked trainer's shared helpers (same names).
    """
    from experiments.language_model import input_pipeline, models
    from experiments.language_model import train as lm

    mesh = mesh_lib.make_data_mesh()
    rep = mesh_lib.replicated(mesh)
    model = models.model_from_config(config.model)
    sparse, schedule = lm.make_optimizer(config, lm.sparsify_fn(config))
    params, rng = lm.init_params(config, model)
    mem_shard = mesh_lib.batch_sharded(mesh, 4, batch_axis=1)
    zeros = jax.jit(
        lambda: lm.zero_mems(model, config.batch_size, config.mem_len), out_shardings=mem_shard
    )
    ckpt = Checkpointer(
        os.path.join(run.workdir, "checkpoints"),
        config.get("max_checkpoints_to_keep", 2),
        primary=run.primary,
    )
    initial = sparse.init(jax.device_put(params, rep))
    state = {
        "step": np.asarray(0, np.int64),
        "sparse": initial,
        "mems": zeros(),
        "rng": rng,
        "mask_snapshot": always_sparse_stats.packed_forward_masks(initial),
    }
    meta: dict[str, Any] = {"position": 0}
    restored = ckpt.restore_latest(state, log=lm._log)
    if restored is not None:
        state, meta = restored
        lm._log(f"resumed from step {int(state['step'])} (always-sparse)")
        run.resumed(int(state["step"]))
    step_fn = sparse.make_step(make_loss(model), has_aux=True, grad_norm=True)
    penalty = always_sparse_stats.penalty_fn(sparse, state["sparse"])
    stream = input_pipeline.TrainStream(
        input_pipeline.StreamBatcher(
            corpus.train,
            config.batch_size,
            config.seq_len,
            mesh_lib.local_batch_slice(config.batch_size),
        ),
        position=meta["position"],
    )
    first = int(state["step"])
    writer = MetricsWriter(run.workdir, enabled=run.primary, start_step=first)
    if run.primary:
        summary_lib.write_provenance(run.workdir)
    evaluator = lm.Evaluator(config, model, mesh, {"params": rep, "opt_state": rep})
    progress = ProgressLogger(
        config.num_train_steps,
        start_step=first,
        eval_units_after=lm.eval_plan(config, evaluator, corpus),
    )

    def evaluate(tokens_N, max_windows: int) -> tuple[dict[str, float], float]:
        device = state["sparse"].device
        alpha = lambda: (sparse.forward_params(state["sparse"]), None)  # noqa: E731
        split = (tokens_N, max_windows)
        return lm.timed_evaluation(progress, evaluator, corpus.metric, split, device, alpha)

    end = config.num_train_steps if stop_at_step is None else stop_at_step
    window = mask_dynamics.window_steps(config)
    start, losses = time.monotonic(), []
    for step in range(first + 1, end + 1):
        local, reset = stream.next()
        batch = {
            k: mesh_lib.global_batch(local[k], mesh, config.batch_size)
            for k in ("inputs", "targets")
        }
        rng, dropout = jax.random.split(state["rng"])  # the masked trainer's key sequence
        mems = zeros() if reset else state["mems"]
        with progress.excluded("compile") if step == first + 1 else contextlib.nullcontext():
            sparse_state, (loss, mems), grad_norm = step_fn(
                state["sparse"], dict(batch, mems=mems, dropout=dropout)
            )
        state = dict(
            state, step=np.asarray(step, np.int64), sparse=sparse_state, mems=mems, rng=rng
        )
        losses.append(loss)
        if step % config.log_every_steps == 0 or step == end:
            mean = float(np.mean(jax.device_get(losses)))
            losses = []
            logged = {
                "grad_norm": grad_norm,
                "learning_rate": schedule(step - 1),
                "exploration_penalty": penalty(sparse_state.device),
            }
            line = lm.log_training(writer, progress, step, mean, corpus.metric, logged, config)
            writer.write(step, sparse.mask_stats(sparse_state), prefix="masks/")
            lm._log(line + " (always-sparse)")
        if step % window == 0:
            change = always_sparse_stats.window_change(state["mask_snapshot"], sparse_state)
            writer.write(step, mask_dynamics.window_metrics(change, window), prefix="masks/")
            state["mask_snapshot"] = always_sparse_stats.packed_forward_masks(sparse_state)
        lm.periodic_evaluation(config, step, end, corpus, evaluate, writer)
        if step % config.checkpoint_every_steps == 0 or step == end:
            with progress.excluded("checkpoint"):
                ckpt.save(step, state, stream.state())
    ckpt.close()
    if end < config.num_train_steps:
        writer.close()
        return None
    windows = config.get("final_eval_max_windows", 0)
    results = lm.final_evaluation(run, end, ckpt.directory, corpus, evaluate, windows)
    writer.write(end, results, prefix="final/")
    writer.close()
    rows = dry_run_lib.plan_rows(params, config.sparsity, lm.sparsify_fn(config))
    summary = summary_lib.build_summary(
        experiment="language_model",
        data=config.data.name,
        method="topkast",
        forward_sparsity=float(config.sparsity.forward),
        backward_sparsity=float(config.sparsity.backward),
        densities=dry_run_lib.totals(rows),
        train_flops_vs_dense=lm.training_cost(config, rows)["train_flops_vs_dense"],
        steps=end,
        wall_seconds=time.monotonic() - start,
        final=results,
        extra={
            "always_sparse": True,
            "device_state_bytes": sparse.device_bytes(state["sparse"]),
            **lm.run_throughput(progress, config),
        },
    )
    if run.primary and config.get("export_at_end", True):  # from the B-state, no dense theta
        exported = tk.export.sparse_params(export_lib.host_copy(state["sparse"]))
        checkpoint = os.path.join(ckpt.directory, str(end))
        export_lib.export_final(run.workdir, exported, checkpoint, lm._log)
    if run.primary:
        path = summary_lib.write_summary(run.workdir, summary)
        lm._log(f"done (always-sparse): {results} | wrote {path}")
    return summary
