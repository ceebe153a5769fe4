"""What the command lines share beyond ml_collections' config flags.

`--config.X=Y` overrides only fields a config already has. An evaluator is an entry
of `config.evals`, and a user adds one the same way they would change one, a flag per
field: `--config.evals.hidden.kind=zeroshot --config.evals.hidden.dataset=folder
--config.evals.hidden.path=/data/hidden`. `split_new_evaluators` takes the flags of
evaluators the config does not have out of argv before absl parses them, and
`add_evaluators` adds those entries (`evaluators.spec`) once the config is loaded.
"""

from __future__ import annotations

import ast
import os
import re
from collections.abc import Iterable, Sequence

import ml_collections

from jaxclip.config_rules import ConfigError

EVAL_FLAG = re.compile(r"^--config\.evals\.([A-Za-z_]\w*)\.([A-Za-z_]\w*)=(.*)$", re.S)

NewEvaluators = dict[str, dict[str, str]]  # name -> {field: the flag's text}


def flag_value(argv: Sequence[str], name: str) -> str | None:
    """The value of `--name=value` (or `--name value`) in argv, if given."""
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """`path[:arg]` as `--config=` takes it: the file's `get_config(arg)`."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config={spec}: {path} does not exist")
    from jaxclip.config import load_file

    return load_file(path).get_config(arg or None)


def split_new_evaluators(
    argv: Sequence[str], known: Iterable[str]
) -> tuple[list[str], NewEvaluators]:
    """(argv without the flags of evaluators not in `known`, those evaluators)."""
    known = set(known)
    rest, new = [], {}
    for arg in argv:
        match = EVAL_FLAG.match(arg)
        if match and match.group(1) not in known:
            name, field, text = match.groups()
            new.setdefault(name, {})[field] = text
        else:
            rest.append(arg)
    return rest, new


def add_evaluators(config: ml_collections.ConfigDict, new: NewEvaluators) -> None:
    """Add each new evaluator to `config.evals`, its fields parsed to their defaults'
    types; refuse one without a kind and a dataset, or with an unknown field."""
    from jaxclip.evaluate import evaluators

    for name, fields in new.items():
        missing = [field for field in ("kind", "dataset") if field not in fields]
        if missing:
            raise ConfigError(
                f"--config.evals.{name}.*: config.evals has no evaluator {name!r}; "
                f"adding one needs --config.evals.{name}.kind and "
                f"--config.evals.{name}.dataset (missing: {', '.join(missing)})"
            )
        entry = evaluators.spec(fields["kind"], fields["dataset"])
        for field, text in fields.items():
            if field not in entry:
                raise ConfigError(
                    f"--config.evals.{name}.{field}: an evaluator has no field "
                    f"{field!r} (fields: {sorted(entry.keys())})"
                )
            entry[field] = _parse(text, entry[field], f"config.evals.{name}.{field}")
        with config.unlocked():
            config.evals[name] = entry


def _parse(text: str, default: object, field: str) -> object:
    """The flag's text as the type of the field's default."""
    if isinstance(default, str):
        return text
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ConfigError(f"--{field}={text!r} must be true or false")
        return text.lower() in ("true", "1")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ConfigError(
            f"--{field}={text!r} must be of type {type(default).__name__}"
        ) from None
    if isinstance(default, float) and isinstance(value, int):
        value = float(value)
    if not isinstance(value, type(default)):
        raise ConfigError(
            f"--{field}={text!r} must be of type {type(default).__name__}"
        )
    return value
