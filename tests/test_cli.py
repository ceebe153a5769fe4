"""The launcher: the demo CLI end to end, config errors, and what it writes."""

from __future__ import annotations

import json
import os
import subprocess

import jax
import numpy as np
import pytest
from config_util import base, recipe
from process_util import run_python

from jaxclip.config import ConfigError, base_config, validate_config


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return run_python("-m", "jaxclip.train", *args)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_demo_cli_end_to_end(tmp_path):
    workdir = tmp_path / "demo"
    result = run_cli(
        "--config=configs/demo.py",
        f"--workdir={workdir}",
        "--config.train.steps=4",
        "--config.log.every_steps=2",
        "--config.checkpoint.every_steps=2",
        "--config.evals.zeroshot.num_examples=48",
        "--config.evals.zeroshot.every_steps=2",
        "--config.mesh.shape=(4,2,1)",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "zeroshot/top1:" in result.stdout
    assert "step 4/4" in result.stdout and "samples/s" in result.stdout

    records = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [2, 4]
    for record in steps:
        assert set(record) >= {"loss", "i2t_acc", "t2i_acc", "logit_scale", "lr"}
        # Full precision: the logged float is exactly a float32 value, not rounded text.
        assert float(np.float32(record["loss"])) == record["loss"]
    zeroshot = [r for r in records if "zeroshot/top1" in r]
    # Evaluated every 2 steps; the last periodic one also stands for the final one.
    assert [r["step"] for r in zeroshot] == [2, 4]
    assert all(0.0 <= r["zeroshot/top1"] <= 1.0 for r in zeroshot)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]

    # TensorBoard can read the event files.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(workdir / "tensorboard"))
    events.Reload()
    losses = events.Scalars("loss")
    assert [e.step for e in losses] == [2, 4]
    np.testing.assert_allclose([e.value for e in losses], [r["loss"] for r in steps])

    # A second start in the same workdir resumes at the end and only evaluates.
    again = run_cli(
        f"--workdir={workdir}",
        "--config.train.steps=4",
        "--config.evals.zeroshot.num_examples=48",
        "--config.mesh.shape=(4,2,1)",
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from step 4" in again.stdout


@pytest.mark.multiprocess
def test_cli_reports_config_errors(tmp_path):
    result = run_cli(f"--workdir={tmp_path}", "--config.model.name=ViT-Q-99")
    assert result.returncode == 2
    assert "model.name='ViT-Q-99'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"model.name": "ViT-Q-99"}, "model.name='ViT-Q-99'"),
        ({"train.batch_size": 12}, "train.batch_size=12 is not divisible"),
        ({"mesh.shape": (4, 4, 1)}, r"mesh.shape=\(4, 4, 1\) needs 16 devices"),
        ({"mesh.shape": (3, -1, 1)}, "cannot be completed"),
        ({"mesh.shape": (8, 1)}, "must have 3 entries"),
        ({"loss.name": "triplet"}, "loss.name='triplet'"),
        ({"loss.impl": "magic"}, "loss.impl='magic'"),
        ({"model.dtype": "float16"}, "model.dtype='float16'"),
        ({"model.remat": "sometimes"}, "model.remat='sometimes'"),
        ({"train.steps": 0}, "train.steps=0 must be a positive integer"),
        ({"optim.lr": -1.0}, "optim.lr=-1.0 must be > 0"),
        ({"optim.lr": float("nan")}, "optim.lr=nan must be > 0"),
        ({"optim.b2": 1.0}, r"optim.b2=1.0 must be in \[0, 1\)"),
        ({"optim.weight_decay": -0.1}, "optim.weight_decay=-0.1 must be >= 0"),
        ({"data.mean": (0.5, 0.5)}, r"data.mean=\(0.5, 0.5\) must be 3 numbers"),
        ({"data.source": "webdataset"}, "data.source='webdataset'"),
    ],
)
def test_config_errors_name_the_field(fields, message):
    assert jax.device_count() == 8
    with pytest.raises(ConfigError, match=message):
        validate_config(base(fields))


def test_unwritable_workdir_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="--workdir=.*cannot be created or written"):
        validate_config(base_config(), str(blocker / "sub"))
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o500)
    if os.access(read_only, os.W_OK):  # root ignores permission bits
        pytest.skip("running as a user that can write anywhere")
    with pytest.raises(ConfigError, match="cannot be created or written"):
        validate_config(base_config(), str(read_only))


def test_recipes_load_and_build(tmp_path, monkeypatch):

    from jaxclip.convert import tiny_siglip2
    from jaxclip.models.build import create_model, parameter_counts

    # A SigLIP-style tokenizer directory, for the recipes that name one.
    siglip_dir = tiny_siglip2.make(tmp_path / "tiny-siglip2")
    monkeypatch.chdir(tmp_path)  # each finds configs/common.py beside it, from any cwd
    recipes = ("demo", "coca_demo", "vit_b32", "vit_b16", "vit_l14", "rn50")
    for name in (*recipes, "siglip_b16", "coca_b32"):
        config = recipe(name)
        if not name.endswith(
            "demo"
        ):  # as `python -m jaxclip.aot` checks them for v5p:4x4x4
            validate_config(config, num_devices=64, check_data=False)
        config.data.source = "shapes"  # real data sources come with the data pipeline
        if name == "siglip_b16":
            # Its placeholder names SigLIP's tokenizer directory; a CLIP BPE would not
            # fit SigLIP's 32k vocabulary.
            with pytest.raises(ConfigError, match="data.tokenizer"):
                validate_config(config)
            config.data.tokenizer = siglip_dir
        validate_config(config)
        counts = parameter_counts(create_model(config.model.name, sharded=False))
        assert counts["total"] > 0
        if not name.endswith("demo"):
            assert config.train.batch_size == 32768
            assert (config.optim.b1, config.optim.eps) == (0.9, 1e-6)
    assert recipe("siglip_b16").loss.name == "siglip"
    coca = recipe("coca_b32")
    assert (coca.loss.clip_weight, coca.loss.caption_weight) == (1.0, 2.0)
    # The fine-tuning recipe takes its architecture, weights and tokenizer from the
    # directory it starts from, and needs one.
    config = recipe("siglip2_finetune", siglip_dir)
    assert (config.model.name, config.model.init_from) == ("tiny-siglip", siglip_dir)
    config.data.source = "shapes"
    validate_config(config)
    with pytest.raises(ValueError, match="starts from a SigLIP 2 directory"):
        recipe("siglip2_finetune")


def test_a_recipe_without_its_common_file_is_refused(tmp_path):
    from jaxclip.config import load_beside

    with pytest.raises(FileNotFoundError, match=r"common.py \(loaded by .*alone.py\)"):
        load_beside(str(tmp_path / "alone.py"), "common.py")
