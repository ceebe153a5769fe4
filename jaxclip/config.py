"""The config schema: every field with its default, and the checks that refuse bad
values with a message naming the field, before anything compiles.

Recipes in `configs/` start from `base_config()`; the README documents each field.
Types and ranges are rules in `FIELD_RULES` (see config_rules.py); the choices and
their checks come from the modules that own them (model names and dtypes:
models/registry.py, remat policies: models/layers.py, losses: losses.py, evaluators:
evaluate/evaluators.py, `distributed.*`: distributed.py). What spans several fields
(the mesh and the batch, the best metric) is code below.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import types

import jax
import ml_collections
from jax.sharding import AbstractMesh

from jaxclip.config_rules import (
    BOOL,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    ConfigError,  # raised by every check; callers import it from here
    Rule,
    check_fields,
    is_number,
    number,
    one_of,
)
from jaxclip.data.checks import DATA_SOURCES, validate_data_config
from jaxclip.data.transforms import (
    DEFAULT_MAX_IMAGE_PIXELS,
    OPENAI_MEAN,
    OPENAI_STD,
)
from jaxclip.distributed import validate_distributed_config
from jaxclip.losses import LOSS_IMPLS, LOSS_NAMES
from jaxclip.models import registry
from jaxclip.models.layers import REMAT_POLICIES
from jaxclip.sharding import BATCH_AXES, MESH_AXES, batch_shards, resolve_mesh_shape
from jaxclip.train.freeze import Freeze

# --- The schema: one function per section.


def base_config() -> ml_collections.ConfigDict:
    """All config fields with their default values."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = _model_fields()
    config.loss = _loss_fields()
    config.data = _data_fields()
    config.train = _train_fields()
    config.optim = _optim_fields()
    config.mesh = ml_collections.ConfigDict()
    config.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor); one -1 is inferred
    config.checkpoint = _checkpoint_fields()
    config.mfu = ml_collections.ConfigDict()
    config.mfu.peak_flops = 0.0  # per-device peak FLOP/s for MFU (0: known-chip table)
    config.log = ml_collections.ConfigDict()
    config.log.every_steps = 50
    # Evaluators by name, run during and after training: each entry comes from
    # jaxclip.evaluate.evaluators.spec(kind, dataset, ...), e.g. the demo's
    # config.evals.zeroshot; results are named "<name>/<metric>".
    config.evals = ml_collections.ConfigDict()
    config.distributed = _distributed_fields()
    return config


def _model_fields() -> ml_collections.ConfigDict:
    model = ml_collections.ConfigDict()
    model.name = "ViT-B-32"  # an architecture of models/registry.py
    model.dtype = "float32"  # compute dtype; params stay float32
    # lax.scan over layers (False: unrolled, same params); None: scanned on GPU/TPU,
    # unrolled on the CPU (jaxclip.models.build.use_scan)
    model.scan = ml_collections.config_dict.placeholder(bool)
    model.remat = "none"  # none | full | dots | dots_no_batch
    # FLIP's patch dropout: in training, a ViT image tower keeps a random
    # round((1 - p) N) of its N patch tokens per image (0: off; e.g. 0.5)
    model.patch_dropout = 0.0
    # Start from these weights instead of random ones (a jaxclip workdir or checkpoint,
    # an OpenCLIP file or directory, an HF CLIPModel directory, hf-hub:ORG/REPO; "":
    # off). Only a fresh run uses them: a workdir with a checkpoint resumes from it.
    model.init_from = ""
    return model


def _loss_fields() -> ml_collections.ConfigDict:
    loss = ml_collections.ConfigDict()
    loss.name = "clip"  # clip (softmax) | siglip (sigmoid, adds a logit bias)
    loss.impl = "dense"  # dense (reference) | ring (memory-efficient, sharded)
    loss.chunk_size = 0  # ring: image rows per piece of a device's tile (0: all)
    # CoCa models only (OpenCLIP's CoCaLoss): clip_weight x the contrastive loss plus
    # caption_weight x the caption loss (token cross-entropy, label_smoothing as torch)
    loss.clip_weight = 1.0
    loss.caption_weight = 2.0
    loss.label_smoothing = 0.0
    return loss


