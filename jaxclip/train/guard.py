"""The non-finite guard's host side: report skipped updates, stop after too many.

The train step itself skips an update whose loss or gradient is not finite (the
state stays as it was) and counts such steps in the state. Here the loop reads
those counters one step late, so that waiting for them never empties the device's
queue, logs each skipped step, and stops the run after `train.max_nonfinite_steps`
in a row, before anything non-finite can reach a checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


class NonFiniteError(RuntimeError):
    """Training stopped because losses or gradients kept being NaN or infinite."""


@jax.jit
def all_finite(tree: Any) -> jax.Array:
    """True if every leaf of `tree` is free of NaN and inf (a scalar bool array)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


class NonFiniteGuard:
    """Checks the step counters `nonfinite_streak` and `nonfinite_total`."""

    def __init__(self, max_in_a_row: int, log: Callable[[str], None]):
        self.max_in_a_row = max_in_a_row
        self.log = log
        self._pending: tuple[int, dict[str, jax.Array]] | None = None

    def push(self, step: int, metrics: dict[str, jax.Array]) -> None:
        """Remember a dispatched step's metrics, to check on the next `check()`."""
        self._pending = (step, metrics)

    def check(self) -> None:
        """Check the pending step (waits for it); raise NonFiniteError to stop."""
        if self._pending is None:
            return
        step, metrics = self._pending
        self._pending = None
        streak, total = jax.device_get(
            (metrics["nonfinite_streak"], metrics["nonfinite_total"])
        )
        streak, total = int(streak), int(total)
        if streak == 0:  # this step was finite and applied
            return
        self.log(
            f"step {step}: non-finite loss or gradient, update skipped "
            f"({streak} in a row, {total} in all)"
        )
        if streak >= self.max_in_a_row:
            raise NonFiniteError(
                f"stopping at step {step}: {streak} steps in a row had a non-finite "
                f"loss or gradient (train.max_nonfinite_steps={self.max_in_a_row}); "
                "their updates were skipped, so every checkpoint holds finite "
                "parameters. Lower optim.lr, check the data, or raise "
                "train.max_nonfinite_steps"
            )
