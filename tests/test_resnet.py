"""ModifiedResNet: parameter counts, BatchNorm behaviour, its convs and the attention
pool against float64 references (torch's conv2d, NumPy), and (when OpenCLIP is
installed) parity with the PyTorch original.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxclip.models.resnet import AttentionPool2d, Conv, ModifiedResNet

# A tiny tower: stage 1 needs a downsample (8 -> 32 channels), stage 4 has a block
# without one; the 64 px input ends in a 2x2 grid, so the attention pool sees 5 tokens.
TINY = {
    "layers": (2, 1, 1, 2),
    "output_dim": 16,
    "heads": 2,
    "image_size": 64,
    "width": 8,
}


def _param_count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(nn.unbox(tree)))


def _init_shapes(model: ModifiedResNet):
    size = model.image_size
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), images)


def _jitted(model: ModifiedResNet, train: bool):
    """`model.apply` under jit; train mode returns (output, {"batch_stats": ...})."""
    if train:
        return jax.jit(
            functools.partial(model.apply, train=True, mutable=["batch_stats"])
        )
    return jax.jit(model.apply)


def _images(seed: int, batch: int, size: int = 64) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (batch, size, size, 3))


@pytest.fixture(scope="module")
def tiny_variables() -> dict:
    """TINY's initial variables, made once: initialisation dominates these tests' time."""
    return jax.jit(ModifiedResNet(**TINY).init)(jax.random.key(0), _images(0, 1))


# ---------------------------------------------------------------------------
# Parameter counts for OpenCLIP's ResNet image towers (heads = width * 32 // 64).
# RN50's is exact from OpenCLIP. RN101's and RN50x4's are OpenCLIP's whole-model counts
# (119,688,033 and 178,300,601) minus their text towers (63,428,097 at width 512 and
# 91,163,521 at width 640: 12 layers, 49,408 tokens, 77 positions, logit scale);
# RN50x16's is 290,979,217 minus 123,650,305 (text width 768) the same way.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layers, width, output_dim, image_size, expected",
    [
        ((3, 4, 6, 3), 64, 1024, 224, 38_316_896),  # RN50
        ((3, 4, 23, 3), 64, 512, 224, 56_259_936),  # RN101
        ((4, 6, 10, 6), 80, 640, 288, 87_137_080),  # RN50x4
        ((6, 8, 18, 8), 96, 768, 384, 167_328_912),  # RN50x16
    ],
)
def test_param_count(layers, width, output_dim, image_size, expected):
    model = ModifiedResNet(layers, output_dim, width * 32 // 64, image_size, width)
    shapes = _init_shapes(model)
    assert set(shapes) == {"params", "batch_stats"}
    assert _param_count(shapes["params"]) == expected


def test_names_layout_and_init(tiny_variables):
    variables = tiny_variables
    params = nn.unbox(variables["params"])
    assert set(params) == {
        "conv1", "bn1", "conv2", "bn2", "conv3", "bn3",
        "layer1", "layer2", "layer3", "layer4", "attnpool",
    }  # fmt: skip
    assert params["conv1"]["kernel"].shape == (3, 3, 3, 4)  # [kh, kw, in, out]
    assert set(params["layer1"]) == {"0", "1"}
    assert set(params["layer1"]["0"]["downsample"]) == {"0", "1"}
    assert "downsample" not in params["layer4"]["1"]
    assert params["layer1"]["0"]["downsample"]["0"]["kernel"].shape == (1, 1, 8, 32)
    assert set(params["attnpool"]) == {
        "positional_embedding", "q_proj", "k_proj", "v_proj", "c_proj",
    }  # fmt: skip
    assert params["attnpool"]["positional_embedding"].shape == (5, 256)
    assert params["attnpool"]["c_proj"]["kernel"].shape == (256, 16)
    # OpenCLIP zero-initialises the last BN scale of every bottleneck (not the stem's).
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        for block in params[stage].values():
            np.testing.assert_array_equal(block["bn3"]["scale"], 0.0)
            assert np.all(block["bn1"]["scale"] == 1.0)
    assert np.all(params["bn3"]["scale"] == 1.0)
    # Everything is float32 and carries logical axis names.
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
    specs = nn.get_partition_spec(variables["params"])
    assert tuple(specs["conv1"]["kernel"]) == (None, None, "conv_in", "conv_out")
    assert tuple(specs["attnpool"]["q_proj"]["kernel"]) == ("embed", "heads")


# ---------------------------------------------------------------------------
# Forward pass and BatchNorm.
# ---------------------------------------------------------------------------


def test_forward_shape_and_finite(tiny_variables):
    model = ModifiedResNet(**TINY)
    out = jax.jit(model.apply)(tiny_variables, _images(1, 3))
    assert out.shape == (3, 16)
    assert out.dtype == jnp.float32
    assert np.all(np.isfinite(out))


def test_train_updates_batch_stats_and_eval_uses_them(tiny_variables):
    model = ModifiedResNet(**TINY)
    train_apply, eval_apply = _jitted(model, True), _jitted(model, False)
    images = _images(2, 4)
    variables = tiny_variables
    params, stats = variables["params"], variables["batch_stats"]

    out, updates = train_apply(variables, images)
    new_stats = updates["batch_stats"]
    assert np.all(np.isfinite(out))
    assert jax.tree.structure(new_stats) == jax.tree.structure(stats)
    # Fresh statistics are mean 0 / var 1; after one step every layer has moved.
    for old, new in zip(jax.tree.leaves(stats), jax.tree.leaves(new_stats)):
        assert new.dtype == jnp.float32
        assert not np.allclose(old, new)
    # Torch momentum 0.1: the stem's first running mean is 0.1 x the batch mean of
    # conv1's output, computed here with an independent NumPy convolution.
    kernel = np.asarray(nn.unbox(params)["conv1"]["kernel"], np.float64)
    padded = np.pad(np.asarray(images, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    conv1 = sum(
        padded[:, i : i + 64 : 2, j : j + 64 : 2, :] @ kernel[i, j]
        for i in range(3)
        for j in range(3)
    )
    np.testing.assert_allclose(
        new_stats["bn1"]["mean"], 0.1 * conv1.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        new_stats["bn1"]["var"], 0.9 + 0.1 * conv1.var(axis=(0, 1, 2)), rtol=1e-5
    )

    # Eval normalises with the running statistics: examples are independent of the
    # batch, and changing the statistics changes the output.
    trained = {"params": params, "batch_stats": new_stats}
    full = eval_apply(trained, images)
    alone = eval_apply(trained, images[:1])
    np.testing.assert_allclose(alone[0], full[0], rtol=1e-5, atol=1e-6)
    shifted = jax.tree.map(lambda s: s + 0.5, new_stats)
    moved = eval_apply({"params": params, "batch_stats": shifted}, images)
    assert not np.allclose(moved, full, atol=1e-3)
    # Train mode ignores the running statistics and depends on the batch.
    train_full, _ = train_apply(trained, images)
    train_moved, _ = train_apply({"params": params, "batch_stats": shifted}, images)
    np.testing.assert_allclose(train_moved, train_full, rtol=1e-6)
    train_pair, _ = train_apply(trained, images[:2])
    assert not np.allclose(train_pair[0], train_full[0], atol=1e-4)


def test_bfloat16_compute_keeps_float32_state(tiny_variables):
    model32 = ModifiedResNet(**TINY)
    model16 = ModifiedResNet(**TINY, dtype=jnp.bfloat16)
    images = _images(3, 2)
    variables = tiny_variables
    # The same float32 parameters serve both compute dtypes.
    shapes16 = jax.eval_shape(model16.init, jax.random.key(0), images)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), nn.unbox(shapes16)) == (
        jax.tree.map(lambda x: (x.shape, x.dtype), nn.unbox(variables))
    )
    out16, updates = _jitted(model16, True)(variables, images)
    assert out16.dtype == jnp.bfloat16
    assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(updates))
    out32, _ = _jitted(model32, True)(variables, images)
    scale = float(np.abs(out32).max())
    np.testing.assert_allclose(
        np.asarray(out16, np.float32), out32, atol=0.05 * scale, rtol=0
    )


def test_wrong_image_size_is_refused():
    model = ModifiedResNet(**TINY)
    with pytest.raises(ValueError, match="image_size=64"):
        jax.eval_shape(model.init, jax.random.key(0), _images(0, 1, size=96))


# ---------------------------------------------------------------------------
# Attention pool against NumPy float64: full multi-head attention over all tokens,
# keeping the mean token's row (what torch's F.multi_head_attention_forward does).
# ---------------------------------------------------------------------------


def _attnpool_reference(features: np.ndarray, params: dict, heads: int) -> np.ndarray:
    """features [b, h, w, c] float64 -> [b, output_dim]."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    b, h, w, c = features.shape
    tokens = features.reshape(b, h * w, c)
    tokens = np.concatenate([tokens.mean(axis=1, keepdims=True), tokens], axis=1)
    tokens = tokens + p["positional_embedding"]
    d = c // heads
    out = np.zeros((b, c))
    for i in range(b):
        q = tokens[i] @ p["q_proj"]["kernel"] + p["q_proj"]["bias"]
        k = tokens[i] @ p["k_proj"]["kernel"] + p["k_proj"]["bias"]
        v = tokens[i] @ p["v_proj"]["kernel"] + p["v_proj"]["bias"]
        for head in range(heads):
            cols = slice(head * d, (head + 1) * d)
            logits = q[:, cols] @ k[:, cols].T / np.sqrt(d)  # [tokens, tokens]
            weights = np.exp(logits - logits.max(axis=1, keepdims=True))
            weights /= weights.sum(axis=1, keepdims=True)
            out[i, cols] = (weights @ v[:, cols])[0]
    return out @ p["c_proj"]["kernel"] + p["c_proj"]["bias"]


