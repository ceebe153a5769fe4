"""Distillation in training (`train.distill_from`): the step's loss against float64
NumPy and its gradient against a one-device dense reference, with the ring on the
8-device mesh; GradCache; the teacher bit-identical after training; refusals.

The loss term itself, dense and ring, against float64 NumPy (value and gradients) is
in test_distill_loss.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from config_util import tiny_config
from train_util import ADAM_ATOL, model_batches

from jaxclip import losses, sharding
from jaxclip.config import ConfigError, validate_config
from jaxclip.convert import Weights, load_weights, save_openclip
from jaxclip.data.transforms import normalize_images
from jaxclip.models.build import create_model, init_variables, model_from_config
from jaxclip.models.registry import get_model_config
from jaxclip.train import loop
from jaxclip.train.distill import check_tokens_fit, load_teacher
from jaxclip.train.state import named_leaves
from jaxclip.train.step import full_batch_grads

WEIGHT = 0.7
BATCH = 16


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """A tiny-rn teacher (another architecture, with BatchNorm statistics) with
    random weights, saved as an OpenCLIP file."""
    model = create_model("tiny-rn")
    weights = Weights(
        config=get_model_config("tiny-rn"),
        variables=jax.device_get(init_variables(model, jax.random.key(7))),
        name="tiny-rn",
    )
    return str(save_openclip(weights, tmp_path_factory.mktemp("teacher"))[0])


def _batch(config, model):
    return next(model_batches(model, 3, BATCH))


def _log_softmax(x, axis):
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def _float64_loss(student, teacher, weight):
    """CLIP loss + weight * OpenCLIP's distillation term, in float64 NumPy."""
    as64 = lambda x: np.asarray(x, np.float64)  # noqa: E731
    z = np.exp(as64(student["logit_scale"])) * (
        as64(student["image_emb"]) @ as64(student["text_emb"]).T
    )
    y = np.exp(as64(teacher["logit_scale"])) * (
        as64(teacher["image_emb"]) @ as64(teacher["text_emb"]).T
    )
    eye = np.eye(len(z), dtype=bool)
    clip = -0.5 * (_log_softmax(z, 1)[eye].mean() + _log_softmax(z, 0)[eye].mean())
    rows = -(np.exp(_log_softmax(y, 1)) * _log_softmax(z, 1)).sum(1).mean()
    cols = -(np.exp(_log_softmax(y, 0)) * _log_softmax(z, 0)).sum(0).mean()
    return clip + weight * 0.5 * (rows + cols)


@pytest.mark.slow  # compiles the sharded ring step and the one-device reference
def test_the_step_equals_float64_and_a_one_device_reference(teacher_file):
    config = tiny_config(
        overrides={
            "loss.impl": "ring",
            "train.distill_from": teacher_file,
            "train.distill_weight": WEIGHT,
        }
    )
    model = model_from_config(config)
    variables = jax.device_get(init_variables(model, jax.random.key(0)))
    batch = _batch(config, model)
    mesh = sharding.make_mesh((4, 2, 1))
    with sharding.use_mesh(mesh):
        teacher = load_teacher(config, model, mesh, log=lambda *_: None)
    teacher_variables = jax.device_get(teacher.variables)
    images = jnp.asarray(batch["images"])
    tokens = jnp.asarray(batch["tokens"])

    def sharded_step(variables, images, tokens, teacher_variables):
        teacher_out = teacher.embed(teacher_variables, images, tokens)
        normalized = normalize_images(images, config.data.mean, config.data.std)
        return full_batch_grads(
            config, model, variables, normalized, tokens, teacher_out=teacher_out
        )

    rows = sharding.batch_sharding
    with sharding.use_mesh(mesh):
        loss, grads, out, _ = jax.device_get(
            jax.jit(sharded_step)(
                variables,
                jax.device_put(images, rows(mesh, 4)),
                jax.device_put(tokens, rows(mesh, 2)),
                teacher.variables,
            )
        )

    # One device, dense losses, the teacher run by hand.
    normalized = normalize_images(images, config.data.mean, config.data.std)
    # The teacher sees the uint8 images resized to its size (bicubic, rounded).
    size = teacher.model.config.vision.image_size
    resized = jax.image.resize(
        images.astype(jnp.float32), (BATCH, size, size, 3), method="bicubic"
    )
    resized = jnp.clip(jnp.round(resized), 0, 255)
    teacher_images = normalize_images(resized, teacher.mean, teacher.std)
    teacher_out = teacher.model.apply(
        teacher_variables, teacher_images, tokens, train=False
    )

    def reference(params):
        out = model.apply({"params": params}, normalized, tokens, train=True)
        clip = losses.clip_loss(out["image_emb"], out["text_emb"], out["logit_scale"])
        distill = losses.distill_loss(
            out["image_emb"],
            out["text_emb"],
            out["logit_scale"],
            teacher_out["image_emb"],
            teacher_out["text_emb"],
            teacher_out["logit_scale"],
        )
        return clip + WEIGHT * distill, out

    (want_loss, student_out), want_grads = jax.value_and_grad(reference, has_aux=True)(
        variables["params"]
    )
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(
        loss, _float64_loss(student_out, teacher_out, WEIGHT), rtol=1e-5
    )
    np.testing.assert_allclose(
        out["contrastive_loss"] + WEIGHT * out["distill_loss"], loss, rtol=1e-6
    )
    for name, grad in named_leaves(want_grads).items():
        np.testing.assert_allclose(
            named_leaves(grads)[name], grad, rtol=1e-4, atol=1e-5, err_msg=name
        )


@pytest.mark.slow  # two short training runs
def test_training_leaves_the_teacher_bit_identical(teacher_file, tmp_path, monkeypatch):
    teachers = []

    def recording_load(*args, **kwargs):
        teachers.append(load_teacher(*args, **kwargs))
        return teachers[-1]

    monkeypatch.setattr(loop, "load_teacher", recording_load)
    finals = []
    for accum_steps in (1, 2):
        config = tiny_config(
            overrides={
                "train.steps": 2,
                "loss.impl": "ring",
                "train.distill_from": teacher_file,
                "train.distill_weight": WEIGHT,
                "train.accum_steps": accum_steps,
            }
        )
        workdir = tmp_path / f"accum{accum_steps}"
        results = loop.train_and_evaluate(config, str(workdir))
        np.testing.assert_allclose(
            results["loss"],
            results["contrastive_loss"] + WEIGHT * results["distill_loss"],
            rtol=1e-6,
        )
        finals.append(load_weights(str(workdir)).variables["params"])
    saved = load_weights(teacher_file).variables
    for teacher in teachers:
        after = jax.device_get(teacher.variables)
        for collection in ("params", "batch_stats"):
            jax.tree.map(np.testing.assert_array_equal, after[collection],
                         saved[collection])  # fmt: skip
    # GradCache with the teacher: the same run as one pass.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=ADAM_ATOL),
        finals[1],
        finals[0],
    )


def test_a_teacher_must_read_the_students_tokens():
    check_tokens_fit(
        get_model_config("tiny-rn"), get_model_config("tiny-vit"), "t"
    )  # same vocabulary and context: fine
    with pytest.raises(ConfigError, match="text vocab_size is 1000, the student's"):
        check_tokens_fit(
            get_model_config("tiny-siglip"), get_model_config("tiny-vit"), "t"
        )


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train.distill_from": "/no/such/teacher"}, "must be an existing path"),
        ({"train.distill_weight": 0.0}, "must be > 0"),
    ],
)
def test_config_refuses_bad_distillation_fields(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(tiny_config(overrides=overrides))
