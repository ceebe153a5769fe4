"""The jitted train step: gradients in one pass or by GradCache, then the update."""

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
from jaxclip.models.clip import CLIP
from jaxclip.models.registry import get_model_config
from jaxclip.train.distill import Teacher
from jaxclip.train.ema import update_ema
from jaxclip.train.freeze import NOTHING_LOCKED, Freeze, stop_locked_towers
from jaxclip.train.state import TrainState, clip_logit_scale

# images uint8 [B, H, W, 3], tokens int32 [B, L]; with accum_steps = k > 1 each as
# k micro-batches [k, B/k, ...] (step_batch_spec)
Batch = dict[str, jax.Array]


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


def embedding_loss(
    config: ml_collections.ConfigDict,
    out: dict[str, jax.Array],
    teacher_out: dict[str, jax.Array] | None = None,
    coca: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The loss terms that read only the embeddings and the temperature, and their
    values for the log: the contrastive loss (times `loss.clip_weight` for a CoCa
    model), plus `train.distill_weight` times the distillation term when a teacher's
    outputs are given (`train.distill_from`, jaxclip/train/distill.py)."""
    contrastive = contrastive_loss(config, out)
    loss = config.loss.clip_weight * contrastive if coca else contrastive
    terms = {"contrastive_loss": contrastive} if coca else {}
    if teacher_out is None:
        return loss, terms
    distill = losses.distill_loss(
        out["image_emb"],
        out["text_emb"],
        out["logit_scale"],
        teacher_out["image_emb"],
        teacher_out["text_emb"],
        teacher_out["logit_scale"],
        impl=config.loss.impl,
        chunk_size=config.loss.chunk_size,
    )
    total = loss + config.train.distill_weight * distill
    return total, {"contrastive_loss": contrastive, "distill_loss": distill}


def caption_terms(
    config: ml_collections.ConfigDict,
    logits: jax.Array,
    tokens: jax.Array,
    num_labels: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """CoCa's caption loss (unweighted) of its logits `[b, L - 1, vocab]` against the
    labels `tokens[:, 1:]`, and the log's `caption_loss` and `token_acc`. Both are
    divided by `num_labels` (default: this batch's non-pad labels): GradCache passes
    the whole batch's, so that its micro-batches' values add up."""
    caption, accuracy = losses.caption_loss(
        logits,
        tokens[:, 1:],
        label_smoothing=config.loss.label_smoothing,
        num_labels=num_labels,
    )
    return caption, {"caption_loss": caption, "token_acc": accuracy}


def training_loss(
    config: ml_collections.ConfigDict,
    out: dict[str, jax.Array],
    teacher_out: dict[str, jax.Array] | None = None,
    tokens: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The loss the step minimises, and its terms for the log: `embedding_loss`, and
    for a CoCa model (its outputs hold the caption `logits`; `tokens` are the batch's
    token ids) plus `loss.caption_weight` times the caption loss."""
    coca = "logits" in out
    loss, terms = embedding_loss(config, out, teacher_out, coca)
    if not coca:
        return loss, terms
    caption, captions = caption_terms(config, out["logits"], tokens)
    return loss + config.loss.caption_weight * caption, {**terms, **captions}


# Patch dropout's masks come from the seed and the step (no RNG in the train state, so
# a resumed run draws the same ones), on a stream of their own: this is folded into
# the seed's key first, which the parameter initialisation uses as it is.
PATCH_DROPOUT_STREAM = 1


def patch_dropout_key(
    config: ml_collections.ConfigDict, step: jax.Array
) -> jax.Array | None:
    """The key of one step's patch dropout masks; None when `model.patch_dropout`
    is off."""
    if not config.model.patch_dropout:
        return None
    key = jax.random.fold_in(jax.random.key(config.seed), PATCH_DROPOUT_STREAM)
    return jax.random.fold_in(key, step)


def image_keys(step_key: jax.Array | None, rows: jax.Array | None) -> jax.Array | None:
    """One key per image, from its row in the step's whole batch (`rows`, int
    `[n]`): an image draws the same mask whether the batch runs in one pass or as
    micro-batches, and in both of GradCache's passes."""
    if step_key is None:
        return None
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(step_key, rows)


def micro_batch_rows(batch_size: int, accum_steps: int) -> jax.Array:
    """The row in the whole batch of each micro-batch row, int32 `[k, B/k]`.

    `sharding.shard_batch` puts the i-th block of each process's B/P rows into
    micro-batch i. This assumes each process's rows are one block of the whole batch
    (its devices consecutive along the batch axes); where they are not, the masks
    are as random, but switching accumulation on changes which image gets which.
    """
    rows = jnp.arange(batch_size, dtype=jnp.int32)
    rows = rows.reshape(jax.process_count(), accum_steps, -1).swapaxes(0, 1)
    return nn.with_logical_constraint(rows.reshape(accum_steps, -1), (None, "batch"))


def full_batch_grads(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    variables: dict[str, Any],
    images: jax.Array,
    tokens: jax.Array,
    patch_key: jax.Array | None = None,
    freeze: Freeze = NOTHING_LOCKED,
    teacher_out: dict[str, jax.Array] | None = None,
):
    """Loss, gradients, model outputs (with the loss terms) and new batch stats in
    one pass.

    The gradients are those of `freeze.view(params)`, the trainable parameters (all
    of them unless `train.freeze` locks some). `patch_key` (`patch_dropout_key`)
    draws the patch dropout masks, one per row; `teacher_out`, a teacher's outputs
    on the batch, adds the distillation term. `model` is a CLIP or a CoCa
    (`training_loss` adds CoCa's caption term)."""
    rows = jnp.arange(images.shape[0], dtype=jnp.int32)
    patch_keys = image_keys(patch_key, rows)
    params = variables["params"]
    locked = freeze.locked_towers(params)

    def loss_fn(view):
        out, mutated = model.apply(
            {**variables, "params": freeze.merge(view, jax.lax.stop_gradient(params))},
            images,
            tokens,
            train=trains_batch_stats(model, locked),
            patch_keys=patch_keys,
            mutable=["batch_stats"],
        )
        out = stop_locked_towers(out, locked)
        loss, terms = training_loss(config, out, teacher_out, tokens)
        return loss, ({**out, **terms}, mutated)

    (loss, (out, mutated)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        freeze.view(params)
    )
    return (
        loss,
        grads,
        out,
        mutated.get("batch_stats", variables.get("batch_stats", {})),
    )


def trains_batch_stats(model: nn.Module, locked: tuple[str, ...]) -> bool:
    """The model's `train` switch: off (BatchNorm in inference mode, with its running
    statistics, which stay as they are) when a ResNet image tower is locked whole;
    else on (the switch also turns on a ViT's patch dropout, locked or not)."""
    return not ("visual" in locked and model.config.vision.is_resnet)


TEMPERATURE_PARAMS = ("logit_scale", "logit_bias")


def _merge_micro(stacked: jax.Array) -> jax.Array:
    """`[k, B/k, ...]` micro-batches to one batch `[B, ...]`, row `j k + i` being row
    j of micro-batch i: each device interleaves its own rows, nothing moves."""
    merged = jnp.swapaxes(stacked, 0, 1).reshape(-1, *stacked.shape[2:])
    return nn.with_logical_constraint(merged, ("batch",) + (None,) * (merged.ndim - 1))


def _split_micro(batch: jax.Array, accum_steps: int) -> jax.Array:
    """Inverse of `_merge_micro`: `[B, ...]` to `[k, B/k, ...]`."""
    split = batch.reshape(-1, accum_steps, *batch.shape[1:])
    split = jnp.swapaxes(split, 0, 1)
    return nn.with_logical_constraint(
        split, (None, "batch") + (None,) * (batch.ndim - 1)
    )


def gradcache_grads(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    variables: dict[str, Any],
    images: jax.Array,
    tokens: jax.Array,
    prepare_images: Callable[[jax.Array], jax.Array] = lambda images: images,
    patch_key: jax.Array | None = None,
    freeze: Freeze = NOTHING_LOCKED,
    teacher_out: dict[str, jax.Array] | None = None,
):
    """Exact gradient accumulation over micro-batches (GradCache): embed every
    micro-batch without keeping activations (1), take the full batch's loss and its
    gradient w.r.t. the embeddings and the temperature, so the negatives are the
    full batch's (2), then run each micro-batch again under `jax.vjp` with its slice
    of that gradient and sum the parameter gradients (3). Peak activation memory is
    one micro-batch's; the cost is one extra forward pass.

    `images` `[k, B/k, H, W, 3]` and `tokens` `[k, B/k, L]` hold the k micro-batches
    (`sharding.shard_batch(..., accum_steps=k)`), each split over the batch axes.
    `prepare_images` turns one micro-batch's images into the model's input (the train
    step normalises its uint8 batch here, a micro-batch at a time). `patch_key` draws
    each image's patch dropout mask from its row in the whole batch
    (`micro_batch_rows`): both passes drop the same patches, those of the one-pass
    step. `teacher_out` (a teacher's embeddings `[B, d]` in `_merge_micro`'s order and
    its log scale) adds the distillation term to (2)'s loss. The gradients are those
    of `freeze.view(params)`; the temperature's comes from (2) only, counted once.
    BatchNorm (ResNets) normalises each micro-batch with its own statistics, and the
    running statistics are updated k times. Returns `(loss, grads, outputs,
    batch_stats)` like the one-pass step, embeddings `[B, d]` in `_merge_micro`'s order.
    """
    params = variables["params"]
    start_stats = variables.get("batch_stats", {})
    coca = model.config.is_coca
    accum_steps, micro_size = images.shape[:2]
    rows = None  # no patch dropout: nothing to draw
    if patch_key is not None:
        rows = micro_batch_rows(accum_steps * micro_size, accum_steps)
    micro_batches = (images, tokens, rows)
    # The micro-batch loop unrolls wherever the model's own layers do (`use_scan`).
    unrolled = not model.scan
    forward = _micro_batch_forward(model, params, freeze, prepare_images, patch_key)
    view = freeze.view(params)

    # 1. Embeddings of all micro-batches; nothing is kept for a backward pass (and
    # CoCa's decoder, whose logits nothing reads here, is not run).
    def embed_step(batch_stats, micro_batch):
        out, batch_stats = forward(view, batch_stats, micro_batch)
        return batch_stats, (out["image_emb"], out["text_emb"])

    batch_stats, embeddings = _loop(embed_step, start_stats, micro_batches, unrolled)

    # 2. The full-batch loss and its gradient w.r.t. embeddings and temperature.
    temperature = {k: params[k] for k in TEMPERATURE_PARAMS if k in params}
    loss, terms, image_emb, text_emb, cotangents, d_temperature = (
        _full_batch_loss_grads(
            config, embeddings, temperature, accum_steps, teacher_out, coca
        )
    )

    # 3. Back-propagate each micro-batch with its cached cotangent. The batch stats
    # passed in only matter for their structure: training-mode BatchNorm normalises
    # with the micro-batch's own statistics, exactly as in step 1. CoCa's caption
    # loss is per token: each micro-batch's is its token losses summed over the
    # whole batch's count of labels, so the k of them add up to the loss.
    def outputs_of(view, micro_batch):
        return forward(view, start_stats, micro_batch)[0]

    num_labels = losses.count_labels(tokens) if coca else None
    grads, captions = _micro_batch_grads(
        config, outputs_of, view, (micro_batches, cotangents), unrolled, num_labels
    )
    if coca:
        loss = loss + config.loss.caption_weight * captions["caption_loss"]
    # The towers never touch the temperature; a locked one gets no gradient.
    grads = {**grads, **{k: v for k, v in d_temperature.items() if k in view}}
    out = {"image_emb": image_emb, "text_emb": text_emb, **temperature, **terms}
    return loss, grads, {**out, **captions}, batch_stats


def _micro_batch_forward(
    model: nn.Module,
    params: dict[str, Any],
    freeze: Freeze,
    prepare_images: Callable[[jax.Array], jax.Array],
    patch_key: jax.Array | None,
) -> Callable:
    """GradCache's forward pass of one micro-batch `(images, tokens, rows)`:
    `forward(view, batch_stats, micro_batch)` gives `(outputs, batch_stats)`, with
    the gradients flowing to `view` (the trained part of `params`) only."""
    locked = freeze.locked_towers(params)
    train = trains_batch_stats(model, locked)

    def forward(view, batch_stats, micro_batch):
        micro_images, micro_tokens, micro_rows = micro_batch
        extra = {"batch_stats": batch_stats} if batch_stats else {}
        out, mutated = model.apply(
            {"params": freeze.merge(view, jax.lax.stop_gradient(params)), **extra},
            prepare_images(micro_images),
            micro_tokens,
            train=train,
            patch_keys=image_keys(patch_key, micro_rows),
            mutable=["batch_stats"],
        )
        out = stop_locked_towers(out, locked)
        return out, mutated.get("batch_stats", batch_stats)

    return forward


def _micro_batch_grads(
    config: ml_collections.ConfigDict,
    forward: Callable,
    view: dict[str, Any],
    micro_batches_and_cotangents: tuple,
    unrolled: bool,
    num_labels: jax.Array | None,
) -> tuple[dict[str, Any], dict[str, jax.Array]]:
    """GradCache's step 3: each micro-batch run again under `jax.vjp`, its slice of
    the embedding gradient as the cotangent, and the parameter gradients summed.
    `forward(view, micro_batch)` gives the model's outputs. With `num_labels` (CoCa:
    the whole batch's count of caption labels), each micro-batch's caption loss joins
    its vjp with cotangent `loss.caption_weight`. Returns (grads, the summed caption
    loss and token accuracy terms, {} without captions)."""
    coca = num_labels is not None

    def micro_outputs(view, micro_batch):
        out = forward(view, micro_batch)
        embeddings = (out["image_emb"], out["text_emb"])
        if not coca:
            return embeddings, {}
        caption, captions = caption_terms(
            config, out["logits"], micro_batch[1], num_labels
        )
        return (embeddings, caption), captions

    def backward_step(carry, xs):
        grads, sums = carry
        micro_batch, cotangent = xs
        _, vjp_fn, captions = jax.vjp(
            lambda v: micro_outputs(v, micro_batch), view, has_aux=True
        )
        if coca:
            cotangent = (cotangent, jnp.float32(config.loss.caption_weight))
        (micro_grads,) = vjp_fn(cotangent)
        sums = jax.tree.map(jnp.add, sums, captions)
        return (jax.tree.map(jnp.add, grads, micro_grads), sums), None

    zeros = jax.tree.map(jnp.zeros_like, view)
    no_captions = {}
    if coca:
        no_captions = {"caption_loss": jnp.float32(0), "token_acc": jnp.float32(0)}
    (grads, captions), _ = _loop(
        backward_step, (zeros, no_captions), micro_batches_and_cotangents, unrolled
    )
    return grads, captions


def _full_batch_loss_grads(
    config: ml_collections.ConfigDict,
    micro_embeddings: tuple[jax.Array, jax.Array],
    temperature: dict[str, jax.Array],
    accum_steps: int,
    teacher_out: dict[str, jax.Array] | None = None,
    coca: bool = False,
):
    """GradCache's step 2: the loss over all micro-batches' embeddings `[k, B/k, d]`
    (`embedding_loss`) and its gradients. Returns (loss, its terms, image and text
    embeddings `[B, d]`, their gradients as micro-batches, the temperature's
    gradient)."""

    def full_loss(image_emb, text_emb, temperature):
        out = {"image_emb": image_emb, "text_emb": text_emb, **temperature}
        return embedding_loss(config, out, teacher_out, coca)

    image_emb, text_emb = (_merge_micro(e) for e in micro_embeddings)
    (loss, terms), (d_image, d_text, d_temperature) = jax.value_and_grad(
        full_loss, argnums=(0, 1, 2), has_aux=True
    )(image_emb, text_emb, temperature)
    cotangents = (_split_micro(d_image, accum_steps), _split_micro(d_text, accum_steps))
    return loss, terms, image_emb, text_emb, cotangents, d_temperature


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


def example_batch(config: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of one global batch."""
    model_config = get_model_config(config.model.name)
    size = model_config.vision.image_size
    batch = config.train.batch_size
    return {
        "images": jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8),
        "tokens": jax.ShapeDtypeStruct(
            (batch, model_config.text.context_length), jnp.int32
        ),
    }


def step_batch_spec(
    config: ml_collections.ConfigDict, mesh: Mesh
) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes, dtypes and shardings of the batch the train step takes: `[B, ...]`, or
    `[k, B/k, ...]` micro-batches with `train.accum_steps` = k > 1 (`shard_batch`)."""
    accum_steps = config.train.accum_steps
    specs = {}
    for name, spec in example_batch(config).items():
        if accum_steps > 1:
            shape = (accum_steps, spec.shape[0] // accum_steps, *spec.shape[1:])
            where = sharding.micro_batch_sharding(mesh, len(shape))
        else:
            shape, where = spec.shape, sharding.batch_sharding(mesh, spec.ndim)
        specs[name] = jax.ShapeDtypeStruct(shape, spec.dtype, sharding=where)
    return specs


def make_train_step(
    config: ml_collections.ConfigDict,
    model: CLIP,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: Mesh,
    state_shardings: Any,
    teacher: Teacher | None = None,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """`train_step(state, batch) -> (state, metrics)`, jitted with explicit shardings;
    with a `teacher` (`distill.load_teacher`), `train_step(state, batch,
    teacher.variables)`.

    The state is donated: its buffers are reused for the new state; the teacher's
    variables are not. Trace, lower or call it inside `sharding.use_mesh(mesh)` (the
    model's activation constraints need the mesh and the logical rules);
    `jaxclip.train.loop.compile_train_step` compiles it once, before the loop.
    """
    mean, std = tuple(config.data.mean), tuple(config.data.std)
    freeze = Freeze.of(config)

    def prepare_images(images: jax.Array) -> jax.Array:
        return normalize_images(images, mean, std, model.dtype)

    def train_step(state: TrainState, batch: Batch, teacher_variables=None):
        variables = {"params": state.params}
        if state.batch_stats:
            variables["batch_stats"] = state.batch_stats
        patch_key = patch_dropout_key(config, state.step)
        teacher_out = None
        if teacher is not None:
            teacher_out = teacher_outputs(teacher, teacher_variables, batch, model.scan)
        if config.train.accum_steps == 1:
            images = prepare_images(batch["images"])
            grads_and_out = full_batch_grads(
                config,
                model,
                variables,
                images,
                batch["tokens"],
                patch_key,
                freeze,
                teacher_out,
            )
        else:
            grads_and_out = gradcache_grads(
                config,
                model,
                variables,
                batch["images"],
                batch["tokens"],
                prepare_images,
                patch_key,
                freeze,
                teacher_out,
            )
        return apply_gradients(config, tx, schedule, state, *grads_and_out, freeze)

    batch_shardings = {
        name: spec.sharding for name, spec in step_batch_spec(config, mesh).items()
    }
    in_shardings = (state_shardings, batch_shardings)
    if teacher is not None:
        teacher_shardings = jax.tree.map(lambda x: x.sharding, teacher.variables)
        in_shardings += (teacher_shardings,)
    return jax.jit(
        train_step,
        in_shardings=in_shardings,
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )


def teacher_outputs(
    teacher: Teacher, variables: dict[str, Any], batch: Batch, scan: bool
) -> dict[str, jax.Array]:
    """The teacher's embeddings of the step's batch, `[B, d]` (micro-batches one at a
    time with accumulation, merged in `_merge_micro`'s order), and its log scale."""
    images, tokens = batch["images"], batch["tokens"]
    if images.ndim == 4:  # the whole batch
        return teacher.embed(variables, images, tokens)

    def embed_step(carry, micro_batch):
        out = teacher.embed(variables, *micro_batch)
        return carry, (out["image_emb"], out["text_emb"])

    _, (image_emb, text_emb) = _loop(embed_step, None, (images, tokens), not scan)
    return {
        "image_emb": _merge_micro(image_emb),
        "text_emb": _merge_micro(text_emb),
        "logit_scale": jax.lax.stop_gradient(variables["params"]["logit_scale"]),
    }


# The loss's terms the step logs when the loss has them (distillation, CoCa).
LOGGED_TERMS = ("contrastive_loss", "distill_loss", "caption_loss", "token_acc")


def apply_gradients(
    config: ml_collections.ConfigDict,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    state: TrainState,
    loss: jax.Array,
    grads: Any,
    out: dict[str, jax.Array],
    batch_stats: Any,
    freeze: Freeze = NOTHING_LOCKED,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """The optimizer update and the params' EMA (both skipped when the loss or
    gradient is not finite), and the step's metrics.

    `grads` are those of `freeze.view(state.params)`: the optimizer updates the view,
    which goes back into the params; locked parameters stay as they were."""
    grad_norm = optax.tree.norm(grads)
    # A non-finite loss or gradient (a NaN batch, an overflow) skips the update:
    # params, optimizer moments and BatchNorm statistics stay as they were, and
    # the counters let the loop stop after `train.max_nonfinite_steps` in a row.
    # A branch, not a select over the new and old state: selecting would read the
    # parameters and optimizer moments twice more every step.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    view = freeze.view(state.params)
    updates, opt_state = jax.lax.cond(
        finite,
        lambda: tx.update(grads, state.opt_state, view),
        lambda: (jax.tree.map(jnp.zeros_like, view), state.opt_state),
    )
    # x + 0 == x: a skipped step leaves the parameters bit for bit.
    view = optax.apply_updates(view, updates)
    params = clip_logit_scale(freeze.merge(view, state.params))
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
        **{k: out[k] for k in LOGGED_TERMS if k in out},
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
        ema_params=trainable_ema(config, freeze, state, params, finite),
    )
    return new_state, metrics


def trainable_ema(
    config: ml_collections.ConfigDict,
    freeze: Freeze,
    state: TrainState,
    params: Any,
    finite: jax.Array,
) -> Any:
    """The EMA after the step: only its trainable part moves (a locked parameter's
    average is the parameter itself, and reading it every step would cost a pass over
    the locked tower); None when the run keeps no EMA."""
    if state.ema_params is None:
        return None
    moved = update_ema(
        config, freeze.view(state.ema_params), freeze.view(params), state.step, finite
    )
    return freeze.merge(moved, state.ema_params)
