"""The config schema: every field with its default, and the checks that refuse bad
values with a message naming the field, before anything compiles.

Recipes in `configs/` start from `base_config()`; the README documents each field.
"""

from __future__ import annotations

import os
import tempfile

import jax
import ml_collections
import numpy as np

from jaxclip.data.checks import DATA_SOURCES, validate_data_config
from jaxclip.data.transforms import (
    DEFAULT_MAX_IMAGE_PIXELS,
    OPENAI_MEAN,
    OPENAI_STD,
)
from jaxclip.models.layers import REMAT_POLICIES
from jaxclip.models.registry import get_model_config
from jaxclip.sharding import BATCH_AXES, MESH_AXES, resolve_mesh_shape


def base_config() -> ml_collections.ConfigDict:
    """All config fields with their default values."""
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.model = ml_collections.ConfigDict()
    config.model.name = "ViT-B-32"
    config.model.dtype = "float32"  # compute dtype; params stay float32
    # lax.scan over layers (False: unrolled, same params); None: scanned on GPU/TPU,
    # unrolled on the CPU (jaxclip.train.loop.use_scan)
    config.model.scan = ml_collections.config_dict.placeholder(bool)
    config.model.remat = "none"  # none | full | dots | dots_no_batch

    config.loss = ml_collections.ConfigDict()
    config.loss.name = "clip"  # clip (softmax) | siglip (sigmoid, adds a logit bias)
    config.loss.impl = "dense"  # dense (reference) | ring (memory-efficient, sharded)
    config.loss.chunk_size = 0  # ring: image rows per piece of a device's tile (0: all)

    config.data = ml_collections.ConfigDict()
    config.data.source = "shapes"  # shapes | webdataset | csv | tfds | digits | mix
    config.data.path = ""  # tar shards, a CSV/TSV file, or a tfds dataset name
    config.data.mix = ()  # source='mix': ((source, path, weight), ...)
    config.data.csv_image_column = "filepath"  # image paths, relative to the file
    config.data.csv_caption_column = "title"
    config.data.csv_separator = ""  # "": tab for .tsv, comma otherwise
    config.data.tfds_data_dir = ""
    config.data.tfds_split = "train"
    config.data.tfds_image_key = "image"
    config.data.tfds_caption_key = "caption"
    config.data.crop = "random_square"  # random_square | random_resized | center
    config.data.crop_scale = (0.9, 1.0)  # random_resized: area fraction range
    config.data.max_image_pixels = DEFAULT_MAX_IMAGE_PIXELS  # more: skipped as a bomb
    config.data.tokenizer = "clip"  # clip | sentencepiece
    config.data.tokenizer_model = ""  # sentencepiece: the .model file
    config.data.shuffle = True  # a new order each epoch, from the seed
    config.data.threads = 4  # decoding threads per process (or per worker)
    config.data.workers = 0  # worker processes (0: threads in the main process)
    config.data.prefetch = 2  # batches prepared ahead
    config.data.mean = OPENAI_MEAN
    config.data.std = OPENAI_STD

    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 256  # global, over all devices and processes
    config.train.steps = 1000
    config.train.prefetch = 1  # batches copied to the devices ahead of their step
    config.train.compile_cache_dir = ""  # persistent compilation cache ("": off)
    config.train.accum_steps = 1  # micro-batches per step, exact (GradCache)
    # Non-finite loss or gradient: the update is skipped; this many in a row stop
    config.train.max_nonfinite_steps = 5

    config.optim = ml_collections.ConfigDict()
    config.optim.lr = 5e-4
    config.optim.end_lr = 0.0
    config.optim.warmup_steps = 100
    config.optim.b1 = 0.9
    config.optim.b2 = 0.98
    config.optim.eps = 1e-6
    config.optim.weight_decay = 0.2
    config.optim.grad_clip_norm = 1.0  # 0 disables clipping

    config.mesh = ml_collections.ConfigDict()
    config.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor); one -1 is inferred

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 1000  # 0: only at the end
    config.checkpoint.keep = 3
    config.checkpoint.async_save = True
    # Keep the step with the best value of this evaluation metric in workdir/best
    # (e.g. "zeroshot/top1"; "": off), by best_mode: max | min.
    config.checkpoint.best_metric = ""
    config.checkpoint.best_mode = "max"

    config.mfu = ml_collections.ConfigDict()
    config.mfu.peak_flops = 0.0  # per-device peak FLOP/s for MFU (0: known-chip table)

    config.log = ml_collections.ConfigDict()
    config.log.every_steps = 50

    # Evaluators by name, run during and after training: each entry comes from
    # jaxclip.evaluate.evaluators.config(kind, dataset, ...), e.g. the demo's
    # config.evals.zeroshot; results are named "<name>/<metric>".
    config.evals = ml_collections.ConfigDict()

    # Multi-process runs (jaxclip.distributed, docs/launch.md). Unset fields fall back
    # to JAXCLIP_COORDINATOR, JAXCLIP_NUM_PROCESSES, JAXCLIP_PROCESS_ID and
    # JAXCLIP_LOCAL_DEVICE_IDS, then to a TPU pod or SLURM job JAX detects itself.
    config.distributed = ml_collections.ConfigDict()
    config.distributed.mode = "auto"  # auto | on (must be multi-process) | off
    config.distributed.coordinator_address = ""  # "host:port" of process 0
    config.distributed.num_processes = 0  # 0: from the environment or cluster
    config.distributed.process_id = -1  # -1: from the environment or cluster
    config.distributed.local_device_ids = ()  # (): all (TPU) or the cluster's choice
    config.distributed.initialization_timeout = 300  # seconds to wait for all
    config.distributed.log_all_processes = False  # progress lines from every process
    return config


