"""Evaluators: zero-shot with a known answer, the same numbers on any mesh, the
in-training hooks and best checkpoint, the standalone command and the digits recipe."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxclip import sharding
from jaxclip.config import ConfigError, base_config, validate_config
from jaxclip.convert.checkpoint import read_checkpoint
from jaxclip.data import digits
from jaxclip.data.tokenizer import tokenize
from jaxclip.evaluate import evaluators
from jaxclip.evaluate.datasets import ArrayImages, ClassificationSet, RetrievalSet
from jaxclip.models.clip import CLIP
from jaxclip.models.registry import get_model_config
from jaxclip.train.checkpoint import Checkpointer
from jaxclip.train.loop import train_and_evaluate
from jaxclip.train.step import make_encode_fns

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTEXT = 16
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven"]


def one_hot_encoders(num_classes: int):
    """Fake towers with a known answer: an image filled with grey level 10·c embeds
    as class c; a prompt embeds as the class whose name is its first word."""
    first_token = tokenize(NAMES, CONTEXT)[:, 1]
    table = np.zeros(int(first_token.max()) + 1, np.int32)
    table[first_token] = np.arange(len(NAMES))

    @jax.jit
    def encode_images(variables, images):
        return jax.nn.one_hot(images[:, 0, 0, 0] // 10, num_classes)

    @jax.jit
    def encode_texts(variables, tokens):
        return jax.nn.one_hot(jnp.asarray(table)[tokens[:, 1]], num_classes)

    return encode_images, encode_texts


def test_zero_shot_metrics_on_a_constructed_case():
    # 8 classes; images of class c are labelled c, except three deliberate errors.
    drawn = np.array([0, 0, 1, 2, 3, 3, 4, 5, 6, 7, 7, 7])
    labels = drawn.copy()
    labels[[1, 5, 11]] = [4, 0, 6]  # predicted 0, 3, 7 but labelled 4, 0, 6
    images = np.repeat((10 * drawn).astype(np.uint8), 4 * 4 * 3).reshape(-1, 4, 4, 3)
    data = ClassificationSet.from_arrays(images, labels, NAMES, "constructed")
    entry = evaluators.config("zeroshot", "shapes", templates="", batch_size=5)
    mesh = sharding.make_mesh((8, 1, 1))
    evaluator = _evaluator_with(entry, data, one_hot_encoders(8), mesh, ["{}"])
    results = evaluator.run({})
    assert results["t/top1"] == pytest.approx(9 / 12)
    # The wrong ones: class 0's logit is 1, the rest 0, so ties rank lower indices
    # first: label 4 is 5th after (0, 1, 2, 3) -> in the top 5; label 0 after 3 is
    # 2nd; label 6 after 7 is 7th (0..5 first) -> not in the top 5.
    assert results["t/top5"] == pytest.approx(11 / 12)
    # Recall per labelled class: 0: 1/2 (images 0, 5), 4: 1/2 (1, 6), 6: 1/2 (8, 11),
    # the other five classes 1.
    assert results["t/mean_per_class_recall"] == pytest.approx((5 + 1.5) / 8)


def _evaluator_with(entry, data, encoders, mesh, templates):
    """An Evaluator over `data` (an in-memory set) without reading a dataset."""
    evaluator = object.__new__(evaluators.Evaluator)
    evaluator.name, evaluator.entry, evaluator.mesh = "t", entry, mesh
    evaluator.every_steps = entry.every_steps
    evaluator.encode_images, evaluator.encode_texts = encoders
    evaluator.context_length = CONTEXT
    evaluator.tokenizer = tokenize
    evaluator.data = data
    evaluator.templates = templates
    if entry.kind == "retrieval":
        evaluator.tokens = tokenize(data.captions, CONTEXT)
    if entry.kind == "linear_probe":
        evaluator.train_data = data
    return evaluator


def _digits_sets(image_size: int):
    test = digits.labelled("test", image_size)
    names = digits.class_names()
    zeroshot = ClassificationSet.from_arrays(
        test["images"][:120], test["label"][:120], names, "digits/test"
    )
    # Retrieval: 40 images with 1-3 captions each.
    captions, text_to_image = [], []
    for image, label in enumerate(test["label"][:40]):
        for copy in range(1 + image % 3):
            captions.append(["a photo of the number {}", "the digit {}", "a {}"][copy])
            captions[-1] = captions[-1].format(names[label])
            text_to_image.append(image)
    retrieval = RetrievalSet(
        ArrayImages(test["images"][:40]), captions, np.array(text_to_image), {}, {}, ""
    )
    return zeroshot, retrieval


@pytest.fixture(scope="module")
def random_tiny_model():
    model = CLIP(get_model_config("tiny-vit"), scan=False)
    variables = model.init(
        jax.random.key(0),
        jnp.zeros((1, 32, 32, 3)),
        jnp.zeros((1, CONTEXT), jnp.int32),
        train=False,
    )
    return model, jax.device_get(variables)


def test_results_are_identical_on_any_mesh(random_tiny_model):
    model, variables = random_tiny_model
    config = base_config()
    zeroshot_set, retrieval_set = _digits_sets(32)
    results = {}
    for name, (shape, count) in {
        "8x1x1": ((8, 1, 1), 8),
        "2x2x2": ((2, 2, 2), 8),
        "1 device": ((1, 1, 1), 1),
    }.items():
        mesh = sharding.make_mesh(shape, jax.devices()[:count])
        encoders = make_encode_fns(config, model, mesh)
        placed = jax.device_put(variables, sharding.replicated(mesh))
        got = {}
        for kind, data in (("zeroshot", zeroshot_set), ("retrieval", retrieval_set)):
            entry = evaluators.config(kind, "csv", path="x", batch_size=48)
            evaluator = _evaluator_with(
                entry, data, encoders, mesh, list(digits.ZEROSHOT_TEMPLATES)
            )
            got.update(evaluator.run(placed))
        results[name] = {k: v for k, v in got.items() if not k.endswith("/seconds")}
    assert results["8x1x1"] == results["2x2x2"] == results["1 device"]
    assert set(results["1 device"]) >= {
        "t/top1",
        "t/top5",
        "t/mean_per_class_recall",
        "t/image_to_text/R@1",
        "t/text_to_image/median_rank",
    }


def test_evaluator_configs_are_checked():
    config = base_config()
    config.evals.a = evaluators.config("retrieval", "shapes")
    with pytest.raises(ConfigError, match="evals.a.dataset='shapes'"):
        validate_config(config)
    config.evals.a = evaluators.config("zeroshot", "folder")
    with pytest.raises(ConfigError, match="needs a path"):
        validate_config(config)
    config.evals.a = evaluators.config("zeroshot", "shapes", every_steps=-2)
    with pytest.raises(ConfigError, match="every_steps=-2"):
        validate_config(config)
    config.evals.a = evaluators.config("zeroshot", "shapes")
    config.checkpoint.best_metric = "b/top1"
    with pytest.raises(ConfigError, match="best_metric='b/top1'"):
        validate_config(config)
    with pytest.raises(ValueError, match="no field 'colour'"):
        evaluators.config("zeroshot", "shapes", colour="red")


def _records(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def demo_flags(workdir) -> list[str]:
    return [
        "--config=configs/demo.py",
        f"--workdir={workdir}",
        "--config.model.name=tiny-vit",
        "--config.train.batch_size=16",
        "--config.train.steps=5",
        "--config.optim.warmup_steps=0",
        "--config.checkpoint.every_steps=1",
        "--config.checkpoint.keep=10",
        "--config.evals.zeroshot.num_examples=48",
        "--config.evals.zeroshot.every_steps=2",
    ]


def test_in_training_evaluators_fire_at_their_period_and_keep_the_best(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "demo", os.path.join(REPO, "configs", "demo.py")
    )
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    config = demo.get_config()
    for flag in demo_flags(tmp_path)[2:]:
        field, value = flag[len("--config.") :].split("=")
        *sections, name = field.split(".")
        node = config
        for section in sections:
            node = node[section]
        node[name] = type(node[name])(value)
    config.evals.at_end = evaluators.config(
        "zeroshot", "shapes", num_examples=24, templates="simple"
    )
    config.checkpoint.best_metric = "zeroshot/top1"
    results = train_and_evaluate(config, str(tmp_path))

    records = _records(tmp_path)
    periodic = {r["step"]: r["zeroshot/top1"] for r in records if "zeroshot/top1" in r}
    assert sorted(periodic) == [2, 4, 5]  # every 2 steps, and at the end
    assert [r["step"] for r in records if "at_end/top1" in r] == [5]
    assert results["zeroshot/top1"] == periodic[5]

    # The best checkpoint: the first step with the highest value, its state equal to
    # the regular checkpoint of that step.
    best_step = max(sorted(periodic), key=lambda s: (periodic[s], -s))
    best = Checkpointer(str(tmp_path / "best"))
    assert best.latest_step() == best_step
    record = best.manager.restore(
        best_step, args=ocp.args.Composite(data=ocp.args.JsonRestore())
    )["data"]
    best.close()
    assert record == {
        "metric": "zeroshot/top1",
        "value": periodic[best_step],
        "step": best_step,
    }
    best_params = read_checkpoint(str(tmp_path / "best" / str(best_step))).variables
    regular = read_checkpoint(str(tmp_path / "checkpoints" / str(best_step))).variables
    jax.tree.map(np.testing.assert_array_equal, best_params, regular)


def test_standalone_evaluation_writes_results_json(tmp_path):
    workdir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": REPO}
    train = subprocess.run(
        [sys.executable, "-m", "jaxclip.train", *demo_flags(workdir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    output = tmp_path / "out" / "results.json"
    evaluate = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxclip.evaluate",
            "--config=configs/demo.py",
            f"--checkpoint={workdir}",
            f"--output={output}",
            "--config.evals.zeroshot.num_examples=48",
            "--config.mesh.shape=(2,2,2)",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["model"] == "tiny-vit"
    # The same weights and evaluator as the run's final evaluation (on another mesh).
    final = [r for r in _records(workdir) if r["step"] == 5 and "zeroshot/top1" in r]
    for metric in ("top1", "top5", "mean_per_class_recall"):
        name = f"zeroshot/{metric}"
        assert report["results"][name] == final[0][name]
    assert f"zeroshot/top1: {final[0]['zeroshot/top1']:.4f}" in evaluate.stdout

    missing = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxclip.evaluate",
            "--config=configs/demo.py",
            f"--checkpoint={tmp_path / 'nothing'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert missing.returncode == 2 and "error:" in missing.stderr


def test_digits_recipe_trains_through_the_cli(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxclip.train",
            "--config=configs/digits.py",
            f"--workdir={tmp_path}",
            "--config.train.steps=2",
            "--config.train.batch_size=32",
            "--config.evals.digits.num_examples=40",
            "--config.evals.digits_probe.num_examples=40",
            "--config.evals.digits_probe.train_num_examples=100",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for metric in ("digits/top1", "digits_probe/top1", "digits_probe/l2"):
        assert f"{metric}:" in result.stdout
    assert os.listdir(tmp_path / "best") == ["2"]
