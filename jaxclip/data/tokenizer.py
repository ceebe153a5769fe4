"""CLIP's byte-level BPE tokenizer, id-for-id equal to OpenAI's, and SentencePiece.

`SimpleTokenizer` is the reference: a direct transcription of OpenAI's
`simple_tokenizer.py`. `FastTokenizer` gives the same ids several times faster and is
what `tokenize` (and the data pipeline) uses. `SentencePieceTokenizer` serves
SigLIP-style models from a user-given model file, and `HFTokenizer` (hf_tokenizer.py)
SigLIP and SigLIP 2 from a Hugging Face model directory, with transformers' ids.
"""

import dataclasses
import functools
import gzip
import hashlib
import html
import importlib.resources
import itertools
import os
import pathlib
import re
import string
from collections.abc import Iterable, Sequence
from typing import Any

import ftfy
import numpy as np
import regex

from jaxclip.data.hf_tokenizer import TOKENIZER_FILES, HFTokenizer, has_tokenizer_files

VOCAB_SIZE = 49408  # OpenAI's: every merge of the file that fits (see _NUM_MERGES)
SOT_TOKEN = 49406  # <|startoftext|>, at VOCAB_SIZE
EOT_TOKEN = 49407  # <|endoftext|>, at VOCAB_SIZE
PAD_TOKEN = 0
DEFAULT_CONTEXT_LENGTH = 77
BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"

_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
_END_OF_WORD = "</w>"
# CLIP keeps only the merges that fit a 49408-entry vocabulary: 49152 minus the
# 256 byte symbols and the two special tokens (and the file's header line).
_NUM_MERGES = 49152 - 256 - 2
# A smaller vocabulary keeps fewer of the first merges, as OpenAI sized theirs: the
# 512 byte symbols (with and without the end-of-word mark) and the two special tokens
# are always there, so the smallest has no merges at all.
MIN_VOCAB_SIZE = 2 * 256 + len(_SPECIAL_TOKENS)
# The word cache is a plain dict, emptied when full, so a long data pipeline
# cannot grow it without bound.
_MAX_CACHED_WORDS = 1 << 20

_WORD_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


def bytes_to_unicode() -> dict[int, str]:
    """Map each byte to a printable unicode character (GPT-2/CLIP byte table)."""
    # Printable Latin-1 bytes stand for themselves; the others (control
    # characters, space, soft hyphen...) get 256, 257, ... in byte order, so no
    # BPE symbol is whitespace or invisible. The dict order (printable bytes
    # first) is also the order of the first 256 vocabulary entries.
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {byte: chr(byte) for byte in printable}
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + len(table) - len(printable))
    return table


def clean_text(text: str) -> str:
    """Fix mojibake, unescape HTML twice, collapse whitespace and lower-case."""
    # Twice because scraped captions are often double-escaped ("&amp;amp;").
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


def special_tokens(vocab_size: int = VOCAB_SIZE) -> tuple[int, int]:
    """The start and end token ids of the CLIP BPE with `vocab_size` ids: its last
    two, so the end token is the largest id (where the text tower pools)."""
    _check_vocab_size(vocab_size)
    return vocab_size - 2, vocab_size - 1


def _check_vocab_size(vocab_size: int) -> None:
    if not MIN_VOCAB_SIZE <= vocab_size <= VOCAB_SIZE:
        raise ValueError(
            f"the CLIP BPE has {MIN_VOCAB_SIZE:,} to {VOCAB_SIZE:,} ids (its byte "
            f"symbols and special tokens, then its first merges); got {vocab_size:,}"
        )


def _read_merges(path: str | os.PathLike | None) -> list[tuple[str, ...]]:
    """Read the gzipped merges file, refusing it unless its sha256 matches."""
    if path is None:
        resource = importlib.resources.files("jaxclip.data.assets") / BPE_FILENAME
    else:
        resource = pathlib.Path(path)
    try:
        data = resource.read_bytes()
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"CLIP BPE merges file not found at {resource} (expected sha256 {BPE_SHA256})"
        ) from error
    digest = hashlib.sha256(data).hexdigest()
    if digest != BPE_SHA256:
        raise ValueError(
            f"CLIP BPE merges file {resource} has sha256 {digest}, expected {BPE_SHA256}"
        )
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    # Line 0 is a version header; the merges are listed by rank.
    return [tuple(line.split()) for line in lines[1 : 1 + _NUM_MERGES]]


