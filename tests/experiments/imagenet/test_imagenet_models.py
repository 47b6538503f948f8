"""ResNet models: parameter count, layer names, per-layer MACs, BatchNorm over the global batch."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.imagenet import costs, models

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _abstract(model, size):
    return jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
    )


def test_resnet50_has_25557032_params_and_named_first_last_layers():
    variables = _abstract(models.create_model("resnet50", num_classes=1000), 224)
    params = variables["params"]
    assert sum(x.size for x in jax.tree.leaves(params)) == 25_557_032
    assert params["conv_init"]["kernel"].shape == (7, 7, 3, 64)
    assert params["head"]["kernel"].shape == (2048, 1000)
    assert params["head"]["bias"].shape == (1000,)
    assert set(params["conv_init"]) == {"kernel"}  # convolutions have no bias
    blocks = [k for k in params if k.startswith("stage")]
    assert len(blocks) == 3 + 4 + 6 + 3


def test_resnet50_macs_per_layer():
    model = models.create_model("resnet50", num_classes=1000)
    macs = costs.layer_macs(model, _abstract(model, 224), (1, 224, 224, 3))
    assert len(macs) == 53 + 1  # 49 block convs + 4 projections + stem, and the classifier
    assert macs["conv_init/kernel"] == 7 * 7 * 3 * 64 * 112 * 112
    assert macs["stage1_block1/conv2/kernel"] == 3 * 3 * 64 * 64 * 56 * 56
    assert macs["stage4_block1/conv_proj/kernel"] == 1024 * 2048 * 7 * 7
    assert macs["head/kernel"] == 2048 * 1000
    assert sum(macs.values()) == pytest.approx(4.09e9, rel=0.01)  # the usual "4.1 GMACs"


def test_unknown_model_name():
    with pytest.raises(ValueError, match="model name"):
        models.create_model("resnet51", num_classes=10)


def test_tiny_resnet_train_and_eval_modes():
    model = models.create_model("resnet_tiny", num_classes=5)
    x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3)) * 3 + 1
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)
    # The last BatchNorm of each residual branch starts at zero scale: blocks start as identity.
    assert np.all(np.asarray(variables["params"]["stage1_block1"]["bn3"]["scale"]) == 0)
    logits, updated = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, x
    )
    assert logits.shape == (4, 5) and logits.dtype == jnp.float32
    before = variables["batch_stats"]["bn_init"]["mean"]
    after = updated["batch_stats"]["bn_init"]["mean"]
    assert not np.allclose(before, after)  # train mode updates the running statistics
    bf16 = models.create_model("resnet_tiny", num_classes=5, dtype=jnp.bfloat16)
    eval_logits = jax.jit(lambda v, x: bf16.apply(v, x, train=False))(variables, x)
    assert eval_logits.shape == (4, 5) and eval_logits.dtype == jnp.float32


_BN_SCRIPT = textwrap.dedent(
    """
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import flax.linen as nn, jax, jax.numpy as jnp, numpy as np  # noqa
    from jax.sharding import NamedSharding, PartitionSpec as P
    assert jax.device_count() == 8
    mesh = jax.make_mesh((8,), ("data",))
    # Device i holds 2 rows with mean 10*i: per-device means differ, the global mean is 35.
    x = np.repeat(np.arange(8, dtype=np.float32) * 10, 2)[:, None] * np.ones((16, 3), np.float32)
    x_sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
    bn = nn.BatchNorm(use_running_average=False, momentum=0.0)
    variables = bn.init(jax.random.key(0), x[:2])
    @jax.jit
    def apply(v, x):
        return bn.apply(v, x, mutable=["batch_stats"])
    y, updated = apply(variables, x_sharded)
    assert len(x_sharded.addressable_shards) == 8
    np.testing.assert_allclose(updated["batch_stats"]["mean"], np.full(3, 35.0), rtol=1e-6)
    np.testing.assert_allclose(updated["batch_stats"]["var"], np.full(3, x[:, 0].var()), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(y).mean(0), 0.0, atol=1e-5)

    # The whole tiny ResNet: a train-mode step on the batch sharded over 8 devices gives the
    # logits and BatchNorm statistics of the same batch on one device.
    from experiments.imagenet import models
    model = models.create_model("resnet_tiny", num_classes=3)
    offsets = jnp.arange(16.0)[:, None, None, None]  # per-device batches differ in mean
    images = jax.random.normal(jax.random.key(1), (16, 8, 8, 3)) + offsets
    v = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(images)
    step = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    one = step(v, jax.device_put(images, jax.devices()[0]))
    eight = step(v, jax.device_put(images, NamedSharding(mesh, P("data"))))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5), one, eight)
    print("GLOBAL_BN_OK")
    """
)


def test_batchnorm_statistics_are_over_the_global_sharded_batch():
    """Under jit with the batch sharded over 8 devices, plain BatchNorm uses global statistics."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    out = subprocess.run(
        [sys.executable, "-c", _BN_SCRIPT],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "GLOBAL_BN_OK" in out.stdout


