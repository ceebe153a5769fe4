"""Weights in and out: find the format of a path, read it, write OpenCLIP or HF files.

Sources `load_weights` understands:

    jaxclip checkpoint   a workdir, its checkpoints/ directory, or one step directory
    OpenCLIP directory   open_clip_config.json + open_clip_model.safetensors (or .bin)
    HF directory         config.json (model_type "clip") + model.safetensors (or .bin)
    a weights file       .safetensors / .pt / .bin / .pth holding an OpenCLIP, OpenAI
                         or HF CLIPModel state dict (a config file beside it is used)
    hf-hub:ORG/REPO      downloaded with huggingface_hub, then one of the directories
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jaxclip.convert import hf, openclip
from jaxclip.convert.checkpoint import find_step_dir, read_checkpoint
from jaxclip.convert.tensors import read_tensors, write_safetensors
from jaxclip.data.transforms import OPENAI_MEAN, OPENAI_STD
from jaxclip.models.registry import ModelConfig, get_model_config

OPENCLIP_CONFIG = "open_clip_config.json"
OPENCLIP_WEIGHTS = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
)
HF_CONFIG = "config.json"
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
HF_INDEX = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
HF_HUB_PREFIX = "hf-hub:"


@dataclasses.dataclass(frozen=True)
class Weights:
    """A CLIP model's weights as host arrays, with what is needed to use them."""

    config: ModelConfig
    variables: dict  # {"params": ..., "batch_stats": ...}, NumPy float32
    name: str | None  # the registered architecture, if the config is one
    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD
    resize_mode: str = "shortest"  # "shortest" (resize + centre crop) or "squash"
    interpolation: str = "bicubic"
    source: str = ""

    @property
    def logit_bias(self) -> bool:
        """Whether this is a SigLIP-style model with a learned logit bias."""
        return "logit_bias" in self.variables["params"]


def load_weights(
    path: str | os.PathLike, name: str | ModelConfig | None = None
) -> Weights:
    """Read weights in any supported format; `name` checks (or sets) the architecture.

    Without `name` the architecture comes from the files: a config beside the
    weights, else the weights' shapes. Any missing key, unexpected key or wrong shape
    is an error that lists them.
    """
    path = os.fspath(path)
    if path.startswith(HF_HUB_PREFIX):
        path = download_from_hub(path[len(HF_HUB_PREFIX) :])
    if os.path.isdir(path):
        if find_step_dir(path) is not None:
            return _load_checkpoint(path, name)
        if os.path.isfile(os.path.join(path, OPENCLIP_CONFIG)):
            return _load_file(_first_file(path, OPENCLIP_WEIGHTS, "OpenCLIP"), name)
        if _is_hf_dir(path):
            return _load_file(_hf_weights_path(path), name)
        raise FileNotFoundError(
            f"{path} is neither a jaxclip checkpoint, an OpenCLIP directory "
            f"({OPENCLIP_CONFIG} + weights) nor a Hugging Face CLIPModel directory "
            f"({HF_CONFIG} + {' or '.join(HF_WEIGHTS)})"
        )
    return _load_file(path, name)


def _load_checkpoint(path: str, name: str | ModelConfig | None) -> Weights:
    checkpoint = read_checkpoint(path)
    if name is not None:
        requested = name if isinstance(name, ModelConfig) else get_model_config(name)
        if requested != checkpoint.config:
            raise ValueError(
                f"checkpoint {checkpoint.path} holds model.name={checkpoint.name!r}, "
                f"not {name!r}"
            )
    return Weights(
        config=checkpoint.config,
        variables=checkpoint.variables,
        name=checkpoint.name,
        mean=checkpoint.mean or OPENAI_MEAN,
        std=checkpoint.std or OPENAI_STD,
        source=f"jaxclip checkpoint {checkpoint.path}",
    )


def _first_file(directory: str, names: tuple[str, ...], what: str) -> str:
    for file_name in names:
        if os.path.isfile(os.path.join(directory, file_name)):
            return os.path.join(directory, file_name)
    raise FileNotFoundError(f"{what} directory {directory} has none of {names}")


