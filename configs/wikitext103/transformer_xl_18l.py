"""WikiText-103, 18-layer Transformer-XL with adaptive input/softmax (paper Table 3): ~285M params.

Command (argument ``fwd,bwd``; ``0,0`` is dense)::

  bash scripts/download_data.sh wikitext103 data/wikitext-103
  python -m experiments.language_model.main \
      --config=configs/wikitext103/transformer_xl_18l.py:0.8,0.6 \
      --config.data.path=data/wikitext-103 --workdir=runs/wt103_80_60

Hardware: a TPU v3-128 / 16+ GPU slice (batch 64 x window 512, memory 768). Expected time:
several days (200k steps). The first run builds the 267,735-word vocabulary and caches the
encoded splits in ``<data.path>/wt103_cache.npz`` (a few minutes).
Paper figure (Table 3, test perplexity): dense 18.3 (285M); 80%/0% 19.8, 80%/60% 21.3,
90%/80% 25.1, 95%/90% 32.2 (57M / 28.5M / 14.3M nonzero).
App. A: d_model 1024, d_ff 4096, 16 heads, adaptive input and tied adaptive softmax (cutoffs
20000, 40000, 200000; div_val 4), window 512, train memory 768, eval memory 2000, Adam 2e-4 with
warmup 1e-7 -> 2e-4 over 4000 steps then cosine, clip 0.25. Chosen here (not in the paper):
batch 64, 200k steps, dropout 0.2 (paper range 0.05-0.2), exploration L2 1e-4, eval window 128.
As the original Transformer-XL (kimiyoung/transformer-xl, tf/scripts/wt103_large_tpu.sh):
d_embed 1024 (``D_EMBED``; cluster widths 1024, 256, 64, 16), u, v biases per layer
(``--untie_r=True``), the softmax's first projection separate and the others tied to the input's
(``--proj_share_all_but_first=True``), evaluation with same_length and clamp_len 1000.
"""

import ml_collections

from configs.enwik8.transformer_xl_base import paper_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return paper_config(
        arg,
        data={"name": "wikitext103", "path": "data/wikitext-103"},
        run={"seq_len": 512, "mem_len": 768, "num_train_steps": 200_000, "eval_mem_len": 2000},
        model={
            "vocab_size": 267_735,
            "num_layers": 18,
            "d_model": 1024,
            "num_heads": 16,
            "d_ff": 4096,
            "dropout": 0.2,
            "dropatt": 0.2,
            "cutoffs": (20_000, 40_000, 200_000),
            "div_val": 4,
            "d_embed": 1024,
            "untie_r": True,
        },
    )