class SimpleTokenizer:
    """CLIP's byte-level BPE tokenizer; encode() adds no special tokens.

    `vocab_size` below OpenAI's 49,408 keeps the first `vocab_size - 514` merges:
    still exactly BPE, with the same ids for the tokens it keeps, and the start and
    end tokens moved to the last two ids (`special_tokens`).
    """

    def __init__(
        self, merges_path: str | os.PathLike | None = None, vocab_size: int = VOCAB_SIZE
    ) -> None:
        _check_vocab_size(vocab_size)
        merges = _read_merges(merges_path)[: vocab_size - MIN_VOCAB_SIZE]
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {char: byte for byte, char in self.byte_encoder.items()}
        symbols = list(self.byte_encoder.values())
        vocab = [
            *symbols,
            *(symbol + _END_OF_WORD for symbol in symbols),
            *("".join(merge) for merge in merges),
            *_SPECIAL_TOKENS,
        ]
        if len(vocab) != vocab_size:
            raise ValueError(
                f"BPE vocabulary has {len(vocab)} entries, expected {vocab_size}"
            )
        self.vocab_size = vocab_size
        self.sot_id, self.eot_id = special_tokens(vocab_size)
        self.encoder = {token: index for index, token in enumerate(vocab)}
        self.decoder = dict(enumerate(vocab))
        self.merges = merges
        self.merge_ranks = {merge: rank for rank, merge in enumerate(merges)}
        self._cache: dict[str, tuple[str, ...]] = {}

    def bpe(self, word: str) -> tuple[str, ...]:
        """Split one pre-tokenized word (byte-table characters) into BPE tokens."""
        if word in _SPECIAL_TOKENS:
            return (word,)
        if word in self._cache:
            return self._cache[word]
        # The last symbol carries the end-of-word marker, so "cat" inside a
        # word and "cat" at its end are different tokens.
        parts = [*word[:-1], word[-1] + _END_OF_WORD]
        while len(parts) > 1:
            pairs = set(itertools.pairwise(parts))
            best = min(pairs, key=lambda pair: self.merge_ranks.get(pair, float("inf")))
            if best not in self.merge_ranks:
                break
            # Merge every occurrence of the best pair, scanning left to right.
            merged, index = [], 0
            while index < len(parts):
                if index + 1 < len(parts) and (parts[index], parts[index + 1]) == best:
                    merged.append(parts[index] + parts[index + 1])
                    index += 2
                else:
                    merged.append(parts[index])
                    index += 1
            parts = merged
        if len(self._cache) >= _MAX_CACHED_WORDS:
            self._cache.clear()
        self._cache[word] = tuple(parts)
        return self._cache[word]

    def encode(self, text: str) -> list[int]:
        """Clean and BPE-encode text, without start/end tokens."""
        ids = []
        for word in _WORD_PATTERN.findall(clean_text(text)):
            word = "".join(self.byte_encoder[byte] for byte in word.encode("utf-8"))
            ids.extend(self.encoder[token] for token in self.bpe(word))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Turn token ids back into text; word ends become spaces."""
        chars = "".join(self.decoder[int(token_id)] for token_id in ids)
        data = bytes(self.byte_decoder[char] for char in chars)
        return data.decode("utf-8", errors="replace").replace(_END_OF_WORD, " ")


@functools.lru_cache(maxsize=4)
def default_tokenizer(vocab_size: int = VOCAB_SIZE) -> SimpleTokenizer:
    """The packaged reference CLIP tokenizer, built once per process and size."""
    return SimpleTokenizer(vocab_size=vocab_size)


# Text that needs none of ftfy's or html's fixes: printable ASCII plus tab, newline,
# carriage return and form feed, without '&' (the start of an HTML entity). On such
# text ftfy changes nothing that the whitespace collapse does not also do (it keeps
# those four controls, and turns '\r' into a line break), so cleaning is just
# collapsing whitespace and lower-casing.
_NEEDS_FULL_CLEAN = re.compile(r"[^\t\n\r\x0c\x20-\x25\x27-\x7e]")


def fast_clean_text(text: str) -> str:
    """`clean_text`, with a shortcut for plain ASCII text that gives the same result."""
    if _NEEDS_FULL_CLEAN.search(text) is None:
        return " ".join(text.split()).lower()
    return clean_text(text)


class FastTokenizer:
    """CLIP BPE with exactly the reference ids, several times faster.

    After cleaning (`fast_clean_text`), the only whitespace left is single spaces,
    and no word of the reference regex spans one, so a text's ids are the
    concatenation of its space-separated chunks' ids. A dict remembers each chunk's
    ids ("cat", "cat,", "2024"), so the common chunks of a caption corpus cost one
    lookup each. A new chunk is split with the reference regex, and its words are
    BPE-encoded by Hugging Face `tokenizers` (Rust), in one call per batch.
    """

    def __init__(
        self, merges_path: str | os.PathLike | None = None, vocab_size: int = VOCAB_SIZE
    ) -> None:
        from tokenizers import Tokenizer, models, pre_tokenizers

        reference = (
            default_tokenizer(vocab_size)
            if merges_path is None
            else SimpleTokenizer(merges_path, vocab_size)
        )
        self.vocab_size = reference.vocab_size
        self.sot_id, self.eot_id = reference.sot_id, reference.eot_id
        bpe = models.BPE(
            vocab=reference.encoder,
            merges=reference.merges,
            end_of_word_suffix=_END_OF_WORD,
            continuing_subword_prefix="",
        )
        self._bpe = Tokenizer(bpe)
        # Each input is one word: map its bytes to the byte table, split nothing.
        self._bpe.pre_tokenizer = pre_tokenizers.ByteLevel(
            add_prefix_space=False, use_regex=False
        )
        self._special = {
            "<|startoftext|>": (self.sot_id,),
            "<|endoftext|>": (self.eot_id,),
        }
        self._chunks: dict[str, tuple[int, ...]] = {}

    def _learn(self, chunks: set[str]) -> None:
        """Encode and remember the chunks not seen before."""
        new = [chunk for chunk in chunks if chunk not in self._chunks]
        if len(self._chunks) + len(new) > _MAX_CACHED_WORDS:
            self._chunks.clear()  # bounded memory in a long-running pipeline
            new = list(chunks)
        word_lists = [_WORD_PATTERN.findall(chunk) for chunk in new]
        words = sorted(
            {word for words in word_lists for word in words} - self._special.keys()
        )
        encodings = self._bpe.encode_batch(words, add_special_tokens=False)
        word_ids = {
            word: tuple(encoding.ids) for word, encoding in zip(words, encodings)
        }
        word_ids.update(self._special)
        for chunk, words in zip(new, word_lists):
            self._chunks[chunk] = tuple(
                itertools.chain.from_iterable(word_ids[word] for word in words)
            )

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Clean and BPE-encode each text, without start/end tokens."""
        chunk_lists = [_clean_chunks(text) for text in texts]
        while True:
            lookup = self._chunks.__getitem__
            try:
                return [
                    list(itertools.chain.from_iterable(map(lookup, chunks)))
                    for chunks in chunk_lists
                ]
            except KeyError:
                self._learn({chunk for chunks in chunk_lists for chunk in chunks})

    def encode(self, text: str) -> list[int]:
        """Clean and BPE-encode one text, without start/end tokens."""
        return self.encode_batch([text])[0]

    def __call__(
        self, texts: Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH
    ) -> np.ndarray:
        """int32 [len(texts), context_length]: SOT, ids, EOT, zero padding."""
        return _pack(self.encode_batch(texts), context_length, self.sot_id, self.eot_id)


