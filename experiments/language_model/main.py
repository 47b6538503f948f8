r"""Transformer-XL language-model experiments with Top-KAST.

  python -m experiments.language_model.main --config=configs/demo.py --workdir=/tmp/demo
  python -m experiments.language_model.main --config=configs/enwik8/transformer_xl_24l.py:0.8,0.5 \
      --workdir=DIR --dry_run
  # multi-host: on every host, e.g. on CPU hosts with gloo collectives
  python -m experiments.language_model.main ... --coordinator_address=HOST:PORT \
      --num_processes=2 --process_id=0 --cpu_collectives=gloo

Rerunning the same command resumes from the latest checkpoint in the workdir.
"""

from __future__ import annotations

from absl import app, flags

from experiments.common import launch

launch.define_flags()
flags.adopt_module_key_flags(launch)  # --help lists --config, --workdir, --dry_run, ...


def main(argv: list[str]) -> None:
    from experiments.language_model import train

    launch.run(argv, train)


if __name__ == "__main__":
    app.run(main)
