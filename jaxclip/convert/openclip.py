"""OpenAI CLIP / OpenCLIP state dicts <-> jaxclip variables.

jaxclip's modules mirror OpenCLIP's names (docs/convert.md), so the mapping is
mechanical. One jaxclip leaf is one torch key, except in layer stacks, whose leading
`layers` axis holds `transformer.resblocks.{i}` for every i. The leaf layouts differ:

    torch                               jaxclip
    Linear weight [out, in]             Dense kernel [in, out]
    Conv2d weight [out, in, kh, kw]     Conv kernel [kh, kw, in, out]
    attn.in_proj_weight [3*W, W]        attn/in_proj_kernel [W, 3, heads, head_dim]
    attn.in_proj_bias [3*W]             attn/in_proj_bias [3, heads, head_dim]
    attn.out_proj.weight [W, W]         attn/out_proj_kernel [heads, head_dim, W]
    LayerNorm / BatchNorm weight        scale
    BatchNorm running_mean/_var         batch_stats mean / var
    token_embedding.weight              token_embedding/embedding

The text tower sits at the top level in OpenCLIP (`transformer.*`, `ln_final`, ...)
and under `text/` in jaxclip. Every conversion is a transpose or reshape, so export
followed by import gives the same bits.

Two things are not in the weights: the activation (GELU or OpenAI's QuickGELU) and
the number of attention heads. They come from a name, a config file, OpenAI's marker
keys, or a registered architecture with the same shapes, in that order.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from jaxclip.convert import coca, siglip
from jaxclip.convert.tensors import as_float32
from jaxclip.models.build import abstract_variables, create_model
from jaxclip.models.registry import (
    MODELS,
    ModelConfig,
    TextConfig,
    VisionConfig,
    get_model_config,
)

# Integers that OpenAI's TorchScript state dicts carry beside the weights; their
# presence marks OpenAI weights, which use QuickGELU.
OPENAI_MARKER_KEYS = ("input_resolution", "context_length", "vocab_size")
MAX_LISTED = 8  # keys listed per kind of mismatch in error messages


# ---------------------------------------------------------------------------
# The layout: one entry per torch key.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Entry:
    """One torch tensor and where it lives in jaxclip's variables."""

    key: str  # OpenCLIP state-dict key
    collection: str  # "params" or "batch_stats"
    path: tuple[str, ...]  # path inside the collection
    layer: int | None  # index along the stacked `layers` axis, or None
    kind: str  # layout conversion, see _TO_TORCH
    shape: tuple[int, ...]  # jaxclip shape of this entry (without the layer axis)

    @property
    def torch_shape(self) -> tuple[int, ...]:
        return _TORCH_SHAPE[self.kind](self.shape)


_TO_TORCH: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "copy": lambda x: x,
    "linear": lambda x: x.T,
    "conv": lambda x: x.transpose(3, 2, 0, 1),
    "in_proj_weight": lambda x: x.transpose(1, 2, 3, 0).reshape(-1, x.shape[0]),
    "in_proj_bias": lambda x: x.reshape(-1),
    "out_proj_weight": lambda x: x.reshape(-1, x.shape[-1]).T,
    "head_proj_weight": lambda x: x.reshape(x.shape[0], -1).T,
}
_FROM_TORCH: dict[str, Callable[[np.ndarray, tuple[int, ...]], np.ndarray]] = {
    "copy": lambda x, shape: x.reshape(shape),  # reshape: a [1] logit scale is fine
    "linear": lambda x, shape: x.T,
    "conv": lambda x, shape: x.transpose(2, 3, 1, 0),
    "in_proj_weight": lambda x, shape: x.reshape(*shape[1:], shape[0]).transpose(
        3, 0, 1, 2
    ),
    "in_proj_bias": lambda x, shape: x.reshape(shape),
    "out_proj_weight": lambda x, shape: x.T.reshape(shape),
    "head_proj_weight": lambda x, shape: x.T.reshape(shape),
}
_TORCH_SHAPE: dict[str, Callable[[tuple[int, ...]], tuple[int, ...]]] = {
    "copy": lambda s: s,
    "linear": lambda s: (s[1], s[0]),
    "conv": lambda s: (s[3], s[2], s[0], s[1]),
    "in_proj_weight": lambda s: (math.prod(s[1:]), s[0]),
    "in_proj_bias": lambda s: (math.prod(s),),
    "out_proj_weight": lambda s: (s[2], s[0] * s[1]),
    "head_proj_weight": lambda s: (math.prod(s[1:]), s[0]),
}


