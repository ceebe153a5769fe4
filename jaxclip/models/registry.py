"""Named architectures with OpenCLIP's hyper-parameters (`model_configs/*.json`)."""

from __future__ import annotations

import dataclasses

from jaxclip.config_rules import Rule


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Image tower: a ViT when `patch_size` is set, else an OpenAI ModifiedResNet.

    A ViT pools with its class token (`pool="tok"`, CLIP) or with SigLIP's
    attention-pooling head (`pool="map"`: no class token, no projection).
    `act=None` uses the model's activation (`ModelConfig.act`).
    """

    image_size: int
    layers: int | tuple[int, int, int, int]
    width: int
    patch_size: int | None = None
    head_width: int = 64
    mlp_ratio: float = 4.0
    pool: str = "tok"
    act: str | None = None

    @property
    def is_resnet(self) -> bool:
        return self.patch_size is None

    @property
    def heads(self) -> int:
        # OpenCLIP: ResNet attention-pool heads = width * 32 // 64; ViT = width // 64.
        if self.is_resnet:
            return self.width * 32 // self.head_width
        return self.width // self.head_width


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Text transformer: CLIP's causal tower pooled at the end-of-text token, or
    SigLIP's (`causal=False`, `pool="last"`, `proj_bias=True`)."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    causal: bool = True
    pool: str = "argmax"
    proj_bias: bool = False
    act: str | None = None


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """What makes a CLIP model OpenCLIP's CoCa (`multimodal_cfg` and the CoCa options
    of its towers): the image tower's attentional pooler (`n_queries` learned queries,
    `attn_pooler_heads` heads, over the final tokens; query 0 gives the embedding, the
    others the caption context), the text tower's appended CLS token, and the
    multimodal decoder (`layers` blocks of causal self-attention then cross-attention
    to the image tokens, `width` wide, projecting to the text vocabulary)."""

    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    n_queries: int = 256
    attn_pooler_heads: int = 8


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A CLIP model: two towers meeting in an `embed_dim` space.

    `logit_bias`: the model has SigLIP's learned logit bias (and its initial scale).
    `norm_eps`: the epsilon of every LayerNorm (1e-5 in CLIP, 1e-6 in SigLIP).
    `decoder`: set for a CoCa model (`DecoderConfig`), None for CLIP and SigLIP.
    """

    embed_dim: int
    vision: VisionConfig
    text: TextConfig
    quick_gelu: bool = False
    logit_bias: bool = False
    norm_eps: float = 1e-5
    decoder: DecoderConfig | None = None

    @property
    def is_coca(self) -> bool:
        return self.decoder is not None

    @property
    def act(self) -> str:
        return "quick_gelu" if self.quick_gelu else "gelu"

    @property
    def vision_act(self) -> str:
        return self.vision.act or self.act

    @property
    def text_act(self) -> str:
        return self.text.act or self.act


_TEXT_512 = TextConfig(width=512, heads=8, layers=12)

