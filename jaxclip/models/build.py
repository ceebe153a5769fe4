"""The one place a CLIP model and its jitted functions are built.

Every entry point goes through here: the trainer and `jaxclip.aot` (`model_from_config`),
standalone evaluation, inference, the converters and `python -m jaxclip.models`
(`create_model`). So the architecture, the scan choice and the encoders are the same
wherever a model runs.

    model = create_model("ViT-B-32", dtype="bfloat16")
    variables = init_variables(model, jax.random.key(0))
    encoders = make_encoders(model, mean, std)
    embeddings = encoders.images(variables, uint8_images)   # float32, unit norm

Nothing here enters a mesh: the caller that owns the mesh (the trainer, the evaluation
command) enters it once, around everything it runs (`sharding.use_mesh`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxclip.data.transforms import normalize_images
from jaxclip.models.clip import CLIP
from jaxclip.models.coca import CoCa
from jaxclip.models.registry import ModelConfig, get_model_config


def use_scan(
    requested: bool | None, platform: str | None = None, sharded: bool = True
) -> bool:
    """Whether layer stacks run as a loop; `None` (the default) picks per platform.

    Automatic choice for training (`sharded`): scanned on GPUs and TPUs, where deep
    models compile far faster; unrolled on the CPU, where train steps run faster and
    even large models compile quickly (docs/performance.md has the measurements).
    A model that runs on one device (`sharded=False`: inference) is scanned: its
    encoders compile several times faster, on the CPU too.

    And unrolled on multi-device CPU whatever was asked: XLA:CPU can start a collective
    inside a while loop (the scanned layers) and one outside it in different orders on
    different devices, which deadlocks a sharded step at random. Unrolling gives the
    same parameters and numbers, so CPU runs with several devices unroll, and say so.
    """
    platform = platform or jax.default_backend()
    if requested is None:
        return platform != "cpu" or not sharded
    if requested and sharded and platform == "cpu" and jax.device_count() > 1:
        if jax.process_index() == 0:
            print(
                f"model.scan=True runs unrolled on {jax.device_count()} CPU devices "
                "(XLA:CPU can deadlock on collectives inside loops); same parameters"
            )
        return False
    return requested


def create_model(
    arch: str | ModelConfig,
    *,
    use_logit_bias: bool = False,
    dtype: Any = jnp.float32,
    scan: bool | None = None,
    remat: str = "none",
    platform: str | None = None,
    sharded: bool = True,
    patch_dropout: float = 0.0,
) -> CLIP | CoCa:
    """The CLIP module for a registered name or a `ModelConfig` (`CoCa` for a config
    with a `decoder`).

    `use_logit_bias` adds SigLIP's learned logit bias; `patch_dropout` drops that
    fraction of a ViT's patch tokens in training (`CLIP`); `scan=None` picks per
    platform (`use_scan`); `platform` is where it will run (default: JAX's backend;
    `jaxclip.aot` says 'tpu'); `sharded=False` for a model that runs on one device
    (inference) or only gives shapes (converters).
    """
    config = get_model_config(arch) if isinstance(arch, str) else arch
    if config.is_coca:
        if patch_dropout:
            raise ValueError(f"patch_dropout={patch_dropout}: CoCa has none here")
        return CoCa(
            config,
            use_logit_bias=use_logit_bias,
            dtype=jnp.dtype(dtype),
            scan=use_scan(scan, platform, sharded),
            remat=remat,
        )
    return CLIP(
        config,
        use_logit_bias=use_logit_bias,
        dtype=jnp.dtype(dtype),
        scan=use_scan(scan, platform, sharded),
        remat=remat,
        patch_dropout=patch_dropout,
    )


def model_from_config(
    config: ml_collections.ConfigDict, platform: str | None = None
) -> CLIP:
    """The model a training config describes: `model.*` (patch dropout included),
    plus a logit bias for `loss.name='siglip'`."""
    return create_model(
        config.model.name,
        use_logit_bias=config.loss.name == "siglip",
        dtype=config.model.dtype,
        scan=config.model.scan,
        remat=config.model.remat,
        platform=platform,
        patch_dropout=config.model.patch_dropout,
    )


def example_inputs(model: CLIP, batch_size: int = 1) -> tuple[jax.Array, jax.Array]:
    """Zero images `[n, S, S, 3]` and tokens `[n, L]` of the model's input shapes."""
    size = model.config.vision.image_size
    length = model.config.text.context_length
    return (
        jnp.zeros((batch_size, size, size, 3), jnp.float32),
        jnp.zeros((batch_size, length), jnp.int32),
    )


