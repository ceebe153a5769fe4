"""Reference CLIP tokenizer: byte-level BPE, id-for-id equal to OpenAI CLIP's."""

import functools
import gzip
import hashlib
import html
import importlib.resources
import itertools
import os
import pathlib
from collections.abc import Iterable, Sequence

import ftfy
import numpy as np
import regex

VOCAB_SIZE = 49408
SOT_TOKEN = 49406  # <|startoftext|>
EOT_TOKEN = 49407  # <|endoftext|>
PAD_TOKEN = 0
DEFAULT_CONTEXT_LENGTH = 77
BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"

_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
_END_OF_WORD = "</w>"
# CLIP keeps only the merges that fit a 49408-entry vocabulary: 49152 minus the
# 256 byte symbols and the two special tokens (and the file's header line).
_NUM_MERGES = 49152 - 256 - 2
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
    """CLIP's byte-level BPE tokenizer; encode() adds no special tokens."""

    def __init__(self, merges_path: str | os.PathLike | None = None) -> None:
        merges = _read_merges(merges_path)
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {char: byte for byte, char in self.byte_encoder.items()}
        symbols = list(self.byte_encoder.values())
        vocab = [
            *symbols,
            *(symbol + _END_OF_WORD for symbol in symbols),
            *("".join(merge) for merge in merges),
            *_SPECIAL_TOKENS,
        ]
        if len(vocab) != VOCAB_SIZE:
            raise ValueError(
                f"BPE vocabulary has {len(vocab)} entries, expected {VOCAB_SIZE}"
            )
        self.encoder = {token: index for index, token in enumerate(vocab)}
        self.decoder = dict(enumerate(vocab))
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


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> SimpleTokenizer:
    """The packaged CLIP tokenizer, built once per process."""
    return SimpleTokenizer()


def tokenize(
    texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH
) -> np.ndarray:
    """Tokenize to int32 [len(texts), context_length]: SOT, ids, EOT, zero padding."""
    if context_length < 2:
        raise ValueError(
            f"context_length must be at least 2 (SOT and EOT), got {context_length}"
        )
    if isinstance(texts, str):
        texts = [texts]
    tokenizer = default_tokenizer()
    result = np.full((len(texts), context_length), PAD_TOKEN, dtype=np.int32)
    for row, text in enumerate(texts):
        ids = [SOT_TOKEN, *tokenizer.encode(text), EOT_TOKEN][:context_length]
        # Truncated captions still end in EOT, where CLIP pools its text feature.
        ids[-1] = EOT_TOKEN
        result[row, : len(ids)] = ids
    return result
