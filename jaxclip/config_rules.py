"""What a config field may hold, said as data: a rule per field (a type, a range or a
choice among a registry's names) and the one function that checks a table of them.

The modules that own a choice (the model registry, the losses, the evaluators, the
data sources) export their names; `jaxclip.config` builds its table from them. This
module imports nothing from jaxclip, so any of them can use it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """A field's value must pass `ok`; else the error reads `<field>=<value> <wants>`."""

    ok: Callable[[Any], bool]
    wants: str

    def check(self, field: str, value: Any) -> None:
        """Raise ConfigError naming `field` unless `value` passes."""
        if not self.ok(value):
            raise ConfigError(f"{field}={value!r} {self.wants}")


def is_int(value: Any) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A Python or NumPy real number, not a bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, bool
    )


def one_of(choices: Iterable[str]) -> Rule:
    """One of a registry's names (a tuple, or a dict's keys)."""
    names = tuple(choices)
    return Rule(lambda value: value in names, f"must be one of {list(names)}")


def int_at_least(least: int) -> Rule:
    """An integer >= `least`."""
    return Rule(
        lambda value: is_int(value) and value >= least, f"must be an integer >= {least}"
    )


def number(ok: Callable[[float], bool], wants: str) -> Rule:
    """A real number that passes `ok` (NaN passes no comparison, so it is refused)."""
    return Rule(lambda value: is_number(value) and ok(value), wants)


POSITIVE_INT = Rule(
    lambda value: is_int(value) and value > 0, "must be a positive integer"
)
NON_NEGATIVE_INT = Rule(
    lambda value: is_int(value) and value >= 0, "must be a non-negative integer"
)
POSITIVE = number(lambda value: value > 0, "must be > 0")
NON_NEGATIVE = number(lambda value: value >= 0, "must be >= 0")
BOOL = Rule(lambda value: isinstance(value, bool), "must be a bool")


def lookup(config: Mapping[str, Any], field: str, prefix: str = "") -> Any:
    """The value at a dotted field name ("train.batch_size")."""
    node = config
    for part in field.split("."):
        if part not in node:
            raise ConfigError(f"config has no field {prefix + field!r}")
        node = node[part]
    return node


def check_fields(
    config: Mapping[str, Any], rules: Mapping[str, Rule], prefix: str = ""
) -> None:
    """Check each field of `rules` in order; the first that fails raises ConfigError
    (its name in the message is `prefix` + the field)."""
    for field, rule in rules.items():
        rule.check(prefix + field, lookup(config, field, prefix))
