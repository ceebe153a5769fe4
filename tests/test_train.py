"""The sharded train step against a single-device run, checkpoints, and resume."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from config_util import tiny_config
from train_util import ADAM_ATOL, assert_same_run, run_steps

from jaxclip import sharding
from jaxclip.data.pipeline import DataIterator
from jaxclip.models.build import model_from_config as build_model
from jaxclip.train.checkpoint import Checkpointer, abstract_like
from jaxclip.train.loop import train_and_evaluate
from jaxclip.train.state import (
    abstract_train_state,
    create_train_state,
    make_optimizer,
    weight_decay_mask,
)


@pytest.fixture(scope="module")
def single_device_runs():
    """Reference trajectories on one device, computed once per model."""
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    return {
        name: run_steps(tiny_config(name), mesh, 2) for name in ("tiny-vit", "tiny-rn")
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    "model_name, mesh_shape",
    [
        ("tiny-vit", (8, 1, 1)),
        ("tiny-vit", (4, 2, 1)),
        ("tiny-vit", (2, 2, 2)),
        # BatchNorm statistics must be global over the sharded batch.
        ("tiny-rn", (4, 2, 1)),
    ],
)
def test_sharded_step_equals_single_device(single_device_runs, model_name, mesh_shape):
    mesh = sharding.make_mesh(mesh_shape)
    state, history = run_steps(tiny_config(model_name), mesh, 2)
    ref_state, ref_history = single_device_runs[model_name]
    for got, want in zip(history, ref_history):
        for name in ("loss", "grad_norm", "i2t_acc", "t2i_acc", "logit_scale"):
            np.testing.assert_allclose(got[name], want[name], rtol=2e-5, err_msg=name)
    # After two AdamW updates (lr 1e-3) every parameter and statistic must agree.
    for tree in ("params", "batch_stats"):
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=ADAM_ATOL),
            getattr(state, tree),
            getattr(ref_state, tree),
        )
    assert state.step == 2


@pytest.mark.slow
@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_ring_loss_in_the_train_step_equals_dense(loss_name):
    mesh = sharding.make_mesh((4, 2, 1))
    dense_state, dense = run_steps(
        tiny_config(overrides={"loss.name": loss_name}), mesh, 2
    )
    ring_state, ring = run_steps(
        tiny_config(overrides={"loss.name": loss_name, "loss.impl": "ring"}), mesh, 2
    )
    assert_same_run((ring_state, ring), (dense_state, dense), ("loss", "grad_norm"))


def test_params_are_created_sharded():
    config = tiny_config()
    mesh = sharding.make_mesh((2, 2, 2))
    model = build_model(config)
    state, _ = create_train_state(
        model, make_optimizer(config), mesh, jax.random.key(0)
    )
    attn = state.params["visual"]["transformer"]["resblocks"]["attn"]
    # [layers, embed, 3, heads, head_dim]: embed over fsdp, heads over tensor.
    spec = attn["in_proj_kernel"].sharding.spec
    assert tuple(spec) == (None, "fsdp", None, "tensor", None)
    mu = state.opt_state[1][0].mu["visual"]["transformer"]["resblocks"]["attn"]
    assert mu["in_proj_kernel"].sharding == attn["in_proj_kernel"].sharding


def test_weight_decay_mask():
    config = tiny_config()
    model = build_model(config)
    abstract = jax.eval_shape(
        lambda: create_train_state(
            model,
            make_optimizer(config),
            sharding.make_mesh((8, 1, 1)),
            jax.random.key(0),
        )[0]
    )
    flat = dict(jax.tree_util.tree_leaves_with_path(weight_decay_mask(abstract.params)))
    decayed = {jax.tree_util.keystr(path) for path, value in flat.items() if value}
    assert "['visual']['proj']" in decayed
    assert "['text']['text_projection']" in decayed
    assert "['text']['transformer']['resblocks']['mlp']['c_fc']['kernel']" in decayed
    # The attention's matrices too (they escaped the decay before).
    attn = "['visual']['transformer']['resblocks']['attn']"
    assert f"{attn}['in_proj_kernel']" in decayed
    assert f"{attn}['out_proj_kernel']" in decayed
    for name in (
        "['logit_scale']",
        "['text']['token_embedding']['embedding']",
        "['text']['positional_embedding']",
        "['visual']['class_embedding']",
        "['visual']['ln_post']['scale']",
        "['text']['transformer']['resblocks']['mlp']['c_fc']['bias']",
        "['visual']['transformer']['resblocks']['attn']['in_proj_bias']",
    ):
        assert name not in decayed


@pytest.mark.slow
def test_logit_scale_is_clipped_at_100():
    config = tiny_config(overrides={"optim.lr": 10.0, "optim.grad_clip_norm": 0.0})
    mesh = sharding.make_mesh((8, 1, 1))
    state, history = run_steps(config, mesh, 2)
    assert float(state.params["logit_scale"]) <= np.log(100.0) + 1e-6
    assert history[-1]["logit_scale"] <= 100.0 + 1e-3


@pytest.mark.slow
def test_checkpoint_save_restore_is_identical(tmp_path):
    config = tiny_config("tiny-rn")
    mesh = sharding.make_mesh((4, 2, 1))
    model = build_model(config)
    tx = make_optimizer(config)
    state, shardings = create_train_state(model, tx, mesh, jax.random.key(3))
    checkpointer = Checkpointer(str(tmp_path / "ckpt"), keep=2)
    checkpointer.save(0, state, {"source": "shapes", "seed": 0, "index": 5}, {"a": 1})
    checkpointer.wait()
    restored, data_state = checkpointer.restore(abstract_like(state))
    checkpointer.close()
    assert data_state == {"source": "shapes", "seed": 0, "index": 5}
    same = jax.tree.map(
        lambda a, b: (
            bool(np.array_equal(np.asarray(a), np.asarray(b)))
            and a.sharding == b.sharding
        ),
        state,
        restored,
    )
    assert all(jax.tree.leaves(same))


def _losses(workdir) -> dict[int, float]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


class _Crash(Exception):
    pass


@pytest.mark.slow
def test_stopped_and_resumed_run_follows_the_same_trajectory(tmp_path, monkeypatch):
    config = tiny_config(
        overrides={"train.steps": 6, "checkpoint.every_steps": 2, "checkpoint.keep": 5}
    )
    train_and_evaluate(config, str(tmp_path / "straight"))

    # Crash while fetching the batch of step 5; the checkpoint of step 4 is complete.
    original_next = DataIterator.__next__

    def crashing_next(self):
        if self.batches == 4:
            raise _Crash()
        return original_next(self)

    monkeypatch.setattr(DataIterator, "__next__", crashing_next)
    with pytest.raises(_Crash):
        train_and_evaluate(config, str(tmp_path / "resumed"))
    monkeypatch.setattr(DataIterator, "__next__", original_next)
    assert Checkpointer(str(tmp_path / "resumed" / "checkpoints")).latest_step() == 4
    train_and_evaluate(config, str(tmp_path / "resumed"))

    straight, resumed = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(1, 7))
    assert resumed == straight  # bit-identical on the CPU

    def final_params(run):
        checkpointer = Checkpointer(str(tmp_path / run / "checkpoints"))
        mesh = sharding.make_mesh(config.mesh.shape)
        abstract, _ = abstract_train_state(
            build_model(config), make_optimizer(config), mesh
        )
        state, data_state = checkpointer.restore(abstract)
        checkpointer.close()
        return jax.device_get(state.params), data_state

    (a, data_a), (b, data_b) = final_params("straight"), final_params("resumed")
    assert data_a == data_b
    assert data_a["source"] == "shapes" and data_a["global"]["batches"] == 6
    assert data_a["global"]["fingerprint"]["seed"] == 0
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.slow
def test_bf16_compute_and_remat_keep_the_step():
    """bf16 compute keeps float32 params and a close loss; remat changes no number."""
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    reference_state, reference = run_steps(tiny_config(), mesh, 1)
    state, bf16 = run_steps(tiny_config(overrides={"model.dtype": "bfloat16"}), mesh, 1)
    assert all(p.dtype == np.float32 for p in jax.tree.leaves(state.params))
    np.testing.assert_allclose(bf16[0]["loss"], reference[0]["loss"], rtol=1e-2)
    remat_state, remat = run_steps(
        tiny_config(overrides={"model.remat": "full"}), mesh, 1
    )
    np.testing.assert_allclose(remat[0]["loss"], reference[0]["loss"], rtol=1e-6)
    np.testing.assert_allclose(
        remat[0]["grad_norm"], reference[0]["grad_norm"], rtol=1e-5
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=ADAM_ATOL),
        remat_state.params,
        reference_state.params,
    )
