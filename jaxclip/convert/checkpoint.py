"""Reading the weights out of a jaxclip training checkpoint (orbax), without training.

A checkpoint step holds `state` (params, optimizer state, BatchNorm statistics, step,
and `ema_params` when the run keeps an EMA of the params), `data` and `config`. Only
`params` (or `ema_params`) and `batch_stats` are read, as host NumPy arrays, so a
checkpoint written on a TPU pod or 8 devices loads on a laptop.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jaxclip.models.build import abstract_variables, create_model
from jaxclip.models.registry import ModelConfig, get_model_config


@dataclasses.dataclass(frozen=True)
class CheckpointWeights:
    """Weights and what the training config says about them."""

    name: str
    config: ModelConfig
    variables: dict
    mean: tuple[float, ...]
    std: tuple[float, ...]
    step: int
    path: str
    tokenizer: tuple[str, str] = ("clip", "")  # data.tokenizer, data.tokenizer_model


def _is_step_dir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "state")) and os.path.isdir(
        os.path.join(path, "config")
    )


def find_step_dir(path: str) -> str | None:
    """The newest complete step directory under a workdir, checkpoints dir or step dir.

    Orbax writes a step into a temporary directory and renames it when complete, so
    every directory whose name is a number is a complete step.
    """
    if _is_step_dir(path):
        return path
    for directory in (os.path.join(path, "checkpoints"), path):
        if not os.path.isdir(directory):
            continue
        steps = [
            int(name)
            for name in os.listdir(directory)
            if name.isdigit() and _is_step_dir(os.path.join(directory, name))
        ]
        if steps:
            return os.path.join(directory, str(max(steps)))
    return None


def read_checkpoint(path: str, ema: bool = False) -> CheckpointWeights:
    """Params and BatchNorm statistics of the newest step under `path`; with `ema`,
    the EMA of the params (`train.ema_decay` > 0) as the params."""
    step_dir = find_step_dir(path)
    if step_dir is None:
        raise FileNotFoundError(f"no jaxclip checkpoint step under {path}")
    config_dict = _read_json(os.path.join(step_dir, "config"))
    try:
        name = config_dict["model"]["name"]
        logit_bias = config_dict.get("loss", {}).get("name", "clip") == "siglip"
    except (KeyError, TypeError) as error:
        raise ValueError(f"{step_dir}/config has no model.name") from error
    config = get_model_config(name)
    model = create_model(config, use_logit_bias=logit_bias, sharded=False)
    abstract = abstract_variables(model)
    # The EMA has the params' tree: read into its place, then named params below.
    weights_key = "ema_params" if ema else "params"
    target = {weights_key: abstract["params"]}
    if abstract.get("batch_stats"):
        target["batch_stats"] = abstract["batch_stats"]
    # Host arrays: independent of the mesh and device count that saved them.
    restore_args = jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target
    )
    # The handler, not a Checkpointer: a Checkpointer reads a step's
    # _CHECKPOINT_METADATA from the item directory it is given and warns that it is
    # missing (jaxclip's steps hold it one level up, beside state, data and config).
    handler = ocp.PyTreeCheckpointHandler()
    state_dir = os.path.join(step_dir, "state")
    if ema and "ema_params" not in handler.metadata(epath.Path(state_dir)).tree:
        raise ValueError(
            f"checkpoint {step_dir} holds no EMA of the parameters (its run had "
            "train.ema_decay=0); read its params instead (without ema / --ema)"
        )
    _check_shapes(handler, state_dir, target, name)
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # orbax logs INFO/WARNING lines on every read
    try:
        variables = handler.restore(
            epath.Path(state_dir),
            args=ocp.args.PyTreeRestore(
                item=target, restore_args=restore_args, partial_restore=True
            ),
        )
    finally:
        absl_logger.setLevel(level)
    variables["params"] = variables.pop(weights_key)
    data = config_dict.get("data", {})
    return CheckpointWeights(
        name=name,
        config=config,
        variables=variables,
        mean=tuple(data.get("mean", ())),
        std=tuple(data.get("std", ())),
        step=int(os.path.basename(step_dir)),
        path=step_dir,
        tokenizer=(data.get("tokenizer", "clip"), data.get("tokenizer_model", "")),
    )


def run_config(path: str) -> Any:
    """The config a jaxclip run saved with its newest checkpoint (an
    `ml_collections.ConfigDict`), or None when `path` is not a jaxclip run."""
    import ml_collections

    step_dir = find_step_dir(path)
    if step_dir is None or not os.path.isdir(os.path.join(step_dir, "config")):
        return None
    saved = _read_json(os.path.join(step_dir, "config"))
    return ml_collections.ConfigDict(_tuples(saved))


def _tuples(value: Any) -> Any:
    """JSON's lists back to the tuples a config holds (and overrides only as such)."""
    if isinstance(value, dict):
        return {key: _tuples(item) for key, item in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(item) for item in value)
    return value


def _read_json(item_dir: str) -> Any:
    return ocp.JsonCheckpointHandler().restore(epath.Path(item_dir))


def _check_shapes(handler: Any, state_dir: str, target: dict, name: str) -> None:
    """A clear error when the saved arrays do not fit `name`'s architecture."""
    saved = handler.metadata(epath.Path(state_dir)).tree
    expected = {
        jax.tree_util.keystr(path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(target)
    }
    found = {
        jax.tree_util.keystr(path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(
            {key: saved[key] for key in target if key in saved}
        )
    }
    problems = [f"missing {key}" for key in expected if key not in found]
    problems += [
        f"{key}: saved {list(found[key])}, {name} has {list(shape)}"
        for key, shape in expected.items()
        if key in found and found[key] != shape
    ]
    if problems:
        raise ValueError(
            f"checkpoint {state_dir} does not match model.name={name!r}:\n  "
            + "\n  ".join(problems[:8])
        )
