"""The trainer's command line with faults injected, for tests/test_faults.py.

    python tests/fault_harness.py --config=... --workdir=...   (the trainer's flags)

Environment variables choose the faults:
- `FAULT_STEP_SLEEP=S`: each batch takes S seconds longer, so that a signal sent
  "during training" lands between steps rather than after the run has ended.
- `FAULT_HOLD_SAVE=N`: the asynchronous save of step N stops just before orbax
  commits it (all arrays written, the directory still temporary), prints
  `HOLDING SAVE N` on stdout and waits there, for a kill -9 in mid-save.
"""

from __future__ import annotations

import asyncio
import os
import runpy
import time

from orbax.checkpoint._src.path import atomicity

from jaxclip.data.pipeline import DataIterator


def _slow_batches(seconds: float) -> None:
    original_next = DataIterator.__next__

    def slow_next(self):
        time.sleep(seconds)
        return original_next(self)

    DataIterator.__next__ = slow_next


def _hold_save(step: int) -> None:
    original_finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def held_finalize(self, *args, **kwargs):
        if self._final_path.name == str(step):
            print(f"HOLDING SAVE {step}", flush=True)
            await asyncio.sleep(600)
        return await original_finalize(self, *args, **kwargs)

    atomicity.AtomicRenameTemporaryPath.finalize = held_finalize


if __name__ == "__main__":
    if os.environ.get("FAULT_STEP_SLEEP"):
        _slow_batches(float(os.environ["FAULT_STEP_SLEEP"]))
    if os.environ.get("FAULT_HOLD_SAVE"):
        _hold_save(int(os.environ["FAULT_HOLD_SAVE"]))
    runpy.run_module("jaxclip.train", run_name="__main__", alter_sys=True)
