"""Multi-process training on loopback: 2 processes x 4 CPU devices against 1 x 8.

The runs go through `launch/local.py` (the launcher users run), with the shapes input
pipeline, per-step metrics and multi-process orbax saves; the 2-process run is
preempted with SIGTERM half-way (JAX's preemption sync point) and resumed, and the
single process's final weights are evaluated again on 2 processes. Every child process
is bounded by the launcher's timeout and killed with its process group on any exit.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from process_util import child_env, start_python

from jaxclip.config import ConfigError, base_config, load_file
from jaxclip.distributed import Setup, explicit_settings, initialize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 10


def _load_launcher():
    return load_file(os.path.join(REPO, "launch", "local.py"))


local = _load_launcher()
# The children keep the session's XLA flags (the launcher replaces only the device
# count): both layouts compile with the same flags, so the comparison holds.
ENV = child_env()


# A tiny recipe from the base config: two saves (steps 5 and 10), every step's loss in
# metrics.jsonl, a small zero-shot evaluation at the end.
RECIPE = f"""
from jaxclip.config import base_config


def get_config(arg=None):
    from jaxclip.evaluate import evaluators

    config = base_config()
    config.model.name = "tiny-vit"
    config.model.scan = False
    config.data.source = "shapes"
    config.train.batch_size = 16
    config.train.steps = {STEPS}
    config.optim.warmup_steps = 2
    config.log.every_steps = 1
    config.checkpoint.every_steps = 5
    config.evals.zeroshot = evaluators.spec("zeroshot", "shapes", num_examples=48)
    return config
"""


def train_command(recipe, workdir) -> list[str]:
    return [
        sys.executable,
        "-m",
        "jaxclip.train",
        f"--config={recipe}",
        f"--workdir={workdir}",
    ]


def launch_in_thread(
    results: dict, name: str, recipe, workdir, processes: int, devices: int
):
    """Start one launcher run in a thread; its (exit code, output) go to results."""
    output = io.StringIO()

    def target():
        code = local.run(
            train_command(recipe, workdir),
            processes,
            devices,
            log_dir=str(workdir) + "-logs",
            timeout=240,
            env=ENV,
            output=output,
            grace=5,
        )
        results[name] = (code, output.getvalue())

    thread = threading.Thread(target=target)
    thread.start()
    return thread


def losses(workdir) -> list[float]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    logged = [r for r in records if "loss" in r]
    assert [r["step"] for r in logged] == list(range(1, STEPS + 1))
    return [r["loss"] for r in logged]


def restore_state(step_dir) -> dict:
    """The saved train state as NumPy arrays, onto this process's first device."""
    checkpointer = ocp.StandardCheckpointer()
    path = os.path.join(step_dir, "state")
    metadata = checkpointer.metadata(path)
    metadata = getattr(metadata, "item_metadata", metadata)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata
    )
    restored = checkpointer.restore(path, target)
    checkpointer.close()
    return jax.tree.map(np.asarray, restored)


