"""Locked towers (`train.freeze`, `train.unlock_last`): what the train step saves.

For each workload of `bench/train.py` (ViT-B-32 at batch 32, RN50 at batch 16; fp32,
unrolled layers, dense loss, one device) the step is compiled with nothing locked,
the image tower locked (LiT), the image tower locked but its last block and head
(`unlock_last=1`, transformer towers only) and the text tower locked. Reported per
compiled step: FLOPs (XLA's cost analysis; the layers are unrolled, so every matmul
is counted) and their ratio to the unlocked step, and the bytes of the train state
(params + AdamW moments) against the unlocked state's. Both are exact, not timings.

    python bench/freeze.py --json=bench/results/freeze_cpu.json

Never part of the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train as train_bench  # noqa: E402

from jaxclip.train import mfu  # noqa: E402

VARIANTS = {
    "none": ((), 0),
    "image locked": (("visual/.*",), 0),
    "image locked, unlock_last=1": (("visual/.*",), 1),
    "text locked": (("text/.*",), 0),
}


def tree_bytes(tree: Any) -> int:
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def bench_workload(workload: train_bench.Workload) -> dict[str, Any]:
    settings = argparse.Namespace(
        dtype="float32", scan=False, remat="none", loss_impl="dense"
    )
    results = {}
    for name, (freeze, unlock_last) in VARIANTS.items():
        if unlock_last and workload.model.vision.is_resnet:
            continue  # partial unlocking needs transformer blocks
        runner = train_bench.jaxclip_runner(
            workload, settings, True, freeze=freeze, unlock_last=unlock_last
        )
        state = runner["state"]
        memory = runner["compiled"].memory_analysis()
        results[name] = {
            "flops_per_step": mfu.cost_flops(runner["compiled"]),
            "optimizer_state_bytes": tree_bytes(state.opt_state),
            "state_bytes": tree_bytes((state.params, state.opt_state)),
            "temp_bytes": int(memory.temp_size_in_bytes),
            "compile_s": runner["compile_s"],
        }
        del runner, state
    base = results["none"]
    for entry in results.values():
        entry["flops_ratio"] = entry["flops_per_step"] / base["flops_per_step"]
        entry["state_ratio"] = entry["state_bytes"] / base["state_bytes"]
        entry["temp_ratio"] = entry["temp_bytes"] / base["temp_bytes"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="ViT-B-32,RN50")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    workloads = train_bench.workloads()
    report = {"device": jax.devices()[0].device_kind, "workloads": {}}
    header = (
        f"{'workload':9} {'locked':28} {'GFLOP/step':>11} {'x':>6} "
        f"{'state MiB':>10} {'x':>6} {'temp MiB':>9} {'x':>6}"
    )
    print(header)
    for name in args.workloads.split(","):
        workload = workloads[name]
        results = bench_workload(workload)
        report["workloads"][name] = {
            "batch_size": workload.batch_size,
            "variants": results,
        }
        for variant, entry in results.items():
            print(
                f"{name:9} {variant:28} {entry['flops_per_step'] / 1e9:11.1f} "
                f"{entry['flops_ratio']:6.3f} {entry['state_bytes'] / 2**20:10.1f} "
                f"{entry['state_ratio']:6.3f} {entry['temp_bytes'] / 2**20:9.1f} "
                f"{entry['temp_ratio']:6.3f}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
