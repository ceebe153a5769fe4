"""Adding an evaluator from the command line (`jaxclip/cli.py`), and the forms class
names and templates may take (`jaxclip/evaluate/prompts.py`)."""

from __future__ import annotations

import json

import pytest

from jaxclip.cli import add_evaluators, split_new_evaluators
from jaxclip.config import ConfigError, base_config, validate_evals_config
from jaxclip.evaluate import evaluators, prompts


def test_new_evaluators_are_taken_out_of_argv_and_added():
    argv = [
        "prog",
        "--config.evals.zeroshot.num_examples=5",  # an existing one: left to absl
        "--config.evals.hidden.kind=zeroshot",
        "--config.evals.hidden.dataset=folder",
        "--config.evals.hidden.path=/data/hidden",
        "--config.evals.hidden.batch_size=64",
        '--config.evals.hidden.classnames=["cat", "dog"]',
        "--config.train.steps=3",
    ]
    rest, new = split_new_evaluators(argv, known=["zeroshot"])
    assert rest == [argv[0], argv[1], argv[-1]]
    assert new == {
        "hidden": {
            "kind": "zeroshot",
            "dataset": "folder",
            "path": "/data/hidden",
            "batch_size": "64",
            "classnames": '["cat", "dog"]',
        }
    }
    config = base_config()
    config.lock()
    add_evaluators(config, new)
    hidden = config.evals.hidden
    assert (hidden.kind, hidden.dataset, hidden.path) == (
        "zeroshot",
        "folder",
        "/data/hidden",
    )
    assert hidden.batch_size == 64 and isinstance(hidden.batch_size, int)
    assert prompts.class_names(hidden.classnames) == ["cat", "dog"]
    validate_evals_config(config)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"dataset": "folder"}, r"needs --config.evals.x.kind .*missing: kind"),
        (
            {"kind": "zeroshot", "dataset": "folder", "colour": "red"},
            "no field 'colour'",
        ),
        (
            {"kind": "zeroshot", "dataset": "folder", "batch_size": "many"},
            "must be of type int",
        ),
    ],
)
def test_a_new_evaluator_without_what_it_needs_is_refused(fields, message):
    with pytest.raises(ConfigError, match=message):
        add_evaluators(base_config(), {"x": fields})


def test_class_names_and_templates_as_json_and_inline_lists(tmp_path):
    plain = tmp_path / "names.json"
    plain.write_text(json.dumps(["cat", "dog"]))
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"classes": ["cat", "dog"]}))
    templates = tmp_path / "templates.json"
    templates.write_text(json.dumps({"templates": ["a {}.", "the {}."]}))
    assert prompts.class_names(str(plain)) == ["cat", "dog"]
    assert prompts.class_names(str(wrapped)) == ["cat", "dog"]
    assert prompts.class_names('["cat", "dog"]') == ["cat", "dog"]
    assert prompts.templates(str(templates)) == ["a {}.", "the {}."]
    entry = evaluators.spec(
        "zeroshot", "folder", path="x", classnames=("cat", "dog"), templates=["a {}."]
    )
    assert prompts.class_names(entry.classnames) == ["cat", "dog"]
    assert prompts.templates(entry.templates) == ["a {}."]
    bad = tmp_path / "bad.json"
    for text, message in (
        ("{", "not valid JSON"),
        (json.dumps({"labels": ["a"]}), r"without a list under any of \['classes'"),
        (json.dumps([1, 2]), "a JSON list of strings"),
        (json.dumps(["a", " "]), "blank entry"),
    ):
        bad.write_text(text)
        with pytest.raises(ValueError, match=message):
            prompts.class_names(str(bad))
    with pytest.raises(ValueError, match="exactly one"):
        prompts.templates('["no placeholder"]')
