"""The data section of the config, checked at start: the choices the data layer
offers (`DATA_SOURCES`, crops, tokenizers), the settings' ranges, and that every file
the config names exists, so that nothing fails in a worker after compiling.

`config.validate_config` calls `validate_data_config`; errors are
`config_rules.ConfigError`, naming the field, and the types and ranges are
`config_rules` rules like every other section's.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections

from jaxclip.config_rules import (
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    ConfigError,
    Rule,
    check_fields,
    one_of,
)
from jaxclip.data.transforms import CROPS

__all__ = ["DATA_SOURCES", "MIXABLE_SOURCES", "validate_data_config"]

# One source each; `pipeline.open_source` opens them.
MIXABLE_SOURCES: tuple[str, ...] = ("shapes", "webdataset", "csv", "tfds", "digits")
# What data.source may name: one source, or 'mix' (data.mix's weighted sources).
DATA_SOURCES: tuple[str, ...] = (*MIXABLE_SOURCES, "mix")

# What data.path names for each source that reads files.
_PATH_MEANS = {
    "webdataset": "tar shards: a list, a brace pattern or a directory",
    "csv": "a CSV or TSV file",
    "tfds": "a tfds dataset name, with data.tfds_data_dir",
}


def validate_data_config(config: ml_collections.ConfigDict) -> None:
    """The data fields, and that every file they name exists (an error at start)."""
    from jaxclip.data.tokenizer import TOKENIZER_FILES, TOKENIZERS, has_tokenizer_files

    data = config.data
    rules = {
        "crop": one_of(CROPS),
        "tokenizer": Rule(
            lambda value: value in TOKENIZERS or has_tokenizer_files(value),
            f"must be one of {list(TOKENIZERS)} or a Hugging Face model directory "
            f"holding tokenizer files ({', '.join(TOKENIZER_FILES)})",
        ),
        "threads": NON_NEGATIVE_INT,
        "workers": NON_NEGATIVE_INT,
        "prefetch": NON_NEGATIVE_INT,
        "max_image_pixels": POSITIVE_INT,
    }
    check_fields(data, rules, prefix="data.")
    low, high = (tuple(data.crop_scale) + (None, None))[:2]
    if len(data.crop_scale) != 2 or not 0 < low <= high <= 1:
        raise ConfigError(
            f"data.crop_scale={tuple(data.crop_scale)!r} must be (low, high) with "
            "0 < low <= high <= 1"
        )
    if data.tokenizer == "sentencepiece" and not os.path.isfile(data.tokenizer_model):
        raise ConfigError(
            f"data.tokenizer='sentencepiece' needs data.tokenizer_model, a "
            f"SentencePiece .model file; {data.tokenizer_model!r} does not exist"
        )
    if data.tokenizer not in TOKENIZERS:
        _check_hf_tokenizer(data.tokenizer)
    _check_vocabulary(config)
    if data.source == "mix":
        _check_mix(config)
    else:
        check_data_path(data.source, data.path, config, f"data.source={data.source!r}")


def _check_vocabulary(config: ml_collections.ConfigDict) -> None:
    """The tokenizer's ids fit the text tower's vocabulary (a CLIP BPE id fed to
    SigLIP's 32k embedding would silently read another row). The 'clip' BPE sizes
    itself to a CLIP text tower, which pools at its end token (the largest id): it
    keeps the merges that fit (`TokenizerSpec.for_vocabulary`)."""
    from jaxclip.data.tokenizer import MIN_VOCAB_SIZE, VOCAB_SIZE, TokenizerSpec
    from jaxclip.models.registry import get_model_config

    data = config.data
    text = get_model_config(config.model.name).text
    if data.tokenizer != "clip":
        vocab = TokenizerSpec(data.tokenizer, data.tokenizer_model).build().vocab_size
        has = f"has {vocab:,} ids"
    elif text.pool == "argmax":
        vocab, has = MIN_VOCAB_SIZE, f"needs at least {MIN_VOCAB_SIZE:,} ids"
    else:
        vocab, has = VOCAB_SIZE, f"has {VOCAB_SIZE:,} ids"
    if vocab > text.vocab_size:
        raise ConfigError(
            f"data.tokenizer={data.tokenizer!r} {has}, more than "
            f"model.name={config.model.name!r}'s {text.vocab_size:,}-entry "
            "vocabulary: name the model's own tokenizer (for SigLIP, a directory "
            "holding its tokenizer files)"
        )


def _check_hf_tokenizer(directory: str) -> None:
    """Read the directory's tokenizer now (cached for the pipeline in this process), so
    that a setting HFTokenizer refuses, or a missing package, is an error at start."""
    from jaxclip.data.tokenizer import TokenizerSpec

    try:
        TokenizerSpec(directory).build()
    except (ValueError, OSError, ImportError) as error:
        raise ConfigError(f"data.tokenizer={directory!r}: {error}") from None


def _check_mix(config: ml_collections.ConfigDict) -> None:
    entries = tuple(config.data.mix)
    if not entries:
        raise ConfigError(
            "data.source='mix' needs data.mix=((source, path, weight), ...)"
        )
    for entry in entries:
        if len(entry) != 3 or entry[0] not in MIXABLE_SOURCES:
            raise ConfigError(
                f"data.mix entry {entry!r} must be (source, path, weight) with a "
                f"source in {list(MIXABLE_SOURCES)}"
            )
        if not isinstance(entry[2], (int, float)) or not entry[2] > 0:
            raise ConfigError(f"data.mix entry {entry!r}: the weight must be > 0")
    for number, (kind, path, _) in enumerate(entries):
        check_data_path(kind, path, config, f"data.mix[{number}]=({kind!r}, {path!r})")


def check_data_path(
    kind: str, path: str, config: ml_collections.ConfigDict, field: str
) -> None:
    """Refuse a missing file of source `kind` now rather than in a worker after
    compiling; `field` names where the config gives it."""
    from jaxclip.data.sources import expand_paths

    if kind == "shapes":
        return
    if kind == "digits":  # bundled with scikit-learn: no path, but the package
        if importlib.util.find_spec("sklearn") is None:
            raise ConfigError(
                f"{field} needs scikit-learn, which is not installed: pip install "
                "scikit-learn (or pip install 'jaxclip[digits]')"
            )
        return
    in_mix = field.startswith("data.mix")
    if not path:
        needs = "a path" if in_mix else "data.path"
        raise ConfigError(f"{field} needs {needs} ({_PATH_MEANS[kind]})")
    try:
        if kind == "webdataset":
            expand_paths(path, ".tar")
        elif kind == "csv":
            expand_paths(path, ".csv")
        else:
            check_tfds_dir(path, config.data.tfds_data_dir)
    except FileNotFoundError as e:
        where = field if in_mix else f"data.path={path!r}"
        raise ConfigError(f"{where}: {e}") from None


def check_tfds_dir(name: str, data_dir: str) -> None:
    """The prepared dataset's directory must exist (tfds names it data_dir/name)."""
    if data_dir and not os.path.isdir(
        os.path.join(data_dir, name.split(":")[0].split("/")[0])
    ):
        raise FileNotFoundError(
            f"tfds dataset {name!r} is not prepared in data.tfds_data_dir={data_dir!r}"
        )
