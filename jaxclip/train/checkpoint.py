"""Orbax checkpoints: train state, data-iterator state and config, saved together.

Saves are asynchronous (training continues while the arrays are written) and keep the
last `checkpoint.keep` steps. An interrupted save never becomes the "latest" step:
orbax writes to a temporary directory and renames it only once complete.

The state is written as a dict of its fields, without those that are None (the EMA
of a run that keeps none): the layout a run without EMA writes is the one every
earlier version wrote, so old checkpoints and new ones restore alike.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath


class Checkpointer:
    """A thin wrapper over `ocp.CheckpointManager` for jaxclip's three items."""

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_names=("state", "data", "config"),
            options=options,
        )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def save(
        self,
        step: int,
        state: Any,
        data_state: dict,
        config: dict,
        force: bool = False,
    ) -> bool:
        """Start saving (asynchronously); returns whether a save was started."""
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(saved_fields(state)),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(config),
            ),
            force=force,
        )

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restore onto the shardings in `abstract_state` (ShapeDtypeStructs).

        The mesh may differ from the one that saved: orbax reshards on load.
        """
        step = self._step(step)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(saved_fields(abstract_state)),
                data=ocp.args.JsonRestore(),
            ),
        )
        state = restored["state"]
        if dataclasses.is_dataclass(abstract_state):
            state = abstract_state.replace(**state)
        return state, restored["data"]

    def state_fields(self, step: int | None = None) -> set[str]:
        """The names of the state's fields that the checkpoint at `step` (default:
        the latest) holds."""
        # Read from the files: a manager that has not saved yet has no handler for
        # the state to ask (and its steps are directories named by the number).
        state_dir = os.path.join(self.directory, str(self._step(step)), "state")
        metadata = ocp.PyTreeCheckpointHandler().metadata(epath.Path(state_dir))
        return set(metadata.tree.keys())

    def _step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return step

    def wait(self) -> None:
        """Block until any asynchronous save has finished."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release resources."""
        self.manager.wait_until_finished()
        self.manager.close()


def saved_fields(state: Any) -> Any:
    """What is written for `state`: a train state's fields by name, leaving out those
    that are None; any other tree as it is."""
    if not dataclasses.is_dataclass(state):
        return state
    fields = {
        field.name: getattr(state, field.name) for field in dataclasses.fields(state)
    }
    return {name: value for name, value in fields.items() if value is not None}


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) describing a tree of jax.Arrays."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree
    )


class BestCheckpoint:
    """The state with the best value of one evaluation metric, in its own directory.

    `checkpoint.best_metric` names the metric ('zeroshot/top1'), `best_mode` whether
    higher ('max') or lower ('min') is better. The metric's value and step are saved
    with the state (as its data item), so a resumed run knows the best so far, and
    the two can never disagree.
    """

    def __init__(self, directory: str, metric: str, mode: str = "max"):
        self.metric, self.mode = metric, mode
        self.checkpointer = Checkpointer(directory, keep=1, async_save=False)
        self.best: float | None = None
        self.step: int | None = None
        step = self.checkpointer.latest_step()
        if step is not None:
            record = self.checkpointer.manager.restore(
                step, args=ocp.args.Composite(data=ocp.args.JsonRestore())
            )["data"]
            self.best, self.step = record["value"], record["step"]

    @property
    def directory(self) -> str:
        return self.checkpointer.directory

    def is_better(self, value: float) -> bool:
        if self.best is None:
            return True
        return value > self.best if self.mode == "max" else value < self.best

    def update(self, step: int, state: Any, results: dict, config: dict) -> bool:
        """Save `state` if `results` holds a new best value; returns whether it did."""
        value = results.get(self.metric)
        if value is None or math.isnan(value) or not self.is_better(value):
            return False
        record = {"metric": self.metric, "value": float(value), "step": step}
        self.checkpointer.save(step, state, record, config, force=True)
        self.best, self.step = float(value), step
        return True

    def close(self) -> None:
        self.checkpointer.close()
