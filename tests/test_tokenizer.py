"""Tests for the reference CLIP tokenizer against ids from OpenAI's original."""

import numpy as np
import pytest
from data_util import train_sentencepiece

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


# --- The fast path (FastTokenizer, behind `tokenize`) against the reference.

# More ids from outside this package: open_clip 3.3.0's SimpleTokenizer.encode (the
# same algorithm and merges as OpenAI's; none of these strings holds special tokens).
OPEN_CLIP_IDS = {
    "Tom &amp;amp; Jerry's 3 cats!": [2435, 261, 9164, 568, 274, 3989, 256],
    "naïve café — 東京 🐱🐶": [
        1097,
        35689,
        563,
        15304,
        2005,
        48338,
        21078,
        361,
        35710,
        10631,
    ],
    "HELLO\tworld\n\nagain": [3306, 1002, 1495],
    "ﬁne ligature": [3797, 19915, 4490],  # ftfy undoes the ligature
    "cafÃ©": [15304],  # ftfy repairs the mojibake: "café"
    "A 4K photo, f/2.8 @ 50mm": [320, 275, 330, 1125, 267, 325, 270, 273, 269, 279, 287]
    + [276, 271, 2848],
    "https://example.com/x?a=1&b=2": [30901, 12441, 6228, 269, 2464, 270, 343, 286]
    + [320, 284, 272, 261, 321, 284, 273],
}

CORPUS = [
    *KNOWN_IDS,
    *OPEN_CLIP_IDS,
    "",
    " ",
    "\n\t ",
    "a photo of a CAT.",
    "Ünïcödé àccents: éèêë ñ ç ø å ß",
    "emoji 🐱🐶🎉👩‍👩‍👧 and flags 🇫🇷",
    "numbers 1234567890 3.14159 -42 1e10 ½ ² ٣",
    "html &lt;b&gt;bold&lt;/b&gt; &amp;amp; &#x27;quoted&#x27; &nbsp; &copy;",
    "&amp;amp;amp; triple escaped",
    "中文字符 日本語のテキスト 한국어 текст на русском ελληνικά עברית العربية",
    "control\x00chars\x07here\x0bvertical\x1b[31mred\x1b[0m\x7f",
    "line\r\nbreaks\rand\u2028separators\u00a0nbsp",
    "it's THEY'RE we'VE i'M you'll he'D 'S",
    "<|startoftext|>inside<|endoftext|> and !<|endoftext|>",
    "punctuation!!! ??? ... --- *** (((nested))) [x] {y}",
    "curly “quotes” and ‘apostrophes’ — dashes – …",
    "ﬁ ﬂ ligatures and ＦＵＬＬＷＩＤＴＨ text",
    "a" * 500,
    "supercalifragilisticexpialidocious " * 40,
    " ".join(f"word{n}" for n in range(300)),
]


@pytest.fixture(scope="module")
def fast_tokenizer() -> tokenizer.FastTokenizer:
    return tokenizer.default_fast_tokenizer()


@pytest.mark.parametrize(("text", "ids"), {**KNOWN_IDS, **OPEN_CLIP_IDS}.items())
def test_known_ids_both_paths(simple_tokenizer, fast_tokenizer, text, ids):
    assert fast_tokenizer.encode(text) == ids
    assert simple_tokenizer.encode(text) == ids


def test_fast_equals_reference_on_a_varied_corpus(simple_tokenizer, fast_tokenizer):
    for text in CORPUS:
        assert fast_tokenizer.encode(text) == simple_tokenizer.encode(text), repr(text)
    # Whole rows (SOT, EOT, truncation, padding) at several context lengths, batched.
    for context_length in (2, 5, 16, 77):
        expected = np.zeros((len(CORPUS), context_length), np.int32)
        for row, text in enumerate(CORPUS):
            ids = [SOT_TOKEN, *simple_tokenizer.encode(text), EOT_TOKEN][
                :context_length
            ]
            ids[-1] = EOT_TOKEN
            expected[row, : len(ids)] = ids
        got = tokenizer.tokenize(CORPUS, context_length)
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, expected)


def test_fast_equals_reference_on_random_strings(simple_tokenizer):
    # A fresh FastTokenizer: nothing remembered from other tests.
    fast = tokenizer.FastTokenizer()
    pieces = [
        *"abcXYZ019 .,!?-_'&;#<>|\t\n\r\x0b\x0c\x1f\x00",
        *["&amp;", "&lt;", "&#39;", "é", "ü", "ß", "İ", "🐱", "東", "\u00a0", "\u2028"],
        *["\x1b[1m", "ﬁ", "’", "Ã©", "<|endoftext|>", "'s", "'LL", "\x85", "\ufeff"],
    ]
    rng = np.random.default_rng(0)
    texts = [
        "".join(rng.choice(pieces, size=rng.integers(0, 25)).tolist())
        for _ in range(1500)
    ]
    got = fast.encode_batch(texts)
    for text, ids in zip(texts, got):
        assert ids == simple_tokenizer.encode(text), repr(text)


def test_ascii_shortcut_cleans_like_ftfy_and_html():
    rng = np.random.default_rng(1)
    alphabet = [chr(c) for c in range(0x20, 0x7F)] + ["\t", "\n", "\r", "\x0c"]
    for _ in range(1000):
        text = "".join(rng.choice(alphabet, size=rng.integers(0, 40)).tolist())
        assert tokenizer.fast_clean_text(text) == tokenizer.clean_text(text), repr(text)


