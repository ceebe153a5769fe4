"""Inference for notebooks: load a model, embed images and texts, classify zero-shot.

    model, variables, preprocess, tokenizer = jaxclip.load("ViT-B-32.safetensors")
    probs = model.classify(variables, ["cat.jpg", "dog.jpg"], ["cat", "dog", "car"])

Parameters are passed explicitly (`variables`), as everywhere in Flax. Images may be
paths, PIL images or arrays of any size and either layout (`jaxclip/preprocess.py` has
the rules); `preprocess` resizes and crops them to [S, S, 3] on the host, and the
jitted encoder normalises them on the device (like the training pipeline). Batches
already normalised as OpenCLIP's preprocess gives them are taken with
`normalized=True`. Inputs are processed in fixed-size batches padded to a power of two,
and models of the same architecture share their jitted encoders, so a notebook
compiles each encoder only a few times.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxclip.convert.files import Weights, load_weights
from jaxclip.convert.siglip import SIGLIP_MEAN, SIGLIP_STD, is_siglip
from jaxclip.data.tokenizer import TokenizerSpec, tokenize
from jaxclip.data.transforms import OPENAI_MEAN, OPENAI_STD
from jaxclip.evaluate.zeroshot import class_embeddings, prompt_texts
from jaxclip.models.build import Encoders, init_variables, make_encoders
from jaxclip.models.build import create_model as create_clip
from jaxclip.models.clip import CLIP
from jaxclip.models.generate import ids_to_texts, make_generator
from jaxclip.models.registry import ModelConfig, get_model_config
from jaxclip.preprocess import (
    ImageLike,
    OpenCLIPPreprocess,
    Preprocess,
    is_single_image,
    pixel_batch,
)

__all__ = [
    "InferenceModel",
    "Loaded",
    "OpenCLIPPreprocess",
    "Preprocess",
    "Tokenizer",
    "caption",
    "create_model",
    "load",
]


@functools.lru_cache(maxsize=16)
def cached_model(
    config: ModelConfig,
    use_logit_bias: bool,
    dtype: str,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> tuple[CLIP, Encoders]:
    """The module and its jitted encoders, shared by every model of the same
    architecture, dtype and pixel statistics in this process: a second `load` of the
    same architecture compiles nothing again (jit keeps one program per batch bucket).
    """
    module = create_clip(
        config, use_logit_bias=use_logit_bias, dtype=dtype, sharded=False
    )
    return module, make_encoders(module, mean, std)


DEFAULT_TEMPLATES = ("a photo of a {}.",)
CLIP_TOKENIZER = TokenizerSpec()  # OpenAI's BPE


class Tokenizer:
    """Texts -> int32 token ids [n, context_length]: OpenAI's CLIP BPE by default
    (with `spec.vocab_size` ids), or the tokenizer `spec` names (a SentencePiece file,
    a model directory's own).

    `spec=None` is a model without a known tokenizer (a SigLIP architecture created
    by name): calling it raises, rather than feed the model another vocabulary's ids.
    """

    def __init__(
        self, context_length: int, spec: TokenizerSpec | None = CLIP_TOKENIZER
    ):
        self.context_length = context_length
        self.spec = spec

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        if self.spec is None:
            raise ValueError(
                "this model has no tokenizer: SigLIP models use their own "
                "(SentencePiece, Gemma); load the model from an HF directory that holds "
                "the tokenizer's files, or pass tokenizer=TokenizerSpec(<directory>)"
            )
        if isinstance(texts, str):
            texts = [texts]
        if self.spec.kind == "clip":
            return tokenize(texts, self.context_length, self.spec.vocab_size)
        return self.spec(list(texts), self.context_length)

    def __repr__(self) -> str:
        kind = None if self.spec is None else self.spec.kind
        return f"Tokenizer({kind!r}, context_length={self.context_length})"


class InferenceModel:
    """A CLIP architecture with jitted, batched encoders and zero-shot helpers."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        name: str | None = None,
        logit_bias: bool = False,
        mean: Sequence[float] = OPENAI_MEAN,
        std: Sequence[float] = OPENAI_STD,
        resize_mode: str = "shortest",
        interpolation: str = "bicubic",
        tokenizer: TokenizerSpec | None = CLIP_TOKENIZER,
        dtype: Any = jnp.float32,
        batch_size: int = 64,
    ):
        self.config = config
        self.name = name
        self.module, self.encoders = cached_model(
            config,
            logit_bias,
            jnp.dtype(dtype).name,
            tuple(float(x) for x in mean),
            tuple(float(x) for x in std),
        )
        self.preprocess = Preprocess(
            config.vision.image_size, resize_mode, interpolation
        )
        # OpenCLIP's form: normalised float32 [3, S, S] (encode with normalized=True).
        self.openclip_preprocess = OpenCLIPPreprocess(self.preprocess, mean, std)
        if tokenizer is not None:  # the CLIP BPE sized to the text tower
            tokenizer = tokenizer.for_vocabulary(config.text.vocab_size)
        self.tokenizer = Tokenizer(config.text.context_length, tokenizer)
        self.batch_size = batch_size
        self.mean, self.std = tuple(mean), tuple(std)
        self._generators: dict = {}  # caption decoding options -> jitted generator

    def __repr__(self) -> str:
        return f"InferenceModel({self.name or self.config})"

    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    @property
    def context_length(self) -> int:
        return self.config.text.context_length

    def init(self, seed: int = 0) -> dict:
        """Random variables (for tests and trying things out)."""
        return init_variables(self.module, jax.random.key(seed))

    # --- Encoders.

    def encode_image(
        self,
        variables: dict,
        images: Any,
        normalize: bool = True,
        *,
        normalized: bool = False,
    ) -> np.ndarray:
        """Embeddings float32 [n, embed_dim] (unit norm unless normalize=False).

        `images`: one image or a list of them (paths, PIL images, arrays of any size,
        uint8 or float in [0, 1], channels last or first), or one batch array
        `[n, H, W, C]` / `[n, C, H, W]`. Batches at the model's size S go to the device
        as they are; others are resized and cropped per image (`preprocess`). Float
        pixels are never rounded. `normalized=True`: the batch is already normalised
        with the model's mean and std, as `openclip_preprocess` (or OpenCLIP's own
        preprocess) gives it, and must be S x S.
        """
        return self._over_images(
            functools.partial(self.encoders.images, normalize=normalize),
            variables,
            images,
            normalized,
        )

    def _over_images(self, fn, variables, images, normalized: bool) -> np.ndarray:
        """`fn(variables, pixels, pixels=kind)` over `images` (the forms
        `encode_image` takes) in padded batches."""
        ready = pixel_batch(images, self.image_size, normalized)
        if ready is not None:
            pixels, kind = ready
            run = functools.partial(fn, pixels=kind)
            return self._batched(run, variables, pixels, np.asarray)
        if is_single_image(images):
            images = [images]

        def run(variables, pixels):
            return fn(
                variables,
                pixels,
                pixels="uint8" if pixels.dtype == jnp.uint8 else "unit",
            )

        return self._batched(run, variables, images, self._preprocess_batch)

    def _preprocess_batch(self, images: Sequence[ImageLike]) -> np.ndarray:
        """`preprocess` each image; uint8 unless one is float, then all float32 in
        [0, 1] (uint8 / 255 joins them exactly as the device would compute it)."""
        outputs = [self.preprocess(image) for image in images]
        if all(out.dtype == np.uint8 for out in outputs):
            return np.stack(outputs)
        return np.stack(
            [
                out.astype(np.float32) / np.float32(255)
                if out.dtype == np.uint8
                else out
                for out in outputs
            ]
        )

    def encode_text(
        self,
        variables: dict,
        texts: str | Sequence[str] | np.ndarray,
        normalize: bool = True,
    ) -> np.ndarray:
        """Embeddings float32 [n, embed_dim] of texts or of token ids [n, context_length]."""
        if isinstance(texts, str):
            texts = [texts]
        is_tokens = isinstance(texts, np.ndarray | jax.Array) and np.issubdtype(
            texts.dtype, np.integer
        )
        if is_tokens and (texts.ndim != 2 or texts.shape[1] != self.context_length):
            raise ValueError(
                f"token ids must be [n, {self.context_length}], got {texts.shape}"
            )

        def batch(chunk):
            return np.asarray(chunk, np.int32) if is_tokens else self.tokenizer(chunk)

        encode = functools.partial(self.encoders.texts, normalize=normalize)
        return self._batched(encode, variables, texts, batch)

    def _batched(self, encode, variables, items, make_batch) -> np.ndarray:
        """Run `encode` over `items` in padded batches; returns NumPy float32."""
        outputs = []
        for start in range(0, len(items), self.batch_size):
            chunk = make_batch(items[start : start + self.batch_size])
            count = len(chunk)
            padded_size = min(self.batch_size, 2 ** math.ceil(math.log2(count)))
            pad = [(0, padded_size - count)] + [(0, 0)] * (chunk.ndim - 1)
            embeddings = encode(variables, jnp.asarray(np.pad(chunk, pad)))
            outputs.append(np.asarray(embeddings)[:count])
        if not outputs:
            return np.zeros((0, self.config.embed_dim), np.float32)
        return np.concatenate(outputs)

    # --- Captions (CoCa).

    def generate(
        self,
        variables: dict,
        images: Any,
        *,
        normalized: bool = False,
        seed: int = 0,
        **decoding: Any,
    ) -> np.ndarray:
        """Caption token ids int32 [n, max_len] of a CoCa model (images in any form
        `encode_image` takes). `decoding`: method ("greedy", "beam", "sample"),
        max_len, min_len, num_beams, length_penalty, top_k, top_p, temperature
        (`jaxclip.models.generate.Decoding`, OpenCLIP's defaults); `seed` draws
        the samples."""
        generator = self._generator(tuple(sorted(decoding.items())))
        key = jax.random.key(seed)
        run = functools.partial(generator, key=key)
        ids = self._over_images(run, variables, images, normalized)
        return ids.astype(np.int32)

    def caption(self, variables: dict, images: Any, **options: Any) -> list[str]:
        """Captions of images by a CoCa model: `generate`'s ids, decoded."""
        return ids_to_texts(self.generate(variables, images, **options))

    def _generator(self, decoding: tuple[tuple[str, Any], ...]):
        if not self.config.is_coca:
            raise ValueError(f"{self} is not a CoCa model: it has no caption decoder")
        if decoding not in self._generators:
            self._generators[decoding] = make_generator(
                self.module, self.mean, self.std, **dict(decoding)
            )
        return self._generators[decoding]

    # --- Zero-shot classification.

    def zero_shot_classifier(
        self,
        variables: dict,
        classnames: Sequence[str],
        templates: Sequence[str] = DEFAULT_TEMPLATES,
    ) -> np.ndarray:
        """Class embeddings float32 [num_classes, embed_dim]: per class, the unit-norm
        mean of its prompts' embeddings (each template filled with the class name),
        the prompts tokenized with the model's own tokenizer."""
        prompts = prompt_texts(list(classnames), list(templates))
        classifier = class_embeddings(
            self.encode_text(variables, prompts), len(classnames)
        )
        return np.asarray(classifier, np.float32)

    def classify(
        self,
        variables: dict,
        images: Any,
        classes: Sequence[str] | np.ndarray,
        templates: Sequence[str] = DEFAULT_TEMPLATES,
    ) -> np.ndarray:
        """Class probabilities float32 [num_images, num_classes].

        `classes` is a list of class names (prompts come from `templates`) or a
        classifier from `zero_shot_classifier`. CLIP models give a softmax over the
        classes; SigLIP models (with a logit bias) an independent sigmoid per class.
        """
        if isinstance(classes, np.ndarray | jax.Array):
            classifier = np.asarray(classes, np.float32)
        else:
            classifier = self.zero_shot_classifier(variables, classes, templates)
        image_emb = self.encode_image(variables, images)
        return self._probabilities(variables, image_emb @ classifier.T)

    def predict(self, variables: dict, images: Any, texts: Sequence[str]) -> np.ndarray:
        """Probability float32 [num_images, num_texts] that each text describes each image."""
        image_emb = self.encode_image(variables, images)
        text_emb = self.encode_text(variables, texts)
        return self._probabilities(variables, image_emb @ text_emb.T)

    def _probabilities(self, variables: dict, similarity: np.ndarray) -> np.ndarray:
        params = variables["params"]
        logits = np.exp(np.float32(params["logit_scale"])) * similarity
        if "logit_bias" in params:
            return np.asarray(jax.nn.sigmoid(logits + np.float32(params["logit_bias"])))
        return np.asarray(jax.nn.softmax(logits, axis=-1))


