"""tfds: convert tar shards / CSV to a tiny array_record dataset (offline, no
TensorFlow), read it back, and train from it via the CLI, resuming exactly."""

from __future__ import annotations

import io
import json
import subprocess

import numpy as np
import pytest
from data_util import (
    BAD_SHARD_SKIPS,
    caption_of,
    colour_of,
    mean_colour,
    number_from_caption,
    write_bad_shards,
    write_csv,
)
from PIL import Image
from process_util import child_env, run_python

from jaxclip.config import base_config
from jaxclip.data import tfds_builder
from jaxclip.data.pipeline import checkpoint_state, make_train_iterator
from jaxclip.data.sources import TfdsSource


def check_pairs(source: TfdsSource, numbers: list[int]) -> None:
    seen = []
    for index in range(len(source)):
        record = source[index]
        number = number_from_caption(record["caption"].decode())
        assert record["caption"].decode() == caption_of(number)
        pixels = np.asarray(Image.open(io.BytesIO(record["image"])).convert("RGB"))
        np.testing.assert_allclose(mean_colour(pixels), colour_of(number), atol=5)
        seen.append(number)
    assert sorted(seen) == sorted(numbers)


def test_convert_shards_and_csv_to_tfds_and_read_back(tmp_path):
    paths, good = write_bad_shards(tmp_path / "shards")
    data_dir = str(tmp_path / "tfds")
    skipped = tfds_builder.convert(
        "webdataset", paths, "pairs_from_tars", data_dir, max_image_pixels=1_000_000
    )
    assert skipped == BAD_SHARD_SKIPS  # every bad kind left out, and counted
    source = TfdsSource("pairs_from_tars", data_dir)
    assert len(source) == len(good)
    check_pairs(source, good)

    csv_path = write_csv(tmp_path / "csv", 5)
    argv = ["--source=csv", f"--path={csv_path}", "--name=pairs_from_csv"]
    assert tfds_builder.main([*argv, f"--data_dir={data_dir}"]) == 0
    check_pairs(TfdsSource("pairs_from_csv", data_dir), list(range(5)))


def test_missing_inputs_are_named(tmp_path, capsys):
    code = tfds_builder.main(
        [
            "--source=webdataset",
            f"--path={tmp_path}/{{0..1}}.tar",
            "--name=x",
            f"--data_dir={tmp_path}",
        ]
    )
    assert code == 2 and "0.tar" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="'nothing_here' not found"):
        TfdsSource("nothing_here", str(tmp_path))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    # One device: this test is about the data, and compiles faster alone.
    return run_python("-m", "jaxclip.train", *args, timeout=900, env=child_env(1))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_train_from_tfds_via_cli_and_resume_exactly(tmp_path, monkeypatch):
    # A dataset that, besides good pairs, holds three bad images (the converter's
    # image check is switched off, as for a tfds dataset made elsewhere), so the
    # training run has to skip and count them.
    paths, good = write_bad_shards(tmp_path / "shards")
    monkeypatch.setattr(tfds_builder, "check_image", lambda data, limit: None)
    data_dir = str(tmp_path / "tfds")
    tfds_builder.convert("webdataset", paths, "tiny_pairs", data_dir)
    workdir = tmp_path / "run"
    fields = [
        "--config=configs/demo.py",
        f"--workdir={workdir}",
        "--config.model.name=tiny-vit",
        "--config.data.source=tfds",
        "--config.data.path=tiny_pairs",
        f"--config.data.tfds_data_dir={data_dir}",
        "--config.data.max_image_pixels=1000000",
        "--config.train.batch_size=8",
        "--config.evals.zeroshot.every_steps=-1",
        "--config.checkpoint.every_steps=1",
        "--config.log.every_steps=1",
    ]
    first = run_cli(*fields, "--config.train.steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == [1, 2]
    # 8 good and 3 bad records: two batches of 8 read the first pass whole.
    bad_kinds = ("corrupt_image", "not_an_image", "decompression_bomb")
    for kind in bad_kinds:
        assert records[-1][f"data/skipped/{kind}"] >= 1
    assert records[-1]["data/skipped"] == sum(
        records[-1][f"data/skipped/{kind}"] for kind in bad_kinds
    )
    assert f"data: {records[-1]['data/skipped']} samples skipped so far" in first.stdout

    second = run_cli(*fields, "--config.train.steps=3")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from step 2" in second.stdout

    # The checkpoint of step 3 holds the position an uninterrupted pipeline reaches
    # after 3 batches: the restored iterator continued, it did not start over.
    config = base_config()
    config.data.source, config.data.path = "tfds", "tiny_pairs"
    config.data.tfds_data_dir, config.data.max_image_pixels = data_dir, 1_000_000
    config.train.batch_size = 8
    straight = make_train_iterator(config, 32, 16)
    try:
        for _ in range(3):
            next(straight)
        expected = checkpoint_state(straight.get_state())
    finally:
        straight.close()
    saved = json.loads(
        (workdir / "checkpoints" / "3" / "data" / "metadata").read_text()
    )
    assert saved == json.loads(json.dumps(expected))
    assert saved["processes"][0]["batches"] == 3