def strip_axis_metadata(tree: Any) -> Any:
    """The arrays (or shapes) of a tree whose leaves carry logical-axis metadata.

    Unlike `nn.meta.unbox` it adds no sharding constraint, which outside a jitted
    function (on shapes, or under `sharding.use_mesh`) would fail or copy."""

    def strip(leaf: Any) -> Any:
        return leaf.unbox(apply_constraint=False) if is_boxed(leaf) else leaf

    def is_boxed(leaf: Any) -> bool:
        return isinstance(leaf, nn.Partitioned)

    return jax.tree.map(strip, tree, is_leaf=is_boxed)


def init_variables(model: CLIP, rng: jax.Array) -> dict:
    """Fresh variables (`params`, and `batch_stats` for ResNets), unboxed."""
    return strip_axis_metadata(jax.jit(model.init)(rng, *example_inputs(model)))


def abstract_variables(model: CLIP) -> dict:
    """The variables' shapes and dtypes (`jax.eval_shape`: nothing is allocated)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), *example_inputs(model))
    return strip_axis_metadata(shapes)


def count_params(params: Any) -> int:
    """Number of scalars in a (possibly abstract or boxed) parameter tree."""
    leaves = jax.tree.leaves(strip_axis_metadata(params))
    return sum(math.prod(x.shape) for x in leaves)


def parameter_counts(model: CLIP | CoCa) -> dict[str, int]:
    """{visual, text, total} parameter counts, and `text_decoder` for CoCa; `total`
    includes the logit scale (and bias), as OpenCLIP counts it."""
    params = abstract_variables(model)["params"]
    towers = ("visual", "text", "text_decoder") if "text_decoder" in params else ()
    return {
        "visual": count_params(params["visual"]),
        "text": count_params(params["text"]),
        **{tower: count_params(params[tower]) for tower in towers[2:]},
        "total": count_params(params),
    }


class Encoders(NamedTuple):
    """Jitted encoders, float32 embeddings `[n, embed_dim]`, unit norm unless
    `normalize=False`:

    - `images(variables, images, normalize=True, pixels="uint8")`: `[n, S, S, 3]`
      pixels, normalised on the device with the model's mean and std: uint8
      (`pixels="uint8"`), float in [0, 1] (`"unit"`), or already normalised
      (`"normalized"`);
    - `texts(variables, tokens, normalize=True)`: int32 `[n, L]`.
    """

    images: Callable[..., jax.Array]
    texts: Callable[..., jax.Array]


def embedding_of(encoded: jax.Array | tuple[jax.Array, jax.Array]) -> jax.Array:
    """The embeddings out of an encoder's result: CoCa's encoders also return the
    tokens its decoder reads, `(embeddings, tokens)`."""
    return encoded[0] if isinstance(encoded, tuple) else encoded


def model_pixels(
    images: jax.Array,
    pixels: str,
    mean: Sequence[float],
    std: Sequence[float],
    dtype: Any,
) -> jax.Array:
    """The model's input, in `dtype`, from images `[n, S, S, 3]` of the kind `pixels`
    (see `Encoders`): uint8, float in [0, 1] ("unit"), or already "normalized"."""
    if pixels == "normalized":
        return images.astype(dtype)
    scale = 255.0 if pixels == "uint8" else 1.0
    return normalize_images(images, tuple(mean), tuple(std), dtype, scale)


def make_encoders(
    model: CLIP | CoCa, mean: Sequence[float], std: Sequence[float]
) -> Encoders:
    """The model's two encoders, jitted (see `Encoders`)."""
    mean, std = tuple(mean), tuple(std)

    @functools.partial(jax.jit, static_argnames=("normalize", "pixels"))
    def encode_images(variables, images, normalize=True, pixels="uint8"):
        images = model_pixels(images, pixels, mean, std, model.dtype)
        embeddings = model.apply(
            variables, images, normalize=normalize, method=model.encode_image
        )
        return embedding_of(embeddings).astype(jnp.float32)

    @functools.partial(jax.jit, static_argnames="normalize")
    def encode_texts(variables, tokens, normalize=True):
        embeddings = model.apply(
            variables, tokens, normalize=normalize, method=model.encode_text
        )
        return embedding_of(embeddings).astype(jnp.float32)

    return Encoders(encode_images, encode_texts)
