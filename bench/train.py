"""Training throughput of jaxclip, side by side with OpenCLIP (PyTorch, fp32, eager).

    python bench/train.py                                  # all workloads, both sides
    python bench/train.py --workloads=S16-128 --openclip=0 # jaxclip only
    python bench/train.py --json=/tmp/bench_train.json

Each workload runs full training steps (forward, CLIP loss, backward, global-norm
clipping at 1.0, AdamW) on a fresh random batch per step (a repeated batch gets
memorised). Both sides run in this one process. After a warm-up the two sides take
turns: a round of jaxclip steps, then a round of OpenCLIP steps, so that a change in
machine load hits both alike; the ratio is of the medians. Never part of the tests.

OpenCLIP is optional and stays out of jaxclip's dependencies. Its package `__init__`
imports its image transforms, hence torchvision; this bench loads only OpenCLIP's
model and loss modules, and where torchvision is missing (or fails to import) it stubs
the one name they take from it (`FrozenBatchNorm2d`, used only to freeze layers).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.machinery
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import types
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxclip import sharding  # noqa: E402
from jaxclip.config import base_config  # noqa: E402
from jaxclip.models.build import create_model  # noqa: E402
from jaxclip.models.registry import (  # noqa: E402
    ModelConfig,
    TextConfig,
    VisionConfig,
    get_model_config,
)
from jaxclip.train import mfu  # noqa: E402
from jaxclip.train.loop import compile_train_step  # noqa: E402
from jaxclip.train.state import (  # noqa: E402
    create_train_state,
    learning_rate_schedule,
    make_optimizer,
)
from jaxclip.train.step import make_train_step  # noqa: E402

EOT = 49407
_STUBBED = ("torchvision", "torchvision.ops", "torchvision.ops.misc", "transformers")


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    model: ModelConfig
    batch_size: int


def workloads() -> dict[str, Workload]:
    """The issue's three CPU workloads."""
    s16 = ModelConfig(
        256,
        VisionConfig(128, 6, 384, patch_size=16),
        TextConfig(context_length=77, width=256, heads=4, layers=6),
    )
    return {
        "ViT-B-32": Workload("ViT-B-32", get_model_config("ViT-B-32"), 32),
        "RN50": Workload("RN50", get_model_config("RN50"), 16),
        "S16-128": Workload("S16-128", s16, 64),
        # Not timed by default: compile time against step time, scan vs unrolled.
        "ViT-L-14": Workload("ViT-L-14", get_model_config("ViT-L-14"), 8),
        # bench/gpu.sh: the batch is searched for (--batch=-1), 256 is a placeholder.
        "ViT-B-16": Workload("ViT-B-16", get_model_config("ViT-B-16"), 256),
    }


def random_batch(rng: np.random.Generator, workload: Workload) -> dict[str, np.ndarray]:
    """uint8 images and token rows [SOT, words..., EOT, 0...] of random lengths."""
    size = workload.model.vision.image_size
    length = workload.model.text.context_length
    batch = workload.batch_size
    images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    tokens = rng.integers(1, 49406, (batch, length), dtype=np.int32)
    ends = rng.integers(4, length, batch)
    tokens[:, 0] = 49406
    tokens[np.arange(batch), ends] = EOT
    tokens[np.arange(length)[None, :] > ends[:, None]] = 0
    return {"images": images, "tokens": tokens}


# --- jaxclip


def cpu_settings() -> argparse.Namespace:
    """What `jaxclip_runner` reads, as this bench times the CPU workloads: float32,
    unrolled layers, no remat, the dense loss (bench/step_profile.py, bench/bound.py)."""
    return argparse.Namespace(
        dtype="float32", scan=False, remat="none", loss_impl="dense"
    )


