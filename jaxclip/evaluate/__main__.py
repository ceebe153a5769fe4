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
    from jaxclip.evaluate.standalone import evaluate_checkpoint

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
