"""Distillation from a frozen teacher (`train.distill_from`, `train.distill_weight`).

The teacher is any weights `jaxclip.convert.load_weights` reads (a jaxclip workdir,
an OpenCLIP file or directory, an HF CLIPModel or SiglipModel directory), of any
architecture whose text tower reads the student's tokens (the same vocabulary size
and context length). Its variables are placed sharded on the mesh like parameters
(FSDP and tensor axes), passed to the step as an argument of their own, never donated
and never updated: they stay bit for bit. In the step it embeds the same batch in
inference mode, with its own pixel statistics and, if its image size differs, the
images resized to it; `stop_gradient` keeps it out of the backward pass.

The loss adds `train.distill_weight` times OpenCLIP's distillation term
(`losses.distill_loss`: the cross-entropy from the teacher's to the student's
image→text and text→image softmaxes, over the whole global batch). With
`loss.impl='ring'` the teacher's text embeddings travel the ring beside the
student's, and no device holds a `[B, B]` matrix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from jaxclip import sharding
from jaxclip.config_rules import ConfigError
from jaxclip.data.transforms import normalize_images
from jaxclip.models.build import create_model, example_inputs, strip_axis_metadata
from jaxclip.models.clip import CLIP
from jaxclip.train.freeze import path_name
from jaxclip.train.state import named_leaves, put_sharded


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A frozen model, its sharded variables, and how it reads the student's batch."""

    model: CLIP
    variables: dict[str, Any]  # device arrays, sharded; never donated
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str

    def embed(self, variables: dict[str, Any], images: jax.Array, tokens: jax.Array):
        """The teacher's outputs (embeddings and log scale) on the student's batch:
        uint8 images `[n, S, S, 3]` and tokens `[n, L]`; constants of the step."""
        size = self.model.config.vision.image_size
        if images.shape[1:3] != (size, size):
            images = jax.image.resize(
                images.astype(jnp.float32),
                (images.shape[0], size, size, 3),
                method="bicubic",
            )
            images = jnp.clip(jnp.round(images), 0, 255)
        images = normalize_images(images, self.mean, self.std, self.model.dtype)
        out = self.model.apply(variables, images, tokens, train=False)
        return jax.lax.stop_gradient(
            {k: out[k] for k in ("image_emb", "text_emb", "logit_scale")}
        )


def enabled(config: ml_collections.ConfigDict) -> bool:
    """Whether the run distills from a teacher (`train.distill_from` set)."""
    return bool(config.train.distill_from)


def load_teacher(
    config: ml_collections.ConfigDict,
    student: CLIP,
    mesh: Mesh,
    log: Callable[..., None] = print,
) -> Teacher:
    """`train.distill_from`'s weights as a `Teacher`, placed on `mesh`; a
    ConfigError when its text tower cannot read the student's tokens."""
    from jaxclip.convert import load_weights  # orbax and the file readers

    source = config.train.distill_from
    try:
        weights = load_weights(source)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(
            f"train.distill_from={source!r} cannot be read: {error}"
        ) from error
    check_tokens_fit(weights.config, student.config, source)
    model = create_model(
        weights.config,
        use_logit_bias=weights.logit_bias,
        dtype=config.model.dtype,
        scan=config.model.scan,
    )
    # Placed like parameters: the same logical axes, so split over fsdp and tensor.
    boxed = jax.eval_shape(model.init, jax.random.key(0), *example_inputs(model))
    shardings = sharding.logical_to_shardings(boxed, mesh)
    abstract = strip_axis_metadata(boxed)
    variables = {}
    for collection, tree in abstract.items():
        host = named_leaves(weights.variables.get(collection, {}))
        variables[collection] = jax.tree_util.tree_map_with_path(
            lambda path, shape, where, host=host: put_sharded(
                host[path_name(path)],
                jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=where),
            ),
            tree,
            shardings[collection],
        )
    log(
        f"distilling from {weights.source} ({weights.name or 'unregistered'}; "
        f"train.distill_weight={config.train.distill_weight})"
    )
    return Teacher(model, variables, weights.mean, weights.std, weights.source)


def check_tokens_fit(teacher, student, source: str) -> None:
    """The teacher reads the student's token ids: the same vocabulary size and
    context length (a different tokenizer with these sizes is not detected)."""
    pairs = (
        ("vocab_size", teacher.text.vocab_size, student.text.vocab_size),
        ("context_length", teacher.text.context_length, student.text.context_length),
    )
    for name, theirs, ours in pairs:
        if theirs != ours:
            raise ConfigError(
                f"train.distill_from={source!r}: the teacher's text {name} is "
                f"{theirs}, the student's {ours}; the teacher reads the student's "
                "tokens, so both must use one tokenizer"
            )
