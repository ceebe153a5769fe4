"""jaxclip: CLIP-style contrastive language-image pretraining in JAX."""

# Before anything starts JAX's backends (see jaxclip/platforms.py).
from jaxclip.platforms import cpu_only_without_accelerator

cpu_only_without_accelerator()

# ruff: noqa: E402

from jaxclip.data.tokenizer import tokenize
from jaxclip.inference import InferenceModel, caption, create_model, load
from jaxclip.models import CLIP, get_model_config, list_models

__version__ = "0.1.0"
__all__ = [
    "CLIP",
    "InferenceModel",
    "caption",
    "create_model",
    "get_model_config",
    "list_models",
    "load",
    "tokenize",
]
