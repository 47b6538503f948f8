"""ResNet-50 / ImageNet experiments with Top-KAST (paper §4, Appendix B).

  python -m experiments.imagenet.main --config configs/imagenet/resnet50.py:0.8,0.5 \
      --workdir /tmp/imagenet/80_50 --config.data.path=$TFDS_DATA_DIR
  python -m experiments.imagenet.main --config configs/imagenet/resnet50.py:0.8,0.5 \
      --workdir /tmp/imagenet/dry --dry_run            # params, densities, FLOPs; no weights
  python -m experiments.imagenet.main --config configs/imagenet/resnet50.py:0.8,0.5 \
      --workdir /tmp/imagenet/synth --config.data.name=synthetic   # throughput, no data
  # multi-host: on every host (TPU pods / SLURM: --distributed auto-detects)
  python -m experiments.imagenet.main ... --coordinator_address=HOST:PORT \
      --num_processes=2 --process_id=0

Rerunning the same command resumes from the latest checkpoint in the workdir.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and summaries.")
flags.DEFINE_bool(
    "dry_run", False, "Print the per-layer table and FLOPs, write dry_run.json, exit."
)
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-process).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-process).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with auto-detection.")
flags.DEFINE_string("cpu_collectives", None, "CPU collectives implementation, e.g. 'gloo'.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
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

    from experiments.imagenet import train

    if FLAGS.dry_run:
        train.dry_run(FLAGS.config, FLAGS.workdir)
    else:
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
