"""ViT-L-14, following the CLIP paper: global batch 32,768, AdamW (0.9, 0.98, eps 1e-6),
weight decay 0.2, 2,000 warm-up steps, cosine decay, bf16 compute.

    python -m jaxclip.train --config=configs/vit_l14.py --workdir=gs://bucket/vit_l14 \
        --config.data.path='/data/shards/{00000..41407}.tar'
"""

from __future__ import annotations

import ml_collections

from jaxclip.config import clip_paper_recipe


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """ViT-L-14 recipe; `arg` is unused."""
    del arg
    return clip_paper_recipe("ViT-L-14")
