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

from jaxclip.config import load_beside
from jaxclip.evaluate import evaluators

common = load_beside(__file__, "common.py")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The digits recipe; `arg` is unused."""
    del arg
    config = common.small_cpu_run()  # demo-vit: 32x32 images, like the upsampled scans
    config.data.source = "digits"
    config.data.crop = "random_resized"  # the scans fill the frame: mild scale jitter
    config.data.crop_scale = (0.8, 1.0)
    config.train.steps = 600  # about 53 epochs of the train split
    config.checkpoint.every_steps = 200
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