def _clean_chunks(text: str) -> list[str]:
    """The cleaned text's space-separated chunks."""
    if _NEEDS_FULL_CLEAN.search(text) is None:
        return text.lower().split()  # the ASCII tab/newline/CR/FF all split too
    cleaned = clean_text(text)
    return cleaned.split(" ") if cleaned else []


def _pack(
    rows: Sequence[Sequence[int]],
    context_length: int,
    start: int | None,
    end: int | None,
    pad: int = PAD_TOKEN,
) -> np.ndarray:
    """Rows of ids -> int32 [rows, context_length] with optional start/end tokens.

    A row too long is cut so that the end token still fits in the last position.
    """
    specials = (start is not None) + (end is not None)
    if context_length < max(specials, 1):
        raise ValueError(
            f"context_length must be at least {max(specials, 1)}, got {context_length}"
        )
    room = context_length - specials
    lengths = np.fromiter((min(len(row), room) for row in rows), np.int64, len(rows))
    flat = np.fromiter(
        itertools.chain.from_iterable(row[:room] for row in rows),
        np.int32,
        int(lengths.sum()),
    )
    result = np.full((len(rows), context_length), pad, dtype=np.int32)
    first = 0 if start is None else 1
    if start is not None:
        result[:, 0] = start
    columns = np.arange(room)
    mask = np.zeros((len(rows), context_length), bool)
    mask[:, first : first + room] = columns < lengths[:, None]
    result[mask] = flat  # row-major order matches the concatenation
    if end is not None:
        result[np.arange(len(rows)), first + lengths] = end
    return result


@functools.lru_cache(maxsize=4)
def default_fast_tokenizer(vocab_size: int = VOCAB_SIZE) -> FastTokenizer:
    """The packaged CLIP tokenizer (fast path), built once per process and size."""
    return FastTokenizer(vocab_size=vocab_size)


