"""Locked parameters (`train.freeze`, `train.unlock_last`): bit-identical locked
params, the rest against an independent masked-optimizer reference on one device,
optimizer state for the trainable parameters only, BatchNorm in inference mode for a
locked ResNet, fewer FLOPs, and the configs that are refused."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from config_util import recipe, tiny_config
from train_util import (
    ADAM_ATOL,
    final_state,
    model_batches,
    run_steps,
    run_then_crash,
)

from jaxclip import losses, sharding
from jaxclip.config import ConfigError, validate_config
from jaxclip.convert import load_weights
from jaxclip.data.transforms import normalize_images
from jaxclip.models.build import abstract_variables, model_from_config
from jaxclip.models.clip import MAX_LOGIT_SCALE
from jaxclip.train.freeze import Freeze
from jaxclip.train.loop import train_and_evaluate
from jaxclip.train.state import (
    create_train_state,
    learning_rate_schedule,
    make_optimizer,
    named_leaves,
)
from jaxclip.train.step import make_train_step, step_batch_spec

STEPS = 2
LOCK_IMAGE = {"train.freeze": ("visual/.*",)}
STACK = "/transformer/resblocks/"
STEM = ("visual/conv1/", "visual/class_embedding", "visual/positional_embedding")


def _locked_rows(name: str, leaf: np.ndarray, overrides: dict) -> np.ndarray:
    """The test's own reading of the rules: a bool mask of `leaf`'s locked entries."""
    locked = any(re.fullmatch(p, name) for p in overrides.get("train.freeze", ()))
    mask = np.full(leaf.shape, locked)
    unlock = overrides.get("train.unlock_last", 0)
    if locked and unlock and name.startswith("visual/"):
        if STACK in name:
            mask[leaf.shape[0] - unlock :] = False
        elif not name.startswith(STEM + ("visual/ln_pre/",)):
            mask[:] = False  # the head: ln_post, proj
    return mask


def _reference_run(model_name: str, overrides: dict):
    """STEPS steps on one device, without `train.freeze`: the full gradient, its
    locked entries zeroed, the unfrozen optimizer, then the locked entries' updates
    zeroed (weight decay would move them). Returns the params after each step."""
    config = tiny_config(model_name, {"mesh.shape": (1, 1, 1)})
    model = model_from_config(config)
    tx = make_optimizer(config)  # no freeze: the whole tree
    data = model_batches(model, config.seed, config.train.batch_size)
    params = _initial_params(config)  # the sharded run's start
    masks = jax.tree_util.tree_map_with_path(
        lambda path, leaf: _locked_rows(
            jax.tree_util.keystr(path, simple=True, separator="/"), leaf, overrides
        ),
        params,
    )

    def loss_fn(params, images, tokens):
        out = model.apply({"params": params}, images, tokens, train=True)
        return losses.clip_loss(out["image_emb"], out["text_emb"], out["logit_scale"])

    grad_fn = jax.jit(jax.grad(loss_fn))
    opt_state, history = tx.init(params), []
    for _ in range(STEPS):
        batch = next(data)
        images = normalize_images(
            jnp.asarray(batch["images"]), config.data.mean, config.data.std, jnp.float32
        )
        grads = grad_fn(params, images, jnp.asarray(batch["tokens"]))
        grads = jax.tree.map(lambda g, m: jnp.where(m, 0.0, g), grads, masks)
        updates, opt_state = tx.update(grads, opt_state, params)
        updates = jax.tree.map(lambda u, m: jnp.where(m, 0.0, u), updates, masks)
        params = optax.apply_updates(params, updates)
        params["logit_scale"] = jnp.clip(params["logit_scale"], 0.0, MAX_LOGIT_SCALE)
        history.append(jax.device_get(params))
    return history, masks


def _initial_params(config) -> dict:
    """The seed's initial params as the trainer creates them (sharded), on the host."""
    mesh = sharding.make_mesh((4, 2, 1))
    model, tx = model_from_config(config), make_optimizer(config)
    state, _ = create_train_state(model, tx, mesh, jax.random.key(config.seed))
    return jax.device_get(state.params)


def _example(model):
    size, length = model.config.vision.image_size, model.config.text.context_length
    return jnp.zeros((1, size, size, 3)), jnp.zeros((1, length), jnp.int32)


