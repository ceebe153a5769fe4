"""Where RN50 loses on the CPU: its convolutions, forward and both gradients, in XLA
and in PyTorch, side by side.

    python bench/conv.py
    python bench/conv.py --json=/tmp/bench_conv.json --torch=0

Each row is one convolution shape from RN50 at 224 with batch 16 (stride 1, torch's
padding), timed three ways in both frameworks: the forward pass, the input gradient
and the weight gradient (each alone, from precomputed inputs). PyTorch runs NCHW
(OpenCLIP's layout) with as many threads as cores; XLA runs NHWC, as jaxclip's
ResNet does. For a 1x1 the "XLA as" column says how the XLA side computes it: a
convolution; a dot over the channel axis of the 4-D activations (whose weight gradient
contracts batch, height and width as three axes); or `layers.matmul`, the same
product with those axes merged into one, which is what jaxclip's ResNet runs. The two
sides alternate round by round and the table reports medians. Never part of the
tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxclip.models.layers import matmul  # noqa: E402

# (name, batch, spatial size, in channels, out channels, kernel): RN50's stride-1
# convolutions, one 3x3 per stage and layer1's 1x1s. A 1x1 row is timed three ways on
# the XLA side ("XLA as": conv, dot or matmul), against one PyTorch timing.
SHAPES = [
    ("stem 3x3", 16, 112, 32, 32, 3),
    ("layer1 3x3", 16, 56, 64, 64, 3),
    ("layer2 3x3", 16, 28, 128, 128, 3),
    ("layer3 3x3", 16, 14, 256, 256, 3),
    ("layer4 3x3", 16, 7, 512, 512, 3),
    ("layer1 1x1 64->256", 16, 56, 64, 256, 1),
    ("layer1 1x1 256->64", 16, 56, 256, 64, 1),
]
PARTS = ("forward", "input grad", "weight grad")


def xla_parts(batch, size, cin, cout, kernel, form) -> dict[str, Callable[[], object]]:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, size, size, cin), np.float32))
    w = jnp.asarray(rng.standard_normal((kernel, kernel, cin, cout), np.float32))
    g = jnp.asarray(rng.standard_normal((batch, size, size, cout), np.float32))

    def conv(x, w):
        if form == "dot":  # over the channel axis of the 4-D activations
            return jax.lax.dot_general(x, w[0, 0], (((3,), (0,)), ((), ())))
        if form == "matmul":  # axes merged: what jaxclip's ResNet runs for a 1x1
            return matmul(x, w[0, 0])
        pad = kernel // 2
        return jax.lax.conv_general_dilated(
            x, w, (1, 1), [(pad, pad)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    forward = jax.jit(conv)
    input_grad = jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
    weight_grad = jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
    return {
        "forward": lambda: jax.block_until_ready(forward(x, w)),
        "input grad": lambda: jax.block_until_ready(input_grad(x, w, g)),
        "weight grad": lambda: jax.block_until_ready(weight_grad(x, w, g)),
    }


def torch_parts(batch, size, cin, cout, kernel) -> dict[str, Callable[[], object]]:
    import torch

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cin, size, size, generator=generator)
    w = torch.randn(cout, cin, kernel, kernel, generator=generator)
    g = torch.randn(batch, cout, size, size, generator=generator)
    grad = torch.nn.grad
    pad = kernel // 2

    def no_grad(function):
        def run():
            with torch.no_grad():
                return function()

        return run

    return {
        "forward": no_grad(lambda: torch.nn.functional.conv2d(x, w, padding=pad)),
        "input grad": no_grad(lambda: grad.conv2d_input(x.shape, w, g, padding=pad)),
        "weight grad": no_grad(lambda: grad.conv2d_weight(x, w.shape, g, padding=pad)),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch", type=int, default=1, help="0: XLA only")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--json", default="", help="write the results here")
    args = parser.parse_args(argv)
    if args.torch:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)

    rows = []
    for name, batch, size, cin, cout, kernel in SHAPES:
        flops = 2 * batch * size * size * cin * cout * kernel * kernel
        forms = ("conv", "dot", "matmul") if kernel == 1 else ("conv",)
        sides = {
            form: xla_parts(batch, size, cin, cout, kernel, form) for form in forms
        }
        if args.torch:
            sides["torch"] = torch_parts(batch, size, cin, cout, kernel)
        times: dict[str, dict[str, list[float]]] = {
            side: {part: [] for part in PARTS} for side in sides
        }
        for side in sides.values():  # warm up (compiles the XLA side)
            for run in side.values():
                run(), run()
        for _ in range(args.rounds):
            for side, parts in sides.items():
                for part, run in parts.items():
                    for _ in range(args.repeats):
                        start = time.perf_counter()
                        run()
                        times[side][part].append(time.perf_counter() - start)
        medians = {
            side: {part: statistics.median(times[side][part]) for part in PARTS}
            for side in sides
        }
        for form in forms:
            row = {"name": name, "xla_form": form, "xla": medians[form]}
            row["shape"] = [batch, size, size, cin, cout, kernel]
            row["gflop"] = flops / 1e9
            if args.torch:
                row["torch"] = medians["torch"]
            rows.append(row)
        print(name, medians, flush=True)

    print(f"\n{platform.processor() or 'cpu'}, {os.cpu_count()} cores; ms (median)\n")
    header = "| conv | XLA as | GFLOP | " + " | ".join(
        f"XLA {part}" + (f" | torch {part}" if args.torch else "") for part in PARTS
    )
    print(header + " |")
    print("|---|---|---:|" + "---:|" * (len(PARTS) * (1 + args.torch)))
    for row in rows:
        cells = [row["name"], row["xla_form"], f"{row['gflop']:.2f}"]
        for part in PARTS:
            cells.append(f"{row['xla'][part] * 1e3:.1f}")
            if args.torch:
                cells.append(f"{row['torch'][part] * 1e3:.1f}")
        print("| " + " | ".join(cells) + " |")
    report = {
        "machine": {"cpu_count": os.cpu_count(), "jax": jax.__version__},
        "settings": vars(args),
        "rows": rows,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
