"""jaxclip: CLIP-style contrastive language-image pretraining in JAX."""

from jaxclip.data.tokenizer import tokenize
from jaxclip.inference import InferenceModel, create_model, load
from jaxclip.models import CLIP, get_model_config, list_models

__version__ = "0.1.0"
__all__ = [
    "CLIP",
    "InferenceModel",
    "create_model",
    "get_model_config",
    "list_models",
    "load",
    "tokenize",
]
