"""The SigLIP 2 fine-tuning path end to end, offline: a tiny random SigLIP 2 directory
(`jaxclip.convert.tiny_siglip2`) that transformers reads as it reads the real ones,
`configs/siglip2_finetune.py` training from it, the result exported back to HF with
its tokenizer, and `python -m jaxclip.evaluate`'s body on the directory."""

from __future__ import annotations

import numpy as np
import pytest
from config_util import override, recipe
from convert_util import assert_trees_equal

from jaxclip.config import base_config
from jaxclip.convert import load_weights, save_hf, tiny_siglip2
from jaxclip.evaluate import evaluators
from jaxclip.evaluate.standalone import evaluate_checkpoint
from jaxclip.train.loop import train_and_evaluate

transformers = pytest.importorskip("transformers")

CAPTIONS = ["a small red circle at the top left", "A LARGE Blue square!", ""]


@pytest.fixture(scope="module")
def siglip2_dir(tmp_path_factory):
    return tiny_siglip2.make(tmp_path_factory.mktemp("siglip2") / "tiny-siglip2")


def test_transformers_reads_the_tiny_directory(siglip2_dir):
    model = transformers.AutoModel.from_pretrained(siglip2_dir)
    assert type(model).__name__ == "SiglipModel"
    expected = transformers.AutoTokenizer.from_pretrained(siglip2_dir)(
        CAPTIONS, padding="max_length", max_length=16, truncation=True
    )["input_ids"]
    weights = load_weights(siglip2_dir)
    assert weights.name == "tiny-siglip" and weights.tokenizer.kind == siglip2_dir
    np.testing.assert_array_equal(weights.tokenizer(CAPTIONS, 16), expected)


def test_finetune_recipe_end_to_end(siglip2_dir, tmp_path):
    config = recipe(
        "siglip2_finetune",
        siglip2_dir,
        overrides={
            "data.source": "shapes",  # the built-in data, in place of a CSV
            "model.dtype": "float32",
            "train.batch_size": 16,
            "train.steps": 2,
            "optim.warmup_steps": 1,
            "checkpoint.every_steps": 2,
            "log.every_steps": 1,
        },
    )
    assert config.model.name == "tiny-siglip"
    assert config.data.tokenizer == config.model.init_from == siglip2_dir
    train_and_evaluate(config, str(tmp_path / "run"))

    start, tuned = load_weights(siglip2_dir), load_weights(tmp_path / "run")
    assert tuned.name == "tiny-siglip" and tuned.tokenizer.kind == siglip2_dir
    moved = [
        not np.array_equal(a, b)
        for a, b in zip(
            np.asarray(start.variables["params"]["visual"]["conv1"]["kernel"]),
            np.asarray(tuned.variables["params"]["visual"]["conv1"]["kernel"]),
        )
    ]
    assert any(moved)

    # Back out as an HF directory, with the tokenizer's files copied beside it.
    out = tmp_path / "hf"
    save_hf(tuned, out)
    assert (out / "tokenizer.json").is_file()
    assert_trees_equal(tuned.variables, load_weights(out).variables)
    hf_model = transformers.AutoModel.from_pretrained(out)
    assert type(hf_model).__name__ == "SiglipModel"

    # Standalone evaluation reads the directory and its tokenizer.
    eval_config = override(
        base_config(), {"mesh.shape": (-1, 1, 1), "model.scan": False}
    )
    eval_config.evals.zeroshot = evaluators.spec("zeroshot", "shapes", num_examples=64)
    results = evaluate_checkpoint(eval_config, str(out), [])
    assert results["model"] == "tiny-siglip"
    assert 0.0 <= results["results"]["zeroshot/top1"] <= 1.0
