"""Patch dropout (FLIP): the train step's speed at `model.patch_dropout` 0.5 and 0.75
against 0, on `bench/train.py`'s ViT-B-32 and S16-128 workloads.

    python bench/patch_dropout.py                       # short: batch 8, CPU
    python bench/patch_dropout.py --json=bench/results/patch_dropout_cpu.json
    python bench/patch_dropout.py --batch=256 --dtype=bfloat16 --steps=10  # GPU/TPU

Each workload's steps (one per rate) are compiled once, warmed up, then timed in
turns, round by round, so that a change in machine load hits every rate alike; the
speed-up is the baseline's median step time over the rate's. FLOPs per step come from
XLA's cost analysis of each compiled step, which is noise-free, beside the analytic
count (`mfu.analytic_flops`). The layers are unrolled; the one loop in a step with
patch dropout is the masks' random bits (XLA:CPU rolls threefry's rounds into a
`while`), which holds no matmul, so counting its body once does not matter here
(`mfu.step_flops`, which the trainer uses, falls back to the analytic count). On the
shared 2-core CPU the timings are indicative only; the FLOP ratios are exact. The
step is `bench/train.py`'s: fp32 (or `--dtype`), unrolled layers, dense loss, one
device. Never part of the tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
from typing import Any

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train as train_bench  # noqa: E402

from jaxclip.models.vit import kept_patches  # noqa: E402
from jaxclip.train import mfu  # noqa: E402

CPU_NOTE = (
    "CPU timings are indicative only (a shared 2-core machine, a tiny batch, few "
    "steps); the FLOP ratios are exact"
)


def bench_workload(
    workload: train_bench.Workload, rates: list[float], args: argparse.Namespace
) -> dict[str, Any]:
    """Median step time and FLOPs per step at each rate; speed-ups against rate 0."""
    settings = argparse.Namespace(
        dtype=args.dtype, scan=False, remat="none", loss_impl="dense"
    )
    runners = {
        rate: train_bench.jaxclip_runner(workload, settings, patch_dropout=rate)
        for rate in rates
    }
    rng = np.random.default_rng(0)
    for runner in runners.values():  # warm-up: JAX's first steps run slow
        train_bench.time_steps(
            runner["step"],
            [train_bench.random_batch(rng, workload) for _ in range(args.warmup)],
        )
    times: dict[float, list[float]] = {rate: [] for rate in rates}
    for _ in range(args.rounds):
        for rate, runner in runners.items():
            batches = [
                train_bench.random_batch(rng, workload) for _ in range(args.steps)
            ]
            times[rate] += train_bench.time_steps(runner["step"], batches)
    vision = workload.model.vision
    num_patches = (vision.image_size // vision.patch_size) ** 2
    results: dict[str, Any] = {}
    for rate, runner in runners.items():
        summary = train_bench.summarise(times[rate], workload.batch_size)
        summary.update(
            patch_dropout=rate,
            kept_patches=kept_patches(num_patches, rate),
            compile_s=runner["compile_s"],
            flops_per_step=mfu.cost_flops(runner["compiled"]),
            flops_per_step_analytic=runner["flops_per_step_analytic"],
        )
        results[str(rate)] = summary
    baseline = results[str(rates[0])]
    for summary in results.values():
        summary["speedup"] = baseline["median_s"] / summary["median_s"]
        summary["flops_ratio"] = summary["flops_per_step"] / baseline["flops_per_step"]
    return {
        "batch_size": workload.batch_size,
        "num_patches": num_patches,
        "rates": results,
    }


def print_table(report: dict[str, Any]) -> None:
    machine = report["machine"]
    print(
        f"\n{machine['device']}, {machine['cpu_count']} cores, load "
        f"{machine['load_avg_start'][0]:.2f} -> {machine['load_avg_end'][0]:.2f}; "
        f"{report['settings']['dtype']}"
    )
    if machine["device"] == "cpu":
        print(CPU_NOTE)
    print(
        "\n| workload | patch_dropout | patches kept | step s, median (min–max) "
        "| samples/s | speed-up | XLA GFLOP/step | FLOPs vs 0 | analytic GFLOP/step |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, result in report["workloads"].items():
        for summary in result["rates"].values():
            print(
                f"| {name}, b={result['batch_size']} | {summary['patch_dropout']} "
                f"| {summary['kept_patches']}/{result['num_patches']} "
                f"| {summary['median_s']:.3f} ({summary['min_s']:.3f}–"
                f"{summary['max_s']:.3f}) | {summary['samples_per_s']:.2f} "
                f"| {summary['speedup']:.2f}x | {summary['flops_per_step'] / 1e9:.1f} "
                f"| {summary['flops_ratio']:.3f} "
                f"| {summary['flops_per_step_analytic'] / 1e9:.1f} |"
            )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="ViT-B-32,S16-128")
    parser.add_argument("--rates", default="0,0.5,0.75", help="the first is the base")
    parser.add_argument("--batch", type=int, default=8, help="per workload")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per rate")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds")
    parser.add_argument("--json", default="", help="write the results here")
    args = parser.parse_args(argv)
    rates = [float(rate) for rate in args.rates.split(",")]

    device = jax.devices()[0]
    report: dict[str, Any] = {
        "machine": {
            "device": device.device_kind,
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "load_avg_start": os.getloadavg(),
            "jax": jax.__version__,
        },
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "workloads": {},
    }
    if device.platform == "cpu":
        report["note"] = CPU_NOTE
    for name in args.workloads.split(","):
        workload = train_bench.workloads()[name]
        workload = dataclasses.replace(workload, batch_size=args.batch)
        report["workloads"][name] = bench_workload(workload, rates, args)
        print(f"{name}: done", flush=True)
    report["machine"]["load_avg_end"] = os.getloadavg()
    print_table(report)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
