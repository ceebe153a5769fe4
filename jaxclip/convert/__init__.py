"""Weights in and out: OpenAI CLIP, OpenCLIP and Hugging Face CLIPModel / SiglipModel
checkpoints.

    weights = load_weights("open_clip_model.safetensors")   # or a dir, hf-hub:ORG/REPO
    save_openclip(weights, "out/")                           # OpenCLIP local-dir
    save_hf(weights, "out-hf/")        # CLIPModel / SiglipModel.from_pretrained

The command line does the same: `python -m jaxclip.convert --from SRC --to DST`.
"""

from jaxclip.convert.files import (
    Weights,
    load_weights,
    registered_architecture,
    save_hf,
    save_openclip,
)
from jaxclip.convert.tensors import CorruptFileError, UnsafeFileError, read_tensors

__all__ = [
    "CorruptFileError",
    "UnsafeFileError",
    "Weights",
    "load_weights",
    "read_tensors",
    "registered_architecture",
    "save_hf",
    "save_openclip",
]
