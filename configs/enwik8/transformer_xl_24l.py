"""enwik8, 24-layer Transformer-XL (paper Table 2, Fig. 3c; App. A Table 4): about 277M parameters.

Command (argument ``fwd,bwd`` sparsities; ``0,0`` is the dense baseline)::

  bash scripts/download_data.sh enwik8 data/enwik8
  python -m experiments.language_model.main \
      --config=configs/enwik8/transformer_xl_24l.py:0.8,0.5 --config.data.path=data/enwik8 \
      --workdir=runs/enwik8_24l_80_50
  # parameter table only (no data, no weights):
  python -m experiments.language_model.main \
      --config=configs/enwik8/transformer_xl_24l.py:0.8,0.5 --workdir=/tmp/dry --dry_run

Hardware: meant for a TPU v3-128 / 16+ GPU slice (batch 64 x window 768 with a 2304 memory);
data-parallel over all devices, multi-host via ``--distributed``. Expected time: several days
(400k steps) on such a slice; it does not fit a CPU.
Paper figure: dense 0.99 test BPC (277M); Top-KAST 80%/0% 1.00, 80%/80% 1.02, 90%/60% 1.03
(Table 2; 80% of 277M leaves 55M nonzero weights).
Hyper-parameters from App. A: Adam 2e-4 with warmup 1e-7 -> 2e-4 over 4000 steps then cosine,
clip 0.25, window 768, train memory 2304, eval memory 5000. Not given by the paper, chosen
here: batch 64, 400k steps, dropout 0.15 (paper range 0.05-0.2), exploration L2 1e-4, eval
window 128. As the original Transformer-XL (kimiyoung/transformer-xl, run_enwik8_large.sh):
u, v biases shared by the layers (2,048 parameters), evaluation with same_length and
clamp_len 1000.
d_embed 1024 (= d_model, no projection), as Dai et al.'s large enwik8 model (``D_EMBED=1024`` in
tf/scripts/enwik8_large_tpu.sh), which the paper says it follows, and as its 277M count: App. A
Table 4 lists d_embed 512, but beside "69M parameters", i.e. the smaller d_model 512 model of
``transformer_xl_small.py``; d_embed 512 here would add a byte table projection in and out
(2 x 1024 x 512) for 278.2M parameters (``--config.model.d_embed=512``).
"""

import ml_collections

from configs.enwik8 import transformer_xl_base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return transformer_xl_base.enwik8_config(
        arg, d_model=1024, d_ff=3072, num_heads=8, d_embed=1024
    )
