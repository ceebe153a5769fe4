"""ViT-L-14 with the CLIP paper's setup (`common.clip_paper`), for a TPU v5p-128 slice.

Remat 'full': 'dots' needs more HBM than a chip has (docs/tpu.md).

    python -m jaxclip.aot --config=configs/vit_l14.py --topology=v5p:4x4x4

    python -m jaxclip.train --config=configs/vit_l14.py --workdir=/path/to/workdir \
        --config.data.path='/data/shards/{00000..41407}.tar'
"""

from __future__ import annotations

import ml_collections

from jaxclip.config import load_beside

common = load_beside(__file__, "common.py")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """ViT-L-14 recipe; `arg` is unused."""
    del arg
    config = common.clip_paper("ViT-L-14")
    config.model.remat = "full"  # fits v5p-128 with headroom (docs/tpu.md)
    return config