@pytest.mark.parametrize("heads", [1, 4])
def test_attnpool_matches_numpy_reference(heads):
    pool = AttentionPool2d(spatial_size=3, num_heads=heads, output_dim=6)
    features = jax.random.normal(jax.random.key(4), (2, 3, 3, 16))
    params = nn.unbox(pool.init(jax.random.key(5), features)["params"])
    # Non-zero biases so the test sees them (their init is small but random).
    params = jax.tree.map(lambda x: x + 0.1, params)
    out = pool.apply({"params": params}, features)
    expected = _attnpool_reference(np.asarray(features, np.float64), params, heads)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
@pytest.mark.parametrize("kernel, stride", [(1, 1), (3, 1), (3, 2), (1, 2)])
def test_conv_and_its_gradients_match_torch_conv2d(kernel, stride):
    """`Conv` (1x1 stride 1 runs as a matmul) against torch's conv2d in float64:
    output, input gradient and kernel gradient; the kernel has `nn.Conv`'s layout."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(kernel * 10 + stride)
    x = rng.standard_normal((2, 9, 9, 5)).astype(np.float32)
    cotangent = rng.standard_normal((2, -(-9 // stride), -(-9 // stride), 7))
    layer = Conv(7, kernel, stride)
    params = nn.unbox(layer.init(jax.random.key(0), x)["params"])
    reference_shapes = nn.Conv(7, (kernel, kernel), use_bias=False).init(
        jax.random.key(0), x
    )["params"]
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, reference_shapes)
    kernel_value = np.asarray(params["kernel"])

    out, vjp = jax.vjp(
        lambda x, k: layer.apply({"params": {"kernel": k}}, x), x, kernel_value
    )
    grad_x, grad_kernel = vjp(jnp.asarray(cotangent, jnp.float32))

    torch_x = torch.tensor(x, dtype=torch.float64).permute(0, 3, 1, 2)
    torch_x.requires_grad_(True)
    torch_kernel = torch.tensor(kernel_value, dtype=torch.float64).permute(3, 2, 0, 1)
    torch_kernel.requires_grad_(True)
    torch_out = torch.nn.functional.conv2d(
        torch_x, torch_kernel, stride=stride, padding=kernel // 2
    )
    torch_out.backward(torch.tensor(cotangent).permute(0, 3, 1, 2))
    want_out = torch_out.detach().permute(0, 2, 3, 1).numpy()
    want_grad_x = torch_x.grad.permute(0, 2, 3, 1).numpy()
    want_grad_kernel = torch_kernel.grad.permute(2, 3, 1, 0).numpy()
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad_x, want_grad_x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad_kernel, want_grad_kernel, rtol=1e-5, atol=1e-4)


# Parity with OpenCLIP's PyTorch ModifiedResNet (skipped without torch + open_clip).
# ---------------------------------------------------------------------------


def torch_to_flax(state_dict) -> dict:
    """OpenCLIP ModifiedResNet state_dict -> {"params": ..., "batch_stats": ...}."""
    variables: dict = {"params": {}, "batch_stats": {}}
    for key, tensor in state_dict.items():
        *path, leaf = key.split(".")
        value = tensor.detach().cpu().double().numpy()
        if leaf == "num_batches_tracked":
            continue
        if leaf in ("running_mean", "running_var"):
            collection, leaf = "batch_stats", {"running_mean": "mean"}.get(leaf, "var")
        else:
            collection = "params"
            if leaf == "weight":
                if value.ndim == 4:  # conv [out, in, kh, kw] -> [kh, kw, in, out]
                    leaf, value = "kernel", value.transpose(2, 3, 1, 0)
                elif value.ndim == 2:  # linear [out, in] -> [in, out]
                    leaf, value = "kernel", value.T
                else:  # BatchNorm
                    leaf = "scale"
        node = variables[collection]
        for name in path:
            node = node.setdefault(name, {})
        node[leaf] = value.astype(np.float32)
    return variables


def check_parity(torch_resnet_cls, seed: int = 0) -> float:
    """Build both towers with TINY, copy torch's weights, return the max |difference|."""
    import torch

    torch.manual_seed(seed)
    reference = torch_resnet_cls(**TINY)
    with torch.no_grad():  # randomise BN so no block is the identity (bn3 starts at 0)
        for module in reference.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    variables = torch_to_flax(reference.state_dict())

    model = ModifiedResNet(**TINY)
    images = np.array(_images(6, 3), np.float32)  # writable, for torch.from_numpy
    expected = jax.eval_shape(model.init, jax.random.key(0), images)
    expected = jax.tree.map(lambda x: x.shape, nn.unbox(expected))
    assert jax.tree.map(np.shape, variables) == expected  # one-for-one

    reference.eval()
    with torch.no_grad():
        torch_out = reference(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    eval_diff = np.abs(np.asarray(model.apply(variables, images)) - torch_out).max()

    # Train mode: batch statistics, and the same running-mean update.
    reference.train()
    with torch.no_grad():
        torch_out = reference(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    out, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
    train_diff = np.abs(np.asarray(out) - torch_out).max()
    # (Only the means: torch's running_var uses the unbiased variance, Flax's not.)
    torch_stats = torch_to_flax(reference.state_dict())["batch_stats"]
    ours = jax.tree_util.tree_leaves_with_path(updates["batch_stats"])
    mean_diff = max(
        np.abs(np.asarray(value) - theirs).max()
        for (path, value), theirs in zip(ours, jax.tree.leaves(torch_stats))
        if path[-1].key == "mean"
    )
    return float(max(eval_diff, train_diff, mean_diff))


def test_parity_with_openclip():
    from convert_util import open_clip

    open_clip()  # skips without torch + open_clip; hides a mismatched torchvision
    from open_clip.modified_resnet import ModifiedResNet

    assert check_parity(ModifiedResNet) < 1e-4
