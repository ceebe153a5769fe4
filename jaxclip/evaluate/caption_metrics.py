"""Caption metrics as the COCO caption evaluation computes them: BLEU-1..4 and CIDEr-D.

The numbers are those of `pycocoevalcap` (tests/test_caption_metrics.py compares them to
1e-9), written here from its algorithm so that evaluation needs neither it nor Java:

- `bleu`: corpus-level BLEU. n-gram matches are clipped by the largest count in any one
  reference, summed over the whole set, and multiplied up to n without smoothing;
  the brevity penalty compares the total candidate length to the sum over images of
  the reference length *closest* to the candidate's (the shorter one on a tie). As
  pycocoevalcap does, every ratio is (matches + 1e-15) / (candidates + 1e-9), so a
  set with no 4-gram match scores a tiny positive BLEU-4 (1e-9 to 1e-4), not 0.
- `cider_d`: CIDEr-D (Vedantam et al., the `Cider` scorer): for n = 1..4, TF-IDF
  vectors of n-gram counts with document frequencies over the evaluated set's
  references (an image counts once per n-gram), the candidate's weights clipped at the
  reference's, cosine similarity times a Gaussian length penalty (sigma 6), averaged
  over n and over the references, times 10, then averaged over the images. Like
  pycocoevalcap, the "length" in the penalty counts bigrams (words - 1), not words.
- `tokenize`: what pycocoevalcap's `PTBTokenizer` (Stanford CoreNLP 3.4.1 with
  `-lowerCase`, then its punctuation list removed) makes of a plain caption, see below.

Inputs of `bleu` and `cider_d` are tokenised captions: words separated by spaces.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

MAX_N = 4
CIDER_SIGMA = 6.0
# pycocoevalcap's guards against 0/0, kept: they move scores by ~1e-9 relative, and
# make a zero-match BLEU tiny instead of 0.
_TINY, _SMALL = 1e-15, 1e-9

# --- Tokenisation.
#
# PTBTokenizer splits punctuation off words and English clitics off their stems
# ("dog's" -> "dog 's", "don't" -> "do n't"), lower-cases, and pycocoevalcap then
# drops the tokens in its PUNCTUATIONS list (. , ? ! : ; - -- ... quotes, brackets).
# Here: the same for the characters captions use. Known differences, none of which
# occur in COCO-style captions often: no abbreviation list (PTB keeps "mr." and "u.s."
# whole; here a final period is dropped: "mr", "u.s"); no splitting of "cannot",
# "gonna" and the like; other symbols (& / $ % #) stay inside words as in
# "black&white" rather than being split by PTB's finer rules.

_CLITICS = re.compile(r"(?<=\w)('s|'re|'ve|'ll|'d|'m)\b")
_NEGATION = re.compile(r"(?<=\w)(n't)\b")
# Punctuation PTB splits off and pycocoevalcap removes: sentence marks anywhere except
# between two word characters ("3.5", "e.g" stay), hyphens standing apart or doubled,
# quotes, brackets, ellipses.
_REMOVED = re.compile(
    r"""\.{2,}|--+|[()\[\]{}"`]|'(?!s\b|re\b|ve\b|ll\b|d\b|m\b|t\b)"""
    r"""|[.,;:!?](?!\w)|(?<!\w)[.,;:!?]|(?<!\w)-|-(?!\w)"""
)


def tokenize(caption: str) -> str:
    """A caption as PTBTokenizer + pycocoevalcap's punctuation removal leave it:
    lower case, words and clitics separated by single spaces, punctuation gone."""
    text = caption.replace("\n", " ").lower()
    text = text.replace("\u2019", "'").replace("\u2018", "'")
    text = text.replace("\u201c", '"').replace("\u201d", '"')
    text = _NEGATION.sub(r" \1", text)
    text = _CLITICS.sub(r" \1", text)
    text = _REMOVED.sub(" ", text)
    return " ".join(text.split())


# --- BLEU.


def _ngrams(words: Sequence[str], max_n: int) -> Counter:
    """Counts of every n-gram of `words`, n = 1..max_n, keyed by word tuples."""
    return Counter(
        tuple(words[i : i + n])
        for n in range(1, max_n + 1)
        for i in range(len(words) - n + 1)
    )


