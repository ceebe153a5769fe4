"""Weights in and out: find the format of a path, read it, write OpenCLIP or HF files.

Sources `load_weights` understands:

    jaxclip checkpoint   a workdir, its checkpoints/ directory, or one step directory
    OpenCLIP directory   open_clip_config.json + open_clip_model.safetensors (or .bin)
    HF directory         config.json (model_type "clip" or "siglip") + model.safetensors
                         (or .bin), and the tokenizer's files where it has them
    a weights file       .safetensors / .pt / .bin / .pth holding an OpenCLIP, OpenAI,
                         HF CLIPModel or SiglipModel state dict (a config file beside it
                         is used)
    hf-hub:ORG/REPO      downloaded with huggingface_hub, then one of the directories
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jaxclip.convert import coca, hf, openclip, siglip
from jaxclip.convert.checkpoint import find_step_dir, read_checkpoint
from jaxclip.convert.tensors import read_tensors, write_safetensors
from jaxclip.data.hf_tokenizer import has_tokenizer_files
from jaxclip.data.tokenizer import TokenizerSpec
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
# A model directory's tokenizer (SigLIP's SentencePiece, SigLIP 2's Gemma): read with
# `data.tokenizer=<directory>`, copied into HF exports.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "spiece.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


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
    tokenizer: TokenizerSpec = TokenizerSpec()

    def __post_init__(self) -> None:
        # The CLIP BPE sized to the text tower: OpenAI's 49,408 ids, or fewer merges
        # for a smaller table (a tiny model's).
        sized = self.tokenizer.for_vocabulary(self.config.text.vocab_size)
        object.__setattr__(self, "tokenizer", sized)

    @property
    def logit_bias(self) -> bool:
        """Whether this is a SigLIP-style model with a learned logit bias."""
        return "logit_bias" in self.variables["params"]


def load_weights(
    path: str | os.PathLike,
    name: str | ModelConfig | None = None,
    *,
    ema: bool = False,
) -> Weights:
    """Read weights in any supported format; `name` checks (or sets) the architecture.

    Without `name` the architecture comes from the files: a config beside the
    weights, else the weights' shapes. Any missing key, unexpected key or wrong shape
    is an error that lists them. `ema=True` reads a jaxclip checkpoint's EMA of the
    params (`train.ema_decay` > 0) as the params; any other source is refused.
    """
    path = os.fspath(path)
    if path.startswith(HF_HUB_PREFIX):
        path = download_from_hub(path[len(HF_HUB_PREFIX) :])
    if os.path.isdir(path) and find_step_dir(path) is not None:
        return _load_checkpoint(path, name, ema)
    if ema:
        raise ValueError(
            f"ema=True reads the EMA of the parameters from a jaxclip checkpoint; "
            f"{path} is not one (an exported or foreign file holds one set of weights)"
        )
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, OPENCLIP_CONFIG)):
            return _load_file(_first_file(path, OPENCLIP_WEIGHTS, "OpenCLIP"), name)
        if _is_hf_dir(path):
            return _load_file(_hf_weights_path(path), name)
        raise FileNotFoundError(
            f"{path} is neither a jaxclip checkpoint, an OpenCLIP directory "
            f"({OPENCLIP_CONFIG} + weights) nor a Hugging Face CLIPModel / "
            f"SiglipModel directory ({HF_CONFIG} + {' or '.join(HF_WEIGHTS)})"
        )
    return _load_file(path, name)


def registered_architecture(path: str | os.PathLike) -> str:
    """The registered architecture (`model.name`) to train weights at `path` as: the
    one a jaxclip checkpoint was trained as, else the one equal to the architecture
    its config file (or its shapes) describe, else one with the same parameter names
    and shapes. Raises when no registered architecture has them."""
    path = os.fspath(path)
    step_dir = find_step_dir(path) if os.path.isdir(path) else None
    if step_dir is not None:
        return read_checkpoint(path).name
    if os.path.isdir(path) and _is_hf_dir(path):
        config = hf.config_from_hf(_read_json(os.path.join(path, HF_CONFIG)))
    elif os.path.isdir(path) and os.path.isfile(os.path.join(path, OPENCLIP_CONFIG)):
        settings = _read_json(os.path.join(path, OPENCLIP_CONFIG))
        config = openclip.config_from_openclip(settings["model_cfg"])
    else:
        config = load_weights(path).config
    name = openclip.registered_name(config, same_shapes=True)
    if name is None:
        raise ValueError(
            f"no registered architecture has the parameters of {path} ({config}); "
            "`python -m jaxclip.models` lists them"
        )
    return name


def _load_checkpoint(
    path: str, name: str | ModelConfig | None, ema: bool = False
) -> Weights:
    checkpoint = read_checkpoint(path, ema)
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
        source=f"jaxclip checkpoint {checkpoint.path}" + (" (EMA)" if ema else ""),
        tokenizer=TokenizerSpec(*checkpoint.tokenizer),
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
    model_types = ("clip", "siglip", "siglip2")  # siglip2 (NaFlex): refused on reading
    return os.path.isfile(path) and _read_json(path).get("model_type") in model_types


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
        name,
        what,
        described,
        lambda: openclip.infer_config(tensors, what),
        quick_gelu=True if openai else None,
        gelu_weights=siglip.is_openclip_siglip(tensors)
        or coca.is_openclip_coca(tensors),
    )
    logit_bias = "logit_bias" in tensors
    arch = registered or "the inferred architecture"
    variables = openclip.from_openclip(
        tensors, config, logit_bias, what=f"{what} does not match {arch}"
    )
    mean, std, resize_mode = _default_preprocess(config)
    return Weights(
        config=config,
        variables=variables,
        name=registered,
        mean=tuple(preprocess.get("mean", mean)),
        std=tuple(preprocess.get("std", std)),
        resize_mode=preprocess.get("resize_mode", resize_mode),
        interpolation=preprocess.get("interpolation", "bicubic"),
        source=what,
    )


def _default_preprocess(config: ModelConfig) -> tuple[tuple, tuple, str]:
    """(mean, std, resize mode) when no file says: SigLIP's or OpenAI's."""
    if siglip.is_siglip(config):
        return siglip.SIGLIP_MEAN, siglip.SIGLIP_STD, "squash"
    return OPENAI_MEAN, OPENAI_STD, "shortest"


def _from_hf(
    tensors: Mapping[str, np.ndarray], path: str, name: str | ModelConfig | None
) -> Weights:
    is_siglip = siglip.is_hf_siglip(tensors)
    what = (
        f"Hugging Face {'SiglipModel' if is_siglip else 'CLIPModel'} state dict {path}"
    )
    directory = _directory_of(path)
    config_path = os.path.join(directory, HF_CONFIG)
    described = None
    if os.path.isfile(config_path):
        described = hf.config_from_hf(_read_json(config_path))
    config, registered = _architecture(
        name,
        what,
        described,
        lambda: infer_hf_config(tensors, what),
        quick_gelu=None,
        gelu_weights=is_siglip,
    )
    arch = registered or "the architecture in config.json"
    variables = hf.from_hf(tensors, config, f"{what} does not match {arch}")
    mean, std, resize_mode = _default_preprocess(config)
    mean, std = hf.preprocess_from_hf(directory) or (mean, std)
    # CLIP models keep jaxclip's own BPE, id for id OpenAI's.
    has_tokenizer = siglip.is_siglip(config) and has_tokenizer_files(directory)
    return Weights(
        config=config,
        variables=variables,
        name=registered,
        mean=mean,
        std=std,
        resize_mode=resize_mode,
        source=what,
        tokenizer=TokenizerSpec(directory) if has_tokenizer else TokenizerSpec(),
    )


def _directory_of(path: str) -> str:
    """The directory of a weights file, where a config file beside it would be."""
    return os.path.dirname(os.path.abspath(path))


def _architecture(
    name: str | ModelConfig | None,
    what: str,
    described: ModelConfig | None,
    infer: Callable[[], ModelConfig],
    quick_gelu: bool | None,
    gelu_weights: bool,
) -> tuple[ModelConfig, str | None]:
    """The architecture to load into and its registered name (or None), from `name`,
    else the config beside the weights (`described`), else the weights' shapes
    (`infer()`: the heads and activations then come from a registered architecture
    of those shapes; `quick_gelu` is known only for OpenAI's own state dicts, and
    irrelevant to `gelu_weights`, SigLIP's and CoCa's, which OpenAI never made)."""
    if gelu_weights:
        quick_gelu = False
    if described is not None:
        inferred, quick_gelu, heads_known = described, described.quick_gelu, True
    else:
        inferred, heads_known = infer(), False
    return openclip.resolve_config(
        inferred, name, quick_gelu=quick_gelu, heads_known=heads_known, what=what
    )


def infer_hf_config(tensors: Mapping[str, np.ndarray], what: str) -> ModelConfig:
    """The architecture of an HF state dict without config.json, from its shapes."""
    if siglip.is_hf_siglip(tensors):
        return siglip.infer_config(tensors, siglip.HF, what)
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
    """Download an OpenCLIP or HF CLIPModel / SiglipModel repository's weights (and a
    SigLIP model's tokenizer); returns the directory.

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
        config_path = huggingface_hub.hf_hub_download(repo_id, HF_CONFIG)
        wanted = [next(f for f in HF_WEIGHTS if f in files), "preprocessor_config.json"]
        if _read_json(config_path).get("model_type") == "siglip":
            wanted += TOKENIZER_FILES  # CLIP's tokenizer is jaxclip's own
        wanted = [f for f in wanted if f in files]
    else:
        raise FileNotFoundError(
            f"hf-hub:{repo_id} has neither OpenCLIP ({OPENCLIP_CONFIG}) nor "
            f"HF CLIPModel / SiglipModel ({HF_CONFIG} + {' or '.join(HF_WEIGHTS)}) "
            "weights"
        )
    paths = [huggingface_hub.hf_hub_download(repo_id, f) for f in wanted]
    return os.path.dirname(paths[0])  # the hub's snapshot directory, shared by all


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
    """An HF CLIPModel or SiglipModel directory: model.safetensors, config.json,
    preprocessor and tokenizer files (`transformers.AutoModel.from_pretrained(DIR)`
    loads it). A SigLIP model's tokenizer files are copied from the directory its
    tokenizer was read from (`Weights.tokenizer`), where there is one."""
    directory = os.fspath(directory)
    config = weights.config
    is_siglip = siglip.is_siglip(config)
    if is_siglip:
        siglip.check_hf_exportable(config)
    hf_state = hf.to_hf(weights.variables, config)  # refuses what HF cannot hold
    logit_scale = float(np.asarray(weights.variables["params"]["logit_scale"]))
    settings = hf.hf_config(config, logit_scale)
    preprocessor = (siglip if is_siglip else hf).preprocessor_config(
        config.vision.image_size, weights.mean, weights.std
    )
    os.makedirs(directory, exist_ok=True)
    weights_path = os.path.join(directory, HF_WEIGHTS[0])
    write_safetensors(weights_path, hf_state)
    paths = [weights_path]
    for file_name, content in (
        (HF_CONFIG, settings),
        ("preprocessor_config.json", preprocessor),
    ):
        paths.append(os.path.join(directory, file_name))
        with open(paths[-1], "w", encoding="utf-8") as file:
            json.dump(content, file, indent=2)
    paths += _write_tokenizer(weights, directory)
    return paths


def _write_tokenizer(weights: Weights, directory: str) -> list[str]:
    """The tokenizer's files in an HF export: CLIP's BPE, or a copy of the model
    directory's own; a warning when there is none to write."""
    spec = weights.tokenizer
    if not siglip.is_siglip(weights.config):
        text = weights.config.text
        hf.write_tokenizer_files(directory, text.context_length, text.vocab_size)
        return [os.path.join(directory, "tokenizer_config.json")]
    source = spec.kind if os.path.isdir(spec.kind) else None
    if source is None or os.path.abspath(source) == os.path.abspath(directory):
        if source is None:
            warnings.warn(
                f"no tokenizer files written to {directory}: the model's tokenizer "
                f"({spec.kind}) is not a model directory; copy its files there",
                stacklevel=3,
            )
        return []
    copied = []
    for file_name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(source, file_name)):
            copied.append(os.path.join(directory, file_name))
            shutil.copyfile(os.path.join(source, file_name), copied[-1])
    return copied
