"""Refuse bad configs with a message that names the field, before anything compiles."""

from __future__ import annotations

import os
import tempfile

import jax
import ml_collections
import numpy as np

from jaxclip.models.layers import REMAT_POLICIES
from jaxclip.models.registry import get_model_config
from jaxclip.sharding import BATCH_AXES, MESH_AXES, resolve_mesh_shape

LOSS_NAMES = ("clip", "siglip")
LOSS_IMPLS = ("dense",)
DTYPES = ("float32", "bfloat16")
DATA_SOURCES = ("shapes",)


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field."""


def validate_config(config: ml_collections.ConfigDict, workdir: str | None = None) -> None:
    """Check every field that can be checked without compiling; raise ConfigError."""
    _known_model(config.model.name)
    _check_choice(config.model.dtype, "model.dtype", DTYPES)
    _check_choice(config.model.remat, "model.remat", tuple(REMAT_POLICIES))
    _check_choice(config.loss.name, "loss.name", LOSS_NAMES)
    _check_choice(config.loss.impl, "loss.impl", LOSS_IMPLS)
    _check_choice(config.data.source, "data.source", DATA_SOURCES)
    for field in ("train.batch_size", "train.steps", "log.every_steps"):
        _positive_int(config, field)
    for field in ("checkpoint.every_steps", "optim.warmup_steps", "eval.every_steps"):
        _non_negative_int(config, field)
    _positive_int(config, "checkpoint.keep")
    for field in ("optim.lr", "optim.eps"):
        if not _lookup(config, field) > 0:
            raise ConfigError(f"{field}={_lookup(config, field)!r} must be > 0")
    for field in ("optim.b1", "optim.b2"):
        if not 0 <= _lookup(config, field) < 1:
            raise ConfigError(f"{field}={_lookup(config, field)!r} must be in [0, 1)")
    if config.optim.weight_decay < 0 or config.optim.grad_clip_norm < 0:
        raise ConfigError("optim.weight_decay and optim.grad_clip_norm must be >= 0")
    if len(config.data.mean) != 3 or len(config.data.std) != 3:
        raise ConfigError("data.mean and data.std need 3 values (RGB)")

    try:
        mesh_shape = resolve_mesh_shape(config.mesh.shape, jax.device_count())
    except ValueError as e:
        raise ConfigError(str(e)) from None
    batch_shards = int(np.prod([mesh_shape[MESH_AXES.index(a)] for a in BATCH_AXES]))
    if config.train.batch_size % batch_shards:
        raise ConfigError(
            f"train.batch_size={config.train.batch_size} is not divisible by the "
            f"{batch_shards} batch shards of mesh.shape={mesh_shape} (axes {BATCH_AXES})"
        )
    if config.train.batch_size % jax.process_count():
        raise ConfigError(
            f"train.batch_size={config.train.batch_size} is not divisible by the "
            f"{jax.process_count()} processes"
        )
    if workdir is not None:
        check_workdir(workdir)


def check_workdir(workdir: str) -> None:
    """The workdir must exist or be creatable, and be writable."""
    if not workdir:
        raise ConfigError("--workdir is required")
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_test"):
            pass
    except OSError as e:
        raise ConfigError(
            f"--workdir={workdir!r} cannot be created or written: {e.strerror or e}"
        ) from None


def _known_model(name: str) -> None:
    try:
        get_model_config(name)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check_choice(value, field: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{field}={value!r}; expected one of {list(choices)}")


def _lookup(config: ml_collections.ConfigDict, field: str):
    node = config
    for part in field.split("."):
        if part not in node:
            raise ConfigError(f"config has no field {field!r}")
        node = node[part]
    return node


def _positive_int(config: ml_collections.ConfigDict, field: str) -> None:
    value = _lookup(config, field)
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{field}={value!r} must be a positive integer")


def _non_negative_int(config: ml_collections.ConfigDict, field: str) -> None:
    value = _lookup(config, field)
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{field}={value!r} must be a non-negative integer")
