"""SigLIP and SigLIP 2 weights: OpenCLIP's timm-named state dicts and HF `SiglipModel`.

jaxclip's SigLIP towers map mechanically onto canonical keys (`openclip.layout`), as
CLIP's do; the two outside formats rename them (`renaming.Renaming`):

    canonical                      OpenCLIP (timm image tower)   HF SiglipModel
    visual.conv1                   visual.trunk.patch_embed.proj  vision_model.embeddings
                                                                    .patch_embedding
    visual.positional_embedding    visual.trunk.pos_embed          ...position_embedding
      [N, W]                         [1, N, W]                       [N, W]
    visual.transformer             visual.trunk.blocks.{i}         vision_model.encoder
      .resblocks.{i}                                                 .layers.{i}
    visual.ln_post                 visual.trunk.norm               ...post_layernorm
    visual.attn_pool.probe [W]     ...attn_pool.latent [1, 1, W]   ...head.probe [1, 1, W]
    visual.attn_pool.attn.in_proj  ...attn_pool.q + .kv            ...head.attention
                                                                      .in_proj
    the text tower's keys          text.<the same>                 text_model.*, with
                                                                    text_projection -> head

HF's fixed-resolution SigLIP 2 checkpoints are `SiglipModel`s too (model_type
"siglip"); the NaFlex variant (`Siglip2Model`, "siglip2") is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxclip.convert.renaming import Renaming
from jaxclip.models.registry import (
    TIMM_SIGLIP_TOWERS,
    ModelConfig,
    TextConfig,
    VisionConfig,
    mlp_ratio_for,
)

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


def is_siglip(config: ModelConfig) -> bool:
    """Whether `config` is a SigLIP architecture (a MAP-pooled image tower)."""
    return not config.vision.is_resnet and config.vision.pool == "map"


def _blocks(canonical: str, target: str, names: Mapping[str, str]) -> list:
    """Rules for a stack of blocks: `canonical` and `target` prefixes, leaf names."""
    return [
        (rf"{canonical}\.(\d+)\.{ours}\.(weight|bias)", target + "{i}." + theirs, kind)
        for ours, (theirs, kind) in names.items()
    ]


_TIMM_BLOCK = {
    "ln_1": ("norm1.{0}", "copy"),
    "ln_2": ("norm2.{0}", "copy"),
    r"attn\.out_proj": ("attn.proj.{0}", "copy"),
    r"mlp\.c_fc": ("mlp.fc1.{0}", "copy"),
    r"mlp\.c_proj": ("mlp.fc2.{0}", "copy"),
}
_TEXT_BLOCK = {
    name: (name.replace("\\", "") + ".{0}", "copy")
    for name in ("ln_1", "ln_2", r"attn\.out_proj", r"mlp\.c_fc", r"mlp\.c_proj")
}
_HF_BLOCK = {
    "ln_1": ("layer_norm1.{0}", "copy"),
    "ln_2": ("layer_norm2.{0}", "copy"),
    r"attn\.out_proj": ("self_attn.out_proj.{0}", "copy"),
    r"mlp\.c_fc": ("mlp.fc1.{0}", "copy"),
    r"mlp\.c_proj": ("mlp.fc2.{0}", "copy"),
}
_POOL = r"visual\.attn_pool\."

OPENCLIP = Renaming(
    "OpenCLIP SigLIP",
    [
        ("logit_scale", "logit_scale", "copy"),
        ("logit_bias", "logit_bias", "copy"),
        (r"visual\.conv1\.(weight|bias)", "visual.trunk.patch_embed.proj.{0}", "copy"),
        (r"visual\.positional_embedding", "visual.trunk.pos_embed", "lead1"),
        *_blocks(r"visual\.transformer\.resblocks", "visual.trunk.blocks.", _TIMM_BLOCK),
        (
            r"visual\.transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)",
            "visual.trunk.blocks.{i}.attn.qkv.{0}",
            "copy",
        ),
        (r"visual\.ln_post\.(weight|bias)", "visual.trunk.norm.{0}", "copy"),
        (_POOL + "probe", "visual.trunk.attn_pool.latent", "lead2"),
        (
            _POOL + r"attn\.in_proj_(weight|bias)",
            "visual.trunk.attn_pool.{{}}.{0}",
            "q_kv",
        ),
        (_POOL + r"attn\.out_proj\.(weight|bias)", "visual.trunk.attn_pool.proj.{0}", "copy"),
        (_POOL + r"ln\.(weight|bias)", "visual.trunk.attn_pool.norm.{0}", "copy"),
        (_POOL + r"mlp\.c_fc\.(weight|bias)", "visual.trunk.attn_pool.mlp.fc1.{0}", "copy"),
        (_POOL + r"mlp\.c_proj\.(weight|bias)", "visual.trunk.attn_pool.mlp.fc2.{0}", "copy"),
        (r"token_embedding\.weight", "text.token_embedding.weight", "copy"),
        ("positional_embedding", "text.positional_embedding", "copy"),
        *_blocks(r"transformer\.resblocks", "text.transformer.resblocks.", _TEXT_BLOCK),
        (
            r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)",
            "text.transformer.resblocks.{i}.attn.in_proj_{0}",
            "copy",
        ),
        (r"ln_final\.(weight|bias)", "text.ln_final.{0}", "copy"),
        (r"text_projection\.(weight|bias)", "text.text_projection.{0}", "copy"),
    ],
)  # fmt: skip

HF = Renaming(
    "Hugging Face SiglipModel",
    [
        ("logit_scale", "logit_scale", "lead1"),
        ("logit_bias", "logit_bias", "lead1"),
        (
            r"visual\.conv1\.(weight|bias)",
            "vision_model.embeddings.patch_embedding.{0}",
            "copy",
        ),
        (
            r"visual\.positional_embedding",
            "vision_model.embeddings.position_embedding.weight",
            "copy",
        ),
        *_blocks(
            r"visual\.transformer\.resblocks", "vision_model.encoder.layers.", _HF_BLOCK
        ),
        (
            r"visual\.transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)",
            "vision_model.encoder.layers.{i}.self_attn.{{}}_proj.{0}",
            "qkv",
        ),
        (r"visual\.ln_post\.(weight|bias)", "vision_model.post_layernorm.{0}", "copy"),
        (_POOL + "probe", "vision_model.head.probe", "lead2"),
        (
            _POOL + r"attn\.in_proj_(weight|bias)",
            "vision_model.head.attention.in_proj_{0}",
            "copy",
        ),
        (
            _POOL + r"attn\.out_proj\.(weight|bias)",
            "vision_model.head.attention.out_proj.{0}",
            "copy",
        ),
        (_POOL + r"ln\.(weight|bias)", "vision_model.head.layernorm.{0}", "copy"),
        (_POOL + r"mlp\.c_fc\.(weight|bias)", "vision_model.head.mlp.fc1.{0}", "copy"),
        (
            _POOL + r"mlp\.c_proj\.(weight|bias)",
            "vision_model.head.mlp.fc2.{0}",
            "copy",
        ),
        (
            r"token_embedding\.weight",
            "text_model.embeddings.token_embedding.weight",
            "copy",
        ),
        (
            "positional_embedding",
            "text_model.embeddings.position_embedding.weight",
            "copy",
        ),
        *_blocks(r"transformer\.resblocks", "text_model.encoder.layers.", _HF_BLOCK),
        (
            r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)",
            "text_model.encoder.layers.{i}.self_attn.{{}}_proj.{0}",
            "qkv",
        ),
        (r"ln_final\.(weight|bias)", "text_model.final_layer_norm.{0}", "copy"),
        (r"text_projection\.(weight|bias)", "text_model.head.{0}", "copy"),
    ],
)


def is_openclip_siglip(keys) -> bool:
    """Whether state-dict keys are OpenCLIP's SigLIP layout (timm image tower)."""
    return any(k.startswith("visual.trunk.attn_pool.") for k in keys)


