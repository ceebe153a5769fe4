"""Evaluating saved weights without training: the body of `python -m jaxclip.evaluate`.

Kept apart from the command line (`__main__.py`) so it can be called from Python: the
command's flags are process-wide, and two commands' flags cannot share a process.
"""

from __future__ import annotations

import os


def evaluate_checkpoint(config, checkpoint: str, names: list[str]) -> dict:
    """Run the config's evaluators (or `names`) on the weights at `checkpoint`."""
    import jax
    import jax.numpy as jnp

    from jaxclip import sharding
    from jaxclip.config import ConfigError, validate_evals_config
    from jaxclip.convert.files import load_weights
    from jaxclip.data.tokenizer import TokenizerSpec
    from jaxclip.evaluate.evaluators import make_evaluators, run_all
    from jaxclip.models.clip import CLIP
    from jaxclip.train.loop import use_scan
    from jaxclip.train.step import make_encode_fns

    validate_evals_config(config)
    unknown = sorted(set(names) - set(config.evals.keys()))
    if unknown:
        raise ConfigError(
            f"--evals: {unknown} not in config.evals ({sorted(config.evals.keys())})"
        )
    evals = {n: config.evals[n] for n in names or config.evals.keys()}
    if not evals:
        raise ConfigError("the config lists no evaluators (config.evals is empty)")
    try:
        mesh = sharding.make_mesh(config.mesh.shape)
    except ValueError as e:
        raise ConfigError(str(e)) from None

    weights = load_weights(checkpoint)
    model = CLIP(
        weights.config,
        logit_bias=weights.logit_bias,
        dtype=jnp.dtype(config.model.dtype),
        scan=use_scan(config.model.scan),
    )
    # The pixels are normalised as the weights were trained, whatever the config says.
    config.data.mean, config.data.std = tuple(weights.mean), tuple(weights.std)
    variables = jax.device_put(weights.variables, sharding.replicated(mesh))
    evaluators = make_evaluators(
        evals,
        make_encode_fns(config, model, mesh),
        mesh,
        weights.config.vision.image_size,
        weights.config.text.context_length,
        TokenizerSpec(config.data.tokenizer, config.data.tokenizer_model),
        config.seed,
    )
    return {
        "checkpoint": os.path.abspath(checkpoint),
        "source": weights.source,
        "model": weights.name,
        "results": run_all(evaluators, variables),
    }
