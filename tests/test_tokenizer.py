"""Tests for the reference CLIP tokenizer against ids from OpenAI's original."""

import numpy as np
import pytest

from jaxclip.data import tokenizer
from jaxclip.data.tokenizer import EOT_TOKEN, PAD_TOKEN, SOT_TOKEN

# Ids produced by openai/CLIP's simple_tokenizer.py, not by this module. open_clip
# 3.3.0 agrees on all but the last: it renamed the special tokens to
# "<end_of_text>", so it spells "<|endoftext|>" out as ordinary text.
KNOWN_IDS = {
    "a photo of a cat": [320, 1125, 539, 320, 2368],
    "a diagram": [320, 22697],
    "a dog": [320, 1929],
    "Hello, World!": [3306, 267, 1002, 256],
    "It's 2024": [585, 568, 273, 271, 273, 275],
    "café 🐱": [15304, 22979],
    "antidisestablishmentarianism": [3120, 4262, 7726, 12658, 1585, 44351],
    "<|endoftext|>": [EOT_TOKEN],
}


@pytest.fixture(scope="module")
def simple_tokenizer() -> tokenizer.SimpleTokenizer:
    """The packaged tokenizer, shared by the tests of this module."""
    return tokenizer.default_tokenizer()


@pytest.mark.parametrize(("text", "ids"), KNOWN_IDS.items())
def test_encode_known_ids(simple_tokenizer, text, ids):
    assert simple_tokenizer.encode(text) == ids


def test_tokenize_known_row():
    tokens = tokenizer.tokenize("a photo of a cat")
    expected = np.zeros((1, 77), np.int32)
    expected[0, :7] = [SOT_TOKEN, 320, 1125, 539, 320, 2368, EOT_TOKEN]
    assert tokens.dtype == np.int32
    np.testing.assert_array_equal(tokens, expected)


def test_tokenize_batch_shape_and_padding():
    tokens = tokenizer.tokenize(["a dog", "a photo of a cat", ""], context_length=10)
    assert tokens.shape == (3, 10)
    assert tokens.dtype == np.int32
    np.testing.assert_array_equal(tokens[0, :4], [SOT_TOKEN, 320, 1929, EOT_TOKEN])
    assert (tokens[0, 4:] == PAD_TOKEN).all()
    np.testing.assert_array_equal(tokens[2, :2], [SOT_TOKEN, EOT_TOKEN])
    assert (tokens[2, 2:] == PAD_TOKEN).all()


def test_empty_text():
    assert tokenizer.default_tokenizer().encode("") == []
    np.testing.assert_array_equal(
        tokenizer.tokenize("", context_length=5)[0], [SOT_TOKEN, EOT_TOKEN, 0, 0, 0]
    )


def test_truncation_forces_eot():
    # SOT, 5 ids, EOT is 7 tokens; 5 fit, so the last id is replaced by EOT.
    tokens = tokenizer.tokenize("a photo of a cat", context_length=5)
    np.testing.assert_array_equal(tokens[0], [SOT_TOKEN, 320, 1125, 539, EOT_TOKEN])
    long_text = tokenizer.tokenize("the " * 200)
    assert long_text.shape == (1, 77)
    assert long_text[0, 0] == SOT_TOKEN and long_text[0, -1] == EOT_TOKEN
    assert (long_text[0, 1:-1] == 518).all()  # 518 is "the</w>"


def test_context_length_too_short():
    with pytest.raises(ValueError, match="context_length"):
        tokenizer.tokenize("a cat", context_length=1)


@pytest.mark.parametrize(
    "messy",
    ["Tom &amp;amp; Jerry", "  TOM\t&amp;\n\n jerry  ", "tom &#38; Jerry"],
)
def test_cleaning_html_and_whitespace(simple_tokenizer, messy):
    # "tom & jerry" in CLIP's vocabulary.
    assert simple_tokenizer.encode(messy) == [2435, 261, 9164]


@pytest.mark.parametrize(
    "text",
    ["a photo of a cat", "the quick brown fox jumps over the lazy dog", "x"],
)
def test_decode_round_trip(simple_tokenizer, text):
    # Each word ends in "</w>", decoded as a space; hence the trailing space. Digits
    # and punctuation are words of their own, so they would not round-trip.
    assert simple_tokenizer.decode(simple_tokenizer.encode(text)) == text + " "


def test_wrong_hash_is_refused(monkeypatch):
    monkeypatch.setattr(tokenizer, "BPE_SHA256", "0" * 64)
    with pytest.raises(ValueError, match="0" * 64) as error:
        tokenizer.SimpleTokenizer()
    assert tokenizer.BPE_FILENAME in str(error.value)


def test_missing_file_is_refused(tmp_path):
    missing = tmp_path / "missing.txt.gz"
    with pytest.raises(FileNotFoundError, match=tokenizer.BPE_SHA256) as error:
        tokenizer.SimpleTokenizer(missing)
    assert str(missing) in str(error.value)
