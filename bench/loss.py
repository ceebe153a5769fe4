"""Dense vs ring contrastive loss: memory, FLOPs, communication and time per device.

Each row compiles `value_and_grad` of one loss for globally sharded embeddings
`[B, d]` on a batch-sharded mesh, without allocating them, and reads:

- temp memory: `compiled.memory_analysis().temp_size_in_bytes`, per device;
- FLOPs: `compiled.cost_analysis()["flops"]`, per device. XLA's count covers a loop
  body once, so the ring's FLOPs come from a second compile with one row chunk per
  tile (`chunk_size=0`: no loop; the same arithmetic);
- bytes sent per device: the collectives of the compiled program (HLO), and for the
  ring also its schedule worked out by hand (`ring_bytes_sent`), which must agree;
- wall time of loss+grad, run for real where B <= --time-max.

On the CPU it emulates 8 devices (set before JAX starts). On a GPU/TPU machine,
`--platform=gpu` (or tpu) uses that machine's devices instead.

    python bench/loss.py                       # the full table, 8 CPU devices
    python bench/loss.py --sizes=8192 --dims=512 --losses=clip
    python bench/loss.py --platform=gpu --sizes=32768,131072 --time-max=131072
    python bench/loss.py --topologies=v5p:2x2x2,v5p:4x4x4,v5p:8x8x4   # TPU, deviceless

`--topologies` compiles loss+grad for TPU slices with XLA's TPU compiler (libtpu,
`pip install -e ".[tpu]"`; no TPU needed, nothing runs) at a fixed local batch, with
the ring as the loop TPUs run and, up to `--unrolled-max-ring` devices, unrolled as
XLA:CPU runs it: per-chip temp memory and compile time against the ring size.

Prints a table and writes JSON (`--json`, default bench/results/loss.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

MIB = 2**20


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def _strs(text: str) -> list[str]:
    return text.split(",")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=_ints, default=[8192, 32768, 131072, 1048576])
    parser.add_argument("--dims", type=_ints, default=[512, 1024])
    parser.add_argument("--losses", type=_strs, default=["clip", "siglip"])
    parser.add_argument("--impls", type=_strs, default=["dense", "ring"])
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--time-max", type=int, default=8192, help="largest B to run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--platform", default="cpu", help="cpu | gpu | tpu")
    parser.add_argument("--cpu-devices", type=int, default=8)
    parser.add_argument(
        "--scaling-local",
        type=int,
        default=4096,
        help="local batch of the memory-vs-ring-size table (0: skip it)",
    )
    parser.add_argument("--topologies", type=_strs, default=[], help="TPU slices")
    parser.add_argument("--topology-local", type=int, default=4096)
    parser.add_argument("--unrolled-max-ring", type=int, default=64)
    parser.add_argument("--json", default="")
    return parser.parse_args(argv)


ARGS = parse_args()
if ARGS.platform == "cpu":
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={ARGS.cpu_devices}"
    )
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jaxclip import aot, losses, sharding  # noqa: E402
from jaxclip.ring import forced  # noqa: E402

# --- Communication -----------------------------------------------------------------


def hlo_bytes_sent(hlo_text: str, devices: int) -> int:
    """Bytes one device sends, summed over the collectives of a compiled program.

    A result's size is the sum of its arrays (combined collectives return tuples);
    for an async `-start` op, whose tuple holds operand, result and context, the
    largest. collective-permute sends its operand once; all-gather (n-1)/n of its
    result; reduce-scatter (n-1) times its result; all-reduce 2(n-1)/n (ring
    algorithm). A collective inside a loop counts once (`jaxclip.aot.collectives`):
    on the CPU's several devices the ring is unrolled, so every send is written out;
    on GPU and TPU it is a loop, and the schedule column is the one to read.
    """
    fractions = {
        "collective-permute": 1.0,
        "all-gather": (devices - 1) / devices,
        "all-to-all": (devices - 1) / devices,
        "reduce-scatter": devices - 1,
        "all-reduce": 2 * (devices - 1) / devices,
    }
    found = aot.collectives(hlo_text)
    sent = sum(fractions[kind] * entry["bytes"] for kind, entry in found.items())
    return int(sent)


def ring_bytes_sent(loss: str, local: int, dim: int, ring: int, emb_bytes: int) -> int:
    """Bytes one device sends in the ring loss+grad, from its schedule.

    Forward: the text block goes round R-1 hops (softmax: with its float32 column
    max and sum, R hops). Backward: the block again (softmax: with its column LSE),
    and its float32 gradient R hops, back home. Scalars (psum of loss/scale) ignored.
    """
    block = local * dim * emb_bytes
    grad_block = local * dim * 4
    if loss == "clip":
        forward = (ring - 1) * block + ring * 2 * local * 4
        backward = (ring - 1) * (block + local * 4) + ring * grad_block
    else:
        forward = (ring - 1) * block
        backward = (ring - 1) * block + ring * grad_block
    return forward + backward


# --- One row ----------------------------------------------------------------------


def loss_and_grad(loss: str, impl: str, chunk_size: int):
    if loss == "clip":

        def fn(image, text, scale):
            return losses.clip_loss(
                image, text, scale, impl=impl, chunk_size=chunk_size
            )

        argnums = (0, 1, 2)
    else:

        def fn(image, text, scale, bias):
            return losses.siglip_loss(
                image, text, scale, bias, impl=impl, chunk_size=chunk_size
            )

        argnums = (0, 1, 2, 3)
    return jax.jit(jax.value_and_grad(fn, argnums=argnums))


def arguments(loss: str, batch: int, dim: int, dtype, mesh, concrete: bool):
    emb_sharding = NamedSharding(mesh, P(sharding.BATCH_AXES, None))
    scalar_sharding = NamedSharding(mesh, P())
    if not concrete:
        emb = jax.ShapeDtypeStruct((batch, dim), dtype, sharding=emb_sharding)
        scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=scalar_sharding)
        return [emb, emb] + [scalar] * (1 if loss == "clip" else 2)
    scalars = [jnp.float32(np.log(100.0))] + ([jnp.float32(-10.0)] * (loss != "clip"))
    rng = np.random.default_rng(0)
    embs = []
    for _ in range(2):
        x = rng.standard_normal((batch, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        embs.append(jax.device_put(jnp.asarray(x, dtype), emb_sharding))
    return embs + [jax.device_put(s, scalar_sharding) for s in scalars]


def measure(loss, impl, batch, dim, args, mesh) -> dict:
    dtype = jnp.dtype(args.dtype)
    ring = mesh.size
    local = batch // ring
    row = {"loss": loss, "impl": impl, "B": batch, "d": dim, "b": local}
    with jax.set_mesh(mesh):
        specs = arguments(loss, batch, dim, dtype, mesh, concrete=False)
        start = time.perf_counter()
        compiled = loss_and_grad(loss, impl, args.chunk_size).lower(*specs).compile()
        row["compile_s"] = time.perf_counter() - start
        memory = compiled.memory_analysis()
        row["temp_bytes"] = int(memory.temp_size_in_bytes)
        row["sent_bytes_hlo"] = hlo_bytes_sent(compiled.as_text(), ring)
        flops_fn = compiled
        if impl == "ring" and args.chunk_size:
            flops_fn = loss_and_grad(loss, impl, 0).lower(*specs).compile()
        row["flops"] = float(_cost(flops_fn).get("flops", float("nan")))
        if impl == "ring":
            row["sent_bytes_schedule"] = ring_bytes_sent(
                loss, local, dim, ring, dtype.itemsize
            )
        if batch <= args.time_max:
            concrete = arguments(loss, batch, dim, dtype, mesh, concrete=True)
            jax.block_until_ready(compiled(*concrete))  # warm-up
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                jax.block_until_ready(compiled(*concrete))
                times.append(time.perf_counter() - start)
            row["wall_ms"] = 1e3 * float(np.median(times))
            row["wall_ms_min"] = 1e3 * float(np.min(times))
    row["temp_bytes_per_bd"] = row["temp_bytes"] / (local * dim)
    row["flops_per_bBd"] = row["flops"] / (local * batch * dim)
    row["sent_per_Bd"] = row["sent_bytes_hlo"] / (batch * dim * dtype.itemsize)
    return row


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    return cost[0] if isinstance(cost, list) else cost


# --- Table ------------------------------------------------------------------------


def format_table(rows: list[dict]) -> str:
    dense = {
        (r["loss"], r["d"], r["B"]): r["temp_bytes"]
        for r in rows
        if r["impl"] == "dense"
    }
    header = (
        "| loss | impl | d | B | b/dev | temp MiB/dev | temp B/(b·d) | dense÷ring mem "
        "| GFLOP/dev | FLOP/(b·B·d) | sent MiB/dev | sent/(B·d) | wall ms |"
    )
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for r in rows:
        ratio = ""
        if r["impl"] == "ring" and (r["loss"], r["d"], r["B"]) in dense:
            ratio = (
                f"{dense[r['loss'], r['d'], r['B']] / max(r['temp_bytes'], 1):,.0f}×"
            )
        wall = f"{r['wall_ms']:.1f}" if "wall_ms" in r else "—"
        lines.append(
            f"| {r['loss']} | {r['impl']} | {r['d']} | {r['B']:,} | {r['b']:,} "
            f"| {r['temp_bytes'] / MIB:,.1f} | {r['temp_bytes_per_bd']:.1f} | {ratio} "
            f"| {r['flops'] / 1e9:,.1f} | {r['flops_per_bBd']:.2f} "
            f"| {r['sent_bytes_hlo'] / MIB:,.1f} | {r['sent_per_Bd']:.2f} | {wall} |"
        )
    return "\n".join(lines)


def scaling_rows(args: argparse.Namespace) -> list[dict]:
    """Temp memory at a fixed local batch as the ring grows: flat for the ring."""
    devices, rows = jax.devices(), []
    dtype, local, dim = jnp.dtype(args.dtype), args.scaling_local, args.dims[0]
    for loss in args.losses:
        for impl in args.impls:
            for ring in (1, 2, 4, 8):
                if ring > len(devices):
                    break
                mesh = sharding.make_mesh((ring, 1, 1), devices[:ring])
                with jax.set_mesh(mesh):
                    specs = arguments(loss, local * ring, dim, dtype, mesh, False)
                    fn = loss_and_grad(loss, impl, args.chunk_size)
                    memory = fn.lower(*specs).compile().memory_analysis()
                temp = int(memory.temp_size_in_bytes)
                rows.append(
                    {"loss": loss, "impl": impl, "devices": ring, "b": local}
                    | {"d": dim, "B": local * ring, "temp_bytes": temp}
                )
    return rows


def format_scaling(rows: list[dict]) -> str:
    lines = [
        "| loss | impl | d | b/dev | devices | B | temp MiB/dev | temp B/(b·d) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['loss']} | {r['impl']} | {r['d']} | {r['b']:,} | {r['devices']} "
            f"| {r['B']:,} | {r['temp_bytes'] / MIB:,.1f} "
            f"| {r['temp_bytes'] / (r['b'] * r['d']):.1f} |"
        )
    return "\n".join(lines)


def topology_rows(args: argparse.Namespace) -> list[dict]:
    """Ring loss+grad compiled for TPU slices: temp memory and compile time vs R."""
    rows = []
    dtype, local, dim = jnp.dtype(args.dtype), args.topology_local, args.dims[0]
    for topology in args.topologies:
        devices = aot.topology_devices(topology)
        mesh = sharding.make_mesh((len(devices), 1, 1), devices)
        for loss in args.losses:
            for mode in ("loop", "unrolled"):
                if mode == "unrolled" and len(devices) > args.unrolled_max_ring:
                    continue
                with jax.set_mesh(mesh), forced(mode):
                    specs = arguments(
                        loss, local * len(devices), dim, dtype, mesh, False
                    )
                    start = time.perf_counter()
                    fn = loss_and_grad(loss, "ring", args.chunk_size)
                    compiled = fn.lower(*specs).compile()
                    seconds = time.perf_counter() - start
                temp = int(compiled.memory_analysis().temp_size_in_bytes)
                row = {"topology": topology, "device_kind": devices[0].device_kind}
                row |= {"loss": loss, "mode": mode, "R": len(devices), "b": local}
                row |= {"d": dim, "temp_bytes": temp, "compile_s": seconds}
                rows.append(row)
                print(
                    f"  {topology:11} {loss:6} {mode:8} R={len(devices):<4} temp "
                    f"{temp / MIB:7.1f} MiB = {temp / (local * dim):5.1f} B/(b·d), "
                    f"compile {seconds:6.1f} s",
                    flush=True,
                )
    return rows


def format_topologies(rows: list[dict]) -> str:
    lines = [
        "| topology | chip | loss | ring | R | temp MiB/chip | temp B/(b·d) | compile s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['topology']} | {r['device_kind']} | {r['loss']} | {r['mode']} "
            f"| {r['R']} | {r['temp_bytes'] / MIB:,.1f} "
            f"| {r['temp_bytes'] / (r['b'] * r['d']):.1f} | {r['compile_s']:.1f} |"
        )
    return "\n".join(lines)


def main_topologies(args: argparse.Namespace) -> None:
    print(
        f"# ring loss+grad for TPU slices (deviceless), b={args.topology_local} per "
        f"chip, d={args.dims[0]}, {args.dtype}, chunk_size {args.chunk_size}, "
        f"jax {jax.__version__}",
        flush=True,
    )
    rows = topology_rows(args)
    print(format_topologies(rows))
    out = Path(args.json or "bench/results/loss_tpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"jax": jax.__version__, "host": platform.node(), "dtype": args.dtype}
    meta |= {"chunk_size": args.chunk_size, "b": args.topology_local}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out}")


def main(args: argparse.Namespace) -> None:
    if args.topologies:
        return main_topologies(args)
    devices = jax.devices()
    mesh = sharding.make_mesh((len(devices), 1, 1), devices)
    print(
        f"# {len(devices)} × {devices[0].device_kind} ({jax.default_backend()}), "
        f"dtype {args.dtype}, ring chunk_size {args.chunk_size}, jax {jax.__version__}",
        flush=True,
    )
    rows = []
    for loss in args.losses:
        for dim in args.dims:
            for batch in args.sizes:
                for impl in args.impls:
                    row = measure(loss, impl, batch, dim, args, mesh)
                    rows.append(row)
                    sched = row.get("sent_bytes_schedule")
                    check = "" if sched is None else f", schedule {sched / MIB:,.1f}"
                    print(
                        f"  {loss:6} {impl:5} d={dim:<5} B={batch:<8,} "
                        f"temp {row['temp_bytes'] / MIB:9,.1f} MiB, "
                        f"{row['flops'] / 1e9:10,.1f} GFLOP, "
                        f"sent {row['sent_bytes_hlo'] / MIB:8,.1f} MiB{check}, "
                        f"compile {row['compile_s']:.1f}s",
                        flush=True,
                    )
    print(format_table(rows))
    scaling = scaling_rows(args) if args.scaling_local else []
    if scaling:
        print(f"\n# fixed local batch {args.scaling_local}: temp memory vs ring size")
        print(format_scaling(scaling))
    out = Path(args.json or "bench/results/loss.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "devices": len(devices),
        "device_kind": devices[0].device_kind,
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "host": platform.node(),
        "dtype": args.dtype,
        "chunk_size": args.chunk_size,
    }
    out.write_text(
        json.dumps({"meta": meta, "rows": rows, "scaling": scaling}, indent=1)
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main(ARGS)