# The image tower's stem locked whole, its last block's rows of every stacked
# parameter and its head trained, the text tower trained: every kind of entry.
UNLOCK_ONE = {**LOCK_IMAGE, "train.unlock_last": 1}


@pytest.mark.slow  # two compiled steps: 8 devices, and the one-device reference
def test_locked_params_stay_and_the_rest_matches_a_masked_reference():
    overrides = UNLOCK_ONE
    mesh = sharding.make_mesh((4, 2, 1))
    config = tiny_config("tiny-vit", overrides)
    start, _ = run_steps(config, mesh, 1)
    state, _ = run_steps(config, mesh, STEPS)
    want, masks = _reference_run("tiny-vit", overrides)
    first = named_leaves(want[0])  # the reference after one step
    got_first = named_leaves(start.params)
    got, ref = named_leaves(state.params), named_leaves(want[-1])
    init = _initial_params(config)
    for name, mask in named_leaves(masks).items():
        initial = named_leaves(init)[name]
        # Locked entries: bit for bit the initial weights, after every step.
        np.testing.assert_array_equal(got_first[name][mask], initial[mask], name)
        np.testing.assert_array_equal(got[name][mask], initial[mask], name)
        np.testing.assert_allclose(
            got_first[name], first[name], rtol=1e-4, atol=ADAM_ATOL, err_msg=name
        )
        np.testing.assert_allclose(
            got[name], ref[name], rtol=1e-4, atol=ADAM_ATOL, err_msg=name
        )
        if not mask.all():  # what trains, moved
            assert not np.array_equal(got[name][~mask], initial[~mask]), name


def test_optimizer_state_covers_the_trainable_entries_only():
    overrides = UNLOCK_ONE
    config = tiny_config("tiny-vit", overrides)
    mesh = sharding.make_mesh((4, 2, 1))
    state, _ = run_steps(config, mesh, 1)
    trainable = sum(
        int((~_locked_rows(name, leaf, overrides)).sum())
        for name, leaf in named_leaves(state.params).items()
    )
    floats = [
        leaf
        for leaf in jax.tree.leaves(state.opt_state)
        if jnp.issubdtype(leaf.dtype, jnp.floating)
    ]
    # Adam's two moments, one entry per trainable parameter entry, and nothing else.
    assert sum(leaf.size for leaf in floats) == 2 * trainable
    mu = state.opt_state[1][0].mu
    assert "visual" in mu and "conv1" not in mu["visual"]
    assert mu["visual"]["transformer"]["resblocks"]["mlp"]["c_fc"]["kernel"].shape == (
        1, 128, 512,
    )  # fmt: skip
    # Without freezing: every entry.
    full = tiny_config("tiny-vit")
    full_state, _ = create_train_state(
        model_from_config(full), make_optimizer(full), mesh, jax.random.key(0)
    )
    total = sum(leaf.size for leaf in jax.tree.leaves(full_state.params))
    assert (
        sum(
            leaf.size
            for leaf in jax.tree.leaves(full_state.opt_state)
            if jnp.issubdtype(leaf.dtype, jnp.floating)
        )
        == 2 * total
    )


@pytest.mark.slow  # compiles the accumulated step
def test_gradcache_with_a_locked_tower_equals_one_pass():
    mesh = sharding.make_mesh((4, 2, 1))
    config = tiny_config("tiny-vit", UNLOCK_ONE)
    accumulated = tiny_config("tiny-vit", {**UNLOCK_ONE, "train.accum_steps": 2})
    (one, _), (two, _) = (
        run_steps(config, mesh, STEPS),
        run_steps(accumulated, mesh, STEPS),
    )
    for name, leaf in named_leaves(one.params).items():
        np.testing.assert_allclose(
            named_leaves(two.params)[name], leaf, rtol=1e-4, atol=ADAM_ATOL,
            err_msg=name,
        )  # fmt: skip
    np.testing.assert_array_equal(
        one.params["visual"]["conv1"]["kernel"], two.params["visual"]["conv1"]["kernel"]
    )


