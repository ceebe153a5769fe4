"""Short training runs on the shapes data, shared by the train-step tests.

A run is computed once per test process: tests that need the same run (the same
config, mesh and number of steps; a shorter run is the start of a longer one) share
it, instead of building and compiling the same tiny model and step again.
"""

from __future__ import annotations

import jax
import numpy as np

from jaxclip import sharding
from jaxclip.data.pipeline import shapes_iterator
from jaxclip.data.tokenizer import VOCAB_SIZE, special_tokens
from jaxclip.models.build import model_from_config
from jaxclip.train.checkpoint import Checkpointer
from jaxclip.train.state import (
    abstract_train_state,
    create_train_state,
    learning_rate_schedule,
    make_optimizer,
)
from jaxclip.train.step import make_train_step

# Adam divides by |gradient|: where a gradient is near eps (1e-6), float32 rounding
# moves that parameter's update by a fraction of a step. 0.5% of lr (1e-3) allows it.
ADAM_ATOL = 5e-6

_RUNS: dict[tuple, tuple[list, list]] = {}


class Crash(Exception):
    """Raised by `run_then_crash`'s input pipeline."""


def run_then_crash(train, monkeypatch, batches: int) -> None:
    """Call `train()` with the trainer's input pipeline raising `Crash` when it is
    asked for batch `batches` + 1 (so after the checkpoint of step `batches`, when
    the run saves every step), as a killed run stops; the pipeline is restored."""
    from jaxclip.data.pipeline import DataIterator

    original_next = DataIterator.__next__

    def crashing_next(self):
        if self.batches == batches:
            raise Crash()
        return original_next(self)

    monkeypatch.setattr(DataIterator, "__next__", crashing_next)
    try:
        train()
    except Crash:
        pass
    else:
        raise AssertionError(f"the run did not ask for batch {batches + 1}")
    finally:
        monkeypatch.setattr(DataIterator, "__next__", original_next)


def _train(config, mesh, num_steps: int) -> tuple[list, list]:
    """(state after each step, metrics of each step), on the host."""
    model = model_from_config(config)
    tx = make_optimizer(config)
    state, shardings = create_train_state(model, tx, mesh, jax.random.key(config.seed))
    step = make_train_step(
        config, model, tx, learning_rate_schedule(config), mesh, shardings
    )
    data = model_batches(model, config.seed, config.train.batch_size)
    states, history = [], []
    with sharding.use_mesh(mesh):
        for _ in range(num_steps):
            batch = sharding.shard_batch(next(data), mesh, config.train.accum_steps)
            state, metrics = step(state, batch)
            states.append(jax.device_get(state))
            history.append(jax.device_get(metrics))
    return states, history


def run_steps(config, mesh, num_steps: int):
    """Train `num_steps` on the shapes data; returns (final state, per-step metrics)."""
    key = (
        config.to_json_best_effort(sort_keys=True),
        tuple(mesh.shape.items()),
        tuple(device.id for device in mesh.devices.flat),
    )
    states, history = _RUNS.get(key, ([], []))
    if len(states) < num_steps:
        states, history = _RUNS[key] = _train(config, mesh, num_steps)
    return states[num_steps - 1], history[:num_steps]


def model_batches(model, seed: int, batch_size: int):
    """The shapes data (`data.source='shapes'`) for `model`: its image size, text
    context and the CLIP BPE sized to its text table."""
    config = model.config
    return shapes_iterator(
        seed,
        batch_size,
        config.vision.image_size,
        config.text.context_length,
        config.text.vocab_size,
    )


def example_tokens(batch: int, length: int, vocab_size: int = VOCAB_SIZE) -> np.ndarray:
    """Token ids [batch, length] of the CLIP BPE with `vocab_size` ids: one short
    caption (start, words, end) in every row, another in row 1; zero-padded."""
    sot, eot = special_tokens(vocab_size)
    tokens = np.zeros((batch, length), np.int32)
    tokens[:, :5] = [sot, 320, 1125, 539, eot]
    tokens[1, 3:6] = [2368, 1929, eot]
    return tokens


def assert_same_run(got, want, metric_names):
    """Two `run_steps` results agree: per-step metrics, then the final parameters."""
    (got_state, got_history), (want_state, want_history) = got, want
    for got_metrics, want_metrics in zip(got_history, want_history):
        for name in metric_names:
            np.testing.assert_allclose(
                got_metrics[name], want_metrics[name], rtol=2e-5, err_msg=name
            )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=ADAM_ATOL),
        got_state.params,
        want_state.params,
    )


def final_state(config, workdir, model=None):
    """The train state (with its EMA) of a run's last checkpoint in `workdir`, on the
    host; `model` defaults to the config's."""
    abstract, _ = abstract_train_state(
        model or model_from_config(config),
        make_optimizer(config),
        sharding.make_mesh(config.mesh.shape),
        ema=True,
    )
    checkpointer = Checkpointer(str(workdir / "checkpoints"))
    try:
        state, _ = checkpointer.restore(abstract)
    finally:
        checkpointer.close()
    return jax.device_get(state)
