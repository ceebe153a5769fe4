"""Tokenizers read from a Hugging Face model directory (SigLIP, SigLIP 2).

`HFTokenizer(directory)(texts, L)` gives the ids of
`transformers.AutoTokenizer.from_pretrained(directory)(texts, padding="max_length",
max_length=L, truncation=True)["input_ids"]` (transformers 5), without importing
transformers. It reads the classes that SigLIP checkpoints name:

- `SiglipTokenizer` (SigLIP's 32k `spiece.model`), through sentencepiece: the text is
  lower-cased (unless `do_lower_case` is false), its punctuation removed and its
  whitespace collapsed; EOS is appended (kept on truncation); padding is `</s>`.
- `GemmaTokenizer` (SigLIP 2's 256k vocabulary), through Hugging Face `tokenizers` on
  `tokenizer.json`, or through sentencepiece on `tokenizer.model` where that is all
  there is. `Siglip2Tokenizer` is the same with the text lower-cased: transformers 5
  picks it for a directory whose `config.json` has `model_type: siglip2`, whatever
  `tokenizer_config.json` names. (Transformers 4 gives `GemmaTokenizerFast` there,
  which keeps the case; SigLIP 2 was trained on lower-cased text.)

Settings come from `tokenizer_config.json` and `special_tokens_map.json`. A setting
this module does not implement, or one that transformers 4 and 5 read differently, is
refused with a message naming the file and the setting, rather than giving other ids.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import string
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer.model")
SPIECE_UNDERLINE = "▁"  # SentencePiece's word-start mark, which stands for a space


def has_tokenizer_files(directory: Any) -> bool:
    """Whether `directory` is a directory holding tokenizer.json, spiece.model or
    tokenizer.model (what `HFTokenizer` reads, with tokenizer_config.json)."""
    if not isinstance(directory, (str, os.PathLike)) or not os.path.isdir(directory):
        return False
    return any(os.path.isfile(os.path.join(directory, n)) for n in TOKENIZER_FILES)


class HFTokenizer:
    """A SigLIP / SigLIP 2 tokenizer read from a Hugging Face model directory, called
    like `tokenize`: ids equal to transformers' AutoTokenizer padded to max_length."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = os.fspath(directory)
        settings = _read_settings(self.directory)
        self.tokenizer_class = settings.tokenizer_class  # the transformers class
        self._settings = settings
        if settings.tokenizer_class == _SIGLIP:
            self._encoder = _SentencePieceEncoder(settings, "spiece.model")
            add_bos, add_eos = False, True
        else:
            if os.path.isfile(settings.where("tokenizer.json")):
                self._encoder = _RustEncoder(settings)
            elif settings.tokenizer_class == _GEMMA:
                self._encoder = _SentencePieceEncoder(settings, "tokenizer.model")
            else:
                raise FileNotFoundError(
                    f"Siglip2Tokenizer reads {settings.where('tokenizer.json')}, missing"
                )
            add_bos, add_eos = _gemma_bos_eos(settings, self._encoder.json_data)
        self.vocab_size = self._encoder.vocab_size
        self.pad_id = self._id("pad_token")
        self.eos_id = self._id("eos_token")
        self.bos_id = self._id("bos_token")
        self._prefix = [self.bos_id] if add_bos and self.bos_id is not None else []
        self._suffix = [self.eos_id] if add_eos and self.eos_id is not None else []
        # SiglipTokenizer appends EOS only where the ids do not end in it already.
        self._suffix_once = settings.tokenizer_class == _SIGLIP

    def _id(self, name: str) -> int | None:
        """A named special token's id (None where the class has no such token)."""
        token = self._settings.tokens[name]
        if token is None:
            return None
        token_id = self._encoder.token_id(token.content)
        if token_id is None:
            raise ValueError(
                f"{self._settings.where()}: {name} {token.content!r} is not in the "
                "vocabulary"
            )
        return token_id

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's ids, without the special tokens put around them."""
        return self._encoder.encode_batch(list(texts))

    def __call__(
        self, texts: str | Sequence[str], context_length: int = 64
    ) -> np.ndarray:
        """int32 [len(texts), context_length]: ids with their special tokens, padded."""
        if isinstance(texts, str):
            texts = [texts]
        room = context_length - len(self._prefix) - len(self._suffix)
        if room < 0:
            raise ValueError(
                f"context_length must be at least {context_length - room} (the special "
                f"tokens of {self.directory}), got {context_length}"
            )
        right_cut = self._settings.truncation_side == "right"
        right_pad = self._settings.padding_side == "right"
        tokens = np.full((len(texts), context_length), self.pad_id, np.int32)
        for row, ids in enumerate(self.encode_batch(texts)):
            if len(ids) > room:
                ids = ids[:room] if right_cut else ids[len(ids) - room :]
            suffix = self._suffix
            if self._suffix_once and ids and ids[-1] == suffix[-1]:
                suffix = []
            ids = [*self._prefix, *ids, *suffix]
            if right_pad:
                tokens[row, : len(ids)] = ids
            else:
                tokens[row, context_length - len(ids) :] = ids
        return tokens


