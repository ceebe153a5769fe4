"""Fine-tune a SigLIP 2 checkpoint, a Hugging Face SiglipModel directory (e.g.
google/siglip2-base-patch16-224, downloaded), on your own image-caption pairs.

The directory gives the weights (`model.init_from`) and the tokenizer
(`data.tokenizer`); the architecture is the registered one with the directory's
shapes (ViT-B-16-SigLIP2 for siglip2-base-patch16-224; OpenCLIP's config, which runs
the image tower with exact GELU where HF's config says tanh GELU: the loader warns).
The settings are WiSE-FT's end-to-end fine-tuning (Wortsman et al. 2022: AdamW,
lr 3e-5, weight decay 0.1, batch 512, 500 warm-up steps then cosine), with SigLIP's
sigmoid loss, β2 0.95 and pixels in [-1, 1] (Zhai et al. 2023).

    python -m jaxclip.train \
        --config=configs/siglip2_finetune.py:/path/to/siglip2-base-patch16-224 \
        --workdir=/path/to/workdir --config.data.path=/data/train.csv

A webdataset instead: --config.data.source=webdataset --config.data.path='/data/{000..099}.tar'.
Without a checkpoint to download, `python -m jaxclip.convert.tiny_siglip2 DIR` makes a
tiny random one to try the whole path on (docs/siglip.md).
"""

from __future__ import annotations

import ml_collections

from jaxclip.config import base_config
from jaxclip.convert import registered_architecture
from jaxclip.data.transforms import HALF


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """`arg`: the SigLIP 2 directory to start from."""
    if not arg:
        raise ValueError(
            "configs/siglip2_finetune.py starts from a SigLIP 2 directory: "
            "--config=configs/siglip2_finetune.py:/path/to/siglip2-base-patch16-224 "
            "(`python -m jaxclip.convert.tiny_siglip2 DIR` makes a tiny one offline)"
        )
    config = base_config()
    config.model.name = registered_architecture(arg)
    config.model.init_from = arg
    config.model.dtype = "bfloat16"
    config.data.tokenizer = arg
    config.data.source = "csv"  # or webdataset; set data.path
    config.data.mean = HALF
    config.data.std = HALF
    config.loss.name = "siglip"
    config.train.batch_size = 512
    config.train.steps = 10_000
    config.optim.lr = 3e-5
    config.optim.b2 = 0.95
    config.optim.weight_decay = 0.1
    config.optim.warmup_steps = 500
    config.mesh.shape = (1, -1, 1)  # FSDP over every device
    config.checkpoint.every_steps = 1000
    return config
