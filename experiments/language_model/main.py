"""Transformer-XL language-model experiments with Top-KAST.

  python -m experiments.language_model.main --config=configs/demo.py --workdir=/tmp/demo
  python -m experiments.language_model.main --config=configs/enwik8/transformer_xl_24l.py:0.8,0.5 \
      --workdir=DIR --dry_run
  # multi-host: on every host, e.g. on CPU hosts with gloo collectives
  python -m experiments.language_model.main ... --coordinator_address=HOST:PORT \
      --num_processes=2 --process_id=0 --cpu_collectives=gloo

Rerunning the same command resumes from the latest checkpoint in the workdir.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and summaries.")
flags.DEFINE_bool("dry_run", False, "Print the per-layer table, write dry_run.json, exit.")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-process).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-process).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with auto-detection.")
flags.DEFINE_string("cpu_collectives", None, "CPU collectives implementation, e.g. 'gloo'.")
flags.DEFINE_bool("verbose_logs", False, "Keep absl INFO logs (orbax is chatty); default WARNING.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.verbose_logs:
        logging.set_verbosity(logging.WARNING)
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

    from experiments.language_model import train

    if FLAGS.dry_run:
        train.dry_run(FLAGS.config, FLAGS.workdir)
    else:
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
