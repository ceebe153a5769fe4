"""HFTokenizer against transformers' AutoTokenizer on SigLIP- and SigLIP 2-style model
directories written here (a SentencePiece unigram model like SigLIP's spiece.model; a
Gemma-style byte-fallback BPE tokenizer.json), and data.tokenizer naming such a
directory."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from jaxclip.config import ConfigError, base_config, validate_config
from jaxclip.data.hf_tokenizer import HFTokenizer, has_tokenizer_files
from jaxclip.data.tokenizer import TokenizerSpec

WORDS = [
    *("a", "photo", "of", "the", "cat", "dog", "on", "mat", "red", "blue", "big"),
    *("small", "car", "tree", "house", "running", "under", "near", "café", "naïve"),
    *("Über", "straße", "東京", "日本", "Москва"),
]
SYLLABLES = ["ka", "to", "ri", "me", "su", "na", "lo", "pe", "vi", "do", "gra", "shu"]

TEXTS = [
    "A photo of THE cat.",
    "Hello, World! snake_case_name 1234",
    "café naïve Über 東京 ☃ 🐱 ΟΔΟΣ İstanbul",  # unknown characters, final sigma
    "",
    "  spaces\t and\nlines  ",
    'Tom &amp; Jerry\'s (1940) — "quoted" x+y=z',
    "\u00a0no-break\u2028separator ▁lead ▁▁x",
    "</s> inside </s>",  # SigLIP's special tokens in the text
    "x<eos>y <bos> <mask> <pad> <unk>",  # Gemma's
    "<EOS> <Bos>",
    " ".join(["tograshu"] * 80),  # truncated at 64
]


def corpus(count: int, seed: int = 0) -> list[str]:
    """Captions from a small vocabulary of words and made-up ones."""
    rng = random.Random(seed)
    made_up = [
        "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3)))
        for _ in range(150)
    ]
    sentences = []
    for _ in range(count):
        words = [rng.choice(WORDS + made_up) for _ in range(rng.randint(3, 12))]
        if rng.random() < 0.5:
            words[0] = words[0].capitalize()
        sentences.append(" ".join(words) + rng.choice(["", "", ".", "!", ","]))
    return sentences


def write_json(path, value) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False), encoding="utf-8")


def edit_json(path, **changes) -> None:
    value = json.loads(path.read_text(encoding="utf-8"))
    for key, new in changes.items():
        if new is None:
            value.pop(key, None)
        else:
            value[key] = new
    write_json(path, value)


def assert_matches_transformers(directory, texts=None, lengths=(64, 8)) -> HFTokenizer:
    """HFTokenizer's rows equal AutoTokenizer's with max_length padding."""
    transformers = pytest.importorskip("transformers")
    texts = [*TEXTS, *corpus(40, seed=7)] if texts is None else texts
    reference = transformers.AutoTokenizer.from_pretrained(str(directory))
    ours = HFTokenizer(directory)
    for length in lengths:
        want = reference(
            texts, padding="max_length", max_length=length, truncation=True
        )
        got = ours(texts, length)
        assert got.dtype == np.int32 and got.shape == (len(texts), length)
        np.testing.assert_array_equal(got, np.array(want["input_ids"]))
    assert ours.tokenizer_class == type(reference).__name__
    assert (ours.pad_id, ours.eos_id) == (
        reference.pad_token_id,
        reference.eos_token_id,
    )
    assert ours.vocab_size == len(reference)
    return ours


# --- SigLIP: spiece.model, SiglipTokenizer.

# How SigLIP's tokenizer_config.json writes its special tokens.
SIGLIP_SPECIAL = dict(
    lstrip=True, normalized=False, rstrip=True, single_word=False, special=True
)


@pytest.fixture(scope="module")
def siglip_models(tmp_path_factory) -> dict[str, bytes]:
    """Unigram models with SigLIP's special ids: <pad> 0, </s> 1, <unk> 2, no BOS.
    'spaces_kept' keeps the whitespace that SiglipTokenizer's prefix '▁' stands for,
    which the 'default' one (like SigLIP's) removes."""
    return {
        "default": train_siglip_model(tmp_path_factory, True),
        "spaces_kept": train_siglip_model(tmp_path_factory, False),
    }


def train_siglip_model(tmp_path_factory, remove_extra_whitespaces: bool) -> bytes:
    sentencepiece = pytest.importorskip("sentencepiece")
    prefix = tmp_path_factory.mktemp("siglip_spm") / "spiece"
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus(400)),
        model_prefix=str(prefix),
        vocab_size=250,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        remove_extra_whitespaces=remove_extra_whitespaces,
        character_coverage=1.0,
        minloglevel=2,
    )
    return prefix.with_suffix(".model").read_bytes()


