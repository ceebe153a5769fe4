"""The ring over the batch axes: blocks travel one device per step round the devices
that split the batch, so every device meets every block and none holds them all.

The ring losses and the ring accuracy (`jaxclip/losses.py`) and sharded retrieval
(`jaxclip/evaluate/retrieval.py`) all run through `Ring.run`, under `jax.shard_map`:
each device keeps its own rows, a block (text embeddings, retrieval keys) moves on
with `ppermute` after each step, and "riders" (statistics that belong to the block,
such as its column log-sum-exps or its gradient) travel with it and come home with it.

Loop or unrolled (`use_loop`, the one place that decides):
- On TPU and GPU the R steps (R = number of batch shards) are a `lax.fori_loop`: the
  program has one step's code whatever R is, so compile time and memory stay flat
  from 8 chips to a pod, and each step's send overlaps its compute.
- On XLA:CPU with several devices the steps are unrolled in Python: XLA:CPU can run a
  collective inside a while loop and one outside it in different orders on different
  devices, and deadlock (the same reason layer stacks unroll there:
  `jaxclip.models.build.use_scan`). R is at most the CPU device count there.
`forced("loop")` / `forced("unrolled")` override the choice while tracing (tests and
benchmarks use it).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp

from jaxclip.sharding import batch_axes, batch_shards

# Float32 passes on TPU too; the default precision there would multiply in bf16.
PRECISION = jax.lax.Precision.HIGHEST

RING_MODES = ("auto", "loop", "unrolled")
_forced_mode = "auto"


@contextlib.contextmanager
def forced(mode: str) -> Iterator[None]:
    """Trace rings as `mode` ('loop', 'unrolled' or 'auto') inside this context."""
    global _forced_mode
    if mode not in RING_MODES:
        raise ValueError(f"ring mode {mode!r} is not one of {RING_MODES}")
    previous, _forced_mode = _forced_mode, mode
    try:
        yield
    finally:
        _forced_mode = previous


def use_loop(platform: str, size: int) -> bool:
    """Whether a ring of `size` devices of `platform` runs as a loop (else unrolled)."""
    if _forced_mode != "auto":
        return _forced_mode == "loop"
    return platform != "cpu" or size == 1


def after(tree: Any, dependency: jax.Array | None) -> Any:
    """`tree`, whose float arrays cannot be used before `dependency` is computed.

    Used where XLA must not move a send earlier: each unrolled step sends its block
    once the step before has finished (else XLA could start all R sends at once and
    keep every block alive), and a backward pass's blocks depend on the cotangent (else
    XLA could merge them with the forward pass's sends and keep those blocks alive
    from one pass to the other). `optimization_barrier` says the same, but XLA:CPU
    drops barriers before it schedules. A multiply by `1 + 0·d` (d made finite) is
    exactly one, and XLA cannot fold it.
    """
    if dependency is None:
        return tree
    scalar = jnp.ravel(dependency)[0].astype(jnp.float32)
    one = 1.0 + 0.0 * jnp.where(jnp.isfinite(scalar), scalar, 0.0)

    def tie(x):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        return x * one.astype(x.dtype)

    return jax.tree.map(tie, tree)


def matmul32(a: jax.Array, b: jax.Array) -> jax.Array:
    """`a @ b` in float32 at full precision, whatever the inputs' dtype."""
    return jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32), precision=PRECISION)


def better(value, index, best_value, best_index):
    """Whether (value, index) beats the best so far: larger, or equal at a lower index."""
    return (value > best_value) | ((value == best_value) & (index < best_index))


StepFn = Callable[[Any, Any, Any, Any], tuple[Any, Any]]


