"""coca_ViT-B-32 (OpenCLIP's CoCa) with the CLIP paper's setup (`common.clip_paper`),
for a TPU v5p-128 slice, with OpenCLIP's CoCa loss: the contrastive loss (ring, over
the global batch of 32,768) plus twice the captioning loss (`loss.clip_weight` 1.0,
`loss.caption_weight` 2.0, OpenCLIP's `--coca-contrastive-loss-weight` and
`--coca-caption-loss-weight` defaults). Its per-chip memory is in docs/tpu.md.

    python -m jaxclip.aot --config=configs/coca_b32.py --topology=v5p:4x4x4

    python -m jaxclip.train --config=configs/coca_b32.py --workdir=/path/to/workdir \\
        --config.data.path='/data/shards/{00000..41407}.tar'

Fine-tuning a pretrained CoCa as a captioner, as OpenCLIP's README does on COCO
(contrastive weight 0, caption weight 1, lr 1e-5, batch 128):
`--config.model.init_from=/path/to/coca --config.loss.clip_weight=0.0
--config.loss.caption_weight=1.0 --config.optim.lr=1e-5 --config.train.batch_size=128`.
"""

from __future__ import annotations

import ml_collections

from jaxclip.config import load_beside

common = load_beside(__file__, "common.py")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """coca_ViT-B-32 recipe; `arg` is unused."""
    del arg
    config = common.clip_paper("coca_ViT-B-32")
    config.loss.clip_weight = 1.0
    config.loss.caption_weight = 2.0
    return config