@pytest.mark.slow  # compiles a ResNet step
def test_a_locked_resnet_tower_keeps_its_batchnorm_statistics():
    config = tiny_config("tiny-rn", LOCK_IMAGE)
    mesh = sharding.make_mesh((4, 2, 1))
    model = model_from_config(config)
    start, _ = create_train_state(
        model, make_optimizer(config), mesh, jax.random.key(config.seed)
    )
    variables = jax.device_get(
        {"params": start.params, "batch_stats": start.batch_stats}
    )
    state, history = run_steps(config, mesh, 1)  # training mode would move them
    jax.tree.map(
        np.testing.assert_array_equal,
        state.batch_stats,
        jax.device_get(variables["batch_stats"]),
    )
    jax.tree.map(
        np.testing.assert_array_equal,
        state.params["visual"],
        jax.device_get(variables["params"]["visual"]),
    )
    # The first step's loss is the loss of inference-mode image embeddings (the
    # running statistics), computed here on one device.
    batch = next(model_batches(model, config.seed, config.train.batch_size))
    images = normalize_images(
        jnp.asarray(batch["images"]), config.data.mean, config.data.std, jnp.float32
    )
    out = model.apply(variables, images, jnp.asarray(batch["tokens"]), train=False)
    want = losses.clip_loss(out["image_emb"], out["text_emb"], out["logit_scale"])
    np.testing.assert_allclose(history[0]["loss"], want, rtol=1e-5)


def _step_flops(config) -> float:
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    model, tx = model_from_config(config), make_optimizer(config)
    with sharding.use_mesh(mesh):
        state, shardings = create_train_state(model, tx, mesh, jax.random.key(0))
        step = make_train_step(
            config, model, tx, learning_rate_schedule(config), mesh, shardings
        )
        compiled = step.lower(state, step_batch_spec(config, mesh)).compile()
    return compiled.cost_analysis()["flops"]


def _image_forward_flops(config) -> float:
    model = model_from_config(config)
    size = model.config.vision.image_size
    variables = abstract_variables(model)
    images = jax.ShapeDtypeStruct((config.train.batch_size, size, size, 3), jnp.float32)
    encode = jax.jit(lambda v, x: model.apply(v, x, method=model.encode_image))
    return encode.lower(variables, images).compile().cost_analysis()["flops"]


@pytest.mark.slow  # compiles two steps and the image tower
def test_a_locked_tower_runs_no_backward_pass():
    # A model whose image tower dominates, so that its backward pass is most of the
    # step: 64 patch tokens per image against 16 text tokens.
    overrides = {"model.name": "tiny-vit", "train.batch_size": 8}
    full = _step_flops(tiny_config("tiny-vit", overrides))
    locked = _step_flops(tiny_config("tiny-vit", {**overrides, **LOCK_IMAGE}))
    forward = _image_forward_flops(tiny_config("tiny-vit", overrides))
    # The backward pass of a tower costs about twice its forward pass; the locked
    # step saves that and still runs the forward pass.
    saved = full - locked
    assert 1.5 * forward < saved < 2.5 * forward, (full, locked, forward)


def test_unlock_last_plan_on_a_siglip_tower():
    params = abstract_variables(model_from_config(tiny_config("tiny-siglip")))["params"]
    plan = Freeze(("visual/.*",), unlock_last=1).plan(params)
    assert plan["visual/attn_pool/probe"] == "train"  # the MAP head
    assert plan["visual/ln_post/scale"] == "train"
    assert plan["visual/transformer/resblocks/ln_1/scale"] == 1  # rows 1: on
    assert plan["visual/conv1/kernel"] == "locked"
    assert plan["visual/positional_embedding"] == "locked"
    assert plan["text/transformer/resblocks/ln_1/scale"] == "train"
    # All blocks unlocked: the stacked leaves train whole, the stem stays locked.
    plan = Freeze(("visual/.*",), unlock_last=2).plan(params)
    assert plan["visual/transformer/resblocks/ln_1/scale"] == "train"
    assert plan["visual/conv1/bias"] == "locked"