# --- Settings: tokenizer_config.json, special_tokens_map.json, config.json.

_SIGLIP, _GEMMA, _SIGLIP2 = "SiglipTokenizer", "GemmaTokenizer", "Siglip2Tokenizer"
_SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# What each class uses where tokenizer_config.json says nothing. GemmaTokenizer (and so
# Siglip2Tokenizer) pads on the left by default.
_GEMMA_DEFAULTS = {
    "bos_token": "<bos>",
    "eos_token": "<eos>",
    "unk_token": "<unk>",
    "pad_token": "<pad>",
    "mask_token": "<mask>",
    "padding_side": "left",
}
_CLASS_DEFAULTS = {
    _SIGLIP: {
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "</s>",
        "padding_side": "right",
    },
    _GEMMA: _GEMMA_DEFAULTS,
    _SIGLIP2: _GEMMA_DEFAULTS,
}


@dataclasses.dataclass(frozen=True)
class _AddedToken:
    """A token matched in the raw text before the model splits the rest."""

    content: str
    single_word: bool = False
    lstrip: bool = False  # the whitespace before it is dropped
    rstrip: bool = False  # the whitespace after it is dropped
    normalized: bool = False
    special: bool = True


@dataclasses.dataclass(frozen=True)
class _Settings:
    """What a directory's JSON files say, as transformers 5 reads them."""

    directory: str
    tokenizer_class: str  # one of _CLASS_DEFAULTS
    config: dict[str, Any]  # tokenizer_config.json
    tokens: dict[str, _AddedToken | None]  # bos_token, eos_token, ... by name
    special: tuple[_AddedToken, ...]  # the named and extra special tokens
    added: dict[int, _AddedToken]  # tokenizer_config.json's added_tokens_decoder
    padding_side: str
    truncation_side: str

    def where(self, name: str = "tokenizer_config.json") -> str:
        return os.path.join(self.directory, name)

    def matched_tokens(self) -> dict[str, _AddedToken]:
        """Every token matched in the raw text, by content; an added_tokens_decoder
        entry wins over a special token of the same content."""
        added = {token.content: token for token in self.added.values()}
        return {**{token.content: token for token in self.special}, **added}


