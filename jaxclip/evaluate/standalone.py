"""Evaluating saved weights without training: the body of `python -m jaxclip.evaluate`.

Kept apart from the command line (`__main__.py`) so it can be called from Python: the
command's flags are process-wide, and two commands' flags cannot share a process.
"""

from __future__ import annotations

import os


def evaluate_checkpoint(config, checkpoint: str, names: list[str]) -> dict:
    """Run the config's evaluators (or `names`) on the weights at `checkpoint`; those
    with `params='ema'` on its EMA of the parameters (a jaxclip run's, else an error)."""
    import jax

    from jaxclip import sharding
    from jaxclip.config import ConfigError, validate_evals_config
    from jaxclip.convert.files import load_weights
    from jaxclip.data.tokenizer import TokenizerSpec
    from jaxclip.evaluate.evaluators import (
        check_model,
        make_evaluators,
        run_all,
        weights_of,
    )
    from jaxclip.models.build import create_model

    # The model is the weights', not model.name's: checked once they are read.
    validate_evals_config(config, check_model=False)
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
    check_model(evals, weights.config, weights.name)
    ema_weights = None
    if any(weights_of(entry) == "ema" for entry in evals.values()):
        ema_weights = load_weights(checkpoint, ema=True)
    model = create_model(
        weights.config,
        use_logit_bias=weights.logit_bias,
        dtype=config.model.dtype,
        scan=config.model.scan,
    )
    with sharding.use_mesh(mesh):
        variables = jax.device_put(weights.variables, sharding.replicated(mesh))
        evaluators = make_evaluators(
            evals,
            model,
            # The pixels are normalised as the weights were trained, whatever the
            # config says.
            weights.mean,
            weights.std,
            mesh,
            # The weights' own tokenizer where they carry one (an HF SigLIP
            # directory's), else the config's.
            weights.tokenizer
            if weights.tokenizer.kind != "clip"
            else TokenizerSpec.for_model(config.data, weights.config.text.vocab_size),
            config.seed,
        )
        ema_variables = None
        if ema_weights is not None:
            ema_variables = jax.device_put(
                ema_weights.variables, sharding.replicated(mesh)
            )
        results = run_all(evaluators, variables, ema_variables)
    return {
        "checkpoint": os.path.abspath(checkpoint),
        "source": weights.source,
        "model": weights.name,
        "results": results,
    }
