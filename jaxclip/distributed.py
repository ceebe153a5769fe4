"""Multi-process start-up: `jax.distributed.initialize` from the config or environment.

Call `initialize(config)` once per process, before anything touches JAX devices
(`python -m jaxclip.train` does). Where the settings come from, first match wins:

1. explicit settings, each from its config field or else its environment variable:
   `distributed.coordinator_address` / `JAXCLIP_COORDINATOR` ("host:port" of process
   0), `distributed.num_processes` / `JAXCLIP_NUM_PROCESSES`, `distributed.process_id`
   / `JAXCLIP_PROCESS_ID`, and optionally `distributed.local_device_ids` /
   `JAXCLIP_LOCAL_DEVICE_IDS` ("0,1"); JAX's own `JAX_COORDINATOR_ADDRESS` counts too;
2. a cluster JAX detects by itself: a Cloud TPU VM (pod slice) or a SLURM job step
   with more than one task (one process per task);
3. nothing: one process, no distributed runtime.

`distributed.mode` picks: 'auto' (the above), 'on' (refuse to run as one process when
nothing is found), 'off' (never initialise, whatever the environment says).
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
from collections.abc import Callable, Sequence

import jax
import ml_collections

from jaxclip.config_rules import (
    BOOL,
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    ConfigError,
    Rule,
    check_fields,
    int_at_least,
    is_int,
    one_of,
)

ENV_COORDINATOR = "JAXCLIP_COORDINATOR"
ENV_NUM_PROCESSES = "JAXCLIP_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXCLIP_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "JAXCLIP_LOCAL_DEVICE_IDS"

# The variables JAX's SLURM detection reads (jax/_src/clusters/slurm_cluster.py).
_SLURM_VARS = (
    "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
)
_LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")

# --- The config's `distributed.*` fields and their rules (the modes: see above).

MODES = ("auto", "on", "off")


def _is_address(value) -> bool:
    """'host:port', or empty (no explicit coordinator)."""
    return isinstance(value, str) and (not value or value.rsplit(":", 1)[-1].isdigit())


def _are_device_ids(value) -> bool:
    return isinstance(value, (tuple, list)) and all(is_int(i) and i >= 0 for i in value)


DISTRIBUTED_RULES: dict[str, Rule] = {
    "distributed.mode": one_of(MODES),
    "distributed.coordinator_address": Rule(
        _is_address, "must be 'host:port' (the address of process 0) or empty"
    ),
    "distributed.num_processes": NON_NEGATIVE_INT,
    "distributed.process_id": int_at_least(-1),  # -1: from the environment
    "distributed.local_device_ids": Rule(
        _are_device_ids, "must be device indices >= 0"
    ),
    "distributed.initialization_timeout": POSITIVE_INT,
    "distributed.log_all_processes": BOOL,
}


def validate_distributed_config(config: ml_collections.ConfigDict) -> None:
    """The `distributed.*` fields (checked before the processes connect)."""
    check_fields(config, DISTRIBUTED_RULES)
    dist = config.distributed
    if dist.num_processes and dist.process_id >= dist.num_processes:
        raise ConfigError(
            f"distributed.process_id={dist.process_id} must be in [0, num_processes) "
            "(or -1: from the environment or cluster)"
        )


@dataclasses.dataclass(frozen=True)
class Setup:
    """How this process joined (or did not join) a multi-process run."""

    how: str  # 'off' | 'single' | 'explicit' | 'slurm' | 'tpu' | 'already'
    coordinator_address: str | None = None
    num_processes: int | None = None  # None: the cluster's (known after start-up)
    process_id: int | None = None


def explicit_settings(config: ml_collections.ConfigDict) -> Setup | None:
    """The explicit settings from the config, else the environment; None if unset.

    Raises ConfigError when only some of them are given.
    """
    dist = config.distributed
    coordinator = dist.coordinator_address or os.environ.get(ENV_COORDINATOR, "")
    num_processes = dist.num_processes or _env_int(ENV_NUM_PROCESSES, 0)
    process_id = (
        dist.process_id if dist.process_id >= 0 else _env_int(ENV_PROCESS_ID, -1)
    )
    given = {
        f"distributed.coordinator_address (or {ENV_COORDINATOR})": bool(coordinator),
        f"distributed.num_processes (or {ENV_NUM_PROCESSES})": num_processes > 0,
        f"distributed.process_id (or {ENV_PROCESS_ID})": process_id >= 0,
    }
    if not any(given.values()):
        return None
    if not all(given.values()):
        missing = ", ".join(name for name, ok in given.items() if not ok)
        raise ConfigError(
            f"explicit multi-process settings are incomplete: {missing} not set "
            "(give all three, or none to let a TPU or SLURM cluster be detected)"
        )
    if not 0 <= process_id < num_processes:
        raise ConfigError(
            f"distributed.process_id={process_id} must be in [0, num_processes="
            f"{num_processes})"
        )
    return Setup("explicit", coordinator, num_processes, process_id)


def detect_cluster() -> str | None:
    """'slurm' or 'tpu' when JAX can find the processes by itself, else None."""
    # One SLURM task is a plain single-process run inside an allocation.
    slurm = all(name in os.environ for name in _SLURM_VARS)
    if slurm and _env_int("SLURM_NTASKS", 1) > 1:
        return "slurm"
    if importlib.util.find_spec("libtpu") is not None and _tpu_chips_present():
        return "tpu"
    return None


def _tpu_chips_present() -> bool:
    # TPU v2-v4 chips appear as /dev/accel*, v5e and later as VFIO groups.
    return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def initialize(config: ml_collections.ConfigDict) -> Setup:
    """Join the multi-process run the config or environment describes (see above).

    Must run before anything touches JAX devices; calling it again is a no-op.
    """
    validate_distributed_config(config)
    mode = config.distributed.mode
    if mode == "off":
        return Setup("off")
    if jax.distributed.is_initialized():  # by the caller, or an earlier call
        return Setup("already")
    # Multi-process CPU collectives go over TCP with gloo (JAX's default in 0.10;
    # an explicit JAX_CPU_COLLECTIVES_IMPLEMENTATION, e.g. mpi, is kept).
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    timeout = config.distributed.initialization_timeout
    local_ids = _local_device_ids(config)
    setup = explicit_settings(config)
    if setup is not None:
        jax.distributed.initialize(
            coordinator_address=setup.coordinator_address,
            num_processes=setup.num_processes,
            process_id=setup.process_id,
            local_device_ids=local_ids,
            # Explicit means explicit: no cluster detection fills in the rest.
            cluster_detection_method="deactivate",
            initialization_timeout=timeout,
            coordinator_bind_address=_bind_address(setup.coordinator_address),
        )
        return setup
    if "JAX_COORDINATOR_ADDRESS" in os.environ:
        jax.distributed.initialize(
            local_device_ids=local_ids, initialization_timeout=timeout
        )
        return Setup("explicit", os.environ["JAX_COORDINATOR_ADDRESS"])
    cluster = detect_cluster()
    if cluster is not None:
        jax.distributed.initialize(
            local_device_ids=local_ids, initialization_timeout=timeout
        )
        return Setup(cluster)
    if mode == "on":
        raise ConfigError(
            "distributed.mode='on' but no multi-process settings were found: set "
            f"{ENV_COORDINATOR}, {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} (or the "
            "distributed.* fields), or run on a TPU pod slice or under SLURM srun"
        )
    return Setup("single")


def process_log(config: ml_collections.ConfigDict) -> Callable[..., None]:
    """`print` for progress lines: process 0 only, unless `distributed.log_all_processes`
    (then every process, each line prefixed with its index in multi-process runs)."""
    index, count = jax.process_index(), jax.process_count()
    if config.distributed.log_all_processes and count > 1:
        prefix = f"[process {index}/{count}]"
        return lambda *args, **kwargs: print(prefix, *args, **kwargs)
    if config.distributed.log_all_processes or index == 0:
        return print
    return lambda *args, **kwargs: None


def _local_device_ids(config: ml_collections.ConfigDict) -> Sequence[int] | None:
    ids = tuple(config.distributed.local_device_ids)
    if ids:
        return [int(i) for i in ids]
    text = os.environ.get(ENV_LOCAL_DEVICE_IDS, "").strip()
    if not text:
        return None
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(
            f"{ENV_LOCAL_DEVICE_IDS}={text!r} must be comma-separated device ids"
        ) from None


def _bind_address(coordinator: str) -> str | None:
    """Where process 0's coordinator listens: a loopback coordinator on loopback only
    (JAX binds every interface by default); JAX_COORDINATOR_BIND_ADDRESS wins."""
    if "JAX_COORDINATOR_BIND_ADDRESS" in os.environ:
        return os.environ["JAX_COORDINATOR_BIND_ADDRESS"]
    host = coordinator.rsplit(":", 1)[0]
    return coordinator if host in _LOOPBACK_HOSTS else None


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} must be an integer") from None
