"""The recipes in configs/, loaded as the command line loads them (they are files, not
a package), for tests that need a recipe in this process."""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType

import ml_collections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def recipe_module(name: str) -> ModuleType:
    """configs/<name>.py as a module."""
    spec = importlib.util.spec_from_file_location(
        f"configs_{name}", os.path.join(REPO, "configs", f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def recipe(
    name: str, arg: str | None = None, overrides: dict | None = None
) -> ml_collections.ConfigDict:
    """configs/<name>.py's config, with dotted overrides ({"train.steps": 5}) applied
    as `--config.train.steps=5` would apply them."""
    config = recipe_module(name).get_config(arg)
    config.update_from_flattened_dict(overrides or {})
    return config
