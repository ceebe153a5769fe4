"""Hugging Face `CLIPModel` (ViT family) <-> OpenCLIP state dicts, and HF's files.

HF splits the fused attention projection into q/k/v, stores both output projections
as Linear weights ([embed, width]) and names things differently; everything else is
the same tensor. The conversion goes through OpenCLIP's layout (`openclip.py`), so the
two formats share one mapping onto jaxclip's parameters.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from jaxclip.convert import openclip
from jaxclip.models.registry import ModelConfig, TextConfig, VisionConfig

# Non-persistent in current transformers, saved by older versions.
_IGNORED = re.compile(r".*embeddings\.position_ids$")

# (OpenCLIP key pattern, HF key template, conversion). "{i}" is the layer index.
_BLOCK = [
    (r"ln_1\.(weight|bias)", "layer_norm1.{0}", "copy"),
    (r"ln_2\.(weight|bias)", "layer_norm2.{0}", "copy"),
    (r"mlp\.c_fc\.(weight|bias)", "mlp.fc1.{0}", "copy"),
    (r"mlp\.c_proj\.(weight|bias)", "mlp.fc2.{0}", "copy"),
    (r"attn\.out_proj\.(weight|bias)", "self_attn.out_proj.{0}", "copy"),
    (r"attn\.in_proj_(weight|bias)", "self_attn.{{}}_proj.{0}", "qkv"),
]
# What both towers hold, under each tower's prefix (OpenCLIP's, HF's).
_TOWER = [
    (r"positional_embedding", "embeddings.position_embedding.weight", "copy"),
    *[
        (r"transformer\.resblocks\.(\d+)\." + pattern, "encoder.layers.{i}." + hf, kind)
        for pattern, hf, kind in _BLOCK
    ],
]
_TOWER_PREFIXES = [("", "text_model."), (r"visual\.", "vision_model.")]
_RULES = [
    (r"logit_scale", "logit_scale", "copy"),
    (r"text_projection", "text_projection.weight", "transpose"),
    (r"visual\.proj", "visual_projection.weight", "transpose"),
    (
        r"token_embedding\.weight",
        "text_model.embeddings.token_embedding.weight",
        "copy",
    ),
    (r"ln_final\.(weight|bias)", "text_model.final_layer_norm.{0}", "copy"),
    (r"visual\.class_embedding", "vision_model.embeddings.class_embedding", "copy"),
    (
        r"visual\.conv1\.weight",
        "vision_model.embeddings.patch_embedding.weight",
        "copy",
    ),
    (r"visual\.ln_pre\.(weight|bias)", "vision_model.pre_layrnorm.{0}", "copy"),
    (r"visual\.ln_post\.(weight|bias)", "vision_model.post_layernorm.{0}", "copy"),
    *[
        (prefix + pattern, hf_prefix + hf, kind)
        for prefix, hf_prefix in _TOWER_PREFIXES
        for pattern, hf, kind in _TOWER
    ],
]
_COMPILED = [(re.compile(pattern), hf, kind) for pattern, hf, kind in _RULES]


def _rule(key: str) -> tuple[list[str], str]:
    """HF keys (three for a fused q/k/v tensor) and the conversion for an OpenCLIP key."""
    for pattern, template, kind in _COMPILED:
        match = pattern.fullmatch(key)
        if match is None:
            continue
        groups = match.groups()
        if template.count("{i}"):
            layer, *groups = groups
            template = template.replace("{i}", layer)
        name = template.format(*groups) if groups else template
        if kind == "qkv":
            return [name.format(part) for part in ("q", "k", "v")], kind
        return [name], kind
    raise ValueError(f"{key} has no Hugging Face CLIPModel counterpart")


def _hf_shapes(key: str, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    names, kind = _rule(key)
    if kind == "transpose":
        return {names[0]: shape[::-1]}
    if kind == "qkv":
        return {name: (shape[0] // 3, *shape[1:]) for name in names}
    return {names[0]: shape}


def expected_hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF CLIPModel key and shape for this architecture."""
    if config.vision.is_resnet:
        raise ValueError(
            "Hugging Face CLIPModel has no ResNet image tower; use the OpenCLIP format"
        )
    shapes: dict[str, tuple[int, ...]] = {}
    for entry in openclip.layout(config):
        shapes.update(_hf_shapes(entry.key, entry.torch_shape))
    return shapes


