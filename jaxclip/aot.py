"""Compile a recipe's train step for a TPU slice, without TPU hardware, and report what
fits: `python -m jaxclip.aot --config=configs/vit_l14.py --topology=v5p:4x4x4`.

XLA's TPU compiler (libtpu: `pip install -e ".[tpu]"`) compiles for a topology
described by name (`jax.experimental.topologies`), in one CPU process, for up to 256
chips. The step compiled is the trainer's own (`jaxclip.models.build.model_from_config`,
`abstract_train_state`, `make_train_step`), with the state's and the batch's
shardings on a mesh of the slice's devices; nothing is allocated and nothing runs, but
every decision of the compiler is real. Reported per chip: argument, output and
temporary bytes and their total against the chip's HBM; compile time; FLOPs per step;
the collectives in the optimized program; and the remat, scan and accumulation in
force. `--find_max_batch` searches for the largest global batch that fits. The numbers
in docs/tpu.md come from this command.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
from absl import app, flags
from ml_collections import config_flags

from jaxclip import sharding
from jaxclip.config import ConfigError, validate_config
from jaxclip.models.build import count_params, make_encoders, model_from_config
from jaxclip.models.registry import get_model_config
from jaxclip.train import ema, mfu
from jaxclip.train.state import (
    abstract_train_state,
    learning_rate_schedule,
    make_optimizer,
)
from jaxclip.train.step import example_batch, make_train_step, step_batch_spec

GIB = 2**30

# HBM a program may use on one device, by `device_kind`, as XLA's TPU compiler states
# it ("exceeds available HBM (95.74G)", G = GiB) with libtpu 0.0.42.1: the chip's
# HBM less what the runtime keeps. TPU v4 devices are single cores (16 GiB of a
# 32 GiB chip). `--hbm_gib` overrides.
HBM_BYTES = {
    "TPU v4": 15.25 * GIB,
    "TPU v5 lite": 15.75 * GIB,  # v5e
    "TPU v5": 95.74 * GIB,  # v5p
    "TPU v6 lite": 31.25 * GIB,  # v6e (Trillium)
}

COLLECTIVES = (
    "all-gather",
    "all-reduce",
    "reduce-scatter",
    "collective-permute",
    "all-to-all",
)
_INSTRUCTION = re.compile(
    r"=\s*(?P<type>\([^=]*?\)|\S+)\s+(?P<op>"
    + "|".join(COLLECTIVES)
    + r")(?P<start>-start)?\("
)
_ARRAY = re.compile(r"\b(?P<dtype>pred|[subf]\d+|bf16|f8e\w+)\[(?P<dims>[\d,]*)\]")
_DTYPE_BYTES = {"pred": 1, "bf16": 2}


def quiet_libtpu() -> None:
    """Tell libtpu there is no TPU to look for, so that loading it prints nothing.

    Compiling for a topology loads libtpu in a process that runs on the CPU; without
    these it probes for TPU hardware and warns about the accelerator type and the
    worker hostnames. libtpu also takes a machine-wide lock file, which would stop
    a second compiling process (another aot run, a test worker) on the same machine;
    nothing here uses a TPU, so the lock is not needed.
    """
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")


def topology_devices(topology: str) -> list[Any]:
    """The devices of a TPU slice named like `v5p:2x2x2` or `v6e:16x16`."""
    from jax.experimental import topologies

    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise SystemExit(
            'compiling for a TPU needs libtpu: pip install -e ".[tpu]"'
        ) from None
    quiet_libtpu()
    try:
        description = topologies.get_topology_desc(
            platform="tpu", topology_name=topology
        )
    except Exception as e:  # libtpu's own message names what it cannot parse
        raise ValueError(f"--topology={topology!r} is not a TPU slice: {e}") from None
    return list(description.devices)


def hbm_bytes(device: Any, override_gib: float = 0.0) -> float | None:
    """HBM of one device in bytes (`override_gib` > 0 wins); None for an unknown kind."""
    if override_gib > 0:
        return override_gib * GIB
    return HBM_BYTES.get(device.device_kind)


def _array_bytes(text: str) -> list[int]:
    """Bytes of each array type in an HLO type string such as `(f32[8,4], bf16[2])`."""
    sizes = []
    for match in _ARRAY.finditer(text):
        dtype = match["dtype"]
        width = _DTYPE_BYTES.get(dtype) or max(int(re.sub(r"\D", "", dtype)) // 8, 1)
        count = 1
        for dim in filter(None, match["dims"].split(",")):
            count *= int(dim)
        sizes.append(count * width)
    return sizes


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """Collectives of an optimized HLO module: {kind: {count, bytes}}, per chip.

    Each instruction counts once as written: one inside a loop body (the ring, scanned
    layers, micro-batches) runs once per trip, which the count does not multiply.
    Bytes are the result's: for an async `-start` (a tuple of operand, result and
    flags) the largest array in it, for a plain instruction all of its arrays.
    """
    found: dict[str, dict[str, int]] = {}
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.search(line)
        if not match:
            continue
        sizes = _array_bytes(match["type"])
        size = max(sizes, default=0) if match["start"] else sum(sizes)
        entry = found.setdefault(match["op"], {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += size
    return found


@dataclasses.dataclass
class Compiled:
    """What compiling one program for a slice gave, per chip."""

    name: str
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    compile_sec: float
    collectives: dict[str, dict[str, int]]
    # The compiler's message when the program needs more HBM than the chip has; the
    # temporaries it asked for are then in temp_bytes, and nothing else is known.
    out_of_memory: str = ""

    @property
    def total_bytes(self) -> int:
        """Peak HBM: arguments, outputs not aliased to (donated) arguments, temps, code."""
        return (
            self.argument_bytes
            + self.output_bytes
            - self.alias_bytes
            + self.temp_bytes
            + self.code_bytes
        )


_OUT_OF_MEMORY = re.compile(
    r"HLO temporaries \((?P<needed>[\d.]+)(?P<unit>[KMGT])\) exceeds available HBM"
)


def parse_out_of_memory(name: str, error: Exception, seconds: float) -> Compiled | None:
    """A `Compiled` for XLA's "ran out of memory on HBM", else None."""
    message = str(error)
    match = _OUT_OF_MEMORY.search(message)
    if "RESOURCE_EXHAUSTED" not in message or not match:
        return None
    unit = 2 ** (10 * "KMGT".index(match["unit"]) + 10)
    needed = int(float(match["needed"]) * unit)
    first_line = message.strip().splitlines()[0]
    return Compiled(name, 0, 0, 0, needed, 0, seconds, {}, out_of_memory=first_line)


