"""How fast a training step could be, given each side's matmul and convolution kernels.

    python bench/bound.py                                  # the three CPU workloads
    python bench/bound.py --workloads=RN50 --json=bench/results/bound_cpu.json

For each workload this answers: with XLA:CPU's own kernels, do the matmuls and
convolutions alone leave room for 1.3x OpenCLIP's throughput?

- **jaxclip.** Every `dot_general` and `conv_general_dilated` of the training step,
  forward and backward, is read from the step's jaxpr (a `scan` body counts once per
  layer) and run on its own through XLA with the same shapes and dimension numbers.
  The sum of those times is what the step's matmuls and convolutions cost in XLA's
  kernels with nothing else running: a lower bound on the step, if XLA picked the same
  kernels inside the step (it fuses a transpose or an add into some of them, which
  changes little).
- **OpenCLIP.** One training step under `torch.profiler`, split into the time spent
  in matmul, convolution and fused-attention kernels and everything else.
- Both sides' full steps are timed as in `bench/train.py`, and the table shows the
  step time that 1.3x OpenCLIP's samples/s allows.

Never part of the tests.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.extend import core as jex_core

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train as train_bench  # noqa: E402

KERNELS = ("dot_general", "conv_general_dilated")
# OpenCLIP's matmul, convolution and fused-attention kernels (forward and backward)
# as torch.profiler names them; everything else is elementwise, norms, copies, AdamW.
TORCH_KERNELS = (
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::baddbmm",
    "aten::mkldnn_convolution",
    "aten::convolution_backward",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
)


def kernel_eqns(jaxpr: Any, times: int = 1) -> collections.Counter:
    """The step's matmul and convolution equations, counted as executed.

    Keyed by (primitive, input avals, params); a `scan` body counts `length` times; of
    a `cond`'s branches, the one with the most kernel equations counts (in the train
    step only the optimizer update is branched, and it has none).
    """
    found: collections.Counter = collections.Counter()
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in KERNELS:
            avals = tuple(v.aval for v in eqn.invars)
            key = (eqn.primitive, avals, tuple(sorted(eqn.params.items())))
            found[key] += times
        elif name == "cond":
            branches = [kernel_eqns(b.jaxpr, times) for b in eqn.params["branches"]]
            found += max(branches, key=lambda c: sum(c.values()))
        else:
            repeat = eqn.params["length"] if name == "scan" else 1
            for sub in jex_core.jaxprs_in_params(eqn.params):
                found += kernel_eqns(sub, times * repeat)
    return found


def flops(primitive: Any, avals: tuple, params: dict) -> float:
    """2 x multiply-adds of one dot_general or convolution."""
    out = jax.eval_shape(
        lambda *xs: primitive.bind(*xs, **params),
        *[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals],
    )
    if primitive.name == "dot_general":
        (contract, _), _ = params["dimension_numbers"]
        reduced = np.prod([avals[0].shape[d] for d in contract])
    else:  # per output element: the kernel's window times its input features
        spec = params["dimension_numbers"].rhs_spec  # (out, in, *spatial)
        kernel = avals[1].shape
        reduced = kernel[spec[1]] * np.prod([kernel[d] for d in spec[2:]])
    return 2.0 * np.prod(out.shape) * reduced


def op_timer(primitive: Any, avals: tuple, params: dict) -> Callable[[float], float]:
    """`time(budget)`: the op's best time alone through XLA on random inputs, in
    seconds. For a lower bound the fastest run is the right statistic: a busy machine
    only slows an op down."""
    rng = np.random.default_rng(0)
    args = [jax.device_put(rng.standard_normal(a.shape).astype(a.dtype)) for a in avals]
    run = jax.jit(lambda *xs: primitive.bind(*xs, **params))
    run(*args).block_until_ready()

    def best(budget: float) -> float:
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < 3 or (
            time.perf_counter() - start < budget and len(times) < 20
        ):
            t = time.perf_counter()
            run(*args).block_until_ready()
            times.append(time.perf_counter() - t)
        return min(times)

    return best


def describe(primitive: Any, avals: tuple, params: dict) -> str:
    shapes = " x ".join(str(list(a.shape)) for a in avals)
    if primitive.name == "dot_general":
        (contract, batch) = params["dimension_numbers"]
        return f"dot {shapes} contract {contract} batch {batch}"
    dims = params["dimension_numbers"]
    return (
        f"conv {shapes} lhs{dims.lhs_spec} rhs{dims.rhs_spec} "
        f"stride {params['window_strides']} lhs_dil {params['lhs_dilation']} "
        f"groups {params['feature_group_count']}/{params['batch_group_count']}"
    )


def jaxclip_kernels(runner: dict, budget: float, passes: int) -> dict[str, Any]:
    """Each kernel op of the step timed alone, best of `passes` passes over them all
    (so that a burst of load on the shared machine does not stick to one op)."""
    found = kernel_eqns(runner["jaxpr"]().jaxpr)
    ops = [(p, avals, dict(params), n) for (p, avals, params), n in found.items()]
    timers = [op_timer(p, avals, params) for p, avals, params, _ in ops]
    best = [timer(budget) for timer in timers]
    for _ in range(passes - 1):
        best = [min(b, timer(budget)) for b, timer in zip(best, timers)]
    rows = [
        {
            "op": describe(primitive, avals, params),
            "count": count,
            "seconds_each": seconds,
            "gflop_each": flops(primitive, avals, params) / 1e9,
        }
        for (primitive, avals, params, count), seconds in zip(ops, best)
    ]
    rows.sort(key=lambda r: -r["count"] * r["seconds_each"])
    return {
        "kernel_s": sum(r["count"] * r["seconds_each"] for r in rows),
        "kernel_gflop": sum(r["count"] * r["gflop_each"] for r in rows),
        "ops": rows,
    }


def openclip_kernels(step: Any, batches: list[dict]) -> dict[str, float]:
    """OpenCLIP steps under torch.profiler, one at a time: the fastest step's time
    in matmul/conv/attention kernels (seconds, by kernel and summed) and its wall time.
    """
    from torch.profiler import ProfilerActivity, profile

    best: dict[str, float] = {}
    for batch in batches:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            step(batch)
            wall = time.perf_counter() - start
        if best and wall >= best["profiled_step_s"]:
            continue
        by_name = collections.defaultdict(float)
        for event in prof.key_averages():
            by_name[event.key] += event.self_cpu_time_total / 1e6
        kernels = {k: by_name[k] for k in TORCH_KERNELS if by_name.get(k)}
        best = {"profiled_step_s": wall, "kernel_s": sum(kernels.values()), **kernels}
    return best


def bench_workload(
    name: str, args: argparse.Namespace, settings: argparse.Namespace, open_clip: Any
) -> dict:
    workload = train_bench.workloads()[name]
    rng = np.random.default_rng(0)

    def batches(count: int) -> list[dict[str, np.ndarray]]:
        return [train_bench.random_batch(rng, workload) for _ in range(count)]

    result: dict[str, Any] = {"batch_size": workload.batch_size}
    runner = train_bench.jaxclip_runner(workload, settings)
    train_bench.time_steps(runner["step"], batches(args.warmup))
    steps = train_bench.time_steps(runner["step"], batches(args.steps))
    result["jaxclip"] = {"step_s": statistics.median(steps)}
    result["jaxclip"].update(jaxclip_kernels(runner, args.budget, args.passes))
    if open_clip is not None:
        side = train_bench.openclip_runner(workload, open_clip)
        train_bench.time_steps(side["step"], batches(args.warmup))
        steps = train_bench.time_steps(side["step"], batches(args.steps))
        result["openclip"] = {"step_s": statistics.median(steps)}
        result["openclip"].update(openclip_kernels(side["step"], batches(2)))
        result["step_for_target_s"] = result["openclip"]["step_s"] / args.target
    return result


def print_table(report: dict[str, Any], target: float) -> None:
    print(
        f"\n| workload | OpenCLIP step s | its kernels s | its rest s | jaxclip step s "
        f"| XLA kernels alone s | jaxclip rest s | step for {target}x s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in report["workloads"].items():
        jx, oc = r["jaxclip"], r.get("openclip")
        oc_cells = (
            f"{oc['step_s']:.2f} | {oc['kernel_s']:.2f} | "
            f"{oc['profiled_step_s'] - oc['kernel_s']:.2f}"
            if oc
            else "– | – | –"
        )
        target_cell = f"{r['step_for_target_s']:.2f}" if oc else "–"
        print(
            f"| {name}, b={r['batch_size']} | {oc_cells} | {jx['step_s']:.2f} | "
            f"{jx['kernel_s']:.2f} | {jx['step_s'] - jx['kernel_s']:.2f} | "
            f"{target_cell} |"
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="ViT-B-32,RN50,S16-128")
    parser.add_argument("--openclip", type=int, default=1, help="0: jaxclip only")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--budget", type=float, default=0.5, help="s per op timing")
    parser.add_argument("--passes", type=int, default=2, help="timings per op")
    parser.add_argument("--target", type=float, default=1.3)
    parser.add_argument("--top", type=int, default=8, help="slowest ops to print")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    settings = train_bench.cpu_settings()

    open_clip = train_bench.load_openclip() if args.openclip else None
    if open_clip is not None:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
    report: dict[str, Any] = {"load_avg_start": os.getloadavg(), "workloads": {}}
    for name in args.workloads.split(","):
        result = report["workloads"][name] = bench_workload(
            name, args, settings, open_clip
        )
        jx = result["jaxclip"]
        print(
            f"{name}: step {jx['step_s']:.2f} s; {len(jx['ops'])} distinct matmul/conv "
            f"ops, {jx['kernel_gflop']:.0f} GFLOP, {jx['kernel_s']:.2f} s alone in XLA",
            flush=True,
        )
        for row in jx["ops"][: args.top]:
            rate = row["gflop_each"] / row["seconds_each"]
            print(
                f"  {row['count']:3d} x {row['seconds_each'] * 1e3:7.1f} ms "
                f"({rate:4.0f} GFLOP/s)  {row['op']}"
            )
    report["load_avg_end"] = os.getloadavg()
    print_table(report, args.target)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
