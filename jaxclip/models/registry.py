"""Named architectures with OpenCLIP's hyper-parameters (`model_configs/*.json`)."""

from __future__ import annotations

import dataclasses

from jaxclip.config_rules import Rule


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Image tower: a ViT when `patch_size` is set, else an OpenAI ModifiedResNet."""

    image_size: int
    layers: int | tuple[int, int, int, int]
    width: int
    patch_size: int | None = None
    head_width: int = 64
    mlp_ratio: float = 4.0

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
    """Causal text transformer."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A CLIP model: two towers meeting in an `embed_dim` space."""

    embed_dim: int
    vision: VisionConfig
    text: TextConfig
    quick_gelu: bool = False

    @property
    def act(self) -> str:
        return "quick_gelu" if self.quick_gelu else "gelu"


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
    # Tiny sizes for tests and the demo; not OpenCLIP names.
    "tiny-vit": ModelConfig(
        64,
        VisionConfig(32, 2, 128, patch_size=8),
        TextConfig(context_length=16, width=128, heads=2, layers=2),
    ),
    "tiny-rn": ModelConfig(
        64,
        VisionConfig(64, (1, 1, 1, 1), 16, head_width=64),
        TextConfig(context_length=16, width=128, heads=2, layers=2),
    ),
    "demo-vit": ModelConfig(
        128,
        VisionConfig(32, 4, 128, patch_size=8),
        TextConfig(context_length=24, width=128, heads=2, layers=4),
    ),
}

MODELS: dict[str, ModelConfig] = {
    **_BASE,
    **{
        f"{name}-quickgelu": dataclasses.replace(cfg, quick_gelu=True)
        for name, cfg in _BASE.items()
        if not name.startswith(("tiny", "demo"))
    },
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
