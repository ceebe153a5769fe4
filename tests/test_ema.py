"""The EMA of the parameters (`train.ema_decay`): the update against a float64
recomputation (warm-up and skipped steps included), the state and checkpoint layout
with and without it, exact resume, evaluators on the EMA, export, config refusals.

One tiny run is trained through the trainer once for the module (4 steps, every step
checkpointed, an evaluator on the params and one on the EMA); the update rule itself
is tested on `apply_gradients` with a two-parameter state, which compiles no model.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from config_util import tiny_config
from train_util import run_then_crash

import jaxclip
from jaxclip import sharding
from jaxclip.config import ConfigError, validate_config
from jaxclip.convert import load_weights
from jaxclip.convert.__main__ import main as convert_main
from jaxclip.convert.checkpoint import run_config
from jaxclip.evaluate import evaluators
from jaxclip.evaluate.standalone import evaluate_checkpoint
from jaxclip.models.build import model_from_config
from jaxclip.train import loop
from jaxclip.train.checkpoint import Checkpointer
from jaxclip.train.loop import restore_train_state, train_and_evaluate
from jaxclip.train.state import (
    TrainState,
    abstract_train_state,
    create_train_state,
    learning_rate_schedule,
    make_optimizer,
    named_leaves,
)
from jaxclip.train.step import apply_gradients

DECAY = 0.5  # far from 1, so that 4 steps move the EMA well away from the params
STEPS = 4
# The fields every checkpoint held before the EMA existed.
OLD_LAYOUT = {
    "step",
    "params",
    "opt_state",
    "batch_stats",
    "nonfinite_streak",
    "nonfinite_total",
}


def ema_config(evals: bool = True, **overrides):
    config = tiny_config(
        overrides={
            "train.steps": STEPS,
            "train.ema_decay": DECAY,
            "checkpoint.every_steps": 1,
            "checkpoint.keep": STEPS,
            **overrides,
        }
    )
    if evals:
        for name, weights in (("zs", "params"), ("zs_ema", "ema")):
            config.evals[name] = evaluators.spec(
                "zeroshot", "shapes", num_examples=32, batch_size=16, params=weights
            )
    return config


def restore(workdir, step: int) -> TrainState:
    """The state (with EMA) of `workdir`'s checkpoint at `step`, on the host."""
    config = ema_config(evals=False)
    abstract, _ = abstract_train_state(
        model_from_config(config),
        make_optimizer(config),
        sharding.make_mesh(config.mesh.shape),
        ema=True,
    )
    checkpointer = Checkpointer(str(workdir / "checkpoints"))
    try:
        state, _ = checkpointer.restore(abstract, step)
    finally:
        checkpointer.close()
    return jax.device_get(state)


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    """The module's run: (workdir, results, what it recorded: the state it started
    from as "start", and each evaluator's params by its name)."""
    workdir = tmp_path_factory.mktemp("ema_run")
    recorded = {}
    run, create = evaluators.Evaluator.run, loop.create_train_state

    def recording_run(self, variables):
        recorded[self.name] = jax.device_get(variables["params"])
        return run(self, variables)

    def recording_create(*args, **kwargs):
        state, shardings = create(*args, **kwargs)
        recorded["start"] = jax.device_get(state)
        return state, shardings

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluators.Evaluator, "run", recording_run)
        patch.setattr(loop, "create_train_state", recording_create)
        results = train_and_evaluate(ema_config(), str(workdir))
    return workdir, results, recorded


@pytest.fixture(scope="module")
def created():
    """A tiny-vit state with EMA, created on a mesh that splits the weights:
    (state, its shardings, model, optimizer, mesh)."""
    config = tiny_config()
    mesh = sharding.make_mesh((2, 2, 2))
    model, tx = model_from_config(config), make_optimizer(config)
    state, shardings = create_train_state(model, tx, mesh, jax.random.key(0), ema=True)
    return state, shardings, model, tx, mesh


# --- The update rule, on a two-parameter state (no model).


def _tiny_state(ema: bool) -> TrainState:
    params = {
        "logit_scale": jnp.asarray(np.log(10.0), jnp.float32),
        "kernel": jnp.asarray(np.linspace(-1.0, 1.0, 12).reshape(3, 4), jnp.float32),
    }
    tx = make_optimizer(tiny_config())
    zero = jnp.zeros((), jnp.int32)
    return TrainState(
        step=zero,
        params=params,
        opt_state=tx.init(params),
        batch_stats={},
        nonfinite_streak=zero,
        nonfinite_total=zero,
        ema_params=jax.tree.map(jnp.copy, params) if ema else None,
    )


def _steps(config, losses):
    """Apply one update per loss (NaN: a non-finite step) to the tiny state; the
    states before the first and after each step, on the host."""
    tx = make_optimizer(config)
    state = _tiny_state(ema=config.train.ema_decay > 0)
    embeddings = jnp.eye(4, 8, dtype=jnp.float32)
    out = {"image_emb": embeddings, "text_emb": embeddings, "logit_scale": 0.0}
    states = [jax.device_get(state)]
    for i, loss in enumerate(losses):
        grads = jax.tree.map(lambda p, i=i: jnp.cos(p + i), state.params)
        state, _ = apply_gradients(
            config,
            tx,
            learning_rate_schedule(config),
            state,
            jnp.float32(loss),
            grads,
            out,
            {},
        )
        states.append(jax.device_get(state))
    return states


