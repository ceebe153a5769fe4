"""`model.init_from`: a fresh run starts from existing weights (a jaxclip run, an
OpenCLIP export), checked strictly against the model; a resumed run ignores them.

One tiny run (A) is trained once for the module and one run (B) starts from it
through the trainer; the other tests read A's checkpoint or an OpenCLIP export of it
through `restore_or_init`, which compiles no train step.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from config_util import tiny_config

from jaxclip import sharding
from jaxclip.config import FIELD_RULES, ConfigError, validate_config
from jaxclip.convert import Weights, load_weights, save_openclip
from jaxclip.data.pipeline import checkpoint_state
from jaxclip.models.build import abstract_variables, create_model, model_from_config
from jaxclip.models.registry import get_model_config
from jaxclip.train.checkpoint import Checkpointer
from jaxclip.train.loop import Trainer, restore_or_init, train_and_evaluate
from jaxclip.train.state import abstract_train_state, make_optimizer, named_leaves

STEPS = 2


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    """Workdir of a tiny-vit run trained STEPS steps (its checkpoint: step STEPS)."""
    workdir = tmp_path_factory.mktemp("run_a")
    train_and_evaluate(tiny_config(overrides={"train.steps": STEPS}), str(workdir))
    return workdir


@pytest.fixture(scope="module")
def weights_a(run_a):
    """Run A's final weights, read from its checkpoint by the converter."""
    return load_weights(run_a)


@pytest.fixture(scope="module")
def openclip_a(weights_a, tmp_path_factory):
    """Run A exported as an OpenCLIP safetensors file (with its config beside it)."""
    return save_openclip(weights_a, tmp_path_factory.mktemp("openclip_a"))[0]


def _export(weights, directory, params_update):
    """`weights` with some params replaced or added, exported as OpenCLIP."""
    params = {**weights.variables["params"], **params_update}
    variables = {**weights.variables, "params": params}
    return save_openclip(dataclasses.replace(weights, variables=variables), directory)[
        0
    ]


class _Iterator:
    """Stands in for the trainer's DevicePrefetcher: records a restored position."""

    position = None

    def set_state(self, state):
        self.position = state


def _start(config, workdir):
    """`restore_or_init` as the trainer calls it: (state on the devices, log lines,
    the position restored into the data iterator or None)."""
    mesh = sharding.make_mesh(config.mesh.shape)
    checkpointer = Checkpointer(str(workdir / "checkpoints"))
    lines, iterator = [], _Iterator()
    try:
        with sharding.use_mesh(mesh):
            state, _ = restore_or_init(
                config, model_from_config(config), make_optimizer(config), mesh,
                checkpointer, iterator, lines.append,
            )  # fmt: skip
    finally:
        checkpointer.close()
    return state, lines, iterator.position


def _assert_same_tree(got, want):
    got, want = named_leaves(got), named_leaves(want)
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == np.float32, key
        np.testing.assert_array_equal(np.asarray(got[key]), want[key], err_msg=key)


def _assert_fresh_optimizer(state):
    assert int(state.step) == 0
    assert int(state.nonfinite_streak) == int(state.nonfinite_total) == 0
    # AdamW's moments and count start at zero; clipping keeps no state.
    assert not any(np.any(np.asarray(x)) for x in jax.tree.leaves(state.opt_state))


def _parameters(params) -> str:
    return f"({sum(x.size for x in jax.tree.leaves(params)):,} parameters)"


@pytest.mark.slow  # trains run A once for the module
def test_run_starts_from_a_runs_checkpoint(run_a, weights_a, tmp_path):
    """Run B, through the trainer: A's final params bit for bit, a fresh optimizer,
    the data from the beginning; then it trains."""
    config = tiny_config(
        overrides={"train.steps": STEPS, "model.init_from": str(run_a)}
    )
    workdir = str(tmp_path / "b")
    validate_config(config, workdir)
    lines = []
    mesh = sharding.make_mesh(config.mesh.shape)
    with sharding.use_mesh(mesh):
        trainer = Trainer.set_up(config, workdir, mesh, lines.append)
        try:
            start = jax.device_get(trainer.state)
            start_position = checkpoint_state(trainer.train_iter.get_state())
            trainer.train()
            end_position = checkpoint_state(trainer.train_iter.get_state())
        finally:
            trainer.close()
    _assert_same_tree(start.params, weights_a.variables["params"])
    # The trainer's own reader of A's checkpoint (orbax onto the shardings) agrees.
    a_checkpoints = Checkpointer(str(run_a / "checkpoints"))
    abstract, _ = abstract_train_state(
        model_from_config(config), make_optimizer(config), mesh
    )
    final_a, _ = a_checkpoints.restore(abstract)
    a_checkpoints.close()
    assert int(final_a.step) == STEPS
    _assert_same_tree(start.params, jax.device_get(final_a.params))
    _assert_fresh_optimizer(start)
    # Not A's position (STEPS batches in): B reads the first STEPS batches.
    assert start_position["global"]["batches"] == 0
    assert end_position["global"]["batches"] == STEPS
    assert lines[0] == (
        f"initialised from {weights_a.source} {_parameters(start.params)}"
    )
    assert weights_a.source.startswith(f"jaxclip checkpoint {run_a}")


