"""Weights in and out without a PyTorch reference: round trips through every format,
architecture inference for every registered model, and the errors users see."""

from __future__ import annotations

import dataclasses
import json
import sys
import warnings
from fractions import Fraction
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from convert_util import assert_trees_equal, random_variables

import jaxclip
from jaxclip.config import base_config
from jaxclip.convert import (
    CorruptFileError,
    UnsafeFileError,
    Weights,
    load_weights,
    openclip,
    read_tensors,
    save_hf,
    save_openclip,
)
from jaxclip.convert import files as convert_files
from jaxclip.convert import hf as convert_hf
from jaxclip.convert.__main__ import main as convert_main
from jaxclip.convert.checkpoint import read_checkpoint
from jaxclip.convert.tensors import write_safetensors
from jaxclip.models.registry import MODELS, get_model_config, list_models
from jaxclip.train.checkpoint import Checkpointer
from jaxclip.train.state import TrainState, make_optimizer


@pytest.fixture(scope="module")
def tiny_vit() -> Weights:
    """SigLIP-style tiny ViT (with a logit bias), random values everywhere."""
    config = get_model_config("tiny-vit")
    variables = random_variables(config, 0, logit_bias=True)
    return Weights(config, variables, "tiny-vit")


@pytest.fixture(scope="module")
def tiny_rn() -> Weights:
    """Tiny ResNet CLIP with random params and BatchNorm statistics."""
    config = get_model_config("tiny-rn")
    variables = random_variables(config, 1)
    return Weights(config, variables, "tiny-rn", mean=(0.5,) * 3, std=(0.25,) * 3)


# ---------------------------------------------------------------------------
# Round trips: export -> import gives the same bits.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["tiny_vit", "tiny_rn"])
def test_openclip_directory_round_trip(which, request, tmp_path):
    weights = request.getfixturevalue(which)
    paths = save_openclip(weights, tmp_path)
    assert [p.rsplit("/", 1)[1] for p in paths] == [
        "open_clip_model.safetensors",
        "open_clip_config.json",
    ]
    loaded = load_weights(tmp_path)
    assert loaded.name == weights.name and loaded.config == weights.config
    assert loaded.logit_bias == weights.logit_bias
    settings = ("mean", "std", "resize_mode", "interpolation")
    assert [getattr(loaded, k) for k in settings] == [
        getattr(weights, k) for k in settings
    ]
    assert_trees_equal(weights.variables, loaded.variables)
    # The state dict holds torch's BatchNorm counters (OpenCLIP loads strictly).
    tensors = read_tensors(paths[0])
    counters = [k for k in tensors if k.endswith("num_batches_tracked")]
    assert len(counters) == (
        len(jax.tree.leaves(weights.variables.get("batch_stats", {}))) // 2
    )


def test_hf_directory_round_trip(tmp_path):
    config = get_model_config("tiny-vit")
    weights = Weights(config, random_variables(config, 2), "tiny-vit")
    save_hf(weights, tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"model.safetensors", "config.json", "preprocessor_config.json"} <= names
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= names
    loaded = load_weights(tmp_path)
    assert loaded.name == "tiny-vit"
    assert_trees_equal(weights.variables, loaded.variables)
    # A name overrides what config.json records, with a warning when heads differ.
    four_heads = dataclasses.replace(
        config, vision=dataclasses.replace(config.vision, head_width=32)
    )
    with pytest.warns(UserWarning, match=r"attention heads \(2, 2\).*\(4, 2\)"):
        assert load_weights(tmp_path, name=four_heads).config == four_heads


def test_torch_files_round_trip(tiny_rn, tmp_path):
    torch = pytest.importorskip("torch")
    state_dict = {
        key: torch.from_numpy(np.array(value))
        for key, value in openclip.to_openclip(
            tiny_rn.variables, tiny_rn.config
        ).items()
    }
    # A bare state dict, and a DistributedDataParallel training checkpoint.
    torch.save(state_dict, tmp_path / "plain.pt")
    wrapped = {
        "epoch": 3,
        "state_dict": {f"module.{k}": v for k, v in state_dict.items()},
    }
    torch.save(wrapped, tmp_path / "epoch_3.pt")
    for name in ("plain.pt", "epoch_3.pt"):
        with pytest.warns(UserWarning, match="does not record its activation"):
            loaded = load_weights(tmp_path / name)
        assert loaded.name == "tiny-rn"
        assert_trees_equal(tiny_rn.variables, loaded.variables)