def _data_fields() -> ml_collections.ConfigDict:
    data = ml_collections.ConfigDict()
    data.source = "shapes"  # shapes | webdataset | csv | tfds | digits | mix
    data.path = ""  # tar shards, a CSV/TSV file, or a tfds dataset name
    data.mix = ()  # source='mix': ((source, path, weight), ...)
    data.csv_image_column = "filepath"  # image paths, relative to the file
    data.csv_caption_column = "title"
    data.csv_separator = ""  # "": tab for .tsv, comma otherwise
    data.tfds_data_dir = ""
    data.tfds_split = "train"
    data.tfds_image_key = "image"
    data.tfds_caption_key = "caption"
    data.crop = "random_square"  # random_square | random_resized | center
    data.crop_scale = (0.9, 1.0)  # random_resized: area fraction range
    data.max_image_pixels = DEFAULT_MAX_IMAGE_PIXELS  # more: skipped as a bomb
    data.tokenizer = "clip"  # clip | sentencepiece | an HF model directory (SigLIP 1/2)
    data.tokenizer_model = ""  # sentencepiece: the .model file
    data.shuffle = True  # a new order each epoch, from the seed
    data.threads = 4  # decoding threads per process (or per worker)
    data.workers = 0  # worker processes (0: threads in the main process)
    data.prefetch = 2  # batches prepared ahead
    data.mean = OPENAI_MEAN
    data.std = OPENAI_STD
    return data


def _train_fields() -> ml_collections.ConfigDict:
    train = ml_collections.ConfigDict()
    train.batch_size = 256  # global, over all devices and processes
    train.steps = 1000
    train.prefetch = 1  # batches copied to the devices ahead of their step
    train.compile_cache_dir = ""  # persistent compilation cache ("": off)
    train.accum_steps = 1  # micro-batches per step, exact (GradCache)
    # Non-finite loss or gradient: the update is skipped; this many in a row stop
    train.max_nonfinite_steps = 5
    # An exponential moving average of the params, kept in the state (0.0: none; e.g.
    # 0.9999); evaluators read it with `params='ema'` (jaxclip/train/ema.py)
    train.ema_decay = 0.0
    train.ema_warmup = False  # decay min(ema_decay, (1 + step) / (10 + step))
    # Locked parameters (LiT): regular expressions matched against whole parameter
    # paths, e.g. ("visual/.*",); locked ones get no update, gradient or optimizer
    # state (jaxclip/train/freeze.py)
    train.freeze = ()
    # Then unlock the last N blocks, and the head, of each tower locked whole (0: none)
    train.unlock_last = 0
    # Distil from a frozen teacher: weights as for model.init_from ("": off); the loss
    # adds distill_weight x OpenCLIP's distillation term (jaxclip/train/distill.py)
    train.distill_from = ""
    train.distill_weight = 1.0
    return train


def _optim_fields() -> ml_collections.ConfigDict:
    optim = ml_collections.ConfigDict()
    optim.lr = 5e-4
    optim.end_lr = 0.0
    optim.warmup_steps = 100
    optim.b1 = 0.9
    optim.b2 = 0.98
    optim.eps = 1e-6
    optim.weight_decay = 0.2
    optim.grad_clip_norm = 1.0  # 0 disables clipping
    return optim


def _checkpoint_fields() -> ml_collections.ConfigDict:
    checkpoint = ml_collections.ConfigDict()
    checkpoint.every_steps = 1000  # 0: only at the end
    checkpoint.keep = 3
    checkpoint.async_save = True
    # Keep the step with the best value of this evaluation metric in workdir/best
    # (e.g. "zeroshot/top1"; "": off), by best_mode: max | min.
    checkpoint.best_metric = ""
    checkpoint.best_mode = "max"
    return checkpoint


