"""Tests run on the CPU with 8 emulated devices; this must happen before JAX starts."""

import os

_XLA_FLAGS = [
    "--xla_force_host_platform_device_count=8",
    # 8 device threads share 2 cores here: a device can reach a collective long after
    # the others, so give the rendezvous more than XLA's 40 s before it aborts.
    "--xla_cpu_collective_call_warn_stuck_timeout_seconds=60",
    "--xla_cpu_collective_call_terminate_timeout_seconds=300",
]
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), *_XLA_FLAGS]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