@pytest.mark.parametrize(
    "k, pads", [(1, (0, 0)), (2, (0, 1)), (3, (1, 1)), (4, (1, 2)), (7, (3, 3))]
)
def test_fixed_padding_is_rigl_formula(k, pads):
    """RigL's ``fixed_padding``: (k - 1) // 2 before, the rest of k - 1 after, for any stride."""
    assert models.fixed_padding(k) == pads


def _conv_explicit(x_BxHxWxC, kernel_KxKxCxF, stride, pad):
    """Plain numpy cross-correlation of x zero-padded by ``pad = (before, after)`` per axis."""
    x = np.pad(x_BxHxWxC, ((0, 0), pad, pad, (0, 0)))
    k = kernel_KxKxCxF.shape[0]
    out_h = (x.shape[1] - k) // stride + 1
    out_w = (x.shape[2] - k) // stride + 1
    out = np.zeros((x.shape[0], out_h, out_w, kernel_KxKxCxF.shape[-1]), np.float64)
    for i in range(out_h):
        for j in range(out_w):
            patch = x[:, i * stride : i * stride + k, j * stride : j * stride + k, :]
            out[:, i, j] = np.einsum("bhwc,hwcf->bf", patch, kernel_KxKxCxF)
    return out


def test_strided_convolutions_pad_symmetrically_like_rigl():
    """The stride-2 stem and the stride-2 3×3 convolution of a bottleneck block equal an explicit
    convolution of their input padded (1, 1) (RigL), not (0, 1) (Flax/TF 'SAME' on even inputs)."""
    model = models.create_model("resnet_tiny", num_classes=3)
    images = np.asarray(jax.random.normal(jax.random.key(2), (2, 16, 16, 3)), np.float64)
    variables = model.init(jax.random.key(0), jnp.asarray(images), train=False)
    _, state = model.apply(
        variables, jnp.asarray(images), train=False, capture_intermediates=True, mutable=True
    )
    got = state["intermediates"]
    params = variables["params"]
    # stem: 3×3 / 2 on 16×16
    stem = np.asarray(params["conv_init"]["kernel"], np.float64)
    want = _conv_explicit(images, stem, 2, (1, 1))
    np.testing.assert_allclose(got["conv_init"]["__call__"][0], want, rtol=1e-4, atol=1e-4)
    # stage 2, block 1: conv2 is 3×3 / 2 on the 8×8 output of relu(bn1)
    block = got["stage2_block1"]
    x = np.maximum(np.asarray(block["bn1"]["__call__"][0], np.float64), 0.0)
    assert x.shape[1:3] == (8, 8)
    kernel = np.asarray(params["stage2_block1"]["conv2"]["kernel"], np.float64)
    out = np.asarray(block["conv2"]["__call__"][0])
    np.testing.assert_allclose(out, _conv_explicit(x, kernel, 2, (1, 1)), rtol=1e-4, atol=1e-4)
    assert not np.allclose(out, _conv_explicit(x, kernel, 2, (0, 1)), rtol=1e-2, atol=1e-2)