def _read_settings(directory: str) -> _Settings:
    """Read and check the directory's tokenizer settings (not its vocabulary)."""
    if not has_tokenizer_files(directory):
        raise FileNotFoundError(
            f"{directory!r} is not a directory holding tokenizer files "
            f"({', '.join(TOKENIZER_FILES)})"
        )
    config = _read_json(directory, "tokenizer_config.json")
    tokenizer_class = _tokenizer_class(directory, config)
    defaults = _CLASS_DEFAULTS[tokenizer_class]
    where = os.path.join(directory, "tokenizer_config.json")
    added = {
        int(index): _added_token(value, f"{where}: added_tokens_decoder")
        for index, value in config.get("added_tokens_decoder", {}).items()
    }
    # Transformers reads special_tokens_map.json (over tokenizer_config.json) only
    # where tokenizer_config.json has no added_tokens_decoder.
    overrides = {} if added else _read_json(directory, "special_tokens_map.json")
    values = {**config, **overrides}
    # A special token named by a string takes its fields from added_tokens_decoder;
    # SiglipTokenizer strips the whitespace around the others.
    by_content = {token.content: token for token in added.values()}
    strip = tokenizer_class == _SIGLIP

    def token(value: Any, field: str) -> _AddedToken | None:
        if isinstance(value, str):
            value = by_content.get(value) or _AddedToken(
                value, lstrip=strip, rstrip=strip
            )
        return _added_token(value, f"{where}: {field}")

    tokens = {
        name: token(values.get(name, defaults.get(name)), name)
        for name in _SPECIAL_TOKEN_NAMES
    }
    # Other '*_token' keys are model-specific special tokens (Gemma 3's boi_token...),
    # and additional_special_tokens lists more.
    extra = [
        token(value, key)
        for key, value in values.items()
        if key.endswith("_token")
        and key not in tokens
        and isinstance(value, (str, dict))
    ]
    for key in ("additional_special_tokens", "extra_special_tokens"):
        listed = values.get(key) or []
        listed = listed.values() if isinstance(listed, dict) else listed
        extra += [token(value, key) for value in listed]
    special = [token for token in [*tokens.values(), *extra] if token is not None]
    settings = _Settings(
        directory=directory,
        tokenizer_class=tokenizer_class,
        config=config,
        tokens=tokens,
        special=tuple({token.content: token for token in special[::-1]}.values())[::-1],
        added=added,
        padding_side=config.get("padding_side", defaults["padding_side"]),
        truncation_side=config.get("truncation_side", "right"),
    )
    _check_settings(settings)
    return settings


def _tokenizer_class(directory: str, config: dict[str, Any]) -> str:
    """The class AutoTokenizer (transformers 5) picks for the directory."""
    model_type = _read_json(directory, "config.json").get("model_type")
    named = config.get("tokenizer_class")
    if model_type == "siglip2":  # it overrides the class tokenizer_config.json names
        return _SIGLIP2
    if named is None and model_type == "siglip":
        return _SIGLIP
    where = os.path.join(directory, "tokenizer_config.json")
    if named is None:
        raise ValueError(
            f"{where} names no tokenizer_class (nor does config.json have model_type "
            "'siglip' or 'siglip2'), so the tokenizer's class is unknown"
        )
    name = str(named).removesuffix("Fast")
    if name not in _CLASS_DEFAULTS:
        raise ValueError(
            f"{where}: tokenizer_class={named!r} is not supported; HFTokenizer reads "
            f"{sorted(_CLASS_DEFAULTS)}"
        )
    return name


def _check_settings(settings: _Settings) -> None:
    """Refuse the settings this module does not implement, naming them."""
    config, where = settings.config, settings.where()
    for side in ("padding_side", "truncation_side"):
        if getattr(settings, side) not in ("left", "right"):
            raise ValueError(
                f"{where}: {side}={getattr(settings, side)!r} must be 'left' or 'right'"
            )
    supported = {"split_special_tokens": False, "sp_model_kwargs": {}}
    if settings.tokenizer_class == _SIGLIP:
        supported["legacy"] = True  # else transformers edits the model's dummy prefix
    for name, value in supported.items():
        if config.get(name, value) != value:
            raise ValueError(
                f"{where}: {name}={config[name]!r} is not supported (only {value!r})"
            )
    if not isinstance(config.get("do_lower_case", True), bool):
        raise ValueError(
            f"{where}: do_lower_case={config['do_lower_case']!r} not a bool"
        )
    if settings.tokens["pad_token"] is None:
        raise ValueError(f"{where}: pad_token is null; padding needs a pad token")
    if settings.tokenizer_class == _SIGLIP and settings.tokens["eos_token"] is None:
        raise ValueError(f"{where}: eos_token is null; SiglipTokenizer appends it")


