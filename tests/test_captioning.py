"""The captioning evaluator: its config checks, and its scores against the caption
metrics computed directly on `generate`'s captions of the same images."""

from __future__ import annotations

import pytest

from jaxclip.config import ConfigError, base_config, validate_evals_config
from jaxclip.evaluate import evaluators
from jaxclip.models.registry import get_model_config


def captioning_config(model_name: str = "tiny-coca", **fields):
    """A config with one captioning entry; tiny-coca reads 12 tokens (max_len 30
    is the default)."""
    fields = {"max_len": 10, **fields}
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
        # tiny-coca reads 12 tokens.
        ({"max_len": 13}, r"evals.cap.max_len=13 is longer than the 12 tokens"),
    ],
)
def test_refuses_bad_decoding_options(fields, message):
    with pytest.raises(ConfigError, match=message):
        validate_evals_config(captioning_config(**fields))


def test_refuses_datasets_without_captions():
    config = base_config()
    config.model.name = "tiny-coca"
    config.evals.cap = evaluators.spec("captioning", "digits")
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