def _float64_ema(start, states, decays):
    """The EMA recomputed in float64 from `start` and the params after each step."""
    ema = jax.tree.map(lambda p: np.asarray(p, np.float64), start)
    for state, decay in zip(states, decays):
        ema = jax.tree.map(
            lambda e, p, d=decay: d * e + (1 - d) * np.asarray(p, np.float64),
            ema,
            state.params,
        )
    return ema


def _assert_close(got, want):
    jax.tree.map(
        lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7), got, want
    )


def _assert_equal(got, want):
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_the_ema_follows_the_params_and_skips_non_finite_steps():
    config = tiny_config(overrides={"train.ema_decay": 0.9})
    states = _steps(config, [1.0, 1.0, np.nan, 1.0])
    # The non-finite step leaves params and EMA bit for bit ...
    _assert_equal(states[3].params, states[2].params)
    _assert_equal(states[3].ema_params, states[2].ema_params)
    # ... and is not an update of the average.
    applied = [states[i] for i in (1, 2, 4)]
    _assert_close(
        states[4].ema_params, _float64_ema(states[0].params, applied, [0.9] * 3)
    )
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(states[4].ema_params))
    assert not np.allclose(states[4].ema_params["kernel"], states[4].params["kernel"])


def test_the_warmup_decays_as_tensorflow_and_timm():
    config = tiny_config(overrides={"train.ema_decay": 0.9, "train.ema_warmup": True})
    states = _steps(config, [1.0] * 3)
    # min(0.9, (1 + t) / (10 + t)) at steps t = 0, 1, 2
    want = _float64_ema(states[0].params, states[1:], [1 / 10, 2 / 11, 3 / 12])
    _assert_close(states[-1].ema_params, want)


def test_without_ema_the_state_has_none_and_the_step_keeps_it_so():
    config = tiny_config()
    states = _steps(config, [1.0])
    assert states[-1].ema_params is None


# --- State and checkpoint layout.


def test_the_ema_is_created_like_the_params(created):
    state, shardings, model, tx, mesh = created
    abstract, abstract_shardings = abstract_train_state(model, tx, mesh, ema=True)
    assert abstract_shardings == shardings
    for key, param in named_leaves(state.params).items():
        ema = named_leaves(state.ema_params)[key]
        assert ema.dtype == np.float32 and ema.sharding == param.sharding, key
        assert named_leaves(abstract.ema_params)[key].sharding == param.sharding, key
        np.testing.assert_array_equal(np.asarray(ema), np.asarray(param), key)
        assert not _same_buffers(ema, param), key
    # An in-projection is split over fsdp and tensor: the EMA too.
    attn = state.ema_params["visual"]["transformer"]["resblocks"]["attn"]
    assert tuple(attn["in_proj_kernel"].sharding.spec) == (
        None,
        "fsdp",
        None,
        "tensor",
        None,
    )


def _same_buffers(a: jax.Array, b: jax.Array) -> bool:
    """Whether two arrays share device memory (the step donates both: they must not)."""
    pointer = lambda x: x.addressable_data(0).unsafe_buffer_pointer()  # noqa: E731
    return pointer(a) == pointer(b)


def _save(state, directory, step=1):
    checkpointer = Checkpointer(str(directory), async_save=False)
    checkpointer.save(step, state, {"index": step}, {"model": {"name": "tiny-vit"}})
    fields = checkpointer.state_fields()
    checkpointer.close()
    return fields


def test_without_ema_checkpoints_keep_the_old_layout_and_ema_can_be_switched(
    created, tmp_path
):
    """A state without EMA writes the fields every earlier version wrote; resuming it
    with the EMA on starts the EMA from its params; the reverse drops it."""
    with_ema, _, model, tx, mesh = created
    plain = with_ema.replace(ema_params=None)
    assert _save(plain, tmp_path / "plain") == OLD_LAYOUT
    assert _save(with_ema, tmp_path / "ema") == OLD_LAYOUT | {"ema_params"}

    lines = []
    for saved, ema in (("plain", True), ("ema", False), ("plain", False)):
        abstract, _ = abstract_train_state(model, tx, mesh, ema=ema)
        checkpointer = Checkpointer(str(tmp_path / saved))
        try:
            state, data_state = restore_train_state(
                checkpointer, abstract, lines.append
            )
        finally:
            checkpointer.close()
        assert data_state == {"index": 1}
        _assert_equal(jax.device_get(state.params), jax.device_get(plain.params))
        if not ema:
            assert state.ema_params is None
            continue
        for key, param in named_leaves(state.params).items():
            ema_leaf = named_leaves(state.ema_params)[key]
            assert ema_leaf.sharding == param.sharding, key
            assert not _same_buffers(ema_leaf, param), key
        _assert_equal(jax.device_get(state.ema_params), jax.device_get(plain.params))
    assert lines == [
        "train.ema_decay > 0: the EMA starts from step 0's params",
        "train.ema_decay=0: the checkpoint's EMA of the params is dropped",
    ]


