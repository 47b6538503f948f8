"""Pieces shared by the experiments (language model, ImageNet). Small API, one concern per file.

``mesh`` — data parallelism with ``jax.jit`` + ``NamedSharding`` (multi-host aware):
  ``make_data_mesh()`` -> 1-D ``Mesh`` with axis ``"data"`` over all devices;
  ``replicated(mesh)``, ``batch_sharded(mesh, ndim, batch_axis=0)`` -> ``NamedSharding``;
  ``check_batch_divisible(global_bs, name)``; ``local_batch_slice(global_bs)`` -> this
  process's rows; ``global_batch(local_BxN, mesh, global_bs)`` -> global ``jax.Array``;
  ``put_replicated(tree, mesh)``; ``is_primary()``.

``checkpoint`` — ``Checkpointer(directory, max_to_keep=2, primary=True)`` around orbax
  ``CheckpointManager``: ``.save(step, state_pytree, meta_dict)`` (meta: JSON, e.g. data
  position; waits for the write, a failure is a ``CheckpointError`` at that save with the partial
  directory removed), ``.restore_latest(abstract_state, log)`` -> ``(state, meta)`` or None (a
  checkpoint that does not restore is moved aside as ``<step>.corrupt`` and the previous one is
  used), ``.restore(abstract_state, step=None)``, ``.check_free_space(abstract_state)``,
  ``.latest_step()``, ``.all_steps()``, ``.wait()``, ``.close()``.

``metrics`` — ``MetricsWriter(workdir, enabled=is_primary(), start_step=None)``: ``.write(step,
  {name: scalar}, prefix="train/")`` appends to ``metrics.jsonl`` and TensorBoard events
  (tensorboardX); with ``start_step`` (a resume) later records are cut and no ``(step, name)`` is
  written twice; ``.flush()``, ``.close()``; ``read_metrics(workdir)`` -> list of dicts.

``progress`` — ``ProgressLogger(total_steps, start_step, eval_units_after=None, clock=)``:
  ``with .excluded("compile" | "eval" | "checkpoint", eval_units=0):`` keeps that time out of the
  training rate; ``.line(step, {name: value})`` -> ``"step 120/1000 | loss 2.31 | 4.2 steps/s |
  ETA 3m29s (eval 40s)"`` (the ETA includes the evaluation still to run), ``.steps_per_second``
  (over the last interval), ``.rate()``, ``.training_seconds()``; ``format_duration(seconds)``.

``summary`` — the one metric-naming scheme (``train/``, ``masks/``, ``eval/``, ``final/``) and
  ``summary.json`` schema (``SUMMARY_KEYS``) of every trainer: ``summary_of_run(experiment,
  config, params, opt_state, train_flops_vs_dense=, steps=, wall_seconds=, final=, extra=)``,
  ``build_summary``, ``write_summary`` / ``read_summary``, ``realised_densities(params,
  opt_state)``, ``throughput(steps_per_second, items_per_step, unit)``,
  ``exploration_penalty(params, opt_state)`` (0 for the baselines); ``write_provenance(workdir)``
  -> ``provenance.json`` (package versions, git commit, device kind and count).

``mask_dynamics`` — Figure 3: ``window_steps(config)``, ``window_change(previous, current)``,
  ``jitted_window_fns(state_shardings)``, ``window_metrics(change, window)``.

``guard`` — ``check_finite(loss, step, last_good_checkpoint, hint)`` and
  ``check_state_finite(state, step, last_good_checkpoint, hint)`` raise ``NonFiniteLossError``
  (call before saving, so no non-finite state is ever checkpointed); ``nonfinite_paths(tree)``.

``workdir`` — a workdir is one experiment: ``session(workdir, config, primary, log)`` (context
  manager: ``lock.json``, signal handlers, identity check against ``config.json`` with
  ``RESUMABLE_CHANGES``, ``config.json`` written) yields a ``Session`` (``.changes``,
  ``.finished`` summary, ``.resumed(step)`` -> ``resumes.jsonl``, ``.should_stop(at_sync_point)``);
  ``check_identity``, ``acquire_lock`` / ``release_lock`` / ``locked``; ``WorkdirError``.

``export`` — the compact export of issue 12 (``tk.export``): ``export_state(workdir, params,
  opt_state, checkpoint_dir, log)`` / ``export_final(workdir, exported, ...)`` write
  ``<workdir>/export`` at the end of a run (``config.export_at_end``) and log its bytes on disk
  against the checkpoint's; ``export_workdir(workdir, out)`` does it for the latest checkpoint of
  any masked LM or ImageNet workdir (``scripts/export.py``), ``abstract_train_state(config)``.

``signals`` — ``StopSignals`` (first SIGTERM/SIGINT sets a flag, a second exits at once),
  ``Interrupted`` (raised after the checkpoint; the launcher exits with ``128 + signal``).

``dry_run`` — ``layer_rows(abstract_params, sparsify=, forward_sparsity=, backward_sparsity=,
  distribution=)`` (via ``tk.layer_densities``; works on ``jax.eval_shape`` output; natural order
  of names), ``plan_rows(abstract_params, config.sparsity, sparsify)``,
  ``totals(rows)`` -> ``total_params, sparse_params, forward_nonzero, backward_nonzero, ...``,
  ``format_table(rows, totals)``, ``write_dry_run(workdir, rows, extra) -> dict`` (dry_run.json).

``sparsity`` — ``make_sparse_optimizer(inner, config.sparsity, sparsify, seed=0,
  num_train_steps=None)`` (methods ``"topkast"``, ``"dense"``, and the baselines ``"static"``,
  ``"pruning"``, ``"set"``, ``"rigl"`` via ``baselines_config``; unknown -> ValueError);
  ``planned_densities(config.sparsity)`` -> (forward, backward) sparsities.

``config_rules`` — declarative checks: ``Rule``/``Relation`` rows (``int_at_least``, ``real_in``,
  ``one_of``, ...), ``SHARED_RULES`` (every experiment) and ``check_rules(config, rules)``
  (ValueError naming the field, its value and the allowed range); each experiment's ``train.RULES``
  is ``SHARED_RULES + its own``.

``config_utils`` — ``validate_shared(config)`` (``SHARED_RULES``), ``save_config(config,
  workdir)``, ``parse_sparsity_arg("0.8,0.5", default)``.
"""
