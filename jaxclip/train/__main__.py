"""Command line: `python -m jaxclip.train --config=configs/demo.py --workdir=DIR`.

Any config field can be overridden, e.g. `--config.train.batch_size=4096`; a config
argument follows a colon, e.g. `--config=configs/vit_b16.py:res=224`. An evaluator the
config does not have is added with one flag per field, `kind` and `dataset` first:
`--config.evals.hidden.kind=zeroshot --config.evals.hidden.dataset=folder ...`.
"""

from __future__ import annotations

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

_DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "configs",
    "demo.py",
)

flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics.")

_NEW_EVALUATORS: NewEvaluators = {}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax

    from jaxclip import distributed
    from jaxclip.config import ConfigError
    from jaxclip.train.guard import NonFiniteError
    from jaxclip.train.loop import train_and_evaluate

    if not flags.FLAGS["verbosity"].present:
        # orbax logs every checkpoint step at INFO; progress lines are what users read.
        logging.set_verbosity(logging.WARNING)
    if not flags.FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    try:
        # Before anything touches the devices: join the other processes, if any.
        config = flags.FLAGS.config
        add_evaluators(config, _NEW_EVALUATORS)
        setup = distributed.initialize(config)
        if jax.process_count() > 1:
            distributed.process_log(config)(
                f"{jax.process_count()} processes ({setup.how}); this is process "
                f"{jax.process_index()}"
            )
            if jax.process_index() and not config.distributed.log_all_processes:
                logging.set_verbosity(logging.ERROR)  # one copy of each warning, not N
        results = train_and_evaluate(config, flags.FLAGS.workdir)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if jax.process_index() == 0:
        # The evaluators' results (`<evaluator>/<metric>`), e.g. zeroshot/top1.
        for name in sorted(config.evals.keys()):
            for metric, value in sorted(results.items()):
                if metric.startswith(f"{name}/") and not metric.endswith("/seconds"):
                    print(f"{metric}: {value:.4f}")


def define_config_flag(argv: list[str]) -> list[str]:
    """Define `--config`; returns argv without the flags of evaluators the config
    lacks (ml_collections reads the overrides from argv when the flag is defined)."""
    if any(arg.startswith("--config.evals.") for arg in argv):
        known = load_config_file(flag_value(argv, "config") or _DEFAULT_CONFIG).evals
        argv, new = split_new_evaluators(argv, known.keys())
        _NEW_EVALUATORS.update(new)
    config_flags.DEFINE_config_file(
        "config",
        _DEFAULT_CONFIG,
        "Path to a config file with get_config(arg).",
        lock_config=True,
        sys_argv=argv,
    )
    return argv


# At import, as flags are defined: ml_collections reads the overrides from sys.argv
# when the config flag is defined.
_ARGV = define_config_flag(sys.argv)

if __name__ == "__main__":
    app.run(main, _ARGV)