@pytest.mark.parametrize(
    "model_name, overrides, message",
    [
        ("tiny-vit", {"train.freeze": ("vision/.*",)}, "matches no parameter"),
        ("tiny-vit", {"train.freeze": ("visual",)}, "matches no parameter"),
        ("tiny-vit", {"train.freeze": (".*",)}, "locks every parameter"),
        ("tiny-vit", {"train.freeze": ("visual/.*", "text/.*")}, "locks every"),
        ("tiny-vit", {"train.freeze": ("visual/(",)}, "not a regular expression"),
        ("tiny-vit", {"train.freeze": ("",)}, "must be a list"),
        ("tiny-vit", {"train.unlock_last": 1}, "train.freeze locks nothing"),
        ("tiny-vit", {**LOCK_IMAGE, "train.unlock_last": 3}, "more than the 2"),
        ("tiny-vit", {"train.freeze": ("visual/proj",), "train.unlock_last": 1},
         "locks no tower whole"),
        ("tiny-rn", {**LOCK_IMAGE, "train.unlock_last": 1}, "no transformer blocks"),
    ],
)  # fmt: skip
def test_config_refuses_rules_that_cannot_work(model_name, overrides, message):
    config = tiny_config(model_name)
    for field, value in overrides.items():  # a str where a tuple is expected, too
        section, name = field.split(".")
        config[section][name] = value
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_config(config)


# --- The whole LiT path, on tiny models.

LIT_STEPS = 4


def _lit_config(weights: str):
    """configs/lit.py on `weights`, made tiny: float32, the shapes data, 16 pairs a
    step, a checkpoint every step, and an EMA of the params (decay 0.5)."""
    return recipe(
        "lit",
        weights,
        {
            "model.dtype": "float32",
            "data.source": "shapes",
            "train.batch_size": 16,
            "train.steps": LIT_STEPS,
            "optim.warmup_steps": 0,
            "checkpoint.every_steps": 1,
            "checkpoint.keep": LIT_STEPS,
            "log.every_steps": 1,
            "train.ema_decay": 0.5,
        },
    )


@pytest.mark.slow  # four short training runs
def test_lit_from_a_runs_checkpoint_locks_the_image_tower_and_resumes_exactly(
    tmp_path, monkeypatch
):
    pretrained = tmp_path / "pretrained"
    train_and_evaluate(
        tiny_config(overrides={"train.steps": 2, "optim.warmup_steps": 0}),
        str(pretrained),
    )
    weights = load_weights(str(pretrained))
    config = _lit_config(str(pretrained))
    assert config.model.name == "tiny-vit"
    assert tuple(config.train.freeze) == ("visual/.*",)

    straight = tmp_path / "straight"
    train_and_evaluate(config, str(straight))
    final = final_state(config, straight)
    start = weights.variables["params"]
    jax.tree.map(np.testing.assert_array_equal, final.params["visual"],
                 start["visual"])  # fmt: skip
    moved = [
        name
        for name, leaf in named_leaves(final.params["text"]).items()
        if not np.array_equal(leaf, named_leaves(start["text"])[name])
    ]
    assert len(moved) == len(named_leaves(start["text"]))  # every text parameter
    assert "visual" not in final.opt_state[1][0].mu
    # The EMA: the locked tower's is its params, bit for bit; the text tower's moved
    # with the params but lags them.
    jax.tree.map(np.testing.assert_array_equal, final.ema_params["visual"],
                 start["visual"])  # fmt: skip
    text_ema = named_leaves(final.ema_params["text"])
    for name, leaf in named_leaves(final.params["text"]).items():
        assert not np.array_equal(text_ema[name], leaf), name
        assert not np.array_equal(text_ema[name], named_leaves(start["text"])[name])

    # Stopped after step 2's checkpoint, then run again: the same final state.
    resumed = tmp_path / "resumed"
    run_then_crash(
        lambda: train_and_evaluate(config, str(resumed)), monkeypatch, LIT_STEPS // 2
    )
    train_and_evaluate(config, str(resumed))
    jax.tree.map(np.testing.assert_array_equal, final_state(config, resumed), final)

    # Resuming with other locking is refused: the optimizer state would not fit.
    config.train.freeze = ("visual/transformer/.*",)
    with pytest.raises(ConfigError, match="checkpoint was saved with train.freeze"):
        train_and_evaluate(config, str(resumed))


def test_the_lit_recipe_needs_weights():
    with pytest.raises(ValueError, match="configs/lit.py:/path/to/weights"):
        recipe("lit")
