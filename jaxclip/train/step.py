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


def _full_batch_grads(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    variables: dict[str, Any],
    images: jax.Array,
    tokens: jax.Array,
):
    """Loss, parameter gradients, model outputs and new batch stats in one pass."""

    def loss_fn(params):
        out, mutated = model.apply(
            {**variables, "params": params},
            images,
            tokens,
            train=True,
            mutable=["batch_stats"],
        )
        return contrastive_loss(config, out), (out, mutated)

    (loss, (out, mutated)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        variables["params"]
    )
    return (
        loss,
        grads,
        out,
        mutated.get("batch_stats", variables.get("batch_stats", {})),
    )


TEMPERATURE_PARAMS = ("logit_scale", "logit_bias")


def _batch_shards() -> int:
    """How many shards the batch is split into on the mesh in context (1 if none)."""
    mesh = jax.sharding.get_abstract_mesh()
    return sharding.batch_shards(mesh) if mesh.axis_names else 1


def _micro_view(x: jax.Array, accum_steps: int) -> jax.Array:
    """`[B, ...] -> [R, k, B/(R k), ...]`: each of the R batch shards' rows in k
    contiguous micro-batches; micro-batch i is `[:, i]`.

    Each device splits only its own rows, and a micro-batch is a contiguous block of
    them: taking one copies that micro-batch and nothing else. (Strided micro-batches,
    rows i, i+k, ..., made XLA:TPU copy the whole uint8 batch into another layout.)
    """
    shards = _batch_shards()
    view = x.reshape(
        shards, accum_steps, x.shape[0] // shards // accum_steps, *x.shape[1:]
    )
    return nn.with_logical_constraint(view, ("batch",) + (None,) * x.ndim)


def _micro(view: jax.Array, index) -> jax.Array:
    """Micro-batch `index` of a `_micro_view`, as a batch `[B/k, ...]`."""
    micro = jax.lax.dynamic_index_in_dim(view, index, axis=1, keepdims=False)
    micro = micro.reshape(-1, *micro.shape[2:])
    return nn.with_logical_constraint(micro, ("batch",) + (None,) * (micro.ndim - 1))