def is_hf_siglip(keys) -> bool:
    """Whether state-dict keys are HF SiglipModel's."""
    return any(k.startswith(("vision_model.head.", "text_model.head.")) for k in keys)


# ---------------------------------------------------------------------------
# The architecture from the shapes, when no config file says it.
# ---------------------------------------------------------------------------


def infer_config(
    tensors: Mapping[str, Any], renaming: Renaming, what: str
) -> ModelConfig:
    """A SigLIP architecture from the shapes of a state dict in `renaming`'s keys.

    Heads and activations are not in the weights: 64-wide heads and exact GELU are
    assumed here, and `openclip.resolve_config` completes them from a registered
    architecture of the same shapes.
    """

    def shape(key: str) -> tuple[int, ...]:
        names = renaming.shapes(key, ())  # the format's name(s) for `key`
        name = next(iter(names))
        if name not in tensors:
            raise ValueError(
                f"cannot infer the architecture of the {what}: {name} is missing"
            )
        return tuple(np.shape(tensors[name]))

    def count(prefix: str) -> int:
        layers = 0
        while next(iter(renaming.shapes(f"{prefix}.{layers}.ln_1.weight", ()))) in (
            tensors
        ):
            layers += 1
        return layers

    width, _, patch, _ = shape("visual.conv1.weight")
    tokens = int(np.prod(shape("visual.positional_embedding"))) // width
    vision_mlp = shape("visual.transformer.resblocks.0.mlp.c_fc.weight")[0]
    vocab_size, text_width = shape("token_embedding.weight")
    context_length = int(np.prod(shape("positional_embedding"))) // text_width
    text_mlp = shape("transformer.resblocks.0.mlp.c_fc.weight")[0]
    embed_dim = shape("text_projection.weight")[0]
    vision = VisionConfig(
        image_size=round(tokens**0.5) * patch,
        layers=count("visual.transformer.resblocks"),
        width=width,
        patch_size=patch,
        mlp_ratio=mlp_ratio_for(width, vision_mlp),
        pool="map",
    )
    text = TextConfig(
        context_length=context_length,
        vocab_size=vocab_size,
        width=text_width,
        heads=max(text_width // 64, 1),
        layers=count("transformer.resblocks"),
        mlp_ratio=mlp_ratio_for(text_width, text_mlp),
        causal=False,
        pool="last",
        proj_bias=True,
    )
    return ModelConfig(embed_dim, vision, text, logit_bias=True, norm_eps=1e-6)


# ---------------------------------------------------------------------------
# HF config.json and preprocessor_config.json.
# ---------------------------------------------------------------------------

# HF's activation names <-> jaxclip's.
_HF_ACTS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
_TO_HF_ACT = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}


