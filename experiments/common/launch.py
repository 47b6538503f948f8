"""The shared command line of every experiment: absl flags, multi-host set-up, dispatch.

Each ``experiments/<name>/main.py`` is::

    launch.define_flags()
    def main(argv): launch.run(argv, train_module)
    app.run(main)

Flags: ``--config`` (ml_collections config file, ``file.py:ARG`` and ``--config.x=y`` overrides),
``--workdir``, ``--dry_run``, ``--eval_only --from_export=PATH`` (evaluate an export of
``tk.export``; the language model), and for several processes ``--coordinator_address``,
``--num_processes``, ``--process_id`` (or ``--distributed`` to auto-detect on TPU pods / SLURM),
``--cpu_collectives=gloo`` for CPU hosts; ``--verbose_logs`` keeps absl INFO logs.

A run stopped by SIGTERM/SIGINT saves a checkpoint, prints where to resume and exits with
``128 + signal`` (143 / 130); see ``experiments.common.signals``.
"""

from __future__ import annotations

import sys
from types import ModuleType

from absl import app, flags, logging
from ml_collections import config_flags

from experiments.common import signals

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the experiment flags (once per process)."""
    config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and summaries.")
    flags.DEFINE_bool("dry_run", False, "Print the per-layer table, write dry_run.json, exit.")
    flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-process).")
    flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
    flags.DEFINE_integer("process_id", None, "This process's index (multi-process).")
    flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (auto-detect).")
    flags.DEFINE_string("cpu_collectives", None, "CPU collectives implementation, e.g. 'gloo'.")
    flags.DEFINE_bool("verbose_logs", False, "Keep absl INFO logs (orbax is chatty).")
    flags.DEFINE_bool(
        "eval_only", False, "Evaluate --from_export on the valid and test splits, no training."
    )
    flags.DEFINE_string("from_export", None, "A model exported by tk.export (with --eval_only).")
    flags.mark_flags_as_required(["config", "workdir"])


def initialize_processes() -> None:
    """``jax.distributed.initialize`` as the flags ask (nothing for a single process)."""
    import jax

    if FLAGS.cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", FLAGS.cpu_collectives)
    if FLAGS.coordinator_address:
        jax.distributed.initialize(
            FLAGS.coordinator_address,
            num_processes=FLAGS.num_processes,
            process_id=FLAGS.process_id,
        )
    elif FLAGS.distributed:
        jax.distributed.initialize()


def run(argv: list[str], train: ModuleType) -> None:
    """Runs ``train.dry_run`` or ``train.train_and_evaluate`` with the parsed flags."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.verbose_logs:
        logging.set_verbosity(logging.WARNING)
    initialize_processes()
    if FLAGS.dry_run:
        train.dry_run(FLAGS.config, FLAGS.workdir)
        return
    if FLAGS.eval_only or FLAGS.from_export:
        if not (FLAGS.eval_only and FLAGS.from_export):
            raise app.UsageError("--eval_only and --from_export=PATH go together")
        if not hasattr(train, "evaluate_export"):
            raise app.UsageError(f"{train.__name__} has no --eval_only --from_export evaluation")
        train.evaluate_export(FLAGS.config, FLAGS.workdir, FLAGS.from_export)
        return
    try:
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except signals.Interrupted as e:  # SIGTERM/SIGINT: checkpoint saved, one line, 128 + signal
        print(e, file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
