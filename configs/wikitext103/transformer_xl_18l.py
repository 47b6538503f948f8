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
"""

import ml_collections

from configs.enwik8.transformer_xl_base import optim_config, sparsity_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 64
    c.seq_len = 512
    c.mem_len = 768
    c.num_train_steps = 200_000
    c.log_every_steps = 200
    c.eval_every_steps = 4000
    c.eval_max_windows = 100
    c.checkpoint_every_steps = 2000
    c.max_checkpoints_to_keep = 2
    c.eval_batch_size = 16
    c.eval_seq_len = 128
    c.eval_mem_len = 2000
    c.final_eval_max_windows = 0
    c.data = ml_collections.ConfigDict({"name": "wikitext103", "path": "data/wikitext-103"})
    m = ml_collections.ConfigDict()
    m.vocab_size = 267_735
    m.num_layers = 18
    m.d_model = 1024
    m.num_heads = 16
    m.d_head = None
    m.d_ff = 4096
    m.dropout = 0.2
    m.dropatt = 0.2
    m.cutoffs = (20_000, 40_000, 200_000)
    m.div_val = 4
    m.clamp_len = -1
    c.model = m
    c.optim = optim_config()
    c.sparsity = sparsity_config(arg)
    return c
