"""The trainer, top to bottom: config check, mesh, model and optimizer, input pipeline,
state (restored or fresh), train loop with logging and checkpoints, evaluation."""

from __future__ import annotations

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
from jaxclip.data.pipeline import (
    checkpoint_state,
    describe_skipped,
    make_train_iterator,
)
from jaxclip.data.tokenizer import TokenizerSpec
from jaxclip.evaluate.evaluators import Evaluator, make_evaluators, run_all
from jaxclip.models.clip import CLIP
from jaxclip.models.registry import get_model_config
from jaxclip.train import mfu
from jaxclip.train.checkpoint import BestCheckpoint, Checkpointer
from jaxclip.train.guard import NonFiniteError, NonFiniteGuard, all_finite
from jaxclip.train.metrics import MetricWriter
from jaxclip.train.preemption import PreemptionWatcher
from jaxclip.train.prefetch import DevicePrefetcher
from jaxclip.train.state import (
    abstract_train_state,
    count_params,
    create_train_state,
    learning_rate_schedule,
    make_optimizer,
)
from jaxclip.train.step import example_batch, make_encode_fns, make_train_step


def build_model(config: ml_collections.ConfigDict, platform: str | None = None) -> CLIP:
    """The CLIP model named by `model.name`, with the config's dtype, scan and remat.

    `platform` is where it will run (default: JAX's backend; `jaxclip.aot` says 'tpu').
    """
    return CLIP(
        get_model_config(config.model.name),
        logit_bias=config.loss.name == "siglip",
        dtype=jnp.dtype(config.model.dtype),
        scan=use_scan(config.model.scan, platform),
        remat=config.model.remat,
    )


def use_scan(requested: bool | None, platform: str | None = None) -> bool:
    """Whether layer stacks run as a loop; `None` (the default) picks per platform.

    Automatic choice (docs/performance.md): scanned on GPUs and TPUs (deep models
    compile far faster); unrolled on the CPU, where steps run about 15% faster and even
    ViT-L-14's unrolled train step compiles in well under a minute (36 s against 22 s).

    And unrolled on multi-device CPU whatever was asked:
    XLA:CPU can start a collective inside a while loop (the scanned layers) and one
    outside it in different orders on different devices, which deadlocks a sharded
    step at random. Unrolling gives the same parameters and numbers, so CPU runs with
    several devices unroll, and say so.
    """
    platform = platform or jax.default_backend()
    if requested is None:
        return platform != "cpu"
    if requested and platform == "cpu" and jax.device_count() > 1:
        if jax.process_index() == 0:
            print(
                f"model.scan=True runs unrolled on {jax.device_count()} CPU devices "
                "(XLA:CPU can deadlock on collectives inside loops); same parameters"
            )
        return False
    return requested


def compile_train_step(
    train_step: Callable, state: Any, batch: Any
) -> tuple[Callable, float]:
    """Compile the step ahead of time for these arguments: (compiled step, seconds).

    The compiled step's `cost_analysis()` gives its FLOPs, and compiling here separates
    compile time from step time. The compiled step keeps the jitted one's shardings
    and donation; it needs no mesh context to run.
    """
    start = time.perf_counter()
    compiled = train_step.lower(state, batch).compile()
    return compiled, time.perf_counter() - start


