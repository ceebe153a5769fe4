"""ViT-B-32 with the CLIP paper's setup (`common.clip_paper`), for a TPU v5p-128 slice.

No remat: ViT-B-32's 50 tokens leave room (docs/tpu.md).

    python -m jaxclip.aot --config=configs/vit_b32.py --topology=v5p:4x4x4

    python -m jaxclip.train --config=configs/vit_b32.py --workdir=/path/to/workdir \
        --config.data.path='/data/shards/{00000..41407}.tar'
"""

from __future__ import annotations

import ml_collections

from jaxclip.config import load_beside

common = load_beside(__file__, "common.py")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """ViT-B-32 recipe; `arg` is unused."""
    del arg
    return common.clip_paper("ViT-B-32")