def _read_json(directory: str, name: str) -> dict[str, Any]:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def _added_token(value: Any, where: str) -> _AddedToken | None:
    """A token as the JSON files write it: a string, or an AddedToken's fields."""
    if value is None or isinstance(value, _AddedToken):
        return value
    if isinstance(value, str):
        return _AddedToken(value)
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        names = {field.name for field in dataclasses.fields(_AddedToken)}
        return _AddedToken(**{k: v for k, v in value.items() if k in names})
    raise ValueError(f"{where}: {value!r} is not a token (a string or a dict)")


def _gemma_bos_eos(
    settings: _Settings, json_data: dict[str, Any] | None
) -> tuple[bool, bool]:
    """Whether BOS goes before Gemma's text and EOS after it. Transformers 4 reads
    tokenizer_config.json's add_bos_token / add_eos_token (defaults true / false);
    transformers 5 follows tokenizer.json's post-processor where there is that file,
    and the flags (defaults false / false) where there is not. Refuse where the two
    versions would disagree."""
    config = settings.config
    if json_data is None and not {"add_bos_token", "add_eos_token"} <= config.keys():
        raise ValueError(
            f"{settings.where()} must give add_bos_token and add_eos_token: without "
            "tokenizer.json, transformers 4 and 5 default them differently"
        )
    add_bos = bool(config.get("add_bos_token", True))
    add_eos = bool(config.get("add_eos_token", False))
    if json_data is not None:
        where = settings.where("tokenizer.json")
        found = _template_tokens(json_data.get("post_processor"), where)
        bos, eos = settings.tokens["bos_token"], settings.tokens["eos_token"]
        wanted = (
            [bos.content] if add_bos and bos else [],
            [eos.content] if add_eos and eos else [],
        )
        if found != wanted:
            raise ValueError(
                f"{where}'s post_processor puts {found[0]} before and {found[1]} after "
                f"the text, but {settings.where()} asks for {wanted[0]} and "
                f"{wanted[1]} (add_bos_token, add_eos_token): transformers 5 follows "
                "tokenizer.json and transformers 4 tokenizer_config.json; make the two "
                "agree"
            )
    return add_bos, add_eos


def _template_tokens(post_processor: Any, where: str) -> tuple[list[str], list[str]]:
    """The special tokens a TemplateProcessing puts before and after the sequence."""
    if post_processor is None:
        return [], []
    single = post_processor.get("single", [])
    sequence = [index for index, item in enumerate(single) if "Sequence" in item]
    if post_processor.get("type") != "TemplateProcessing" or len(sequence) != 1:
        raise ValueError(
            f"{where}: post_processor {post_processor.get('type')!r} is not supported "
            "(only a TemplateProcessing around one sequence)"
        )
    specials = post_processor.get("special_tokens", {})

    def tokens(items: list[dict[str, Any]]) -> list[str]:
        names = [item["SpecialToken"]["id"] for item in items]
        return [token for name in names for token in specials[name]["tokens"]]

    return tokens(single[: sequence[0]]), tokens(single[sequence[0] + 1 :])


# --- Encoders: each text's ids, without the special tokens around them.

# The model and the normalizer transformers' GemmaTokenizer rebuilds around
# tokenizer.json's vocabulary and merges (transformers 4 used the file as it is): a
# file that differs would give other ids under each version.
_GEMMA_BPE = {
    "dropout": None,
    "fuse_unk": True,
    "byte_fallback": True,
    "ignore_merges": False,
    "continuing_subword_prefix": None,
    "end_of_word_suffix": None,
}
_GEMMA_NORMALIZER = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
_GEMMA_PRE_TOKENIZER = {
    "type": "Split",
    "pattern": {"String": " "},
    "behavior": "MergedWithPrevious",
    "invert": False,
}


