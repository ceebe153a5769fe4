"""Train state, optimizer, and creating both directly sharded on the mesh."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import Mesh

from jaxclip import sharding
from jaxclip.models.build import example_inputs, strip_axis_metadata
from jaxclip.models.clip import CLIP, MAX_LOGIT_SCALE
from jaxclip.train.ema import init_ema
from jaxclip.train.freeze import Freeze, optimize_trainable, path_name

# Only weight matrices decay: not gains, biases, embeddings or the temperature. The
# attention's fused matrices are `in_proj_kernel` and `out_proj_kernel`.
DECAYED_PARAM_NAMES = ("kernel", "proj", "text_projection")
DECAYED_SUFFIX = "_kernel"


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; a pytree that orbax saves whole."""

    step: jax.Array
    params: Any
    opt_state: Any  # of the trainable params only (`train.freeze`: freeze.py)
    batch_stats: Any  # BatchNorm running statistics (empty for ViTs)
    # Steps whose loss or gradient was not finite, so their update was skipped:
    # how many in a row up to now (0 after a finite step), and how many in all.
    nonfinite_streak: jax.Array
    nonfinite_total: jax.Array
    # The params' exponential moving average, float32 and sharded like them, when
    # `train.ema_decay` > 0; else None, which a checkpoint does not record (ema.py).
    ema_params: Any = None


def weight_decay_mask(params: Any) -> Any:
    """True for the parameters that get weight decay."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict(
        {
            path: path[-1] in DECAYED_PARAM_NAMES or path[-1].endswith(DECAYED_SUFFIX)
            for path in flat
        }
    )


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warm-up to `optim.lr`, then cosine decay to `optim.end_lr` at the end."""
    warmup = config.optim.warmup_steps
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.optim.lr,
        warmup_steps=warmup,
        decay_steps=max(config.train.steps, warmup + 1),
        end_value=config.optim.end_lr,
    )


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW with warm-up + cosine, a decay mask and global-norm clipping, over the
    parameters that train (`train.freeze`: `init` takes the whole params, `update`
    the trainable view's gradients and params, `freeze.optimize_trainable`)."""
    optim = config.optim
    chain = []
    if optim.grad_clip_norm:
        chain.append(optax.clip_by_global_norm(optim.grad_clip_norm))
    chain.append(
        optax.adamw(
            learning_rate_schedule(config),
            b1=optim.b1,
            b2=optim.b2,
            eps=optim.eps,
            weight_decay=optim.weight_decay,
            mask=weight_decay_mask,
        )
    )
    return optimize_trainable(optax.chain(*chain), Freeze.of(config))


def clip_logit_scale(params: dict) -> dict:
    """Keep the learnable temperature in [0, ln 100], as CLIP does after each update."""
    return {
        **params,
        "logit_scale": jnp.clip(params["logit_scale"], 0.0, MAX_LOGIT_SCALE),
    }


def create_train_state(
    model: CLIP,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rng: jax.Array,
    *,
    ema: bool = False,
) -> tuple[TrainState, Any]:
    """Initialise params and optimizer state directly sharded; returns (state, shardings).

    Shapes come from `jax.eval_shape` first, so nothing is allocated before the
    shardings are known; then `jax.jit(init, out_shardings=...)` creates each array on
    the devices that own it. `ema`: the state keeps an EMA of the params, starting
    equal to them (`train.ema_decay` > 0).
    """
    init_fn = _boxed_init_fn(model, tx, ema)
    shardings = sharding.logical_to_shardings(jax.eval_shape(init_fn, rng), mesh)
    state = jax.jit(lambda r: nn.meta.unbox(init_fn(r)), out_shardings=shardings)(rng)
    return state, shardings


def abstract_train_state(
    model: CLIP,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    *,
    ema: bool = False,
) -> tuple[TrainState, Any]:
    """Shapes, dtypes and shardings of the state, with nothing allocated (for restore);
    `ema` as in `create_train_state`."""
    init_fn = _boxed_init_fn(model, tx, ema)
    abstract = jax.eval_shape(init_fn, jax.random.key(0))
    shardings = sharding.logical_to_shardings(abstract, mesh)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        strip_axis_metadata(abstract),
        shardings,
    )
    return abstract, shardings


def named_leaves(tree: Any) -> dict[str, Any]:
    """A tree's leaves by their "/"-joined path ("visual/conv1/kernel")."""
    return {
        path_name(path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def put_sharded(host: Any, target: jax.ShapeDtypeStruct) -> jax.Array:
    """A host array as a global jax.Array of `target`'s shape, dtype and sharding.

    Every process passes the same full array and each copies only the slices its own
    devices hold (`jax.make_array_from_callback`), so it works on multi-process runs.
    """
    # The reshape admits a [1]-shaped scalar (OpenCLIP's nonscalar logit scale).
    host = np.asarray(host, target.dtype).reshape(target.shape)
    return jax.make_array_from_callback(
        target.shape, target.sharding, lambda index: host[index]
    )


def train_state_from_variables(
    variables: dict,
    tx: optax.GradientTransformation,
    abstract: TrainState,
    shardings: TrainState,
) -> TrainState:
    """A fresh state (step 0, new optimizer state) around given weights.

    `variables` holds host arrays (`params`, and `batch_stats` for ResNets) of exactly
    the shapes in `abstract` (from `abstract_train_state`, which also gives
    `shardings`); each lands directly sharded, and the optimizer state is created
    from them on the devices that own it. Where `abstract` has an EMA, it starts as
    another copy of the given params.
    """

    def place(tree: Any, collection: str) -> Any:
        host = named_leaves(variables.get(collection, {}))
        return jax.tree_util.tree_map_with_path(
            lambda path, target: put_sharded(host[path_name(path)], target), tree
        )

    params = place(abstract.params, "params")
    batch_stats = place(abstract.batch_stats, "batch_stats")
    ema_params = None
    if abstract.ema_params is not None:
        ema_params = place(abstract.ema_params, "params")

    def fresh(params: Any) -> tuple[jax.Array, Any, jax.Array, jax.Array]:
        zero = jnp.zeros((), jnp.int32)
        return zero, tx.init(params), zero, zero

    step, opt_state, streak, total = jax.jit(
        fresh,
        out_shardings=(
            shardings.step,
            shardings.opt_state,
            shardings.nonfinite_streak,
            shardings.nonfinite_total,
        ),
    )(params)
    return TrainState(
        step=step,
        params=params,
        opt_state=opt_state,
        batch_stats=batch_stats,
        nonfinite_streak=streak,
        nonfinite_total=total,
        ema_params=ema_params,
    )


def _boxed_init_fn(
    model: CLIP, tx: optax.GradientTransformation, ema: bool
) -> Callable[[jax.Array], TrainState]:
    """A function rng -> TrainState whose leaves still carry logical axis metadata."""

    def init(rng: jax.Array) -> TrainState:
        # Parameter shapes do not depend on the batch size: initialise on one example.
        variables = model.init(rng, *example_inputs(model), train=False)
        params = variables["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            batch_stats=variables.get("batch_stats", {}),
            nonfinite_streak=jnp.zeros((), jnp.int32),
            nonfinite_total=jnp.zeros((), jnp.int32),
            ema_params=init_ema(params) if ema else None,
        )

    return init