def preempt_then_resume(recipe, workdir, log_dir) -> tuple[int, str]:
    """A 2 x 4 run through the launcher's command line, SIGTERM'd once step 3 is
    logged (preemption: every process saves the same step), then resumed to the end.
    Returns (the step saved at the preemption, the resumed run's output)."""
    interrupted = pathlib.Path(f"{log_dir}-interrupted.out")
    with interrupted.open("w") as out:
        launcher = start_python(
            os.path.join(REPO, "launch", "local.py"),
            "--processes=2",
            "--devices-per-process=4",
            f"--log-dir={log_dir}-interrupted",
            "--timeout=240",
            "--",
            sys.executable,
            os.path.join(REPO, "tests", "fault_harness.py"),
            f"--config={recipe}",
            f"--workdir={workdir}",
            stdout=out,
            env=child_env(FAULT_STEP_SLEEP="0.3"),
        )
        deadline = time.monotonic() + 240
        while f"step 3/{STEPS} |" not in interrupted.read_text():
            if launcher.poll() is not None or time.monotonic() > deadline:
                launcher.kill()
                pytest.fail(f"no step 3:\n{interrupted.read_text()[-3000:]}")
            time.sleep(0.1)
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(240) == 0, interrupted.read_text()[-3000:]
    text = interrupted.read_text()
    saved = re.search(r"preempted \(SIGTERM\): saved step (\d+)", text)
    assert saved, text[-3000:]
    output = io.StringIO()
    code = local.run(
        train_command(recipe, workdir),
        2,
        4,
        log_dir=f"{log_dir}-resumed",
        timeout=240,
        env=ENV,
        output=output,
        grace=5,
    )
    assert code == 0, output.getvalue()[-3000:]
    return int(saved.group(1)), output.getvalue()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_match_one(tmp_path):
    """2 x 4 (preempted by SIGTERM and resumed) against 1 x 8, uninterrupted."""
    results: dict = {}
    multi, single = tmp_path / "2x4", tmp_path / "1x8"
    recipe = tmp_path / "recipe.py"
    recipe.write_text(RECIPE)
    thread = launch_in_thread(results, "1x8", recipe, single, processes=1, devices=8)
    preempted_at, resumed_output = preempt_then_resume(recipe, multi, tmp_path / "2x4")
    thread.join()
    code, output = results["1x8"]
    assert code == 0, f"1x8 exited {code}:\n{output[-3000:]}"
    assert 3 <= preempted_at < STEPS
    assert "2 processes (explicit); this is process 0" in resumed_output
    assert f"resumed from step {preempted_at}" in resumed_output
    assert f"step {STEPS}/{STEPS}" in resumed_output

    # Not bit-identical: across processes XLA:CPU all-reduces with gloo's ring
    # algorithm, which adds the 8 devices' partial sums in another order than the
    # in-process all-reduce (device 0, 1, ..., 7), so float32 sums differ in the last
    # bits. Losses agree to 1 ulp (measured: at most 9e-8 relative, half of them
    # equal); Adam turns rounding-level gradient noise (the attention key bias, whose
    # true gradient is 0) into parameter differences of at most ~7e-7. A run
    # training on the wrong rows or without averaging would be off by ~1e-3.
    # Each layout on its own is bit-for-bit repeatable.
    np.testing.assert_allclose(losses(multi), losses(single), rtol=1e-6, atol=0)

    # Both saved steps 5 and 10 (and 2 x 4 the preempted step); the multi-process
    # checkpoint holds both processes' shards and restores whole here.
    for workdir, expected in ((multi, {preempted_at, 5, 10}), (single, {5, 10})):
        saved = [name for name in os.listdir(workdir / "checkpoints") if name.isdigit()]
        assert {int(name) for name in saved} == expected
    multi_state = restore_state(multi / "checkpoints" / str(STEPS))
    single_state = restore_state(single / "checkpoints" / str(STEPS))
    assert int(multi_state["step"]) == int(single_state["step"]) == STEPS
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
        multi_state["params"],
        single_state["params"],
    )
    # Both input pipelines stopped at the same place.
    data = [
        (w / "checkpoints" / str(STEPS) / "data" / "metadata") for w in (multi, single)
    ]
    assert json.loads(data[0].read_text()) == json.loads(data[1].read_text())

    # Evaluation on 2 processes (each embedding its share) gives exactly what the
    # single process's run computed at its end, from the same weights.
    output = io.StringIO()
    code = local.run(
        [
            sys.executable,
            "-m",
            "jaxclip.evaluate",
            f"--config={recipe}",
            f"--checkpoint={single}",
            f"--output={tmp_path / 'results.json'}",
        ],
        2,
        4,
        log_dir=str(tmp_path / "eval-logs"),
        timeout=240,
        env=ENV,
        output=output,
        grace=5,
    )
    assert code == 0, output.getvalue()[-3000:]
    evaluated = json.loads((tmp_path / "results.json").read_text())["results"]
    final = [json.loads(line) for line in (single / "metrics.jsonl").open()][-1]
    for metric in ("top1", "top5", "mean_per_class_recall"):
        assert evaluated[f"zeroshot/{metric}"] == final[f"zeroshot/{metric}"]


# --- The launcher itself (no JAX in the children: fast).


