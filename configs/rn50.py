"""RN50 with the CLIP paper's setup (`common.clip_paper`), for a TPU v5p-128 slice.

No remat, and plain data parallelism: BatchNorm nets (docs/tpu.md).

    python -m jaxclip.aot --config=configs/rn50.py --topology=v5p:4x4x4

    python -m jaxclip.train --config=configs/rn50.py --workdir=/path/to/workdir \
        --config.data.path='/data/shards/{00000..41407}.tar'
"""

from __future__ import annotations

import ml_collections

from jaxclip.config import load_beside

common = load_beside(__file__, "common.py")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """RN50 recipe; `arg` is unused."""
    del arg
    config = common.clip_paper("RN50")
    config.mesh.shape = (-1, 1, 1)  # BatchNorm nets: plain data parallelism
    return config
