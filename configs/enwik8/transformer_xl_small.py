"""enwik8, the smaller 24-layer Transformer-XL of paper Table 5 (App. A): about 69M parameters.

Command (argument ``fwd,bwd``; ``0,0`` is dense)::

  python -m experiments.language_model.main \
      --config=configs/enwik8/transformer_xl_small.py:0.8,0.6 --config.data.path=data/enwik8 \
      --workdir=runs/enwik8_small_80_60

Hardware: a TPU v3-32 / 8 GPUs (batch 64 x window 768, memory 2304). Expected time: 1-2 days.
Paper figure (Table 5, test BPC): dense 1.00; Top-KAST 80%/0% 1.03, 80%/60% 1.05, 90%/0% 1.08,
90%/80% 1.10, 95%/0% 1.14, 95%/90% 1.17. Identical to ``transformer_xl_24l.py`` except
d_model 512, d_ff 1536, 8 heads and d_embed 512 (App. A Table 4's d_embed, = d_model).
"""

import ml_collections

from configs.enwik8 import transformer_xl_base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return transformer_xl_base.enwik8_config(arg, d_model=512, d_ff=1536, num_heads=8, d_embed=512)