@pytest.mark.multiprocess
def test_launcher_stops_everything_after_a_failure(tmp_path):
    # Process 1 fails at once; process 0 would sleep for a minute.
    script = (
        "import os, sys, time\n"
        "if os.environ['JAXCLIP_PROCESS_ID'] == '1': sys.exit(3)\n"
        "print('devices', os.environ['XLA_FLAGS'], flush=True)\n"
        "time.sleep(60)\n"
    )
    output = io.StringIO()
    start = time.monotonic()
    code = local.run(
        [sys.executable, "-c", script],
        2,
        4,
        log_dir=str(tmp_path),
        env=child_env(devices=8),
        output=output,
        grace=2,
    )
    assert code == 3
    assert time.monotonic() - start < 30
    assert "process 1 exited with 3" in output.getvalue()
    log = (tmp_path / "process_0.log").read_text()
    assert "device_count=4" in log and "device_count=8" not in log


@pytest.mark.multiprocess
def test_launcher_timeout(tmp_path):
    output = io.StringIO()
    code = local.run(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        2,
        log_dir=str(tmp_path),
        timeout=1,
        output=output,
        grace=1,
    )
    assert code == local.TIMEOUT_EXIT_CODE
    assert "timed out" in output.getvalue()


@pytest.mark.multiprocess
def test_launcher_forwards_sigterm(tmp_path):
    # Each child exits 0 when SIGTERM arrives (as the trainer does after saving).
    child = (
        "import os, signal, sys, time\n"
        "def stop(*_):\n"
        "    open(os.path.join(sys.argv[1], 'stopped_' +"
        " os.environ['JAXCLIP_PROCESS_ID']), 'w').close()\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    launcher = start_python(
        os.path.join(REPO, "launch", "local.py"),
        "--processes=2",
        f"--log-dir={tmp_path / 'logs'}",
        "--timeout=60",
        "--",
        sys.executable,
        "-c",
        child,
        str(tmp_path),
        stdout=subprocess.DEVNULL,
        env=ENV,
    )
    try:
        deadline = time.monotonic() + 30
        logs = [tmp_path / "logs" / f"process_{i}.log" for i in range(2)]
        while not all(p.is_file() and "ready" in p.read_text() for p in logs):
            assert time.monotonic() < deadline, "children did not start"
            time.sleep(0.1)
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=30) == 0
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert sorted(p.name for p in tmp_path.glob("stopped_*")) == [
        "stopped_0",
        "stopped_1",
    ]


# --- Settings (no processes started).


def test_explicit_settings_from_config_and_environment(monkeypatch):
    for name in ("JAXCLIP_COORDINATOR", "JAXCLIP_NUM_PROCESSES", "JAXCLIP_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    config = base_config()
    assert explicit_settings(config) is None
    monkeypatch.setenv("JAXCLIP_COORDINATOR", "10.0.0.1:1234")
    monkeypatch.setenv("JAXCLIP_NUM_PROCESSES", "4")
    with pytest.raises(ConfigError, match="JAXCLIP_PROCESS_ID"):
        explicit_settings(config)
    monkeypatch.setenv("JAXCLIP_PROCESS_ID", "3")
    assert explicit_settings(config) == Setup("explicit", "10.0.0.1:1234", 4, 3)
    config.distributed.process_id = 1  # a config field wins over its variable
    assert explicit_settings(config).process_id == 1
    config.distributed.process_id = -1
    monkeypatch.setenv("JAXCLIP_PROCESS_ID", "4")
    with pytest.raises(ConfigError, match="process_id=4"):
        explicit_settings(config)
    # mode='off' ignores all of it and touches nothing.
    config.distributed.mode = "off"
    assert initialize(config) == Setup("off")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("mode", "sometimes", "distributed.mode"),
        ("coordinator_address", "10.0.0.1", "host:port"),
        ("num_processes", -2, "distributed.num_processes"),
        ("initialization_timeout", 0, "distributed.initialization_timeout"),
    ],
)
def test_bad_distributed_config(field, value, message):
    config = base_config()
    config.distributed[field] = value
    with pytest.raises(ConfigError, match=message):
        initialize(config)