def compile_program(name: str, lowered_fn: Callable[[], Any]) -> Compiled:
    """Compile `lowered_fn()` and read its memory and collectives.

    A program that needs more HBM than the chip has does not compile; the compiler's
    figure for its temporaries is returned instead (`out_of_memory` says so).
    """
    start = time.perf_counter()
    try:
        compiled = lowered_fn().compile()
    except Exception as e:
        report = parse_out_of_memory(name, e, time.perf_counter() - start)
        if report is None:
            raise
        return report
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    return Compiled(
        name=name,
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        code_bytes=int(memory.generated_code_size_in_bytes),
        compile_sec=seconds,
        collectives=collectives(compiled.as_text() or ""),
    )


def compile_recipe(
    config: Any, devices: list[Any], encoders: bool = True
) -> dict[str, Any]:
    """Compile the trainer's step (and evaluation encoders) for `devices`; a report."""
    validate_config(config, num_devices=len(devices), check_data=False)
    if config.train.distill_from:
        raise ConfigError(
            "jaxclip.aot does not compile distillation runs yet (train.distill_from="
            f"{config.train.distill_from!r}): compile the student alone"
        )
    mesh = sharding.make_mesh(config.mesh.shape, devices)
    platform = devices[0].platform
    model = model_from_config(config, platform)
    tx = make_optimizer(config)
    state, state_shardings = abstract_train_state(
        model, tx, mesh, ema=ema.enabled(config)
    )
    train_step = make_train_step(
        config, model, tx, learning_rate_schedule(config), mesh, state_shardings
    )
    step_batch = step_batch_spec(config, mesh)
    with sharding.use_mesh(mesh):
        programs = [
            compile_program("train_step", lambda: train_step.lower(state, step_batch))
        ]
        if encoders:
            programs += compile_encoders(
                config, model, mesh, state, example_batch(config)
            )
    chips = len(devices)
    analytic = mfu.analytic_flops(
        get_model_config(config.model.name),
        config.train.batch_size,
        config.model.patch_dropout,
    )
    return {
        "model": config.model.name,
        "chips": chips,
        "device_kind": devices[0].device_kind,
        "mesh": dict(mesh.shape),
        "batch_size": config.train.batch_size,
        "local_batch": config.train.batch_size // sharding.batch_shards(mesh),
        "accum_steps": config.train.accum_steps,
        "remat": config.model.remat,
        "scan": bool(model.scan),
        "dtype": config.model.dtype,
        "loss": f"{config.loss.name}/{config.loss.impl}",
        "chunk_size": config.loss.chunk_size,
        "params": count_params(state.params),
        "flops_per_chip": analytic / chips,
        "flops_per_chip_source": "analytic (3 x forward + the loss's logits)",
        "programs": {
            p.name: {**dataclasses.asdict(p), "total_bytes": p.total_bytes}
            for p in programs
        },
        "jax": jax.__version__,
    }


