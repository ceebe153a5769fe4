"""OpenCLIP CoCa weights: state dicts and model configs in and out.

jaxclip's CoCa maps mechanically onto canonical keys (`openclip.layout`), which are
OpenCLIP's own but for one tensor. The decoder's layers are one stack in jaxclip
(`text_decoder/layers/{resblocks,cross_attn}`, leading `layers` axis) and two lists
in OpenCLIP (`text_decoder.resblocks.{i}`, `text_decoder.cross_attn.{i}`); the
canonical keys are already OpenCLIP's. The pooler's attention
(`visual.attn_pool.attn`) has separate `q_proj_weight`, `k_proj_weight` and
`v_proj_weight` in torch when its queries (`embed_dim`) and the image tokens (the
ViT's width) differ in width, as in every OpenCLIP CoCa; when they are equal, torch
fuses them into one `in_proj_weight`, which this module splits and joins.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from jaxclip.models.registry import (
    DecoderConfig,
    ModelConfig,
    TextConfig,
    VisionConfig,
    mlp_ratio_for,
)

POOLER = "visual.attn_pool.attn."
_PARTS = ("q_proj_weight", "k_proj_weight", "v_proj_weight")
FUSED = POOLER + "in_proj_weight"


def is_openclip_coca(keys: Iterable[str]) -> bool:
    """Whether a state dict's keys are OpenCLIP CoCa's (a multimodal text decoder)."""
    return any(key.startswith("text_decoder.") for key in keys)


def fused_pooler(config: ModelConfig) -> bool:
    """Whether torch fuses the pooler's q/k/v (queries as wide as the image tokens)."""
    return config.embed_dim == config.vision.width


def file_shapes(
    canonical: Mapping[str, tuple[int, ...]], config: ModelConfig
) -> dict[str, tuple[int, ...]]:
    """OpenCLIP's keys and shapes from the canonical ones."""
    shapes = dict(canonical)
    if fused_pooler(config):
        parts = [shapes.pop(POOLER + part) for part in _PARTS]
        shapes[FUSED] = (sum(shape[0] for shape in parts), parts[0][1])
    return shapes


def to_file(
    canonical: Mapping[str, np.ndarray], config: ModelConfig
) -> dict[str, np.ndarray]:
    """A canonical state dict in OpenCLIP's keys."""
    tensors = dict(canonical)
    if fused_pooler(config):
        tensors[FUSED] = np.concatenate([tensors.pop(POOLER + p) for p in _PARTS])
    return tensors


def from_file(
    tensors: Mapping[str, np.ndarray],
    canonical: Mapping[str, tuple[int, ...]],
    config: ModelConfig,
    what: str,
    ignore: Callable[[str], bool],
) -> dict[str, np.ndarray]:
    """The canonical state dict from OpenCLIP's tensors, checked key by key in
    OpenCLIP's names (one error lists missing, unexpected and misshapen keys)."""
    from jaxclip.convert.openclip import check_keys  # it imports this module

    check_keys(tensors, file_shapes(canonical, config), what, ignore=ignore)
    out = {key: tensors[key] for key in tensors if not ignore(key)}
    if fused_pooler(config):
        fused = np.asarray(out.pop(FUSED))
        for part, value in zip(_PARTS, np.split(fused, 3)):
            out[POOLER + part] = value
    return out


