"""CoCa caption generation: the cached decoder against uncached decoding written here
(the model's full forward pass re-run on the whole prefix for every token), beam search
against a plain Python beam search on those uncached log probabilities, sampling's
filters, and a sharded batch against one device."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxclip import sharding
from jaxclip.models.build import create_model, init_variables
from jaxclip.models.generate import generate, ids_to_texts, make_generator

SOT, EOT, PAD = 97, 98, 0  # tiny-coca's vocabulary has 100 ids
MAX_LEN, MIN_LEN = 10, 3
IDS = dict(sot_id=SOT, eot_id=EOT, max_len=MAX_LEN, min_len=MIN_LEN)


@pytest.fixture(scope="module")
def coca():
    """tiny-coca with every parameter perturbed (a fresh init's logits are nearly
    flat), and three images."""
    model = create_model("tiny-coca", sharded=False)
    variables = init_variables(model, jax.random.key(0))

    @jax.jit
    def perturb(variables):
        leaves, tree = jax.tree.flatten(variables)
        keys = jax.random.split(jax.random.key(1), len(leaves))
        noisy = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
        return jax.tree.unflatten(tree, noisy)

    size = model.config.vision.image_size
    images = jax.random.normal(jax.random.key(2), (3, size, size, 3))
    return model, perturb(variables), images


@functools.cache
def _jitted(model, **options):
    return jax.jit(lambda v, x, key=None: generate(model, v, x, key=key, **options))


def run(coca, **options):
    model, variables, images = coca
    key = options.pop("key", None)
    fn = _jitted(model, **{**IDS, **options})
    return np.asarray(fn(variables, images, key))


@functools.cache
def _next_logits(model):
    """Jitted: the decoder's logits after the last token of each prefix [n, t],
    from the model's full forward pass over the prefix."""

    @jax.jit
    def next_logits(variables, image_tokens, prefixes):
        _, text = model.apply(variables, prefixes, method=model.encode_text)
        return model.apply(variables, image_tokens, text, method=model.decode)[:, -1]

    return next_logits


@functools.cache
def _next_logits_all(model):
    @jax.jit
    def logits(variables, image_tokens, tokens):
        _, text = model.apply(variables, tokens, method=model.encode_text)
        return model.apply(variables, image_tokens, text, method=model.decode)

    return logits


def uncached_logprobs(model, variables, image_tokens, prefixes, end_last=True):
    """float64 log probabilities [n, vocab] of the token after each prefix (all
    prefixes of one length), then the decoding rules (no end token before MIN_LEN,
    only the end token at the last position with `end_last`), as Hugging Face
    applies them: after the normalisation; image tokens per row."""
    prefixes = jnp.asarray(prefixes, jnp.int32)
    logits = _next_logits(model)(variables, image_tokens, prefixes)
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    logprobs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    length = prefixes.shape[1]
    if length < MIN_LEN:
        logprobs[:, EOT] = -np.inf
    if length == MAX_LEN - 1 and end_last:
        logprobs[:, np.arange(logprobs.shape[1]) != EOT] = -np.inf
    return logprobs


def image_tokens_of(model, variables, images):
    encode = jax.jit(functools.partial(model.apply, method=model.encode_image))
    return encode(variables, images)[1]


def uncached_greedy(model, variables, images):
    image_tokens = image_tokens_of(model, variables, images)
    rows = images.shape[0]
    out = np.full((rows, MAX_LEN), PAD, np.int64)
    out[:, 0] = SOT
    done = np.zeros(rows, bool)
    for t in range(1, MAX_LEN):
        logprobs = uncached_logprobs(model, variables, image_tokens, out[:, :t])
        token = logprobs.argmax(-1)
        out[:, t] = np.where(done, PAD, token)
        done |= out[:, t] == EOT
        if done.all():
            break
    return out


def test_cached_greedy_equals_uncached_greedy(coca):
    ids = run(coca, method="greedy")
    expected = uncached_greedy(*coca)
    np.testing.assert_array_equal(ids, expected)
    # Not a trivial case: the captions differ, and some end before the last token.
    assert len({tuple(row) for row in ids}) == len(ids)
    assert (ids[:, -1] == PAD).any() or (ids == EOT).sum() == len(ids)


