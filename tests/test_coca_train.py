"""Training CoCa: the caption loss against torch in float64, the sharded train step's
gradient against a one-device `jax.grad` of a loss written here, GradCache against
one pass, a short run that checkpoints and resumes exactly, and the config's
refusals."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from config_util import tiny_config
from data_util import train_sentencepiece
from test_accumulation import assert_grads_close, micro_batch_order, sharded_grads
from train_util import final_state, run_then_crash

from jaxclip import losses, sharding
from jaxclip.config import ConfigError, validate_config
from jaxclip.data import shapes
from jaxclip.models.coca import CoCa
from jaxclip.models.registry import get_model_config
from jaxclip.train.loop import train_and_evaluate
from jaxclip.train.step import full_batch_grads, gradcache_grads

torch = pytest.importorskip("torch")

BATCH = 16  # 2 rows per device on the 8-device mesh; 4 micro-batches of 4
COCA = {"model.name": "tiny-coca", "loss.clip_weight": 0.5, "loss.caption_weight": 3.0}


# --- The loss against torch.


def _logits_and_labels(seed=0, batch=4, length=9, vocab=37):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(batch, length, vocab)) * 3.0
    labels = rng.integers(1, vocab, (batch, length))
    labels[0, 5:] = 0  # padding, as after a caption's end
    labels[2, 1:] = 0
    labels[3, 0] = 0  # a pad label anywhere is ignored
    return logits, labels


def _torch_loss_and_grad(logits, labels, label_smoothing):
    """float64 torch: OpenCLIP's CoCaLoss caption term and its gradient."""
    logits = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(
        logits.permute(0, 2, 1),  # torch wants [batch, classes, length]
        torch.tensor(labels),
        ignore_index=0,
        label_smoothing=label_smoothing,
    )
    loss.backward()
    return loss.item(), logits.grad.numpy()


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_caption_loss_and_accuracy_match_torch(label_smoothing, dtype):
    logits, labels = _logits_and_labels()
    logits = np.asarray(jnp.asarray(logits, dtype).astype(jnp.float32), np.float64)
    want_loss, want_grad = _torch_loss_and_grad(logits, labels, label_smoothing)

    def loss_fn(logits):
        return losses.caption_loss(
            logits, jnp.asarray(labels), label_smoothing=label_smoothing
        )

    (loss, accuracy), grad = jax.value_and_grad(loss_fn, has_aux=True)(
        jnp.asarray(logits, dtype)
    )
    assert loss.dtype == accuracy.dtype == jnp.float32 and grad.dtype == dtype
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    # The gradient comes back in the logits' dtype (bf16: rounded to 8 bits).
    rtol = 1e-5 if dtype == jnp.float32 else 2**-8
    np.testing.assert_allclose(
        np.asarray(grad, np.float64), want_grad, rtol=rtol, atol=1e-9
    )
    valid = labels != 0
    hits = (np.argmax(logits, -1) == labels) & valid
    np.testing.assert_allclose(accuracy, hits.sum() / valid.sum(), rtol=1e-7)


def test_caption_loss_over_the_whole_batchs_labels_adds_up():
    """Micro-batches' losses with the whole batch's label count sum to its loss."""
    logits, labels = _logits_and_labels(seed=1)
    total = losses.count_labels(np.pad(labels, ((0, 0), (1, 0))))  # tokens [B, L+1]
    assert int(total) == (labels != 0).sum()
    whole = losses.caption_loss(logits, labels, label_smoothing=0.1)
    parts = [
        losses.caption_loss(
            logits[i : i + 2], labels[i : i + 2], label_smoothing=0.1, num_labels=total
        )
        for i in (0, 2)
    ]
    np.testing.assert_allclose(np.sum(parts, axis=0), whole, rtol=1e-6)
    # Only padding: nothing to predict, a loss of 0 rather than 0 / 0.
    empty = losses.caption_loss(logits[:1], np.zeros_like(labels[:1]))
    assert float(empty[0]) == float(empty[1]) == 0.0


# --- The train step.


def _model():
    # Unrolled: XLA:CPU can deadlock on collectives inside loops with 8 devices.
    return CoCa(get_model_config("tiny-coca"), scan=False)