# --- The trainer's run.


@pytest.mark.slow  # trains the module's run
def test_the_trainers_ema_equals_a_float64_recomputation(ema_run):
    workdir, _, recorded = ema_run
    states = [recorded["start"]]
    states += [restore(workdir, step) for step in range(1, STEPS + 1)]
    _assert_equal(states[0].ema_params, states[0].params)
    for previous, state in zip(states, states[1:]):
        want = _float64_ema(previous.ema_params, [state], [DECAY])
        _assert_close(state.ema_params, want)
    # From the initial params through every step's params, independently of the
    # EMA recorded on the way.
    want = _float64_ema(states[0].params, states[1:], [DECAY] * STEPS)
    _assert_close(states[-1].ema_params, want)


@pytest.mark.slow  # two more runs of the module's config
def test_a_resumed_run_ends_bit_identical(ema_run, tmp_path, monkeypatch):
    workdir, _, _ = ema_run
    config = ema_config(evals=False)
    run_then_crash(
        lambda: train_and_evaluate(config, str(tmp_path)), monkeypatch, STEPS // 2
    )
    checkpointer = Checkpointer(str(tmp_path / "checkpoints"))
    assert checkpointer.latest_step() == STEPS // 2
    checkpointer.close()
    train_and_evaluate(config, str(tmp_path))

    straight, resumed = restore(workdir, STEPS), restore(tmp_path, STEPS)
    _assert_equal(resumed, straight)  # every leaf: params, EMA, optimizer, step
    assert not np.array_equal(
        straight.ema_params["logit_scale"], straight.params["logit_scale"]
    )


@pytest.mark.slow  # uses the module's run
def test_evaluators_read_the_ema_or_the_params(ema_run):
    workdir, results, given = ema_run
    final = restore(workdir, STEPS)
    _assert_equal(given["zs"], final.params)
    _assert_equal(given["zs_ema"], final.ema_params)
    assert not np.array_equal(
        given["zs"]["visual"]["proj"], final.ema_params["visual"]["proj"]
    )
    for name in ("zs", "zs_ema"):
        assert f"{name}/top1" in results
    # The same numbers from the checkpoint alone, with the config the run saved.
    report = evaluate_checkpoint(run_config(str(workdir)), str(workdir), ["zs_ema"])
    for metric in ("top1", "top5", "mean_per_class_recall"):
        assert report["results"][f"zs_ema/{metric}"] == results[f"zs_ema/{metric}"]


@pytest.mark.slow  # uses the module's run
def test_export_reads_the_ema(ema_run, created, tmp_path, capsys):
    workdir, _, _ = ema_run
    final = restore(workdir, STEPS)
    ema = load_weights(workdir, ema=True)
    assert ema.source.endswith("(EMA)")
    _assert_equal(ema.variables["params"], final.ema_params)
    _assert_equal(load_weights(workdir).variables["params"], final.params)
    _, variables, _, _ = jaxclip.load(workdir, ema=True)
    _assert_equal(jax.device_get(variables["params"]), final.ema_params)

    out = tmp_path / "openclip"
    assert convert_main(["--from", str(workdir), "--to", str(out), "--ema"]) == 0
    assert "(EMA)" in capsys.readouterr().out
    _assert_equal(load_weights(out).variables["params"], final.ema_params)

    # Neither an export nor a run without EMA holds one.
    with pytest.raises(ValueError, match="is not one"):
        load_weights(out, ema=True)
    config = tiny_config()
    plain = created[0].replace(ema_params=None)
    checkpointer = Checkpointer(
        str(tmp_path / "plain" / "checkpoints"), async_save=False
    )
    checkpointer.save(1, plain, {}, json.loads(config.to_json_best_effort()))
    checkpointer.close()
    with pytest.raises(ValueError, match="holds no EMA of the parameters"):
        load_weights(tmp_path / "plain", ema=True)
    assert (
        convert_main(
            ["--from", str(tmp_path / "plain"), "--to", str(tmp_path / "x"), "--ema"]
        )
        == 2
    )
    assert "holds no EMA" in capsys.readouterr().err


# --- Config.


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train.ema_decay": 1.0}, r"train.ema_decay=1.0 must be in \[0, 1\)"),
        ({"train.ema_decay": -0.5}, r"train.ema_decay=-0.5 must be in \[0, 1\)"),
        ({"train.ema_warmup": True}, "train.ema_warmup=True warms up"),
    ],
)
def test_config_refuses_bad_ema_fields(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(tiny_config(overrides=overrides))


def test_an_ema_evaluator_needs_a_run_with_ema():
    config = ema_config(**{"train.ema_decay": 0.0})
    with pytest.raises(
        ConfigError, match=r"evals.zs_ema.params='ema' evaluates the EMA"
    ):
        validate_config(config)
    config = ema_config()
    config.evals.zs.params = "average"
    with pytest.raises(ConfigError, match=r"evals.zs.params='average' must be one of"):
        validate_config(config)
    validate_config(ema_config())