def test_checkpoint_exports_round_trip(tiny_rn, tmp_path, capsys):
    """A training checkpoint (as the trainer writes it) -> OpenCLIP / CLI -> back."""
    config = base_config()
    config.model.name = "tiny-rn"
    params = tiny_rn.variables["params"]
    state = TrainState(
        step=jnp.asarray(7, jnp.int32),
        params=params,
        opt_state=make_optimizer(config).init(params),
        batch_stats=tiny_rn.variables["batch_stats"],
        nonfinite_streak=jnp.asarray(0, jnp.int32),
        nonfinite_total=jnp.asarray(0, jnp.int32),
    )
    workdir = tmp_path / "workdir"
    checkpointer = Checkpointer(str(workdir / "checkpoints"), async_save=False)
    config_json = json.loads(config.to_json_best_effort())
    checkpointer.save(7, state, {"index": 0}, config_json, force=True)
    checkpointer.close()

    restored = read_checkpoint(str(workdir))
    assert restored.step == 7 and restored.name == "tiny-rn"
    assert_trees_equal(tiny_rn.variables, restored.variables)
    model, variables, _, _ = jaxclip.load(workdir / "checkpoints" / "7")
    assert model.name == "tiny-rn"
    assert_trees_equal(tiny_rn.variables, jax.device_get(variables))

    assert convert_main(["--from", str(workdir), "--to", str(tmp_path / "oc")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert_trees_equal(tiny_rn.variables, load_weights(tmp_path / "oc").variables)

    with pytest.raises(ValueError, match="holds model.name='tiny-rn', not 'tiny-vit'"):
        load_weights(workdir, name="tiny-vit")
    # A ResNet has no HF counterpart: the CLI says so and exits with status 2.
    assert (
        convert_main(
            ["--from", str(workdir), "--to", str(tmp_path / "hf"), "--format", "hf"]
        )
        == 2
    )
    assert "no ResNet image tower" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Architecture inference: every registered model, from shapes alone.
# ---------------------------------------------------------------------------


def _shape_dict(shapes: dict) -> dict:
    return {
        key: jax.ShapeDtypeStruct(shape, jnp.float32) for key, shape in shapes.items()
    }


@pytest.mark.parametrize("name", [n for n in list_models() if "quickgelu" not in n])
def test_architecture_is_inferred_from_shapes(name):
    config = get_model_config(name)
    tensors = _shape_dict(openclip.expected_shapes(config))
    inferred = openclip.infer_config(tensors)
    # The weights hold the patch grid, not the image size: ViT-SO400M-14-SigLIP-384's
    # 27 x 27 grid of 14-pixel patches reads back as its 378-pixel twin.
    in_shapes, in_shapes_name = config, name
    vision = config.vision
    if not vision.is_resnet and vision.image_size % vision.patch_size:
        size = vision.image_size // vision.patch_size * vision.patch_size
        in_shapes = dataclasses.replace(
            config, vision=dataclasses.replace(vision, image_size=size)
        )
        in_shapes_name = openclip.registered_name(in_shapes)
        assert in_shapes_name == name.replace(str(vision.image_size), str(size))
    # SigLIP's towers have no QuickGELU variant.
    for quick_gelu in (False, True) if vision.pool == "tok" else (False,):
        resolved, registered = openclip.resolve_config(
            inferred, None, quick_gelu=quick_gelu, heads_known=False, what=name
        )
        expected = dataclasses.replace(in_shapes, quick_gelu=quick_gelu)
        assert resolved == expected  # heads (e.g. ViT-H-14's 80-wide) from the registry
        variant = f"{in_shapes_name}-quickgelu" if quick_gelu else in_shapes_name
        assert registered == (variant if variant in MODELS else None)
    # The OpenCLIP config JSON we write describes the same architecture (OpenCLIP
    # builds SigLIP image towers from timm's names only: not the tiny test model's).
    if name == "tiny-siglip":
        with pytest.raises(ValueError, match="only from timm"):
            openclip.openclip_model_cfg(config)
    else:
        cfg = json.loads(json.dumps(openclip.openclip_model_cfg(config)))
        assert openclip.config_from_openclip(cfg) == config
    if config.is_coca:  # transformers has no CoCa
        with pytest.raises(ValueError, match="no CoCa"):
            convert_hf.expected_hf_shapes(config)
    elif not vision.is_resnet:
        hf_shapes = _shape_dict(convert_hf.expected_hf_shapes(config))
        assert openclip.shapes_only(convert_files.infer_hf_config(hf_shapes, name)) == (
            openclip.shapes_only(in_shapes)
        )
        hf_config = convert_hf.hf_config(config, 2.0)
        assert convert_hf.config_from_hf(json.loads(json.dumps(hf_config))) == config


def test_openai_marker_keys_mean_quickgelu(tiny_vit, tmp_path):
    config = get_model_config("tiny-vit")
    variables = {
        "params": {
            k: v for k, v in tiny_vit.variables["params"].items() if k != "logit_bias"
        }
    }
    tensors = openclip.to_openclip(variables, config)
    tensors.update(
        input_resolution=np.asarray(32),
        context_length=np.asarray(16),
        vocab_size=np.asarray(49408),
    )
    write_safetensors(tmp_path / "openai.safetensors", tensors)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: QuickGELU is known
        loaded = load_weights(tmp_path / "openai.safetensors")
    assert loaded.config.quick_gelu and "OpenAI" in loaded.source
    # Asking for the GELU variant is allowed, with a warning.
    with pytest.warns(UserWarning, match="records quick_gelu=True"):
        load_weights(tmp_path / "openai.safetensors", name="tiny-vit")


def test_unregistered_architecture_loads_with_a_warning(tmp_path):
    config = dataclasses.replace(
        get_model_config("tiny-vit"),
        embed_dim=24,
        vision=dataclasses.replace(get_model_config("tiny-vit").vision, width=192),
    )
    variables = random_variables(config, 3)
    write_safetensors(
        tmp_path / "w.safetensors", openclip.to_openclip(variables, config)
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_weights(tmp_path / "w.safetensors")
    messages = " ".join(str(w.message) for w in caught)
    assert "64-wide heads" in messages and "does not record its activation" in messages
    assert loaded.name is None and loaded.config.vision.heads == 3
    assert_trees_equal(variables, loaded.variables)


# ---------------------------------------------------------------------------
# Errors: mismatches, unsafe files, unsupported options.
# ---------------------------------------------------------------------------


def test_mismatches_are_listed(tiny_vit, tmp_path):
    tensors = openclip.to_openclip(tiny_vit.variables, tiny_vit.config)
    del tensors["visual.transformer.resblocks.1.ln_2.bias"]
    tensors["visual.extra_head.weight"] = np.zeros(3, np.float32)
    tensors["visual.proj"] = tensors["visual.proj"][:, :10]
    write_safetensors(tmp_path / "bad.safetensors", tensors)
    with pytest.raises(ValueError) as error:
        load_weights(tmp_path / "bad.safetensors", name="tiny-vit")
    message = str(error.value)
    assert "does not match tiny-vit" in message
    assert "1 missing keys:\n    visual.transformer.resblocks.1.ln_2.bias" in message
    assert "1 unexpected keys:\n    visual.extra_head.weight" in message
    assert "visual.proj: file [128, 10], expected [128, 64]" in message


def test_wrong_architecture_name_is_refused(tiny_rn, tmp_path):
    save_openclip(tiny_rn, tmp_path)
    with pytest.raises(ValueError, match=r"missing keys:\n    visual.class_embedding"):
        load_weights(tmp_path, name="tiny-vit")
    with pytest.raises(ValueError, match="is not a registered architecture"):
        load_weights(tmp_path, name="RN51")


def test_pickle_and_torchscript_files_are_refused(tmp_path):
    torch = pytest.importorskip("torch")
    # A Fraction is harmless, but only Python's pickle can rebuild it.
    torch.save({"weights": torch.zeros(2), "ratio": Fraction(1, 3)}, tmp_path / "p.pt")
    with pytest.raises(
        UnsafeFileError, match=r"needs Python's pickle.*weights_only=True"
    ) as refused:
        read_tensors(tmp_path / "p.pt")
    # jaxclip's own words: the object named, none of torch's text or terminal codes.
    assert "fractions.Fraction object" in str(refused.value)
    assert "\x1b" not in str(refused.value) and "two options" not in str(refused.value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        script = torch.jit.script(torch.nn.Linear(2, 2))
    script.save(str(tmp_path / "openai.pt"))
    with pytest.raises(UnsafeFileError, match="TorchScript archive"):
        load_weights(tmp_path / "openai.pt")


def test_damaged_files_are_named_with_what_is_wrong(tiny_vit, tmp_path):
    torch = pytest.importorskip("torch")
    whole = save_openclip(tiny_vit, tmp_path / "whole")
    data = next(Path(p) for p in whole if p.endswith(".safetensors")).read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match=r"cut.safetensors is truncated: its"):
        load_weights(tmp_path / "cut.safetensors")
    (tmp_path / "noise.safetensors").write_bytes(bytes(range(64)))
    with pytest.raises(CorruptFileError, match=r"\(64 bytes\) is not a valid"):
        load_weights(tmp_path / "noise.safetensors")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CorruptFileError, match=r"empty.pt is empty \(0 bytes\)"):
        load_weights(tmp_path / "empty.pt")
    torch.save({"w": torch.zeros(64)}, tmp_path / "full.pt")
    saved = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(saved[: len(saved) // 2])
    with pytest.raises(CorruptFileError, match="cut.pt .* truncated or damaged"):
        load_weights(tmp_path / "cut.pt")
    (tmp_path / "model.ckpt").write_bytes(saved)
    with pytest.raises(ValueError, match=r"model.ckpt: a .ckpt file is usually a"):
        load_weights(tmp_path / "model.ckpt")


def test_safetensors_load_without_torch(tiny_vit, tmp_path, monkeypatch):
    save_openclip(tiny_vit, tmp_path)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
    assert_trees_equal(tiny_vit.variables, load_weights(tmp_path).variables)
    (tmp_path / "w.pt").write_bytes(b"")
    with pytest.raises(ImportError, match="needs torch"):
        read_tensors(tmp_path / "w.pt")


def test_unsupported_openclip_options_are_refused():
    model_cfg = openclip.openclip_model_cfg(get_model_config("ViT-B-32"))
    model_cfg["vision_cfg"]["attentional_pool"] = True
    with pytest.raises(ValueError, match="vision_cfg.attentional_pool=True"):
        openclip.config_from_openclip(model_cfg)
    model_cfg["vision_cfg"] = {"timm_model_name": "convnext_base"}
    with pytest.raises(ValueError, match="timm or Hugging Face towers"):
        openclip.config_from_openclip(model_cfg)


def test_unknown_paths_say_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a jaxclip checkpoint"):
        load_weights(tmp_path)
    with pytest.raises(FileNotFoundError, match="no weights file"):
        load_weights(tmp_path / "missing.safetensors")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown weights format"):
        load_weights(tmp_path / "w.npz")


@pytest.mark.parametrize(
    "save, wanted",
    [
        (save_openclip, ["open_clip_config.json", "open_clip_model.safetensors"]),
        (save_hf, ["config.json", "model.safetensors", "preprocessor_config.json"]),
    ],
)
def test_hf_hub_downloads_only_what_it_reads(save, wanted, tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    config = get_model_config("tiny-vit")
    weights = Weights(config, random_variables(config, 4), "tiny-vit")
    repo = tmp_path / "repo"
    save(weights, repo)
    if save is save_openclip:  # timm's copy of the weights sits beside OpenCLIP's
        (repo / "model.safetensors").write_bytes(b"not read")
        (repo / "config.json").write_text(
            '{"architecture": "vit_base_patch32_clip_224"}'
        )
    fetched = []

    def hf_hub_download(repo_id, filename):
        assert repo_id == "org/name"
        fetched.append(filename)
        return str(repo / filename)

    monkeypatch.setattr(
        huggingface_hub,
        "list_repo_files",
        lambda repo_id: [p.name for p in repo.iterdir()],
    )
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    loaded = load_weights("hf-hub:org/name")
    assert sorted(fetched) == wanted
    assert_trees_equal(weights.variables, loaded.variables)


def test_load_returns_a_ready_model(tiny_vit, tmp_path):
    save_openclip(tiny_vit, tmp_path)
    model, variables, preprocess, tokenizer = jaxclip.load(tmp_path)
    assert model.name == "tiny-vit" and preprocess.image_size == 32
    assert tokenizer("a cat").shape == (1, 16)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(variables))
    assert_trees_equal(tiny_vit.variables, jax.device_get(variables))
