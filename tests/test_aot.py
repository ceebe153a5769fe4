"""Compiling for TPU slices without TPUs (jaxclip.aot): XLA's real TPU compiler, via
libtpu, on small topologies. Nothing runs; memory and collectives are the compiler's.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from process_util import child_env, run_python

from jaxclip import aot, losses, sharding
from jaxclip.evaluate import retrieval

pytest.importorskip("libtpu", reason="the tpu extra (libtpu) is not installed")


def _ring_loss_temp(topology: str, local: int, dim: int, chunk: int) -> tuple[int, int]:
    """(ring size, temp bytes per chip) of CLIP loss+grad compiled for `topology`."""
    devices = aot.topology_devices(topology)
    mesh = sharding.make_mesh((-1, 1, 1), devices)
    size = sharding.batch_shards(mesh)
    rows = NamedSharding(mesh, P(sharding.BATCH_AXES, None))
    embeddings = jax.ShapeDtypeStruct((local * size, dim), jnp.float32, sharding=rows)
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))

    def loss(image, text, log_scale):
        return losses.clip_loss(image, text, log_scale, impl="ring", chunk_size=chunk)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    with jax.set_mesh(mesh):
        compiled = step.lower(embeddings, embeddings, scalar).compile()
    return size, compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_ring_loss_memory_is_flat_in_the_ring_size():
    """The ring is a loop on TPU: per-chip temporaries are the same at R=8 and R=16,
    and stay within the ring's working set: six `[b, d]` float32 buffers (the text
    block and its gradient, each with the one in flight; the image gradient; one
    `[chunk, b]` tile, chunk = d here), i.e. 24 bytes per element of `[b, d]`.
    (R=4 needs less: its loop is too short for XLA to keep it a loop.)"""
    local, dim = 4096, 512
    size_8, temp_8 = _ring_loss_temp("v5p:2x2x2", local, dim, chunk=dim)
    size_16, temp_16 = _ring_loss_temp("v5p:4x4x1", local, dim, chunk=dim)
    assert (size_8, size_16) == (8, 16)
    assert temp_16 <= temp_8, (temp_8, temp_16)
    assert temp_8 <= 24 * local * dim, temp_8 / (local * dim)


def test_retrieval_ring_memory_is_flat_in_the_ring_size():
    """Sharded retrieval's ring compiles for TPU, with temporaries flat in R."""
    temps = []
    for topology in ("v5e:2x2", "v5e:4x4"):
        mesh = sharding.make_mesh((-1, 1, 1), aot.topology_devices(topology))
        size = sharding.batch_shards(mesh)
        rows = NamedSharding(mesh, P(sharding.BATCH_AXES, None))
        entries = NamedSharding(mesh, P(sharding.BATCH_AXES))
        count, dim, block = 2048 * size, 64, 256

        def spec(shape, dtype, where):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=where)

        compiled = retrieval._ranks.lower(
            spec((count, dim), jnp.float32, rows),
            spec((count, dim), jnp.float32, rows),
            spec((count,), jnp.int32, entries),
            spec((count,), jnp.int32, entries),
            mesh=mesh,
            ring=retrieval.Ring.of(mesh),
            num_chunks=count // size // block,
        ).compile()
        temps.append(compiled.memory_analysis().temp_size_in_bytes)
        # Bounded by the local queries' scores against one chunk of keys and the
        # travelling key block, far below the device's strip of the score matrix.
        strip = count // size * count * 4
        assert temps[-1] < strip / 16, (topology, temps[-1], strip)
    assert temps[1] <= temps[0], temps


