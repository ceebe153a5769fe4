"""Faults: SIGTERM (preemption), kill -9 at several moments, non-finite steps, and a
checkpoint restored onto other meshes.

The reference for every interrupted run is an uninterrupted run of the same config in
this process; on the CPU, resumed runs must end bit-identical to it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from config_util import recipe
from process_util import CACHE_VARIABLE, child_env, start_python
from train_util import model_batches

from jaxclip import sharding
from jaxclip.data.pipeline import DataIterator
from jaxclip.models.build import model_from_config as build_model
from jaxclip.train import step as step_module
from jaxclip.train.checkpoint import Checkpointer
from jaxclip.train.guard import NonFiniteError
from jaxclip.train.loop import train_and_evaluate
from jaxclip.train.state import (
    abstract_train_state,
    create_train_state,
    learning_rate_schedule,
    make_optimizer,
)

STEPS = 8
OVERRIDES = {
    "model.name": "tiny-vit",
    "train.batch_size": 16,
    "train.steps": STEPS,
    "optim.warmup_steps": 0,
    "checkpoint.every_steps": 2,
    "checkpoint.keep": 10,
    "log.every_steps": 1,
    "evals.zeroshot.every_steps": -1,
}
TIMEOUT = 240  # seconds for any one wait; the runs themselves take a few seconds


def demo_config(**extra):
    """configs/demo.py with OVERRIDES (and `extra`), as the CLI flags below set it."""
    return recipe("demo", overrides={**OVERRIDES, **extra})


def cli_flags(workdir) -> list[str]:
    flags = ["--config=configs/demo.py", f"--workdir={workdir}"]
    flags += [f"--config.{field}={value}" for field, value in OVERRIDES.items()]
    # The trainer's own switch for the cache, pointed at the session's.
    return flags + [f"--config.train.compile_cache_dir={os.environ[CACHE_VARIABLE]}"]


class Run:
    """The trainer in a child process (tests/fault_harness.py), output in a file."""

    def __init__(self, workdir, **faults: str):
        self.workdir = workdir
        self.log_path = f"{workdir}.{time.monotonic_ns()}.log"
        env = child_env(**{f"FAULT_{name.upper()}": v for name, v in faults.items()})
        self.log = open(self.log_path, "w")  # noqa: SIM115 (closed in wait/kill)
        self.process = start_python(
            "tests/fault_harness.py", *cli_flags(workdir), stdout=self.log, env=env
        )

    def output(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def wait_until(self, condition, what: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not condition():
            if self.process.poll() is not None:
                pytest.fail(f"the run ended before {what}:\n{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"timed out waiting for {what}:\n{self.output()[-3000:]}")
            time.sleep(0.05)

    def wait_for_step(self, step: int) -> None:
        """Until this run has logged `step` (an earlier run's lines do not count)."""
        self.wait_until(
            lambda: f"step {step}/{STEPS} |" in self.output(), f"step {step}"
        )

    def kill(self) -> None:
        self.process.kill()  # SIGKILL: no handler, no cleanup
        self.process.wait(TIMEOUT)
        self.log.close()

    def wait(self) -> int:
        try:
            code = self.process.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self.log.close()
        return code


def logged_steps(workdir) -> int:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        steps = [json.loads(line)["step"] for line in f if line.endswith("\n")]
    return max(steps, default=0)


def losses_by_step(workdir) -> dict[int, list[float]]:
    """Every logged loss per step (a replayed step after a resume appears twice)."""
    result: dict[int, list[float]] = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for record in map(json.loads, f):
            if "loss" in record:
                result.setdefault(record["step"], []).append(record["loss"])
    return result


def complete_steps(workdir) -> list[int]:
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"))
    steps = list(checkpointer.manager.all_steps())
    checkpointer.close()
    return sorted(steps)


def committed(workdir, step: int) -> bool:
    """Whether orbax has committed `step` (renamed its temporary directory)."""
    return os.path.isdir(os.path.join(workdir, "checkpoints", str(step)))


def final_state(workdir, config, mesh=None):
    """The latest checkpoint's state and data position, restored on `mesh`."""
    mesh = mesh or sharding.make_mesh(config.mesh.shape)
    abstract, _ = abstract_train_state(
        build_model(config), make_optimizer(config), mesh
    )
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"))
    state, data_state = checkpointer.restore(abstract)
    checkpointer.close()
    return jax.device_get(state), data_state


def assert_same_as_reference(workdir, reference_dir, config) -> None:
    """Bit-identical losses at every logged step and the same final state."""
    want = {step: losses[0] for step, losses in losses_by_step(reference_dir).items()}
    got = losses_by_step(workdir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step, losses in got.items():
        assert losses == [want[step]] * len(losses), f"step {step}"
    (state, data), (ref_state, ref_data) = (
        final_state(workdir, config),
        final_state(reference_dir, config),
    )
    assert data == ref_data
    assert int(state.step) == STEPS
    jax.tree.map(np.testing.assert_array_equal, state, ref_state)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run, in this process."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    train_and_evaluate(demo_config(), str(workdir))
    return str(workdir)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_kill_9_and_sigterm_at_any_moment_resume_to_the_same_result(
    reference, tmp_path
):
    # One workdir through every kind of interruption; the session's compilation
    # cache (tests/process_util.py) makes each restart skip compiling.
    workdir = str(tmp_path / "run")

    # 1. Killed after its first step, before any checkpoint: starts over. (Step 2's
    #    save is held back, so a slow kill cannot let a checkpoint through.)
    run = Run(workdir, step_sleep="0.3", hold_save="2")
    run.wait_for_step(1)
    run.kill()
    assert complete_steps(workdir) == []

    # 2. Killed in the middle of saving step 4, after step 2's save completed: the
    #    arrays are written, the commit is not. Step 4 must not count.
    run = Run(workdir, step_sleep="0.1", hold_save="4")
    run.wait_until(lambda: "HOLDING SAVE 4" in run.output(), "the save of step 4")
    run.kill()
    assert complete_steps(workdir) == [2]
    leftovers = os.listdir(os.path.join(workdir, "checkpoints"))
    assert any(name.startswith("4") and name != "4" for name in leftovers), leftovers

    # 3. Resumed from step 2, killed between checkpoints: after step 5 was logged and
    #    step 4's asynchronous save committed (logging step 5 does not imply that on
    #    a loaded machine). Step 6's save is held back, so 4 stays the latest.
    run = Run(workdir, step_sleep="0.3", hold_save="6")
    run.wait_for_step(5)
    run.wait_until(lambda: committed(workdir, 4), "the commit of step 4")
    run.kill()
    assert "resumed from step 2" in run.output()
    assert complete_steps(workdir)[-1] == 4

    # 4. Resumed from step 4, SIGTERM (preemption) once step 5 is logged: it saves at
    #    the next step boundary and exits cleanly, before the end.
    run = Run(workdir, step_sleep="0.3")
    run.wait_for_step(5)
    run.process.send_signal(signal.SIGTERM)
    assert run.wait() == 0, run.output()[-3000:]
    assert "resumed from step 4" in run.output()
    stopped_at = complete_steps(workdir)[-1]
    assert f"preempted (SIGTERM): saved step {stopped_at}" in run.output()
    assert 5 <= stopped_at < STEPS
    assert logged_steps(workdir) == stopped_at  # it stopped right there

    # 5. Resumed once more, to the end.
    run = Run(workdir)
    assert run.wait() == 0, run.output()[-3000:]
    assert f"resumed from step {stopped_at}" in run.output()
    assert_same_as_reference(workdir, reference, demo_config())


# --- Non-finite steps. A batch of all-white images stands for a poisoned batch: the
# patched normalisation turns it into NaNs inside the step.

_original_normalize = step_module.normalize_images


def _nan_for_white_batches(images, *args, **kwargs):
    normalized = _original_normalize(images, *args, **kwargs)
    return jnp.where(jnp.all(images == 255), jnp.nan, normalized)


def _white_batches_at(monkeypatch, indices: set[int]) -> None:
    """Make the shapes batches with these indices (0-based) all white."""
    original_next = DataIterator.__next__

    def next_batch(self):
        index = self.batches
        batch = original_next(self)
        if index in indices:
            batch = {**batch, "images": np.full_like(batch["images"], 255)}
        return batch

    monkeypatch.setattr(DataIterator, "__next__", next_batch)
    monkeypatch.setattr(step_module, "normalize_images", _nan_for_white_batches)


@pytest.mark.slow
def test_a_nan_batch_is_skipped_and_leaves_the_state_unchanged(monkeypatch):
    _white_batches_at(monkeypatch, {1})
    config = demo_config()
    mesh = sharding.make_mesh(config.mesh.shape)
    model, tx = build_model(config), make_optimizer(config)
    state, shardings = create_train_state(model, tx, mesh, jax.random.key(0))
    train_step = step_module.make_train_step(
        config, model, tx, learning_rate_schedule(config), mesh, shardings
    )
    data = model_batches(model, 0, 16)
    with sharding.use_mesh(mesh):
        state, metrics = train_step(state, sharding.shard_batch(next(data), mesh))
        assert np.isfinite(metrics["loss"]) and int(metrics["nonfinite_total"]) == 0
        before = jax.device_get(state)
        state, metrics = train_step(state, sharding.shard_batch(next(data), mesh))
        assert np.isnan(metrics["loss"])
        assert int(metrics["nonfinite_streak"]) == 1 == int(metrics["nonfinite_total"])
        after = jax.device_get(state)
        assert int(after.step) == 2  # the batch is consumed; the update is not applied
        for tree in ("params", "opt_state", "batch_stats"):
            jax.tree.map(
                np.testing.assert_array_equal,
                getattr(after, tree),
                getattr(before, tree),
            )
        state, metrics = train_step(state, sharding.shard_batch(next(data), mesh))
        assert np.isfinite(metrics["loss"])
        assert (
            int(metrics["nonfinite_streak"]) == 0
            and int(metrics["nonfinite_total"]) == 1
        )
        assert not np.array_equal(
            jax.device_get(state.params["logit_scale"]), after.params["logit_scale"]
        )


@pytest.mark.slow
def test_an_isolated_nan_batch_is_counted_and_training_goes_on(
    monkeypatch, tmp_path, capsys
):
    _white_batches_at(monkeypatch, {2})  # the batch of step 3
    results = train_and_evaluate(demo_config(), str(tmp_path))
    assert (
        "step 3: non-finite loss or gradient, update skipped" in capsys.readouterr().out
    )
    assert np.isfinite(results["loss"]) and results["nonfinite_total"] == 1.0
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["nonfinite_total"] for r in records if "loss" in r] == [0] * 2 + [1] * 6


@pytest.mark.slow
def test_repeated_nans_stop_the_run_and_keep_the_last_good_checkpoint(
    monkeypatch, tmp_path
):
    _white_batches_at(monkeypatch, {3, 4, 5, 6, 7})  # steps 4 to 8
    config = demo_config(**{"train.max_nonfinite_steps": 3})
    with pytest.raises(NonFiniteError, match="3 steps in a row had a non-finite"):
        train_and_evaluate(config, str(tmp_path))
    # Steps 4 to 6 were skipped, so the checkpoints of steps 4 and 6 hold the state
    # after step 3, finite; the run stopped before saving anything later.
    assert complete_steps(str(tmp_path)) == [2, 4, 6]
    state, _ = final_state(str(tmp_path), config)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))
    assert int(state.nonfinite_streak) == 3 == int(state.nonfinite_total)