def jaxclip_runner(
    workload: Workload,
    args: argparse.Namespace,
    compile_only: bool = False,
    patch_dropout: float = 0.0,
    freeze: tuple[str, ...] = (),
    unlock_last: int = 0,
) -> dict[str, Any]:
    """A `step(batch)` that runs one jaxclip training step and waits for it
    (`patch_dropout`: `model.patch_dropout`, bench/patch_dropout.py; `freeze`,
    `unlock_last`: `train.freeze`, `train.unlock_last`, bench/freeze.py)."""
    config = base_config()
    config.model.dtype = args.dtype
    config.model.patch_dropout = patch_dropout
    config.train.freeze = freeze
    config.train.unlock_last = unlock_last
    config.train.batch_size = workload.batch_size
    config.loss.impl = args.loss_impl
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    model = create_model(
        workload.model,
        dtype=args.dtype,
        scan=args.scan,
        remat=args.remat,
        patch_dropout=patch_dropout,
    )
    tx = make_optimizer(config)
    state, shardings = create_train_state(model, tx, mesh, jax.random.key(0))
    train_step = make_train_step(
        config, model, tx, learning_rate_schedule(config), mesh, shardings
    )
    first = sharding.shard_batch(random_batch(np.random.default_rng(1), workload), mesh)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        (state, first),
    )
    with sharding.use_mesh(mesh):
        compiled, compile_seconds = compile_train_step(train_step, state, first)
    if compile_only:
        return {"compiled": compiled, "compile_s": compile_seconds, "state": state}
    analytic = mfu.analytic_flops(workload.model, workload.batch_size, patch_dropout)
    flops, flops_source = mfu.step_flops(compiled, analytic)
    holder = {"state": state}

    def step(batch: dict[str, np.ndarray]) -> None:
        device_batch = sharding.shard_batch(batch, mesh)
        holder["state"], metrics = compiled(holder["state"], device_batch)
        jax.block_until_ready(metrics["loss"])

    return {
        "step": step,
        "compiled": compiled,
        "jaxpr": lambda: trace_in_mesh(train_step, mesh, abstract),  # bench/bound.py
        "compile_s": compile_seconds,
        "flops_per_step": flops,
        "flops_source": flops_source,
        "flops_per_step_analytic": analytic,
    }


def trace_in_mesh(train_step: Callable, mesh: Any, abstract: Any) -> Any:
    """The step's jaxpr, traced with the mesh and logical rules in context."""
    with sharding.use_mesh(mesh):
        return train_step.trace(*abstract).jaxpr


# --- OpenCLIP


def largest_batch(workload: Workload, args: argparse.Namespace) -> int:
    """The largest batch (a multiple of 32) whose train step fits in device memory.

    Compiles the step at batch 32 and reads XLA's memory analysis: parameters and
    optimizer state are fixed, activations grow with the batch. Leaves 10% headroom.
    """
    probe = dataclasses.replace(workload, batch_size=32)
    runner = jaxclip_runner(probe, args, compile_only=True)
    memory = runner["compiled"].memory_analysis()
    fixed = memory.argument_size_in_bytes
    per_sample = max(memory.temp_size_in_bytes / probe.batch_size, 1)
    stats = jax.devices()[0].memory_stats() or {}
    capacity = stats.get("bytes_limit", 0)
    if not capacity:
        raise SystemExit("--batch=-1 needs a device that reports memory_stats()")
    batch = int((0.9 * capacity - fixed) / per_sample) // 32 * 32
    print(
        f"{workload.name}: {fixed / 2**30:.1f} GiB params+optimizer, "
        f"{per_sample / 2**20:.0f} MiB per sample, {capacity / 2**30:.0f} GiB device "
        f"-> batch {batch}",
        flush=True,
    )
    return max(batch, 32)


def load_openclip() -> types.SimpleNamespace | None:
    """OpenCLIP's `model` and `loss` modules without its package `__init__`; None if
    `open_clip_torch` is not installed."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    import torch

    saved = {name: sys.modules.get(name) for name in _STUBBED}
    try:
        importlib.import_module("torchvision.ops.misc")
        stubbed = ()
    except Exception:  # missing, or built for another torch: stub the one name used
        stubbed = ("torchvision", "torchvision.ops", "torchvision.ops.misc")
        for name in stubbed:
            sys.modules[name] = types.ModuleType(name)
            sys.modules[name].__spec__ = importlib.machinery.ModuleSpec(name, None)
        sys.modules["torchvision.ops.misc"].FrozenBatchNorm2d = torch.nn.BatchNorm2d
    # OpenCLIP's optional Hugging Face text towers are not benchmarked: hide
    # `transformers`, which would probe torchvision on import.
    sys.modules["transformers"] = None  # type: ignore[assignment]
    try:
        package = types.ModuleType("open_clip")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules.setdefault("open_clip", package)
        model = importlib.import_module("open_clip.model")
        loss = importlib.import_module("open_clip.loss")
    finally:  # the stubs only live while OpenCLIP's modules import
        for name in (*stubbed, "transformers"):
            if saved.get(name) is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = saved[name]
    return types.SimpleNamespace(model=model, loss=loss)


def openclip_runner(
    workload: Workload, open_clip: types.SimpleNamespace, precision: str = "fp32"
) -> dict:
    """The same training step in OpenCLIP: eager, AdamW, clipping at 1.0; `precision`
    fp32, or amp_bf16 (autocast, as OpenCLIP's `--precision amp_bf16` trains)."""
    import contextlib

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"

    cfg = workload.model
    vision = cfg.vision
    vision_cfg = {
        "image_size": vision.image_size,
        "layers": vision.layers,
        "width": vision.width,
        "patch_size": vision.patch_size,
        "head_width": vision.head_width,
        "mlp_ratio": vision.mlp_ratio,
    }
    text_cfg = {
        "context_length": cfg.text.context_length,
        "vocab_size": cfg.text.vocab_size,
        "width": cfg.text.width,
        "heads": cfg.text.heads,
        "layers": cfg.text.layers,
    }
    torch.manual_seed(0)
    model = open_clip.model.CLIP(cfg.embed_dim, vision_cfg, text_cfg).to(device)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    rest = [
        p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)
    ]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.2}, {"params": rest, "weight_decay": 0.0}],
        lr=5e-4,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    loss_fn = open_clip.loss.ClipLoss()
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], device=device)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711], device=device)
    mean, std = mean.view(1, 3, 1, 1), std.view(1, 3, 1, 1)

    def autocast():
        if precision == "amp_bf16":
            return torch.autocast(device, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(batch: dict[str, np.ndarray]) -> None:
        images = torch.from_numpy(batch["images"]).to(device).permute(0, 3, 1, 2)
        images = (images.float() / 255.0 - mean) / std
        tokens = torch.from_numpy(batch["tokens"]).to(device).long()
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            image_features = model.encode_image(images, normalize=True)
            text_features = model.encode_text(tokens, normalize=True)
            loss = loss_fn(image_features, text_features, model.logit_scale.exp())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)
        if device == "cuda":
            torch.cuda.synchronize()

    return {"step": step}