_BASE: dict[str, ModelConfig] = {
    "RN50": ModelConfig(1024, VisionConfig(224, (3, 4, 6, 3), 64), _TEXT_512),
    "RN101": ModelConfig(512, VisionConfig(224, (3, 4, 23, 3), 64), _TEXT_512),
    "RN50x4": ModelConfig(
        640, VisionConfig(288, (4, 6, 10, 6), 80), TextConfig(width=640, heads=10)
    ),
    "RN50x16": ModelConfig(
        768, VisionConfig(384, (6, 8, 18, 8), 96), TextConfig(width=768, heads=12)
    ),
    "RN50x64": ModelConfig(
        1024, VisionConfig(448, (3, 15, 36, 10), 128), TextConfig(width=1024, heads=16)
    ),
    "ViT-B-32": ModelConfig(512, VisionConfig(224, 12, 768, patch_size=32), _TEXT_512),
    "ViT-B-16": ModelConfig(512, VisionConfig(224, 12, 768, patch_size=16), _TEXT_512),
    "ViT-L-14": ModelConfig(
        768, VisionConfig(224, 24, 1024, patch_size=14), TextConfig(width=768, heads=12)
    ),
    "ViT-L-14-336": ModelConfig(
        768, VisionConfig(336, 24, 1024, patch_size=14), TextConfig(width=768, heads=12)
    ),
    "ViT-H-14": ModelConfig(
        1024,
        VisionConfig(224, 32, 1280, patch_size=14, head_width=80),
        TextConfig(width=1024, heads=16, layers=24),
    ),
    # Tiny sizes for tests and the demo; not OpenCLIP names. Their text tables hold
    # the CLIP BPE's first 3,582 merges (4,096 ids; every shapes and digits caption
    # fits in 16 tokens): OpenAI's 49,408 rows would be most of their weights.
    "tiny-vit": ModelConfig(
        64,
        VisionConfig(32, 2, 128, patch_size=8),
        TextConfig(context_length=16, vocab_size=4096, width=128, heads=2, layers=2),
    ),
    "tiny-rn": ModelConfig(
        64,
        VisionConfig(64, (1, 1, 1, 1), 16, head_width=64),
        TextConfig(context_length=16, vocab_size=4096, width=128, heads=2, layers=2),
    ),
    "demo-vit": ModelConfig(
        128,
        VisionConfig(32, 4, 128, patch_size=8),
        TextConfig(context_length=24, vocab_size=4096, width=128, heads=2, layers=4),
    ),
}


def _timm_siglip_towers() -> dict[str, VisionConfig]:
    """timm's `vit_*_siglip_*` image towers (MAP pooling, no class token), which
    OpenCLIP's SigLIP models name in `timm_model_name`. `act` is timm's for that name:
    exact GELU unless it sets act_layer='gelu_tanh'."""
    b16 = dict(layers=12, width=768, patch_size=16, head_width=64)
    l16 = dict(layers=24, width=1024, patch_size=16, head_width=64)
    so14 = dict(layers=27, width=1152, patch_size=14, head_width=72, mlp_ratio=3.7362)
    so16 = dict(so14, patch_size=16)
    b32 = dict(b16, patch_size=32)
    gopt = dict(layers=40, width=1536, patch_size=16, head_width=96)
    towers = {
        "vit_base_patch16_siglip": (b16, (224, 256, 384, 512), "gelu"),
        "vit_base_patch32_siglip": (b32, (256,), "gelu_tanh"),
        "vit_large_patch16_siglip": (l16, (256, 384), "gelu"),
        "vit_so400m_patch14_siglip": (so14, (224, 378, 384), "gelu"),
        "vit_so400m_patch16_siglip": (so16, (256, 384, 512), "gelu_tanh"),
        "vit_giantopt_patch16_siglip": (gopt, (256, 384), "gelu_tanh"),
    }
    table = {
        f"{name}_{size}": VisionConfig(image_size=size, pool="map", act=act, **dims)
        for name, (dims, sizes, act) in towers.items()
        for size in sizes
    }
    table["vit_large_patch16_siglip_512"] = dataclasses.replace(
        table["vit_large_patch16_siglip_384"], image_size=512, act="gelu_tanh"
    )
    return table


TIMM_SIGLIP_TOWERS: dict[str, VisionConfig] = _timm_siglip_towers()


def _siglip(embed_dim: int, vision: VisionConfig, text: TextConfig) -> ModelConfig:
    """A SigLIP model as OpenCLIP builds it: a MAP-pooled image tower, a bidirectional
    text tower pooled at its last token with a biased projection, LayerNorm eps 1e-6,
    a learned logit bias."""
    return ModelConfig(
        embed_dim,
        dataclasses.replace(vision, pool="map"),
        dataclasses.replace(text, causal=False, pool="last", proj_bias=True),
        logit_bias=True,
        norm_eps=1e-6,
    )


