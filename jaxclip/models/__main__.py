"""`python -m jaxclip.models [--json]`: registered architectures and their sizes.

Counts come from `jax.eval_shape`, so nothing is allocated, even for ViT-H-14.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from jaxclip.models.clip import CLIP
from jaxclip.models.registry import get_model_config, list_models
from jaxclip.train.state import count_params


def parameter_counts(name: str, logit_bias: bool = False) -> dict[str, int]:
    """{visual, text, total} parameter counts of a registered architecture.

    `total` includes the logit scale (and bias), as OpenCLIP counts it.
    """
    config = get_model_config(name)
    size = config.vision.image_size
    model = CLIP(config, logit_bias=logit_bias)
    shapes = jax.eval_shape(
        model.init,
        jax.random.key(0),
        jnp.zeros((1, size, size, 3)),
        jnp.zeros((1, config.text.context_length), jnp.int32),
    )["params"]
    return {
        "visual": count_params(shapes["visual"]),
        "text": count_params(shapes["text"]),
        "total": count_params(shapes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead")
    args = parser.parse_args()
    counts = {name: parameter_counts(name) for name in list_models()}
    if args.json:
        print(json.dumps(counts, indent=2))
        return
    print(f"{'model':<24}{'visual':>16}{'text':>16}{'total':>16}")
    for name, count in counts.items():
        print(
            f"{name:<24}{count['visual']:>16,}{count['text']:>16,}{count['total']:>16,}"
        )


if __name__ == "__main__":
    main()