# ---------------------------------------------------------------------------
# Entry points.
# ---------------------------------------------------------------------------


class Loaded(NamedTuple):
    """What `load` returns; unpacks as `model, variables, preprocess, tokenizer`."""

    model: InferenceModel
    variables: dict
    preprocess: Preprocess
    tokenizer: Tokenizer


def create_model(
    name: str | ModelConfig,
    *,
    logit_bias: bool = False,
    dtype: Any = "float32",
    batch_size: int = 64,
) -> InferenceModel:
    """The registered architecture `name` (weights: `model.init(seed)` or `load`).

    A SigLIP architecture gets SigLIP's pixel statistics and squashing resize, and
    no tokenizer (its vocabulary's files are not bundled; `load` an HF directory)."""
    config = get_model_config(name) if isinstance(name, str) else name
    if is_siglip(config):
        preprocess = dict(mean=SIGLIP_MEAN, std=SIGLIP_STD, resize_mode="squash")
        preprocess["tokenizer"] = None
    else:
        preprocess = {}
    return InferenceModel(
        config,
        name=name if isinstance(name, str) else None,
        logit_bias=logit_bias,
        dtype=dtype,
        batch_size=batch_size,
        **preprocess,
    )


def caption(
    model: InferenceModel, variables: dict, images: Any, **options: Any
) -> list[str]:
    """Captions of images by a CoCa model (`load` one): `model.caption`. `options`:
    the decoding (method "greedy", "beam" or "sample", max_len, min_len, num_beams,
    length_penalty, top_k, top_p, temperature; `jaxclip.models.generate.Decoding`)
    and `seed`.

        model, variables, preprocess, tokenizer = jaxclip.load("coca_dir")
        jaxclip.caption(model, variables, ["cat.jpg"], method="beam")
    """
    return model.caption(variables, images, **options)


def load(
    path: str | os.PathLike,
    name: str | ModelConfig | None = None,
    *,
    dtype: Any = "float32",
    batch_size: int = 64,
    ema: bool = False,
) -> Loaded:
    """Model, variables, preprocess and tokenizer from a jaxclip checkpoint, an OpenCLIP
    or OpenAI weights file or directory, a Hugging Face CLIPModel or SiglipModel
    directory (its tokenizer too, where it holds the files), or `hf-hub:ORG/REPO`.
    `name` checks (or sets) the architecture; see `load_weights`. `ema=True` loads a
    jaxclip run's EMA of the parameters instead of the parameters.

    `dtype` is the compute dtype (e.g. "bfloat16" on accelerators); the parameters
    stay float32.
    """
    weights: Weights = load_weights(path, name, ema=ema)
    model = InferenceModel(
        weights.config,
        name=weights.name,
        logit_bias=weights.logit_bias,
        mean=weights.mean,
        std=weights.std,
        resize_mode=weights.resize_mode,
        interpolation=weights.interpolation,
        tokenizer=weights.tokenizer,
        dtype=dtype,
        batch_size=batch_size,
    )
    variables = jax.device_put(weights.variables)
    return Loaded(model, variables, model.preprocess, model.tokenizer)
