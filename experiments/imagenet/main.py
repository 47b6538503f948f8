r"""ResNet-50 / ImageNet experiments with Top-KAST (paper §4, Appendix B).

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

from experiments.common import launch

launch.define_flags()
flags.adopt_module_key_flags(launch)  # --help lists --config, --workdir, --dry_run, ...


def main(argv: list[str]) -> None:
    from experiments.imagenet import train

    launch.run(argv, train)


if __name__ == "__main__":
    app.run(main)