def _distributed_fields() -> ml_collections.ConfigDict:
    # Multi-process runs (jaxclip.distributed, docs/launch.md). Unset fields fall back
    # to JAXCLIP_COORDINATOR, JAXCLIP_NUM_PROCESSES, JAXCLIP_PROCESS_ID and
    # JAXCLIP_LOCAL_DEVICE_IDS, then to a TPU pod or SLURM job JAX detects itself.
    distributed = ml_collections.ConfigDict()
    distributed.mode = "auto"  # auto | on (must be multi-process) | off
    distributed.coordinator_address = ""  # "host:port" of process 0
    distributed.num_processes = 0  # 0: from the environment or cluster
    distributed.process_id = -1  # -1: from the environment or cluster
    distributed.local_device_ids = ()  # (): all (TPU) or the cluster's choice
    distributed.initialization_timeout = 300  # seconds to wait for all
    distributed.log_all_processes = False  # progress lines from every process
    return distributed


# --- Field rules: the types, ranges and choices, checked by `check_fields`.

BEST_MODES = ("max", "min")
CAPTION_LOSS_FIELDS = ("clip_weight", "caption_weight", "label_smoothing")


def _is_rgb(value) -> bool:
    return (
        isinstance(value, (tuple, list))
        and len(value) == 3
        and all(is_number(v) for v in value)
    )


def _is_weights_source(value) -> bool:
    """Empty (off), hf-hub:ORG/REPO (fetched at start), or a path that exists; what
    the path holds is read, and checked against the model, when the run starts."""
    if not isinstance(value, str):
        return False
    if not value:
        return True
    # Imported here: the convert package (orbax, the file readers) is needed only
    # when there are weights to read.
    from jaxclip.convert.files import HF_HUB_PREFIX

    return value.startswith(HF_HUB_PREFIX) or os.path.exists(value)


FIELD_RULES: dict[str, Rule] = {
    "model.name": registry.NAME_RULE,
    "model.dtype": one_of(registry.DTYPES),
    "model.remat": one_of(REMAT_POLICIES),
    "model.patch_dropout": number(lambda value: 0 <= value < 1, "must be in [0, 1)"),
    "model.init_from": Rule(
        _is_weights_source,
        "must be an existing path (a jaxclip workdir or checkpoint, an OpenCLIP "
        "weights file or directory, a Hugging Face CLIPModel directory), "
        "'hf-hub:ORG/REPO', or '' (off)",
    ),
    "loss.name": one_of(LOSS_NAMES),
    "loss.impl": one_of(LOSS_IMPLS),
    "loss.chunk_size": NON_NEGATIVE_INT,
    "loss.clip_weight": NON_NEGATIVE,
    "loss.caption_weight": NON_NEGATIVE,
    "loss.label_smoothing": number(lambda value: 0 <= value < 1, "must be in [0, 1)"),
    "data.source": one_of(DATA_SOURCES),
    "data.mean": Rule(_is_rgb, "must be 3 numbers (RGB)"),
    "data.std": Rule(_is_rgb, "must be 3 numbers (RGB)"),
    "train.batch_size": POSITIVE_INT,
    "train.steps": POSITIVE_INT,
    "train.accum_steps": POSITIVE_INT,
    "train.max_nonfinite_steps": POSITIVE_INT,
    "train.prefetch": POSITIVE_INT,
    "train.ema_decay": number(lambda value: 0 <= value < 1, "must be in [0, 1)"),
    "train.ema_warmup": BOOL,
    "train.freeze": Rule(
        lambda value: (
            isinstance(value, (tuple, list))
            and all(isinstance(v, str) and v for v in value)
        ),
        "must be a list of regular expressions over parameter paths, e.g. "
        "['visual/.*'] (or () to lock nothing)",
    ),
    "train.unlock_last": NON_NEGATIVE_INT,
    "train.distill_from": Rule(
        _is_weights_source,
        "must be an existing path (a jaxclip workdir or checkpoint, an OpenCLIP "
        "weights file or directory, a Hugging Face model directory), "
        "'hf-hub:ORG/REPO', or '' (off)",
    ),
    "train.distill_weight": POSITIVE,
    "train.compile_cache_dir": Rule(
        lambda value: isinstance(value, str),
        "must be a directory path (or empty to disable the cache)",
    ),
    "optim.lr": POSITIVE,
    "optim.eps": POSITIVE,
    "optim.b1": number(lambda value: 0 <= value < 1, "must be in [0, 1)"),
    "optim.b2": number(lambda value: 0 <= value < 1, "must be in [0, 1)"),
    "optim.warmup_steps": NON_NEGATIVE_INT,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.grad_clip_norm": NON_NEGATIVE,
    "checkpoint.every_steps": NON_NEGATIVE_INT,
    "checkpoint.keep": POSITIVE_INT,
    "mfu.peak_flops": number(
        lambda value: value >= 0,
        "must be a number >= 0 (FLOP/s per device; 0 uses the table of known chips)",
    ),
    "log.every_steps": POSITIVE_INT,
}

