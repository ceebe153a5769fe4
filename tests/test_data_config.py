"""The data section of the config: bad values and missing files are refused at start,
with a message naming the field and the file."""

from __future__ import annotations

import pytest
from data_util import write_csv, write_shards

from jaxclip.config import ConfigError, base_config, validate_config


def data_config(**fields):
    config = base_config()
    config.model.name = "tiny-vit"
    for name, value in fields.items():
        config.data[name] = value
    return config


def test_each_real_source_validates_with_its_files(tmp_path):
    write_shards(tmp_path / "shards", 2, 1)
    csv_path = write_csv(tmp_path / "csv", 1)
    validate_config(data_config(source="webdataset", path=str(tmp_path / "shards")))
    validate_config(data_config(source="csv", path=csv_path))
    mix = (("webdataset", str(tmp_path / "shards/{00000..00001}.tar"), 3.0),
           ("csv", csv_path, 1.0), ("shapes", "", 0.5))  # fmt: skip
    validate_config(data_config(source="mix", mix=mix))


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"source": "webdataset"}, r"data.source='webdataset' needs data.path \(tar"),
        (
            {"source": "csv", "path": "/no/such.csv"},
            r"data.path='/no/such.csv'.*such.csv",
        ),
        ({"source": "webdataset", "path": "/no/{0..2}.tar"}, r"3 of 3 .*'/no/0.tar'"),
        (
            {"source": "tfds", "path": "pairs", "tfds_data_dir": "/no/dir"},
            "not prepared",
        ),
        ({"source": "mix"}, r"data.source='mix' needs data.mix"),
        ({"source": "mix", "mix": (("csv", "/no.csv", 1.0),)}, r"data.mix\[0\]"),
        ({"source": "mix", "mix": (("csv", "/no.csv", -1),)}, "weight must be > 0"),
        ({"source": "mix", "mix": (("parquet", "x", 1.0),)}, "must be"),
        ({"crop": "random"}, "data.crop='random'"),
        ({"crop_scale": (0.5, 1.5)}, r"data.crop_scale=\(0.5, 1.5\)"),
        ({"workers": -1}, "data.workers=-1"),
        ({"tokenizer": "bpe"}, "data.tokenizer='bpe'"),
        ({"tokenizer": "sentencepiece"}, "data.tokenizer_model"),
        ({"max_image_pixels": 0}, "data.max_image_pixels=0"),
    ],
)
def test_bad_data_fields_are_refused_by_name(fields, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(data_config(**fields))


def test_clip_bpe_needs_room_for_its_byte_symbols():
    """The CLIP BPE sizes itself to a CLIP text table (tiny-vit's 4,096 ids), but a
    table without room for its 512 byte symbols and two special tokens is refused."""
    validate_config(data_config())
    config = data_config()
    config.model.name = "tiny-coca"  # 100 ids
    with pytest.raises(
        ConfigError, match=r"'clip' needs at least 514 ids.*'tiny-coca'"
    ):
        validate_config(config)
