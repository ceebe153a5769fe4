"""Parity with Hugging Face transformers' CLIPModel (PyTorch, CPU, float32).

The same random weights and inputs go through both frameworks: HF's files are read by
`jaxclip.load`, and jaxclip's export is read by `CLIPModel.from_pretrained`. Image and
text embeddings must agree within 1e-4 (max abs), logits within 1e-3.
"""

from __future__ import annotations

import numpy as np
import pytest
from convert_util import (
    assert_trees_equal,
    jaxclip_outputs,
    max_abs_diff,
    random_variables,
    transformers_clip,
)

import jaxclip
from jaxclip.convert import hf, load_weights, openclip, save_hf
from jaxclip.convert.files import Weights
from jaxclip.data.tokenizer import VOCAB_SIZE
from jaxclip.data.transforms import OPENAI_MEAN, OPENAI_STD
from jaxclip.models.build import abstract_variables, create_model

EMBED_TOL, LOGIT_TOL = 1e-4, 1e-3
CAPTIONS = [
    "a photo of a cat",
    "Two dogs playing in the snow!",
    "a diagram of the transformer architecture, drawn by hand",
]

# A tiny HF config whose widths all differ (a transposed or mis-split tensor cannot
# go unnoticed) and with exact GELU; the ViT-B-32 test covers QuickGELU.
TINY_HF = {
    "projection_dim": 24,
    "text_config": {
        "hidden_size": 40,
        "intermediate_size": 160,
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "max_position_embeddings": 12,
        "hidden_act": "gelu",
    },
    "vision_config": {
        "hidden_size": 48,
        "intermediate_size": 96,
        "num_attention_heads": 3,
        "num_hidden_layers": 2,
        "image_size": 32,
        "patch_size": 8,
        "hidden_act": "gelu",
    },
}


def random_hf_model(config_kwargs: dict, seed: int = 0):
    """An HF CLIPModel with random weights; biases and norms are randomised too."""
    import torch

    clip = transformers_clip()
    torch.manual_seed(seed)
    model = clip.CLIPModel(clip.CLIPConfig(**config_kwargs)).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:  # biases, LayerNorm gains, the class embedding
                param.add_(0.1 * torch.randn_like(param))
        model.logit_scale.fill_(np.log(30.0))
    return model


