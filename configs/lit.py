"""LiT: train a text tower against a locked, pretrained image tower.

Locked-image text Tuning (Zhai et al., "LiT: Zero-Shot Transfer with Locked-image text
Tuning", CVPR 2022, arXiv:2111.07991): the image tower of a pretrained model is locked
(no gradient, no update, no optimizer state: `train.freeze = ('visual/.*',)`), only
the text tower (and the temperature) trains, with the contrastive loss over the whole
global batch (the paper's Fig. 9: a global batch beats per-device ones). The paper
found locking the image tower better than fine-tuning it, and a locked text tower
worse.

The weights come from `model.init_from`, the recipe's argument: any source
`jaxclip.load` reads (a jaxclip workdir, an OpenCLIP file or directory, an HF
CLIPModel or SiglipModel directory). Both towers start from them, so this is the
paper's "LU" setting (its text tower pretrained, unlocked); `--config.train.
unlock_last=N` also trains the image tower's last N blocks and head (README, "Locked towers").
SigLIP weights train with the sigmoid loss, their pixel statistics and, for an HF
directory, their own tokenizer.

The optimizer settings are those of big_vision's reference LiT config
(`big_vision/configs/proj/image_text/lit_coco.py`): Adam, learning rate 1e-3 with
3% (at least 100) warm-up steps then cosine decay, weight decay 0.01, gradient
clipping at 1.0, batch 4,096, 5,000 steps (there on COCO captions). jaxclip's AdamW
scales the decay by the learning rate (optax.adamw).

    python -m jaxclip.train --config=configs/lit.py:/path/to/weights \
        --workdir=/path/to/workdir --config.data.source=csv \
        --config.data.path=/data/train.csv
"""

from __future__ import annotations

import ml_collections

from jaxclip.config import base_config
from jaxclip.convert import registered_architecture
from jaxclip.data.hf_tokenizer import has_tokenizer_files
from jaxclip.data.transforms import HALF
from jaxclip.models.registry import get_model_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """`arg`: the pretrained weights whose image tower is locked."""
    if not arg:
        raise ValueError(
            "configs/lit.py locks the image tower of pretrained weights: "
            "--config=configs/lit.py:/path/to/weights (a jaxclip workdir, an "
            "OpenCLIP file or directory, an HF CLIPModel or SiglipModel directory)"
        )
    config = base_config()
    config.model.name = registered_architecture(arg)
    config.model.init_from = arg
    config.model.dtype = "bfloat16"
    config.train.freeze = ("visual/.*",)
    if get_model_config(config.model.name).logit_bias:
        config.loss.name = "siglip"
        config.data.mean = HALF
        config.data.std = HALF
    if has_tokenizer_files(arg):
        config.data.tokenizer = arg
    config.data.source = "csv"  # or webdataset; set data.path
    config.loss.impl = "ring"  # the loss over the global batch, sharded
    config.train.batch_size = 4096
    config.train.steps = 5000
    config.optim.lr = 1e-3
    config.optim.weight_decay = 0.01
    config.optim.warmup_steps = max(int(0.03 * config.train.steps), 100)
    config.optim.grad_clip_norm = 1.0
    config.mesh.shape = (1, -1, 1)  # FSDP over every device
    config.checkpoint.every_steps = 1000
    return config
