"""Where a jaxclip training step spends its time on the CPU, from a `jax.profiler` trace.

    python bench/step_profile.py                        # S16-128
    python bench/step_profile.py --workload=RN50 --top=30

Builds one of `bench/train.py`'s workloads, warms it up, traces `--steps` steps and
prints three tables from the trace:

- time by op kind (YNNPACK matmul fusions, Eigen dots, loop fusions, ...), summed over
  the executor's threads;
- the ops that took longest, grouped by the model code that made them (HLO metadata;
  with `--by_layer`, one row for all blocks of a stack);
- a timeline: the share of wall time during which no op, one, or two ran, split into
  matmuls and everything else. Two matmuls at once each get one of the 2 cores.

An Eigen dot's trace event covers only its dispatch (the work runs on Eigen's pool
afterwards), so its time shows up as a gap after it. Never part of the tests.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

# XLA:CPU names each executed op in the trace only with this flag, read at start-up.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"
).strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train as train_bench  # noqa: E402


def trace_events(directory: str) -> list[dict]:
    (path,) = glob.glob(f"{directory}/**/*.trace.json.gz", recursive=True)
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    return [e for e in events if e.get("ph") == "X"]


def op_events(events: list[dict], hlo: str) -> list[dict]:
    """The events that are ops of the compiled step (named as in its HLO)."""
    names = set(re.findall(r"^\s*(?:ROOT )?%([\w.\-]+) = ", hlo, re.M))
    return [e for e in events if e["name"] in names]


def op_origins(hlo: str) -> dict[str, str]:
    """Each instruction's `op_name` metadata (the model code that made it); for a
    fusion without its own, the first one inside the computation it calls."""
    computations = {}
    for block in re.split(r"\n(?=\S)", hlo):
        header = re.match(r"(?:ENTRY )?%([\w.\-]+) ", block)
        names = re.findall(r'op_name="([^"]*)"', block)
        root = re.search(r"ROOT %[\w.\-]+ = (\S+) ([\w\-]+)\(", block)
        if header and (names or root):  # else the root's opcode and shape
            computations[header.group(1)] = (
                names[0] if names else f"(no op_name) {root.group(2)} {root.group(1)}"
            )
    origins = {}
    for line in hlo.splitlines():
        match = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = ", line)
        if not match:
            continue
        own = re.search(r'op_name="([^"]*)"', line)
        called = re.search(r"calls=%([\w.\-]+)", line)
        if own:
            origins[match.group(1)] = own.group(1)
        elif called and called.group(1) in computations:
            origins[match.group(1)] = computations[called.group(1)]
    return origins


def kind(name: str) -> str:
    base = re.sub(r"\.\d+$", "", name)
    if base.startswith("ynn_fusion"):
        return "YNNPACK fusion (matmul/conv)"
    if base in ("dot", "dot_general", "convolution"):
        return f"Eigen {base}"
    return base


def is_matmul(name: str) -> bool:
    return kind(name).startswith(("YNNPACK", "Eigen"))


def timeline(ops: list[dict]) -> collections.Counter:
    """Wall time by (matmuls running, other ops running), each capped at 2."""
    points = []
    for e in ops:
        lane = 0 if is_matmul(e["name"]) else 1
        points += [(e["ts"], 1, lane), (e["ts"] + e["dur"], -1, lane)]
    points.sort()
    running, spans = [0, 0], collections.Counter()
    last = points[0][0]
    for t, delta, lane in points:
        spans[(min(running[0], 2), min(running[1], 2))] += t - last
        last = t
        running[lane] += delta
    return spans


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="S16-128")
    parser.add_argument("--steps", type=int, default=2, help="traced steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--by_layer", type=int, default=1, help="0: every block")
    args = parser.parse_args(argv)

    workload = train_bench.workloads()[args.workload]
    runner = train_bench.jaxclip_runner(workload, train_bench.cpu_settings())
    hlo = runner["compiled"].as_text()
    rng = np.random.default_rng(0)
    for _ in range(args.warmup):
        runner["step"](train_bench.random_batch(rng, workload))
    batches = [train_bench.random_batch(rng, workload) for _ in range(args.steps)]
    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory, create_perfetto_trace=True):
            start = time.perf_counter()
            for batch in batches:
                runner["step"](batch)
            wall = (time.perf_counter() - start) / args.steps
        ops = op_events(trace_events(directory), hlo)

    per_step = 1e3 * args.steps  # trace durations are in microseconds
    busy = sum(e["dur"] for e in ops)
    print(f"{workload.name}, batch {workload.batch_size}: {wall:.3f} s per step")
    print(f"op time summed over threads: {busy / per_step:.0f} ms per step\n")

    by_kind = collections.Counter()
    for e in ops:
        by_kind[kind(e["name"])] += e["dur"]
    print("| op kind | ms per step | share |\n|---|---:|---:|")
    for name, total in by_kind.most_common(args.top):
        print(f"| {name} | {total / per_step:.1f} | {100 * total / busy:.1f}% |")

    origin = op_origins(hlo)
    by_code = collections.Counter()
    for e in ops:
        code = origin.get(e["name"], "?").replace("jit(train_step)/", "")
        if args.by_layer:
            code = re.sub(r"layer(\d)/\d+/", r"layer\1/*/", code)
        by_code[(kind(e["name"]), code)] += e["dur"]
    print("\n| ms per step | op kind | made by |\n|---:|---|---|")
    for (name, code), total in by_code.most_common(args.top):
        print(f"| {total / per_step:.1f} | {name} | `{code[:100]}` |")

    spans = timeline(ops)
    total = sum(spans.values())
    print(
        "\n| matmuls running | other ops running | share of wall time |\n|---:|---:|---:|"
    )
    for (matmuls, others), span in sorted(spans.items()):
        if span:
            print(f"| {matmuls} | {others} | {100 * span / total:.1f}% |")


if __name__ == "__main__":
    main()
