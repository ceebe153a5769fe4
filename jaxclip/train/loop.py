"""The trainer, top to bottom: `train_and_evaluate` checks the config, builds the mesh
and enters it once, sets up a `Trainer` (model, optimizer, input pipeline, state restored
or fresh, the compiled step, evaluators), runs the loop, and evaluates at the end.

docs/architecture.md shows where each piece lives and how a batch reaches the loss.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxclip import distributed, sharding
from jaxclip.config import validate_config
from jaxclip.convert.checkpoint import run_config
from jaxclip.data.pipeline import (
    checkpoint_state,
    describe_skipped,
    make_train_iterator,
)
from jaxclip.data.tokenizer import TokenizerSpec
from jaxclip.evaluate.evaluators import Evaluator, make_evaluators, run_all
from jaxclip.models.build import (
    count_params,
    model_from_config,
)
from jaxclip.models.clip import CLIP
from jaxclip.models.registry import get_model_config
from jaxclip.train import distill, ema, freeze, mfu
from jaxclip.train.checkpoint import BestCheckpoint, Checkpointer
from jaxclip.train.distill import load_teacher
from jaxclip.train.freeze import Freeze
from jaxclip.train.guard import NonFiniteError, NonFiniteGuard, all_finite
from jaxclip.train.init_from import init_from_weights
from jaxclip.train.metrics import MetricWriter
from jaxclip.train.preemption import PreemptionWatcher
from jaxclip.train.prefetch import DevicePrefetcher
from jaxclip.train.state import (
    TrainState,
    abstract_train_state,
    create_train_state,
    learning_rate_schedule,
    make_optimizer,
)
from jaxclip.train.step import make_train_step, step_batch_spec


def compile_train_step(
    train_step: Callable, state: Any, batch: Any, *constants: Any
) -> tuple[Callable, float]:
    """Compile the step ahead of time for these arguments: (compiled step, seconds).

    The compiled step's `cost_analysis()` gives its FLOPs, and compiling here separates
    compile time from step time. The compiled step keeps the jitted one's shardings
    and donation; it needs no mesh context to run. `constants` (a teacher's
    variables) are the step's arguments after the batch.
    """
    start = time.perf_counter()
    compiled = train_step.lower(state, batch, *constants).compile()
    return compiled, time.perf_counter() - start


def compile_and_report(
    config: ml_collections.ConfigDict,
    train_step: Callable,
    state: Any,
    batch: Any,
    writer: MetricWriter,
    log: Callable[..., None],
    *constants: Any,
) -> Callable:
    """Compile the step, count its FLOPs, and tell the writer (for MFU); returns it,
    as a function of `(state, batch)` (`constants`, as in `compile_train_step`, are
    bound)."""
    compiled, seconds = compile_train_step(train_step, state, batch, *constants)
    devices = jax.device_count()
    analytic = mfu.analytic_flops(
        get_model_config(config.model.name),
        config.train.batch_size,
        config.model.patch_dropout,
    )
    flops, source = mfu.step_flops(compiled, analytic / devices)
    dtype = jnp.dtype(config.model.dtype).name
    peak = mfu.peak_flops(jax.devices()[0], dtype, config.mfu.peak_flops)
    writer.set_step_cost(flops, peak, devices, compile_sec=seconds)
    peak_text = f"{peak / 1e12:.3g} TFLOP/s peak" if peak else "no known peak (MFU off)"
    log(
        f"compiled the train step in {seconds:.1f}s; {flops / 1e12:.3g} TFLOP per "
        f"device per step ({source}; analytic {analytic / devices / 1e12:.3g}); "
        f"{peak_text}"
    )
    if not constants:
        return compiled
    return functools.partial(_with_constants, compiled, constants)


def _with_constants(compiled: Callable, constants: tuple, state: Any, batch: Any):
    return compiled(state, batch, *constants)


def enable_compilation_cache(directory: str) -> None:
    """Keep compiled programs in `directory`, so that a restart skips compiling."""
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str
) -> dict[str, Any]:
    """Train (resuming from the workdir's latest checkpoint if any), then evaluate.

    Returns the last logged metrics, the evaluation results and `preempted`.
    """
    validate_config(config, workdir)  # refuse bad values before anything compiles
    log = distributed.process_log(config)  # process 0 only, unless asked
    if config.train.compile_cache_dir:
        enable_compilation_cache(config.train.compile_cache_dir)
    mesh = sharding.make_mesh(config.mesh.shape)
    log(
        f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.default_backend()} devices"
    )
    with sharding.use_mesh(mesh):
        trainer = Trainer.set_up(config, workdir, mesh, log)
        try:
            metrics, preempted = trainer.train()
            results = trainer.results
            if not preempted:
                results.update(trainer.evaluate_at_end())
        finally:
            trainer.close()
    summary = {k: float(np.asarray(v)) for k, v in metrics.items()}
    return {**summary, **results, "preempted": preempted}


@dataclasses.dataclass
class Trainer:
    """Everything one training run holds, set up by `set_up` and released by `close`."""

    config: ml_collections.ConfigDict
    log: Callable[..., None]
    state: TrainState
    train_step: Callable  # compiled: (state, batch) -> (state, metrics)
    train_iter: DevicePrefetcher
    checkpointer: Checkpointer
    writer: MetricWriter
    evaluators: list[Evaluator]
    best: BestCheckpoint | None
    preemption: PreemptionWatcher
    guard: NonFiniteGuard
    results: dict[str, float] = dataclasses.field(default_factory=dict)

    @functools.cached_property
    def config_json(self) -> dict[str, Any]:
        """The config as saved beside each checkpoint (JSON), made once."""
        return json.loads(self.config.to_json_best_effort())

    @classmethod
    def set_up(
        cls,
        config: ml_collections.ConfigDict,
        workdir: str,
        mesh: jax.sharding.Mesh,
        log: Callable[..., None],
    ) -> Trainer:
        """Model, optimizer, input pipeline, state (restored or fresh), the compiled
        step and the evaluators. Call inside `sharding.use_mesh(mesh)`."""
        model = model_from_config(config)
        tx = make_optimizer(config)
        train_iter = DevicePrefetcher(
            make_train_iterator(
                config,
                model.config.vision.image_size,
                model.config.text.context_length,
                vocab_size=model.config.text.vocab_size,
            ),
            mesh,
            config.train.prefetch,
            config.train.accum_steps,
        )
        checkpointer = Checkpointer(
            os.path.join(workdir, "checkpoints"),
            keep=config.checkpoint.keep,
            async_save=config.checkpoint.async_save,
        )
        state, state_shardings = restore_or_init(
            config, model, tx, mesh, checkpointer, train_iter, log
        )
        log(f"model {config.model.name}: {count_params(state.params):,} parameters")
        locking = Freeze.of(config)
        if not locking.off:
            log(locking.describe(state.params))
        writer = MetricWriter(workdir, config.train.steps)
        teacher = (
            load_teacher(config, model, mesh, log) if distill.enabled(config) else None
        )
        train_step = make_train_step(
            config,
            model,
            tx,
            learning_rate_schedule(config),
            mesh,
            state_shardings,
            teacher,
        )
        batch_spec = step_batch_spec(config, mesh)
        constants = () if teacher is None else (teacher.variables,)
        compiled = compile_and_report(
            config, train_step, state, batch_spec, writer, log, *constants
        )
        best = None
        if config.checkpoint.best_metric:
            best = BestCheckpoint(
                os.path.join(workdir, "best"),
                config.checkpoint.best_metric,
                config.checkpoint.best_mode,
            )
        return cls(
            config=config,
            log=log,
            state=state,
            train_step=compiled,
            train_iter=train_iter,
            checkpointer=checkpointer,
            writer=writer,
            evaluators=evaluators_for(config, model, mesh),
            best=best,
            preemption=PreemptionWatcher(),
            guard=NonFiniteGuard(config.train.max_nonfinite_steps, log),
        )

    def train(self) -> tuple[dict[str, Any], bool]:
        """Run the steps up to `train.steps`, or until preempted; the last state is
        saved either way. Returns (the last logged metrics, whether preempted)."""
        config = self.config
        start_step = int(self.state.step)
        metrics: dict[str, Any] = {}
        for step in range(start_step + 1, config.train.steps + 1):
            self.state, step_metrics = self.train_step(
                self.state, next(self.train_iter)
            )
            # The previous step's counters: waiting for them leaves this step queued.
            self.guard.check()
            self.guard.push(step, step_metrics)
            if step == start_step + 1:
                self.first_step_done(step, step_metrics)
            if step % config.log.every_steps == 0 or step == config.train.steps:
                metrics = self.log_metrics(step, step_metrics)
            if (
                config.checkpoint.every_steps
                and step % config.checkpoint.every_steps == 0
            ):
                self.save()
            due = [e for e in self.evaluators if e.due(step)]
            if due:
                self.results.update(self.evaluate(due))
                self.writer.reset_timer(step)
            if self.preemption.should_stop(step):
                self.guard.check()
                self.save(force=True)
                self.log(
                    f"preempted (SIGTERM): saved step {step} in "
                    f"{self.checkpointer.directory}; run the same command to resume"
                )
                return metrics, True
            if step < config.train.steps:
                self.train_iter.fill()  # copy the next batches while this step runs
        self.guard.check()
        self.save(force=True)
        return metrics, False

    def first_step_done(self, step: int, step_metrics: dict[str, jax.Array]) -> None:
        """Time the first step (it warms up the runtime) and start the rate timer."""
        start = time.perf_counter()
        jax.block_until_ready(step_metrics)
        self.log(f"first step done (waited {time.perf_counter() - start:.1f}s for it)")
        self.writer.reset_timer(step)

    def log_metrics(
        self, step: int, step_metrics: dict[str, jax.Array]
    ) -> dict[str, Any]:
        """Write the step's metrics and the pipeline's skipped-sample counts."""
        metrics = {**jax.device_get(step_metrics), **self.train_iter.metrics()}
        self.writer.write(step, metrics, batch_size=self.config.train.batch_size)
        if metrics.get("data/skipped"):
            self.log(describe_skipped(metrics))
        return metrics

    def evaluate(self, due: list[Evaluator]) -> dict[str, float]:
        """Run `due`, log and write their results, keep the best checkpoint."""
        if not due:
            return {}
        state, step = self.state, int(self.state.step)
        variables = {"params": state.params}
        if state.batch_stats:
            variables["batch_stats"] = state.batch_stats
        # Evaluators with params='ema' read the EMA, with the live BatchNorm statistics.
        ema_variables = None
        if state.ema_params is not None:
            ema_variables = {**variables, "params": state.ema_params}
        results = run_all(due, variables, ema_variables)
        self.writer.write(step, results)
        if self.best is not None and self.best.update(
            step, state, results, self.config_json
        ):
            self.log(
                f"new best {self.best.metric} {self.best.best:.4f} at step {step}: "
                f"{self.best.directory}"
            )
        return results

    def evaluate_at_end(self) -> dict[str, float]:
        """Each evaluator at the end of training, unless it has just run."""
        last = int(self.state.step)
        return self.evaluate([e for e in self.evaluators if e.due_at_end(last)])

    def save(self, force: bool = False) -> None:
        """Checkpoint the state and every process's data position (all processes
        save together); never a state with non-finite parameters."""
        step = int(self.state.step)
        if self.checkpointer.latest_step() == step:
            return
        if not bool(all_finite(self.state.params)):
            # The step guard keeps params finite; never persist a broken state.
            raise NonFiniteError(
                f"step {step}: the parameters are not finite; not saving them "
                f"(the last checkpoint, step {self.checkpointer.latest_step()}, is kept)"
            )
        data_state = checkpoint_state(self.train_iter.get_state())
        self.checkpointer.save(step, self.state, data_state, self.config_json, force)

    def close(self) -> None:
        """Let an in-flight async save finish; stop the pipeline's workers."""
        self.preemption.close()
        if self.best is not None:
            self.best.close()
        self.writer.close()
        self.checkpointer.close()
        self.train_iter.close()