def infer_config(tensors: Mapping[str, np.ndarray], what: str) -> ModelConfig:
    """A CoCa state dict's architecture from its shapes. Heads are not in the weights:
    64-wide heads (8 in the pooler) are assumed, which `openclip.resolve_config`
    corrects from a registered architecture of the same shapes."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in tensors:
            raise ValueError(f"cannot read the {what} as OpenCLIP CoCa: {key} missing")
        return tuple(np.shape(tensors[key]))

    def count(prefix: str) -> int:
        pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
        return len({m.group(1) for key in tensors if (m := pattern.match(key))})

    width, _, patch, _ = shape("visual.conv1.weight")
    grid = round((shape("visual.positional_embedding")[0] - 1) ** 0.5)
    vision = VisionConfig(
        image_size=grid * patch,
        layers=count("visual.transformer.resblocks"),
        width=width,
        patch_size=patch,
        mlp_ratio=mlp_ratio_for(
            width, shape("visual.transformer.resblocks.0.mlp.c_fc.weight")[0]
        ),
    )
    vocab_size, text_width = shape("text.token_embedding.weight")
    text = TextConfig(
        context_length=shape("text.positional_embedding")[0] - 1,  # the CLS's too
        vocab_size=vocab_size,
        width=text_width,
        heads=max(text_width // 64, 1),
        layers=count("text.transformer.resblocks"),
        mlp_ratio=mlp_ratio_for(
            text_width, shape("text.transformer.resblocks.0.mlp.c_fc.weight")[0]
        ),
    )
    decoder_width = shape("text_decoder.ln_final.weight")[0]
    decoder = DecoderConfig(
        width=decoder_width,
        heads=max(decoder_width // 64, 1),
        layers=count("text_decoder.resblocks"),
        mlp_ratio=mlp_ratio_for(
            decoder_width, shape("text_decoder.resblocks.0.mlp.c_fc.weight")[0]
        ),
        n_queries=shape("visual.attn_pool.query")[0],
    )
    return ModelConfig(
        embed_dim=shape("text.text_projection")[1],
        vision=vision,
        text=text,
        decoder=decoder,
    )


# OpenCLIP options of a CoCa config that jaxclip's CoCa has built in, at these values.
_BUILT_IN = {
    "vision_cfg": {"attentional_pool": True, "output_tokens": True},
    "text_cfg": {"embed_cls": True, "output_tokens": True, "pad_id": 0},
}


def config_from_openclip(
    model_cfg: Mapping[str, Any], tower_config: Callable[[Mapping], ModelConfig]
) -> ModelConfig:
    """ModelConfig from OpenCLIP's CoCa config (`coca_*.json`); `tower_config` reads
    the CLIP towers from a config without the CoCa options."""
    model_cfg = dict(model_cfg)
    multimodal = dict(model_cfg.pop("multimodal_cfg"))
    model_cfg.pop("custom_text", None)
    towers = {}
    for where, built_in in _BUILT_IN.items():
        cfg = dict(model_cfg.get(where, {}))
        for key, value in built_in.items():
            found = cfg.pop(key, value)
            if found != value:
                raise ValueError(
                    f"OpenCLIP CoCa option {where}.{key}={found!r} is not supported; "
                    f"jaxclip's CoCa has {value!r}"
                )
        towers[where] = cfg
    vision_cfg = towers["vision_cfg"]
    n_queries = vision_cfg.pop("attn_pooler_queries", 256)
    pooler_heads = vision_cfg.pop("attn_pooler_heads", 8)
    config = tower_config({**model_cfg, **towers})
    if multimodal.get("vocab_size", config.text.vocab_size) != config.text.vocab_size:
        raise ValueError(
            "OpenCLIP CoCa multimodal_cfg.vocab_size differs from text_cfg.vocab_size; "
            "the decoder predicts the text tower's vocabulary"
        )
    for key in ("ls_init_value",):
        if multimodal.get(key) is not None:
            raise ValueError(f"OpenCLIP CoCa multimodal_cfg.{key} is not supported")
    # OpenCLIP builds the decoder with MLPs 4x wide whatever multimodal_cfg.mlp_ratio
    # says, and its pooler from vision_cfg's settings (multimodal_cfg's are unused).
    decoder = DecoderConfig(
        width=multimodal.get("width", 512),
        heads=multimodal.get("heads", 8),
        layers=multimodal.get("layers", 12),
        n_queries=n_queries,
        attn_pooler_heads=pooler_heads,
    )
    return ModelConfig(
        embed_dim=config.embed_dim,
        vision=config.vision,
        text=config.text,
        quick_gelu=config.quick_gelu,
        decoder=decoder,
    )


def openclip_model_cfg(config: ModelConfig, clip_cfg: dict[str, Any]) -> dict:
    """OpenCLIP's CoCa config from the CLIP towers' (`clip_cfg`) and the decoder."""
    decoder = config.decoder
    cfg = dict(clip_cfg)
    cfg["vision_cfg"] = {
        **cfg["vision_cfg"],
        "attentional_pool": True,
        "attn_pooler_queries": decoder.n_queries,
        "attn_pooler_heads": decoder.attn_pooler_heads,
        "output_tokens": True,
    }
    cfg["text_cfg"] = {**cfg["text_cfg"], "embed_cls": True, "output_tokens": True}
    if decoder.mlp_ratio != 4.0:
        raise ValueError(
            f"OpenCLIP's CoCa decoder has 4x MLPs, this one {decoder.mlp_ratio}x"
        )
    cfg["multimodal_cfg"] = {
        "context_length": config.text.context_length,
        "vocab_size": config.text.vocab_size,
        "width": decoder.width,
        "heads": decoder.heads,
        "layers": decoder.layers,
        "attn_pooler_heads": decoder.attn_pooler_heads,
    }
    cfg["custom_text"] = True
    return cfg
