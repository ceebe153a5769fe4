"""SigLIP B/16 (`ViT-B-16-SigLIP`: MAP-pooled image tower, bidirectional text tower,
learned logit bias) trained from scratch with the sigmoid loss on the ring, at batch
32,768 on the CLIP paper's data (`common.clip_paper`), for a TPU v5p-128 slice with
remat 'dots' (docs/tpu.md).

The optimizer follows the SigLIP paper (Zhai et al. 2023, "Sigmoid Loss for Language
Image Pre-Training", sec. 4 and big_vision's `configs/proj/image_text/siglip_*`):
Adam(W) at lr 1e-3 with weight decay 1e-4, β2 = 0.95 for stability at large batch,
linear warm-up then cosine decay; the scale starts at 10 and the bias at -10; pixels
in [-1, 1]. The text is tokenized with SigLIP's 32k SentencePiece vocabulary:
`data.tokenizer` names a directory holding its `spiece.model` (an HF SigLIP
checkpoint's).

    python -m jaxclip.aot --config=configs/siglip_b16.py --topology=v5p:4x4x4

    python -m jaxclip.train --config=configs/siglip_b16.py --workdir=/path/to/workdir \
        --config.data.path='/data/shards/{00000..41407}.tar' \
        --config.data.tokenizer=/path/to/siglip-base-patch16-224
"""

from __future__ import annotations

import ml_collections

from jaxclip.config import load_beside
from jaxclip.data.transforms import HALF

common = load_beside(__file__, "common.py")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """SigLIP B/16 recipe; `arg` is unused."""
    del arg
    config = common.clip_paper("ViT-B-16-SigLIP")
    config.loss.name = "siglip"
    # SigLIP's 32k SentencePiece vocabulary: an HF SigLIP directory's spiece.model.
    config.data.tokenizer = "/data/siglip-base-patch16-224"
    config.data.mean = HALF
    config.data.std = HALF
    config.optim.lr = 1e-3
    config.optim.b2 = 0.95
    config.optim.weight_decay = 1e-4
    config.optim.warmup_steps = 5000
    config.model.remat = "dots"  # fits v5p-128 with headroom (docs/tpu.md)
    return config
