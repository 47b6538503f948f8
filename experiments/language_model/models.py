"""Transformer-XL (Dai et al. 2019) in Flax Linen, with adaptive input / softmax (Baevski & Auli).

Shapes: B batch, T window (query) length, M memory length, K = M + T key length, D d_model,
H heads, Dh head size, F d_ff, V vocabulary, L layers.

One layer (post-layer-norm, as the original):

  h_BxKxD = concat(mem_BxMxD, x_BxTxD)
  q, k, v = x W_q, h W_k, h W_v;  r_KxHxDh = R_K W_r   (R: sinusoids of distances K-1 .. 0)
  score_BxHxTxK = [(q + u) . k  +  shift((q + v) . r)] / sqrt(Dh),  causal with the memory
  x <- LN(x + softmax(score) v W_o);  x <- LN(x + W_2 relu(W_1 x))

The memory of layer l is the last M inputs of layer l (stop_gradient). Parameter counting per
layer: 5 D^2 (q, k, v, r, o) + 2 D F + F + D + 4 D + 2 H Dh (u, v biases).
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


def causal_mask(T: int, M: int) -> jax.Array:
    """``mask_TxK``: True where query i may attend key j, i.e. ``j <= M + i``."""
    K = M + T
    return jnp.arange(K)[None, :] <= (M + jnp.arange(T))[:, None]


class RelMultiHeadAttention(nn.Module):
    """Relative multi-head attention with learned biases u (``r_w_bias``), v (``r_r_bias``)."""

    num_heads: int
    d_head: int
    dropout: float
    dropatt: float

    @nn.compact
    def __call__(self, x_BxTxD, mem_BxMxD, pos_KxD, deterministic: bool):
        B, T, D = x_BxTxD.shape
        H, Dh = self.num_heads, self.d_head
        h_BxKxD = jnp.concatenate([mem_BxMxD, x_BxTxD], axis=1)
        K = h_BxKxD.shape[1]
        dense = lambda f, name: nn.Dense(f, use_bias=False, kernel_init=init_normal(), name=name)
        qkv = dense(3 * H * Dh, "qkv")(h_BxKxD).reshape(B, K, 3, H, Dh)
        q_BxTxHxDh = qkv[:, -T:, 0]
        k_BxKxHxDh, v_BxKxHxDh = qkv[:, :, 1], qkv[:, :, 2]
        r_KxHxDh = dense(H * Dh, "r_net")(pos_KxD).reshape(K, H, Dh)
        u_HxDh = self.param("r_w_bias", init_normal(), (H, Dh))
        v_HxDh = self.param("r_r_bias", init_normal(), (H, Dh))
        ac = jnp.einsum("bthd,bkhd->bhtk", q_BxTxHxDh + u_HxDh, k_BxKxHxDh)
        bd = rel_shift(jnp.einsum("bthd,khd->bhtk", q_BxTxHxDh + v_HxDh, r_KxHxDh))
        scores_BxHxTxK = (ac + bd) / jnp.sqrt(Dh).astype(ac.dtype)
        mask_TxK = causal_mask(T, K - T)
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
    def __call__(self, x_BxTxD, mem_BxMxD, pos_KxD, deterministic: bool):
        x = RelMultiHeadAttention(
            self.num_heads, self.d_head, self.dropout, self.dropatt, name="attn"
        )(x_BxTxD, mem_BxMxD, pos_KxD, deterministic)
        return FeedForward(self.d_ff, self.dropout, name="ff")(x, deterministic)


def cluster_bounds(vocab_size: int, cutoffs: Sequence[int]) -> list[int]:
    """``[0, c_1, ..., c_n, V]``; raises ValueError unless cutoffs increase strictly below V."""
    bounds = [0, *cutoffs, vocab_size]
    if any(a >= b for a, b in zip(bounds, bounds[1:], strict=False)):
        raise ValueError(f"cutoffs {list(cutoffs)} must increase strictly within (0, {vocab_size})")
    return bounds


class AdaptiveEmbedding(nn.Module):
    """Adaptive input (Baevski & Auli): cluster i has width ``D // div_val**i`` and a projection
    ``proj_i`` (D x d_i) to D. Without cutoffs this is a plain ``V x D`` table. Output scaled by
    sqrt(D) as in Transformer-XL.
    """

    vocab_size: int
    d_model: int
    cutoffs: Sequence[int] = ()
    div_val: int = 1

    def setup(self):
        bounds = cluster_bounds(self.vocab_size, self.cutoffs)
        self.bounds = bounds
        tables, projs = [], []
        for i in range(len(bounds) - 1):
            d_i = self.d_model // (self.div_val**i)
            tables.append(self.param(f"emb_{i}", init_normal(), (bounds[i + 1] - bounds[i], d_i)))
            if self.cutoffs and self.div_val > 1:
                projs.append(self.param(f"proj_{i}", init_normal(0.01), (self.d_model, d_i)))
            else:
                projs.append(None)
        self.tables, self.projs = tables, projs

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
    """Negative log-likelihood under an (adaptive) softmax tied to ``AdaptiveEmbedding``.

    Head: logits over cluster 0's words plus one logit per tail cluster. Tail cluster i: logits
    over its words; ``log p(w) = log p_head(cluster i) + log p_i(w)``. Weights tied to the
    input tables; projections tied for i >= 1 and a separate ``out_proj_0`` (Transformer-XL's
    WikiText-103 setting); one bias per word. All cluster logits are computed for every token.
    """

    vocab_size: int
    cutoffs: Sequence[int]
    div_val: int

    @nn.compact
    def __call__(self, h_BxTxD, targets_BxT, tables, projs):
        D = h_BxTxD.shape[-1]
        bounds = cluster_bounds(self.vocab_size, self.cutoffs)
        n_tail = len(bounds) - 2
        bias_V = self.param("bias", nn.initializers.zeros, (self.vocab_size,))
        proj0 = projs[0]
        if proj0 is not None:
            proj0 = self.param("out_proj_0", init_normal(0.01), proj0.shape)
        hidden0 = h_BxTxD @ proj0 if proj0 is not None else h_BxTxD
        head_logits = hidden0 @ tables[0].T + bias_V[: bounds[1]]
        if n_tail:
            cw = self.param("cluster_weight", init_normal(), (n_tail, D))
            cb = self.param("cluster_bias", nn.initializers.zeros, (n_tail,))
            head_logits = jnp.concatenate([head_logits, h_BxTxD @ cw.T + cb], axis=-1)
        head_logp = jax.nn.log_softmax(head_logits, axis=-1)
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
    clamp_len: int = -1

    @nn.compact
    def __call__(self, inputs_BxT, targets_BxT, mems_LxBxMxD, deterministic: bool = True):
        d_head = self.d_head or self.d_model // self.num_heads
        L, _, M, _ = mems_LxBxMxD.shape
        if L != self.num_layers:
            raise ValueError(f"mems has {L} layers, model has {self.num_layers}")
        T = inputs_BxT.shape[1]
        embed = AdaptiveEmbedding(
            self.vocab_size, self.d_model, tuple(self.cutoffs), self.div_val, name="embed"
        )
        x_BxTxD = nn.Dropout(self.dropout)(embed(inputs_BxT), deterministic=deterministic)
        positions_K = jnp.arange(M + T - 1, -1, -1.0)
        if self.clamp_len > 0:
            positions_K = jnp.minimum(positions_K, self.clamp_len)
        pos_KxD = sinusoid_positions(positions_K, self.d_model)
        pos_KxD = nn.Dropout(self.dropout)(pos_KxD, deterministic=deterministic)
        new_mems = []
        for layer in range(self.num_layers):
            mem_BxMxD = mems_LxBxMxD[layer]
            cat = jnp.concatenate([mem_BxMxD, x_BxTxD.astype(mem_BxMxD.dtype)], axis=1)
            new_mems.append(jax.lax.stop_gradient(cat[:, cat.shape[1] - M :]))
            x_BxTxD = DecoderLayer(
                self.num_heads, d_head, self.d_ff, self.dropout, self.dropatt, name=f"layer_{layer}"
            )(x_BxTxD, mem_BxMxD, pos_KxD, deterministic)
        x_BxTxD = nn.Dropout(self.dropout)(x_BxTxD, deterministic=deterministic)
        nll_BxT = AdaptiveSoftmax(
            self.vocab_size, tuple(self.cutoffs), self.div_val, name="softmax"
        )(x_BxTxD, targets_BxT, embed.tables, embed.projs)
        return nll_BxT, jnp.stack(new_mems)


def model_from_config(model_config, vocab_size: int | None = None) -> TransformerXL:
    """Build ``TransformerXL`` from ``config.model`` (vocab_size overridable by the data)."""
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
        clamp_len=c.get("clamp_len", -1),
    )
