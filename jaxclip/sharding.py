"""Device mesh, logical-axis rules and the shardings of params and batches.

Layers name their axes logically (`batch`, `embed`, `mlp`, ...); the rules below map
those names onto the mesh axes `('data', 'fsdp', 'tensor')`. The batch is split over
`('data', 'fsdp')`; parameters are split over `fsdp` along `embed` (ZeRO-3 style) and
over `tensor` along heads, MLP width and vocabulary. Flax skips a rule whose mesh axis is
already taken in the same array, so an activation `[batch, length, embed]` keeps `embed`
whole while a parameter `[embed, mlp]` shards it over `fsdp`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("length", None),
    ("layers", None),
    ("proj", None),
    ("conv_in", None),
    ("conv_out", None),
)


@contextlib.contextmanager
def use_mesh(mesh: Mesh) -> Iterator[Mesh]:
    """Enter `mesh` and the logical rules: tracing needs both for the activation
    constraints inside the model. The trainer and the evaluation command enter it once,
    around everything they compile and run."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        yield mesh


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, int, int]:
    """Fill in one `-1` entry and check the product equals the device count."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(
            f"mesh.shape={shape} must have {len(MESH_AXES)} entries for axes {MESH_AXES}"
        )
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(
            f"mesh.shape={shape}: sizes must be positive, with at most one -1 (inferred)"
        )
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if num_devices % known:
            raise ValueError(
                f"mesh.shape={shape} cannot be completed: {num_devices} devices are not "
                f"divisible by {known}"
            )
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if int(np.prod(shape)) != num_devices:
        raise ValueError(
            f"mesh.shape={shape} needs {int(np.prod(shape))} devices, but "
            f"{num_devices} are available (jax.device_count())"
        )
    return shape  # type: ignore[return-value]


def make_mesh(
    shape: Sequence[int], devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A mesh with axes ('data', 'fsdp', 'tensor') over all (or the given) devices."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = resolve_mesh_shape(shape, len(devices))
    # Auto axes: GSPMD propagates shardings from the annotations (no sharding-in-types).
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def batch_axes(mesh: Any) -> tuple[str, ...]:
    """The batch axes of `mesh` (concrete or abstract), in the order they split rows."""
    return tuple(axis for axis in BATCH_AXES if axis in mesh.axis_names)


def batch_shards(mesh: Any) -> int:
    """How many pieces the batch is split into on `mesh` (the ring size R)."""
    return int(np.prod([mesh.shape[axis] for axis in batch_axes(mesh)], dtype=int))


def logical_to_shardings(abstract_tree: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
    """NamedShardings for a tree whose leaves may carry logical axis metadata."""
    specs = nn.get_partition_spec(abstract_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
    """A sharding that keeps a full copy on every device."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) dimension split over ('data', 'fsdp'), the rest whole."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def micro_batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """`[k, B/k, ...]` micro-batches: each one's rows split like a batch."""
    return NamedSharding(mesh, P(None, BATCH_AXES, *([None] * (ndim - 2))))


def shard_batch(
    host_batch: dict[str, np.ndarray], mesh: Mesh, accum_steps: int = 1
) -> dict[str, jax.Array]:
    """Turn this process's part of a batch into global arrays split over the batch axes.

    Each process passes only its own rows; with one process that is the whole batch.
    With `accum_steps` = k > 1 each array arrives as k micro-batches, `[k, B/k, ...]`:
    micro-batch i holds the i-th block of B/(k P) rows of each of the P processes, and
    its rows are split over the batch axes. Splitting here, on the host, is free; a
    train step that split `[B, ...]` itself made XLA:TPU copy the whole uint8 image
    batch into another layout (docs/tpu.md).
    """
    arrays = {}
    for name, value in host_batch.items():
        value = np.asarray(value)
        if accum_steps > 1:
            value = value.reshape(accum_steps, -1, *value.shape[1:])
            where = micro_batch_sharding(mesh, value.ndim)
        else:
            where = batch_sharding(mesh, value.ndim)
        arrays[name] = jax.make_array_from_process_local_data(where, value)
    return arrays