def _torch_name(
    collection: str, path: tuple[str, ...], ndim: int, text_on_top: bool = True
) -> tuple[str, str]:
    """(torch key, with "{i}" for the layer index; conversion kind) of a jaxclip leaf.

    `text_on_top`: the text tower's keys have no `text.` prefix (OpenCLIP's CLIP; its
    CoCa keeps them under `text.`)."""
    *parents, leaf = path
    kind = "copy"
    if collection == "batch_stats":
        leaf = {"mean": "running_mean", "var": "running_var"}[leaf]
    elif leaf == "scale" or leaf == "embedding":
        leaf = "weight"
    elif leaf == "kernel":
        leaf, kind = "weight", {2: "linear", 4: "conv"}[ndim]
    elif leaf in ("in_proj_kernel", "in_proj_bias"):
        leaf, kind = leaf.replace("kernel", "weight"), leaf.replace("kernel", "weight")
    elif leaf in ("q_proj_kernel", "k_proj_kernel", "v_proj_kernel"):
        leaf, kind = leaf.replace("kernel", "weight"), "head_proj_weight"
    elif leaf == "out_proj_kernel":
        leaf, kind = "out_proj.weight", "out_proj_weight"
    elif leaf == "out_proj_bias":
        leaf = "out_proj.bias"
    if text_on_top and parents and parents[0] == "text":
        parents = parents[1:]  # OpenCLIP keeps the text tower at the top level
    names = []
    for name in parents:
        if name == LAYER_STACK:
            continue  # the layer index follows the block's own name, as in torch
        names.append(name)
        if name == "resblocks" or (LAYER_STACK in parents and name == "cross_attn"):
            names.append("{i}")
    return ".".join([*names, leaf]), kind


# The stacked layer module of CoCa's decoder: each layer holds a self-attention block
# (`resblocks`) and a cross-attention block (`cross_attn`), two lists in torch.
LAYER_STACK = "layers"


def is_stacked(path: tuple[str, ...]) -> bool:
    """Whether a jaxclip leaf has the leading `layers` axis of a block stack."""
    return "resblocks" in path or LAYER_STACK in path[:-1]


@functools.lru_cache(maxsize=32)
def layout(config: ModelConfig, logit_bias: bool = False) -> tuple[Entry, ...]:
    """Every torch key of this architecture, in jaxclip's order."""
    entries = []
    model = create_model(config, use_logit_bias=logit_bias, sharded=False)
    for collection, tree in abstract_variables(model).items():
        for path, leaf in traverse_util.flatten_dict(tree).items():
            stacked = is_stacked(path)
            shape = tuple(leaf.shape[1:] if stacked else leaf.shape)
            key, kind = _torch_name(collection, path, len(shape), not config.is_coca)
            layers = range(leaf.shape[0]) if stacked else [None]
            entries.extend(
                Entry(key.format(i=i), collection, path, i, kind, shape) for i in layers
            )
    return tuple(entries)


def _is_batch_norm(entry: Entry) -> bool:
    return entry.collection == "batch_stats" and entry.key.endswith(".running_mean")


def ignored_key(key: str) -> bool:
    """Keys that carry no weights: BatchNorm counters and OpenAI's integer markers."""
    return key.endswith("num_batches_tracked") or key in OPENAI_MARKER_KEYS


