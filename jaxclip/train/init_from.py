"""Starting a run from existing weights (`model.init_from`).

Any source `jaxclip.convert.load_weights` reads: a jaxclip workdir or checkpoint, an
OpenCLIP file or directory, a Hugging Face CLIPModel or SiglipModel directory,
hf-hub:ORG/REPO. The
weights must fit the model the config builds exactly: every parameter and BatchNorm
statistic, every shape, and SigLIP's logit bias. The step, the optimizer state and the
data position start afresh. Only a fresh run reads them: `loop.restore_or_init`
resumes a workdir that has a checkpoint and ignores `model.init_from`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import optax

from jaxclip.config import ConfigError
from jaxclip.convert import Weights, load_weights
from jaxclip.convert.checkpoint import find_step_dir
from jaxclip.convert.openclip import check_keys
from jaxclip.models.build import count_params
from jaxclip.models.clip import CLIP
from jaxclip.train import ema
from jaxclip.train.state import (
    TrainState,
    abstract_train_state,
    named_leaves,
    train_state_from_variables,
)


def init_from_weights(
    config: ml_collections.ConfigDict,
    model: CLIP,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    log: Callable[..., None],
) -> tuple[TrainState, Any]:
    """A fresh state whose params (and BatchNorm statistics) are `model.init_from`'s,
    placed with the state's shardings (and the EMA, if kept, starting equal to
    them); returns (state, shardings).

    Every process reads the whole file and places only its own devices' slices.
    """
    abstract, shardings = abstract_train_state(model, tx, mesh, ema=ema.enabled(config))
    target = {"params": abstract.params, "batch_stats": abstract.batch_stats}
    weights = read_init_weights(config, target)
    if weights.config != model.config:
        # Only a jaxclip checkpoint gets here (other sources are read as model.name):
        # same shapes, another architecture, e.g. QuickGELU instead of GELU.
        log(
            f"note: {weights.source} was trained as model.name={weights.name!r}; it "
            f"has the shapes of model.name={config.model.name!r}, which is trained now"
        )
    state = train_state_from_variables(weights.variables, tx, abstract, shardings)
    log(
        f"initialised from {weights.source} ({count_params(state.params):,} parameters)"
    )
    return state, shardings


def read_init_weights(config: ml_collections.ConfigDict, target: dict) -> Weights:
    """`model.init_from`'s weights as host arrays, checked against `target` (the
    shapes of the model's `params` and `batch_stats`); a ConfigError lists every
    difference, naming the source and `model.name`."""
    source, name = config.model.init_from, config.model.name
    # A jaxclip checkpoint records its architecture: it is read as saved and compared
    # below, key by key (load_weights' `name` check would only say the names differ).
    # Other formats are read into model.name's layout, which checks the architecture
    # and lists the file's keys and shapes that do not fit it.
    is_checkpoint = os.path.isdir(source) and find_step_dir(source) is not None
    try:
        weights = load_weights(source, name=None if is_checkpoint else name)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(
            f"model.init_from={source!r} cannot be read into model.name={name!r}: "
            f"{error}"
        ) from error
    check_logit_bias(weights, config, "logit_bias" in target["params"])
    expected = {
        f"{collection}/{key}": leaf.shape
        for collection, tree in target.items()
        for key, leaf in named_leaves(tree).items()
    }
    found = {
        f"{collection}/{key}": leaf
        for collection in target
        for key, leaf in named_leaves(weights.variables.get(collection, {})).items()
    }
    try:
        check_keys(
            found,
            expected,
            f"model.init_from: {weights.source} does not match model.name={name!r}",
            ignore=lambda key: False,
        )
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return weights


def check_logit_bias(
    weights: Weights, config: ml_collections.ConfigDict, model_has_bias: bool
) -> None:
    """SigLIP's logit bias is in both the weights and the model, or in neither."""
    if weights.logit_bias == model_has_bias:
        return
    if weights.logit_bias:
        raise ConfigError(
            f"model.init_from: {weights.source} has a logit bias (a SigLIP-style "
            f"model), but loss.name={config.loss.name!r} builds model.name="
            f"{config.model.name!r} without one: set loss.name='siglip' to train it"
        )
    raise ConfigError(
        f"model.init_from: {weights.source} has no logit bias, but "
        f"loss.name={config.loss.name!r} builds model.name={config.model.name!r} with "
        "one: set loss.name='clip', or start from SigLIP-style weights"
    )
