"""ViT-B-16 with the CLIP paper's setup (`common.clip_paper`), for a TPU v5p-128 slice.

Remat 'dots': without it the activations of the 197-token stack come close to the
whole HBM (docs/tpu.md).

    python -m jaxclip.aot --config=configs/vit_b16.py --topology=v5p:4x4x4

    python -m jaxclip.train --config=configs/vit_b16.py --workdir=/path/to/workdir \
        --config.data.path='/data/shards/{00000..41407}.tar'
"""

from __future__ import annotations

import ml_collections

from jaxclip.config import load_beside

common = load_beside(__file__, "common.py")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """ViT-B-16 recipe; `arg` is unused."""
    del arg
    config = common.clip_paper("ViT-B-16")
    config.model.remat = "dots"  # fits v5p-128 with headroom (docs/tpu.md)
    return config
