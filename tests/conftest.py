"""Tests run on the CPU with 8 emulated devices; this must happen before JAX starts."""

import os

_XLA_FLAGS = [
    "--xla_force_host_platform_device_count=8",
    # XLA:CPU's concurrency-optimised scheduler can let emulated devices enter their
    # collectives in different orders, which deadlocks a sharded step at random
    # (seen with BatchNorm on mesh (4, 2, 1)); the default list scheduler does not.
    "--xla_cpu_enable_concurrency_optimized_scheduler=false",
    # 8 device threads share 2 cores here: give a slow rendezvous time, not an abort.
    "--xla_cpu_collective_call_warn_stuck_timeout_seconds=120",
    "--xla_cpu_collective_call_terminate_timeout_seconds=900",
]
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), *_XLA_FLAGS]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
