"""Preemption: a SIGTERM makes every process save at the same step boundary and stop.

TPU maintenance events, SLURM time limits (`--signal=TERM@...`) and Kubernetes
evictions all arrive as SIGTERM, some time before the hard kill. The processes of
a multi-host job receive it at different moments, but they must save the same step
together, so the decision to stop is collective:

- Multi-process runs (`jax.distributed` with its preemption service, on by default)
  use JAX's preemption sync point: the coordination service catches the SIGTERM,
  tells every process, and `reached_preemption_sync_point(step)` turns True on all
  of them at the same step.
- A single process needs no agreement: a SIGTERM handler sets a flag that the loop
  reads at the next step boundary.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import jax
from jax.experimental import multihost_utils


class PreemptionWatcher:
    """`should_stop(step)`, asked by every process after every step, in step order."""

    def __init__(self):
        self.signal_received = False
        self._previous_handler = None
        # jax.distributed.initialize starts the preemption service unless disabled.
        self.uses_sync_point = (
            jax.distributed.is_initialized()
            and jax.config.jax_enable_preemption_service
        )
        if self.uses_sync_point:
            return  # JAX's coordination service catches the signal itself
        if jax.process_count() > 1:
            # Without the service there is nothing to agree on a step with; say so
            # rather than let processes save different steps.
            print(
                "warning: jax.distributed runs without its preemption service "
                "(jax_enable_preemption_service=False): a SIGTERM will not save"
            )
            return
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        del signum, frame
        self.signal_received = True

    def should_stop(self, step: int) -> bool:
        """True once a SIGTERM has arrived (on any process): save `step` and exit."""
        if self.uses_sync_point:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.signal_received

    def close(self) -> None:
        """Put back whatever SIGTERM handler was there before."""
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None
