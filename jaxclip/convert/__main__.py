"""`python -m jaxclip.convert --from SRC --to DIR [--format openclip|hf] [--name ARCH] [--ema]`.

SRC is anything `jaxclip.load` reads: a jaxclip workdir or checkpoint, an OpenCLIP or
OpenAI weights file or directory, a Hugging Face CLIPModel directory, or
hf-hub:ORG/REPO. DIR receives OpenCLIP's files (open_clip_model.safetensors +
open_clip_config.json; `open_clip.create_model('local-dir:DIR')`) or Hugging Face's
(model.safetensors, config.json, preprocessor and tokenizer files;
`CLIPModel.from_pretrained(DIR)`). `--ema` exports a jaxclip run's EMA of the parameters
(`train.ema_decay` > 0) instead of the parameters. Bad input exits with status 2 and a
message.
"""

from __future__ import annotations

import argparse
import sys

from jaxclip.convert.files import load_weights, save_hf, save_openclip
from jaxclip.convert.tensors import UnsafeFileError
from jaxclip.models.build import count_params

WRITERS = {"openclip": save_openclip, "hf": save_hf}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jaxclip.convert", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--from", dest="source", required=True, help="weights to read")
    parser.add_argument("--to", dest="target", required=True, help="directory to write")
    parser.add_argument(
        "--format", choices=sorted(WRITERS), default="openclip", help="output format"
    )
    parser.add_argument(
        "--name",
        default=None,
        help="registered architecture the weights must match (default: inferred)",
    )
    parser.add_argument(
        "--ema",
        action="store_true",
        help="a jaxclip run's EMA of the parameters instead of the parameters",
    )
    args = parser.parse_args(argv)
    try:
        weights = load_weights(args.source, args.name, ema=args.ema)
        paths = WRITERS[args.format](weights, args.target)
    except (ValueError, FileNotFoundError, UnsafeFileError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    architecture = weights.name or str(weights.config)
    print(f"read {weights.source}")
    print(
        f"model {architecture}: {count_params(weights.variables['params']):,} parameters"
    )
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