def _inputs(model):
    """Random images, and token rows with 3 to 11 tokens then padding (ids below the
    tiny vocabulary), and the model's initial params (a logit scale off its init)."""
    rng = np.random.default_rng(0)
    size, length = model.config.vision.image_size, model.config.text.context_length
    images = rng.normal(size=(BATCH, size, size, 3)).astype(np.float32)
    tokens = np.zeros((BATCH, length), np.int32)
    vocab = model.config.text.vocab_size
    for row, count in enumerate(rng.integers(3, length, BATCH)):
        tokens[row, :count] = rng.integers(1, vocab, count)
    # Initialised scanned (quicker to compile); the params are the same either way.
    init = jax.jit(CoCa(model.config, scan=True).init)
    variables = init(jax.random.key(0), images[:2], tokens[:2])
    params = {**variables["params"], "logit_scale": jnp.float32(2.5)}
    return {"params": params}, images, tokens


def _reference_loss(config, model, params, images, tokens):
    """The CoCa loss written out on one device: dense softmax CLIP loss, and token
    cross-entropy with torch's label smoothing, from log_softmax."""
    out = model.apply({"params": params}, images, tokens)
    logits = jnp.exp(params["logit_scale"]) * out["image_emb"] @ out["text_emb"].T
    diagonal = jnp.arange(len(images))
    contrastive = -0.5 * (
        jnp.mean(jax.nn.log_softmax(logits, 1)[diagonal, diagonal])
        + jnp.mean(jax.nn.log_softmax(logits, 0)[diagonal, diagonal])
    )
    log_probs = jax.nn.log_softmax(out["logits"].astype(jnp.float32))
    labels = tokens[:, 1:]
    nll = -jnp.take_along_axis(log_probs, labels[..., None], -1)[..., 0]
    smoothing = config.loss.label_smoothing
    token_losses = (1 - smoothing) * nll - smoothing * jnp.mean(log_probs, -1)
    valid = labels != 0
    caption = jnp.sum(jnp.where(valid, token_losses, 0)) / jnp.sum(valid)
    hits = (jnp.argmax(out["logits"], -1) == labels) & valid
    accuracy = jnp.sum(hits) / jnp.sum(valid)
    loss = config.loss.clip_weight * contrastive
    return loss + config.loss.caption_weight * caption, (contrastive, caption, accuracy)


@pytest.fixture(scope="module")
def one_pass():
    """Inputs, and the sharded one-pass step's (loss, grads, outputs) on 8 devices."""
    config = tiny_config(overrides={**COCA, "loss.label_smoothing": 0.1})
    model = _model()
    variables, images, tokens = _inputs(model)
    mesh = sharding.make_mesh((4, 2, 1))
    got = sharded_grads(
        lambda v, i, t: full_batch_grads(config, model, v, i, t),
        mesh,
        variables,
        images,
        tokens,
    )
    return config, model, (variables, images, tokens), got


@pytest.mark.slow
def test_sharded_step_equals_a_one_device_reference(one_pass):
    config, model, (variables, images, tokens), got = one_pass
    got_loss, got_grads, got_out = got
    device = jax.devices()[0]
    inputs = jax.device_put((variables["params"], images, tokens), device)
    scanned = CoCa(model.config, scan=True)  # quicker to compile; the same params
    (want_loss, (contrastive, caption, accuracy)), want_grads = jax.jit(
        jax.value_and_grad(
            lambda p, i, t: _reference_loss(config, scanned, p, i, t), has_aux=True
        )
    )(*inputs)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(got_out["contrastive_loss"], contrastive, rtol=1e-5)
    np.testing.assert_allclose(got_out["caption_loss"], caption, rtol=1e-5)
    np.testing.assert_allclose(got_out["token_acc"], accuracy, rtol=1e-6)
    assert set(got_grads) == {"visual", "text", "text_decoder", "logit_scale"}
    assert_grads_close(got_grads, jax.device_get(want_grads))


@pytest.mark.slow
def test_gradcache_equals_one_pass(one_pass):
    config, model, (variables, images, tokens), want = one_pass
    want_loss, want_grads, want_out = want
    accum_steps = 4
    # One device, layers and micro-batches in lax.scan (the TPU's form; one body
    # to compile): the params are the unrolled model's.
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    scanned = CoCa(model.config, scan=True)
    got_loss, got_grads, got_out = sharded_grads(
        lambda v, i, t: gradcache_grads(config, scanned, v, i, t),
        mesh,
        variables,
        images,
        tokens,
        accum_steps,
    )
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    for name in ("contrastive_loss", "caption_loss", "token_acc"):
        np.testing.assert_allclose(got_out[name], want_out[name], rtol=1e-5)
    want_rows = micro_batch_order(want_out["text_emb"], accum_steps)
    np.testing.assert_allclose(got_out["text_emb"], want_rows, atol=1e-6)
    assert_grads_close(got_grads, want_grads)


