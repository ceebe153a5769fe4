"""SigLIP weights in and out: HF transformers' SiglipModel (PyTorch, CPU, float32) and
OpenCLIP's timm-named SigLIP state dicts.

The same random weights and inputs go through both frameworks: HF's files are read by
`jaxclip.load`, and jaxclip's export is read by `SiglipModel.from_pretrained`. Image
and text embeddings must agree within 1e-4 (max abs), logits within 1e-3; round
trips give the same bits. OpenCLIP is not installed here: its key names and shapes
are checked against the list OpenCLIP 3.3.0 itself printed for ViT-B-16-SigLIP2
(`reference/`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from convert_util import assert_trees_equal, max_abs_diff, random_variables

import jaxclip
from jaxclip.convert import hf, load_weights, openclip, save_hf, save_openclip
from jaxclip.convert.files import Weights
from jaxclip.convert.siglip import SIGLIP_MEAN, SIGLIP_STD
from jaxclip.models import get_model_config

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

EMBED_TOL, LOGIT_TOL = 1e-4, 1e-3
REFERENCE = Path(__file__).parent / "reference"

# A tiny SiglipModel config whose widths all differ, so a transposed or mis-split
# tensor cannot go unnoticed; exact GELU in the image tower, tanh in the text tower.
TINY_HF = {
    "text_config": {
        "vocab_size": 300,
        "hidden_size": 48,
        "intermediate_size": 80,
        "num_attention_heads": 3,
        "num_hidden_layers": 2,
        "max_position_embeddings": 10,
        "hidden_act": "gelu_pytorch_tanh",
    },
    "vision_config": {
        "hidden_size": 48,
        "intermediate_size": 112,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "image_size": 32,
        "patch_size": 8,
        "hidden_act": "gelu",
    },
}


def random_hf_model(config_kwargs: dict, seed: int = 0):
    """An HF SiglipModel with random weights; biases and norms randomised too."""
    torch.manual_seed(seed)
    config = transformers.SiglipConfig(**config_kwargs)
    model = transformers.SiglipModel(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
        model.logit_scale.fill_(np.log(10.0) + 0.1)
        model.logit_bias.fill_(-9.5)
    return model


def inputs(image_size: int, context_length: int, vocab: int):
    """Random uint8 images [2, S, S, 3] and padded token ids [3, L]."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (2, image_size, image_size, 3), np.uint8)
    tokens = rng.integers(2, vocab, (3, context_length)).astype(np.int32)
    for row, pad in enumerate((1, context_length // 3, context_length // 2)):
        tokens[row, context_length - pad :] = 1  # SigLIP's pad (and EOS) id
    return images, tokens


def hf_outputs(model, images, tokens) -> dict[str, np.ndarray]:
    """HF's unit-norm embeddings and image->text logits (scale and bias applied)."""
    pixels = (images.astype(np.float32) / np.float32(255) - np.float32(0.5)) / (
        np.float32(0.5)
    )
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(tokens.astype(np.int64)),
            pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2),
        )
    return {
        "image": out.image_embeds.numpy(),
        "text": out.text_embeds.numpy(),
        "logits": out.logits_per_image.numpy(),
    }


def jaxclip_outputs(model, variables, images, tokens) -> dict[str, np.ndarray]:
    image = model.encode_image(variables, images)
    text = model.encode_text(variables, tokens)
    params = variables["params"]
    scale = np.exp(np.float64(params["logit_scale"]))
    return {
        "image": image,
        "text": text,
        "logits": scale * image @ text.T + np.float64(params["logit_bias"]),
    }


def assert_parity(expected: dict, actual: dict, label: str) -> None:
    diffs = {key: max_abs_diff(expected[key], actual[key]) for key in expected}
    print(
        f"\nSigLIP parity {label}: "
        + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())
    )
    assert diffs["image"] < EMBED_TOL and diffs["text"] < EMBED_TOL, diffs
    assert diffs["logits"] < LOGIT_TOL, diffs


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory):
    """A tiny SiglipModel saved by transformers itself."""
    model = random_hf_model(TINY_HF)
    directory = tmp_path_factory.mktemp("siglip-tiny")
    model.save_pretrained(directory)
    return model, directory


def test_hf_save_loads_in_jaxclip(tiny_hf_dir):
    hf_model, directory = tiny_hf_dir
    model, variables, _, _ = jaxclip.load(directory)
    config = model.config
    assert (config.vision.heads, config.text.heads) == (4, 3)
    assert (config.vision_act, config.text_act) == ("gelu", "gelu_tanh")
    assert config.norm_eps == 1e-6 and config.logit_bias
    images, tokens = inputs(32, 10, 300)
    assert_parity(
        hf_outputs(hf_model, images, tokens),
        jaxclip_outputs(model, variables, images, tokens),
        "tiny (HF save -> jaxclip load)",
    )


