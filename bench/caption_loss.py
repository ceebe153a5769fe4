"""CoCa's caption loss: temp memory of the head's loss and gradient, per device.

Compiles `value_and_grad` of a bf16 vocabulary head (`[b, 75, 512] @ [512, 49408]`,
the logits of coca_ViT-B-32's decoder) and its caption loss, for one device, without
allocating anything, and reads `compiled.memory_analysis().temp_size_in_bytes`:
`losses.caption_loss` (a custom VJP: the logits as they came and a `[b, L]`
log-sum-exp) against plain autodiff of `log_softmax` in float32. Prints the temp
bytes as a multiple of the bf16 logits' bytes. `--topology` compiles for one chip of
a TPU slice with XLA's TPU compiler (libtpu, deviceless; what docs/coca.md quotes);
without it, for this machine's CPU, whose compiler fuses less.

    python bench/caption_loss.py --topology=v5p:2x2x1 --batch=32
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxclip import losses

LENGTH, VOCAB, WIDTH = 75, 49408, 512
MIB = 2**20


def autodiff_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """The textbook version: float32 log_softmax, a gather, a masked mean."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    nll = -jnp.take_along_axis(log_probs, labels[..., None], -1)[..., 0]
    valid = labels != losses.PAD_ID
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.sum(valid)


def caption_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return losses.caption_loss(logits, labels)[0]


def head_step(loss_fn):
    """Loss and gradients of the head's input and kernel, through bf16 logits."""

    def loss(tokens, kernel, labels):
        logits = tokens.astype(jnp.bfloat16) @ kernel.astype(jnp.bfloat16)
        return loss_fn(logits, labels)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32, help="rows per device")
    parser.add_argument("--topology", default="", help="e.g. v5p:2x2x1 (deviceless)")
    options = parser.parse_args()
    devices = jax.devices()[:1]
    if options.topology:
        from jaxclip.aot import topology_devices

        devices = topology_devices(options.topology)[:1]
    where = NamedSharding(Mesh(np.array(devices), ("d",)), P())
    shapes = (
        ((options.batch, LENGTH, WIDTH), jnp.float32),
        ((WIDTH, VOCAB), jnp.float32),
        ((options.batch, LENGTH), jnp.int32),
    )
    args = [jax.ShapeDtypeStruct(s, d, sharding=where) for s, d in shapes]
    logits_bytes = options.batch * LENGTH * VOCAB * 2
    print(
        f"{devices[0].device_kind}, logits [{options.batch}, {LENGTH}, {VOCAB}] bf16: "
        f"{logits_bytes / MIB:.0f} MiB"
    )
    for name, fn in (
        ("log_softmax autodiff", autodiff_loss),
        ("caption_loss", caption_loss),
    ):
        memory = head_step(fn).lower(*args).compile().memory_analysis()
        temp = memory.temp_size_in_bytes
        print(
            f"  {name:22s} temp {temp / MIB:8.0f} MiB = {temp / logits_bytes:.2f}x "
            "the bf16 logits"
        )


if __name__ == "__main__":
    main()
