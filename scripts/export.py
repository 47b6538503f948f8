"""Export the latest checkpoint of an LM or ImageNet workdir as a compact sparse model (issue 12).

  python scripts/export.py WORKDIR OUT

Restores the newest checkpoint of WORKDIR (its train state rebuilt from WORKDIR/config.json),
writes ``θ ⊙ A`` with ``tk.export`` to the new directory OUT (values + a packed bitmap per sparse
leaf; values + 2-bit in-group positions for N:M leaves; dense leaves as they are; for ImageNet
the Flax variables, ``batch_stats`` included) and prints its
bytes on disk beside the checkpoint's (params + optimizer state), the dense ``θ ⊙ A`` saved by
orbax the same way (measured in a temporary directory), and the dense params in memory.  Load it
with ``tk.export.load(OUT, like=params)``; the LM evaluates it with
``python -m experiments.language_model.main --config=... --workdir=... --eval_only
--from_export=OUT``.  Masked workdirs only: an always-sparse LM run writes
``<workdir>/export`` itself at its end (``config.export_at_end``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import export as export_lib  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", help="an LM or ImageNet experiment workdir")
    parser.add_argument("out", help="the export's directory (must not exist)")
    args = parser.parse_args(argv)
    export_lib.export_workdir(args.workdir, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