def test_cached_step_logits_equal_the_full_forward_pass(coca):
    """The decoder's logits after each token of a caption, cached one token at a
    time, equal the full forward pass over the caption."""
    model, variables, images = coca
    caption = run(coca, method="greedy")
    cached = model.clone(cached=True)
    image_tokens = image_tokens_of(model, variables, images)
    buffer = jnp.asarray(caption, jnp.int32)

    @jax.jit
    def step(variables, cache, position, image_tokens):
        token = jax.lax.dynamic_slice_in_dim(buffer, position, 1, axis=1)
        logits, mutated = cached.apply(
            {**variables, **cache},
            token,
            position,
            buffer,
            image_tokens,
            method=cached.decode_step,
            mutable=["cache"],
        )
        return logits[:, 0], mutated

    logits, cache = step(variables, {}, 0, image_tokens)  # makes the cache
    steps = [logits]
    for t in range(1, MAX_LEN - 1):
        logits, cache = step(variables, cache, t, None)
        steps.append(logits)
    full = _next_logits_all(model)(variables, image_tokens, buffer[:, :-1])
    np.testing.assert_allclose(np.stack(steps, 1), full, rtol=1e-5, atol=1e-5)


def reference_beam_search(model, variables, images, beams, length_penalty):
    """Plain beam search per image on uncached float64 log probabilities, with
    Hugging Face's `BeamSearchScorer` rules: extend every live beam by every token and
    rank the 2k best; one that ends joins the finished captions (score / its length,
    start and end tokens included, ** penalty; the k best kept) if it ranks in the
    first k; the k
    best others stay live; stop once k captions are finished and the worst is at
    least the best extension's score / the current length ** penalty."""
    all_image_tokens = image_tokens_of(model, variables, images)
    results = []
    for row in range(images.shape[0]):
        image_tokens = jnp.repeat(all_image_tokens[row : row + 1], beams, 0)
        live = [((SOT,), 0.0)]
        finished = []
        for t in range(1, MAX_LEN):
            # Always `beams` rows (the first repeated): one compile per length.
            prefixes = [p for p, _ in live]
            prefixes += prefixes[:1] * (beams - len(prefixes))
            logprobs = uncached_logprobs(
                model, variables, image_tokens, prefixes, end_last=False
            )
            candidates = [
                (score + logprobs[i, token], prefix + (token,))
                for i, (prefix, score) in enumerate(live)
                for token in range(logprobs.shape[1])
                if np.isfinite(logprobs[i, token])
            ]
            candidates.sort(key=lambda c: -c[0])
            candidates = candidates[: 2 * beams]
            for rank, (score, ids) in enumerate(candidates):
                if ids[-1] == EOT and rank < beams:
                    finished.append((score / (t + 1) ** length_penalty, ids))
            finished = sorted(finished, key=lambda c: -c[0])[:beams]
            live = [(ids, s) for s, ids in candidates if ids[-1] != EOT][:beams]
            best = candidates[0][0] / (t + 1) ** length_penalty
            if len(finished) == beams and finished[-1][0] >= best:
                break
        else:  # out of tokens: the live beams count too, scored over MAX_LEN
            finished += [(s / MAX_LEN**length_penalty, ids) for ids, s in live]
            finished.sort(key=lambda c: -c[0])
        best = finished[0][1]
        results.append(list(best) + [PAD] * (MAX_LEN - len(best)))
    return np.asarray(results)


@pytest.mark.parametrize("beams, penalty", [(3, 1.0), (2, 0.5)])
def test_beam_search_equals_a_plain_beam_search(coca, beams, penalty):
    ids = run(coca, method="beam", num_beams=beams, length_penalty=penalty)
    np.testing.assert_array_equal(
        ids, reference_beam_search(*coca, beams=beams, length_penalty=penalty)
    )


def test_one_beam_without_length_penalty_is_greedy(coca):
    """Up to the last position, where greedy decoding ends the caption and beam
    search (as OpenCLIP's) keeps the live beam's token."""
    beam = run(coca, method="beam", num_beams=1, length_penalty=0.0)
    greedy = run(coca, method="greedy")
    np.testing.assert_array_equal(beam[:, :-1], greedy[:, :-1])
    ended = greedy[:, -1] == PAD
    np.testing.assert_array_equal(beam[ended], greedy[ended])