# --- A short run with the image tower locked: the caption loss goes down; a crash and
# resume changes nothing.

RUN_STEPS = 4
LOGGED = ("loss", "contrastive_loss", "caption_loss", "token_acc", "grad_norm")


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory) -> str:
    """A SentencePiece model of the shapes captions' words, within tiny-coca's
    100-entry vocabulary, with pad id 0 (CoCa's)."""
    sentences = [
        shapes.caption(size, f"{colour} {shape}", position)
        for size in shapes.SIZES
        for colour in shapes.COLOURS
        for shape in shapes.SHAPES
        for position in shapes.POSITIONS
    ]
    prefix = str(tmp_path_factory.mktemp("sp") / "shapes")
    return train_sentencepiece(sentences, prefix, vocab_size=36)


def _run_config(tokenizer: str):
    return tiny_config(
        overrides={
            **COCA,
            "data.tokenizer": "sentencepiece",
            "data.tokenizer_model": tokenizer,
            "train.steps": RUN_STEPS,
            "train.ema_decay": 0.9,
            # LiT-style: the image tower locked, the text tower and decoder trained.
            "train.freeze": ("visual/.*",),
            "optim.lr": 3e-3,
            "checkpoint.every_steps": RUN_STEPS // 2,
            "checkpoint.async_save": False,
        }
    )


def _metrics(workdir) -> dict[int, dict]:
    """The logged loss terms by step."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return {r["step"]: {k: r[k] for k in LOGGED} for r in records if "loss" in r}


@pytest.mark.slow  # two short training runs
def test_a_coca_run_learns_checkpoints_and_resumes_exactly(
    tiny_tokenizer, tmp_path, monkeypatch
):
    config = _run_config(tiny_tokenizer)
    straight = tmp_path / "straight"
    train_and_evaluate(config, str(straight))
    metrics = _metrics(straight)
    assert sorted(metrics) == list(range(1, RUN_STEPS + 1))
    first, last = metrics[1], metrics[RUN_STEPS]
    assert last["caption_loss"] < first["caption_loss"] - 0.5, (first, last)

    # Stopped after step 2's checkpoint, then run again: the same steps and state.
    resumed = tmp_path / "resumed"
    run_then_crash(
        lambda: train_and_evaluate(config, str(resumed)), monkeypatch, RUN_STEPS // 2
    )
    train_and_evaluate(config, str(resumed))
    assert _metrics(resumed) == metrics  # bit-identical on the CPU
    final = final_state(config, straight)
    jax.tree.map(np.testing.assert_array_equal, final_state(config, resumed), final)

    # The locked image tower has no optimizer state, and its EMA is its params.
    assert set(final.opt_state[1][0].mu) == {"text", "text_decoder", "logit_scale"}
    jax.tree.map(
        np.testing.assert_array_equal,
        final.ema_params["visual"],
        final.params["visual"],
    )


# --- The config.


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"loss.caption_weight": 1.0}, "loss.caption_weight=1.0 is a setting of CoCa"),
        ({"loss.clip_weight": 2.0}, "'tiny-vit' is not a CoCa model"),
        ({"loss.label_smoothing": 0.1}, "loss.label_smoothing=0.1"),
        (
            {**COCA, "loss.clip_weight": 0.0, "loss.caption_weight": 0.0},
            "nothing to learn",
        ),
        ({**COCA, "model.patch_dropout": 0.5}, "CoCa's image tower has no patch"),
        ({**COCA, "loss.label_smoothing": 1.0}, r"must be in \[0, 1\)"),
        ({**COCA, "loss.caption_weight": -1.0}, "loss.caption_weight=-1.0 must be"),
    ],
)
def test_config_refuses_what_cannot_work(overrides, message):
    config = tiny_config(overrides=overrides)
    with pytest.raises(ConfigError, match=message):
        validate_config(config, check_data=False)


def test_config_accepts_a_coca_model():
    validate_config(tiny_config(overrides=COCA), check_data=False)


@pytest.mark.slow
def test_aot_compiles_a_coca_step_with_gradcache_for_tpu():
    """`python -m jaxclip.aot`'s body takes a CoCa config (deviceless TPU compile)."""
    pytest.importorskip("libtpu", reason="the tpu extra (libtpu) is not installed")
    from jaxclip import aot

    config = tiny_config(overrides={**COCA, "train.accum_steps": 2})
    report = aot.compile_recipe(config, aot.topology_devices("v5e:2x2"), False)
    assert report["model"] == "tiny-coca" and report["chips"] == 4
    assert report["programs"]["train_step"]["temp_bytes"] > 0
