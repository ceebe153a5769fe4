"""Hugging Face `CLIPModel` (ViT family) and `SiglipModel` weights, and HF's files.

HF splits the fused attention projection into q/k/v, stores both output projections
as Linear weights ([embed, width]) and names things differently; everything else is
the same tensor. The conversion renames the canonical keys (`openclip.layout`; for
CLIP, OpenCLIP's own) with a `renaming.Renaming`: `CLIP_HF` below, `siglip.HF` for
SigLIP, so every format shares one mapping onto jaxclip's parameters.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from jaxclip.convert import openclip, siglip
from jaxclip.convert.renaming import Renaming
from jaxclip.data.tokenizer import VOCAB_SIZE, special_tokens
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
CLIP_HF = Renaming("Hugging Face CLIPModel", _RULES)


def _renaming(config: ModelConfig) -> Renaming:
    """HF's keys for this architecture: `SiglipModel`'s or `CLIPModel`'s."""
    if config.vision.is_resnet:
        raise ValueError(
            "Hugging Face CLIPModel has no ResNet image tower; use the OpenCLIP format"
        )
    _refuse_coca(config)
    return siglip.HF if siglip.is_siglip(config) else CLIP_HF


def _refuse_coca(config: ModelConfig) -> None:
    if config.is_coca:
        raise ValueError(
            "Hugging Face transformers has no CoCa model; use the OpenCLIP format"
        )


def expected_hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF key and shape for this architecture (CLIPModel or SiglipModel)."""
    return _renaming(config).expected_shapes(openclip.canonical_shapes(config))


def to_hf(variables: Mapping, config: ModelConfig) -> dict[str, np.ndarray]:
    """jaxclip variables -> an HF CLIPModel / SiglipModel state dict."""
    renaming = _renaming(config)
    if "logit_bias" in variables["params"] and renaming is CLIP_HF:
        raise ValueError(
            "this model has a SigLIP logit bias, which HF CLIPModel cannot hold; "
            "use the OpenCLIP format"
        )
    return renaming.rename(openclip.to_canonical(variables, config))


def from_hf(tensors: Mapping[str, np.ndarray], config: ModelConfig, what: str) -> dict:
    """HF CLIPModel / SiglipModel state dict -> jaxclip variables, checked key by key
    in HF's names."""
    canonical = _renaming(config).restore(
        tensors,
        openclip.canonical_shapes(config),
        what,
        ignore=lambda key: bool(_IGNORED.match(key)),
    )
    return openclip.from_canonical(canonical, config, what=what)


def is_hf_state_dict(keys: Iterable[str]) -> bool:
    """Whether keys look like HF CLIPModel's or SiglipModel's."""
    return any(k.startswith(("text_model.", "vision_model.")) for k in keys)


# ---------------------------------------------------------------------------
# config.json, preprocessor_config.json and the tokenizer files.
# ---------------------------------------------------------------------------

_ACTIVATIONS = {"quick_gelu": True, "gelu": False}


def config_from_hf(hf_config: Mapping[str, Any]) -> ModelConfig:
    """ModelConfig from an HF CLIPModel or SiglipModel config.json dict."""
    model_type = hf_config.get("model_type", "clip")
    if model_type == "siglip":
        return siglip.config_from_hf(hf_config)
    if model_type == "siglip2":
        raise ValueError(
            "config.json has model_type='siglip2': a NaFlex (variable-resolution) "
            "SigLIP 2 checkpoint (Siglip2Model), which jaxclip does not read. The "
            "fixed-resolution SigLIP 2 checkpoints (e.g. google/siglip2-base-patch16-"
            "224) are SiglipModel directories (model_type 'siglip') and load"
        )
    if model_type != "clip":
        raise ValueError(
            f"config.json has model_type={model_type!r}; jaxclip reads HF CLIPModel "
            "('clip') and SiglipModel ('siglip') checkpoints"
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
    """HF CLIPModel (or, for SigLIP, SiglipModel) config.json for an architecture."""
    if config.vision.is_resnet:
        raise ValueError("Hugging Face CLIPModel has no ResNet image tower")
    _refuse_coca(config)
    if siglip.is_siglip(config):
        return siglip.hf_config(config)
    act = "quick_gelu" if config.quick_gelu else "gelu"
    vision, text = config.vision, config.text
    sot, eot = special_tokens(min(text.vocab_size, VOCAB_SIZE))
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
            # The CLIP BPE's start and end tokens; HF pools at the end token's id.
            "bos_token_id": sot,
            "eos_token_id": eot,
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


def write_tokenizer_files(
    directory: str, context_length: int, vocab_size: int = VOCAB_SIZE
) -> None:
    """vocab.json, merges.txt and tokenizer_config.json for HF's CLIPTokenizer: the
    CLIP BPE for a text tower of `vocab_size` embeddings (its first merges, below
    OpenAI's 49,408 ids)."""
    from jaxclip.data.tokenizer import default_tokenizer

    tokenizer = default_tokenizer(min(vocab_size, VOCAB_SIZE))
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
