"""Every JAX process of the test session, the pytest workers and the children they
start (`python -m jaxclip.train`, the evaluate and aot commands, the multi-process
launcher, the fault harness, the notebook's kernel), gets its settings here:

- 8 emulated CPU devices (or as many as a test asks for);
- XLA's backend (LLVM) optimisation level 0, without its expensive passes, and
  XLA:CPU's older loop emitters for fusions instead of its MLIR fusion emitters:
  the tests run tiny models for a few steps, where compiling costs more than running.
  A tiny-vit train step on 8 devices compiles in 1.8 s instead of 5.7 s and runs in
  0.2 s instead of 0.13 s (measured on the 2-core CI machine); Eigen's matmuls run on the calling
  device's thread (8 device threads already share the 2 cores).
  Every process uses the same flags, so results compared across processes (a child's
  run against the test's own, bit for bit) still come from the same machine code;
- one persistent compilation cache for the whole session, so a program compiled by
  one process (a restart, the other pytest worker, a second CLI run) is not compiled
  again. It lives in a temporary directory that the session removes at its end.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Set by the first process of the session (pytest itself); its workers and their
# children inherit it.
CACHE_VARIABLE = "JAXCLIP_TEST_COMPILE_CACHE"

_DEVICE_COUNT = re.compile(r"--xla_force_host_platform_device_count=\S+")
_XLA_FLAGS = [
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
    "--xla_cpu_use_fusion_emitters=false",
    "--xla_cpu_multi_thread_eigen=false",
    # 8 device threads share 2 cores here: a device can reach a collective long after
    # the others, so give the rendezvous more than XLA's 40 s before it aborts.
    "--xla_cpu_collective_call_warn_stuck_timeout_seconds=60",
    "--xla_cpu_collective_call_terminate_timeout_seconds=300",
]


def xla_flags(devices: int | None = 8) -> str:
    """The tests' XLA_FLAGS, with `devices` emulated CPU devices (None: XLA's default,
    one), after any flags the user set (minus their device count)."""
    user = _DEVICE_COUNT.sub("", os.environ.get("JAXCLIP_USER_XLA_FLAGS", "")).split()
    flags = [flag for flag in user if flag not in _XLA_FLAGS] + _XLA_FLAGS
    if devices is not None:
        flags.insert(0, f"--xla_force_host_platform_device_count={devices}")
    return " ".join(flags)


def configure_session() -> str | None:
    """Set this process's environment before JAX starts: the flags above, the CPU
    platform, the shared compilation cache. Returns the cache directory if this call
    created it (the caller removes it at the end), else None."""
    os.environ.setdefault("JAXCLIP_USER_XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = xla_flags()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    created = None
    if CACHE_VARIABLE not in os.environ:
        created = tempfile.mkdtemp(prefix="jaxclip-test-compile-cache-")
        os.environ[CACHE_VARIABLE] = created
    os.environ.update(_cache_settings(os.environ[CACHE_VARIABLE]))
    return created


def remove_cache(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def _cache_settings(directory: str) -> dict[str, str]:
    # Every program, however small or quick to compile: most test programs are both.
    return {
        "JAX_COMPILATION_CACHE_DIR": directory,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    }


def child_env(
    devices: int | None = 8, drop: tuple[str, ...] = (), **extra: str
) -> dict[str, str]:
    """The environment for a child process: this checkout first on the path, the
    session's flags with `devices` devices, the shared cache, unbuffered output;
    `drop` removes variables, `extra` sets more."""
    env = {**os.environ, "PYTHONPATH": REPO, "PYTHONUNBUFFERED": "1"}
    env["XLA_FLAGS"] = xla_flags(devices)
    env.update(_cache_settings(os.environ[CACHE_VARIABLE]))
    for name in drop:
        env.pop(name, None)
    env.update(extra)
    return env


def python_command(*args: str) -> list[str]:
    """`python ARGS` with this interpreter."""
    return [sys.executable, *args]


def run_python(
    *args: str, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`python ARGS` from the repository root, to the end; output captured as text."""
    return subprocess.run(
        python_command(*args),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env() if env is None else env,
    )


def start_python(
    *args: str, stdout, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """`python ARGS` from the repository root, started and left running; stdout and
    stderr both go to `stdout` (a file or subprocess.PIPE)."""
    return subprocess.Popen(
        python_command(*args),
        cwd=REPO,
        env=child_env() if env is None else env,
        stdout=stdout,
        stderr=subprocess.STDOUT,
        text=True,
    )
