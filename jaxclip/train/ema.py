"""An exponential moving average (EMA) of the parameters, kept in the train state.

With `train.ema_decay` = d > 0 the state holds `ema_params`: a float32 copy of the
params with their shardings, equal to the params the run starts from (the seed's or
`model.init_from`'s), and after every applied step

    ema = d * ema + (1 - d) * params

computed inside the jitted step as `ema + (1 - d) * (params - ema)`, which loses less
to rounding when the two are close (d near 1). A step whose update is skipped as
non-finite leaves the EMA bit for bit, as it leaves the params.

`train.ema_warmup` makes the decay at step t (0-based: the step being taken, as the
learning-rate schedule counts) min(d, (1 + t) / (10 + t)), TensorFlow's
`ExponentialMovingAverage(num_updates=...)` and timm's `ModelEma` rule: 0.1 at the
first step, 0.5 at step 8, 0.99 at step 890, so that the EMA soon forgets the random
initialisation; without it the initial params weigh d^t after t steps.

With d = 0 the state's `ema_params` is None: no memory, and the checkpoint's layout
is the one written before the EMA existed (`train/checkpoint.py`). Evaluators read the
EMA with `evaluators.spec(..., params='ema')`; `jaxclip.convert.load_weights(workdir,
ema=True)` and `python -m jaxclip.convert --ema` export it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

# TensorFlow's and timm's warm-up: the decay at step t is at most (1 + t) / (10 + t).
WARMUP_OFFSET = 10.0


def enabled(config: ml_collections.ConfigDict) -> bool:
    """Whether the run keeps an EMA of the params (`train.ema_decay` > 0)."""
    return config.train.ema_decay > 0


def init_ema(params: Any) -> Any:
    """The EMA's start: a float32 copy of `params` (inside `jax.jit`, created with the
    shardings the caller gives; boxed params keep their logical axis names)."""
    return jax.tree.map(lambda param: param.astype(jnp.float32), params)


def copy_params(params: Any, target: Any) -> Any:
    """An EMA starting at the given params (device arrays): float32 copies in buffers of
    their own (the step donates both), with the shardings of `target` (the state's
    `ema_params` as ShapeDtypeStructs), made in one program."""
    shardings = jax.tree.map(lambda leaf: leaf.sharding, target)
    copy = lambda params: jax.tree.map(jnp.copy, init_ema(params))  # noqa: E731
    return jax.jit(copy, out_shardings=shardings)(params)


def decay_at(config: ml_collections.ConfigDict, step: jax.Array) -> jax.Array:
    """The EMA's decay at `step` (the 0-based step being taken), float32."""
    decay = jnp.float32(config.train.ema_decay)
    if not config.train.ema_warmup:
        return decay
    step = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (WARMUP_OFFSET + step))


def update_ema(
    config: ml_collections.ConfigDict,
    ema_params: Any,
    params: Any,
    step: jax.Array,
    applied: jax.Array,
) -> Any:
    """The EMA after a step to `params`, or unchanged when the step's update was not
    `applied` (or when the run keeps no EMA: `ema_params` None)."""
    if ema_params is None:
        return None
    weight = 1.0 - decay_at(config, step)  # float32: 1 - d rounded once

    def moved() -> Any:
        return jax.tree.map(
            lambda ema, param: ema + weight * (param.astype(jnp.float32) - ema),
            ema_params,
            params,
        )

    # A branch, as for the optimizer update: a skipped step reads nothing more.
    return jax.lax.cond(applied, moved, lambda: ema_params)