def _siglip_family() -> dict[str, ModelConfig]:
    """OpenCLIP 3.3.0's SigLIP and SigLIP 2 names (`model_configs/*SigLIP*.json`)."""
    # Text towers: SigLIP's 32k SentencePiece vocabulary with exact GELU (OpenCLIP's
    # configs set no act_kwargs), the i18n 250k one, SigLIP 2's 256k Gemma vocabulary
    # with tanh GELU.
    base = dict(context_length=64, width=768, heads=12, layers=12)
    large = dict(context_length=64, width=1024, heads=16, layers=24)
    so400m = dict(context_length=64, width=1152, heads=16, layers=27, mlp_ratio=3.7362)
    v1 = dict(vocab_size=32000, act="gelu")
    i18n = dict(vocab_size=250000, act="gelu")
    v2 = dict(vocab_size=256000, act="gelu_tanh")
    table = {
        # name: (timm image tower, text tower)
        "ViT-B-16-SigLIP": ("vit_base_patch16_siglip_224", {**base, **v1}),
        "ViT-B-16-SigLIP-256": ("vit_base_patch16_siglip_256", {**base, **v1}),
        "ViT-B-16-SigLIP-384": ("vit_base_patch16_siglip_384", {**base, **v1}),
        "ViT-B-16-SigLIP-512": ("vit_base_patch16_siglip_512", {**base, **v1}),
        "ViT-B-16-SigLIP-i18n-256": ("vit_base_patch16_siglip_256", {**base, **i18n}),
        "ViT-L-16-SigLIP-256": ("vit_large_patch16_siglip_256", {**large, **v1}),
        "ViT-L-16-SigLIP-384": ("vit_large_patch16_siglip_384", {**large, **v1}),
        "ViT-SO400M-14-SigLIP": (
            "vit_so400m_patch14_siglip_224",
            {**so400m, **v1, "context_length": 16},
        ),
        "ViT-SO400M-14-SigLIP-378": ("vit_so400m_patch14_siglip_378", {**so400m, **v1}),
        "ViT-SO400M-14-SigLIP-384": ("vit_so400m_patch14_siglip_384", {**so400m, **v1}),
        "ViT-B-16-SigLIP2": ("vit_base_patch16_siglip_224", {**base, **v2}),
        "ViT-B-16-SigLIP2-256": ("vit_base_patch16_siglip_256", {**base, **v2}),
        "ViT-B-16-SigLIP2-384": ("vit_base_patch16_siglip_384", {**base, **v2}),
        "ViT-B-16-SigLIP2-512": ("vit_base_patch16_siglip_512", {**base, **v2}),
        "ViT-B-32-SigLIP2-256": ("vit_base_patch32_siglip_256", {**base, **v2}),
        "ViT-L-16-SigLIP2-256": ("vit_large_patch16_siglip_256", {**large, **v2}),
        "ViT-L-16-SigLIP2-384": ("vit_large_patch16_siglip_384", {**large, **v2}),
        "ViT-L-16-SigLIP2-512": ("vit_large_patch16_siglip_512", {**large, **v2}),
        "ViT-SO400M-14-SigLIP2": ("vit_so400m_patch14_siglip_224", {**so400m, **v2}),
        "ViT-SO400M-14-SigLIP2-378": (
            "vit_so400m_patch14_siglip_378",
            {**so400m, **v2},
        ),
        "ViT-SO400M-16-SigLIP2-256": (
            "vit_so400m_patch16_siglip_256",
            {**so400m, **v2},
        ),
        "ViT-SO400M-16-SigLIP2-384": (
            "vit_so400m_patch16_siglip_384",
            {**so400m, **v2},
        ),
        "ViT-SO400M-16-SigLIP2-512": (
            "vit_so400m_patch16_siglip_512",
            {**so400m, **v2},
        ),
        # The giant towers meet the SO400M text tower in a 1536-wide space.
        "ViT-gopt-16-SigLIP2-256": (
            "vit_giantopt_patch16_siglip_256",
            {**so400m, **v2},
        ),
        "ViT-gopt-16-SigLIP2-384": (
            "vit_giantopt_patch16_siglip_384",
            {**so400m, **v2},
        ),
    }
    return {
        name: _siglip(
            TIMM_SIGLIP_TOWERS[tower].width,
            TIMM_SIGLIP_TOWERS[tower],
            TextConfig(**text),
        )
        for name, (tower, text) in table.items()
    }