class _RustEncoder:
    """tokenizer.json through Hugging Face `tokenizers`, as transformers' GemmaTokenizer
    (and Siglip2Tokenizer, lower-casing first) rebuilds it."""

    def __init__(self, settings: _Settings) -> None:
        from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers

        path = settings.where("tokenizer.json")
        with open(path, encoding="utf-8") as file:
            text = file.read()
        self.json_data = json.loads(text)
        _check_gemma_json(self.json_data, settings, path)
        tokenizer = Tokenizer.from_str(text)
        # Ids come uncut and without special tokens: HFTokenizer cuts and adds them.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        tokenizer.post_processor = None
        tokenizer.pre_tokenizer = pre_tokenizers.Split(
            " ", behavior="merged_with_previous", invert=False
        )
        normalizer = normalizers.Replace(" ", SPIECE_UNDERLINE)
        if settings.tokenizer_class == _SIGLIP2:
            normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizer])
        tokenizer.normalizer = normalizer
        # Transformers adds the added and special tokens that tokenizer.json lacks.
        present = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
        for token in settings.matched_tokens().values():
            if token.content not in present:
                tokenizer.add_tokens([AddedToken(**dataclasses.asdict(token))])
        self._tokenizer = tokenizer
        self.token_id: Callable[[str], int | None] = tokenizer.token_to_id
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        encodings = self._tokenizer.encode_batch(texts, add_special_tokens=False)
        return [encoding.ids for encoding in encodings]


def _check_gemma_json(data: dict[str, Any], settings: _Settings, path: str) -> None:
    """tokenizer.json must hold the pipeline transformers' GemmaTokenizer rebuilds."""
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: model type {model.get('type')!r} is not BPE (Gemma)")
    for key, wanted in _GEMMA_BPE.items():
        if (model.get(key) or wanted or None) != (wanted or None):  # '' as None
            raise ValueError(
                f"{path}: model.{key}={model.get(key)!r} differs from Gemma's {wanted!r}"
            )
    unk = settings.tokens["unk_token"]
    if model.get("unk_token") != (unk and unk.content):
        raise ValueError(
            f"{path}: model.unk_token={model.get('unk_token')!r} differs from "
            f"{settings.where()}'s unk_token {unk and unk.content!r}"
        )
    for key, wanted in (
        ("normalizer", [_GEMMA_NORMALIZER]),
        ("pre_tokenizer", [None, _GEMMA_PRE_TOKENIZER]),
    ):
        if data.get(key) not in wanted:
            raise ValueError(
                f"{path}: {key} {data.get(key)!r} is not supported (transformers' "
                f"GemmaTokenizer uses {wanted[-1]!r})"
            )