def test_the_cli_reports_repeated_nans_with_exit_status_1(monkeypatch, capsys):
    from absl import flags

    from jaxclip.train import __main__ as cli

    def stop(config, workdir):
        raise NonFiniteError("stopping at step 7: 5 steps in a row had a non-finite")

    monkeypatch.setattr("jaxclip.train.loop.train_and_evaluate", stop)
    flags.FLAGS(["jaxclip.train", "--workdir=/tmp/unused"])
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["jaxclip.train"])
    finally:
        flags.FLAGS.unparse_flags()
    assert exit_info.value.code == 1
    assert "error: stopping at step 7" in capsys.readouterr().err


# --- Restoring onto other meshes.


@pytest.fixture(scope="module")
def saved_on_4x2x1(tmp_path_factory):
    """A tiny-rn state (BatchNorm statistics too) saved from mesh (4,2,1), 8 devices."""
    config = demo_config(**{"model.name": "tiny-rn"})
    mesh = sharding.make_mesh((4, 2, 1))
    state, _ = create_train_state(
        build_model(config),
        make_optimizer(config),
        mesh,
        jax.random.key(1),
    )
    directory = str(tmp_path_factory.mktemp("saved_on_4x2x1"))
    checkpointer = Checkpointer(directory, async_save=False)
    checkpointer.save(1, state, {"index": 1}, {})
    checkpointer.close()
    return config, directory, jax.device_get(state)


@pytest.mark.parametrize(
    "target", [((2, 1, 2), 4), ((1, 1, 1), 1)], ids=["(2,1,2)x4", "1 device"]
)
def test_a_checkpoint_restores_onto_another_mesh(saved_on_4x2x1, target):
    config, directory, saved = saved_on_4x2x1
    shape, count = target
    other = sharding.make_mesh(shape, jax.devices()[:count])
    abstract, _ = abstract_train_state(
        build_model(config), make_optimizer(config), other
    )
    checkpointer = Checkpointer(directory)
    restored, data_state = checkpointer.restore(abstract)
    checkpointer.close()
    assert data_state == {"index": 1}
    for leaf, want in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract)):
        assert leaf.sharding == want.sharding
        assert set(leaf.sharding.device_set) <= set(jax.devices()[:count])
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), saved)