def compile_encoders(
    config: Any, model: Any, mesh: Any, state: Any, batch_spec: dict[str, Any]
) -> list[Compiled]:
    """The evaluation encoders, compiled on a batch of the global batch size."""
    batch = {
        name: jax.ShapeDtypeStruct(
            spec.shape, spec.dtype, sharding=sharding.batch_sharding(mesh, spec.ndim)
        )
        for name, spec in batch_spec.items()
    }
    encode_images, encode_texts = make_encoders(
        model, config.data.mean, config.data.std
    )
    variables = {"params": state.params}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    return [
        compile_program(
            "encode_images", lambda: encode_images.lower(variables, batch["images"])
        ),
        compile_program(
            "encode_texts", lambda: encode_texts.lower(variables, batch["tokens"])
        ),
    ]


def fits(report: dict[str, Any], hbm: float | None, headroom: float) -> bool | None:
    """Whether the train step fits `hbm` bytes less `headroom` (a fraction)."""
    step = report["programs"]["train_step"]
    if step["out_of_memory"]:
        return False
    if hbm is None:
        return None
    return step["total_bytes"] <= hbm * (1 - headroom)


def search_max_batch(
    fits_at: Callable[[int], bool], start: int, step: int, resolution: float = 1 / 16
) -> int:
    """The largest multiple of `step` for which `fits_at` holds, by doubling from
    `start` and then bisection; 0 if not even `step` fits.

    Assumes memory grows with the batch (what fits at b fits below b). Stops when the
    gap between the largest batch that fits and the smallest that does not is at most
    `resolution` of the former (or one `step`).
    """
    start = max(step, start // step * step)
    if fits_at(start):
        low, high = start, 2 * start
        while fits_at(high):
            low, high = high, 2 * high
    else:
        low, high = 0, start
        while low == 0 and high > step:
            candidate = max(step, high // 2 // step * step)
            if fits_at(candidate):
                low = candidate
            else:
                high = candidate
        if low == 0:
            return 0
    while high - low > max(step, low * resolution):
        middle = (low + high) // 2 // step * step
        if middle <= low:
            break
        if fits_at(middle):
            low = middle
        else:
            high = middle
    return low


def find_max_batch(
    config: Any,
    devices: list[Any],
    hbm: float,
    headroom: float,
    micro_batch: int = 0,
    resolution: float = 1 / 16,
    log: Callable[[str], None] = print,
    known: dict[int, bool] | None = None,
) -> tuple[int, list[dict[str, Any]]]:
    """The largest global batch whose train step fits; returns it and every trial.

    Batches stay multiples of (batch shards x accum_steps), so each is a valid config.
    With `micro_batch` > 0 each trial sets `accum_steps` to keep that many rows per
    batch shard in a micro-batch (GradCache), instead of keeping `accum_steps`.
    `known` maps batches already compiled with these settings to whether they fit.
    """
    config = config.copy_and_resolve_references()
    shards = sharding.batch_shards(sharding.make_mesh(config.mesh.shape, devices))
    rows_per_step = micro_batch or config.train.accum_steps
    trials: list[dict[str, Any]] = []

    def fits_at(batch: int) -> bool:
        if known and batch in known:
            return known[batch]
        config.train.batch_size = batch
        if micro_batch:
            config.train.accum_steps = batch // shards // micro_batch
        program = compile_recipe(config, devices, encoders=False)["programs"]
        program = program["train_step"]
        ok = bool(fits({"programs": {"train_step": program}}, hbm, headroom))
        trials.append(
            {
                "batch_size": batch,
                "accum_steps": config.train.accum_steps,
                "total_bytes": program["total_bytes"],
                "temp_bytes": program["temp_bytes"],
                "argument_bytes": program["argument_bytes"],
                "out_of_memory": bool(program["out_of_memory"]),
                "fits": ok,
                "compile_sec": program["compile_sec"],
            }
        )
        shown = _gib(program["total_bytes"]) + " GiB"
        if program["out_of_memory"]:
            shown = f"temps alone {shown} (out of memory)"
        verdict = "fits" if ok else "does not fit"
        log(
            f"  batch {batch:>12,} (accum_steps {config.train.accum_steps}): {shown}, "
            f"{verdict} ({program['compile_sec']:.0f} s)"
        )
        return ok

    start = config.train.batch_size
    best = search_max_batch(fits_at, start, shards * rows_per_step, resolution)
    return best, trials


def _gib(value: float) -> str:
    return f"{value / GIB:.2f}"


def format_report(report: dict[str, Any], hbm: float | None, headroom: float) -> str:
    """The report as the table `python -m jaxclip.aot` prints."""
    lines = [
        f"{report['model']} on {report['topology']} ({report['chips']} x "
        f"{report['device_kind']}, HBM {_gib(hbm) if hbm else '?'} GiB each), "
        f"mesh {report['mesh']}",
        f"global batch {report['batch_size']:,} ({report['local_batch']:,} per batch "
        f"shard), accum_steps {report['accum_steps']}, remat {report['remat']}, "
        f"scan {report['scan']}, {report['dtype']}, loss {report['loss']} "
        f"(chunk {report['chunk_size']}), {report['params']:,} parameters",
        "",
        f"{'program':<14}{'args':>9}{'outputs':>9}{'aliased':>9}{'temp':>9}"
        f"{'code':>8}{'total':>9}{'compile':>10}",
        f"{'':<14}{'GiB':>9}{'GiB':>9}{'GiB':>9}{'GiB':>9}{'GiB':>8}{'GiB':>9}"
        f"{'s':>10}",
    ]
    for name, p in report["programs"].items():
        if p["out_of_memory"]:
            lines.append(f"{name:<14}{p['out_of_memory']}")
            continue
        lines.append(
            f"{name:<14}{_gib(p['argument_bytes']):>9}{_gib(p['output_bytes']):>9}"
            f"{_gib(p['alias_bytes']):>9}{_gib(p['temp_bytes']):>9}"
            f"{_gib(p['code_bytes']):>8}{_gib(p['total_bytes']):>9}"
            f"{p['compile_sec']:>10.1f}"
        )
    step = report["programs"]["train_step"]
    if step["out_of_memory"]:
        lines += ["", "does not fit: " + step["out_of_memory"]]
    elif hbm:
        budget = hbm * (1 - headroom)
        margin = budget - step["total_bytes"]
        verdict = (
            f"fits: {_gib(step['total_bytes'])} of {_gib(budget)} GiB "
            f"({_gib(hbm)} GiB HBM less {headroom:.0%} headroom)"
            if margin >= 0
            else f"does not fit by {_gib(-margin)} GiB ({_gib(step['total_bytes'])} "
            f"against {_gib(budget)} GiB: {_gib(hbm)} GiB HBM less {headroom:.0%})"
        )
        lines += ["", verdict]
    lines.append(
        f"FLOPs per chip per step: {report['flops_per_chip'] / 1e12:.4g} TFLOP "
        f"({report['flops_per_chip_source']})"
    )
    found = ", ".join(
        f"{kind} x{entry['count']} ({entry['bytes'] / 2**20:,.1f} MiB)"
        for kind, entry in sorted(step["collectives"].items())
    )
    lines.append(
        "collectives in train_step (each as written; loop bodies once): "
        + (found or "none")
    )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    """`python -m jaxclip.aot`: compile a recipe for a slice, print, write JSON."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    options = flags.FLAGS
    devices = topology_devices(options.topology)
    hbm = hbm_bytes(devices[0], options.hbm_gib)
    if hbm is None and options.find_max_batch:
        raise app.UsageError(
            f"no HBM size known for {devices[0].device_kind!r}: pass --hbm_gib"
        )
    config = options.config
    try:
        report = compile_recipe(config, devices, encoders=options.encoders)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    report["topology"] = options.topology
    report["hbm_bytes"] = hbm
    report["headroom"] = options.headroom
    report["fits"] = fits(report, hbm, options.headroom)
    print(format_report(report, hbm, options.headroom), flush=True)
    if options.find_max_batch:
        accumulation = (
            f"micro-batches of {options.micro_batch} rows per batch shard"
            if options.micro_batch
            else f"accum_steps {config.train.accum_steps}"
        )
        print(
            f"\nlargest global batch that fits (remat {config.model.remat}, "
            f"{accumulation}):",
            flush=True,
        )
        best, trials = find_max_batch(
            config,
            devices,
            hbm,
            options.headroom,
            micro_batch=options.micro_batch,
            resolution=options.resolution,
            # The report above compiled the config's own batch (same settings unless
            # --micro_batch changes accum_steps).
            known={}
            if options.micro_batch
            else {config.train.batch_size: report["fits"]},
        )
        report["max_batch"] = {"batch_size": best, "trials": trials}
        print(f"max global batch: {best:,} ({best // len(devices):,} per chip)")
    if options.json:
        os.makedirs(os.path.dirname(os.path.abspath(options.json)), exist_ok=True)
        with open(options.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {options.json}")


def _define_flags() -> None:
    config_flags.DEFINE_config_file(
        "config", None, "Recipe: a config file with get_config(arg).", lock_config=True
    )
    flags.DEFINE_string("topology", None, "TPU slice, e.g. v5p:2x2x2 or v6e:16x16.")
    flags.DEFINE_float("hbm_gib", 0.0, "HBM per chip in GiB (0: the table's).")
    flags.DEFINE_float("headroom", 0.1, "Fraction of HBM kept free to call it a fit.")
    flags.DEFINE_bool("encoders", True, "Also compile the evaluation encoders.")
    flags.DEFINE_bool(
        "find_max_batch", False, "Search for the largest batch that fits."
    )
    flags.DEFINE_integer(
        "micro_batch",
        0,
        "With --find_max_batch: rows per batch shard in a micro-batch; accum_steps "
        "follows the batch (0: keep the config's accum_steps).",
    )
    flags.DEFINE_float(
        "resolution", 1 / 16, "With --find_max_batch: stop within this fraction."
    )
    flags.DEFINE_string("json", "", "Write the report here as JSON.")
    flags.mark_flags_as_required(["config", "topology"])


if __name__ == "__main__":
    _define_flags()
    app.run(main)