# ---------------------------------------------------------------------------
# Checking and converting.
# ---------------------------------------------------------------------------


def check_keys(
    tensors: Mapping[str, Any],
    expected: Mapping[str, tuple[int, ...]],
    what: str,
    ignore: Callable[[str], bool] = ignored_key,
) -> None:
    """Raise one ValueError listing missing keys, unexpected keys and wrong shapes."""
    present = {key for key in tensors if not ignore(key)}
    missing = [key for key in expected if key not in present]
    unexpected = sorted(present - set(expected))
    wrong = [
        f"{key}: file {list(np.shape(tensors[key]))}, expected {list(shape)}"
        for key, shape in expected.items()
        if key in present
        and tuple(np.shape(tensors[key])) != tuple(shape)
        # A [1]-shaped logit scale or bias (OpenCLIP's nonscalar option) is fine.
        and not (shape == () and np.size(tensors[key]) == 1)
    ]
    problems = []
    for label, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("wrong shapes", wrong),
    ):
        if items:
            listed = "\n    ".join(items[:MAX_LISTED])
            more = (
                f"\n    ... and {len(items) - MAX_LISTED} more"
                if len(items) > MAX_LISTED
                else ""
            )
            problems.append(f"  {len(items)} {label}:\n    {listed}{more}")
    if problems:
        raise ValueError(f"{what}:\n" + "\n".join(problems))


def canonical_shapes(
    config: ModelConfig, logit_bias: bool = False
) -> dict[str, tuple[int, ...]]:
    """Every canonical torch key of this architecture and its shape."""
    return {entry.key: entry.torch_shape for entry in layout(config, logit_bias)}


def expected_shapes(
    config: ModelConfig, logit_bias: bool = False
) -> dict[str, tuple[int, ...]]:
    """Every key and shape of this architecture's OpenCLIP state dict."""
    shapes = canonical_shapes(config, logit_bias)
    if config.is_coca:
        return coca.file_shapes(shapes, config)
    return (
        siglip.OPENCLIP.expected_shapes(shapes) if siglip.is_siglip(config) else shapes
    )


def from_openclip(
    tensors: Mapping[str, np.ndarray],
    config: ModelConfig,
    logit_bias: bool = False,
    what: str = "OpenCLIP state dict",
) -> dict:
    """OpenCLIP / OpenAI state dict -> jaxclip variables (NumPy float32), strictly.

    A SigLIP architecture reads OpenCLIP's timm-named layout (`siglip.OPENCLIP`).
    `what` names the source and the architecture in error messages.
    """
    if siglip.is_siglip(config):
        shapes = canonical_shapes(config, logit_bias)
        tensors = siglip.OPENCLIP.restore(tensors, shapes, what, ignore=ignored_key)
    elif config.is_coca:
        shapes = canonical_shapes(config, logit_bias)
        tensors = coca.from_file(tensors, shapes, config, what, ignore=ignored_key)
    return from_canonical(tensors, config, logit_bias, what)


def to_openclip(variables: Mapping, config: ModelConfig) -> dict[str, np.ndarray]:
    """jaxclip variables -> OpenCLIP state dict (float32; BatchNorm counters are 0)."""
    canonical = to_canonical(variables, config)
    if config.is_coca:
        return coca.to_file(canonical, config)
    return siglip.OPENCLIP.rename(canonical) if siglip.is_siglip(config) else canonical


