"""Parity with OpenCLIP (PyTorch, CPU, float32), and the tokenizer against OpenCLIP's.

OpenCLIP is optional (its wheel pulls a large CUDA torch), so these tests skip where
`open_clip_torch` is not installed. The tokenizer test needs only OpenCLIP's
`tokenizer.py` (ftfy, regex, numpy, torch): it is loaded from the installed package's
files, or from the wheel named by $OPENCLIP_WHEEL, without importing the package.
"""

from __future__ import annotations

import importlib.util
import os
import zipfile

import numpy as np
import pytest
from convert_util import jaxclip_outputs, max_abs_diff, open_clip, random_variables

import jaxclip
from jaxclip.convert import openclip, save_openclip
from jaxclip.convert.files import Weights
from jaxclip.data.transforms import OPENAI_MEAN, OPENAI_STD

EMBED_TOL, LOGIT_TOL = 1e-4, 1e-3
CAPTIONS = ["a photo of a cat", "Two dogs playing in the snow!", "a hand-drawn diagram"]


def randomise_(model, seed: int = 0) -> None:
    """Perturb biases, norms and BatchNorm statistics, so no block is the identity
    (OpenCLIP zero-initialises the last BN of every bottleneck)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.running_mean.normal_(0.0, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
        model.logit_scale.fill_(np.log(30.0))


def openclip_outputs(model, images: np.ndarray, tokens: np.ndarray) -> dict:
    """OpenCLIP's unit-norm embeddings and logits for uint8 images and token ids."""
    import torch

    pixels = (images.astype(np.float32) / np.float32(255) - np.float32(OPENAI_MEAN)) / (
        np.float32(OPENAI_STD)
    )
    with torch.no_grad():
        image_emb = model.encode_image(
            torch.from_numpy(pixels).permute(0, 3, 1, 2), True
        )
        text_emb = model.encode_text(torch.from_numpy(tokens.astype(np.int64)), True)
        logits = model.logit_scale.exp() * image_emb @ text_emb.T
    return {
        "image": image_emb.numpy(),
        "text": text_emb.numpy(),
        "logits": logits.numpy(),
    }


def inputs(config) -> tuple[np.ndarray, np.ndarray]:
    size = config.vision.image_size
    images = np.random.default_rng(1).integers(0, 256, (2, size, size, 3), np.uint8)
    text = config.text
    return images, jaxclip.tokenize(CAPTIONS[:2], text.context_length, text.vocab_size)


def check_parity(name: str, seed: int = 0) -> dict[str, float]:
    """Random OpenCLIP `name` -> its state dict -> jaxclip; returns the max differences."""
    import torch

    package = open_clip()
    torch.manual_seed(seed)  # OpenCLIP's init draws from torch's global generator
    reference = package.create_model(name).eval()
    randomise_(reference, seed)
    tensors = {k: v.numpy() for k, v in reference.state_dict().items()}
    model = jaxclip.create_model(name)
    variables = openclip.from_openclip(tensors, model.config, what=name)
    images, tokens = inputs(model.config)
    expected = openclip_outputs(reference, images, tokens)
    del reference, tensors
    actual = jaxclip_outputs(model, variables, images, tokens)
    return {key: max_abs_diff(expected[key], actual[key]) for key in expected}


@pytest.mark.parametrize("name", ["RN50", "ViT-B-32"])
def test_parity_with_openclip(name):
    diffs = check_parity(name)
    print(
        f"\nOpenCLIP parity {name}: "
        + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())
    )
    assert diffs["image"] < EMBED_TOL and diffs["text"] < EMBED_TOL, diffs
    assert diffs["logits"] < LOGIT_TOL, diffs


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_openclip_loads_the_export(name, tmp_path):
    """jaxclip's OpenCLIP-format export -> `create_model('local-dir:...')` -> same outputs."""
    package = open_clip()
    model = jaxclip.create_model(name)
    variables = random_variables(model.config, seed=5)
    save_openclip(Weights(model.config, variables, name), tmp_path)
    reference = package.create_model(f"local-dir:{tmp_path}").eval()
    images, tokens = inputs(model.config)
    expected = openclip_outputs(reference, images, tokens)
    actual = jaxclip_outputs(model, variables, images, tokens)
    diffs = {key: max_abs_diff(expected[key], actual[key]) for key in expected}
    assert diffs["image"] < EMBED_TOL and diffs["text"] < EMBED_TOL, diffs
    assert diffs["logits"] < LOGIT_TOL, diffs