def openclip_to_hf(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """OpenCLIP ViT state dict -> HF CLIPModel state dict."""
    out = {}
    for key, value in state_dict.items():
        if openclip.ignored_key(key):
            continue
        if key == "logit_bias":
            raise ValueError(
                "this model has a SigLIP logit bias, which HF CLIPModel cannot hold; "
                "use the OpenCLIP format"
            )
        names, kind = _rule(key)
        if kind == "transpose":
            out[names[0]] = np.asarray(value.T, order="C")
        elif kind == "qkv":
            for name, part in zip(names, np.split(value, 3, axis=0)):
                out[name] = np.asarray(part, order="C")
        else:
            out[names[0]] = value
    return out


def hf_to_openclip(
    tensors: Mapping[str, np.ndarray], config: ModelConfig, what: str
) -> dict[str, np.ndarray]:
    """HF CLIPModel state dict -> OpenCLIP state dict, checked key by key in HF names."""
    openclip.check_keys(
        tensors,
        expected_hf_shapes(config),
        what,
        ignore=lambda k: bool(_IGNORED.match(k)),
    )
    out = {}
    for entry in openclip.layout(config):
        names, kind = _rule(entry.key)
        if kind == "transpose":
            out[entry.key] = np.asarray(tensors[names[0]]).T
        elif kind == "qkv":
            out[entry.key] = np.concatenate([np.asarray(tensors[n]) for n in names])
        else:
            out[entry.key] = np.asarray(tensors[names[0]])
    return out


def is_hf_state_dict(keys: Iterable[str]) -> bool:
    """Whether keys look like HF CLIPModel's."""
    return any(k.startswith(("text_model.", "vision_model.")) for k in keys)


# ---------------------------------------------------------------------------
# config.json, preprocessor_config.json and the tokenizer files.
# ---------------------------------------------------------------------------

_ACTIVATIONS = {"quick_gelu": True, "gelu": False}


def config_from_hf(hf_config: Mapping[str, Any]) -> ModelConfig:
    """ModelConfig from an HF CLIPModel config.json dict."""
    if hf_config.get("model_type", "clip") != "clip":
        raise ValueError(
            f"config.json has model_type={hf_config.get('model_type')!r}; "
            "jaxclip reads HF CLIPModel ('clip') checkpoints"
        )
    text, vision = hf_config.get("text_config", {}), hf_config.get("vision_config", {})
    acts = {
        text.get("hidden_act", "quick_gelu"),
        vision.get("hidden_act", "quick_gelu"),
    }
    if len(acts) != 1 or not acts <= set(_ACTIVATIONS):
        raise ValueError(
            f"hidden_act {sorted(acts)} is not supported: both towers must use "
            f"one of {sorted(_ACTIVATIONS)}"
        )
    for tower in (text, vision):
        eps = tower.get("layer_norm_eps", 1e-5)
        if eps != 1e-5:
            raise ValueError(f"layer_norm_eps={eps}; jaxclip's LayerNorm uses 1e-5")
    if vision.get("num_channels", 3) != 3:
        raise ValueError("only 3-channel images are supported")
    text_width = text.get("hidden_size", 512)
    vision_width = vision.get("hidden_size", 768)
    vision_heads = vision.get("num_attention_heads", 12)
    return ModelConfig(
        embed_dim=hf_config.get("projection_dim", 512),
        vision=VisionConfig(
            image_size=vision.get("image_size", 224),
            layers=vision.get("num_hidden_layers", 12),
            width=vision_width,
            patch_size=vision.get("patch_size", 32),
            head_width=vision_width // vision_heads,
            mlp_ratio=vision.get("intermediate_size", 3072) / vision_width,
        ),
        text=TextConfig(
            context_length=text.get("max_position_embeddings", 77),
            vocab_size=text.get("vocab_size", 49408),
            width=text_width,
            heads=text.get("num_attention_heads", 8),
            layers=text.get("num_hidden_layers", 12),
            mlp_ratio=text.get("intermediate_size", 2048) / text_width,
        ),
        quick_gelu=_ACTIVATIONS[acts.pop()],
    )


def hf_config(config: ModelConfig, logit_scale: float) -> dict[str, Any]:
    """HF CLIPModel config.json for a jaxclip ViT architecture."""
    if config.vision.is_resnet:
        raise ValueError("Hugging Face CLIPModel has no ResNet image tower")
    act = "quick_gelu" if config.quick_gelu else "gelu"
    vision, text = config.vision, config.text
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": config.embed_dim,
        "logit_scale_init_value": logit_scale,
        "initializer_factor": 1.0,
        "torch_dtype": "float32",
        "text_config": {
            "model_type": "clip_text_model",
            "hidden_size": text.width,
            "intermediate_size": int(text.width * text.mlp_ratio),
            "num_attention_heads": text.heads,
            "num_hidden_layers": text.layers,
            "max_position_embeddings": text.context_length,
            "vocab_size": text.vocab_size,
            "hidden_act": act,
            "layer_norm_eps": 1e-5,
            "projection_dim": config.embed_dim,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 1,
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": vision.width,
            "intermediate_size": int(vision.width * vision.mlp_ratio),
            "num_attention_heads": vision.heads,
            "num_hidden_layers": vision.layers,
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "num_channels": 3,
            "hidden_act": act,
            "layer_norm_eps": 1e-5,
            "projection_dim": config.embed_dim,
        },
    }


def preprocessor_config(
    image_size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> dict[str, Any]:
    """HF CLIPImageProcessor settings: shortest side to `image_size`, centre crop."""
    return {
        "image_processor_type": "CLIPImageProcessor",
        "processor_class": "CLIPProcessor",
        "do_resize": True,
        "size": {"shortest_edge": image_size},
        "resample": 3,  # bicubic
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(mean),
        "image_std": list(std),
        "do_convert_rgb": True,
    }


def preprocess_from_hf(directory: str) -> tuple[tuple, tuple] | None:
    """(mean, std) from a directory's preprocessor_config.json, if it has one."""
    path = os.path.join(directory, "preprocessor_config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as file:
        settings = json.load(file)
    if "image_mean" not in settings or "image_std" not in settings:
        return None
    return tuple(settings["image_mean"]), tuple(settings["image_std"])


def write_tokenizer_files(directory: str, context_length: int) -> None:
    """vocab.json, merges.txt and tokenizer_config.json for HF's CLIPTokenizer."""
    from jaxclip.data.tokenizer import default_tokenizer

    tokenizer = default_tokenizer()
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as file:
        json.dump(tokenizer.encoder, file, ensure_ascii=False)
    merges = sorted(tokenizer.merge_ranks, key=tokenizer.merge_ranks.get)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as file:
        file.write("#version: 0.2\n")
        file.writelines(" ".join(merge) + "\n" for merge in merges)
    settings = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": context_length,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    path = os.path.join(directory, "tokenizer_config.json")
    with open(path, "w", encoding="utf-8") as file:
        json.dump(settings, file, indent=2)
