"""topkast_jax.flops: training FLOPs relative to dense, against hand-computed values."""

import math

import pytest

from topkast_jax import flops


def test_matmul_macs_conv_and_dense():
    # 3×3 conv, 16 → 32 channels, output 8×8 positions: 3·3·16·32 MACs per position.
    assert flops.matmul_macs((3, 3, 16, 32), (1, 8, 8, 32)) == 3 * 3 * 16 * 32 * 64
    # Dense 100 → 10 on a (batch, features) output: one position.
    assert flops.matmul_macs((100, 10), (5, 10)) == 1000
    # Dense applied per token of a (batch, length, features) output.
    assert flops.matmul_macs((100, 10), (5, 7, 10)) == 7000
    with pytest.raises(ValueError, match="output_shape"):
        flops.matmul_macs((3, 3), (10,))


def test_train_flops_hand_computed():
    # Layer 1: c=100, D=0.2, D+M=0.5 → 100·(0.4 + 0.5) = 90.
    # Layer 2: c=300, dense → 300·3 = 900.   Dense total: 3·400 = 1200.
    layers = [
        flops.LayerCost("a", 100, forward=0.2, backward=0.5),
        flops.LayerCost("b", 300),
    ]
    assert flops.step_flops_vs_dense(layers) == pytest.approx(990 / 1200)
    assert flops.train_flops_vs_dense(layers) == pytest.approx(990 / 1200)
    assert flops.train_flops_vs_dense(layers, steps_multiplier=2.0) == pytest.approx(1980 / 1200)


def test_all_sparse_formula():
    # Every layer at forward sparsity 0.8 and backward sparsity 0.5: (2·0.2 + 0.5)/3 = 0.3.
    layers = [flops.LayerCost(str(i), c, 0.2, 0.5) for i, c in enumerate((7, 11, 13))]
    assert flops.train_flops_vs_dense(layers) == pytest.approx(0.3)
    # Dense backward (B = everything): (2·0.2 + 1)/3.
    layers = [flops.LayerCost(str(i), c, 0.2, 1.0) for i, c in enumerate((7, 11, 13))]
    assert flops.train_flops_vs_dense(layers) == pytest.approx(1.4 / 3)
    # Dense model: exactly 1.
    assert flops.train_flops_vs_dense([flops.LayerCost("d", 5)]) == 1.0


def test_steps_multiplier():
    assert flops.steps_multiplier(64_000, 32_000) == 2.0
    assert flops.steps_multiplier(160_000, 32_000) == 5.0
    layers = [flops.LayerCost("a", 10, 0.2, 0.5)]
    five_x = flops.train_flops_vs_dense(layers, flops.steps_multiplier(160_000, 32_000))
    assert five_x == pytest.approx(5 * 0.3)
    with pytest.raises(ValueError, match="num_train_steps"):
        flops.steps_multiplier(0, 32_000)
    with pytest.raises(ValueError, match="steps_multiplier"):
        flops.train_flops_vs_dense(layers, 0.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"macs": -1.0}, "macs"),
        ({"macs": 1.0, "forward": 1.5}, "forward"),
        ({"macs": 1.0, "forward": 0.5, "backward": 0.4}, "backward"),
        ({"macs": math.nan}, "macs"),
    ],
)
def test_layer_cost_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        flops.LayerCost("layer", **kwargs)


def test_empty_layers_rejected():
    with pytest.raises(ValueError, match="at least one layer"):
        flops.train_flops_vs_dense([])
