"""Command line: evaluate weights with the evaluators a config lists.

    python -m jaxclip.evaluate --checkpoint=WORKDIR [--config=configs/x.py] \\
        [--output=results.json] [--evals=name,name] [--config.evals.NAME.FIELD=...]

`--checkpoint` is anything `jaxclip.load` reads: a jaxclip workdir or checkpoint step,
an OpenAI or OpenCLIP weights file or directory, a Hugging Face CLIPModel or
SiglipModel directory. The architecture comes from the weights (and the tokenizer, from
an HF SigLIP directory that holds its files); the config gives the evaluators
(`config.evals`), the mesh, the compute dtype and otherwise the tokenizer. Without `--config`,
a jaxclip run is evaluated with the config it was trained with (saved in its
checkpoint, overrides included); `--config.X=Y` still changes any of it. An evaluator
the config does not have is added with one flag per field, `kind` and `dataset` first
(`jaxclip/cli.py`). Every process evaluates (each embeds its share); process 0 writes
`results.json`:
{"checkpoint": ..., "source": ..., "model": ..., "results": {"<eval>/<metric>": value}}.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jaxclip.cli import (
    NewEvaluators,
    add_evaluators,
    flag_value,
    load_config_file,
    split_new_evaluators,
)

flags.DEFINE_string("checkpoint", None, "Weights to evaluate (see the docstring).")
flags.DEFINE_string("output", "results.json", "Where process 0 writes the results.")
flags.DEFINE_list("evals", [], "Only these evaluators of config.evals (default: all).")


_NEW_EVALUATORS: NewEvaluators = {}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS.checkpoint:
        raise app.UsageError("--checkpoint is required")
    if flags.FLAGS.config is None:
        raise app.UsageError(
            f"--config is required: {flags.FLAGS.checkpoint} is not a jaxclip run, "
            "whose saved config would give the evaluators"
        )
    import jax

    from jaxclip import distributed
    from jaxclip.config import ConfigError
    from jaxclip.evaluate.standalone import evaluate_checkpoint

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    config = flags.FLAGS.config
    try:
        add_evaluators(config, _NEW_EVALUATORS)
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


def define_config_flag(argv: list[str]) -> list[str]:
    """Define `--config`: the given file, else the config the run at `--checkpoint`
    saved; returns argv without the flags of evaluators the config lacks (ml_collections
    reads the overrides from argv when the flag is defined, so they go first)."""
    from jaxclip.convert.checkpoint import run_config

    help_text = "Config file with get_config(arg) (default: the run's own config)."
    spec, checkpoint = flag_value(argv, "config"), flag_value(argv, "checkpoint")
    saved = run_config(checkpoint) if spec is None and checkpoint else None
    known = None
    if saved is not None:
        known = saved.evals.keys()
    elif spec and any(arg.startswith("--config.evals.") for arg in argv):
        known = load_config_file(spec).evals.keys()
    if known is not None:
        argv, new = split_new_evaluators(argv, known)
        _NEW_EVALUATORS.update(new)
    if saved is not None:
        config_flags.DEFINE_config_dict(
            "config", saved, help_text, lock_config=True, sys_argv=argv
        )
    else:
        config_flags.DEFINE_config_file(
            "config", None, help_text, lock_config=True, sys_argv=argv
        )
    return argv


# At import, as flags are defined: ml_collections reads the overrides from sys.argv
# when the config flag is defined.
_ARGV = define_config_flag(sys.argv)

if __name__ == "__main__":
    app.run(main, _ARGV)
