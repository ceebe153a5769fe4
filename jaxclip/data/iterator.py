"""The resumable training iterator: a grain dataset's batches, and its state.

`DataIterator` yields this process's batches and counts the samples skipped on the
way. Its state goes into the checkpoint as one JSON item (`checkpoint_state` gathers
every process's position into it). grain ships an orbax handler for its iterators
(`grain.checkpoint.CheckpointSave`, one `process_<i>-of-<n>.json` file per process,
as MaxText uses it); this state is kept instead because it also

- refuses a resume that would not continue the same samples, naming what changed:
  other data settings (the `fingerprint`: sources, lengths, weights, seed, batch
  size, shuffle, workers) or another process count (grain's handler only finds no
  file for it);
- carries the skipped-sample counts, so the logged totals survive a resume;
- is one file that a single process can read (tools and tests compare runs by it);
- states a pipeline in global order (the built-in shapes) by its batch count alone:
  the same on any number of processes, so such a run can resume on another count.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import grain
import jax
import numpy as np

from jaxclip.data.dataset import skipped_by_reason
from jaxclip.data.sources import BAD_REASONS

__all__ = ["DataIterator", "checkpoint_state", "describe_skipped", "gather_json"]


def gather_json(payload: Any) -> list[Any]:
    """`payload` of every process, in process order (a collective: all must call)."""
    if jax.process_count() == 1:
        return [payload]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(payload).encode("utf-8"), np.uint8)
    lengths = multihost_utils.process_allgather(np.array([len(data)], np.int64))
    padded = np.zeros(int(np.max(lengths)), np.uint8)
    padded[: len(data)] = data
    rows = multihost_utils.process_allgather(padded)  # [processes, longest]
    return [
        json.loads(bytes(row[: int(n)]).decode("utf-8"))
        for row, n in zip(rows, np.ravel(lengths))
    ]


class DataIterator:
    """This process's batches from a grain pipeline, with a checkpointable state.

    `next()` gives {'images': uint8 [b, H, W, 3], 'tokens': int32 [b, L]} (plus
    'keys' with `with_keys=True`). `get_state()` is this process's position, cheap
    enough to take after every batch; `checkpoint_state` gathers every process's
    into the one JSON item the checkpoint stores, and `set_state` takes either.

    `restart` is given for a pipeline in global order (one endless source, see
    `dataset.py`): `restart(k)` is the pipeline from global batch k. Its state is
    then the batch count alone, the same in every process and for any process count.
    """

    def __init__(
        self,
        dataset: grain.IterDataset,
        source_name: str,
        fingerprint: dict[str, Any],
        process_index: int = 0,
        process_count: int = 1,
        with_keys: bool = False,
        gather: Callable[[Any], list[Any]] = gather_json,
        restart: Callable[[int], grain.IterDataset] | None = None,
    ):
        self.source_name = source_name
        self.fingerprint = _jsonable(fingerprint)
        self.process_index, self.process_count = process_index, process_count
        self.with_keys = with_keys
        self._gather = gather
        self._restart = restart
        self._iterator = dataset.__iter__()
        self._skipped = np.zeros(len(BAD_REASONS), np.int64)
        self._batches = 0

    @property
    def batches(self) -> int:
        """Batches read so far (the index of the next one)."""
        return self._batches

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iterator)
        if self._restart is not None and batch["skipped"].any():
            # Cannot happen with the shapes; it would break the batch-count state.
            raise RuntimeError("a pipeline in global order skipped a sample")
        self._skipped += batch["skipped"]
        self._batches += 1
        result = {"images": batch["images"], "tokens": batch["tokens"]}
        if self.with_keys:
            result["keys"] = batch["keys"]
        return result

    def skipped(self) -> dict[str, int]:
        """Samples this process skipped so far, by reason (non-zero reasons only)."""
        return skipped_by_reason(self._skipped)

    def metrics(self) -> dict[str, int]:
        """Skipped samples over all processes, for the logs: `data/skipped` (total)
        and `data/skipped/<reason>` (a collective in multi-process runs)."""
        totals = np.sum(self._gather(self._skipped.tolist()), axis=0)
        result = {"data/skipped": int(np.sum(totals))}
        result.update(
            {
                f"data/skipped/{reason}": n
                for reason, n in skipped_by_reason(totals).items()
            }
        )
        return result

    def get_state(self) -> dict[str, Any]:
        """This process's position (JSON; no communication between processes)."""
        if self._restart is not None:
            position = {"fingerprint": self.fingerprint, "batches": self._batches}
            return {"source": self.source_name, "global": position}
        return {
            "source": self.source_name,
            "process_index": self.process_index,
            "process_count": self.process_count,
            "position": {
                "fingerprint": self.fingerprint,
                "grain": self._iterator.get_state(),
                "skipped": self._skipped.tolist(),
                "batches": self._batches,
            },
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue exactly where the state was taken; refuse a state that cannot.

        `state` is a checkpoint's (`checkpoint_state`: every process's position, or
        the one global position) or this process's own (`get_state`).
        """
        if state.get("source") != self.source_name:
            raise ValueError(
                f"the checkpoint's data state is for data.source="
                f"{state.get('source')!r}, not {self.source_name!r}"
            )
        own = self._own_position(state)
        self._check_fingerprint(own["fingerprint"])
        if self._restart is not None:
            self.close()
            self._iterator = self._restart(int(own["batches"])).__iter__()
        else:
            self._iterator.set_state(own["grain"])
            self._skipped = np.array(own["skipped"], np.int64)
        self._batches = int(own["batches"])

    def _own_position(self, state: dict[str, Any]) -> dict[str, Any]:
        """This process's position in a state of any of the three forms."""
        if ("global" in state) != (self._restart is not None):
            orders = ["per-process", "global"]
            saved, now = orders[::-1] if "global" in state else orders
            raise ValueError(
                f"the checkpoint's data state is in {saved} order; this pipeline "
                f"reads in {now} order, so it cannot resume the data exactly"
            )
        if "global" in state:
            return state["global"]
        local = "position" in state  # one process's, as get_state gives it
        count = state["process_count"] if local else len(state["processes"])
        if count != self.process_count:
            raise ValueError(
                f"the checkpoint's data state was saved by {count} processes; "
                f"this run has {self.process_count}, so it cannot resume the data "
                "exactly (start a new workdir to change the process count)"
            )
        if local and state["process_index"] != self.process_index:
            raise ValueError(
                f"the data state is process {state['process_index']}'s; this is "
                f"process {self.process_index}"
            )
        return state["position"] if local else state["processes"][self.process_index]

    def _check_fingerprint(self, saved: dict[str, Any]) -> None:
        changed = [
            f"{field}: saved {saved.get(field)!r}, now {value!r}"
            for field, value in self.fingerprint.items()
            if saved.get(field) != value
        ]
        if changed:
            raise ValueError(
                "the data pipeline differs from the one in the checkpoint, so the "
                f"resumed data would not match ({', '.join(changed)})"
            )

    def close(self) -> None:
        """Stop background workers."""
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()


def checkpoint_state(
    state: dict[str, Any], gather: Callable[[Any], list[Any]] = gather_json
) -> dict[str, Any]:
    """The data state to checkpoint: every process's position, from each one's
    `get_state()` (a collective in multi-process runs: all processes call it, as they
    all call the checkpoint save). A global position is the same everywhere and
    passes through."""
    if "global" in state:
        return state
    return {"source": state["source"], "processes": gather(state["position"])}


def describe_skipped(metrics: dict[str, Any]) -> str:
    """'data: 3 samples skipped so far (corrupt_image 2, missing_caption 1)'."""
    prefix = "data/skipped/"
    reasons = ", ".join(
        f"{name[len(prefix) :]} {count}"
        for name, count in metrics.items()
        if name.startswith(prefix)
    )
    return f"data: {metrics.get('data/skipped', 0)} samples skipped so far ({reasons})"


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))