# --- Timing


def time_steps(
    step: Callable, batches: list[dict[str, np.ndarray]]
) -> list[float]:  # seconds per step
    times = []
    for batch in batches:
        start = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - start)
    return times


def summarise(times: list[float], batch_size: int) -> dict[str, float]:
    median = statistics.median(times)
    return {
        "steps": len(times),
        "median_s": median,
        "min_s": min(times),
        "max_s": max(times),
        "samples_per_s": batch_size / median,
        "samples_per_s_min": batch_size / max(times),
        "samples_per_s_max": batch_size / min(times),
    }


def matmul_rate(seconds: float = 1.0) -> float:
    """FLOP/s of a 2048^2 float32 matmul through XLA now: the CPU's practical peak.

    The bench takes it once per timing round and keeps the best, so that a busy
    machine does not lower the peak (and inflate MFU)."""
    n = 2048
    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        matmul(a).block_until_ready()
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start)


def bench_workload(
    workload: Workload, args: argparse.Namespace, open_clip: Any, peak: float | None
) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    sides = {"jaxclip": jaxclip_runner(workload, args)} if args.jaxclip else {}
    if open_clip is not None:
        try:
            sides["openclip"] = openclip_runner(
                workload, open_clip, args.openclip_precision
            )
        except RuntimeError as error:  # e.g. CUDA out of memory at this batch
            print(f"{workload.name}: OpenCLIP did not run: {error}", flush=True)
    for name, side in list(sides.items()):  # warm-up: JAX's first steps run slow
        batches = [random_batch(rng, workload) for _ in range(args.warmup)]
        try:
            time_steps(side["step"], batches)
        except RuntimeError as error:  # OpenCLIP out of memory at this batch
            if name == "jaxclip":
                raise
            print(f"{workload.name}: {name} did not run: {error}", flush=True)
            del sides[name]
    times: dict[str, list[float]] = {name: [] for name in sides}
    measured_peak = 0.0
    for _ in range(args.rounds):
        if peak is None:
            measured_peak = max(measured_peak, matmul_rate())
        for name, side in sides.items():
            batches = [random_batch(rng, workload) for _ in range(args.steps)]
            times[name] += time_steps(side["step"], batches)
    result: dict[str, Any] = {"batch_size": workload.batch_size}
    if peak is None:
        peak = measured_peak
        result["measured_peak_tflops"] = measured_peak / 1e12
    analytic = mfu.analytic_flops(workload.model, workload.batch_size)
    for name, side in sides.items():
        result[name] = summary = summarise(times[name], workload.batch_size)
        summary["flops_per_step_analytic"] = analytic
        summary["tflops_per_s"] = analytic / summary["median_s"] / 1e12
        summary["mfu"] = mfu.mfu(analytic, summary["median_s"], peak)
        for key in ("compile_s", "flops_per_step", "flops_source"):
            if key in side:
                summary[key] = side[key]
    if "jaxclip" in result and "openclip" in result:
        result["ratio"] = (
            result["jaxclip"]["samples_per_s"] / result["openclip"]["samples_per_s"]
        )
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="ViT-B-32,RN50,S16-128")
    parser.add_argument(
        "--batch", type=int, default=0, help="override batch sizes (-1: largest fit)"
    )
    parser.add_argument("--loss_impl", default="dense", choices=["dense", "ring"])
    parser.add_argument(
        "--openclip_precision", default="fp32", choices=["fp32", "amp_bf16"]
    )
    parser.add_argument("--openclip", type=int, default=1, help="0: jaxclip only")
    parser.add_argument("--jaxclip", type=int, default=1, help="0: OpenCLIP only")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--scan", type=int, default=0, help="1: lax.scan over layers")
    parser.add_argument("--remat", default="none")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per side")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads (0: cores)"
    )
    parser.add_argument("--peak_tflops", type=float, default=0.0, help="MFU peak")
    parser.add_argument("--json", default="", help="write the results here")
    args = parser.parse_args(argv)
    args.scan = bool(args.scan)

    open_clip = load_openclip() if args.openclip else None
    if args.openclip and open_clip is None:
        print("open_clip_torch is not installed: timing jaxclip only")
    if open_clip is not None:
        import torch

        torch.set_num_threads(args.threads or os.cpu_count() or 1)
    device = jax.devices()[0]
    peak = mfu.peak_flops(device, args.dtype, args.peak_tflops * 1e12)
    peak_source = "config" if args.peak_tflops else "table"
    if peak is None:  # the CPU: what a big matmul reaches here, best of the rounds
        peak_source = "best 2048^2 float32 matmul rate, per workload"
    report: dict[str, Any] = {
        "machine": {
            "device": device.device_kind,
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "load_avg_start": os.getloadavg(),
            "jax": jax.__version__,
            "peak_tflops": peak / 1e12 if peak else None,
            "peak_source": peak_source,
        },
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "workloads": {},
    }
    for name in args.workloads.split(","):
        workload = workloads()[name]
        if args.batch:
            batch = largest_batch(workload, args) if args.batch < 0 else args.batch
            workload = dataclasses.replace(workload, batch_size=batch)
        report["workloads"][name] = bench_workload(workload, args, open_clip, peak)
        print_row(name, report["workloads"][name])
    report["machine"]["load_avg_end"] = os.getloadavg()
    print_table(report)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return report


