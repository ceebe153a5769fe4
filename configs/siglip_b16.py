"""ViT-B-16 trained with the sigmoid (SigLIP) loss: learnable scale (init 10) and bias
(init -10), pixels normalised to [-1, 1], AdamW with weight decay 1e-4 (SigLIP paper,
Zhai et al. 2023), on the CLIP paper's batch and data (`common.clip_paper`), for a TPU
v5p-128 slice with remat 'dots' as for ViT-B-16 (docs/tpu.md).

    python -m jaxclip.aot --config=configs/siglip_b16.py --topology=v5p:4x4x4

    python -m jaxclip.train --config=configs/siglip_b16.py --workdir=/path/to/workdir \
        --config.data.path='/data/shards/{00000..41407}.tar'
"""

from __future__ import annotations

import ml_collections

from jaxclip.config import load_beside
from jaxclip.data.transforms import HALF

common = load_beside(__file__, "common.py")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """SigLIP-loss ViT-B-16 recipe; `arg` is unused."""
    del arg
    config = common.clip_paper("ViT-B-16")
    config.loss.name = "siglip"
    config.data.mean = HALF
    config.data.std = HALF
    config.optim.lr = 1e-3
    config.optim.b2 = 0.95
    config.optim.weight_decay = 1e-4
    config.optim.warmup_steps = 5000
    config.model.remat = "dots"  # fits v5p-128 with headroom (docs/tpu.md)
    return config
