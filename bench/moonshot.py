"""The largest contrastive batch for ViT-L/14 on 8 TPU v5p chips, and what bounds it.

Everything is compiled for `v5p:2x2x2` with XLA's TPU compiler, deviceless (libtpu,
`pip install -e ".[tpu]"`); nothing runs. Three measurements, each a compiled program:

1. The trainer's step (`python -m jaxclip.aot` with `--find_max_batch`): ring loss,
   GradCache with `--micro-batch` rows per chip per micro-batch, remat `full`, FSDP
   over the 8 chips. Its largest global batch, and its per-chip memory there.
2. What that step holds per sample, split by part: the batch itself (uint8 images and
   int32 tokens, an argument), and the rest (embeddings of the whole batch, their
   gradients, the ring loss's buffers), from compiling the step at two batch sizes
   with the same micro-batch (the difference per added sample), beside one
   micro-batch's activations (the step at one micro-batch).
3. The ring loss+grad alone on the whole batch's embeddings `[B, d]`: the part that
   stays on the chips whatever feeds the micro-batches. Its largest B.

    python bench/moonshot.py                      # the table in docs/tpu.md
    python bench/moonshot.py --resolution=0.25    # fewer compiles

Prints a table and writes JSON (`--json`, default bench/results/moonshot_tpu.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jaxclip import aot, losses, sharding  # noqa: E402

GIB = 2**30


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--topology", default="v5p:2x2x2")
    parser.add_argument("--model", default="ViT-L-14")
    parser.add_argument("--micro-batch", type=int, default=256, help="rows per chip")
    parser.add_argument("--remat", default="full")
    parser.add_argument("--start", type=int, default=2**21, help="first batch tried")
    parser.add_argument("--resolution", type=float, default=1 / 8)
    parser.add_argument("--headroom", type=float, default=0.1)
    parser.add_argument("--json", default="bench/results/moonshot_tpu.json")
    return parser.parse_args(argv)


def recipe(args, batch: int):
    """The ViT-L-14 recipe on the slice, with GradCache micro-batches."""
    from jaxclip.config import load_beside

    config = load_beside(__file__, "../configs/common.py").clip_paper(args.model)
    config.model.remat = args.remat
    config.mesh.shape = (1, -1, 1)
    config.train.batch_size = batch
    return config


def step_memory(args, devices, batch: int) -> dict:
    """The trainer's step at `batch`, micro-batches of `--micro-batch` rows per chip."""
    config = recipe(args, batch)
    config.train.accum_steps = max(1, batch // len(devices) // args.micro_batch)
    report = aot.compile_recipe(config, devices, encoders=False)
    return report["programs"]["train_step"] | {"accum_steps": config.train.accum_steps}


def loss_memory(devices, batch: int, dim: int) -> dict:
    """Ring CLIP loss+grad on `[batch, dim]` float32 embeddings, chunks of 512."""
    mesh = sharding.make_mesh((1, -1, 1), devices)
    rows = NamedSharding(mesh, P(sharding.BATCH_AXES, None))
    embeddings = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=rows)
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))

    def loss(image, text, log_scale):
        return losses.clip_loss(image, text, log_scale, impl="ring", chunk_size=512)

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    with jax.set_mesh(mesh):
        program = aot.compile_program(
            "ring_loss", lambda: fn.lower(embeddings, embeddings, scalar)
        )
    return vars(program) | {"total_bytes": program.total_bytes}


def main(args: argparse.Namespace) -> None:
    from jaxclip.models.registry import get_model_config

    devices = aot.topology_devices(args.topology)
    chips = len(devices)
    hbm = aot.hbm_bytes(devices[0])
    budget = hbm * (1 - args.headroom)
    model = get_model_config(args.model)
    size, context = model.vision.image_size, model.text.context_length
    sample_bytes = size * size * 3 + context * 4  # uint8 image + int32 tokens
    print(
        f"# {args.model} on {args.topology} ({chips} x {devices[0].device_kind}, "
        f"{hbm / GIB:.2f} GiB HBM, budget {budget / GIB:.2f} GiB), remat {args.remat}, "
        f"micro-batches of {args.micro_batch} rows per chip, jax {jax.__version__}",
        flush=True,
    )
    result: dict = {"topology": args.topology, "model": args.model, "chips": chips}
    result |= {"hbm_bytes": hbm, "headroom": args.headroom}
    result |= {"micro_batch": args.micro_batch, "remat": args.remat}

    # 1. The trainer's step.
    print("\n1. the trainer's step (ring loss, GradCache):", flush=True)
    config = recipe(args, args.start)
    step_best, trials = aot.find_max_batch(
        config,
        devices,
        hbm,
        args.headroom,
        micro_batch=args.micro_batch,
        resolution=args.resolution,
    )
    result["step_max_batch"] = step_best
    result["step_trials"] = trials
    print(f"   max global batch {step_best:,} ({step_best // chips:,} per chip)")

    # 2. Per-sample parts of the step, and one micro-batch's activations.
    print("\n2. what the step holds per sample:", flush=True)
    unit = chips * args.micro_batch
    small, large = step_best // 2 // unit * unit, step_best
    at_small, at_large = (
        step_memory(args, devices, small),
        step_memory(args, devices, large),
    )
    per_sample = (at_large["total_bytes"] - at_small["total_bytes"]) / (
        (large - small) / chips
    )
    micro = step_memory(args, devices, args.micro_batch * chips)
    result["parts"] = {
        "per_sample_total_bytes": per_sample,
        "per_sample_batch_bytes": sample_bytes,
        "per_sample_other_bytes": per_sample - sample_bytes,
        "micro_batch_step_bytes": micro["total_bytes"],
        "micro_batch_step_temp_bytes": micro["temp_bytes"],
        "state_argument_bytes": micro["argument_bytes"]
        - args.micro_batch * sample_bytes,
    }
    print(
        f"   per sample per chip: {per_sample / 1024:,.1f} KiB in all, of which the "
        f"batch {sample_bytes / 1024:,.1f} KiB (images, tokens) and "
        f"{(per_sample - sample_bytes) / 1024:,.1f} KiB the rest\n"
        f"   one micro-batch's step ({args.micro_batch} rows per chip): "
        f"{micro['total_bytes'] / GIB:.2f} GiB (temp {micro['temp_bytes'] / GIB:.2f})",
        flush=True,
    )

    # 3. The ring loss on the whole batch's embeddings.
    print("\n3. ring loss+grad on the embeddings alone:", flush=True)
    loss_trials = []

    def loss_fits(batch: int) -> bool:
        program = loss_memory(devices, batch, model.embed_dim)
        ok = not program["out_of_memory"] and program["total_bytes"] <= budget
        loss_trials.append({"batch_size": batch, **program})
        print(
            f"   B {batch:>12,}: {program['total_bytes'] / GIB:7.2f} GiB"
            f"{' (out of memory)' if program['out_of_memory'] else ''}, "
            f"{'fits' if ok else 'does not fit'} ({program['compile_sec']:.0f} s)",
            flush=True,
        )
        return ok

    loss_best = aot.search_max_batch(loss_fits, 2**24, 512 * chips, args.resolution)
    result["loss_max_batch"] = loss_best
    result["loss_trials"] = loss_trials
    print(
        f"   max B for the loss alone: {loss_best:,} ({loss_best // chips:,} per chip)"
    )

    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {out} at {time.strftime('%H:%M:%S')}")


if __name__ == "__main__":
    main(parse_args())