# ---------------------------------------------------------------------------
# Tokenizer ids against OpenCLIP's tokenizer.py.
# ---------------------------------------------------------------------------


def openclip_tokenizer_module(tmp_path_factory):
    """OpenCLIP's tokenizer.py as a standalone module (no open_clip/__init__ import)."""
    pytest.importorskip("torch")
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(spec.submodule_search_locations[0], "tokenizer.py")
    elif os.environ.get("OPENCLIP_WHEEL"):
        directory = tmp_path_factory.mktemp("open_clip_wheel")
        with zipfile.ZipFile(os.environ["OPENCLIP_WHEEL"]) as wheel:
            for member in (
                "open_clip/tokenizer.py",
                "open_clip/bpe_simple_vocab_16e6.txt.gz",
            ):
                wheel.extract(member, directory)
        path = str(directory / "open_clip" / "tokenizer.py")
    else:
        pytest.skip("neither open_clip_torch nor $OPENCLIP_WHEEL is available")
    module_spec = importlib.util.spec_from_file_location("openclip_tokenizer_ref", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def varied_corpus() -> list[str]:
    """Captions, casing, contractions, numbers, HTML, mojibake, scripts, emoji, odd
    whitespace, special tokens, over-long text, and seeded random unicode strings."""
    corpus = [
        "",
        "a photo of a cat",
        "A PHOTO OF A DOG, Sitting On The Grass!!!",
        "I'll say it's what we've done, don't you think? They'd've",
        "3.14159 is pi; 1,000,000 dollars; 2024-06-01; 12:30pm; #hashtag @user",
        "Tom &amp; Jerry &lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot; &amp;amp; twice",
        "cafÃ© mojibake: Ã©tÃ© and naïve façade über straße",
        "猫がソファの上で寝ている 一只猫 고양이 사진",
        "Ελληνικά κείμενα και русский текст и العربية",
        "emoji 🐶🐱🚀👩‍👩‍👧 ✨ and symbols ©®™ ½ → ∞",
        "   leading\tand\ntrailing   whitespace \r\n\x0c ",
        # Not here: the literal text "<|startoftext|>" / "<|endoftext|>". OpenAI's
        # tokenizer (and HF's, and jaxclip's) maps it to the special ids; OpenCLIP
        # renamed its special tokens to "<start_of_text>" / "<end_of_text>" and splits
        # the OpenAI spelling into ordinary tokens.
        "hyphen-ated words, under_scores, CamelCaseWords, and URLs https://x.org/a?b=c",
        " ".join(f"word{i}" for i in range(120)),  # longer than the context: truncated
    ]
    rng = np.random.default_rng(0)
    alphabet = list(
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?'\"-()&<>"
        "\t\n éàüßçñøåœ—–…€£¥ωπλΣяжщ中文字日本語한국🙂🎉🐍"
    )
    for _ in range(200):
        length = int(rng.integers(1, 60))
        corpus.append("".join(rng.choice(alphabet, length)))
    return corpus


def test_token_ids_equal_openclip(tmp_path_factory):
    reference = openclip_tokenizer_module(tmp_path_factory)
    corpus = varied_corpus()
    expected = reference.SimpleTokenizer()(corpus, context_length=77).numpy()
    np.testing.assert_array_equal(jaxclip.tokenize(corpus, 77), expected)
    short = reference.SimpleTokenizer()(corpus, context_length=16).numpy()
    np.testing.assert_array_equal(jaxclip.tokenize(corpus, 16), short)
