"""Flax Linen models: ViT, ModifiedResNet and text towers, CLIP, and the registry."""

from jaxclip.models.clip import CLIP
from jaxclip.models.registry import ModelConfig, get_model_config, list_models

__all__ = ["CLIP", "ModelConfig", "get_model_config", "list_models"]
