"""Demo: a small CLIP learns coloured shapes from captions, on 2 CPU cores in minutes.

Built-in data (drawn on the fly, nothing to download). Ends with zero-shot
classification of shape x colour on held-out images, written as `zeroshot/top1`.

    python -m jaxclip.train --config=configs/demo.py --workdir=/tmp/jaxclip-demo
"""

from __future__ import annotations

import ml_collections

from jaxclip.config import load_beside
from jaxclip.evaluate import evaluators

common = load_beside(__file__, "common.py")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The demo recipe; `arg` is unused."""
    del arg
    config = common.small_cpu_run()
    config.data.source = "shapes"
    config.train.steps = 300
    config.checkpoint.every_steps = 100
    config.log.every_steps = 25
    # Zero-shot shape x colour classification of 1,000 held-out images, at the end.
    config.evals.zeroshot = evaluators.spec("zeroshot", "shapes", num_examples=1000)
    return config
