"""The captioning evaluator: its config checks, and its scores against the caption
metrics computed directly on `generate`'s captions of the same images."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from jaxclip import sharding
from jaxclip.config import ConfigError, base_config, validate_evals_config
from jaxclip.data.tokenizer import TokenizerSpec
from jaxclip.data.transforms import OPENAI_MEAN, OPENAI_STD, normalize_images
from jaxclip.evaluate import evaluators
from jaxclip.evaluate.caption_metrics import caption_metrics
from jaxclip.evaluate.datasets import RetrievalSet
from jaxclip.models.build import create_model, init_variables
from jaxclip.models.registry import get_model_config


def captioning_config(model_name: str = "coca_ViT-B-32", **fields):
    """A config with one captioning entry (nothing is built: the checks read the
    registry)."""
    config = base_config()
    config.model.name = model_name
    config.evals.cap = evaluators.spec("captioning", "shapes", **fields)
    return config


def test_a_coca_model_with_default_options_passes():
    validate_evals_config(captioning_config())


def test_refuses_captioning_for_a_model_that_is_not_coca():
    with pytest.raises(ConfigError, match=r"evals.cap: .*needs a CoCa model.*tiny-vit"):
        validate_evals_config(captioning_config("tiny-vit"))
    # Standalone evaluation checks the weights' model once it has read them.
    config = captioning_config("tiny-vit")
    validate_evals_config(config, check_model=False)
    with pytest.raises(ConfigError, match="needs a CoCa model"):
        evaluators.check_model(config.evals, get_model_config("tiny-vit"), "tiny-vit")


def test_standalone_evaluation_refuses_captioning_for_weights_not_coca(tmp_path):
    # The config's model.name is a CoCa, the weights are not: the weights decide.
    from convert_util import random_variables

    from jaxclip.convert.files import Weights, save_openclip
    from jaxclip.evaluate.standalone import evaluate_checkpoint

    config = get_model_config("tiny-vit")
    variables = random_variables(config, seed=0)
    save_openclip(Weights(config, variables, "tiny-vit"), tmp_path / "clip")
    with pytest.raises(ConfigError, match="evals.cap: .*needs a CoCa model"):
        evaluate_checkpoint(captioning_config(), str(tmp_path / "clip"), [])


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"method": "nucleus"}, r"evals.cap.method='nucleus' must be one of"),
        ({"max_len": 1}, r"evals.cap.max_len=1 must be an integer >= 2"),
        ({"min_len": -1}, r"evals.cap.min_len=-1 must be a non-negative"),
        ({"min_len": 8, "max_len": 6}, r"evals.cap.min_len=8 must be at most"),
        ({"num_beams": 0}, r"evals.cap.num_beams=0 must be a positive"),
        ({"top_k": -1}, r"evals.cap.top_k=-1"),
        ({"top_p": 0.0}, r"evals.cap.top_p=0.0 must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"evals.cap.top_p=1.5"),
        ({"temperature": 0.0}, r"evals.cap.temperature=0.0 must be > 0"),
        ({"length_penalty": float("nan")}, r"evals.cap.length_penalty=nan"),
        ({"seed": -3}, r"evals.cap.seed=-3"),
        # What depends on the model: generate's own check, named for the entry.
        (
            {"max_len": 77},
            r"evals.cap: .*max_len 77 must be in \[2, context_length 76\]",
        ),
        ({"top_k": 50000}, r"evals.cap: .*top_k 50000 must be in \[0, 49408\]"),
    ],
)
def test_refuses_bad_decoding_options(fields, message):
    with pytest.raises(ConfigError, match=message):
        validate_evals_config(captioning_config(**fields))


def test_refuses_a_coca_whose_vocabulary_lacks_the_clip_tokens():
    # tiny-coca's 100-token vocabulary has no start token 49406 to decode from.
    with pytest.raises(ConfigError, match=r"sot_id 49406 is not in the vocabulary"):
        validate_evals_config(captioning_config("tiny-coca", max_len=10))


def test_refuses_datasets_without_captions():
    config = captioning_config()
    config.evals.cap.dataset = "digits"
    with pytest.raises(ConfigError, match=r"a captioning evaluator reads one of"):
        validate_evals_config(config)


def test_other_kinds_ignore_the_decoding_fields():
    # A config saved before the decoding options existed has entries without them.
    config = base_config()
    entry = evaluators.spec("zeroshot", "shapes")
    for field in evaluators.DECODING_FIELDS + ("seed",):
        del entry[field]
    config.evals.zs = entry
    validate_evals_config(config)


# --- The evaluator on a random tiny CoCa.

DECODING = dict(method="greedy", max_len=8, min_len=3)


@pytest.fixture(scope="module")
def tiny_coca():
    """tiny-coca with CLIP's vocabulary (its start and end tokens are 49406, 49407),
    randomly initialised."""
    pytest.importorskip("jaxclip.models.generate")
    config = get_model_config("tiny-coca")
    config = dataclasses.replace(
        config, text=dataclasses.replace(config.text, vocab_size=49408)
    )
    model = create_model(config)
    return model, jax.device_get(init_variables(model, jax.random.key(1)))


def direct_captioner(model, variables, **options):
    """`captions(images, key=None)`: `generate` on uint8 `images` at once, on one
    device, decoded."""
    from jaxclip.models.generate import generate, ids_to_texts

    run = jax.jit(lambda v, x, k: generate(model, v, x, key=k, **options))

    def captions(images, key=None):
        pixels = normalize_images(images, OPENAI_MEAN, OPENAI_STD, model.dtype, 255.0)
        return ids_to_texts(run(variables, pixels, key))

    return captions


def test_scores_equal_the_metrics_of_generated_captions(tiny_coca):
    model, variables = tiny_coca
    mesh = sharding.make_mesh((4, 2, 1))
    config = base_config()
    config.evals.cap = evaluators.spec(
        "captioning", "shapes", num_examples=11, batch_size=4, **DECODING
    )
    [evaluator] = evaluators.make_evaluators(
        config.evals, model, OPENAI_MEAN, OPENAI_STD, mesh, TokenizerSpec()
    )
    images = evaluator.data.load(0, len(evaluator.data))
    want = direct_captioner(model, variables, **DECODING)(images)
    # References that the random model's captions partly match: image i's own
    # caption for even i, a longer one for odd i, beside the shape's caption.
    shapes_captions = evaluator.data.captions
    references = [
        [caption if i % 2 == 0 else f"{caption} at the top", shapes_captions[i]]
        for i, caption in enumerate(want)
    ]
    evaluator.data = RetrievalSet(
        evaluator.data.images,
        [caption for refs in references for caption in refs],
        np.repeat(np.arange(len(images)), 2),
        {},
        {},
        "constructed",
    )
    with sharding.use_mesh(mesh):
        variables = jax.device_put(variables, sharding.replicated(mesh))
        # 11 images in batches of 8 (4 rounded up to the 8 batch shards): 3 padded.
        assert evaluator.captions(variables) == want
        results = evaluator.run(variables)
    expected = caption_metrics(want, references)
    assert results["cap/exact_match"] == pytest.approx(6 / 11)
    for metric in evaluators.CAPTION_METRICS:
        assert results[f"cap/{metric}"] == pytest.approx(expected[metric], abs=1e-12)
    assert expected["bleu4"] > 0 and expected["cider"] > 0


def test_sampling_draws_with_one_key_per_batch(tiny_coca):
    # Batch i samples with fold_in(key(seed), i), whatever the mesh: the evaluator's
    # captions equal generate's on one device, batch by batch (the last one padded).
    model, variables = tiny_coca
    mesh = sharding.make_mesh((8, 1, 1))
    options = dict(method="sample", max_len=6, min_len=2, top_k=20, temperature=2.0)
    config = base_config()
    config.evals.cap = evaluators.spec(
        "captioning", "shapes", num_examples=11, batch_size=8, seed=3, **options
    )
    [evaluator] = evaluators.make_evaluators(
        config.evals, model, OPENAI_MEAN, OPENAI_STD, mesh, TokenizerSpec()
    )
    images = np.zeros((16, 32, 32, 3), np.uint8)
    images[:11] = evaluator.data.load(0, 11)
    captions, want = direct_captioner(model, variables, **options), []
    for batch in range(2):
        key = jax.random.fold_in(jax.random.key(3), batch)
        want += captions(images[8 * batch : 8 * (batch + 1)], key)
    with sharding.use_mesh(mesh):
        variables = jax.device_put(variables, sharding.replicated(mesh))
        assert evaluator.captions(variables) == want[:11]
    assert len(set(want[:11])) > 1  # samples, not one caption for every image
