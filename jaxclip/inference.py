"""Inference for notebooks: load a model, embed images and texts, classify zero-shot.

    model, variables, preprocess, tokenizer = jaxclip.load("ViT-B-32.safetensors")
    probs = model.classify(variables, ["cat.jpg", "dog.jpg"], ["cat", "dog", "car"])

Parameters are passed explicitly (`variables`), as everywhere in Flax. Images may be
paths, PIL images or NumPy arrays of any size; `preprocess` resizes and crops them to
uint8 [S, S, 3] on the host, and the jitted encoder normalises them on the device
(like the training pipeline). Inputs are processed in fixed-size batches padded to a
power of two, so a notebook compiles each encoder only a few times.
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
from PIL import Image

from jaxclip.convert.files import Weights, load_weights
from jaxclip.data.tokenizer import tokenize
from jaxclip.data.transforms import OPENAI_MEAN, OPENAI_STD
from jaxclip.evaluate.zeroshot import zero_shot_classifier
from jaxclip.models.build import create_model as create_clip
from jaxclip.models.build import init_variables, make_encoders
from jaxclip.models.registry import ModelConfig, get_model_config

DEFAULT_TEMPLATES = ("a photo of a {}.",)
ImageLike = Any  # a path, a PIL image, or a NumPy array [H, W] / [H, W, C]


_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


class Preprocess:
    """Image -> uint8 [S, S, 3]: resize and centre-crop as OpenCLIP does.

    `resize_mode="shortest"` scales the shorter side to S and crops the centre;
    `"squash"` resizes to S x S without keeping the aspect ratio. `interpolation` is
    "bicubic" (OpenAI's and most OpenCLIP models') or "bilinear".
    """

    def __init__(
        self,
        image_size: int,
        resize_mode: str = "shortest",
        interpolation: str = "bicubic",
    ):
        if resize_mode not in ("shortest", "squash"):
            raise ValueError(
                f"resize_mode={resize_mode!r}; expected shortest or squash"
            )
        if interpolation not in _RESAMPLE:
            raise ValueError(
                f"interpolation={interpolation!r}; expected one of {sorted(_RESAMPLE)}"
            )
        self.image_size = image_size
        self.resize_mode = resize_mode
        self.interpolation = interpolation

    def __call__(self, image: ImageLike) -> np.ndarray:
        size, resample = self.image_size, _RESAMPLE[self.interpolation]
        image = to_pil(image)
        if self.resize_mode == "squash":
            return np.asarray(image.resize((size, size), resample))
        # torchvision's Resize(size) then CenterCrop(size), rounding as they do.
        width, height = image.size
        short, long = sorted((width, height))
        new_long = int(size * long / short)
        new_size = (size, new_long) if width <= height else (new_long, size)
        image = image.resize(new_size, resample)
        left = int(round((new_size[0] - size) / 2.0))
        top = int(round((new_size[1] - size) / 2.0))
        return np.asarray(image.crop((left, top, left + size, top + size)))

    def __repr__(self) -> str:
        return (
            f"Preprocess(image_size={self.image_size}, resize_mode={self.resize_mode!r}, "
            f"interpolation={self.interpolation!r})"
        )


def to_pil(image: ImageLike) -> Image.Image:
    """An RGB PIL image from a path, a PIL image or an array (uint8, or float in [0, 1])."""
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as opened:
            return opened.convert("RGB")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(
            f"an image array must be [H, W] or [H, W, 1|3|4] (channels last), "
            f"got shape {array.shape}"
        )
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        if array.size and (array.min() < 0 or array.max() > 1):
            raise ValueError("float image arrays must hold values in [0, 1]")
        array = np.round(array * 255).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ValueError(
            f"image arrays must be uint8 or float in [0, 1], not {array.dtype}"
        )
    return Image.fromarray(array).convert("RGB")


class Tokenizer:
    """Texts -> int32 token ids [n, context_length] (OpenAI's CLIP BPE)."""

    def __init__(self, context_length: int):
        self.context_length = context_length

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        return tokenize(texts, self.context_length)

    def __repr__(self) -> str:
        return f"Tokenizer(context_length={self.context_length})"


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
        dtype: Any = jnp.float32,
        batch_size: int = 64,
    ):
        self.config = config
        self.name = name
        self.module = create_clip(config, use_logit_bias=logit_bias, dtype=dtype)
        self.preprocess = Preprocess(
            config.vision.image_size, resize_mode, interpolation
        )
        self.tokenizer = Tokenizer(config.text.context_length)
        self.batch_size = batch_size
        self.encoders = make_encoders(self.module, mean, std)

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
        self, variables: dict, images: Any, normalize: bool = True
    ) -> np.ndarray:
        """Embeddings float32 [n, embed_dim] (unit norm unless normalize=False).

        `images`: one image or a list of them (paths, PIL images, arrays of any
        size), or a uint8 array [n, S, S, 3] already preprocessed.
        """
        size = self.image_size
        preprocessed = (
            isinstance(images, np.ndarray | jax.Array)
            and images.ndim == 4
            and images.shape[1:] == (size, size, 3)
            and images.dtype == np.uint8
        )
        if not preprocessed and _is_single_image(images):
            images = [images]

        def batch(chunk):
            if preprocessed:
                return np.asarray(chunk)
            return np.stack([self.preprocess(image) for image in chunk])

        encode = functools.partial(self.encoders.images, normalize=normalize)
        return self._batched(encode, variables, images, batch)

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

    # --- Zero-shot classification.

    def zero_shot_classifier(
        self,
        variables: dict,
        classnames: Sequence[str],
        templates: Sequence[str] = DEFAULT_TEMPLATES,
    ) -> np.ndarray:
        """Class embeddings float32 [num_classes, embed_dim]: per class, the unit-norm
        mean of its prompts' embeddings (each template filled with the class name)."""
        classifier = zero_shot_classifier(
            lambda tokens: self.encode_text(variables, tokens),
            list(classnames),
            list(templates),
            self.context_length,
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


def _is_single_image(images: Any) -> bool:
    if isinstance(images, (str, os.PathLike, Image.Image)):
        return True
    return isinstance(images, np.ndarray) and images.ndim in (2, 3)


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
    """The registered architecture `name` (weights: `model.init(seed)` or `load`)."""
    config = get_model_config(name) if isinstance(name, str) else name
    return InferenceModel(
        config,
        name=name if isinstance(name, str) else None,
        logit_bias=logit_bias,
        dtype=dtype,
        batch_size=batch_size,
    )


def load(
    path: str | os.PathLike,
    name: str | ModelConfig | None = None,
    *,
    dtype: Any = "float32",
    batch_size: int = 64,
) -> Loaded:
    """Model, variables, preprocess and tokenizer from a jaxclip checkpoint, an OpenCLIP
    or OpenAI weights file or directory, a Hugging Face CLIPModel directory, or
    `hf-hub:ORG/REPO`. `name` checks (or sets) the architecture; see `load_weights`.

    `dtype` is the compute dtype (e.g. "bfloat16" on accelerators); the parameters
    stay float32.
    """
    weights: Weights = load_weights(path, name)
    model = InferenceModel(
        weights.config,
        name=weights.name,
        logit_bias=weights.logit_bias,
        mean=weights.mean,
        std=weights.std,
        resize_mode=weights.resize_mode,
        interpolation=weights.interpolation,
        dtype=dtype,
        batch_size=batch_size,
    )
    variables = jax.device_put(weights.variables)
    return Loaded(model, variables, model.preprocess, model.tokenizer)
