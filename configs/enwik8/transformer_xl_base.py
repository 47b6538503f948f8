"""Shared body of the enwik8 Transformer-XL configs (not a runnable config by itself)."""

import ml_collections

from experiments.common.baselines_config import add_baseline_fields
from experiments.common.config_utils import parse_sparsity_arg


def sparsity_config(arg: str | None) -> ml_collections.ConfigDict:
    """``method="dense"`` for ``0,0`` (the default), Top-KAST otherwise.

    ``--config.sparsity.method`` switches to a baseline (static, pruning, set, rigl); their
    fields are included."""
    fwd, bwd = parse_sparsity_arg(arg, (0.0, 0.0))
    s = ml_collections.ConfigDict()
    s.method = "dense" if fwd == 0.0 and bwd == 0.0 else "topkast"
    s.forward = fwd
    s.backward = bwd
    s.refresh_every = 1
    s.exploration_l2 = 1e-4
    s.distribution = "uniform"
    s.exclude = ("r_w_bias", "r_r_bias")
    s.always_sparse = False  # True: only B on the device, dense θ on the host (tk.AlwaysSparse)
    # N:M Top-KAST (an extension of the paper): "2:4" or "2:4/3:4" (A n:m, B n_B:m per group of m
    # along each kernel's input axis); its n/m and n_B/m replace forward and backward.
    s.structure = ml_collections.config_dict.placeholder(str)
    return add_baseline_fields(s)


def optim_config(warmup_steps: int = 4000) -> ml_collections.ConfigDict:
    """Paper App. A: Adam, warmup 1e-7 -> 2e-4 over 4000 steps, cosine, clip 0.25."""
    o = ml_collections.ConfigDict()
    o.name = "adam"  # or "sgd" (momentum 0.9)
    o.lr = 2e-4
    o.warmup_init_lr = 1e-7
    o.warmup_steps = warmup_steps
    o.end_lr = 0.0
    o.grad_clip = 0.25
    return o


def paper_config(
    arg: str | None, *, data: dict, run: dict, model: dict
) -> ml_collections.ConfigDict:
    """The fields every paper-scale Transformer-XL config shares, with its own ``data``, run
    lengths (``run``: seq_len, mem_len, num_train_steps, eval_mem_len) and ``model`` fields.

    Evaluation protocol of the original (kimiyoung/transformer-xl, the ``eval`` branch of
    pytorch/run_enwik8_large.sh and run_wt103_large.sh, tf/sota/enwik8.sh and wt103.sh):
    ``same_length`` and ``clamp_len=1000`` at evaluation, neither in training."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 64
    c.log_every_steps = 200
    c.eval_every_steps = 4000
    c.eval_max_windows = 100
    c.checkpoint_every_steps = 2000
    c.max_checkpoints_to_keep = 2
    c.eval_batch_size = 16
    c.eval_seq_len = 128
    c.final_eval_max_windows = 0
    c.export_at_end = True  # <workdir>/export: theta*A, compact (tk.export)
    c.eval_same_length = True
    c.eval_clamp_len = 1000
    c.update(run)
    c.data = ml_collections.ConfigDict(data)
    c.model = ml_collections.ConfigDict(
        {"d_head": None, "same_length": False, "clamp_len": -1, **model}
    )
    c.optim = optim_config()
    c.sparsity = sparsity_config(arg)
    return c


def enwik8_config(
    arg: str | None, *, d_model: int, d_ff: int, num_heads: int, d_embed: int
) -> ml_collections.ConfigDict:
    """enwik8, 24 layers, byte vocabulary, tied embeddings (paper Tables 2 and 5).

    u, v biases shared by all layers (``untie_r`` off: the original's enwik8 scripts,
    tf/scripts/enwik8_large_tpu.sh, leave it at its default False; its PyTorch port always shares
    them). ``d_embed``: the byte table's width (a projection to d_model when they differ)."""
    return paper_config(
        arg,
        data={"name": "enwik8", "path": "data/enwik8"},
        run={"seq_len": 768, "mem_len": 2304, "num_train_steps": 400_000, "eval_mem_len": 5000},
        model={
            "vocab_size": 256,
            "num_layers": 24,
            "d_model": d_model,
            "num_heads": num_heads,
            "d_ff": d_ff,
            "dropout": 0.15,
            "dropatt": 0.15,
            "cutoffs": (),
            "div_val": 1,
            "d_embed": d_embed,
            "untie_r": False,
        },
    )