EVALS_RULES: dict[str, Rule] = {"checkpoint.best_mode": one_of(BEST_MODES)}


# --- The checks.


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
    check_fields(config, FIELD_RULES)
    validate_trainable_model(config)
    validate_patch_dropout(config)
    if check_data:
        validate_data_config(config)
    validate_evals_config(config)
    validate_ema_config(config)
    validate_freeze_config(config)
    validate_distributed_config(config)
    validate_batch_split(config, num_devices or jax.device_count())
    if workdir is not None:
        check_workdir(workdir)


def validate_trainable_model(config: ml_collections.ConfigDict) -> None:
    """The caption loss's fields (`loss.clip_weight`, `loss.caption_weight`,
    `loss.label_smoothing`) are CoCa's: set away from their defaults for another
    model, or both weights 0, they are refused; so is patch dropout on CoCa, whose
    image tower has none."""
    loss, name = config.loss, config.model.name
    if not registry.get_model_config(name).is_coca:
        defaults = _loss_fields()
        for field in CAPTION_LOSS_FIELDS:
            if loss[field] != defaults[field]:
                raise ConfigError(
                    f"loss.{field}={loss[field]} is a setting of CoCa's loss, but "
                    f"model.name={name!r} is not a CoCa model: leave it at "
                    f"{defaults[field]}"
                )
        return
    if not (loss.clip_weight or loss.caption_weight):
        raise ConfigError(
            "loss.clip_weight=0 and loss.caption_weight=0 leave CoCa nothing to "
            "learn: set either above 0"
        )
    if config.model.patch_dropout:
        raise ConfigError(
            f"model.patch_dropout={config.model.patch_dropout}: CoCa's image tower "
            f"has no patch dropout (model.name={name!r}); set it to 0"
        )


def validate_patch_dropout(config: ml_collections.ConfigDict) -> None:
    """Patch dropout drops a ViT's patch tokens: a ResNet image tower has none."""
    vision = registry.get_model_config(config.model.name).vision
    if config.model.patch_dropout and vision.is_resnet:
        raise ConfigError(
            f"model.patch_dropout={config.model.patch_dropout} needs a ViT image "
            f"tower; model.name={config.model.name!r} has a ResNet (no patch tokens)"
        )


