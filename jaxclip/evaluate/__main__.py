"""Command line: evaluate weights with the evaluators a config lists.

    python -m jaxclip.evaluate --config=configs/digits.py --checkpoint=DIR \\
        [--output=results.json] [--evals=name,name]

`--checkpoint` is anything `jaxclip.load` reads: a jaxclip workdir or checkpoint step,
an OpenAI or OpenCLIP weights file or directory, a Hugging Face CLIPModel directory.
The architecture comes from the weights; the config gives the evaluators
(`config.evals`), the mesh, the compute dtype and the tokenizer. Every process
evaluates (each embeds its share); process 0 writes `results.json`:
{"checkpoint": ..., "source": ..., "model": ..., "results": {"<eval>/<metric>": value}}.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file(
    "config", None, "Path to a config file with get_config(arg).", lock_config=True
)
flags.DEFINE_string("checkpoint", None, "Weights to evaluate (see the docstring).")
flags.DEFINE_string("output", "results.json", "Where process 0 writes the results.")
flags.DEFINE_list("evals", [], "Only these evaluators of config.evals (default: all).")


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


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if flags.FLAGS.config is None:
        raise app.UsageError("--config is required (a config listing config.evals)")
    if not flags.FLAGS.checkpoint:
        raise app.UsageError("--checkpoint is required")
    import jax

    from jaxclip import distributed
    from jaxclip.config import ConfigError

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    config = flags.FLAGS.config
    try:
        distributed.initialize(config)
        report = evaluate_checkpoint(config, flags.FLAGS.checkpoint, flags.FLAGS.evals)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if jax.process_index() == 0:
        for metric, value in report["results"].items():
            print(f"{metric}: {value:.4f}")
        output = os.path.abspath(flags.FLAGS.output)
        os.makedirs(os.path.dirname(output), exist_ok=True)
        with open(output, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {output}")


if __name__ == "__main__":
    app.run(main)