def inputs(
    image_size: int, context_length: int, vocab_size: int = VOCAB_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """Random uint8 images [3, S, S, 3] and tokenised captions [3, L] (the CLIP BPE
    with `vocab_size` ids)."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (len(CAPTIONS), image_size, image_size, 3), np.uint8)
    return images, jaxclip.tokenize(CAPTIONS, context_length, vocab_size)


def hf_outputs(model, images: np.ndarray, tokens: np.ndarray) -> dict[str, np.ndarray]:
    """HF's unit-norm embeddings and image->text logits, from the same uint8 images."""
    import torch

    pixels = (images.astype(np.float32) / np.float32(255) - np.float32(OPENAI_MEAN)) / (
        np.float32(OPENAI_STD)
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


def assert_parity(expected: dict, actual: dict, label: str) -> dict[str, float]:
    diffs = {key: max_abs_diff(expected[key], actual[key]) for key in expected}
    print(
        f"\nHF parity {label}: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())
    )
    assert diffs["image"] < EMBED_TOL and diffs["text"] < EMBED_TOL, diffs
    assert diffs["logits"] < LOGIT_TOL, diffs
    return diffs


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory):
    """A tiny HF CLIPModel saved by transformers itself (config.json + safetensors)."""
    model = random_hf_model(TINY_HF)
    directory = tmp_path_factory.mktemp("hf-tiny")
    model.save_pretrained(directory)
    return model, directory


def test_tiny_hf_checkpoint_matches_transformers(tiny_hf_dir):
    hf_model, directory = tiny_hf_dir
    assert (directory / "model.safetensors").is_file()
    model, variables, _, tokenizer = jaxclip.load(directory)
    assert model.config.vision.heads == 3 and model.config.text.heads == 2
    assert not model.config.quick_gelu
    images, tokens = inputs(32, 12)
    np.testing.assert_array_equal(tokenizer(CAPTIONS), tokens)
    assert_parity(
        hf_outputs(hf_model, images, tokens),
        jaxclip_outputs(model, variables, images, tokens),
        "tiny",
    )


def test_vit_b32_shape_matches_transformers():
    """The real ViT-B/32 shape (HF's default CLIPConfig) with random weights."""
    hf_model = random_hf_model({})
    tensors = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    config = hf.config_from_hf(hf_model.config.to_dict())
    assert openclip.registered_name(config) == "ViT-B-32-quickgelu"
    variables = hf.from_hf(tensors, config, "HF ViT-B/32")
    model = jaxclip.create_model("ViT-B-32-quickgelu")
    images, tokens = inputs(224, 77)
    expected = hf_outputs(hf_model, images, tokens)
    del hf_model, tensors
    assert_parity(
        expected, jaxclip_outputs(model, variables, images, tokens), "ViT-B-32"
    )


def test_export_loads_in_transformers_and_round_trips(tmp_path):
    clip = transformers_clip()
    model = jaxclip.create_model("tiny-vit")
    jaxclip_variables = random_variables(model.config, seed=3)
    weights = Weights(model.config, jaxclip_variables, "tiny-vit")
    save_hf(weights, tmp_path)

    # transformers reads the directory as is, and computes the same outputs.
    hf_model, info = clip.CLIPModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    hf_model.eval()
    # tiny-vit's 4,096-id BPE: HF pools at its end token, 4095 in config.json.
    images, tokens = inputs(32, 16, model.config.text.vocab_size)
    assert_parity(
        hf_outputs(hf_model, images, tokens),
        jaxclip_outputs(model, jaxclip_variables, images, tokens),
        "tiny-vit export",
    )
    # Importing the export gives the same bits and the same architecture name.
    loaded = load_weights(tmp_path)
    assert loaded.name == "tiny-vit"
    assert_trees_equal(jaxclip_variables, loaded.variables)


@pytest.mark.parametrize("vocab_size", [VOCAB_SIZE, 4096, 600])
def test_exported_tokenizer_files_give_jaxclip_ids(tmp_path, vocab_size):
    """HF's CLIPTokenizer, reading the exported vocab.json and merges.txt, gives our
    ids: OpenAI's, and those of a smaller BPE (its first merges, the start and end
    tokens last)."""
    transformers_clip()
    from transformers import CLIPTokenizer

    hf.write_tokenizer_files(str(tmp_path), 77, vocab_size)
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path)
    assert len(tokenizer) == vocab_size
    texts = [*CAPTIONS, "Hello, World! It's 3:45pm.", "naïve café über straße"]
    expected = jaxclip.tokenize(texts, vocab_size=vocab_size)
    assert expected.max() == vocab_size - 1
    for row, text in zip(expected, texts):
        ids = tokenizer(text)["input_ids"]
        np.testing.assert_array_equal(ids, row[: len(ids)])
        assert ids[0] == vocab_size - 2 and ids[-1] == vocab_size - 1
        assert not row[len(ids) :].any()


def test_hf_export_refuses_resnets_and_siglip(tmp_path):
    # Shapes suffice: the export refuses before it reads any array.
    rn = jaxclip.get_model_config("tiny-rn")
    with pytest.raises(ValueError, match="no ResNet image tower"):
        save_hf(Weights(rn, abstract_variables(create_model(rn)), "tiny-rn"), tmp_path)
    vit = jaxclip.get_model_config("tiny-vit")
    siglip = abstract_variables(create_model(vit, use_logit_bias=True))
    with pytest.raises(ValueError, match="SigLIP logit bias"):
        save_hf(Weights(vit, siglip, "tiny-vit"), tmp_path)
    assert not list(tmp_path.iterdir())  # nothing half-written