def test_public_tokenize_like_open_clip():
    import jaxclip

    tokens = jaxclip.tokenize(["a diagram", "a dog", "a cat"])
    assert tokens.shape == (3, 77) and tokens.dtype == np.int32
    np.testing.assert_array_equal(tokens[1, :4], [SOT_TOKEN, 320, 1929, EOT_TOKEN])
    assert jaxclip.tokenize("a dog").shape == (1, 77)
    assert jaxclip.tokenize([], context_length=8).shape == (0, 8)


# --- Smaller vocabularies (a tiny model's text table): the BPE's first merges only.


def test_no_merges_leaves_the_byte_symbols():
    """514 ids: the byte symbols (the last of each word with the end-of-word mark)
    and the start and end tokens, in the byte table's order."""
    bpe = tokenizer.SimpleTokenizer(vocab_size=tokenizer.MIN_VOCAB_SIZE)
    order = list(tokenizer.bytes_to_unicode())  # byte values in vocabulary order
    expected = []
    for word in ("a", "café", "!"):
        data = word.encode("utf-8")
        expected += [order.index(byte) for byte in data[:-1]]
        expected.append(256 + order.index(data[-1]))
    assert bpe.encode("A café!") == expected
    assert (bpe.sot_id, bpe.eot_id) == (512, 513)


@pytest.mark.parametrize("vocab_size", [514, 1000, 4096])
def test_smaller_vocabulary_is_the_bpe_with_fewer_merges(simple_tokenizer, vocab_size):
    """Both paths agree; every id is below the start token; and a text whose full
    encoding needs none of the dropped merges keeps its ids (BPE applies merges in
    rank order, so its tokens' ranks bound every merge it used)."""
    small = tokenizer.SimpleTokenizer(vocab_size=vocab_size)
    fast = tokenizer.FastTokenizer(vocab_size=vocab_size)
    sot, eot = tokenizer.special_tokens(vocab_size)
    assert (small.sot_id, small.eot_id) == (fast.sot_id, fast.eot_id) == (sot, eot)
    kept = 0
    for text in CORPUS:
        ids = small.encode(text)
        assert fast.encode(text) == ids, repr(text)
        if "<|" not in text:
            assert all(0 <= i < sot for i in ids), repr(text)
        full = simple_tokenizer.encode(text)
        if all(i < sot for i in full):
            assert ids == full, repr(text)
            kept += 1
    assert kept >= 3  # the empty texts, and short words at 1000 and 4096 ids
    rows = tokenizer.tokenize(["a dog", "<|endoftext|>"], 8, vocab_size)
    np.testing.assert_array_equal(rows[0, : len(small.encode("a dog")) + 2],
                                  [sot, *small.encode("a dog"), eot])  # fmt: skip
    np.testing.assert_array_equal(rows[1, :3], [sot, eot, eot])


@pytest.mark.parametrize("vocab_size", [513, 49409])
def test_vocabulary_size_out_of_range_is_refused(vocab_size):
    with pytest.raises(ValueError, match=r"514 to 49,408 ids.*got"):
        tokenizer.SimpleTokenizer(vocab_size=vocab_size)


def test_spec_sizes_the_clip_bpe_to_the_text_table(tmp_path):
    spec = tokenizer.TokenizerSpec().for_vocabulary(4096)
    assert spec.vocab_size == 4096 and spec.build().vocab_size == 4096
    assert spec(["a dog"], 6).max() == 4095
    # A larger table keeps all of OpenAI's ids; another kind is the model's own.
    assert tokenizer.TokenizerSpec().for_vocabulary(250_000).vocab_size == 49408
    other = tokenizer.TokenizerSpec("sentencepiece", str(tmp_path / "m.model"))
    assert other.for_vocabulary(1000) == other


# --- SentencePiece (SigLIP-style text towers), with a model trained here.


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory) -> str:
    sentences = [
        f"a {size} {colour} {shape} on a {place}"
        for size in ("small", "big", "tiny")
        for colour in ("red", "green", "blue", "yellow")
        for shape in ("cat", "dog", "house", "car")
        for place in ("table", "street", "beach")
    ]
    prefix = str(tmp_path_factory.mktemp("sp") / "tiny")
    return train_sentencepiece(sentences, prefix, vocab_size=30)


def test_sentencepiece_rows(sentencepiece_model):
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=sentencepiece_model)
    sp = tokenizer.SentencePieceTokenizer(sentencepiece_model)
    assert (sp.eos_id, sp.pad_id, sp.vocab_size) == (2, 0, 30)
    texts = ["A Red_Cat, on the TABLE!", "", "a big blue house " * 10]
    rows = sp(texts, context_length=40)
    assert rows.shape == (3, 40) and rows.dtype == np.int32
    # OpenCLIP's SigLIP cleaning: '_' -> space, punctuation gone, lower case.
    ids = processor.encode("a red cat on the table")
    assert len(ids) < 39
    np.testing.assert_array_equal(rows[0, : len(ids) + 1], [*ids, 2])
    assert (rows[0, len(ids) + 1 :] == 0).all()
    np.testing.assert_array_equal(rows[1], [2] + [0] * 39)  # empty: just EOS
    long_ids = processor.encode(tokenizer.canonicalize_text(texts[2]))
    assert len(long_ids) > 40
    np.testing.assert_array_equal(rows[2], [*long_ids[:39], 2])  # EOS kept last


def test_sentencepiece_missing_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        tokenizer.SentencePieceTokenizer(tmp_path / "nope.model")