def test_sampling_filters(coca):
    greedy = run(coca, method="greedy")
    # top_k=1 and a tiny top_p keep only the most likely token: greedy decoding.
    key = jax.random.key(5)
    np.testing.assert_array_equal(run(coca, method="sample", top_k=1, key=key), greedy)
    np.testing.assert_array_equal(
        run(coca, method="sample", top_p=1e-6, key=key), greedy
    )
    # top_k=2: every sampled token is one of the two most likely after its prefix.
    model, variables, images = coca
    image_tokens = image_tokens_of(model, variables, images)
    sampled = [
        run(coca, method="sample", top_k=2, key=jax.random.key(s)) for s in range(4)
    ]
    assert len({s.tobytes() for s in sampled}) > 1  # the key matters
    for ids in sampled:
        for t in range(1, MAX_LEN):
            live = ids[:, t - 1] != EOT
            live &= ids[:, t - 1] != PAD
            if not live.any():
                break
            logprobs = uncached_logprobs(model, variables, image_tokens, ids[:, :t])
            logprobs = logprobs[live]
            top2 = np.argsort(-logprobs, axis=-1)[:, :2]
            assert all(tok in pair for tok, pair in zip(ids[live, t], top2))


def test_sharded_batch_equals_one_device(coca):
    """Eight images split over the 8-device mesh's batch axes give the captions of a
    one-device run, for every method."""
    model, variables, _ = coca
    mesh = sharding.make_mesh((4, 2, 1))
    size = model.config.vision.image_size
    images = jax.random.uniform(jax.random.key(7), (8, size, size, 3)) * 255
    images = images.astype(jnp.uint8)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    for options in (dict(method="greedy"), dict(method="beam", num_beams=2)):
        generator = make_generator(model, mean, std, **IDS, **options)
        expected = np.asarray(generator(variables, images))
        with sharding.use_mesh(mesh):
            placed = jax.device_put(images, sharding.batch_sharding(mesh, 4))
            replicated = jax.device_put(variables, sharding.replicated(mesh))
            got = generator(replicated, placed)
        assert got.sharding.is_equivalent_to(sharding.batch_sharding(mesh, 2), 2)
        np.testing.assert_array_equal(np.asarray(got), expected)


def test_ids_to_texts_cuts_at_the_end_token():
    from jaxclip.data.tokenizer import EOT_TOKEN, SOT_TOKEN, tokenize

    ids = np.asarray(tokenize(["a red circle", "two blue squares!"], 12))
    ids[0, 6:] = 5  # after the end token: ignored
    assert ids_to_texts(ids) == ["a red circle", "two blue squares !"]
    assert ids[0, 0] == SOT_TOKEN and EOT_TOKEN in ids[0]


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(method="nucleus"), "method"),
        (dict(max_len=13), "max_len"),
        (dict(min_len=11), "min_len"),
        (dict(top_p=0.0), "top_p"),
        (dict(temperature=0.0), "temperature"),
        (dict(num_beams=0), "num_beams"),
        (dict(eot_id=100), "eot_id"),
    ],
)
def test_bad_options_are_refused(coca, options, message):
    model = coca[0]
    with pytest.raises(ValueError, match=message):
        make_generator(model, (0.5,) * 3, (0.5,) * 3, **{**IDS, **options})


def test_a_clip_model_is_refused():
    with pytest.raises(ValueError, match="needs a CoCa model"):
        make_generator(create_model("tiny-vit", sharded=False), (0,) * 3, (1,) * 3)


def test_inference_model_generates_and_captions(coca):
    """`InferenceModel.generate` on a uint8 batch and on a list of images equals the
    generator; `jaxclip.caption` decodes its ids; a CLIP model is refused."""
    import jaxclip

    model, variables, _ = coca
    inference = jaxclip.create_model("tiny-coca")
    pixels = np.random.RandomState(0).randint(0, 256, (3, 32, 32, 3), np.uint8)
    generator = make_generator(model, inference.mean, inference.std, **IDS)
    expected = np.asarray(generator(variables, pixels))
    np.testing.assert_array_equal(
        inference.generate(variables, pixels, **IDS), expected
    )
    np.testing.assert_array_equal(
        inference.generate(variables, list(pixels), **IDS), expected
    )
    assert jaxclip.caption(inference, variables, pixels, **IDS) == ids_to_texts(
        expected
    )
    with pytest.raises(ValueError, match="not a CoCa model"):
        jaxclip.create_model("tiny-vit").caption(variables, pixels)