def test_export_loads_in_transformers_and_round_trips(tiny_hf_dir, tmp_path):
    _, directory = tiny_hf_dir
    weights = load_weights(directory)
    # Fresh random values, so the export is not HF's own bits written back.
    variables = random_variables(weights.config, seed=5, logit_bias=True)
    exported = Weights(weights.config, variables, None, SIGLIP_MEAN, SIGLIP_STD)
    with pytest.warns(UserWarning, match="no tokenizer files"):
        save_hf(exported, tmp_path / "hf")
    hf_model, info = transformers.SiglipModel.from_pretrained(
        tmp_path / "hf", output_loading_info=True
    )
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    hf_model.eval()
    model = jaxclip.create_model(weights.config)
    images, tokens = inputs(32, 10, 300)
    assert_parity(
        hf_outputs(hf_model, images, tokens),
        jaxclip_outputs(model, variables, images, tokens),
        "tiny (jaxclip export -> HF load)",
    )
    assert_trees_equal(variables, load_weights(tmp_path / "hf").variables)
    processor = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert processor["image_processor_type"] == "SiglipImageProcessor"


def test_siglip_base_shape_matches_transformers():
    """The real siglip-base-patch16-224 shape (HF's default SiglipConfig)."""
    hf_model = random_hf_model({})
    tensors = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    config = hf.config_from_hf(hf_model.config.to_dict())
    # OpenCLIP's ViT-B-16-SigLIP, but with HF's tanh GELU in both towers.
    registered = get_model_config("ViT-B-16-SigLIP")
    assert openclip.registered_name(config) is None
    assert openclip.shapes_only(config) == openclip.shapes_only(registered)
    variables = hf.from_hf(tensors, config, "HF siglip-base-patch16-224")
    images, tokens = inputs(224, 64, 32000)
    expected = hf_outputs(hf_model, images, tokens)
    del hf_model
    model = jaxclip.create_model(config)
    assert_parity(
        expected, jaxclip_outputs(model, variables, images, tokens), "siglip-base"
    )
    # And back: jaxclip's HF state dict is HF's, bit for bit.
    back = hf.to_hf(variables, config)
    assert sorted(back) == sorted(k for k in tensors if "position_ids" not in k)
    for key, value in back.items():
        np.testing.assert_array_equal(value, tensors[key], err_msg=key)


def test_openclip_keys_and_shapes_are_openclips():
    """ViT-B-16-SigLIP2's OpenCLIP state dict, as OpenCLIP 3.3.0 lists it."""
    listed = {}
    for line in (
        (REFERENCE / "openclip_3.3.0_ViT-B-16-SigLIP2_keys.txt")
        .read_text()
        .splitlines()
    ):
        key, shape = line.split(" ", 1)
        listed[key] = tuple(
            json.loads(shape.replace("(", "[").replace(")", "]").replace(",]", "]"))
        )
    config = get_model_config("ViT-B-16-SigLIP2")
    assert openclip.expected_shapes(config) == listed


def test_openclip_round_trip_is_bit_identical(tmp_path):
    config = get_model_config("tiny-siglip")
    variables = random_variables(config, seed=2, logit_bias=True)
    state_dict = openclip.to_openclip(variables, config)
    assert "visual.trunk.attn_pool.kv.weight" in state_dict
    assert_trees_equal(variables, openclip.from_openclip(state_dict, config, True))
    # A registered SigLIP architecture writes OpenCLIP's own config and reads back.
    name = "ViT-B-16-SigLIP2"
    registered = get_model_config(name)
    cfg = openclip.openclip_model_cfg(registered)
    assert cfg["vision_cfg"]["timm_model_name"] == "vit_base_patch16_siglip_224"
    assert openclip.config_from_openclip(cfg) == registered


def test_openclip_siglip_file_loads_with_its_name(tmp_path):
    config = get_model_config("tiny-siglip")
    variables = random_variables(config, seed=4, logit_bias=True)
    from jaxclip.convert.tensors import write_safetensors

    path = tmp_path / "open_clip_model.safetensors"
    write_safetensors(str(path), openclip.to_openclip(variables, config))
    loaded = load_weights(path, "tiny-siglip")
    assert loaded.name == "tiny-siglip" and loaded.mean == SIGLIP_MEAN
    assert loaded.resize_mode == "squash"
    assert_trees_equal(variables, loaded.variables)
    # Without a name, the shapes say which registered architecture this is.
    assert load_weights(path).name == "tiny-siglip"
    with pytest.raises(ValueError, match="only from timm"):
        save_openclip(loaded, tmp_path / "out")


def test_naflex_and_headless_checkpoints_are_refused():
    with pytest.raises(ValueError, match="NaFlex"):
        hf.config_from_hf({"model_type": "siglip2"})
    with pytest.raises(ValueError, match="vision_use_head"):
        hf.config_from_hf(
            {"model_type": "siglip", "vision_config": {"vision_use_head": False}}
        )


def test_a_siglip_model_by_name_has_no_tokenizer():
    model = jaxclip.create_model("tiny-siglip")
    assert model.preprocess.resize_mode == "squash"
    with pytest.raises(ValueError, match="no tokenizer"):
        model.tokenizer("a cat")