@pytest.mark.slow  # trains run A once for the module
def test_run_starts_from_an_openclip_export(openclip_a, weights_a, tmp_path):
    config = tiny_config(
        overrides={"mesh.shape": (2, 2, 2), "model.init_from": openclip_a}
    )
    state, lines, position = _start(config, tmp_path)
    _assert_same_tree(state.params, weights_a.variables["params"])
    _assert_fresh_optimizer(state)
    assert position is None
    assert lines == [
        f"initialised from OpenCLIP state dict {openclip_a} {_parameters(state.params)}"
    ]
    # Placed with the state's shardings, e.g. attention [layers, embed, 3, heads,
    # head_dim] with embed over fsdp and heads over tensor.
    abstract, _ = abstract_train_state(
        model_from_config(config),
        make_optimizer(config),
        sharding.make_mesh(config.mesh.shape),
    )
    assert jax.tree.map(lambda x: x.sharding, state.params) == jax.tree.map(
        lambda x: x.sharding, abstract.params
    )
    attn = state.params["visual"]["transformer"]["resblocks"]["attn"]
    assert tuple(attn["in_proj_kernel"].sharding.spec) == (
        None, "fsdp", None, "tensor", None
    )  # fmt: skip


def test_resnet_batch_statistics_come_from_the_file(tmp_path):
    # Random values of the right shapes (fresh statistics would be just 0 and 1).
    rng = np.random.default_rng(0)
    variables = jax.tree.map(
        lambda x: rng.uniform(0.5, 2.0, x.shape).astype(np.float32),
        abstract_variables(create_model("tiny-rn", sharded=False)),
    )
    weights = Weights(get_model_config("tiny-rn"), variables, "tiny-rn")
    path = save_openclip(weights, tmp_path / "rn")[0]
    state, _, _ = _start(tiny_config("tiny-rn", {"model.init_from": path}), tmp_path)
    _assert_same_tree(state.params, variables["params"])
    _assert_same_tree(state.batch_stats, variables["batch_stats"])


@pytest.mark.slow  # trains run A once for the module
@pytest.mark.parametrize("source", ["checkpoint", "openclip"])
def test_other_shapes_are_refused_with_every_difference(
    source, run_a, openclip_a, tmp_path
):
    init_from = str(run_a) if source == "checkpoint" else openclip_a
    config = tiny_config("demo-vit", {"model.init_from": init_from})
    with pytest.raises(ConfigError) as error:
        _start(config, tmp_path)
    message = str(error.value)
    assert init_from in message and "model.name='demo-vit'" in message
    # tiny-vit: 2 image and text layers, 16 tokens, embedding 64; demo-vit: 4, 24, 128.
    if source == "checkpoint":  # compared in jaxclip's layout (layers stacked)
        listed = [
            "27 wrong shapes",
            "params/text/positional_embedding: file [16, 128], expected [24, 128]",
            "params/text/text_projection: file [128, 64], expected [128, 128]",
            "params/text/transformer/resblocks/attn/in_proj_kernel: file [2, 128, 3, 2, "
            "64], expected [4, 128, 3, 2, 64]",
        ]
    else:  # read into demo-vit's layout by the converter, in OpenCLIP's names
        listed = [
            "48 missing keys",
            "transformer.resblocks.2.attn.in_proj_weight",
            "3 wrong shapes",
            "positional_embedding: file [16, 128], expected [24, 128]",
            "visual.proj: file [128, 64], expected [128, 128]",
        ]
    for line in listed:
        assert line in message


@pytest.mark.slow  # trains run A once for the module
def test_a_logit_bias_must_be_in_both_or_neither(run_a, weights_a, tmp_path):
    # A CLIP run into a SigLIP model (the sigmoid loss adds a logit bias) ...
    config = tiny_config(
        overrides={"loss.name": "siglip", "model.init_from": str(run_a)}
    )
    with pytest.raises(ConfigError, match="has no logit bias.*set loss.name='clip'"):
        _start(config, tmp_path)
    # ... and SigLIP weights into a CLIP model are refused; into a SigLIP one they fit.
    siglip = _export(weights_a, tmp_path / "siglip", {"logit_bias": np.float32(-7.5)})
    config = tiny_config(overrides={"model.init_from": siglip})
    with pytest.raises(ConfigError, match="has a logit bias.*set loss.name='siglip'"):
        _start(config, tmp_path)
    config = tiny_config(overrides={"loss.name": "siglip", "model.init_from": siglip})
    state, _, _ = _start(config, tmp_path)
    assert np.asarray(state.params["logit_bias"]) == np.float32(-7.5)


@pytest.mark.slow  # trains run A once for the module
def test_a_resumed_run_ignores_init_from(run_a, weights_a, tmp_path):
    # Weights that fit but differ from A's: the workdir's checkpoint must win.
    shifted = _export(
        weights_a,
        tmp_path / "shifted",
        {"logit_scale": weights_a.variables["params"]["logit_scale"] + 1},
    )
    config = tiny_config(overrides={"train.steps": STEPS, "model.init_from": shifted})
    state, lines, position = _start(config, run_a)
    assert int(state.step) == STEPS
    _assert_same_tree(state.params, weights_a.variables["params"])
    assert position["global"]["batches"] == STEPS
    assert lines == [
        f"resumed from step {STEPS} in {run_a / 'checkpoints'} "
        f"(model.init_from={shifted!r} ignored: the workdir has a checkpoint)"
    ]


def test_config_refuses_a_source_that_does_not_exist(tmp_path):
    missing = str(tmp_path / "no_such_model.safetensors")
    with pytest.raises(ConfigError, match=r"model.init_from='.*no_such_model.*' must"):
        validate_config(tiny_config(overrides={"model.init_from": missing}))
    rule = FIELD_RULES["model.init_from"]
    with pytest.raises(ConfigError, match="model.init_from=3 must"):
        rule.check("model.init_from", 3)
    for accepted in ("", str(tmp_path), "hf-hub:org/repo"):
        rule.check("model.init_from", accepted)