def _hf_act(tower: Mapping[str, Any], where: str) -> str:
    act = tower.get("hidden_act", "gelu_pytorch_tanh")
    if act not in _HF_ACTS:
        raise ValueError(
            f"config.json {where}.hidden_act={act!r} is not supported; expected one "
            f"of {sorted(_HF_ACTS)}"
        )
    return _HF_ACTS[act]


def config_from_hf(hf_config: Mapping[str, Any]) -> ModelConfig:
    """ModelConfig from an HF SiglipModel config.json dict (model_type "siglip")."""
    text = dict(hf_config.get("text_config") or {})
    vision = dict(hf_config.get("vision_config") or {})
    if not vision.get("vision_use_head", True):
        raise ValueError(
            "config.json sets vision_config.vision_use_head=false; jaxclip's SigLIP "
            "image tower always has its attention-pooling head"
        )
    eps = {
        text.get("layer_norm_eps", 1e-6),
        vision.get("layer_norm_eps", 1e-6),
    }
    if len(eps) != 1:
        raise ValueError(f"the towers' layer_norm_eps differ ({sorted(eps)})")
    if vision.get("num_channels", 3) != 3:
        raise ValueError("only 3-channel images are supported")
    image_size, patch_size = vision.get("image_size", 224), vision.get("patch_size", 16)
    if isinstance(image_size, (list, tuple)) or isinstance(patch_size, (list, tuple)):
        raise ValueError(f"non-square image_size/patch_size in config.json: {vision}")
    vision_width = vision.get("hidden_size", 768)
    text_width = text.get("hidden_size", 768)
    embed_dim = text.get("projection_size") or text_width
    if embed_dim != vision_width:
        raise ValueError(
            f"config.json's text projection_size {embed_dim} differs from the image "
            f"tower's width {vision_width}; SigLIP's image tower has no projection"
        )
    vision_heads = vision.get("num_attention_heads", 12)
    return ModelConfig(
        embed_dim=embed_dim,
        vision=VisionConfig(
            image_size=image_size,
            layers=vision.get("num_hidden_layers", 12),
            width=vision_width,
            patch_size=patch_size,
            head_width=vision_width // vision_heads,
            mlp_ratio=mlp_ratio_for(
                vision_width, vision.get("intermediate_size", 3072)
            ),
            pool="map",
            act=_hf_act(vision, "vision_config"),
        ),
        text=TextConfig(
            context_length=text.get("max_position_embeddings", 64),
            vocab_size=text.get("vocab_size", 32000),
            width=text_width,
            heads=text.get("num_attention_heads", 12),
            layers=text.get("num_hidden_layers", 12),
            mlp_ratio=mlp_ratio_for(text_width, text.get("intermediate_size", 3072)),
            causal=False,
            pool="last",
            proj_bias=True,
            act=_hf_act(text, "text_config"),
        ),
        logit_bias=True,
        norm_eps=eps.pop(),
    )


