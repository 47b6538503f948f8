"""Transformer-XL choices that follow the original code (kimiyoung/transformer-xl), each against an
explicit formula: the adaptive softmax head on ``h @ proj_0``, adaptive input with ``d_embed``,
``same_length`` / ``clamp_len``, shared or per-layer u, v biases, and the per-dataset configs."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.language_model import models, train

V, D, L, H, F = 30, 16, 2, 2, 32


def _model(**kw):
    args = dict(vocab_size=V, num_layers=L, d_model=D, num_heads=H, d_ff=F, dropout=0.0)
    args.update(kw)
    return models.TransformerXL(**args)


def _init(model, T=4, M=3):
    z = jnp.zeros((2, T), jnp.int32)
    return model.init(jax.random.PRNGKey(0), z, z, jnp.zeros((model.num_layers, 2, M, D)))


def _randomise(variables, seed=7):
    """Every param drawn N(0, 0.3) (zero-initialised biases would hide a missing term)."""
    leaves, treedef = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    new = [0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    return jax.tree.unflatten(treedef, new)


def _log_softmax(z):
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


def _nll_reference(params, h_NxD, targets_N, bounds, projs_in):
    """Transformer-XL's adaptive softmax token by token in float64 (tf/model.py
    ``mask_adaptive_logsoftmax``): head logits over [cluster-0 words; one per tail cluster] on
    ``h @ out_proj_0`` with cluster weights of width d_0; tail i on ``h @ proj_i``."""
    emb, sm = params["embed"], params["softmax"]
    f64 = lambda x: np.asarray(x, np.float64)
    tables = [f64(emb[f"emb_{i}"]) for i in range(len(bounds) - 1)]
    b = f64(sm["bias"])
    P0 = f64(sm["out_proj_0"]) if "out_proj_0" in sm else None
    out = []
    for h, t in zip(f64(h_NxD), targets_N, strict=True):
        h0 = h @ P0 if P0 is not None else h
        head_w, head_b = tables[0], b[: bounds[1]]
        if len(bounds) > 2:
            head_w = np.concatenate([head_w, f64(sm["cluster_weight"])])
            head_b = np.concatenate([head_b, f64(sm["cluster_bias"])])
        head = _log_softmax(head_w @ h0 + head_b)
        i = int(np.searchsorted(bounds, t, side="right")) - 1
        if i == 0:
            out.append(-head[t])
            continue
        lo, hi = bounds[i], bounds[i + 1]
        hi_h = h @ f64(projs_in[i]) if projs_in[i] is not None else h
        tail = _log_softmax(tables[i] @ hi_h + b[lo:hi])
        out.append(-(head[bounds[1] + i - 1] + tail[t - lo]))
    return np.array(out)


CASES = {
    # WikiText-103's setting: per-cluster widths d_embed / div_val^i and projections
    "div_val 2, d_embed 16": dict(cutoffs=(10, 20), div_val=2, d_embed=16),
    "div_val 2, d_embed 8": dict(cutoffs=(10, 20), div_val=2, d_embed=8),
    # one projection for all clusters (div_val 1, d_embed != d_model)
    "div_val 1, d_embed 8": dict(cutoffs=(10, 20), div_val=1, d_embed=8),
    # enwik8 with d_embed != d_model: one table, projected in and out
    "no cutoffs, d_embed 8": dict(cutoffs=(), div_val=1, d_embed=8),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_adaptive_softmax_and_input_equal_explicit_formula(case):
    kw = CASES[case]
    model = _model(**kw)
    variables = _randomise(_init(model))
    params = variables["params"]
    bounds = [0, *kw["cutoffs"], V]
    n = len(bounds) - 1
    emb = params["embed"]
    if kw["cutoffs"] and kw["div_val"] > 1:
        projs = [emb[f"proj_{i}"] for i in range(n)]
        widths = [kw["d_embed"] // kw["div_val"] ** i for i in range(n)]
    else:
        projs = [emb["proj_0"]] * n  # d_embed != d_model in every case here
        widths = [kw["d_embed"]] * n
    assert [emb[f"emb_{i}"].shape[1] for i in range(n)] == widths
    if n > 1:
        assert params["softmax"]["cluster_weight"].shape == (n - 1, widths[0])

    tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 9), 0, V)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    mems = jnp.zeros((L, 2, 3, D))
    (nll, _), state = model.apply(
        variables, inputs, targets, mems, capture_intermediates=True, mutable=["intermediates"]
    )
    inter = state["intermediates"]
    # adaptive input: sqrt(D) * table_i[w - c_i] @ proj_i^T
    want_emb = np.stack(
        [
            np.sqrt(D)
            * (
                np.asarray(emb[f"emb_{i}"], np.float64)[w - bounds[i]]
                @ np.asarray(projs[i], np.float64).T
            )
            for w in np.asarray(inputs).ravel()
            for i in [int(np.searchsorted(bounds, w, side="right")) - 1]
        ]
    )
    got_emb = np.asarray(inter["embed"]["__call__"][0]).reshape(-1, D)
    np.testing.assert_allclose(got_emb, want_emb, rtol=1e-5, atol=1e-5)
    # adaptive softmax on the last layer's output
    h = np.asarray(inter[f"layer_{L - 1}"]["__call__"][0]).reshape(-1, D)
    want = _nll_reference(params, h, np.asarray(targets).ravel(), bounds, projs)
    np.testing.assert_allclose(np.asarray(nll).ravel(), want, rtol=1e-5, atol=1e-5)


def test_cluster_logits_on_raw_hidden_would_differ():
    """The explicit reference discriminates: the old head (cluster logits ``h @ C^T`` on the raw
    hidden state, width D) gives other NLLs for the same params (d_embed = d_model, div_val 2)."""
    model = _model(cutoffs=(10, 20), div_val=2, d_embed=D)
    variables = _randomise(_init(model))
    params = variables["params"]
    tokens = jax.random.randint(jax.random.PRNGKey(4), (2, 9), 20, V)  # tail-cluster targets
    (nll, _), state = model.apply(
        variables,
        tokens[:, :-1],
        tokens[:, 1:],
        jnp.zeros((L, 2, 3, D)),
        capture_intermediates=True,
        mutable=["intermediates"],
    )
    h = np.asarray(state["intermediates"][f"layer_{L - 1}"]["__call__"][0]).reshape(-1, D)
    sm = params["softmax"]
    h0 = h @ np.asarray(sm["out_proj_0"])
    w0, b0 = np.asarray(params["embed"]["emb_0"]), np.asarray(sm["bias"])[:10]
    cw, cb = np.asarray(sm["cluster_weight"]), np.asarray(sm["cluster_bias"])
    new_head = np.concatenate([h0 @ w0.T + b0, h0 @ cw.T + cb], axis=-1)
    old_head = np.concatenate([h0 @ w0.T + b0, h @ cw.T + cb], axis=-1)
    lse = lambda z: np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    # the head's share of the NLL of cluster-2 targets (head column 11)
    new_part = lse(new_head) - new_head[:, 11]
    old_part = lse(old_head) - old_head[:, 11]
    assert np.abs(new_part - old_part).max() > 1e-2
    assert nll.shape == (2, 8)


@pytest.mark.parametrize("T, M", [(1, 1), (3, 2), (4, 4), (2, 5)])
def test_masks_equal_explicit_formula(T, M):
    """Causal: j <= M + i. same_length (tf/model.py ``_create_mask``): also j >= i, so every
    query sees the same M + 1 keys ending at itself."""
    causal = np.asarray(models.causal_mask(T, M))
    same = np.asarray(models.causal_mask(T, M, same_length=True))
    for i in range(T):
        for j in range(M + T):
            assert causal[i, j] == (j <= M + i)
            assert same[i, j] == (i <= j <= M + i)
    np.testing.assert_array_equal(same.sum(axis=1), np.full(T, M + 1))


def test_same_length_without_memory_raises():
    with pytest.raises(ValueError, match="same_length needs a memory"):
        models.causal_mask(3, 0, same_length=True)


@pytest.mark.parametrize("K, clamp_len", [(6, -1), (6, 0), (6, 3), (6, 5), (6, 9), (1, 2)])
def test_relative_positions_equal_explicit_formula(K, clamp_len):
    """Distances K-1, ..., 0 of the keys, min(., clamp_len) when clamp_len > 0 (tf/model.py)."""
    want = [min(K - 1 - j, clamp_len) if clamp_len > 0 else K - 1 - j for j in range(K)]
    np.testing.assert_array_equal(np.asarray(models.relative_positions(K, clamp_len)), want)


def test_same_length_and_clamp_len_in_the_model():
    """One layer: with same_length, memory slot 0 reaches only query 0; clamp_len >= K - 1
    changes nothing, a smaller one does; neither changes the parameters."""
    one = dict(num_layers=1)
    base = _model(**one)
    variables = _randomise(_init(base))
    T, M = 4, 3
    tokens = jax.random.randint(jax.random.PRNGKey(5), (2, T + 1), 0, V)
    mems = jax.random.normal(jax.random.PRNGKey(6), (1, 2, M, D))
    moved = mems.at[:, :, 0].add(1.0)

    def nll(model, m):
        return np.asarray(model.apply(variables, tokens[:, :-1], tokens[:, 1:], m)[0])

    same = base.clone(same_length=True)
    assert jax.tree.structure(_init(same)) == jax.tree.structure(variables)
    np.testing.assert_array_equal(nll(same, mems)[:, 1:], nll(same, moved)[:, 1:])
    assert not np.allclose(nll(same, mems)[:, 0], nll(same, moved)[:, 0])
    assert not np.allclose(nll(base, mems)[:, 1:], nll(base, moved)[:, 1:])
    np.testing.assert_array_equal(nll(base.clone(clamp_len=M + T - 1), mems), nll(base, mems))
    assert not np.allclose(nll(base.clone(clamp_len=2), mems), nll(base, mems))


def test_untie_r_shares_or_unties_the_biases():
    """untie_r=False: one (H, Dh) pair at the top, used by every layer (equal to an untied model
    whose layers all hold that pair); untie_r=True: a pair per layer."""
    Dh = D // H
    shared, untied = _model(untie_r=False), _model(untie_r=True)
    vs = _randomise(_init(shared))
    ps, pu = vs["params"], _init(untied)["params"]
    assert ps["r_w_bias"].shape == ps["r_r_bias"].shape == (H, Dh)
    assert all("r_w_bias" not in ps[f"layer_{k}"]["attn"] for k in range(L))
    assert "r_w_bias" not in pu and all(
        pu[f"layer_{k}"]["attn"]["r_r_bias"].shape == (H, Dh) for k in range(L)
    )
    per_layer = 5 * D * D + 2 * D * F + F + D + 4 * D  # without biases
    count = lambda p: sum(x.size for x in jax.tree.leaves(p))
    assert count(ps) == L * per_layer + 2 * H * Dh + V * D + V
    assert count(pu) == L * (per_layer + 2 * H * Dh) + V * D + V
    # the untied model with the shared pair copied into every layer computes the same NLL
    copied = {k: v for k, v in ps.items() if k not in ("r_w_bias", "r_r_bias")}
    for k in range(L):
        layer = dict(copied[f"layer_{k}"])
        layer["attn"] = dict(layer["attn"], r_w_bias=ps["r_w_bias"], r_r_bias=ps["r_r_bias"])
        copied[f"layer_{k}"] = layer
    tokens = jax.random.randint(jax.random.PRNGKey(8), (2, 5), 0, V)
    mems = jax.random.normal(jax.random.PRNGKey(9), (L, 2, 3, D))
    a = shared.apply(vs, tokens[:, :-1], tokens[:, 1:], mems)[0]
    b = untied.apply({"params": copied}, tokens[:, :-1], tokens[:, 1:], mems)[0]
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_d_embed_parameter_count():
    """enwik8 layout (no cutoffs) with E != D: table V x E, projections in and out D x E."""
    E = 8
    params = _init(_model(d_embed=E, untie_r=False))["params"]
    per_layer = 5 * D * D + 2 * D * F + F + D + 4 * D
    want = L * per_layer + 2 * D + V * E + 2 * D * E + V
    assert sum(x.size for x in jax.tree.leaves(params)) == want


def test_d_embed_too_small_for_div_val_raises():
    with pytest.raises(ValueError, match="d_embed=8 // div_val=4"):
        _init(_model(cutoffs=(10, 20), div_val=4, d_embed=8))


def _abstract_params(module_name):
    config = importlib.import_module(module_name).get_config()
    model = models.model_from_config(config.model)
    tok = jax.ShapeDtypeStruct((1, 2), jnp.int32)
    mems = jax.ShapeDtypeStruct((model.num_layers, 1, 2, model.d_model), jnp.float32)
    return config, jax.eval_shape(model.init, jax.random.PRNGKey(0), tok, tok, mems)["params"]


def _bias_count(params):
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return sum(
        x.size
        for path, x in flat
        if any(getattr(k, "key", None) in ("r_w_bias", "r_r_bias") for k in path)
    )


@pytest.mark.parametrize(
    "module, untie_r, d_embed, biases",
    [
        ("configs.enwik8.transformer_xl_24l", False, 1024, 2 * 8 * 128),
        ("configs.enwik8.transformer_xl_small", False, 512, 2 * 8 * 64),
        ("configs.wikitext103.transformer_xl_18l", True, 1024, 18 * 2 * 16 * 64),
    ],
)
def test_paper_configs_follow_the_original_scripts(module, untie_r, d_embed, biases):
    """enwik8: shared biases (2,048 on the 24-layer model); WikiText-103: per layer. Training
    without same_length or clamping, evaluation with same_length and clamp_len 1000."""
    config, params = _abstract_params(module)
    train.validate_config(config)
    assert (config.model.untie_r, config.model.d_embed) == (untie_r, d_embed)
    assert _bias_count(params) == biases
    assert (config.model.same_length, config.model.clamp_len) == (False, -1)
    assert (config.eval_same_length, config.eval_clamp_len) == (True, 1000)
    evaluated = train.eval_model(config, models.model_from_config(config.model))
    assert (evaluated.same_length, evaluated.clamp_len) == (True, 1000)


def test_eval_protocol_fields_are_validated():
    config = importlib.import_module("configs.enwik8.transformer_xl_small").get_config()
    config.eval_mem_len = 0
    with pytest.raises(ValueError, match="config.eval_mem_len > 0 with config.eval_same_length"):
        train.validate_config(config)
    config = importlib.import_module("configs.enwik8.transformer_xl_small").get_config()
    config.eval_clamp_len = -2
    with pytest.raises(ValueError, match="config.eval_clamp_len"):
        train.validate_config(config)