def _read_json(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def _is_hf_dir(directory: str) -> bool:
    path = os.path.join(directory, HF_CONFIG)
    return os.path.isfile(path) and _read_json(path).get("model_type") == "clip"


def _hf_weights_path(directory: str) -> str:
    for file_name in (*HF_WEIGHTS, *HF_INDEX):
        if os.path.isfile(os.path.join(directory, file_name)):
            return os.path.join(directory, file_name)
    raise FileNotFoundError(
        f"Hugging Face directory {directory} has none of {HF_WEIGHTS + HF_INDEX}"
    )


def _read_any(path: str) -> dict[str, np.ndarray]:
    """Tensors of one file, or of every shard an HF index file names."""
    if not path.endswith(".index.json"):
        return read_tensors(path)
    shards = sorted(set(_read_json(path)["weight_map"].values()))
    tensors: dict[str, np.ndarray] = {}
    for shard in shards:
        tensors.update(read_tensors(os.path.join(os.path.dirname(path), shard)))
    return tensors


def _load_file(path: str, name: str | ModelConfig | None) -> Weights:
    tensors = _read_any(path)
    if hf.is_hf_state_dict(tensors):
        return _from_hf(tensors, path, name)
    return _from_openclip(tensors, path, name)


def _from_openclip(
    tensors: Mapping[str, np.ndarray], path: str, name: str | ModelConfig | None
) -> Weights:
    openai = any(key in tensors for key in openclip.OPENAI_MARKER_KEYS)
    what = f"{'OpenAI' if openai else 'OpenCLIP'} state dict {path}"
    settings_path = os.path.join(_directory_of(path), OPENCLIP_CONFIG)
    settings = _read_json(settings_path) if os.path.isfile(settings_path) else {}
    preprocess = settings.get("preprocess_cfg", {})
    described = None
    if "model_cfg" in settings:
        described = openclip.config_from_openclip(settings["model_cfg"])
    config, registered = _architecture(
        name, what, described, lambda: openclip.infer_config(tensors, what), openai
    )
    logit_bias = "logit_bias" in tensors
    arch = registered or "the inferred architecture"
    variables = openclip.from_openclip(
        tensors, config, logit_bias, what=f"{what} does not match {arch}"
    )
    return Weights(
        config=config,
        variables=variables,
        name=registered,
        mean=tuple(preprocess.get("mean", OPENAI_MEAN)),
        std=tuple(preprocess.get("std", OPENAI_STD)),
        resize_mode=preprocess.get("resize_mode", "shortest"),
        interpolation=preprocess.get("interpolation", "bicubic"),
        source=what,
    )


def _from_hf(
    tensors: Mapping[str, np.ndarray], path: str, name: str | ModelConfig | None
) -> Weights:
    what = f"Hugging Face CLIPModel state dict {path}"
    directory = _directory_of(path)
    config_path = os.path.join(directory, HF_CONFIG)
    described = None
    if os.path.isfile(config_path):
        described = hf.config_from_hf(_read_json(config_path))
    config, registered = _architecture(
        name, what, described, lambda: _infer_hf(tensors, what), openai=False
    )
    arch = registered or "the architecture in config.json"
    state_dict = hf.hf_to_openclip(tensors, config, f"{what} does not match {arch}")
    mean_std = hf.preprocess_from_hf(directory) or (OPENAI_MEAN, OPENAI_STD)
    return Weights(
        config=config,
        variables=openclip.from_openclip(state_dict, config, what=what),
        name=registered,
        mean=mean_std[0],
        std=mean_std[1],
        source=what,
    )


def _directory_of(path: str) -> str:
    """The directory of a weights file, where a config file beside it would be."""
    return os.path.dirname(os.path.abspath(path))


def _architecture(
    name: str | ModelConfig | None,
    what: str,
    described: ModelConfig | None,
    infer: Callable[[], ModelConfig],
    openai: bool,
) -> tuple[ModelConfig, str | None]:
    """The architecture to load into and its registered name (or None), from `name`,
    else the config beside the weights (`described`), else the weights' shapes
    (`infer()`: the heads then come from a registered architecture of those shapes,
    and the activation is known only for OpenAI's own state dicts)."""
    if described is not None:
        inferred, quick_gelu, heads_known = described, described.quick_gelu, True
    else:
        inferred, quick_gelu, heads_known = infer(), (True if openai else None), False
    return openclip.resolve_config(
        inferred, name, quick_gelu=quick_gelu, heads_known=heads_known, what=what
    )


def _infer_hf(tensors: Mapping[str, np.ndarray], what: str) -> ModelConfig:
    """The architecture of an HF state dict without config.json, from its shapes."""
    text_layers = openclip.count_indices(
        tensors, r"text_model\.encoder\.layers\.(\d+)\."
    )
    vision_layers = openclip.count_indices(
        tensors, r"vision_model\.encoder\.layers\.(\d+)\."
    )
    stand_in = {}
    for key, shape in _HF_SHAPE_KEYS.items():
        if key not in tensors:
            raise ValueError(
                f"cannot infer the architecture of the {what}: {key} is missing"
            )
        stand_in[shape] = tensors[key]
    # HF stores the projection as a Linear weight [embed, width]; OpenCLIP [width, embed].
    stand_in["text_projection"] = np.empty(np.shape(stand_in["text_projection"])[::-1])
    for i in range(text_layers):
        stand_in[f"transformer.resblocks.{i}.x"] = None
    for i in range(vision_layers):
        stand_in[f"visual.transformer.resblocks.{i}.x"] = None
    return openclip.infer_config(stand_in, what)


# HF keys whose shapes determine the architecture, and their OpenCLIP names.
_HF_SHAPE_KEYS = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.encoder.layers.0.mlp.fc1.weight": "transformer.resblocks.0.mlp.c_fc.weight",
    "text_projection.weight": "text_projection",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.encoder.layers.0.mlp.fc1.weight": (
        "visual.transformer.resblocks.0.mlp.c_fc.weight"
    ),
}