def hf_config(config: ModelConfig) -> dict[str, Any]:
    """HF SiglipModel config.json for a jaxclip SigLIP architecture."""
    vision, text = config.vision, config.text
    return {
        "architectures": ["SiglipModel"],
        "model_type": "siglip",
        "initializer_factor": 1.0,
        "torch_dtype": "float32",
        "text_config": {
            "model_type": "siglip_text_model",
            "hidden_size": text.width,
            "intermediate_size": int(text.width * text.mlp_ratio),
            "num_attention_heads": text.heads,
            "num_hidden_layers": text.layers,
            "max_position_embeddings": text.context_length,
            "vocab_size": text.vocab_size,
            "hidden_act": _TO_HF_ACT[config.text_act],
            "layer_norm_eps": config.norm_eps,
            "projection_size": config.embed_dim,
        },
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": vision.width,
            "intermediate_size": int(vision.width * vision.mlp_ratio),
            "num_attention_heads": vision.heads,
            "num_hidden_layers": vision.layers,
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "num_channels": 3,
            "hidden_act": _TO_HF_ACT[config.vision_act],
            "layer_norm_eps": config.norm_eps,
            "vision_use_head": True,
        },
    }


def check_hf_exportable(config: ModelConfig) -> None:
    """Refuse what HF SiglipModel cannot hold, before anything is written."""
    text = config.text
    if text.causal or text.pool != "last" or not text.proj_bias:
        raise ValueError(
            "HF SiglipModel's text tower is bidirectional, pooled at its last token, "
            "with a biased projection; this model's is not"
        )
    unsupported = {config.vision_act, config.text_act} - set(_TO_HF_ACT)
    if unsupported:
        raise ValueError(f"HF SiglipModel has no activation {sorted(unsupported)}")