@dataclasses.dataclass(frozen=True)
class Ring:
    """The ring over the batch axes of a mesh: its axes, size R, and loop choice."""

    axes: tuple[str, ...]
    size: int
    loop: bool

    @classmethod
    def of(cls, mesh: Any = None) -> Ring:
        """The ring of `mesh`, or of the mesh in context (`jax.set_mesh`)."""
        if mesh is None:
            mesh = jax.sharding.get_abstract_mesh()
            if not mesh.axis_names:
                raise ValueError("a ring needs a mesh in context (jax.set_mesh(mesh))")
        abstract = getattr(mesh, "abstract_mesh", mesh)
        platform = abstract.abstract_device.platform if abstract.abstract_device else ""
        size = batch_shards(mesh)
        return cls(batch_axes(mesh), size, use_loop(platform or "cpu", size))

    def index(self) -> jax.Array:
        """This device's position in the ring (inside `shard_map`)."""
        if not self.axes:
            return jnp.zeros((), jnp.int32)
        return jax.lax.axis_index(self.axes)

    def source(self, step) -> jax.Array:
        """The ring position whose block this device holds at `step`."""
        return (self.index() + step) % self.size

    def shift(self, tree: Any) -> Any:
        """Send every array one step round the ring: device i receives from i + 1.

        16-bit floats travel as their bits: XLA otherwise hoists the float32 convert
        that the next step needs above the ppermute, and sends twice the bytes.
        """
        if not self.axes:
            return tree
        perm = [(i, (i - 1) % self.size) for i in range(self.size)]

        def send(x):
            if x.dtype.itemsize != 2 or not jnp.issubdtype(x.dtype, jnp.floating):
                return jax.lax.ppermute(x, self.axes, perm)
            bits = jax.lax.bitcast_convert_type(x, jnp.uint16)
            bits = jax.lax.ppermute(bits, self.axes, perm)
            return jax.lax.bitcast_convert_type(bits, x.dtype)

        return jax.tree.map(send, tree)

    def _varying(self, tree: Any) -> Any:
        """`tree` typed as varying over the ring axes, as a loop carry must be.

        Under shard_map a value built from constants (a zero gradient sum) is the same
        on every device; a loop whose body makes it per-device needs it so from the
        start.
        """

        def cast(x):
            varying = jax.typeof(x).manual_axis_type.varying
            missing = tuple(a for a in self.axes if a not in varying)
            return jax.lax.pcast(x, missing, to="varying") if missing else x

        return jax.tree.map(cast, tree)

    def run(
        self,
        step_fn: StepFn,
        carry: Any,
        block: Any,
        riders: Any = (),
        wait_for: jax.Array | None = None,
        unroll: int = 1,
    ):
        """Meet every block once: `(carry, riders)` after R steps.

        `step_fn(step, carry, block, riders) -> (carry, riders)` does one step's work
        with the block held now (it came from ring position `source(step)`); `carry`
        stays on this device, `riders` move on with the block. After each step but the
        last, block and riders go one device on; after the last, the block is back
        home without a send and only the riders make their last hop, so the returned
        riders belong to this device's own block. `step` is a Python int when
        unrolled and a traced int32 in the loop. Unrolled, the first send waits for
        `wait_for` (see `after`): a backward pass passes its cotangent. (A loop's
        sends take the loop's own buffers, which XLA cannot merge with another's.)
        `unroll` steps share one loop iteration: with 2, XLA:TPU alternates the
        carried buffers between the two instead of copying them back each step.
        """
        last = self.size - 1
        if self.loop:

            def body(step, state):
                carry, block, riders = state
                carry, riders = step_fn(step, carry, block, riders)
                block, riders = self.shift((block, riders))
                return carry, block, riders

            state = self._varying((carry, block, riders))
            carry, block, riders = jax.lax.fori_loop(
                0, last, body, state, unroll=unroll
            )
            carry, riders = step_fn(jnp.int32(last), carry, block, riders)
            return carry, self.shift(riders)
        block = after(block, wait_for)
        for step in range(self.size):
            carry, riders = step_fn(step, carry, block, riders)
            if step < last:
                # The next send waits for this step (see `after`).
                block = after(block, jax.tree.leaves(carry)[0])
                block, riders = self.shift((block, riders))
        return carry, self.shift(riders)
