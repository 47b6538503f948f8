"""Transformer-XL (Dai et al. 2019) in Flax Linen, with adaptive input / softmax (Baevski & Auli).

Shapes: B batch, T window (query) length, M memory length, K = M + T key length, D d_model,
E d_embed, H heads, Dh head size, F d_ff, V vocabulary, L layers.

One layer (post-layer-norm, as the original):

  h_BxKxD = concat(mem_BxMxD, x_BxTxD)
  q, k, v = x W_q, h W_k, h W_v;  r_KxHxDh = R_K W_r   (R: sinusoids of distances K-1 .. 0)
  score_BxHxTxK = [(q + u) . k  +  shift((q + v) . r)] / sqrt(Dh),  causal with the memory
  x <- LN(x + softmax(score) v W_o);  x <- LN(x + W_2 relu(W_1 x))

The memory of layer l is the last M inputs of layer l (stop_gradient). Parameter counting per
layer: 5 D^2 (q, k, v, r, o) + 2 D F + F + D + 4 D, plus the u, v biases: 2 H Dh per layer
(``untie_r``) or 2 H Dh once.

The original code each choice follows (kimiyoung/transformer-xl; ``tf/model.py`` is the code
behind the published TPU runs, ``pytorch/mem_transformer.py`` its port):

- u, v biases (``r_w_bias``, ``r_r_bias``): one pair shared by all layers unless ``untie_r``
  (``transformer(untie_r=...)`` in tf/model.py; enwik8's scripts leave it off, WikiText-103's
  ``wt103_large_tpu.sh`` sets ``--untie_r=True``).
- ``same_length``: query i sees the keys ``i .. M + i`` only, the same M + 1 keys for every query
  (``_create_mask(qlen, mlen, same_length)`` in tf/model.py; the PyTorch port masks one key more,
  M keys each). ``clamp_len > 0``: relative distances above it use the encoding of ``clamp_len``
  (``pos_seq = tf.minimum(pos_seq, clamp_len)``). The original trains with neither and evaluates
  with both (``--same_length --clamp_len=1000`` in run_enwik8_large.sh / run_wt103_large.sh eval).
- Adaptive input (``mask_adaptive_embedding_lookup``): cluster i has width E // div_val**i and a
  projection to D (div_val > 1); with div_val == 1 one table of width E and, when E != D, one
  projection. Output scaled by sqrt(D).
- Adaptive softmax (``mask_adaptive_logsoftmax``; ``ProjectedAdaptiveLogSoftmax`` in
  pytorch/utils/proj_adaptive_softmax.py): the head's logits -- cluster 0's words and one per tail
  cluster, with cluster weights of width E -- are computed together on ``h @ proj_0``; tables
  tied to the input; ``proj_0`` of the softmax separate, tail projections tied to the input's
  (``tie_projs = [False, True, ...]``: ``--proj_share_all_but_first``). Tail cluster i takes
  head column ``c_1 + i - 1`` (tf/model.py's order; PyTorch indexes the head from the end).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

NEG_INF = -1e30


def init_normal(std: float = 0.02):
    return nn.initializers.normal(stddev=std)


def sinusoid_positions(positions_K: jax.Array, d_model: int) -> jax.Array:
    """``[sin(p w), cos(p w)]`` with ``w_i = 10000^(-2i/D)``; returns ``pos_KxD``."""
    inv_freq = 1.0 / (10000 ** (jnp.arange(0, d_model, 2.0) / d_model))
    angles_KxD2 = positions_K[:, None] * inv_freq[None, :]
    return jnp.concatenate([jnp.sin(angles_KxD2), jnp.cos(angles_KxD2)], axis=-1)


def relative_positions(K: int, clamp_len: int = -1) -> jax.Array:
    """Distances ``K - 1, ..., 0`` of the K keys (memory first), ``min(., clamp_len)`` when
    ``clamp_len > 0``; returns ``positions_K`` (float32)."""
    positions_K = jnp.arange(K - 1, -1, -1.0)
    return jnp.minimum(positions_K, clamp_len) if clamp_len > 0 else positions_K


def rel_shift(scores_BxHxTxK: jax.Array) -> jax.Array:
    """Realign relative scores: out[..., i, j] = in[..., i, j + T - 1 - i].

    Column c of the input belongs to distance K - 1 - c; query i (absolute position M + i)
    and key j are at distance M + i - j, i.e. column j + T - 1 - i. Entries with j > M + i
    (future keys) are clipped here and masked by the caller.
    """
    T, K = scores_BxHxTxK.shape[-2:]
    idx_TxK = jnp.clip(jnp.arange(K)[None, :] + (T - 1) - jnp.arange(T)[:, None], 0, K - 1)
    idx = jnp.broadcast_to(idx_TxK, scores_BxHxTxK.shape)
    return jnp.take_along_axis(scores_BxHxTxK, idx, axis=-1)


def causal_mask(T: int, M: int, same_length: bool = False) -> jax.Array:
    """``mask_TxK``: True where query i may attend key j, i.e. ``j <= M + i``; with
    ``same_length`` also ``j >= i``, so every query sees the M + 1 keys ending at itself.

    Raises:
      ValueError: ``same_length`` with ``M == 0`` (each query would see only itself).
    """
    if same_length and M == 0:
        raise ValueError("same_length needs a memory (M > 0): with M = 0 a query sees only itself")
    j_1xK = jnp.arange(M + T)[None, :]
    i_Tx1 = jnp.arange(T)[:, None]
    mask_TxK = j_1xK <= M + i_Tx1
    return mask_TxK & (j_1xK >= i_Tx1) if same_length else mask_TxK


def relative_biases(module: nn.Module, num_heads: int, d_head: int) -> tuple[jax.Array, jax.Array]:
    """The u (``r_w_bias``) and v (``r_r_bias``) biases, ``H x Dh`` each, params of ``module``."""
    u_HxDh = module.param("r_w_bias", init_normal(), (num_heads, d_head))
    v_HxDh = module.param("r_r_bias", init_normal(), (num_heads, d_head))
    return u_HxDh, v_HxDh


class RelMultiHeadAttention(nn.Module):
    """Relative multi-head attention with biases u (``r_w_bias``), v (``r_r_bias``): the given
    ``biases`` (shared by the layers) or, when ``None``, this layer's own params. Keys where
    ``mask_TxK`` (:func:`causal_mask`) is False get no weight."""

    num_heads: int
    d_head: int
    dropout: float
    dropatt: float

    @nn.compact
    def __call__(self, x_BxTxD, mem_BxMxD, pos_KxD, mask_TxK, biases, deterministic: bool):
        B, T, D = x_BxTxD.shape
        H, Dh = self.num_heads, self.d_head
        h_BxKxD = jnp.concatenate([mem_BxMxD, x_BxTxD], axis=1)
        K = h_BxKxD.shape[1]
        dense = lambda f, name: nn.Dense(f, use_bias=False, kernel_init=init_normal(), name=name)
        qkv = dense(3 * H * Dh, "qkv")(h_BxKxD).reshape(B, K, 3, H, Dh)
        q_BxTxHxDh = qkv[:, -T:, 0]
        k_BxKxHxDh, v_BxKxHxDh = qkv[:, :, 1], qkv[:, :, 2]
        r_KxHxDh = dense(H * Dh, "r_net")(pos_KxD).reshape(K, H, Dh)
        u_HxDh, v_HxDh = biases if biases is not None else relative_biases(self, H, Dh)
        ac = jnp.einsum("bthd,bkhd->bhtk", q_BxTxHxDh + u_HxDh, k_BxKxHxDh)
        bd = rel_shift(jnp.einsum("bthd,khd->bhtk", q_BxTxHxDh + v_HxDh, r_KxHxDh))
        scores_BxHxTxK = (ac + bd) / jnp.sqrt(Dh).astype(ac.dtype)
        scores_BxHxTxK = jnp.where(mask_TxK, scores_BxHxTxK, NEG_INF)
        probs = jax.nn.softmax(scores_BxHxTxK, axis=-1)
        probs = nn.Dropout(self.dropatt)(probs, deterministic=deterministic)
        out_BxTxHxDh = jnp.einsum("bhtk,bkhd->bthd", probs, v_BxKxHxDh)
        out_BxTxD = dense(D, "o_net")(out_BxTxHxDh.reshape(B, T, H * Dh))
        out_BxTxD = nn.Dropout(self.dropout)(out_BxTxD, deterministic=deterministic)
        return nn.LayerNorm(name="ln")(x_BxTxD + out_BxTxD)


class FeedForward(nn.Module):
    d_ff: int
    dropout: float

    @nn.compact
    def __call__(self, x_BxTxD, deterministic: bool):
        D = x_BxTxD.shape[-1]
        h = nn.Dense(self.d_ff, kernel_init=init_normal(), name="ff_1")(x_BxTxD)
        h = nn.Dropout(self.dropout)(nn.relu(h), deterministic=deterministic)
        h = nn.Dense(D, kernel_init=init_normal(), name="ff_2")(h)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        return nn.LayerNorm(name="ln")(x_BxTxD + h)


class DecoderLayer(nn.Module):
    num_heads: int
    d_head: int
    d_ff: int
    dropout: float
    dropatt: float

    @nn.compact
    def __call__(self, x_BxTxD, mem_BxMxD, pos_KxD, mask_TxK, biases, deterministic: bool):
        x = RelMultiHeadAttention(
            self.num_heads, self.d_head, self.dropout, self.dropatt, name="attn"
        )(x_BxTxD, mem_BxMxD, pos_KxD, mask_TxK, biases, deterministic)
        return FeedForward(self.d_ff, self.dropout, name="ff")(x, deterministic)


def cluster_bounds(vocab_size: int, cutoffs: Sequence[int]) -> list[int]:
    """``[0, c_1, ..., c_n, V]``; raises ValueError unless cutoffs increase strictly below V."""
    bounds = [0, *cutoffs, vocab_size]
    if any(a >= b for a, b in zip(bounds, bounds[1:], strict=False)):
        raise ValueError(f"cutoffs {list(cutoffs)} must increase strictly within (0, {vocab_size})")
    return bounds


def cluster_widths(d_embed: int, div_val: int, num_clusters: int) -> list[int]:
    """Table widths ``E // div_val**i`` of the clusters; raises ValueError if one would be 0."""
    widths = [d_embed // div_val**i for i in range(num_clusters)]
    if widths[-1] < 1:
        raise ValueError(
            f"d_embed={d_embed} // div_val={div_val}**{num_clusters - 1} is 0: "
            "raise d_embed or lower div_val"
        )
    return widths


class AdaptiveEmbedding(nn.Module):
    """Adaptive input (Baevski & Auli; Transformer-XL's ``mask_adaptive_embedding_lookup``).

    With cutoffs and ``div_val > 1``, cluster i has a table of width ``E // div_val**i`` and its
    own projection ``proj_i`` (D x d_i) to D. Otherwise every table has width E (without cutoffs
    one ``V x E`` table) and, when E != D, all share one projection ``proj_0`` (D x E). Output
    scaled by sqrt(D). ``tables`` and ``projs`` (one entry per cluster, ``None``: no projection)
    are read by the tied :class:`AdaptiveSoftmax`.
    """

    vocab_size: int
    d_model: int
    d_embed: int | None = None
    cutoffs: Sequence[int] = ()
    div_val: int = 1

    def setup(self):
        bounds = cluster_bounds(self.vocab_size, self.cutoffs)
        n = len(bounds) - 1
        d_embed = self.d_embed or self.d_model
        per_cluster = bool(self.cutoffs) and self.div_val > 1
        widths = cluster_widths(d_embed, self.div_val if per_cluster else 1, n)
        self.bounds = bounds
        self.tables = [
            self.param(f"emb_{i}", init_normal(), (bounds[i + 1] - bounds[i], d_i))
            for i, d_i in enumerate(widths)
        ]
        proj = lambda i, d_i: self.param(f"proj_{i}", init_normal(0.01), (self.d_model, d_i))
        if per_cluster:
            self.projs = [proj(i, d_i) for i, d_i in enumerate(widths)]
        elif d_embed != self.d_model:
            self.projs = [proj(0, d_embed)] * n
        else:
            self.projs = [None] * n

    def __call__(self, tokens_BxT):
        out = 0.0
        for i, (table, proj) in enumerate(zip(self.tables, self.projs, strict=True)):
            lo, hi = self.bounds[i], self.bounds[i + 1]
            inside_BxT = (tokens_BxT >= lo) & (tokens_BxT < hi)
            e = jnp.take(table, jnp.clip(tokens_BxT - lo, 0, hi - lo - 1), axis=0)
            if proj is not None:
                e = e @ proj.T
            out = out + jnp.where(inside_BxT[..., None], e, 0.0)
        return out * jnp.sqrt(float(self.d_model))


class AdaptiveSoftmax(nn.Module):
    """Negative log-likelihood under an (adaptive) softmax tied to :class:`AdaptiveEmbedding`.

    With ``P_0 = out_proj_0`` (D x d_0; the identity when the input has no projection), tables
    ``W_i`` (|cluster i| x d_i), word biases ``b``, cluster weights ``C`` (n_tail x d_0) and
    biases ``c``:

      head_logits = (h P_0) [W_0; C]^T + [b_0; c]            (the head: cluster 0's words and
                                                              one logit per tail cluster)
      log p(w) = log_softmax(head_logits)[w]                                  (w in cluster 0)
      log p(w) = log_softmax(head_logits)[c_1 + i - 1]
                 + log_softmax((h P_i) W_i^T + b_i)[w - c_i]                  (w in cluster i)

    Tables tied to the input's; ``P_0`` separate, ``P_i`` (i >= 1) the input's projections
    (Transformer-XL's WikiText-103 setting). All cluster logits are computed for every token.
    """

    vocab_size: int
    cutoffs: Sequence[int]

    @nn.compact
    def __call__(self, h_BxTxD, targets_BxT, tables, projs):
        bounds = cluster_bounds(self.vocab_size, self.cutoffs)
        n_tail = len(bounds) - 2
        bias_V = self.param("bias", nn.initializers.zeros, (self.vocab_size,))
        proj0 = projs[0]
        if proj0 is not None:
            proj0 = self.param("out_proj_0", init_normal(0.01), proj0.shape)
        hidden0 = h_BxTxD @ proj0 if proj0 is not None else h_BxTxD
        head_weight, head_bias = tables[0], bias_V[: bounds[1]]
        if n_tail:
            cw = self.param("cluster_weight", init_normal(), (n_tail, tables[0].shape[1]))
            cb = self.param("cluster_bias", nn.initializers.zeros, (n_tail,))
            head_weight = jnp.concatenate([head_weight, cw], axis=0)
            head_bias = jnp.concatenate([head_bias, cb])
        head_logp = jax.nn.log_softmax(hidden0 @ head_weight.T + head_bias, axis=-1)
        t0 = jnp.clip(targets_BxT, 0, bounds[1] - 1)
        nll_BxT = -jnp.take_along_axis(head_logp, t0[..., None], axis=-1)[..., 0]
        for i in range(1, n_tail + 1):
            lo, hi = bounds[i], bounds[i + 1]
            hid = h_BxTxD @ projs[i] if projs[i] is not None else h_BxTxD
            tail_logp = jax.nn.log_softmax(hid @ tables[i].T + bias_V[lo:hi], axis=-1)
            ti = jnp.clip(targets_BxT - lo, 0, hi - lo - 1)
            lp = (
                head_logp[..., bounds[1] + i - 1]
                + jnp.take_along_axis(tail_logp, ti[..., None], axis=-1)[..., 0]
            )
            inside = (targets_BxT >= lo) & (targets_BxT < hi)
            nll_BxT = jnp.where(inside, -lp, nll_BxT)
        return nll_BxT


class TransformerXL(nn.Module):
    """Transformer-XL language model returning per-token NLL (nats) and the new memory.

    Call: ``model.apply(variables, inputs_BxT, targets_BxT, mems_LxBxMxD, deterministic=...)``
    -> ``(nll_BxT, new_mems_LxBxMxD)``. The memory length M is the shape of ``mems`` (so train
    and eval memory lengths differ by passing different arrays); ``new_mems`` are the last M
    inputs of each layer with ``stop_gradient``.

    Attributes beyond the sizes: ``d_embed`` E (None: D) of the adaptive input / softmax tables;
    ``untie_r``: u, v biases per layer (True) or one pair for all layers (False, the original's
    default); ``same_length`` and ``clamp_len``: the attention mask of :func:`causal_mask` and the
    distances of :func:`relative_positions`. The last two change no parameter, so one set of
    params serves a model cloned with the evaluation protocol (``model.clone(same_length=...)``).
    """

    vocab_size: int
    num_layers: int
    d_model: int
    num_heads: int
    d_ff: int
    d_head: int | None = None
    dropout: float = 0.1
    dropatt: float = 0.0
    cutoffs: Sequence[int] = ()
    div_val: int = 1
    d_embed: int | None = None
    untie_r: bool = True
    same_length: bool = False
    clamp_len: int = -1

    @nn.compact
    def __call__(self, inputs_BxT, targets_BxT, mems_LxBxMxD, deterministic: bool = True):
        d_head = self.d_head or self.d_model // self.num_heads
        L, _, M, _ = mems_LxBxMxD.shape
        if L != self.num_layers:
            raise ValueError(f"mems has {L} layers, model has {self.num_layers}")
        T = inputs_BxT.shape[1]
        embed = AdaptiveEmbedding(
            self.vocab_size,
            self.d_model,
            self.d_embed,
            tuple(self.cutoffs),
            self.div_val,
            name="embed",
        )
        x_BxTxD = nn.Dropout(self.dropout)(embed(inputs_BxT), deterministic=deterministic)
        pos_KxD = sinusoid_positions(relative_positions(M + T, self.clamp_len), self.d_model)
        pos_KxD = nn.Dropout(self.dropout)(pos_KxD, deterministic=deterministic)
        mask_TxK = causal_mask(T, M, self.same_length)
        biases = None if self.untie_r else relative_biases(self, self.num_heads, d_head)
        new_mems = []
        for layer in range(self.num_layers):
            mem_BxMxD = mems_LxBxMxD[layer]
            cat = jnp.concatenate([mem_BxMxD, x_BxTxD.astype(mem_BxMxD.dtype)], axis=1)
            new_mems.append(jax.lax.stop_gradient(cat[:, cat.shape[1] - M :]))
            x_BxTxD = DecoderLayer(
                self.num_heads, d_head, self.d_ff, self.dropout, self.dropatt, name=f"layer_{layer}"
            )(x_BxTxD, mem_BxMxD, pos_KxD, mask_TxK, biases, deterministic)
        x_BxTxD = nn.Dropout(self.dropout)(x_BxTxD, deterministic=deterministic)
        nll_BxT = AdaptiveSoftmax(self.vocab_size, tuple(self.cutoffs), name="softmax")(
            x_BxTxD, targets_BxT, embed.tables, embed.projs
        )
        return nll_BxT, jnp.stack(new_mems)


def model_from_config(model_config, vocab_size: int | None = None) -> TransformerXL:
    """Build ``TransformerXL`` from ``config.model`` (vocab_size overridable by the data).

    Absent fields take the model's defaults (``untie_r`` True, ``d_embed`` = d_model, neither
    ``same_length`` nor clamping); the paper configs set every one.
    """
    c = model_config
    return TransformerXL(
        vocab_size=int(vocab_size if vocab_size is not None else c.vocab_size),
        num_layers=c.num_layers,
        d_model=c.d_model,
        num_heads=c.num_heads,
        d_ff=c.d_ff,
        d_head=c.get("d_head", None),
        dropout=c.dropout,
        dropatt=c.get("dropatt", 0.0),
        cutoffs=tuple(c.get("cutoffs", ())),
        div_val=c.get("div_val", 1),
        d_embed=c.get("d_embed", None),
        untie_r=c.get("untie_r", True),
        same_length=c.get("same_length", False),
        clamp_len=c.get("clamp_len", -1),
    )