class _SentencePieceEncoder:
    """A SentencePiece model, after splitting the text on the added tokens as
    transformers' Python tokenizers do. For SiglipTokenizer, its text canonicalisation
    and its way of encoding each part."""

    json_data = None  # no tokenizer.json

    def __init__(self, settings: _Settings, filename: str) -> None:
        try:
            import sentencepiece
        except ImportError as error:
            raise ImportError(
                f"{settings.directory} holds a SentencePiece tokenizer ({filename}), "
                "which needs sentencepiece: pip install 'jaxclip[sentencepiece]'"
            ) from error
        model_file = settings.where(filename)
        if not os.path.isfile(model_file):
            raise FileNotFoundError(
                f"{settings.tokenizer_class} reads {model_file}, missing"
            )
        self._processor = sentencepiece.SentencePieceProcessor(model_file=model_file)
        self._siglip = settings.tokenizer_class == _SIGLIP
        if not self._siglip:
            # Transformers builds Gemma's BPE with its own normalizer (spaces to '▁',
            # nothing else), whatever the model file says.
            probe = "  A  b\u00a0ﬁ "
            if self._processor.normalize(probe) != probe.replace(" ", SPIECE_UNDERLINE):
                raise ValueError(
                    f"{model_file} normalizes text (a dummy prefix, NFKC or whitespace "
                    "removal), which transformers' GemmaTokenizer does not"
                )
        # The tokens matched in the raw text, and their ids.
        self._matched = settings.matched_tokens()
        self._added_ids = self._matched_ids(settings, filename)
        # The longest token first, where several match at one place.
        longest = sorted(self._matched, key=len, reverse=True)
        pattern = "|".join(map(re.escape, longest))
        self._split_pattern = re.compile(f"({pattern})") if pattern else None
        self._special = {token.content for token in settings.special}
        unk = settings.tokens["unk_token"]
        self._unk = unk.content if unk else ""
        self._unk_length = len(self._processor.encode(self._unk))
        underline = self._processor.piece_to_id(SPIECE_UNDERLINE)
        self._underline_id = (
            underline
            if self._processor.id_to_piece(underline) == SPIECE_UNDERLINE
            else None
        )
        self._lower = settings.config.get("do_lower_case", True)
        self.token_id: Callable[[str], int | None] = self._added_ids.get
        self.vocab_size = max(
            [
                self._processor.get_piece_size(),
                *(i + 1 for i in self._added_ids.values()),
            ]
        )

    def _matched_ids(self, settings: _Settings, filename: str) -> dict[str, int]:
        """The matched tokens' ids: added_tokens_decoder's, else the model's."""
        ids = {token.content: index for index, token in settings.added.items()}
        for token in self._matched.values():
            if token.single_word:
                raise ValueError(
                    f"{settings.where()}: token {token.content!r} has single_word=true, "
                    "which HFTokenizer does not implement for SentencePiece models"
                )
            if token.content not in ids:
                index = self._processor.piece_to_id(token.content)
                if self._processor.id_to_piece(index) != token.content:
                    raise ValueError(
                        f"{settings.where()}: token {token.content!r} is not in "
                        f"{filename}'s vocabulary (transformers would give it a new id)"
                    )
                ids[token.content] = index
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # Split each text on the matched tokens; encode all other parts in one call.
        if self._siglip:  # SiglipTokenizer.tokenize's prefix
            texts = [SPIECE_UNDERLINE + t.replace(SPIECE_UNDERLINE, " ") for t in texts]
        split = [self._split(text) for text in texts]
        plain = [part for parts in split for part in parts if part not in self._matched]
        if self._siglip:
            # SiglipTokenizer._tokenize encodes the unk token and the part, then drops
            # the unk token's ids (the model's dummy prefix went onto them).
            plain = [self._unk + self._canonicalize(part) for part in plain]
        encoded = iter(self._processor.encode(plain))
        rows = []
        for parts in split:
            tokens = []  # matched tokens as str, the model's ids as int
            for part in parts:
                if part in self._matched:
                    tokens.append(part)
                elif self._siglip:
                    ids = next(encoded)
                    skip = self._unk_length if len(ids) >= self._unk_length else 0
                    tokens.extend(ids[skip:])
                else:
                    tokens.extend(next(encoded))
            # SiglipTokenizer drops the prefix's lone '▁' where a special token follows.
            if (
                self._siglip
                and tokens[:1] == [self._underline_id]
                and len(tokens) > 1
                and tokens[1] in self._special
            ):
                tokens = tokens[1:]
            ids = self._added_ids
            rows.append([ids[t] if isinstance(t, str) else t for t in tokens])
        return rows

    def _split(self, text: str) -> list[str]:
        """The text's parts, each matched token apart, without the whitespace that the
        tokens' lstrip / rstrip drop; no empty parts."""
        if self._split_pattern is None:
            return [text] if text else []
        parts = self._split_pattern.split(text)  # the odd indices are tokens
        for index in range(1, len(parts), 2):
            token = self._matched[parts[index]]
            if token.rstrip:
                parts[index + 1] = parts[index + 1].lstrip()
            if token.lstrip:
                parts[index - 1] = parts[index - 1].rstrip()
        return [part for part in parts if part]

    def _canonicalize(self, text: str) -> str:
        """SiglipTokenizer.canonicalize_text: lower case, no punctuation, one space."""
        if self._lower:
            text = text.lower()
        text = text.translate(_NO_PUNCTUATION)
        return re.sub(r"\s+", " ", text).strip()


_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)