@pytest.fixture
def siglip_dir(siglip_models, tmp_path):
    """A directory like google/siglip-base-patch16-224's tokenizer files."""
    (tmp_path / "spiece.model").write_bytes(siglip_models["default"])
    special = {"content": "</s>", **SIGLIP_SPECIAL}
    unk = {"content": "<unk>", **SIGLIP_SPECIAL}
    write_json(
        tmp_path / "tokenizer_config.json",
        {
            "added_tokens_decoder": {"1": special, "2": unk},
            "additional_special_tokens": [],
            "clean_up_tokenization_spaces": True,
            "do_lower_case": True,
            "eos_token": "</s>",
            "model_input_names": ["input_ids"],
            "model_max_length": 64,
            "pad_token": "</s>",
            "processor_class": "SiglipProcessor",
            "sp_model_kwargs": {},
            "tokenizer_class": "SiglipTokenizer",
            "unk_token": "<unk>",
        },
    )
    write_json(
        tmp_path / "special_tokens_map.json",
        {"eos_token": special, "pad_token": special, "unk_token": unk},
    )
    return tmp_path


@pytest.mark.parametrize(
    "model, changes",
    [
        ("default", {}),
        ("default", {"do_lower_case": False}),
        ("default", {"padding_side": "left", "truncation_side": "left"}),
        ("default", {"added_tokens_decoder": None}),  # special_tokens_map.json instead
        ("spaces_kept", {}),
    ],
    ids=["siglip", "cased", "left", "special_tokens_map", "spaces_kept"],
)
@pytest.mark.filterwarnings("ignore:This sequence already has </s>")  # transformers'
def test_siglip_matches_transformers(siglip_dir, siglip_models, model, changes):
    (siglip_dir / "spiece.model").write_bytes(siglip_models[model])
    edit_json(siglip_dir / "tokenizer_config.json", **changes)
    assert has_tokenizer_files(siglip_dir)
    tokenizer = assert_matches_transformers(siglip_dir, lengths=(64, 8, 1))
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id) == (1, 1, None)


def test_siglip_rows_end_in_eos_and_pad_with_it(siglip_dir):
    """Without transformers: '</s>' (1) ends each row, also a cut one, and pads it."""
    tokenizer = HFTokenizer(siglip_dir)
    rows = tokenizer(["a photo of a cat", "", " ".join(["tograshu"] * 80)], 16)
    ids = tokenizer.encode_batch(["a photo of a cat"])[0]
    np.testing.assert_array_equal(rows[0, : len(ids) + 1], [*ids, 1])
    assert (rows[0, len(ids) :] == 1).all()
    assert (rows[1] == 1).all()  # the empty text: EOS, then padding
    assert rows[2, -1] == 1 and (rows[2, :-1] != 1).all()
    assert tokenizer("a photo", 8).shape == (1, 8)  # a single string is one row


# --- SigLIP 2: tokenizer.json (Gemma's pipeline), GemmaTokenizer / Siglip2Tokenizer.

GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]


@pytest.fixture(scope="module")
def gemma_json():
    """tokenizer.json text of a byte-fallback BPE built like Gemma's: specials 0-4,
    the 256 byte tokens, then merges learned here; spaces normalized to '▁'."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    trainer = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    trainer.normalizer = normalizers.Replace(" ", "▁")
    trainer.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer.train_from_iterator(
        corpus(400),
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=GEMMA_SPECIALS, show_progress=False
        ),
    )
    learned = json.loads(trainer.to_str())["model"]
    pieces = sorted(learned["vocab"], key=learned["vocab"].get)
    bytes_ = [f"<0x{byte:02X}>" for byte in range(256)]
    vocab = GEMMA_SPECIALS + bytes_ + [p for p in pieces if p not in GEMMA_SPECIALS]
    merges = [tuple(merge) for merge in learned["merges"]]
    gemma = tokenizers.Tokenizer(
        models.BPE(
            vocab={piece: index for index, piece in enumerate(vocab)},
            merges=merges,
            unk_token="<unk>",
            byte_fallback=True,
            fuse_unk=True,
        )
    )
    gemma.normalizer = normalizers.Replace(" ", "▁")
    gemma.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    gemma.add_special_tokens(
        [tokenizers.AddedToken(token, normalized=False) for token in GEMMA_SPECIALS]
    )
    return gemma.to_str()


def gemma_dir(path, gemma_json, add_bos=False, add_eos=True, **changes):
    """A directory like google/siglip2-base-patch16-224's tokenizer files: its
    tokenizer.json's post-processor agrees with add_bos_token / add_eos_token, as
    transformers 4's save_pretrained wrote it."""
    from tokenizers import Tokenizer, processors

    tokenizer = Tokenizer.from_str(gemma_json)
    template = ["<bos>"] * add_bos + ["$A"] + ["<eos>"] * add_eos
    tokenizer.post_processor = processors.TemplateProcessing(
        single=" ".join(template), special_tokens=[("<bos>", 2), ("<eos>", 1)]
    )
    path.mkdir(exist_ok=True)
    tokenizer.save(str(path / "tokenizer.json"))
    config = {
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "bos_token": "<bos>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "<eos>",
        "mask_token": "<mask>",
        "model_input_names": ["input_ids"],
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<pad>",
        "padding_side": "right",
        "processor_class": "Siglip2Processor",
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "GemmaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    write_json(path / "tokenizer_config.json", config)
    edit_json(path / "tokenizer_config.json", **changes)
    return path


@pytest.mark.parametrize(
    "add_bos, add_eos, changes",
    [
        (False, True, {}),  # SigLIP 2's
        (True, False, {}),  # Gemma's own
        (True, True, {"padding_side": None, "truncation_side": "left"}),
    ],
    ids=["siglip2", "gemma", "left"],
)
def test_gemma_matches_transformers(tmp_path, gemma_json, add_bos, add_eos, changes):
    directory = gemma_dir(tmp_path, gemma_json, add_bos, add_eos, **changes)
    tokenizer = assert_matches_transformers(directory, lengths=(64, 8, 2))
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id) == (0, 1, 2)