def compile_and_report(
    config: ml_collections.ConfigDict,
    train_step: Callable,
    state: Any,
    batch: Any,
    writer: MetricWriter,
    log: Callable[..., None],
) -> Callable:
    """Compile the step, count its FLOPs, and tell the writer (for MFU); returns it."""
    compiled, seconds = compile_train_step(train_step, state, batch)
    devices = jax.device_count()
    analytic = mfu.analytic_flops(
        get_model_config(config.model.name), config.train.batch_size
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
    return compiled


def enable_compilation_cache(directory: str) -> None:
    """Keep compiled programs in `directory`, so that a restart skips compiling."""
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str
) -> dict[str, Any]:
    """Train (resuming from the workdir's latest checkpoint if any), then evaluate.

    Returns the last logged metrics plus the evaluation results.
    """
    # --- Config: refuse bad values before anything compiles.
    validate_config(config, workdir)
    log = distributed.process_log(config)  # process 0 only, unless asked
    if config.train.compile_cache_dir:
        enable_compilation_cache(config.train.compile_cache_dir)

    # --- Mesh.
    mesh = sharding.make_mesh(config.mesh.shape)
    log(
        f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.default_backend()} devices"
    )

    # --- Model and optimizer.
    model = build_model(config)
    model_config = model.config
    tx = make_optimizer(config)
    schedule = learning_rate_schedule(config)
    batch_spec = example_batch(config)

    # --- Input pipeline.
    # Batches reach the devices one step ahead (`train.prefetch`), overlapping the step.
    train_iter = DevicePrefetcher(
        make_train_iterator(
            config, model_config.vision.image_size, model_config.text.context_length
        ),
        mesh,
        config.train.prefetch,
        config.train.accum_steps,
    )

    # --- State: restored from the latest checkpoint, or freshly initialised.
    checkpointer = Checkpointer(
        os.path.join(workdir, "checkpoints"),
        keep=config.checkpoint.keep,
        async_save=config.checkpoint.async_save,
    )
    if checkpointer.latest_step() is not None:
        abstract, state_shardings = abstract_train_state(model, tx, mesh, batch_spec)
        state, data_state = checkpointer.restore(abstract)
        train_iter.set_state(data_state)
        log(f"resumed from step {int(state.step)} in {checkpointer.directory}")
    else:
        rng = jax.random.key(config.seed)
        state, state_shardings = create_train_state(model, tx, mesh, rng, batch_spec)
    log(f"model {config.model.name}: {count_params(state.params):,} parameters")

    train_step = make_train_step(config, model, tx, schedule, mesh, state_shardings)
    config_json = json.loads(config.to_json_best_effort())
    writer = MetricWriter(workdir, config.train.steps)

    # --- Evaluators (`config.evals`): their data is read once, here.
    evaluators = make_evaluators(
        config.evals,
        make_encode_fns(config, model, mesh),
        mesh,
        model_config.vision.image_size,
        model_config.text.context_length,
        TokenizerSpec(config.data.tokenizer, config.data.tokenizer_model),
        config.seed,
    )
    best = None
    if config.checkpoint.best_metric:
        best = BestCheckpoint(
            os.path.join(workdir, "best"),
            config.checkpoint.best_metric,
            config.checkpoint.best_mode,
        )

    def evaluate(state: Any, due: list[Evaluator]) -> dict[str, float]:
        """Run `due`, log and write their results, keep the best checkpoint."""
        if not due:
            return {}
        step = int(state.step)
        variables = {"params": state.params}
        if state.batch_stats:
            variables["batch_stats"] = state.batch_stats
        results = run_all(due, variables)
        writer.write(step, results)
        if best is not None and best.update(step, state, results, config_json):
            log(
                f"new best {best.metric} {best.best:.4f} at step {step}: {best.directory}"
            )
        return results

    def save(state: Any, force: bool = False) -> None:
        step = int(state.step)
        if checkpointer.latest_step() != step:
            if not bool(all_finite(state.params)):
                # The step guard keeps params finite; never persist a broken state.
                raise NonFiniteError(
                    f"step {step}: the parameters are not finite; not saving them "
                    f"(the last checkpoint, step {checkpointer.latest_step()}, is kept)"
                )
            # Every process's data position, gathered (all processes save together).
            data_state = checkpoint_state(train_iter.get_state())
            checkpointer.save(step, state, data_state, config_json, force)

    # --- Train loop. `finally` lets an in-flight async save finish on any exit.
    preemption = PreemptionWatcher()
    guard = NonFiniteGuard(config.train.max_nonfinite_steps, log)
    try:
        start_step = int(state.step)
        metrics: dict[str, Any] = {}
        results: dict[str, float] = {}
        compile_start = time.perf_counter()
        preempted = False
        for step in range(start_step + 1, config.train.steps + 1):
            batch = next(train_iter)
            if step == start_step + 1:
                train_step = compile_and_report(
                    config, train_step, state, batch, writer, log
                )
            state, step_metrics = train_step(state, batch)
            # The previous step's counters: waiting for them leaves this step queued.
            guard.check()
            guard.push(step, step_metrics)
            if step == start_step + 1:
                jax.block_until_ready(step_metrics)
                seconds = time.perf_counter() - compile_start
                log(f"first step (compile + run) took {seconds:.1f}s")
                writer.reset_timer(step)
            if step % config.log.every_steps == 0 or step == config.train.steps:
                # Skipped bad samples (data/skipped...) join the step's metrics.
                metrics = {**jax.device_get(step_metrics), **train_iter.metrics()}
                writer.write(step, metrics, batch_size=config.train.batch_size)
                if metrics.get("data/skipped"):
                    log(describe_skipped(metrics))
            if (
                config.checkpoint.every_steps
                and step % config.checkpoint.every_steps == 0
            ):
                save(state)
            due = [evaluator for evaluator in evaluators if evaluator.due(step)]
            if due:
                results.update(evaluate(state, due))
                writer.reset_timer(step)
            if preemption.should_stop(step):
                guard.check()
                save(state, force=True)
                preempted = True
                log(
                    f"preempted (SIGTERM): saved step {step} in "
                    f"{checkpointer.directory}; run the same command to resume"
                )
                break
            if step < config.train.steps:
                train_iter.fill()  # copy the next batches while this step runs
        guard.check()
        save(state, force=True)

        # --- Evaluation at the end (each evaluator unless it just ran).
        if not preempted:
            last = int(state.step)
            due = [evaluator for evaluator in evaluators if evaluator.due_at_end(last)]
            results.update(evaluate(state, due))
    finally:
        preemption.close()
        if best is not None:
            best.close()
        writer.close()
        checkpointer.close()
        train_iter.close()  # stops the pipeline's worker processes
    summary = {k: float(np.asarray(v)) for k, v in metrics.items()}
    return {**summary, **results, "preempted": preempted}
