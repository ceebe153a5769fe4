"""`python -m jaxclip.models [--json]`: registered architectures and their sizes.

Counts come from `jax.eval_shape`, so nothing is allocated, even for ViT-H-14.
"""

from __future__ import annotations

import argparse
import json

from jaxclip.models.build import create_model, parameter_counts
from jaxclip.models.registry import list_models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead")
    args = parser.parse_args()
    counts = {
        name: parameter_counts(create_model(name, sharded=False))
        for name in list_models()
    }
    if args.json:
        print(json.dumps(counts, indent=2))
        return
    print(f"{'model':<28}{'visual':>16}{'text':>16}{'decoder':>16}{'total':>16}")
    for name, count in counts.items():
        # Only CoCa has a text decoder.
        decoder = f"{count['text_decoder']:,}" if "text_decoder" in count else "-"
        print(
            f"{name:<28}{count['visual']:>16,}{count['text']:>16,}{decoder:>16}"
            f"{count['total']:>16,}"
        )


if __name__ == "__main__":
    main()
