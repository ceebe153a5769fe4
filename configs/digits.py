"""Real data: a small CLIP learns handwritten digits from captions, from scratch.

scikit-learn's bundled digits (1,797 real 8x8 scans, 16 grey levels, shipped inside
the scikit-learn wheel) upsampled to 32x32, captioned "a photo of the number seven",
"a handwritten digit seven", ... Trains on the 1,438-image train split and reports
zero-shot accuracy over the ten digits on the 359 held-out scans (chance: 10%), plus
the CLIP paper's linear probe on the frozen image features. Needs scikit-learn
(`pip install -e ".[digits]"`).

    python -m jaxclip.train --config=configs/digits.py --workdir=/tmp/jaxclip-digits
"""

from __future__ import annotations

import ml_collections

from jaxclip.config import base_config
from jaxclip.evaluate import evaluators


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The digits recipe; `arg` is unused."""
    del arg
    config = base_config()
    config.model.name = "demo-vit"  # 32x32 images, 4x4 patches of 8 pixels
    config.model.scan = False  # unrolled layers: faster steps on the CPU
    config.data.source = "digits"
    config.data.crop = "random_resized"  # the scans fill the frame: mild scale jitter
    config.data.crop_scale = (0.8, 1.0)
    config.train.batch_size = 128
    config.train.steps = 600  # about 53 epochs of the train split
    config.optim.lr = 1e-3
    config.optim.warmup_steps = 50
    config.optim.weight_decay = 0.1
    config.checkpoint.every_steps = 200
    config.checkpoint.keep = 2
    config.log.every_steps = 50

    # Zero-shot on the held-out scans every 200 steps (and so at the end), keeping the
    # best step; the linear probe once, at the end.
    config.evals.digits = evaluators.spec(
        "zeroshot", "digits", split="test", every_steps=200
    )
    config.evals.digits_probe = evaluators.spec(
        "linear_probe", "digits", split="test", train_split="train"
    )
    config.checkpoint.best_metric = "digits/top1"
    return config