def tokenize(
    texts: str | Sequence[str],
    context_length: int = DEFAULT_CONTEXT_LENGTH,
    vocab_size: int = VOCAB_SIZE,
) -> np.ndarray:
    """Tokenize to int32 [len(texts), context_length]: SOT, ids, EOT, zero padding.

    Like `open_clip.tokenize` (ids equal to OpenAI's tokenizer): a caption longer
    than the context is cut, and its last token is then forced to EOT, where CLIP
    pools its text feature. A smaller `vocab_size` is the BPE with fewer merges
    (`SimpleTokenizer`), for a text tower with that many embeddings.
    """
    if context_length < 2:
        raise ValueError(
            f"context_length must be at least 2 (SOT and EOT), got {context_length}"
        )
    if isinstance(texts, str):
        texts = [texts]
    return default_fast_tokenizer(vocab_size)(list(texts), context_length)


def canonicalize_text(text: str) -> str:
    """OpenCLIP's SigLIP cleaning: '_' to space, no punctuation, lower case, one space."""
    text = text.replace("_", " ").translate(_NO_PUNCTUATION).lower()
    return " ".join(text.split())


_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


class SentencePieceTokenizer:
    """A SentencePiece model (SigLIP-style text towers), called like `tokenize`.

    Text is cleaned as OpenCLIP does for SigLIP (`canonicalize_text`), encoded, and
    ends in the model's EOS token (kept on truncation); the rest is the model's pad
    id (0 if it has none).
    """

    def __init__(self, model_file: str | os.PathLike) -> None:
        import sentencepiece

        if not os.path.isfile(model_file):
            raise FileNotFoundError(
                f"SentencePiece model file {model_file!r} not found"
            )
        self.model_file = os.fspath(model_file)
        self._processor = sentencepiece.SentencePieceProcessor(
            model_file=self.model_file
        )
        self.vocab_size = self._processor.get_piece_size()
        eos = self._processor.eos_id()
        self.eos_id = eos if eos >= 0 else None
        pad = self._processor.pad_id()
        self.pad_id = pad if pad >= 0 else 0

    def __call__(
        self, texts: str | Sequence[str], context_length: int = 64
    ) -> np.ndarray:
        """int32 [len(texts), context_length]: ids, EOS, padding."""
        if isinstance(texts, str):
            texts = [texts]
        rows = self._processor.encode([canonicalize_text(text) for text in texts])
        return _pack(rows, context_length, None, self.eos_id, self.pad_id)


# The tokenizers data.tokenizer names; it may also be a Hugging Face model directory
# holding tokenizer files (HFTokenizer).
TOKENIZERS = ("clip", "sentencepiece")


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
    """A picklable recipe for a tokenizer, built lazily once per process (workers).

    `kind` is one of TOKENIZERS or the path of a Hugging Face model directory holding
    tokenizer files; `model_file` is the 'sentencepiece' kind's model file, and
    `vocab_size` the 'clip' kind's number of ids (`for_vocabulary` sets it).
    """

    kind: str = "clip"
    model_file: str = ""
    vocab_size: int = VOCAB_SIZE

    @classmethod
    def for_model(cls, data: Any, vocab_size: int) -> "TokenizerSpec":
        """The tokenizer a config's `data` section names (`data.tokenizer`,
        `data.tokenizer_model`), for a text tower of `vocab_size` embeddings."""
        return cls(data.tokenizer, data.tokenizer_model).for_vocabulary(vocab_size)

    def for_vocabulary(self, vocab_size: int) -> "TokenizerSpec":
        """This tokenizer for a text tower with `vocab_size` embeddings: the 'clip'
        BPE keeps the merges that fit (all of OpenAI's 49,408 ids where there is
        room), so its ids index the tower's table and its end token is the largest;
        the other kinds are a model's own and stay as they are."""
        if self.kind != "clip":
            return self
        return dataclasses.replace(self, vocab_size=min(vocab_size, VOCAB_SIZE))

    def build(self) -> FastTokenizer | SentencePieceTokenizer | HFTokenizer:
        """The tokenizer itself (cached per process)."""
        return _build_tokenizer(self.kind, self.model_file, self.vocab_size)

    def __call__(self, texts: Sequence[str], context_length: int) -> np.ndarray:
        return self.build()(texts, context_length)


@functools.lru_cache(maxsize=8)
def _build_tokenizer(kind: str, model_file: str, vocab_size: int):
    if kind == "clip":
        return default_fast_tokenizer(vocab_size)
    if kind == "sentencepiece":
        return SentencePieceTokenizer(model_file)
    if has_tokenizer_files(kind):
        return HFTokenizer(kind)
    raise ValueError(
        f"data.tokenizer={kind!r}; expected one of {list(TOKENIZERS)} or a Hugging "
        f"Face model directory holding tokenizer files ({', '.join(TOKENIZER_FILES)})"
    )