def validate_batch_split(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """The batch splits evenly over the mesh's batch shards, the accumulation's
    micro-batches and the processes."""
    try:
        mesh_shape = resolve_mesh_shape(config.mesh.shape, num_devices)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    shards = batch_shards(AbstractMesh(mesh_shape, MESH_AXES))
    batch, accum_steps = config.train.batch_size, config.train.accum_steps
    if batch % shards:
        raise ConfigError(
            f"train.batch_size={batch} is not divisible by the {shards} batch shards "
            f"of mesh.shape={mesh_shape} (axes {BATCH_AXES})"
        )
    if (batch // shards) % accum_steps:
        raise ConfigError(
            f"train.accum_steps={accum_steps} does not divide the per-shard batch of "
            f"{batch // shards} (train.batch_size={batch} over {shards} batch shards)"
        )
    if batch % jax.process_count():
        raise ConfigError(
            f"train.batch_size={batch} is not divisible by the "
            f"{jax.process_count()} processes"
        )


def validate_evals_config(
    config: ml_collections.ConfigDict, check_model: bool = True
) -> None:
    """The evaluators (`evals.*`) and the best-checkpoint metric; with `check_model`,
    also what they need of `model.name` (standalone evaluation, whose model comes
    from the weights, checks that once it has read them)."""
    # Imported here: the evaluators read datasets, which the rest of the config
    # (and `jaxclip.distributed`, before JAX starts) does not need.
    from jaxclip.evaluate import evaluators

    evaluators.validate(config.evals)
    if check_model:
        name = config.model.name
        evaluators.check_model(config.evals, registry.get_model_config(name), name)
    check_fields(config, EVALS_RULES)
    best = config.checkpoint.best_metric
    if best and best.split("/")[0] not in config.evals:
        raise ConfigError(
            f"checkpoint.best_metric={best!r} must be '<evaluator>/<metric>' with an "
            f"evaluator of config.evals ({sorted(config.evals.keys())})"
        )


def validate_ema_config(config: ml_collections.ConfigDict) -> None:
    """What reads the EMA of the params needs a run that keeps one."""
    if config.train.ema_decay:
        return
    if config.train.ema_warmup:
        raise ConfigError(
            "train.ema_warmup=True warms up the EMA's decay, but train.ema_decay=0 "
            "keeps no EMA: set train.ema_decay (e.g. 0.9999) or leave the warm-up off"
        )
    from jaxclip.evaluate import evaluators

    for name, entry in config.evals.items():
        if evaluators.weights_of(entry) == "ema":
            raise ConfigError(
                f"evals.{name}.params='ema' evaluates the EMA of the parameters, but "
                "train.ema_decay=0 keeps none: set train.ema_decay (e.g. 0.9999) or "
                f"evals.{name}.params='params'"
            )


def validate_freeze_config(config: ml_collections.ConfigDict) -> None:
    """`train.freeze` and `train.unlock_last` against the model's parameter paths
    (from `jax.eval_shape`: nothing is allocated)."""
    if not config.train.freeze:
        if config.train.unlock_last:
            raise ConfigError(
                f"train.unlock_last={config.train.unlock_last} unlocks blocks of a "
                "locked tower, but train.freeze locks nothing (e.g. ['visual/.*'])"
            )
        return
    from jaxclip.models.build import abstract_variables, model_from_config

    params = abstract_variables(model_from_config(config, platform="cpu"))["params"]
    Freeze.of(config).plan(params)


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


# --- Recipes.


def load_beside(recipe_file: str, name: str) -> types.ModuleType:
    """The Python file `name` next to `recipe_file`, as a module: recipes are files, not
    a package, so `configs/*.py` read their shared settings with
    `common = load_beside(__file__, "common.py")`, from any working directory."""
    path = os.path.join(os.path.dirname(os.path.abspath(recipe_file)), name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} (loaded by {recipe_file}) does not exist")
    return load_file(path)


def load_file(path: str) -> types.ModuleType:
    """The Python file at `path` as a module (recipes, and what they load, are files,
    not a package)."""
    spec = importlib.util.spec_from_file_location(
        os.path.splitext(os.path.basename(path))[0], path
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
