"""The jitted train step and the embedding (eval) step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from jaxclip import losses, sharding
from jaxclip.data.transforms import normalize_images
from jaxclip.train.state import TrainState, clip_logit_scale

Batch = dict[str, jax.Array]  # images uint8 [B, H, W, 3], tokens int32 [B, L]


def contrastive_loss(
    config: ml_collections.ConfigDict, out: dict[str, jax.Array]
) -> jax.Array:
    """The configured loss (`loss.name`, `loss.impl`) on the model's outputs."""
    if config.loss.name == "siglip":
        return losses.siglip_loss(
            out["image_emb"],
            out["text_emb"],
            out["logit_scale"],
            out["logit_bias"],
            impl=config.loss.impl,
            chunk_size=config.loss.chunk_size,
        )
    return losses.clip_loss(
        out["image_emb"],
        out["text_emb"],
        out["logit_scale"],
        impl=config.loss.impl,
        chunk_size=config.loss.chunk_size,
    )


def make_train_step(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: Mesh,
    state_shardings: Any,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """`train_step(state, batch) -> (state, metrics)`, jitted with explicit shardings.

    The state is donated: its buffers are reused for the new state.
    """
    mean, std = tuple(config.data.mean), tuple(config.data.std)

    def train_step(state: TrainState, batch: Batch):
        images = normalize_images(batch["images"], mean, std, model.dtype)

        def loss_fn(params):
            variables = {"params": params}
            if state.batch_stats:
                variables["batch_stats"] = state.batch_stats
            out, mutated = model.apply(
                variables, images, batch["tokens"], train=True, mutable=["batch_stats"]
            )
            return contrastive_loss(config, out), (out, mutated)

        (loss, (out, mutated)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = clip_logit_scale(optax.apply_updates(state.params, updates))
        i2t, t2i = losses.contrastive_accuracy(out["image_emb"], out["text_emb"])
        metrics = {
            "loss": loss,
            "i2t_acc": i2t,
            "t2i_acc": t2i,
            "logit_scale": jnp.exp(out["logit_scale"]),
            "grad_norm": optax.tree.norm(grads),
            "lr": schedule(state.step),
        }
        if "logit_bias" in out:
            metrics["logit_bias"] = out["logit_bias"]
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            batch_stats=mutated.get("batch_stats", state.batch_stats),
        )
        return new_state, metrics

    batch_shardings = {
        "images": sharding.batch_sharding(mesh, 4),
        "tokens": sharding.batch_sharding(mesh, 2),
    }
    jitted = jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )

    return in_mesh(jitted, mesh)


def in_mesh(fn: Callable, mesh: Mesh) -> Callable:
    """Call `fn` with the mesh and logical rules in context.

    Tracing needs both for the activation constraints inside the model.
    """

    def wrapped(*args, **kwargs):
        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
            return fn(*args, **kwargs)

    return wrapped


def make_encode_fns(
    config: ml_collections.ConfigDict, model: nn.Module, mesh: Mesh
) -> tuple[Callable, Callable]:
    """Jitted `encode_images(variables, images_uint8)` and `encode_texts(variables, tokens)`."""
    mean, std = tuple(config.data.mean), tuple(config.data.std)

    @jax.jit
    def encode_images(variables, images):
        images = normalize_images(images, mean, std, model.dtype)
        return model.apply(variables, images, method=model.encode_image)

    @jax.jit
    def encode_texts(variables, tokens):
        return model.apply(variables, tokens, method=model.encode_text)

    return in_mesh(encode_images, mesh), in_mesh(encode_texts, mesh)
