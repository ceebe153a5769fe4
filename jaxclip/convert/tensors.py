"""Reading and writing flat `{name: array}` weight files: safetensors and torch files.

`.safetensors` files are read with NumPy and never import torch. `.pt`/`.bin`/`.pth`
files go through `torch.load(..., weights_only=True)` only: a file that needs Python's
pickle (arbitrary objects) or is a TorchScript archive is refused with a message that
says how to turn it into a plain state dict where it is trusted.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import warnings
import zipfile
from collections.abc import Mapping

import numpy as np

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin")


class UnsafeFileError(ValueError):
    """A weights file that only Python's pickle (or TorchScript) could read."""


class CorruptFileError(ValueError):
    """A weights file that is truncated, empty or not in the format its name says."""


def read_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """{name: array} from a .safetensors file (no torch) or a weights-only torch file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no weights file at {path}")
    if path.endswith(SAFETENSORS_SUFFIXES):
        return _read_safetensors(path)
    if path.endswith(TORCH_SUFFIXES):
        return _read_torch(path)
    if path.endswith(".ckpt"):
        raise ValueError(
            f"{path}: a .ckpt file is usually a PyTorch Lightning (or other trainer's) "
            "checkpoint: the model's weights wrapped with the optimizer and trainer "
            "state, which needs Python's pickle to read. jaxclip reads state dicts.\n"
            + _RECIPE.replace(
                "STATE_DICT", "torch.load(PATH, weights_only=False)['state_dict']"
            )
            + "(strip any prefix such as 'model.' from the keys to match OpenCLIP's)."
        )
    raise ValueError(
        f"{path}: unknown weights format; expected one of "
        f"{', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)}"
    )


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    """A .safetensors file, its layout checked first so that a damaged file is named
    with what is wrong rather than the reader's internal message."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    _check_safetensors_layout(path)
    try:
        return dict(load_file(path))
    except SafetensorError as error:
        raise CorruptFileError(
            f"{path} is not a readable .safetensors file: {error}"
        ) from None


def _check_safetensors_layout(path: str) -> None:
    """An 8-byte header length, a JSON header, and every tensor's bytes present."""
    size = os.path.getsize(path)
    what = f"{path} ({size:,} bytes) is not a valid .safetensors file"
    if size < 8:
        raise CorruptFileError(f"{what}: too short to hold the 8-byte header length")
    with open(path, "rb") as file:
        (header_size,) = struct.unpack("<Q", file.read(8))
        if header_size > size - 8:
            raise CorruptFileError(
                f"{what}: its header claims {header_size:,} bytes but only "
                f"{size - 8:,} follow (truncated, or not a safetensors file at all)"
            )
        try:
            header = json.loads(file.read(header_size))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CorruptFileError(f"{what}: its header is not JSON") from None
    ends = [
        entry["data_offsets"][1]
        for key, entry in header.items()
        if key != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry
    ]
    needed = 8 + header_size + max(ends, default=0)
    if needed > size:
        raise CorruptFileError(
            f"{path} is truncated: its {len(ends)} tensors need {needed:,} bytes, "
            f"the file has {size:,}"
        )


def _read_torch(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            f"reading {path} needs torch; install it, or convert the file to "
            ".safetensors, which loads without torch"
        ) from error
    checkpoint = _load_weights_only(torch, path)
    # Training checkpoints wrap the weights: {"state_dict": {...}, "epoch": ...}.
    if isinstance(checkpoint, Mapping) and isinstance(
        checkpoint.get("state_dict"), Mapping
    ):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, Mapping):
        raise ValueError(
            f"{path} holds a {type(checkpoint).__name__}, not a state dict"
        )
    tensors = {}
    for key, value in checkpoint.items():
        if isinstance(value, torch.Tensor):
            if value.dtype == torch.bfloat16:
                value = value.float()
            tensors[key] = value.detach().cpu().numpy()
        elif isinstance(value, (int, float)):
            tensors[key] = np.asarray(value)  # e.g. OpenAI's `input_resolution`
    # DataParallel / DistributedDataParallel prefix every key with "module.".
    if tensors and all(key.startswith("module.") for key in tensors):
        tensors = {key[len("module.") :]: value for key, value in tensors.items()}
    return tensors


_RECIPE = (
    "If you trust the file, turn it into safetensors once in PyTorch:\n"
    "    import torch, safetensors.torch\n"
    "    sd = {k: v.contiguous() for k, v in STATE_DICT.items()}\n"
    "    safetensors.torch.save_file(sd, 'model.safetensors')\n"
)


def _load_weights_only(torch, path: str):
    """`torch.load(path, weights_only=True)`; a file that needs pickle or is a
    TorchScript archive raises UnsafeFileError with the way to convert it."""
    try:
        with warnings.catch_warnings():
            # torch warns that it would hand a TorchScript archive to torch.jit.load;
            # with weights_only=True it raises instead (handled below).
            warnings.filterwarnings("ignore", message=".*TorchScript archive")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        holds = f"a {found.group(1)} object" if found else "objects"
        raise UnsafeFileError(
            f"{path} needs Python's pickle to load: it holds {holds} besides "
            "tensors, containers and numbers. jaxclip reads torch files with "
            "torch.load(weights_only=True) only, which runs no code from the file.\n"
            + _RECIPE.replace("STATE_DICT", "torch.load(PATH, weights_only=False)")
        ) from None
    except (EOFError, zipfile.BadZipFile) as error:
        raise CorruptFileError(_not_a_torch_file(path, error)) from None
    except RuntimeError as error:
        if "PytorchStreamReader" in str(error):
            raise CorruptFileError(_not_a_torch_file(path, error)) from None
        if "TorchScript" not in str(error):
            raise
        raise UnsafeFileError(
            f"{path} is a TorchScript archive (the format of OpenAI's original "
            "CLIP releases). torch.load(weights_only=True) cannot read it and "
            "jaxclip does not run torch.jit.load on files it is given.\n"
            + _RECIPE.replace(
                "STATE_DICT", "torch.jit.load(PATH, map_location='cpu').state_dict()"
            )
            + "or load OpenCLIP's safetensors copy of the OpenAI weights "
            "(e.g. hf-hub:timm/vit_base_patch32_clip_224.openai)."
        ) from error


def _not_a_torch_file(path: str, error: BaseException) -> str:
    size = os.path.getsize(path)
    if size == 0:
        return f"{path} is empty (0 bytes): not a torch weights file"
    return (
        f"{path} ({size:,} bytes) is not a complete torch file: truncated or damaged "
        f"(torch could not read its {'archive' if size > 64 else 'contents'})"
    )


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write {name: array}; metadata `format: pt` lets PyTorch tools accept the file."""
    from safetensors.numpy import save_file

    arrays = {key: np.asarray(value, order="C") for key, value in tensors.items()}
    save_file(arrays, os.fspath(path), metadata={"format": "pt", **(metadata or {})})


def as_float32(value: np.ndarray, key: str) -> np.ndarray:
    """A parameter as float32 (files may hold float16 or bfloat16); refuse non-floats."""
    value = np.asarray(value)
    if not (np.issubdtype(value.dtype, np.floating) or value.dtype.name == "bfloat16"):
        raise ValueError(f"{key}: expected floating-point weights, got {value.dtype}")
    return value.astype(np.float32, copy=False)  # no copy when already float32