def restore_or_init(
    config: ml_collections.ConfigDict,
    model: CLIP,
    tx: Any,
    mesh: jax.sharding.Mesh,
    checkpointer: Checkpointer,
    train_iter: DevicePrefetcher,
    log: Callable[..., None],
) -> tuple[TrainState, Any]:
    """The state and its shardings: restored from the latest checkpoint (with the
    input pipeline's position); else fresh, with `model.init_from`'s weights or
    initialised from `config.seed`."""
    init_from = config.model.init_from
    with_ema = ema.enabled(config)
    if checkpointer.latest_step() is None:
        if init_from:
            return init_from_weights(config, model, tx, mesh, log)
        return create_train_state(
            model, tx, mesh, jax.random.key(config.seed), ema=with_ema
        )
    freeze.check_resumable(config, run_config(checkpointer.directory))
    abstract, state_shardings = abstract_train_state(model, tx, mesh, ema=with_ema)
    state, data_state = restore_train_state(checkpointer, abstract, log)
    train_iter.set_state(data_state)
    # The workdir's own checkpoint wins: a preempted fine-tuning run continues where it
    # was, not from the weights it started with.
    ignored = (
        f" (model.init_from={init_from!r} ignored: the workdir has a checkpoint)"
        if init_from
        else ""
    )
    log(f"resumed from step {int(state.step)} in {checkpointer.directory}{ignored}")
    return state, state_shardings


