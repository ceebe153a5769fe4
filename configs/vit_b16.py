"""ViT-B-16, following the CLIP paper: global batch 32,768, AdamW (0.9, 0.98, eps 1e-6),
weight decay 0.2, 2,000 warm-up steps, cosine decay, bf16 compute.

Target: a TPU v5p-128 slice (`v5p:4x4x4`: 64 chips, 512 samples per chip), with remat
'dots' (activations of the 197-token stack without it come close to the whole HBM); the
step compiled for it and its per-chip memory are in docs/tpu.md:

    python -m jaxclip.aot --config=configs/vit_b16.py --topology=v5p:4x4x4

    python -m jaxclip.train --config=configs/vit_b16.py --workdir=/path/to/workdir \
        --config.data.path='/data/shards/{00000..41407}.tar'
"""

from __future__ import annotations

import ml_collections

from jaxclip.config import clip_paper_recipe


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """ViT-B-16 recipe; `arg` is unused."""
    del arg
    config = clip_paper_recipe("ViT-B-16")
    config.model.remat = "dots"  # fits v5p-128 with headroom (docs/tpu.md)
    return config