def download_from_hub(repo_id: str) -> str:
    """Download an OpenCLIP or HF CLIPModel repository's weights; returns the directory.

    Only the files jaxclip reads are fetched (e.g. not a timm copy of the weights).
    """
    try:
        import huggingface_hub
    except ImportError as error:
        raise ImportError("hf-hub: paths need `pip install huggingface_hub`") from error
    files = set(huggingface_hub.list_repo_files(repo_id))
    if OPENCLIP_CONFIG in files:
        wanted = [OPENCLIP_CONFIG, next(f for f in OPENCLIP_WEIGHTS if f in files)]
    elif HF_CONFIG in files and any(f in files for f in HF_WEIGHTS):
        wanted = [HF_CONFIG, next(f for f in HF_WEIGHTS if f in files)]
        wanted += [f for f in ("preprocessor_config.json",) if f in files]
    else:
        raise FileNotFoundError(
            f"hf-hub:{repo_id} has neither OpenCLIP ({OPENCLIP_CONFIG}) nor "
            f"HF CLIPModel ({HF_CONFIG} + {' or '.join(HF_WEIGHTS)}) weights"
        )
    paths = [huggingface_hub.hf_hub_download(repo_id, f) for f in wanted]
    return os.path.dirname(paths[0])


# ---------------------------------------------------------------------------
# Writing.
# ---------------------------------------------------------------------------


def save_openclip(weights: Weights, directory: str | os.PathLike) -> list[str]:
    """open_clip_model.safetensors + open_clip_config.json; returns the paths.

    OpenCLIP loads the directory with `open_clip.create_model('local-dir:DIR')`.
    """
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    weights_path = os.path.join(directory, OPENCLIP_WEIGHTS[0])
    write_safetensors(
        weights_path, openclip.to_openclip(weights.variables, weights.config)
    )
    settings = {
        "model_cfg": openclip.openclip_model_cfg(weights.config, weights.logit_bias),
        "preprocess_cfg": {
            "size": weights.config.vision.image_size,
            "mean": list(weights.mean),
            "std": list(weights.std),
            "interpolation": weights.interpolation,
            "resize_mode": weights.resize_mode,
        },
    }
    config_path = os.path.join(directory, OPENCLIP_CONFIG)
    with open(config_path, "w", encoding="utf-8") as file:
        json.dump(settings, file, indent=2)
    return [weights_path, config_path]


def save_hf(weights: Weights, directory: str | os.PathLike) -> list[str]:
    """An HF CLIPModel directory: model.safetensors, config.json, preprocessor and
    tokenizer files (`transformers.CLIPModel.from_pretrained(DIR)` loads it)."""
    directory = os.fspath(directory)
    config = weights.config
    if config.vision.is_resnet:
        raise ValueError(
            "Hugging Face CLIPModel has no ResNet image tower; use the OpenCLIP format"
        )
    if weights.logit_bias:
        raise ValueError(
            "this model has a SigLIP logit bias, which HF CLIPModel cannot hold; "
            "use the OpenCLIP format"
        )
    hf_state = hf.openclip_to_hf(openclip.to_openclip(weights.variables, config))
    logit_scale = float(np.asarray(weights.variables["params"]["logit_scale"]))
    settings = hf.hf_config(config, logit_scale)
    os.makedirs(directory, exist_ok=True)
    weights_path = os.path.join(directory, HF_WEIGHTS[0])
    write_safetensors(weights_path, hf_state)
    paths = [weights_path]
    for file_name, content in (
        (HF_CONFIG, settings),
        (
            "preprocessor_config.json",
            hf.preprocessor_config(config.vision.image_size, weights.mean, weights.std),
        ),
    ):
        paths.append(os.path.join(directory, file_name))
        with open(paths[-1], "w", encoding="utf-8") as file:
            json.dump(content, file, indent=2)
    hf.write_tokenizer_files(directory, config.text.context_length)
    return paths