def bleu(
    candidates: Sequence[str],
    references: Sequence[Sequence[str]],
    max_n: int = MAX_N,
) -> list[float]:
    """Corpus BLEU-1..max_n of tokenised `candidates[i]` against `references[i]`."""
    _check_pairs(candidates, references)
    matches, guesses = [0] * max_n, [0] * max_n
    candidate_total, reference_total = 0, 0
    for candidate, refs in zip(candidates, references):
        words = candidate.split()
        ref_words = [ref.split() for ref in refs]
        # The reference length closest to the candidate's, the shorter on a tie.
        reference_total += min(
            (abs(len(ref) - len(words)), len(ref)) for ref in ref_words
        )[1]
        candidate_total += len(words)
        clip: Counter = Counter()
        for ref in ref_words:
            clip |= _ngrams(ref, max_n)  # the max count of each n-gram over refs
        for gram, count in _ngrams(words, max_n).items():
            matches[len(gram) - 1] += min(count, clip[gram])
        for n in range(1, max_n + 1):
            guesses[n - 1] += max(0, len(words) - n + 1)
    ratio = (candidate_total + _TINY) / (reference_total + _SMALL)
    brevity = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    scores, product = [], 1.0
    for n in range(1, max_n + 1):
        product *= (matches[n - 1] + _TINY) / (guesses[n - 1] + _SMALL)
        scores.append(product ** (1 / n) * brevity)
    return scores


# --- CIDEr-D.


def _tfidf(
    counts: Counter, document_frequency: Counter, log_images: float, max_n: int
) -> tuple[list[dict], list[float], int]:
    """Per n: TF-IDF weights of the n-grams in `counts`, their L2 norm; and the
    caption's length as CIDEr-D's penalty measures it (its number of bigrams)."""
    weights: list[dict] = [{} for _ in range(max_n)]
    for gram, count in counts.items():
        df = max(1.0, document_frequency[gram])
        weights[len(gram) - 1][gram] = count * (log_images - math.log(df))
    norms = [math.sqrt(sum(w * w for w in by_n.values())) for by_n in weights]
    bigrams = sum(counts[gram] for gram in weights[1]) if max_n > 1 else 0
    return weights, norms, bigrams


def _similarity(candidate, reference, max_n: int, sigma: float) -> float:
    """Sum over n of the clipped cosine similarity times the length penalty."""
    weights, norms, length = candidate
    ref_weights, ref_norms, ref_length = reference
    penalty = math.exp(-((length - ref_length) ** 2) / (2 * sigma**2))
    total = 0.0
    for n in range(max_n):
        dot = 0.0
        for gram, weight in weights[n].items():
            ref_weight = ref_weights[n].get(gram, 0.0)
            dot += min(weight, ref_weight) * ref_weight
        if norms[n] and ref_norms[n]:
            dot /= norms[n] * ref_norms[n]
        total += dot * penalty
    return total


def cider_scores(
    candidates: Sequence[str],
    references: Sequence[Sequence[str]],
    max_n: int = MAX_N,
    sigma: float = CIDER_SIGMA,
) -> list[float]:
    """CIDEr-D of each tokenised candidate; document frequencies come from all of
    `references` (so an image's score depends on the rest of the set)."""
    _check_pairs(candidates, references)
    reference_counts = [
        [_ngrams(ref.split(), max_n) for ref in refs] for refs in references
    ]
    document_frequency: Counter = Counter()
    for counts in reference_counts:
        document_frequency.update(set().union(*counts))
    log_images = math.log(len(candidates))
    scores = []
    for candidate, counts in zip(candidates, reference_counts):
        vector = _tfidf(
            _ngrams(candidate.split(), max_n), document_frequency, log_images, max_n
        )
        total = sum(
            _similarity(
                vector,
                _tfidf(ref, document_frequency, log_images, max_n),
                max_n,
                sigma,
            )
            for ref in counts
        )
        scores.append(10.0 * total / max_n / len(counts))
    return scores


def cider_d(
    candidates: Sequence[str],
    references: Sequence[Sequence[str]],
    max_n: int = MAX_N,
    sigma: float = CIDER_SIGMA,
) -> float:
    """CIDEr-D of the set: the mean over images of `cider_scores`."""
    scores = cider_scores(candidates, references, max_n, sigma)
    return sum(scores) / len(scores)


# --- All of them.


def caption_metrics(
    candidates: Sequence[str], references: Sequence[Sequence[str]]
) -> dict[str, float]:
    """bleu1..bleu4, cider (CIDEr-D) and exact_match of raw captions, tokenised here
    (`tokenize`); exact_match: the fraction of candidates equal to one of their
    references."""
    candidates = [tokenize(caption) for caption in candidates]
    references = [[tokenize(caption) for caption in refs] for refs in references]
    scores = {f"bleu{n}": s for n, s in enumerate(bleu(candidates, references), 1)}
    scores["cider"] = cider_d(candidates, references)
    exact = [cand in refs for cand, refs in zip(candidates, references)]
    scores["exact_match"] = sum(exact) / len(exact)
    return scores


def _check_pairs(
    candidates: Sequence[str], references: Sequence[Sequence[str]]
) -> None:
    if len(candidates) != len(references):
        raise ValueError(
            f"{len(candidates)} candidates but {len(references)} reference lists"
        )
    if not candidates:
        raise ValueError("no captions to score")
    empty = [i for i, refs in enumerate(references) if not refs]
    if empty:
        raise ValueError(f"images {empty[:5]} have no reference caption")