def test_siglip2_model_type_lower_cases(tmp_path, gemma_json):
    """config.json's model_type 'siglip2' makes transformers 5 pick Siglip2Tokenizer,
    which lower-cases the text."""
    directory = gemma_dir(tmp_path, gemma_json)
    write_json(directory / "config.json", {"model_type": "siglip2"})
    tokenizer = assert_matches_transformers(directory)
    assert tokenizer.tokenizer_class == "Siglip2Tokenizer"
    np.testing.assert_array_equal(tokenizer("A Cat", 8), tokenizer("a cat", 8))


def test_gemma_sentencepiece_only_matches_transformers(tmp_path):
    """A Gemma directory with only tokenizer.model: a byte-fallback BPE that keeps
    spaces as they are, read through sentencepiece."""
    sentencepiece = pytest.importorskip("sentencepiece")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus(400)),
        model_prefix=str(tmp_path / "tokenizer"),
        vocab_size=400,
        model_type="bpe",
        **{
            f"{name}_id": index
            for index, name in enumerate(["pad", "eos", "bos", "unk"])
        },
        **{f"{name}_piece": f"<{name}>" for name in ["pad", "eos", "bos", "unk"]},
        user_defined_symbols=["<mask>"],
        byte_fallback=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        character_coverage=1.0,
        minloglevel=2,
    )
    (tmp_path / "tokenizer.vocab").unlink()
    config = {"add_bos_token": True, "add_eos_token": True, "padding_side": "right"}
    write_json(
        tmp_path / "tokenizer_config.json",
        {**config, "tokenizer_class": "GemmaTokenizer"},
    )
    assert_matches_transformers(tmp_path, lengths=(64, 8))


# --- Directories and settings that are refused, with the file and setting named.


def test_directory_without_tokenizer_files_is_refused(tmp_path):
    assert not has_tokenizer_files(tmp_path)
    assert not has_tokenizer_files(tmp_path / "missing")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="tokenizer.json, spiece.model"):
        HFTokenizer(tmp_path)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"tokenizer_class": "BertTokenizer"}, "tokenizer_class='BertTokenizer'"),
        ({"tokenizer_class": None}, "names no tokenizer_class"),
        ({"split_special_tokens": True}, "split_special_tokens=True"),
        ({"padding_side": "middle"}, "padding_side='middle'"),
        ({"sp_model_kwargs": {"enable_sampling": True}}, "sp_model_kwargs="),
        # tokenizer.json's post-processor appends <eos>: transformers 4 and 5 differ.
        ({"add_eos_token": False}, "add_bos_token, add_eos_token"),
    ],
)
def test_unsupported_settings_are_refused(tmp_path, gemma_json, changes, message):
    directory = gemma_dir(tmp_path, gemma_json)
    edit_json(directory / "tokenizer_config.json", **changes)
    with pytest.raises(ValueError, match=message) as error:
        HFTokenizer(directory)
    assert "tokenizer_config.json" in str(error.value)


def test_context_shorter_than_the_special_tokens_is_refused(tmp_path, gemma_json):
    tokenizer = HFTokenizer(gemma_dir(tmp_path, gemma_json, add_bos=True))
    with pytest.raises(ValueError, match="context_length must be at least 2"):
        tokenizer("a cat", 1)


# --- data.tokenizer naming a directory.


def data_config(tokenizer: str):
    config = base_config()
    config.model.name = "tiny-vit"
    config.data.tokenizer = tokenizer
    return config


def test_config_names_a_directory(tmp_path, gemma_json):
    directory = str(gemma_dir(tmp_path, gemma_json))
    validate_config(data_config(directory))
    spec = TokenizerSpec(directory)
    assert isinstance(spec.build(), HFTokenizer)
    np.testing.assert_array_equal(
        spec(TEXTS, 64), HFTokenizer(directory)(TEXTS, context_length=64)
    )


def test_config_refuses_a_bad_directory(tmp_path, gemma_json):
    with pytest.raises(ConfigError, match=r"data.tokenizer=.*tokenizer files"):
        validate_config(data_config(str(tmp_path)))
    with pytest.raises(ValueError, match="tokenizer files"):
        TokenizerSpec(str(tmp_path)).build()
    directory = gemma_dir(tmp_path / "model", gemma_json, add_bos_token=True)
    with pytest.raises(ConfigError, match=r"data.tokenizer=.*add_bos_token"):
        validate_config(data_config(str(directory)))