def _merge_micro(stacked: jax.Array) -> jax.Array:
    """Micro-batch outputs stacked `[k, B/k, ...]` back to `[B, ...]`, batch order."""
    steps, rows, *rest = stacked.shape
    shards = _batch_shards()
    merged = stacked.reshape(steps, shards, rows // shards, *rest)
    merged = jnp.swapaxes(merged, 0, 1).reshape(steps * rows, *rest)
    return nn.with_logical_constraint(merged, ("batch",) + (None,) * len(rest))


def gradcache_grads(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    variables: dict[str, Any],
    images: jax.Array,
    tokens: jax.Array,
    accum_steps: int,
    prepare_images: Callable[[jax.Array], jax.Array] = lambda images: images,
):
    """Exact gradient accumulation over `accum_steps` micro-batches (GradCache).

    `prepare_images` turns one micro-batch's images into the model's input (the
    train step passes its uint8 batch and normalises here, one micro-batch at a time:
    normalised images of the whole batch would take twice its uint8 bytes in bf16).

    Micro-batch i holds the i-th of k contiguous blocks of every batch shard's rows
    (`_micro_view`).

    1. Embed every micro-batch without keeping activations.
    2. Take the loss over the full batch, and its gradient with respect to the
       embeddings and the temperature (and bias): the negatives are the full batch's.
    3. Re-run each micro-batch under `jax.vjp` with its slice of the embedding
       gradient as the cotangent, and sum the parameter gradients.

    Peak activation memory is one micro-batch's; the cost is one extra forward pass.
    The temperature's gradient comes from step 2 only, so it is counted once. With
    BatchNorm (ResNets) each micro-batch normalises with its own statistics, as in
    any accumulation scheme, and the running statistics are updated k times.
    Returns `(loss, grads, outputs, batch_stats)` like the one-pass step.
    """
    params = variables["params"]
    micro_images = _micro_view(images, accum_steps)  # [R, k, B/(R k), H, W, 3]
    micro_tokens = _micro_view(tokens, accum_steps)  # [R, k, B/(R k), L]
    unrolled = not getattr(model, "scan", True)
    steps = jnp.arange(accum_steps)

    def micro_batch(index):
        return prepare_images(_micro(micro_images, index)), _micro(micro_tokens, index)

    def embed(params, batch_stats, micro_batch):
        micro_images, micro_tokens = micro_batch
        extra = {"batch_stats": batch_stats} if batch_stats else {}
        out, mutated = model.apply(
            {"params": params, **extra},
            micro_images,
            micro_tokens,
            train=True,
            mutable=["batch_stats"],
        )
        embeddings = (out["image_emb"], out["text_emb"])
        return embeddings, mutated.get("batch_stats", batch_stats)

    # 1. Embeddings of all micro-batches; nothing is kept for a backward pass.
    def embed_step(batch_stats, index):
        embeddings, batch_stats = embed(params, batch_stats, micro_batch(index))
        return batch_stats, embeddings

    start_stats = variables.get("batch_stats", {})
    batch_stats, (image_emb, text_emb) = _loop(embed_step, start_stats, steps, unrolled)

    # 2. The full-batch loss and its gradient w.r.t. embeddings and temperature.
    def full_loss(image_emb, text_emb, temperature):
        out = {"image_emb": image_emb, "text_emb": text_emb, **temperature}
        return contrastive_loss(config, out)

    temperature = {k: params[k] for k in TEMPERATURE_PARAMS if k in params}
    image_emb, text_emb = _merge_micro(image_emb), _merge_micro(text_emb)
    loss, (d_image, d_text, d_temperature) = jax.value_and_grad(
        full_loss, argnums=(0, 1, 2)
    )(image_emb, text_emb, temperature)
    d_image = _micro_view(d_image, accum_steps)
    d_text = _micro_view(d_text, accum_steps)

    # 3. Back-propagate each micro-batch with its cached cotangent. The batch stats
    # passed in only matter for their structure: training-mode BatchNorm normalises
    # with the micro-batch's own statistics, exactly as in step 1.
    def backward_step(grads, index):
        batch = micro_batch(index)
        cotangent = (_micro(d_image, index), _micro(d_text, index))
        _, vjp_fn = jax.vjp(lambda p: embed(p, start_stats, batch)[0], params)
        (micro_grads,) = vjp_fn(cotangent)
        return jax.tree.map(jnp.add, grads, micro_grads), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, _ = _loop(backward_step, zeros, steps, unrolled)
    grads = {**grads, **d_temperature}  # the towers never touch the temperature
    out = {"image_emb": image_emb, "text_emb": text_emb, **temperature}
    return loss, grads, out, batch_stats


def _loop(step: Callable, carry: Any, xs: Any, unrolled: bool):
    """`lax.scan(step, carry, xs)`, or the same loop in Python when `unrolled`.

    Multi-device XLA:CPU can deadlock on collectives inside a while loop, so the
    unrolled form is used wherever the model's own layers are unrolled.
    """
    if not unrolled:
        return jax.lax.scan(step, carry, xs)
    outputs = []
    for i in range(jax.tree.leaves(xs)[0].shape[0]):
        carry, out = step(carry, jax.tree.map(lambda x, i=i: x[i], xs))
        outputs.append(out)
    if outputs[0] is None:
        return carry, None
    return carry, jax.tree.map(lambda *xs: jnp.stack(xs), *outputs)


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

    accum_steps = config.train.accum_steps

    def prepare_images(images: jax.Array) -> jax.Array:
        return normalize_images(images, mean, std, model.dtype)

    def train_step(state: TrainState, batch: Batch):
        variables = {"params": state.params}
        if state.batch_stats:
            variables["batch_stats"] = state.batch_stats
        if accum_steps == 1:
            images = prepare_images(batch["images"])
            loss, grads, out, batch_stats = _full_batch_grads(
                config, model, variables, images, batch["tokens"]
            )
        else:
            loss, grads, out, batch_stats = gradcache_grads(
                config,
                model,
                variables,
                batch["images"],
                batch["tokens"],
                accum_steps,
                prepare_images,
            )
        grad_norm = optax.tree.norm(grads)
        # A non-finite loss or gradient (a NaN batch, an overflow) skips the update:
        # params, optimizer moments and BatchNorm statistics stay as they were, and
        # the counters let the loop stop after `train.max_nonfinite_steps` in a row.
        # A branch, not a select over the new and old state: selecting would read the
        # parameters and optimizer moments twice more every step.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = jax.lax.cond(
            finite,
            lambda: tx.update(grads, state.opt_state, state.params),
            lambda: (jax.tree.map(jnp.zeros_like, state.params), state.opt_state),
        )
        # x + 0 == x: a skipped step leaves the parameters bit for bit.
        params = clip_logit_scale(optax.apply_updates(state.params, updates))
        batch_stats = jax.tree.map(
            lambda new, old: jnp.where(finite, new, old), batch_stats, state.batch_stats
        )
        streak = jnp.where(finite, 0, state.nonfinite_streak + 1)
        total = state.nonfinite_total + (~finite).astype(jnp.int32)
        i2t, t2i = losses.contrastive_accuracy(
            out["image_emb"],
            out["text_emb"],
            impl=config.loss.impl,
            chunk_size=config.loss.chunk_size,
        )
        metrics = {
            "loss": loss,
            "i2t_acc": i2t,
            "t2i_acc": t2i,
            "logit_scale": jnp.exp(out["logit_scale"]),
            "grad_norm": grad_norm,
            "lr": schedule(state.step),
            "nonfinite_streak": streak,
            "nonfinite_total": total,
        }
        if "logit_bias" in out:
            metrics["logit_bias"] = out["logit_bias"]
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            batch_stats=batch_stats,
            nonfinite_streak=streak,
            nonfinite_total=total,
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

    def staged(stage: str) -> Callable:
        def run(*args, **kwargs):
            with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
                return getattr(fn, stage)(*args, **kwargs)

        return run

    # `fn.lower(...)` for ahead-of-time compilation, `fn.trace(...)` for its jaxpr.
    wrapped.lower = staged("lower")
    wrapped.trace = staged("trace")
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