def _cell(side: dict[str, Any] | None) -> str:
    if side is None:
        return "–"
    return (
        f"{side['samples_per_s']:.2f} ({side['samples_per_s_min']:.2f}–"
        f"{side['samples_per_s_max']:.2f})"
    )


def print_row(name: str, result: dict[str, Any]) -> None:
    parts = [f"{name}, b={result['batch_size']}:"]
    for side in ("jaxclip", "openclip"):
        if side in result:
            parts.append(f"{side} {_cell(result[side])} samples/s")
    if "ratio" in result:
        parts.append(f"ratio {result['ratio']:.2f}")
    print(" ".join(parts), flush=True)


def print_table(report: dict[str, Any]) -> None:
    machine = report["machine"]
    print(
        f"\n{machine['device']}, {machine['cpu_count']} cores, load "
        f"{machine['load_avg_start'][0]:.2f} -> {machine['load_avg_end'][0]:.2f}; "
        f"MFU against {peak_text(report)} ({machine['peak_source']})\n"
    )
    print(
        "| workload | jaxclip samples/s (min–max) | OpenCLIP samples/s (min–max) "
        "| ratio | jaxclip MFU | OpenCLIP MFU | compile s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, result in report["workloads"].items():
        jax_side, oc = result.get("jaxclip"), result.get("openclip")
        ratio = f"{result['ratio']:.2f}" if "ratio" in result else "–"
        compile_cell = f"{jax_side['compile_s']:.1f}" if jax_side else "–"
        print(
            f"| {name}, b={result['batch_size']} | {_cell(jax_side)} | {_cell(oc)} "
            f"| {ratio} | {_percent(jax_side)} | {_percent(oc)} | {compile_cell} |"
        )


def peak_text(report: dict[str, Any]) -> str:
    if report["machine"]["peak_tflops"]:
        return f"{report['machine']['peak_tflops']:.3g} TFLOP/s"
    rates = [r.get("measured_peak_tflops", 0) for r in report["workloads"].values()]
    return ", ".join(f"{rate * 1e3:.0f}" for rate in rates) + " GFLOP/s"


def _percent(side: dict[str, Any] | None) -> str:
    return f"{side['mfu']:.1%}" if side else "–"


if __name__ == "__main__":
    main()
