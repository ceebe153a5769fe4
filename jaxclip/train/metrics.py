"""Metric writers: console progress lines, TensorBoard event files and metrics.jsonl.

Only process 0 writes (multi-host runs would otherwise write every line N times).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import jax
import numpy as np


def _to_python(value: Any) -> Any:
    """Host scalars at full precision: float64 floats, ints stay ints."""
    array = np.asarray(value)
    if array.ndim == 0:
        return array.item()
    return array.tolist()


class MetricWriter:
    """Writes each logged step to the console, TensorBoard and `metrics.jsonl`."""

    def __init__(self, workdir: str, total_steps: int, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.total_steps = total_steps
        self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        self._last_time: float | None = None
        self._last_step: int | None = None
        # Set once the step is compiled (`set_step_cost`): FLOPs per device per step,
        # the device's peak FLOP/s (None: unknown), the device count, and one-off
        # scalars (the compile time) for the next record.
        self._flops_per_device: float = 0.0
        self._peak_flops: float | None = None
        self._num_devices = 1
        self._pending: dict[str, Any] = {}
        if self.enabled:
            self._tb = _summary_writer(os.path.join(workdir, "tensorboard"))
            # Held open for the writer's lifetime; closed in close().
            self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")  # noqa: SIM115

    def write(self, step: int, metrics: dict[str, Any], batch_size: int = 0) -> None:
        """Log one step. `batch_size` turns the time between calls into samples/s."""
        if not self.enabled:
            return
        scalars = {name: _to_python(value) for name, value in metrics.items()}
        now = time.perf_counter()
        if self._last_time is not None and batch_size and step > self._last_step:
            seconds_per_step = (now - self._last_time) / (step - self._last_step)
            scalars["samples_per_sec"] = batch_size / seconds_per_step
            scalars["samples_per_sec_per_device"] = (
                scalars["samples_per_sec"] / self._num_devices
            )
            if self._flops_per_device:
                achieved = self._flops_per_device / seconds_per_step
                scalars["tflops_per_sec_per_device"] = achieved / 1e12
                if self._peak_flops:
                    scalars["mfu"] = achieved / self._peak_flops
            scalars["eta_sec"] = seconds_per_step * max(self.total_steps - step, 0)
        self._last_time, self._last_step = now, step
        if "loss" in scalars:
            scalars.update(self._pending)
            self._pending = {}
        record = {"step": step, **scalars}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for name, value in scalars.items():
            if isinstance(value, (int, float)):
                self._tb.add_scalar(name, value, step)
        self._tb.flush()
        print(format_line(step, self.total_steps, scalars), flush=True, file=sys.stdout)

    def set_step_cost(
        self,
        flops_per_device: float,
        peak_flops: float | None,
        num_devices: int,
        compile_sec: float | None = None,
    ) -> None:
        """What MFU needs: FLOPs per device per step and the device's peak FLOP/s.

        `compile_sec` joins the next logged training record."""
        self._flops_per_device = flops_per_device
        self._peak_flops = peak_flops
        self._num_devices = num_devices
        if compile_sec is not None:
            self._pending["compile_sec"] = compile_sec

    def reset_timer(self, step: int) -> None:
        """Restart the throughput clock at `step`, after a pause (compiling, evaluating)
        that should not count against samples/s."""
        self._last_time, self._last_step = time.perf_counter(), step

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def _summary_writer(directory: str) -> Any:
    """tensorboardX's SummaryWriter, imported late (only process 0 writes) and
    without PyTorch: tensorboardX imports torch, when installed, only to accept its
    tensors (5 s of start-up, measured); the writer gets Python floats."""
    hidden = "torch" not in sys.modules
    if hidden:
        sys.modules["torch"] = None  # `import torch` raises ImportError meanwhile
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hidden:
            del sys.modules["torch"]
    return SummaryWriter(directory)


# The train step's scalars a progress line shows, where the step logs them.
CONSOLE_SCALARS = (
    "loss",
    "caption_loss",
    "token_acc",
    "distill_loss",
    "i2t_acc",
    "t2i_acc",
    "logit_scale",
    "lr",
)


def format_line(step: int, total_steps: int, scalars: dict[str, Any]) -> str:
    """One human-readable progress line."""
    parts = [f"step {step}/{total_steps}"]
    for name in CONSOLE_SCALARS:
        if name in scalars:
            parts.append(f"{name} {scalars[name]:.4g}")
    if "samples_per_sec" in scalars:
        parts.append(f"{scalars['samples_per_sec']:.1f} samples/s")
        if "mfu" in scalars:
            parts.append(f"MFU {scalars['mfu']:.1%}")
        parts.append(f"ETA {_format_seconds(scalars['eta_sec'])}")
    # Evaluation results: "<evaluator>/<metric>" (not the data pipeline's counts).
    extra = [
        k
        for k in scalars
        if "/" in k and not k.startswith("data/") and not k.endswith("/seconds")
    ]
    parts += [f"{k} {scalars[k]:.4f}" for k in extra]
    return " | ".join(parts)


def _format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"