@pytest.mark.slow
@pytest.mark.multiprocess
def test_command_compiles_the_trainers_step(tmp_path):
    """`python -m jaxclip.aot` on the demo recipe (ring loss) for v5e:2x2: it fits,
    the per-chip arguments hold the sharded state and batch, and the ring's sends are
    in the program. Starting it with libtpu installed prints no TPU start-up noise."""
    out = tmp_path / "report.json"
    command = [
        "-m",
        "jaxclip.aot",
        "--config=configs/demo.py",
        "--topology=v5e:2x2",
        "--config.loss.impl=ring",
        "--config.train.batch_size=64",
        "--encoders=false",
        f"--json={out}",
    ]
    done = run_python(*command, env=child_env(drop=("JAX_PLATFORMS",)))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fits:" in done.stdout
    for noise in ("TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE", "backend 'tpu'"):
        assert noise not in done.stderr, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["chips"] == 4 and report["fits"] is True
    step = report["programs"]["train_step"]
    assert step["collectives"]["collective-permute"]["count"] >= 2
    # Parameters and Adam's two moments, float32, split over 4 data-parallel chips
    # (replicated: the mesh is (4, 1, 1)), plus the uint8 images and int32 tokens.
    params = report["params"]
    batch_bytes = 64 // 4 * (32 * 32 * 3 + 24 * 4)  # demo-vit: 32 px, 24 tokens
    assert step["argument_bytes"] >= 3 * 4 * params + batch_bytes
    assert step["argument_bytes"] < 1.5 * (3 * 4 * params + batch_bytes)
    assert step["alias_bytes"] > 0  # the donated state


def test_search_max_batch_against_a_known_limit():
    """The doubling-then-bisection search finds the largest multiple of the step
    within the resolution, from above or below the limit."""
    calls = []

    def make(limit):
        def fits_at(batch):
            calls.append(batch)
            assert batch % 48 == 0
            return batch <= limit

        return fits_at

    for limit in (48, 1000, 4800, 123_457):
        for start in (48, 4800, 96_000):
            calls.clear()
            got = aot.search_max_batch(make(limit), start, 48, resolution=1 / 16)
            assert got <= limit and got % 48 == 0
            assert limit - got < max(48, got / 16) + 48, (limit, start, got)
            assert len(calls) < 30
    assert aot.search_max_batch(make(40), 96, 48) == 0


def test_collectives_and_out_of_memory_are_read_from_the_compiler():
    hlo = "\n".join(
        [
            "  %ag = bf16[8,1024]{1,0} all-gather(bf16[1,1024]{1,0} %p), dimensions={0}",
            "  %cp = (f32[64,32]{1,0}, f32[64,32]{1,0}, u32[], u32[]) "
            "collective-permute-start(f32[64,32]{1,0} %x), source_target_pairs={{0,1}}",
            "  %cpd = f32[64,32]{1,0} collective-permute-done(%cp)",
            "  %ar = (f32[], f32[10]{0}) all-reduce(f32[] %a, f32[10]{0} %b)",
        ]
    )
    assert aot.collectives(hlo) == {
        "all-gather": {"count": 1, "bytes": 8 * 1024 * 2},
        "collective-permute": {"count": 1, "bytes": 64 * 32 * 4},
        "all-reduce": {"count": 1, "bytes": 4 + 40},
    }
    error = RuntimeError(
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for "
        "HLO temporaries (514.60G) exceeds available HBM (95.74G)."
    )
    report = aot.parse_out_of_memory("train_step", error, 1.0)
    assert report.temp_bytes == math.floor(514.60 * 2**30)
    assert aot.fits({"programs": {"train_step": vars(report)}}, 1e15, 0.0) is False
    assert aot.parse_out_of_memory("x", RuntimeError("INTERNAL: other"), 1.0) is None


@pytest.mark.multiprocess
def test_no_tpu_probe_on_a_machine_without_one():
    """With libtpu installed, importing jaxclip keeps JAX on the CPU (no libtpu
    warnings, no failed TPU backend) where no accelerator is attached."""
    if aot_platform_has_accelerator():
        pytest.skip("this machine has an accelerator; JAX is rightly left alone")
    code = "import jaxclip, jax; print(jax.default_backend(), jax.device_count())"
    done = run_python("-c", code, env=child_env(drop=("JAX_PLATFORMS",)))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == "cpu"
    assert "TPU" not in done.stderr and "tpu" not in done.stderr, done.stderr


def aot_platform_has_accelerator() -> bool:
    from jaxclip import platforms

    return platforms.accelerator_attached()


def test_hbm_table_covers_the_topologies_named_in_the_docs():
    for topology in ("v5e:2x2", "v5p:2x2x2", "v6e:2x2"):
        device = aot.topology_devices(topology)[0]
        assert aot.hbm_bytes(device) > 0, device.device_kind
    assert np.isclose(aot.hbm_bytes(device, 7.0), 7.0 * 2**30)
