"""Run a multi-process job on this machine: N processes, each with M CPU devices.

    python launch/local.py --processes=2 --devices-per-process=4 -- \\
        python -m jaxclip.train --config=configs/demo.py --workdir=/tmp/demo-2x4

Each process gets `JAX_PLATFORMS=cpu`, `--xla_force_host_platform_device_count=M` and
the `JAXCLIP_COORDINATOR` / `JAXCLIP_NUM_PROCESSES` / `JAXCLIP_PROCESS_ID` variables
that `jaxclip.distributed.initialize` reads; process 0 runs the coordinator on a free
loopback port. Process 0's output is streamed here (and kept in the log directory with
the others'). SIGTERM and SIGINT are passed on to every process; if one fails, or
`--timeout` passes, the rest are stopped. The exit code is the first non-zero one.

Importable: `run(command, processes, devices_per_process, ...)` returns that code.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from typing import IO

TIMEOUT_EXIT_CODE = 124  # as timeout(1)
_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S*")


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def process_env(
    base: Mapping[str, str],
    process_id: int,
    processes: int,
    devices_per_process: int,
    coordinator: str,
) -> dict[str, str]:
    """The environment of one process: CPU devices, and where it stands in the job."""
    env = dict(base)
    # Our device count replaces any inherited one (pytest's conftest sets 8).
    flags = _DEVICE_COUNT_FLAG.sub("", env.get("XLA_FLAGS", "")).split()
    flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"  # lines reach the log as they are printed
    if processes > 1:
        env["JAXCLIP_COORDINATOR"] = coordinator
        env["JAXCLIP_NUM_PROCESSES"] = str(processes)
        env["JAXCLIP_PROCESS_ID"] = str(process_id)
    else:  # one process: no distributed runtime at all
        for name in (
            "JAXCLIP_COORDINATOR",
            "JAXCLIP_NUM_PROCESSES",
            "JAXCLIP_PROCESS_ID",
        ):
            env.pop(name, None)
    return env


def run(
    command: Sequence[str],
    processes: int,
    devices_per_process: int = 1,
    *,
    log_dir: str | None = None,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    output: IO[str] | None = None,
    grace: float = 30.0,
) -> int:
    """Run `command` as `processes` processes; returns the first non-zero exit code.

    Process i writes to `log_dir/process_i.log` (a new temporary directory if None,
    printed); process 0's lines are also copied to `output` (default: stdout). After a
    failure or the timeout, the other processes get SIGTERM, then SIGKILL after
    `grace` seconds. Stopped by the timeout: exit code 124.
    """
    if processes < 1 or devices_per_process < 1:
        raise ValueError("processes and devices_per_process must be >= 1")
    if not command:
        raise ValueError("no command to run")
    output = sys.stdout if output is None else output
    log_dir = log_dir or tempfile.mkdtemp(prefix="jaxclip-local-")
    os.makedirs(log_dir, exist_ok=True)
    coordinator = f"127.0.0.1:{free_port()}"
    base_env = os.environ if env is None else env
    print(
        f"launch: {processes} processes x {devices_per_process} CPU devices, "
        f"coordinator {coordinator}, logs in {log_dir}",
        file=output,
        flush=True,
    )
    children: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    forwarded: list[int] = []

    def forward(signum: int, frame: object) -> None:
        forwarded.append(signum)
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)  # the trainer saves, then exits

    previous = _install_handlers(forward)
    try:
        for process_id in range(processes):
            log_path = os.path.join(log_dir, f"process_{process_id}.log")
            log_file = open(log_path, "w", encoding="utf-8")  # noqa: SIM115
            child = subprocess.Popen(
                list(command),
                env=process_env(
                    base_env, process_id, processes, devices_per_process, coordinator
                ),
                stdout=subprocess.PIPE if process_id == 0 else log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=process_id == 0,
                # Its own process group: a terminal's Ctrl-C reaches only this
                # launcher, which forwards it, and a kill takes grain's workers too.
                start_new_session=True,
            )
            children.append(child)
            if process_id == 0:
                pump = threading.Thread(
                    target=_tee, args=(child.stdout, log_file, output), daemon=True
                )
                pump.start()
                pumps.append(pump)
            else:
                log_file.close()
        code = _wait(children, timeout, grace, output)
        if code == 0 and forwarded:
            name = signal.Signals(forwarded[0]).name
            print(f"launch: stopped by {name}; all processes exited 0", file=output)
        return code
    finally:
        _kill_all(children, grace=0)
        for pump in pumps:
            pump.join(timeout=5)
        _restore_handlers(previous)


def _wait(
    children: list[subprocess.Popen], timeout: float | None, grace: float, output: IO
) -> int:
    """Wait for every child; on a failure or the timeout, stop the others."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        codes = [child.poll() for child in children]
        failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            process_id, code = failed[0]
            code = _shell_code(code)
            running = [i for i, c in enumerate(codes) if c is None]
            if running:
                print(
                    f"launch: process {process_id} exited with {code}; stopping "
                    f"processes {running}",
                    file=output,
                    flush=True,
                )
                _kill_all(children, grace)
            return code
        if all(code == 0 for code in codes):
            return 0
        if deadline is not None and time.monotonic() > deadline:
            print(
                f"launch: timed out after {timeout:g}s; stopping all processes",
                file=output,
                flush=True,
            )
            _kill_all(children, grace)
            return TIMEOUT_EXIT_CODE
        time.sleep(0.1)


