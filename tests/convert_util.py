"""Helpers for the conversion tests: importing the PyTorch references, comparing trees.

transformers' CLIPModel and OpenCLIP's CLIP never use torchvision, but both packages
import it at start-up when it is installed, and a torchvision built for another torch
(a CUDA wheel beside the CPU torch) fails that import. So the references are imported
with torchvision hidden; OpenCLIP's image transforms, the only users, are not run.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import jax
import numpy as np
import pytest

_TORCHVISION = (
    "torchvision",
    "torchvision.transforms",
    "torchvision.transforms.functional",
    "torchvision.ops",
    "torchvision.ops.misc",
)


def _hide_torchvision() -> None:
    """Make `import torchvision` fail cleanly (ImportError) and `find_spec` say absent."""
    if sys.modules.get("torchvision") is None:
        for name in _TORCHVISION:
            sys.modules[name] = None


def transformers_clip() -> types.ModuleType:
    """transformers' CLIP modelling module (skips the test without transformers/torch)."""
    pytest.importorskip("torch")
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed")
    _hide_torchvision()
    import transformers.models.clip.modeling_clip as modeling_clip

    return modeling_clip


class _Anything(type):
    """A stand-in class whose every attribute is itself (for module-level uses)."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return cls


def _stand_in_module(name: str, stand_in: type) -> types.ModuleType:
    module = types.ModuleType(name)

    def getattr_(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return stand_in

    module.__getattr__ = getattr_
    module.__path__ = []
    return module


def open_clip() -> types.ModuleType:
    """The `open_clip` package, imported with torchvision stubbed (skips without it)."""
    pytest.importorskip("torch")
    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("open_clip_torch is not installed")
    if "open_clip" in sys.modules:
        return sys.modules["open_clip"]
    # transformers first, while torchvision is hidden, so it records it as absent.
    if importlib.util.find_spec("transformers") is not None:
        transformers_clip()
    _hide_torchvision()
    stand_in = _Anything(
        "TorchvisionStandIn", (), {"__init__": lambda self, *a, **k: None}
    )
    stubs: dict[str, types.ModuleType] = {}
    for name in _TORCHVISION:
        stubs[name] = _stand_in_module(name, stand_in)
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(stubs[parent], child, stubs[name])
    sys.modules.update(stubs)
    try:
        import open_clip as package
    finally:
        for name in _TORCHVISION:
            sys.modules[name] = None
    return package


def random_variables(config, seed: int, logit_bias: bool = False) -> dict:
    """Random variables of `config`, made without running the model's init: weights
    and biases normal(0, 0.05), gains and BatchNorm variances uniform(0.5, 1.5)."""
    from jaxclip.models.build import abstract_variables, create_model

    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if jax.tree_util.keystr(path).endswith(("['var']", "['scale']")):
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        return rng.normal(0.0, 0.05, leaf.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(
        draw, abstract_variables(create_model(config, use_logit_bias=logit_bias))
    )


def jaxclip_outputs(model, variables, images, tokens) -> dict[str, np.ndarray]:
    """jaxclip's embeddings and logits, keyed like the PyTorch references' outputs."""
    image_emb = model.encode_image(variables, images)
    text_emb = model.encode_text(variables, tokens)
    scale = np.exp(np.float64(variables["params"]["logit_scale"]))
    return {
        "image": image_emb,
        "text": text_emb,
        "logits": scale * image_emb @ text_emb.T,
    }


def max_abs_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def assert_trees_equal(expected, actual) -> None:
    """Same structure, shapes, dtypes and bits."""
    assert jax.tree.structure(expected) == jax.tree.structure(actual)
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(actual)
    ):
        x, y = np.asarray(x), np.asarray(y)
        where = jax.tree_util.keystr(path)
        assert x.shape == y.shape and x.dtype == y.dtype, where
        assert np.array_equal(x, y), where