def from_canonical(
    tensors: Mapping[str, np.ndarray],
    config: ModelConfig,
    logit_bias: bool = False,
    what: str = "OpenCLIP state dict",
) -> dict:
    """A state dict in canonical keys (`layout`) -> jaxclip variables, strictly."""
    entries = layout(config, logit_bias)
    check_keys(tensors, {e.key: e.torch_shape for e in entries}, what)
    stacks: dict[tuple[str, tuple[str, ...]], list[np.ndarray]] = {}
    for entry in entries:
        value = _FROM_TORCH[entry.kind](
            as_float32(tensors[entry.key], entry.key), entry.shape
        )
        stacks.setdefault((entry.collection, entry.path), []).append(value)
    flat: dict[str, dict] = {}
    for (collection, path), values in stacks.items():
        is_stack = is_stacked(path)
        value = np.stack(values) if is_stack else values[0]
        flat.setdefault(collection, {})[path] = np.asarray(value, order="C")
    return {
        collection: traverse_util.unflatten_dict(leaves)
        for collection, leaves in flat.items()
    }


def to_canonical(variables: Mapping, config: ModelConfig) -> dict[str, np.ndarray]:
    """jaxclip variables -> a state dict in canonical keys (float32)."""
    params = variables["params"]
    logit_bias = "logit_bias" in params
    trees = {
        collection: traverse_util.flatten_dict(dict(tree))
        for collection, tree in variables.items()
        if tree
    }
    state_dict = {}
    for entry in layout(config, logit_bias):
        try:
            value = np.asarray(trees[entry.collection][entry.path], np.float32)
        except KeyError as error:
            raise ValueError(
                f"variables lack {entry.collection}/{'/'.join(entry.path)}"
            ) from error
        if entry.layer is not None:
            value = value[entry.layer]
        state_dict[entry.key] = np.asarray(_TO_TORCH[entry.kind](value), order="C")
        if _is_batch_norm(entry):
            # torch's BatchNorm counts its updates; jaxclip keeps no counter.
            counter = entry.key.replace("running_mean", "num_batches_tracked")
            state_dict[counter] = np.zeros((), np.int64)
    return state_dict


# ---------------------------------------------------------------------------
# Inferring the architecture from shapes.
# ---------------------------------------------------------------------------


def count_indices(tensors: Iterable[str], pattern: str) -> int:
    found = {m.group(1) for k in tensors if (m := re.match(pattern, k))}
    return len(found)


def _require(tensors: Mapping[str, np.ndarray], key: str, what: str) -> tuple:
    if key not in tensors:
        raise ValueError(
            f"cannot infer the architecture of the {what}: key {key!r} is missing "
            f"(is this an OpenAI CLIP / OpenCLIP state dict? found e.g. "
            f"{sorted(tensors)[:5]})"
        )
    return tuple(np.shape(tensors[key]))