def clip_paper_recipe(model_name: str) -> ml_collections.ConfigDict:
    """The CLIP paper's large-scale setup: batch 32,768, AdamW (0.9, 0.98), eps 1e-6,
    weight decay 0.2, 2,000 warm-up steps then cosine decay."""
    config = base_config()
    config.model.name = model_name
    config.model.dtype = "bfloat16"
    config.data.source = "webdataset"
    config.data.path = "/data/laion400m/{00000..41407}.tar"
    config.train.batch_size = 32768
    config.train.steps = 32 * 12_500  # 32 epochs of 400M samples at 32k
    config.optim.lr = 5e-4
    config.optim.warmup_steps = 2000
    config.optim.weight_decay = 0.2
    config.mesh.shape = (1, -1, 1)  # FSDP over every device
    config.loss.impl = "ring"  # never materialise the 32k x 32k logit matrix
    config.loss.chunk_size = 512  # and hold at most [512, local batch] per tile
    config.checkpoint.every_steps = 2000
    config.log.every_steps = 100
    return config


LOSS_NAMES = ("clip", "siglip")
LOSS_IMPLS = ("dense", "ring")
DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field."""


def validate_config(
    config: ml_collections.ConfigDict,
    workdir: str | None = None,
    *,
    num_devices: int | None = None,
    check_data: bool = True,
) -> None:
    """Check every field that can be checked without compiling; raise ConfigError.

    `num_devices` is the device count the mesh must fit (default: this process's
    `jax.device_count()`; `jaxclip.aot` passes a TPU slice's); `check_data=False`
    skips the data fields (compiling reads no data).
    """
    _known_model(config.model.name)
    _check_choice(config.model.dtype, "model.dtype", DTYPES)
    _check_choice(config.model.remat, "model.remat", tuple(REMAT_POLICIES))
    _check_choice(config.loss.name, "loss.name", LOSS_NAMES)
    _check_choice(config.loss.impl, "loss.impl", LOSS_IMPLS)
    _check_choice(config.data.source, "data.source", DATA_SOURCES)
    for field in (
        "train.batch_size",
        "train.steps",
        "train.accum_steps",
        "train.max_nonfinite_steps",
        "log.every_steps",
    ):
        _positive_int(config, field)
    for field in (
        "checkpoint.every_steps",
        "optim.warmup_steps",
        "loss.chunk_size",
    ):
        _non_negative_int(config, field)
    _positive_int(config, "checkpoint.keep")
    _positive_int(config, "train.prefetch")
    if not isinstance(config.train.compile_cache_dir, str):
        raise ConfigError(
            f"train.compile_cache_dir={config.train.compile_cache_dir!r} must be a "
            "directory path (or empty to disable the cache)"
        )
    peak = config.mfu.peak_flops
    if isinstance(peak, bool) or not isinstance(peak, (int, float)) or peak < 0:
        raise ConfigError(
            f"mfu.peak_flops={peak!r} must be a number >= 0 (FLOP/s per device; "
            "0 uses the table of known chips)"
        )
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
    if check_data:
        validate_data_config(config)
    validate_evals_config(config)
    validate_distributed_config(config)

    try:
        mesh_shape = resolve_mesh_shape(
            config.mesh.shape, num_devices or jax.device_count()
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    batch_shards = int(np.prod([mesh_shape[MESH_AXES.index(a)] for a in BATCH_AXES]))
    if config.train.batch_size % batch_shards:
        raise ConfigError(
            f"train.batch_size={config.train.batch_size} is not divisible by the "
            f"{batch_shards} batch shards of mesh.shape={mesh_shape} (axes {BATCH_AXES})"
        )
    per_shard = config.train.batch_size // batch_shards
    if per_shard % config.train.accum_steps:
        raise ConfigError(
            f"train.accum_steps={config.train.accum_steps} does not divide the "
            f"per-shard batch of {per_shard} (train.batch_size="
            f"{config.train.batch_size} over {batch_shards} batch shards)"
        )
    if config.train.batch_size % jax.process_count():
        raise ConfigError(
            f"train.batch_size={config.train.batch_size} is not divisible by the "
            f"{jax.process_count()} processes"
        )
    if workdir is not None:
        check_workdir(workdir)


DISTRIBUTED_MODES = ("auto", "on", "off")


def validate_distributed_config(config: ml_collections.ConfigDict) -> None:
    """The `distributed.*` fields (checked before the processes connect)."""
    dist = config.distributed
    _check_choice(dist.mode, "distributed.mode", DISTRIBUTED_MODES)
    address = dist.coordinator_address
    if not isinstance(address, str) or (
        address and not address.rsplit(":", 1)[-1].isdigit()
    ):
        raise ConfigError(
            f"distributed.coordinator_address={address!r} must be 'host:port' (the "
            "address of process 0) or empty"
        )
    _non_negative_int(config, "distributed.num_processes")
    process_id = dist.process_id
    if not isinstance(process_id, (int, np.integer)) or isinstance(process_id, bool):
        raise ConfigError(f"distributed.process_id={process_id!r} must be an integer")
    if process_id < -1 or (dist.num_processes and process_id >= dist.num_processes):
        raise ConfigError(
            f"distributed.process_id={process_id} must be in [0, num_processes) "
            "(or -1: from the environment or cluster)"
        )
    ids = tuple(dist.local_device_ids)
    if any(not isinstance(i, (int, np.integer)) or i < 0 for i in ids):
        raise ConfigError(
            f"distributed.local_device_ids={ids!r} must be device indices >= 0"
        )
    _positive_int(config, "distributed.initialization_timeout")
    if not isinstance(dist.log_all_processes, bool):
        raise ConfigError(
            f"distributed.log_all_processes={dist.log_all_processes!r} must be a bool"
        )


def validate_evals_config(config: ml_collections.ConfigDict) -> None:
    """The evaluators (`evals.*`) and the best-checkpoint metric."""
    from jaxclip.evaluate import evaluators

    try:
        evaluators.validate(config.evals)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    best = config.checkpoint.best_metric
    _check_choice(config.checkpoint.best_mode, "checkpoint.best_mode", ("max", "min"))
    if best and best.split("/")[0] not in config.evals:
        raise ConfigError(
            f"checkpoint.best_metric={best!r} must be '<evaluator>/<metric>' with an "
            f"evaluator of config.evals ({sorted(config.evals.keys())})"
        )


def check_workdir(workdir: str) -> None:
    """The workdir must exist or be creatable, and be writable."""
    if not workdir:
        raise ConfigError("--workdir is required")
    if "://" in workdir:
        raise ConfigError(
            f"--workdir={workdir!r}: object-store URLs are not supported yet; use a "
            "directory every process can see (a local disk, NFS or Filestore)"
        )
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
    if (
        not isinstance(value, (int, np.integer))
        or isinstance(value, bool)
        or value <= 0
    ):
        raise ConfigError(f"{field}={value!r} must be a positive integer")


def _non_negative_int(config: ml_collections.ConfigDict, field: str) -> None:
    value = _lookup(config, field)
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{field}={value!r} must be a non-negative integer")
