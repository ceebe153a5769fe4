"""Configs for tests, built one way: a base (the library's default, a recipe from
configs/, or the tiny training config below) with dotted overrides applied as the
command line applies `--config.train.steps=5`."""

from __future__ import annotations

import os
from types import ModuleType

import ml_collections

from jaxclip.config import base_config, load_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def override(
    config: ml_collections.ConfigDict, overrides: dict | None = None
) -> ml_collections.ConfigDict:
    """`config` with dotted overrides ({"train.steps": 5}) applied in place, each
    type-checked as `--config.train.steps=5` is; returns `config`."""
    config.update_from_flattened_dict(overrides or {})
    return config


def base(overrides: dict | None = None) -> ml_collections.ConfigDict:
    """The library's default config with `overrides`."""
    return override(base_config(), overrides)


def recipe_module(name: str) -> ModuleType:
    """configs/<name>.py as a module (the recipes are files, not a package)."""
    return load_file(os.path.join(REPO, "configs", f"{name}.py"))


def recipe(
    name: str, arg: str | None = None, overrides: dict | None = None
) -> ml_collections.ConfigDict:
    """configs/<name>.py's config, with `overrides`."""
    return override(recipe_module(name).get_config(arg), overrides)


def tiny_config(
    model_name: str = "tiny-vit", overrides: dict | None = None
) -> ml_collections.ConfigDict:
    """A tiny model trained a few steps on the shapes data, for the train-step tests;
    then `overrides`."""
    config = base(
        {
            "model.name": model_name,
            "model.scan": True,
            "train.batch_size": 16,
            "train.steps": 3,
            "optim.lr": 1e-3,
            "optim.warmup_steps": 0,  # a non-zero learning rate from the first step
            # Adam's eps at 1e-3, not 1e-6: a gradient near eps (a channel that
            # barely gets any) makes g / (|g| + eps) amplify float32 rounding, which
            # differs between a sharded and a one-device reduction, into a tenth of a
            # step (measured 1.2e-4 on tiny-rn). With 1e-3 the meshes agree to 1e-7
            # and the tolerances test the sharding, not Adam's conditioning.
            "optim.eps": 1e-3,
            "log.every_steps": 1,
            "checkpoint.every_steps": 0,
        }
    )
    return override(config, overrides)