def _kill_all(children: list[subprocess.Popen], grace: float) -> None:
    """SIGTERM to each running child's process group, SIGKILL after `grace` s."""
    running = [child for child in children if child.poll() is None]
    if running and grace > 0:
        _signal_groups(running, signal.SIGTERM)
        _wait_for(running, grace)
    running = [child for child in running if child.poll() is None]
    if running:
        _signal_groups(running, signal.SIGKILL)
        _wait_for(running, 5.0)


def _signal_groups(children: list[subprocess.Popen], sig: int) -> None:
    for child in children:
        # The group is the child's own (a new session): grain's workers go too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, sig)


def _wait_for(children: list[subprocess.Popen], seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end and any(c.poll() is None for c in children):
        time.sleep(0.05)


def _tee(stream: IO[str], log_file: IO[str], output: IO[str]) -> None:
    """Copy process 0's lines to its log file and to `output`."""
    with log_file:
        for line in stream:
            log_file.write(line)
            log_file.flush()
            output.write(line)
            output.flush()


def _shell_code(returncode: int) -> int:
    """A signal death (-N from Popen) as the shell reports it: 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def _install_handlers(handler) -> dict[int, object]:
    if threading.current_thread() is not threading.main_thread():
        return {}  # only the main thread may set handlers; signals go by default
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, handler)
    return previous


def _restore_handlers(previous: dict[int, object]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def main(argv: Sequence[str]) -> int:
    """The command line (see the module docstring)."""
    argv = list(argv)
    if "--" not in argv:
        print(
            "usage: launch/local.py --processes=N [--devices-per-process=M] "
            "[--timeout=S] [--log-dir=DIR] -- COMMAND...",
            file=sys.stderr,
        )
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser(
        prog="launch/local.py",
        description="N processes with M CPU devices each, on this machine.",
    )
    parser.add_argument("--processes", type=int, required=True)
    parser.add_argument("--devices-per-process", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=None, help="seconds")
    parser.add_argument("--log-dir", default=None, help="default: a new temp dir")
    parser.add_argument(
        "--grace", type=float, default=30.0, help="seconds from SIGTERM to SIGKILL"
    )
    args = parser.parse_args(argv[:split])
    command = argv[split + 1 :]
    if not command:
        parser.error("no command after --")
    return run(
        command,
        args.processes,
        args.devices_per_process,
        log_dir=args.log_dir,
        timeout=args.timeout,
        grace=args.grace,
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