def mlp_ratio_for(width: int, hidden: int) -> float:
    """The `mlp_ratio` that gives an MLP `hidden` wide on a `width` residual stream
    (`int(width * ratio)`, as OpenCLIP and timm compute it): a registered ratio when
    one gives that width (so e.g. SO400M's 3.7362 is recognised), else hidden/width."""
    for ratio in (4.0, 3.7362):
        if int(width * ratio) == hidden:
            return ratio
    ratio = hidden / width
    return ratio if int(width * ratio) == hidden else (hidden + 0.5) / width


def _coca_family() -> dict[str, ModelConfig]:
    """OpenCLIP 3.3.0's CoCa names (`model_configs/coca_*.json`): a 76-token text
    context (77 positions with the CLS token), the decoder as wide as the embedding
    (its cross-attention reads the pooled image tokens, `embed_dim` wide)."""
    text = dict(context_length=76)
    return {
        "coca_ViT-B-32": ModelConfig(
            512,
            VisionConfig(224, 12, 768, patch_size=32),
            TextConfig(**text),
            decoder=DecoderConfig(width=512, heads=8, layers=12, attn_pooler_heads=8),
        ),
        # OpenCLIP's JSON says attn_pooler_heads 12 in multimodal_cfg, which nothing
        # reads: the image tower's pooler has vision_cfg's 8 heads.
        "coca_ViT-L-14": ModelConfig(
            768,
            VisionConfig(224, 24, 1024, patch_size=14),
            TextConfig(**text, width=768, heads=12),
            decoder=DecoderConfig(width=768, heads=12, layers=12, attn_pooler_heads=8),
        ),
        # The CoCa demo's (configs/coca_demo.py): demo-vit's image tower, 16 image
        # tokens for the decoder, and a text context that holds every shapes caption.
        "demo-coca": ModelConfig(
            64,
            VisionConfig(32, 4, 128, patch_size=8),
            TextConfig(context_length=12, width=64, heads=2, layers=2),
            decoder=DecoderConfig(
                width=64, heads=2, layers=2, n_queries=17, attn_pooler_heads=2
            ),
        ),
        # Tiny CoCa for tests; not an OpenCLIP name. The pooler's queries are narrower
        # than the image tower (as in OpenCLIP's CoCa), which gives its attention
        # separate q/k/v projections.
        "tiny-coca": ModelConfig(
            32,
            VisionConfig(32, 2, 64, patch_size=8, head_width=32),
            TextConfig(context_length=12, vocab_size=100, width=32, heads=2, layers=2),
            decoder=DecoderConfig(
                width=32, heads=2, layers=2, n_queries=6, attn_pooler_heads=2
            ),
        ),
    }


MODELS: dict[str, ModelConfig] = {
    **_BASE,
    **{
        f"{name}-quickgelu": dataclasses.replace(cfg, quick_gelu=True)
        for name, cfg in _BASE.items()
        if not name.startswith(("tiny", "demo"))
    },
    **_siglip_family(),
    # Tiny SigLIP for tests and the fine-tuning demo; not an OpenCLIP name.
    "tiny-siglip": _siglip(
        64,
        VisionConfig(32, 2, 64, patch_size=8, head_width=32, act="gelu_tanh"),
        TextConfig(
            context_length=16,
            vocab_size=1000,
            width=64,
            heads=2,
            layers=2,
            act="gelu_tanh",
        ),
    ),
    **_coca_family(),
}


# The config's choices, owned here: `model.name` (this rule, which the config checks
# too) and the compute dtypes a model runs in (`model.dtype`; params stay float32).
NAME_RULE = Rule(
    lambda name: name in MODELS,
    f"is not a registered architecture; choose one of: {', '.join(sorted(MODELS))}",
)
DTYPES = ("float32", "bfloat16")


def list_models() -> list[str]:
    """Registered architecture names, sorted."""
    return sorted(MODELS)


def get_model_config(name: str) -> ModelConfig:
    """The architecture registered as `name`; an unknown name raises ConfigError (a
    ValueError) that lists the registered ones."""
    NAME_RULE.check("model.name", name)
    return MODELS[name]
