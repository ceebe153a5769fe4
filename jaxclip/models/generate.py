"""Caption generation for CoCa: greedy, beam search, and top-k / top-p sampling.

Everything runs in one jitted program with a key/value cache: the image is encoded
once, its tokens' keys and values are projected once per decoder layer, and each new
token runs the text tower and the decoder on that token alone, attending to the cached
keys and values of the ones before it (`CoCa.decode_step`). The batch keeps whatever
sharding its images have: every row decodes on the devices that hold it.

    ids = generate(model, variables, images, method="beam", num_beams=6)
    texts = ids_to_texts(ids)

The options and their defaults are OpenCLIP's `CoCa.generate` where it has them
(`seq_len=30`, `min_seq_len=5`; `Decoding`). Rows of the result hold the start
token, the generated ids, the end token (always: the last position is forced to it),
then padding.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxclip.data.tokenizer import EOT_TOKEN, SOT_TOKEN, default_tokenizer
from jaxclip.models.build import model_pixels
from jaxclip.models.coca import PAD_ID, CoCa

METHODS = ("greedy", "beam", "sample")


@dataclasses.dataclass(frozen=True)
class Decoding:
    """How to generate.

    - `method`: "greedy" (the most likely token each time), "beam" (beam search with
      `num_beams` beams, Hugging Face's rules: a finished caption is scored by its
      summed log probability over its length (start and end tokens included) to
      the power `length_penalty`; `_beam_search`), or "sample"
      (from the softmax of the logits over `temperature`, restricted to the `top_k`
      most likely tokens (0: all) and to the smallest set whose probability reaches
      `top_p` (1.0: all)).
    - `max_len`: tokens per row, start and end tokens included (OpenCLIP's `seq_len`);
      at most the model's context length.
    - `min_len`: the end token is refused before this many tokens (start token
      included; OpenCLIP's `min_seq_len`).
    """

    method: str = "greedy"
    max_len: int = 30
    min_len: int = 5
    num_beams: int = 6
    length_penalty: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    temperature: float = 1.0
    sot_id: int = SOT_TOKEN
    eot_id: int = EOT_TOKEN
    pad_id: int = PAD_ID

    def check(self, context_length: int, vocab_size: int) -> None:
        """Raise ValueError for options that cannot work with this model."""
        problems = []
        if self.method not in METHODS:
            problems.append(f"method {self.method!r} is not one of {METHODS}")
        if not 2 <= self.max_len <= context_length:
            problems.append(
                f"max_len {self.max_len} must be in [2, context_length "
                f"{context_length}]"
            )
        if not 0 <= self.min_len <= self.max_len:
            problems.append(f"min_len {self.min_len} must be in [0, max_len]")
        if self.num_beams < 1 or 2 * self.num_beams > vocab_size:
            problems.append(f"num_beams {self.num_beams} must be in [1, vocab / 2]")
        if not 0 <= self.top_k <= vocab_size:
            problems.append(f"top_k {self.top_k} must be in [0, {vocab_size}]")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p {self.top_p} must be in (0, 1]")
        if not self.temperature > 0.0:
            problems.append(f"temperature {self.temperature} must be positive")
        for name in ("sot_id", "eot_id", "pad_id"):
            if not 0 <= getattr(self, name) < vocab_size:
                problems.append(
                    f"{name} {getattr(self, name)} is not in the vocabulary"
                )
        if problems:
            raise ValueError("caption decoding: " + "; ".join(problems))


def decoding_options(model: CoCa, **options: Any) -> Decoding:
    """`Decoding(**options)`, checked against the model."""
    if not isinstance(model, CoCa):
        raise ValueError(
            f"caption generation needs a CoCa model, not {type(model).__name__}"
        )
    decoding = Decoding(**options)
    text = model.config.text
    decoding.check(text.context_length, text.vocab_size)
    return decoding


def generate(
    model: CoCa,
    variables: dict[str, Any],
    images: jax.Array,
    *,
    key: jax.Array | None = None,
    **options: Any,
) -> jax.Array:
    """Token ids int32 [batch, max_len] of the captions of normalised images
    [batch, H, W, 3] (see `Decoding` for `options`; `key` draws the samples of
    `method="sample"`, default `jax.random.key(0)`). Call it inside `jax.jit`
    (`make_generator` does), or it runs op by op."""
    decoding = decoding_options(model, **options)
    _, image_tokens = model.apply(variables, images, method=model.encode_image)
    cached = model.clone(cached=True)
    if decoding.method == "beam":
        return _beam_search(cached, variables, image_tokens, decoding)
    key = jax.random.key(0) if key is None else key
    return _sample(cached, variables, image_tokens, decoding, key)


def make_generator(
    model: CoCa, mean: Sequence[float], std: Sequence[float], **options: Any
) -> Callable[..., jax.Array]:
    """`generate`, jitted, on pixels: `fn(variables, images, key=None,
    pixels="uint8") -> ids`, images `[n, S, S, 3]` normalised on the device with
    `mean` and `std` (`pixels` as in `jaxclip.models.build.Encoders`)."""
    decoding_options(model, **options)  # refuse bad options now, not at the call
    mean, std = tuple(mean), tuple(std)

    @functools.partial(jax.jit, static_argnames="pixels")
    def generate_from_pixels(variables, images, key=None, pixels="uint8"):
        normalized = model_pixels(images, pixels, mean, std, model.dtype)
        return generate(model, variables, normalized, key=key, **options)

    return generate_from_pixels


def ids_to_texts(
    ids: Any, decode: Callable[[list[int]], str] | None = None
) -> list[str]:
    """The caption of each row of token ids: the ids between the start and the end
    token, decoded (`decode`: default CLIP's BPE) and stripped."""
    decode = decode or default_tokenizer().decode
    texts = []
    for row in np.asarray(ids).tolist():
        if row and row[0] == SOT_TOKEN:
            row = row[1:]
        if EOT_TOKEN in row:
            row = row[: row.index(EOT_TOKEN)]
        texts.append(" ".join(decode(row).split()))
    return texts


# ---------------------------------------------------------------------------
# The cache.
# ---------------------------------------------------------------------------


def _start(
    cached: CoCa, variables: dict, image_tokens: jax.Array, decoding: Decoding
) -> tuple[jax.Array, jax.Array, Any]:
    """The token buffer [rows, max_len] (the start token, then padding), the logits
    after the start token [rows, vocab], and the cache holding its keys and values
    and the image tokens'."""
    rows = image_tokens.shape[0]
    buffer = jnp.full((rows, decoding.max_len), decoding.pad_id, jnp.int32)
    buffer = buffer.at[:, 0].set(decoding.sot_id)
    logits, mutated = cached.apply(
        variables,
        buffer[:, :1],
        0,
        buffer,
        image_tokens,
        method=cached.decode_step,
        mutable=["cache"],
    )
    return buffer, logits[:, -1], mutated["cache"]


def _step(
    cached: CoCa, variables: dict, cache: Any, buffer: jax.Array, position: jax.Array
) -> tuple[jax.Array, Any]:
    """The logits after the token at `position` of the buffer [rows, vocab], and the
    cache with its keys and values added."""
    tokens = jax.lax.dynamic_slice_in_dim(buffer, position, 1, axis=1)
    logits, mutated = cached.apply(
        {**variables, "cache": cache},
        tokens,
        position,
        buffer,
        method=cached.decode_step,
        mutable=["cache"],
    )
    return logits[:, -1], mutated["cache"]


def _reorder_rows(cache: Any, rows: jax.Array) -> Any:
    """The cache of the buffer rows `rows` (beam search): every cached array is
    stacked over layers with the rows on its axis 1. The image tokens' keys and
    values are the same for every beam of an image and stay as they are."""

    def take(path, leaf):
        if path[-1].key.startswith("cross_"):
            return leaf
        return jnp.take(leaf, rows, axis=1)

    return jax.tree_util.tree_map_with_path(take, cache)


# ---------------------------------------------------------------------------
# Choosing the next token.
# ---------------------------------------------------------------------------


def _allowed_logits(
    logits: jax.Array, position: jax.Array, decoding: Decoding, end_last: bool = True
) -> jax.Array:
    """float32 logits of the token at `position`: no end token before `min_len`,
    and (`end_last`) only the end token at the last position."""
    logits = logits.astype(jnp.float32)
    vocab = jnp.arange(logits.shape[-1])
    is_end = vocab == decoding.eot_id
    logits = jnp.where(is_end & (position < decoding.min_len), -jnp.inf, logits)
    if not end_last:
        return logits
    last = position == decoding.max_len - 1
    return jnp.where(~is_end & last, -jnp.inf, logits)


def _filtered(logits: jax.Array, decoding: Decoding) -> jax.Array:
    """Sampling logits: over the temperature, the top-k and top-p kept (others -inf)."""
    logits = logits / decoding.temperature
    if decoding.top_k:
        kth = jax.lax.top_k(logits, decoding.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if decoding.top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the likelier tokens
        kept = jnp.where(before < decoding.top_p, ordered, jnp.inf)
        threshold = jnp.min(kept, axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def _sample(
    cached: CoCa,
    variables: dict,
    image_tokens: jax.Array,
    decoding: Decoding,
    key: jax.Array,
) -> jax.Array:
    """Greedy decoding or sampling: one token per row each step, padding once a row
    has ended; stops when every row has."""
    buffer, logits, cache = _start(cached, variables, image_tokens, decoding)
    done = jnp.zeros(buffer.shape[0], bool)

    def unfinished(carry) -> jax.Array:
        position, done = carry[0], carry[4]
        return (position < decoding.max_len) & ~jnp.all(done)

    def next_token(carry):
        position, buffer, logits, cache, done, key = carry
        key, draw = jax.random.split(key)
        logits = _allowed_logits(logits, position, decoding)
        if decoding.method == "greedy":
            token = jnp.argmax(logits, axis=-1)
        else:
            token = jax.random.categorical(draw, _filtered(logits, decoding))
        token = jnp.where(done, decoding.pad_id, token).astype(jnp.int32)
        buffer = buffer.at[:, position].set(token)
        done = done | (token == decoding.eot_id)
        logits, cache = _step(cached, variables, cache, buffer, position)
        return position + 1, buffer, logits, cache, done, key

    carry = (jnp.int32(1), buffer, logits, cache, done, key)
    return jax.lax.while_loop(unfinished, next_token, carry)[1]


class _Beams(NamedTuple):
    """Beam search's loop state: k beams per image, rows `image * k + beam`."""

    position: jax.Array  # int32: the position the next tokens go to
    buffer: jax.Array  # int32 [batch * k, max_len]: the live beams' tokens
    logits: jax.Array  # [batch * k, vocab]: after each live beam's last token
    cache: Any  # the live beams' keys and values
    scores: jax.Array  # float32 [batch, k]: their summed log probabilities
    finished: jax.Array  # int32 [batch, k, max_len]: the finished captions
    finished_scores: jax.Array  # float32 [batch, k]: theirs, normalised (-inf: none)
    done: jax.Array  # bool [batch]: the image's finished captions are final


def _beam_search(
    cached: CoCa, variables: dict, image_tokens: jax.Array, decoding: Decoding
) -> jax.Array:
    """Beam search with Hugging Face's rules (`BeamSearchScorer`, which OpenCLIP's
    CoCa uses): each step extends every live beam of an image by every token and
    ranks the 2k best extensions; one that ends joins the image's finished captions
    if it ranks in the first k (the k best by normalised score are kept), the k best
    others live on. An image is done, and its captions fixed, once it has k finished
    captions and the worst is at least the best extension's summed log probability
    over its length to the power `length_penalty` (Hugging Face's default
    `early_stopping=False` test). At `max_len`, the live beams of an image not done
    join its finished captions as they are (no end token), scored over `max_len`.
    Returns each image's best finished caption."""
    beams, max_len = decoding.num_beams, decoding.max_len
    buffer, logits, cache = _start(cached, variables, image_tokens, decoding)
    batch, vocab = logits.shape
    first_row = jnp.arange(batch)[:, None] * beams
    in_first_k = jnp.arange(2 * beams) < beams
    # k rows per image; only beam 0 is live at first.
    start = _Beams(
        position=jnp.int32(1),
        buffer=jnp.repeat(buffer, beams, axis=0),
        logits=jnp.repeat(logits, beams, axis=0),
        cache=jax.tree.map(functools.partial(jnp.repeat, repeats=beams, axis=1), cache),
        scores=jnp.broadcast_to(
            jnp.where(jnp.arange(beams) == 0, 0.0, -jnp.inf), (batch, beams)
        ),
        finished=jnp.full((batch, beams, max_len), decoding.pad_id, jnp.int32),
        finished_scores=jnp.full((batch, beams), -jnp.inf),
        done=jnp.zeros(batch, bool),
    )

    def unfinished(state: _Beams) -> jax.Array:
        return (state.position < max_len) & ~jnp.all(state.done)

    def extend(state: _Beams) -> _Beams:
        position = state.position
        # Normalised before the end token is refused, as Hugging Face's `generate`.
        logprobs = jax.nn.log_softmax(state.logits.astype(jnp.float32))
        logprobs = _allowed_logits(logprobs, position, decoding, end_last=False)
        candidates = state.scores[..., None] + logprobs.reshape(batch, beams, vocab)
        top, index = jax.lax.top_k(candidates.reshape(batch, -1), 2 * beams)
        parent, token = index // vocab, (index % vocab).astype(jnp.int32)
        ids = jnp.take_along_axis(
            state.buffer.reshape(batch, beams, max_len), parent[..., None], axis=1
        )
        ids = jnp.where(jnp.arange(max_len) == position, token[..., None], ids)
        ends = token == decoding.eot_id
        # Finished captions: the k best of those kept and those ending now, scored
        # over their length (start and end tokens included).
        length = (position + 1).astype(jnp.float32) ** decoding.length_penalty
        joins = ends & in_first_k & ~state.done[:, None]
        pooled = jnp.concatenate(
            [state.finished_scores, jnp.where(joins, top / length, -jnp.inf)], axis=1
        )
        finished_scores, keep = jax.lax.top_k(pooled, beams)
        finished = jnp.take_along_axis(
            jnp.concatenate([state.finished, ids], axis=1), keep[..., None], axis=1
        )
        worst = finished_scores[:, -1]
        done = state.done | (jnp.isfinite(worst) & (worst >= top[:, 0] / length))
        # Live beams: the k best extensions that do not end.
        scores, keep = jax.lax.top_k(jnp.where(ends, -jnp.inf, top), beams)
        buffer = jnp.take_along_axis(ids, keep[..., None], axis=1)
        buffer = buffer.reshape(batch * beams, max_len)
        rows = (first_row + jnp.take_along_axis(parent, keep, axis=1)).reshape(-1)
        cache = _reorder_rows(state.cache, rows)
        logits, cache = _step(cached, variables, cache, buffer, position)
        return _Beams(
            position + 1, buffer, logits, cache, scores, finished, finished_scores, done
        )

    end = jax.lax.while_loop(unfinished, extend, start)
    return _best_caption(end, decoding.length_penalty)


def _best_caption(end: _Beams, length_penalty: float) -> jax.Array:
    """Each image's best finished caption `[batch, max_len]` once the beam search
    stops. Images not done when the tokens ran out: their live beams are candidates
    too, scored over `max_len`."""
    batch, beams, max_len = end.finished.shape
    live_scores = end.scores / jnp.float32(max_len) ** length_penalty
    pooled = jnp.concatenate(
        [end.finished_scores, jnp.where(end.done[:, None], -jnp.inf, live_scores)],
        axis=1,
    )
    best = jnp.argmax(pooled, axis=1)
    candidates = jnp.concatenate(
        [end.finished, end.buffer.reshape(batch, beams, max_len)], axis=1
    )
    return jnp.take_along_axis(candidates, best[:, None, None], axis=1)[:, 0]
