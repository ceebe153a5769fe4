"""`python -m jaxclip.convert.tiny_siglip2 DIR`: a tiny random-weight SigLIP 2
directory, made offline, laid out like google/siglip2-base-patch16-224's.

It holds what a real Hugging Face SigLIP 2 checkpoint holds (config.json,
model.safetensors, preprocessor_config.json, and a Gemma-style byte-fallback BPE
tokenizer: tokenizer.json + tokenizer_config.json), at the size of the `tiny-siglip`
architecture: `transformers.AutoModel` / `AutoTokenizer` read it, and so do
`jaxclip.load` and `model.init_from`. The fine-tuning recipe runs end to end on it
(docs/siglip.md) where no checkpoint can be downloaded. The tokenizer is learned from
the built-in shapes captions, so its ids mean something to the demo data.
"""

from __future__ import annotations

import argparse
import json
import os

import jax

from jaxclip.convert.files import Weights, save_hf
from jaxclip.convert.siglip import SIGLIP_MEAN, SIGLIP_STD
from jaxclip.data import shapes
from jaxclip.data.tokenizer import TokenizerSpec
from jaxclip.models.build import create_model, init_variables

ARCHITECTURE = "tiny-siglip"
# Gemma's special tokens and their ids; SigLIP 2 appends <eos> and pads with <pad>.
SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")


def gemma_style_tokenizer(texts: list[str], vocab_size: int) -> str:
    """tokenizer.json text of a byte-fallback BPE laid out like Gemma's: the special
    tokens, the 256 byte tokens, then merges learned from `texts`; spaces are '▁'."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.normalizer = normalizers.Replace(" ", "▁")
    learner.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    byte_tokens = [f"<0x{byte:02X}>" for byte in range(256)]
    learner.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab_size - len(byte_tokens),
            special_tokens=list(SPECIALS),
            show_progress=False,
        ),
    )
    learned = json.loads(learner.to_str())["model"]
    pieces = sorted(learned["vocab"], key=learned["vocab"].get)
    vocab = [*SPECIALS, *byte_tokens, *(p for p in pieces if p not in SPECIALS)]
    tokenizer = Tokenizer(
        models.BPE(
            vocab={piece: index for index, piece in enumerate(vocab[:vocab_size])},
            merges=[
                tuple(m) for m in learned["merges"] if "".join(m) in vocab[:vocab_size]
            ],
            unk_token="<unk>",
            byte_fallback=True,
            fuse_unk=True,
        )
    )
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tokenizer.add_special_tokens([AddedToken(t, normalized=False) for t in SPECIALS])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A <eos>", special_tokens=[("<eos>", SPECIALS.index("<eos>"))]
    )
    return tokenizer.to_str()


def write_tokenizer(directory: str, vocab_size: int) -> None:
    """tokenizer.json and tokenizer_config.json (SigLIP 2's settings) in `directory`."""
    captions = shapes.draw_batch(seed=0, index=0, batch_size=2048, image_size=32)
    texts = sorted(set(captions["captions"]))
    with open(os.path.join(directory, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(gemma_style_tokenizer(texts, vocab_size))
    settings = {
        "tokenizer_class": "GemmaTokenizer",
        "add_bos_token": False,
        "add_eos_token": True,
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "mask_token": "<mask>",
        "padding_side": "right",
        "model_max_length": 64,
        "clean_up_tokenization_spaces": False,
    }
    path = os.path.join(directory, "tokenizer_config.json")
    with open(path, "w", encoding="utf-8") as file:
        json.dump(settings, file, indent=2)


def make(directory: str | os.PathLike, seed: int = 0) -> str:
    """Write the directory; returns its path."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    model = create_model(ARCHITECTURE, sharded=False)
    write_tokenizer(directory, model.config.text.vocab_size)
    variables = jax.device_get(init_variables(model, jax.random.key(seed)))
    weights = Weights(
        model.config,
        variables,
        ARCHITECTURE,
        SIGLIP_MEAN,
        SIGLIP_STD,
        resize_mode="squash",
        tokenizer=TokenizerSpec(directory),  # already there: nothing to copy
    )
    save_hf(weights, directory)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"wrote a tiny SigLIP 2 directory: {make(args.directory, args.seed)}")


if __name__ == "__main__":
    main()
