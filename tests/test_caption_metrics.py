"""Caption metrics against the COCO caption evaluation (pycocoevalcap) and by hand."""

import math

import numpy as np
import pytest

from jaxclip.evaluate.caption_metrics import (
    bleu,
    caption_metrics,
    cider_d,
    cider_scores,
    tokenize,
)


def synthetic_set(seed, num_images, vocab_size, max_words=12, min_words=0):
    """Tokenised candidates and 1-5 references per image over a `vocab_size`-word
    vocabulary (small ones make many n-gram matches)."""
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(vocab_size)]

    def sentence():
        length = rng.integers(min_words, max_words + 1)
        return " ".join(rng.choice(vocab, size=length))

    candidates = [sentence() for _ in range(num_images)]
    references = [
        [sentence() for _ in range(rng.integers(1, 6))] for _ in range(num_images)
    ]
    return candidates, references


def reference_scores(candidates, references):
    """BLEU-1..4 and CIDEr-D by pycocoevalcap's own scorers (pure Python, no Java)."""
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    res = {i: [c] for i, c in enumerate(candidates)}
    gts = {i: list(refs) for i, refs in enumerate(references)}
    bleus, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, per_image = Cider().compute_score(gts, res)
    return bleus, float(cider), per_image


@pytest.mark.parametrize(
    "seed,num_images,vocab_size,min_words",
    [
        (0, 5, 3, 0),  # tiny vocabulary: long matches, empty captions
        (1, 40, 6, 1),
        (2, 60, 50, 1),  # larger vocabulary: few matches beyond unigrams
        (3, 200, 400, 2),
        (4, 2, 4, 0),
    ],
)
def test_matches_pycocoevalcap(seed, num_images, vocab_size, min_words):
    candidates, references = synthetic_set(
        seed, num_images, vocab_size, min_words=min_words
    )
    want_bleu, want_cider, want_per_image = reference_scores(candidates, references)
    np.testing.assert_allclose(
        bleu(candidates, references), want_bleu, rtol=0, atol=1e-9
    )
    assert abs(cider_d(candidates, references) - want_cider) < 1e-9
    np.testing.assert_allclose(
        cider_scores(candidates, references), want_per_image, rtol=0, atol=1e-9
    )


def test_matches_pycocoevalcap_on_near_copies():
    # Candidates that are references with a word changed: high scores, where
    # the clipping and the length penalty matter most.
    candidates, references = synthetic_set(5, 30, 20, min_words=4)
    rng = np.random.default_rng(6)
    near = []
    for refs in references:
        words = refs[rng.integers(len(refs))].split()
        words[rng.integers(len(words))] = "w0"
        near.append(" ".join(words))
    want_bleu, want_cider, _ = reference_scores(near, references)
    np.testing.assert_allclose(bleu(near, references), want_bleu, rtol=0, atol=1e-9)
    assert abs(cider_d(near, references) - want_cider) < 1e-9


def test_identical_captions():
    references = [["a red circle at the top"], ["a small blue square in the centre"]]
    candidates = [refs[0] for refs in references]
    assert bleu(candidates, references) == pytest.approx([1.0] * 4, abs=1e-9)
    # One image per n-gram pair: every shared n-gram has idf log(2/1); the
    # cosines are 1, the lengths equal: 10 per image.
    assert cider_d(candidates, references) == pytest.approx(10.0)
    scores = caption_metrics(candidates, references)
    assert scores["exact_match"] == 1.0


def test_no_overlap():
    references = [["a red circle"], ["a blue square"]]
    candidates = ["green triangle here", "yellow cross there"]
    # No match at any n: (0 + 1e-15) / (6 + 1e-9) at n=1, the COCO scorer's floor.
    expected_bleu1 = (1e-15) / (6 + 1e-9)
    assert bleu(candidates, references)[0] == pytest.approx(expected_bleu1, rel=1e-6)
    assert max(bleu(candidates, references)) < 1e-3
    assert cider_d(candidates, references) == 0.0
    assert caption_metrics(candidates, references)["exact_match"] == 0.0


def test_empty_prediction():
    references = [["a red circle at the top"], ["a blue square"]]
    candidates = ["", "a blue square"]
    # Brevity penalty: 3 candidate words against 6 + 3 reference words.
    brevity = math.exp(1 - 9 / 3)
    assert bleu(candidates, references)[0] == pytest.approx(brevity, rel=1e-6)
    scores = cider_scores(candidates, references)
    assert scores[0] == 0.0 and scores[1] > 0
    assert caption_metrics(candidates, references)["exact_match"] == 0.5


def test_closest_reference_length_prefers_the_shorter_on_a_tie():
    # A 3-word candidate between references of 2 and 4 words: BLEU uses 2, so no
    # brevity penalty (with 4 it would be exp(1 - 4/3)).
    unigram = bleu(["a b c"], [["a b", "a b c d"]])[0]
    assert unigram == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize(
    "caption,tokens",
    [
        ("A dog's ball.", "a dog 's ball"),
        ("Two men don't sit, on a bench!", "two men do n't sit on a bench"),
        (
            'A "black-and-white" photo (of 3.5 cats)...',
            "a black-and-white photo of 3.5 cats",
        ),
        ("it is -- very  \nodd; isn't it?", "it is very odd is n't it"),
        ("The dogs' toys: balls", "the dogs toys balls"),
        ("'Quoted' word at 3:30 - ok", "quoted word at 3:30 ok"),
        ("A MAN’S HAT", "a man 's hat"),
    ],
)
def test_tokenize_like_ptb_tokenizer(caption, tokens):
    assert tokenize(caption) == tokens


def test_caption_metrics_tokenizes_both_sides():
    scores = caption_metrics(["A red circle."], [["a red circle", "A blue one!"]])
    assert scores["exact_match"] == 1.0
    assert set(scores) == {"bleu1", "bleu2", "bleu3", "bleu4", "cider", "exact_match"}


def test_refuses_mismatched_sets():
    with pytest.raises(ValueError, match="reference lists"):
        bleu(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match="no reference"):
        cider_d(["a"], [[]])