def restore_train_state(
    checkpointer: Checkpointer, abstract: TrainState, log: Callable[..., None]
) -> tuple[TrainState, dict]:
    """The latest checkpoint's state and data position, with the EMA the config asks
    for: switched on since the checkpoint was written, it starts from the restored
    params; switched off, the saved one is dropped."""
    saved_ema = "ema_params" in checkpointer.state_fields()
    wanted_ema = abstract.ema_params is not None
    if saved_ema == wanted_ema:
        return checkpointer.restore(abstract)
    if wanted_ema:
        state, data_state = checkpointer.restore(abstract.replace(ema_params=None))
        ema_params = ema.copy_params(state.params, abstract.ema_params)
        log(f"train.ema_decay > 0: the EMA starts from step {int(state.step)}'s params")
        return state.replace(ema_params=ema_params), data_state
    # The saved EMA has the params' shapes and shardings: read, then let go.
    saved = abstract.replace(ema_params=abstract.params)
    state, data_state = checkpointer.restore(saved)
    log("train.ema_decay=0: the checkpoint's EMA of the params is dropped")
    return state.replace(ema_params=None), data_state


def evaluators_for(
    config: ml_collections.ConfigDict, model: CLIP, mesh: jax.sharding.Mesh
) -> list[Evaluator]:
    """The config's evaluators (`config.evals`); their data is read here, once."""
    return make_evaluators(
        config.evals,
        model,
        config.data.mean,
        config.data.std,
        mesh,
        TokenizerSpec.for_model(config.data, model.config.text.vocab_size),
        config.seed,
    )
