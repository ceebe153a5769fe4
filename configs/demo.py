"""Demo: a small CLIP learns coloured shapes from captions, on 2 CPU cores in minutes.

Built-in data (drawn on the fly, nothing to download). Ends with zero-shot
classification of shape x colour on held-out images, written as `zeroshot/top1`.

    python -m jaxclip.train --config=configs/demo.py --workdir=/tmp/jaxclip-demo
"""

from __future__ import annotations

import ml_collections

from jaxclip.data.transforms import OPENAI_MEAN, OPENAI_STD


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The demo recipe; `arg` is unused."""
    del arg
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.model = ml_collections.ConfigDict()
    config.model.name = "demo-vit"
    config.model.dtype = "float32"
    config.model.scan = False  # unrolled layers: faster steps on the CPU
    config.model.remat = "none"

    config.loss = ml_collections.ConfigDict()
    config.loss.name = "clip"
    config.loss.impl = "dense"

    config.data = ml_collections.ConfigDict()
    config.data.source = "shapes"
    config.data.mean = OPENAI_MEAN
    config.data.std = OPENAI_STD

    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 128
    config.train.steps = 1000

    config.optim = ml_collections.ConfigDict()
    config.optim.lr = 1e-3
    config.optim.end_lr = 0.0
    config.optim.warmup_steps = 100
    config.optim.b1 = 0.9
    config.optim.b2 = 0.98
    config.optim.eps = 1e-6
    config.optim.weight_decay = 0.1
    config.optim.grad_clip_norm = 1.0

    config.mesh = ml_collections.ConfigDict()
    config.mesh.shape = (-1, 1, 1)  # all devices on 'data'

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 500
    config.checkpoint.keep = 2
    config.checkpoint.async_save = True

    config.log = ml_collections.ConfigDict()
    config.log.every_steps = 50

    config.eval = ml_collections.ConfigDict()
    config.eval.zeroshot = True  # shape x colour on held-out images, after training
    config.eval.num_examples = 1000
    config.eval.every_steps = 0  # 0: only at the end
    return config