def preprocessor_config(
    image_size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> dict[str, Any]:
    """HF SiglipImageProcessor settings: squash to `image_size`, rescale, normalise."""
    return {
        "image_processor_type": "SiglipImageProcessor",
        "processor_class": "SiglipProcessor",
        "do_resize": True,
        "size": {"height": image_size, "width": image_size},
        "resample": 3,  # bicubic
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(mean),
        "image_std": list(std),
        "do_convert_rgb": None,
    }


# ---------------------------------------------------------------------------
# OpenCLIP's model config (`model_configs/*SigLIP*.json`).
# ---------------------------------------------------------------------------


def timm_name(vision: VisionConfig) -> str | None:
    """timm's name for a SigLIP image tower, if it has one."""
    for name, tower in TIMM_SIGLIP_TOWERS.items():
        if tower == vision:
            return name
    return None


def config_from_openclip(model_cfg: Mapping[str, Any]) -> ModelConfig:
    """ModelConfig from OpenCLIP's SigLIP config (timm image tower, custom text)."""
    vision_cfg = dict(model_cfg.get("vision_cfg", {}))
    text_cfg = dict(model_cfg.get("text_cfg", {}))
    name = vision_cfg.get("timm_model_name")
    if name not in TIMM_SIGLIP_TOWERS:
        raise ValueError(
            f"OpenCLIP image tower timm_model_name={name!r} is not supported; jaxclip "
            f"reads timm's SigLIP towers: {', '.join(sorted(TIMM_SIGLIP_TOWERS))}"
        )
    expected = {"timm_pool": "map", "timm_proj": "none"}
    for key, value in expected.items():
        if vision_cfg.get(key) != value:
            raise ValueError(
                f"OpenCLIP SigLIP vision_cfg.{key}={vision_cfg.get(key)!r}; jaxclip "
                f"reads {value!r}"
            )
    required = {"no_causal_mask": True, "proj_bias": True, "pool_type": "last"}
    for key, value in required.items():
        if text_cfg.get(key) != value:
            raise ValueError(
                f"OpenCLIP SigLIP text_cfg.{key}={text_cfg.get(key)!r}; jaxclip's "
                f"SigLIP text tower has {value!r}"
            )
    if text_cfg.get("proj_type", "linear") != "linear":
        raise ValueError(
            f"OpenCLIP text_cfg.proj_type={text_cfg['proj_type']!r} is not supported"
        )
    eps = (text_cfg.get("norm_kwargs") or {}).get("eps", 1e-5)
    approximate = (text_cfg.get("act_kwargs") or {}).get("approximate", "none")
    width = text_cfg.get("width", 512)
    vision = TIMM_SIGLIP_TOWERS[name]
    if model_cfg.get("embed_dim") != vision.width:
        raise ValueError(
            f"OpenCLIP SigLIP embed_dim {model_cfg.get('embed_dim')} differs from the "
            f"image tower's width {vision.width} (timm_proj='none')"
        )
    text = TextConfig(
        context_length=text_cfg.get("context_length", 77),
        vocab_size=text_cfg.get("vocab_size", 49408),
        width=width,
        heads=text_cfg.get("heads", 8),
        layers=text_cfg.get("layers", 12),
        mlp_ratio=float(text_cfg.get("mlp_ratio", 4.0)),
        causal=False,
        pool="last",
        proj_bias=True,
        act="gelu_tanh" if approximate == "tanh" else "gelu",
    )
    return ModelConfig(vision.width, vision, text, logit_bias=True, norm_eps=eps)


def openclip_model_cfg(config: ModelConfig) -> dict[str, Any]:
    """OpenCLIP's model config for a SigLIP architecture whose image tower timm has."""
    name = timm_name(config.vision)
    if name is None:
        raise ValueError(
            "OpenCLIP builds SigLIP image towers only from timm's vit_*_siglip_* "
            f"models, and none has this one ({config.vision}); save it as a jaxclip "
            "checkpoint or an HF directory instead"
        )
    from jaxclip.convert.openclip import openclip_text_cfg  # it imports this module

    text_cfg: dict[str, Any] = {
        **openclip_text_cfg(config.text),
        "no_causal_mask": True,
        "proj_bias": True,
        "pool_type": "last",
        "norm_kwargs": {"eps": config.norm_eps},
    }
    if config.text_act == "gelu_tanh":
        text_cfg["act_kwargs"] = {"approximate": "tanh"}
    return {
        "embed_dim": config.embed_dim,
        "init_logit_bias": -10,
        "custom_text": True,
        "vision_cfg": {
            "image_size": config.vision.image_size,
            "timm_model_name": name,
            "timm_model_pretrained": False,
            "timm_pool": "map",
            "timm_proj": "none",
        },
        "text_cfg": text_cfg,
    }