def infer_config(
    tensors: Mapping[str, np.ndarray], what: str = "OpenCLIP state dict"
) -> ModelConfig:
    """The architecture of an OpenCLIP / OpenAI state dict, from its shapes.

    Attention heads are not stored in the weights: this assumes 64-wide heads, which
    `resolve_config` corrects from a registered architecture or a config file.
    """
    if siglip.is_openclip_siglip(tensors):
        return siglip.infer_config(tensors, siglip.OPENCLIP, what)
    if coca.is_openclip_coca(tensors):
        return coca.infer_config(tensors, what)
    if any(k.startswith(("visual.trunk.", "text.")) for k in tensors):
        raise ValueError(
            f"the {what} has a timm or Hugging Face tower (visual.trunk.* / text.*); "
            "jaxclip supports OpenCLIP's built-in ViT, ModifiedResNet and text towers"
        )
    vocab_size, text_width = _require(tensors, "token_embedding.weight", what)
    context_length = _require(tensors, "positional_embedding", what)[0]
    text_layers = count_indices(tensors, r"transformer\.resblocks\.(\d+)\.")
    text_mlp = _require(tensors, "transformer.resblocks.0.mlp.c_fc.weight", what)[0]
    embed_dim = _require(tensors, "text_projection", what)[1]
    text = TextConfig(
        context_length=context_length,
        vocab_size=vocab_size,
        width=text_width,
        heads=max(text_width // 64, 1),
        layers=text_layers,
        mlp_ratio=text_mlp / text_width,
    )
    if "visual.attnpool.positional_embedding" in tensors:
        width = _require(tensors, "visual.layer1.0.conv1.weight", what)[0]
        stages = tuple(
            count_indices(tensors, rf"visual\.layer{stage}\.(\d+)\.")
            for stage in (1, 2, 3, 4)
        )
        tokens = _require(tensors, "visual.attnpool.positional_embedding", what)[0]
        grid = round((tokens - 1) ** 0.5)
        vision = VisionConfig(image_size=grid * 32, layers=stages, width=width)
    else:
        width, _, patch, _ = _require(tensors, "visual.conv1.weight", what)
        tokens = _require(tensors, "visual.positional_embedding", what)[0]
        grid = round((tokens - 1) ** 0.5)
        mlp = _require(tensors, "visual.transformer.resblocks.0.mlp.c_fc.weight", what)[
            0
        ]
        vision = VisionConfig(
            image_size=grid * patch,
            layers=count_indices(tensors, r"visual\.transformer\.resblocks\.(\d+)\."),
            width=width,
            patch_size=patch,
            mlp_ratio=mlp / width,
        )
    return ModelConfig(embed_dim=embed_dim, vision=vision, text=text)


def shapes_only(config: ModelConfig) -> ModelConfig:
    """The config with what the weights cannot tell (activation, heads) blanked."""
    decoder = config.decoder
    if decoder is not None:
        decoder = dataclasses.replace(decoder, heads=0, attn_pooler_heads=0)
    return dataclasses.replace(
        config,
        quick_gelu=False,
        vision=dataclasses.replace(config.vision, head_width=0, act=None),
        text=dataclasses.replace(config.text, heads=0, act=None),
        decoder=decoder,
    )


def registered_name(config: ModelConfig, same_shapes: bool = False) -> str | None:
    """The registered architecture equal to `config`, if any; with `same_shapes`,
    else one whose weights have the same names and shapes (their activations or
    heads may differ, e.g. HF's tanh GELU where OpenCLIP's config has exact GELU)."""
    for name in sorted(MODELS):
        if MODELS[name] == config:
            return name
    if same_shapes:
        for name in sorted(MODELS):
            if shapes_only(MODELS[name]) == shapes_only(config):
                return name
    return None


def resolve_config(
    inferred: ModelConfig,
    name: str | ModelConfig | None,
    *,
    quick_gelu: bool | None,
    heads_known: bool,
    what: str,
) -> tuple[ModelConfig, str | None]:
    """The config to load weights into, and its registered name (if it has one).

    `name` (a registered name or a ModelConfig) wins; the weights are then checked
    against it key by key. Otherwise the inferred shapes are used, completed from a
    registered architecture with the same shapes when heads are unknown.
    `quick_gelu` is the activation recorded beside the weights (None: not recorded).
    """
    if name is not None:
        config = get_model_config(name) if isinstance(name, str) else name
        if quick_gelu is not None and quick_gelu != config.quick_gelu:
            warnings.warn(
                f"the {what} records quick_gelu={quick_gelu}, but the requested "
                f"architecture uses quick_gelu={config.quick_gelu}; using the latter",
                stacklevel=3,
            )
        recorded = (inferred.vision.heads, inferred.text.heads)
        same_shapes = shapes_only(inferred) == shapes_only(config)
        if (
            heads_known
            and same_shapes
            and recorded != (config.vision.heads, config.text.heads)
        ):
            warnings.warn(
                f"the {what} records (image, text) attention heads {recorded}, but the "
                f"requested architecture has {(config.vision.heads, config.text.heads)}; "
                "using the latter",
                stacklevel=3,
            )
        acts = (inferred.vision_act, inferred.text_act)
        if (
            siglip.is_siglip(config)  # CLIP's activation is quick_gelu's, above
            and heads_known
            and same_shapes
            and acts != (config.vision_act, config.text_act)
        ):
            warnings.warn(
                f"the {what} records (image, text) activations {acts}, but the "
                f"requested architecture has {(config.vision_act, config.text_act)}; "
                "using the latter",
                stacklevel=3,
            )
        return config, name if isinstance(name, str) else registered_name(config)
    config = inferred
    if not heads_known:
        same_shapes = [
            cfg for cfg in MODELS.values() if shapes_only(cfg) == shapes_only(inferred)
        ]
        if same_shapes:
            known = same_shapes[0]
            config = dataclasses.replace(
                inferred, vision=known.vision, text=known.text, decoder=known.decoder
            )
        else:
            warnings.warn(
                f"the {what} matches no registered architecture and weights do not "
                "record attention heads: assuming 64-wide heads; pass name= a "
                "ModelConfig if that is wrong",
                stacklevel=3,
            )
    if quick_gelu is None:
        warnings.warn(
            f"the {what} does not record its activation: assuming GELU (OpenCLIP's "
            "default). OpenAI-trained weights use QuickGELU: pass "
            "name='<arch>-quickgelu' for those",
            stacklevel=3,
        )
        quick_gelu = False
    config = dataclasses.replace(config, quick_gelu=quick_gelu)
    return config, registered_name(config)


# ---------------------------------------------------------------------------
# OpenCLIP's model config JSON (`model_cfg` in open_clip_config.json).
# ---------------------------------------------------------------------------

# Options of OpenCLIP's tower configs that do not change the weights or the forward
# pass at inference (dropout, tokenizer choice, output of token features).
_NEUTRAL_OPTIONS = {
    "patch_dropout",
    "output_tokens",
    "hf_tokenizer_name",
    "tokenizer_mode",
    "tokenizer_kwargs",
    "pad_id",
    "eos_id",
    "timm_model_pretrained",
    "hf_model_pretrained",
    "attn_pooler_queries",
    "attn_pooler_heads",
}
# Options jaxclip's towers implement only at OpenCLIP's default value.
_DEFAULT_OPTIONS = {
    "ls_init_value": None,
    "attentional_pool": False,
    "no_ln_pre": False,
    "pos_embed_type": "learnable",
    "final_ln_after_pool": False,
    "act_kwargs": None,
    "norm_kwargs": None,
    "block_type": None,
    "qk_norm": False,
    "scaled_cosine_attn": False,
    "scale_heads": False,
    "scale_attn_inner": False,
    "scale_attn": False,
    "scale_fc": False,
    "timm_model_name": None,
    "hf_model_name": None,
    "embed_cls": False,
    "no_causal_mask": False,
    "proj_bias": False,
    "custom_text": False,
    "nonscalar_logit_scale": False,
}
_TOWER_DEFAULTS = {
    "vision_cfg": {"pool_type": "tok"},
    "text_cfg": {"pool_type": "argmax", "proj_type": "linear"},
}


def _check_options(cfg: Mapping[str, Any], where: str, used: set[str]) -> None:
    """Refuse OpenCLIP options that would change the weights or the forward pass."""
    defaults = {**_DEFAULT_OPTIONS, **_TOWER_DEFAULTS.get(where, {})}
    for key, value in cfg.items():
        if key in used or key in _NEUTRAL_OPTIONS:
            continue
        if key in defaults and value == defaults[key]:
            continue
        # timm_* / hf_* settings only act with a timm or HF tower (refused apart).
        if key.startswith(("timm_", "hf_")) and key not in defaults:
            continue
        raise ValueError(
            f"OpenCLIP option {where}.{key}={value!r} is not supported by jaxclip's "
            "towers"
        )


def config_from_openclip(model_cfg: Mapping[str, Any]) -> ModelConfig:
    """ModelConfig from OpenCLIP's model config dict (a `model_configs/*.json`)."""
    model_cfg = dict(model_cfg.get("model_cfg", model_cfg))
    vision_cfg = dict(model_cfg.get("vision_cfg", {}))
    text_cfg = dict(model_cfg.get("text_cfg", {}))
    if "siglip" in str(vision_cfg.get("timm_model_name")):
        return siglip.config_from_openclip(model_cfg)
    if "multimodal_cfg" in model_cfg:
        return coca.config_from_openclip(model_cfg, config_from_openclip)
    _check_options(
        model_cfg,
        "model_cfg",
        {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg", "init_logit_scale",
         "init_logit_bias", "cast_dtype"},
    )  # fmt: skip
    if vision_cfg.get("timm_model_name") or text_cfg.get("hf_model_name"):
        raise ValueError(
            "OpenCLIP models with timm or Hugging Face towers are not supported, "
            "except timm's SigLIP image towers"
        )
    _check_options(
        vision_cfg,
        "vision_cfg",
        {"image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio"},
    )
    _check_options(
        text_cfg,
        "text_cfg",
        {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"},
    )
    layers = vision_cfg.get("layers", 12)
    patch_size = vision_cfg.get("patch_size", 16)
    image_size = vision_cfg.get("image_size", 224)
    if isinstance(image_size, (list, tuple)):
        if len(set(image_size)) != 1:
            raise ValueError(f"non-square image_size={image_size} is not supported")
        image_size = image_size[0]
    if isinstance(layers, (list, tuple)):
        layers, patch_size = tuple(layers), None
    vision = VisionConfig(
        image_size=image_size,
        layers=layers,
        width=vision_cfg.get("width", 768),
        patch_size=patch_size,
        head_width=vision_cfg.get("head_width", 64),
        mlp_ratio=float(vision_cfg.get("mlp_ratio", 4.0)),
    )
    text = TextConfig(
        context_length=text_cfg.get("context_length", 77),
        vocab_size=text_cfg.get("vocab_size", 49408),
        width=text_cfg.get("width", 512),
        heads=text_cfg.get("heads", 8),
        layers=text_cfg.get("layers", 12),
        mlp_ratio=float(text_cfg.get("mlp_ratio", 4.0)),
    )
    return ModelConfig(
        embed_dim=model_cfg["embed_dim"],
        vision=vision,
        text=text,
        quick_gelu=bool(model_cfg.get("quick_gelu", False)),
    )


def openclip_model_cfg(config: ModelConfig, logit_bias: bool = False) -> dict:
    """OpenCLIP's model config dict for a jaxclip architecture."""
    if siglip.is_siglip(config):
        return siglip.openclip_model_cfg(config)
    vision, text = config.vision, config.text
    vision_cfg: dict[str, Any] = {
        "image_size": vision.image_size,
        "layers": list(vision.layers) if vision.is_resnet else vision.layers,
        "width": vision.width,
        "patch_size": vision.patch_size,
        "head_width": vision.head_width,
        "mlp_ratio": vision.mlp_ratio,
    }
    model_cfg: dict[str, Any] = {
        "embed_dim": config.embed_dim,
        "quick_gelu": config.quick_gelu,
        "vision_cfg": vision_cfg,
        "text_cfg": openclip_text_cfg(text),
    }
    if logit_bias:
        # Only makes OpenCLIP create the parameter; its value comes from the weights.
        model_cfg["init_logit_bias"] = -10.0
    return coca.openclip_model_cfg(config, model_cfg) if config.is_coca else model_cfg


def openclip_text_cfg(text: TextConfig) -> dict[str, Any]:
    """The sizes of OpenCLIP's `text_cfg` for a text tower (CLIP's and SigLIP's)."""
    return {
        "context_length": text.context_length,
        "vocab_size": text.vocab_size,
        "width": text.width,
        "heads": text.heads,
        "layers": text.layers,
        "mlp_ratio": text.mlp_ratio,
    }
