"""CoCa demo: a small CoCa learns to describe coloured shapes, on 2 CPU cores in
minutes.

Built-in data (drawn on the fly, nothing to download). The model (`demo-coca`)
trains with OpenCLIP's CoCa loss: the contrastive loss plus twice the captioning
loss. At the end it captions 1,000 held-out images with greedy decoding and reports
the fraction captioned exactly right (`captions/exact_match`, with BLEU-4 and
CIDEr-D), beside zero-shot shape x colour classification (`zeroshot/top1`).

    python -m jaxclip.train --config=configs/coca_demo.py --workdir=/tmp/jaxclip-coca
"""

from __future__ import annotations

import ml_collections

from jaxclip.config import load_beside
from jaxclip.evaluate import evaluators

common = load_beside(__file__, "common.py")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The CoCa demo recipe; `arg` is unused."""
    del arg
    config = common.small_cpu_run()
    config.model.name = "demo-coca"
    config.data.source = "shapes"
    # Batch 64 at twice the CLIP demo's learning rate: each step's 49,408-way caption
    # softmax over every token dominates the CPU's time, so fewer, smaller steps.
    config.train.batch_size = 64
    config.optim.lr = 2e-3
    config.train.steps = 600
    config.checkpoint.every_steps = 200
    config.log.every_steps = 50
    config.evals.zeroshot = evaluators.spec("zeroshot", "shapes", num_examples=1000)
    # Every shapes caption is at most 10 tokens with its start and end tokens.
    config.evals.captions = evaluators.spec(
        "captioning", "shapes", num_examples=1000, max_len=12
    )
    return config
