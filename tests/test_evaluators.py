"""Evaluators: zero-shot with a known answer, the same numbers on any mesh, the
in-training hooks and best checkpoint, the standalone command and the digits recipe."""

from __future__ import annotations

import json
import os
import subprocess

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from config_util import recipe, recipe_module
from process_util import run_python

from jaxclip import sharding
from jaxclip.config import ConfigError, base_config, validate_config
from jaxclip.convert.checkpoint import read_checkpoint
from jaxclip.data import digits
from jaxclip.data.tokenizer import VOCAB_SIZE, tokenize
from jaxclip.evaluate import evaluators, linear_probe
from jaxclip.evaluate.datasets import ArrayImages, ClassificationSet, RetrievalSet
from jaxclip.evaluate.zeroshot import prompt_texts
from jaxclip.models.build import make_encoders
from jaxclip.models.clip import CLIP
from jaxclip.models.registry import get_model_config
from jaxclip.train.checkpoint import Checkpointer
from jaxclip.train.loop import train_and_evaluate

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
    entry = evaluators.spec("zeroshot", "shapes", templates="", batch_size=5)
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


def _evaluator_with(entry, data, encoders, mesh, templates, vocab_size=VOCAB_SIZE):
    """An Evaluator over `data` (an in-memory set), tokenized as evaluators.read_data
    does (the CLIP BPE with `vocab_size` ids, the model's)."""
    if entry.kind == "retrieval":
        texts = data.captions
    else:
        texts = prompt_texts(data.class_names, templates)
    tokens = tokenize(texts, CONTEXT, vocab_size)
    return evaluators.Evaluator("t", entry, encoders, mesh, data, tokens)


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
        encoders = make_encoders(model, config.data.mean, config.data.std)
        placed = jax.device_put(variables, sharding.replicated(mesh))
        got = {}
        for kind, data in (("zeroshot", zeroshot_set), ("retrieval", retrieval_set)):
            entry = evaluators.spec(kind, "csv", path="x", batch_size=48)
            evaluator = _evaluator_with(
                entry,
                data,
                encoders,
                mesh,
                list(digits.ZEROSHOT_TEMPLATES),
                model.config.text.vocab_size,
            )
            with sharding.use_mesh(mesh):
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
    config.evals.a = evaluators.spec("retrieval", "shapes")
    with pytest.raises(ConfigError, match="evals.a.dataset='shapes'"):
        validate_config(config)
    config.evals.a = evaluators.spec("zeroshot", "folder")
    with pytest.raises(ConfigError, match="needs a path"):
        validate_config(config)
    config.evals.a = evaluators.spec("zeroshot", "shapes", every_steps=-2)
    with pytest.raises(ConfigError, match="every_steps=-2"):
        validate_config(config)
    config.evals.a = evaluators.spec("probe", "shapes")
    with pytest.raises(
        ConfigError, match=r"evals.a.kind='probe' must be one of \['zero"
    ):
        validate_config(config)
    config.evals.a = evaluators.spec("zeroshot", "shapes", batch_size=0)
    with pytest.raises(ConfigError, match="evals.a.batch_size=0 must be a positive"):
        validate_config(config)
    for fields, message in (
        ({"l2_grid": ()}, r"l2_grid=\(\) must be a non-empty list"),
        ({"l2_grid": (1.0, 0.0)}, r"l2_grid=\(1.0, 0.0\) must be .* > 0"),
        ({"l2_grid": (float("inf"),)}, "l2_grid=.*finite"),
        ({"refine_steps": -1}, "evals.a.refine_steps=-1 must be a non-negative"),
    ):
        config.evals.a = evaluators.spec("linear_probe", "shapes", **fields)
        with pytest.raises(ConfigError, match=message):
            validate_config(config)
    # A probe entry saved before l2_grid and refine_steps existed: the paper's search.
    config.evals.a = evaluators.spec("linear_probe", "shapes")
    del config.evals.a["l2_grid"], config.evals.a["refine_steps"]
    validate_config(config)
    assert evaluators.probe_search(config.evals.a) == {
        "l2_grid": linear_probe.DEFAULT_L2_GRID,
        "refine_steps": linear_probe.DEFAULT_REFINE_STEPS,
    }
    config.evals.a = evaluators.spec("zeroshot", "shapes")
    config.checkpoint.best_metric = "b/top1"
    with pytest.raises(ConfigError, match="best_metric='b/top1'"):
        validate_config(config)
    with pytest.raises(ValueError, match="no field 'colour'"):
        evaluators.spec("zeroshot", "shapes", colour="red")

    benchmarks = recipe_module("evaluate")
    validate_config(benchmarks.get_config("imagenet,cifar10,cifar100,coco,flickr30k"))
    with pytest.raises(ValueError, match="unknown benchmarks"):
        benchmarks.get_config("imagenet,mnist")


def _records(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


# A tiny run of the demo recipe: zero-shot every 2 steps, a checkpoint every step.
DEMO_OVERRIDES = {
    "model.name": "tiny-vit",
    "train.batch_size": 16,
    "train.steps": 5,
    "optim.warmup_steps": 0,
    "checkpoint.every_steps": 1,
    "checkpoint.keep": 10,
    "evals.zeroshot.num_examples": 48,
    "evals.zeroshot.every_steps": 2,
}


@pytest.mark.slow
def test_in_training_evaluators_fire_at_their_period_and_keep_the_best(tmp_path):
    config = recipe("demo", overrides=DEMO_OVERRIDES)
    config.evals.at_end = evaluators.spec(
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


def run_module(*args: str) -> subprocess.CompletedProcess:
    return run_python("-m", *args)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_digits_recipe_trains_then_evaluates_standalone(tmp_path):
    workdir = tmp_path / "run"
    # One l2 for the probe, not the search (test_eval_linear_probe.py tests that):
    # 2 fits, not 13, in each of the two runs.
    small = [
        "--config.evals.digits.num_examples=40",
        "--config.evals.digits_probe.num_examples=40",
        "--config.evals.digits_probe.train_num_examples=100",
        "--config.evals.digits_probe.l2_grid=(0.5,)",
    ]
    train = run_module(
        "jaxclip.train",
        "--config=configs/digits.py",
        f"--workdir={workdir}",
        "--config.train.steps=2",
        "--config.train.batch_size=32",
        *small,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    for metric in ("digits/top1", "digits_probe/top1", "digits_probe/l2"):
        assert f"{metric}:" in train.stdout
    assert os.listdir(workdir / "best") == ["2"]

    # The same weights and evaluators, standalone, on another mesh. Without --config
    # the run's own config is used (its command-line overrides included), still
    # overridable, and an evaluator is added from the command line.
    output = tmp_path / "out" / "results.json"
    evaluate = run_module(
        "jaxclip.evaluate",
        f"--checkpoint={workdir}",
        f"--output={output}",
        "--config.mesh.shape=(2,2,2)",
        "--config.evals.extra.kind=zeroshot",
        "--config.evals.extra.dataset=digits",
        "--config.evals.extra.num_examples=40",
    )
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    assert "_CHECKPOINT_METADATA" not in evaluate.stderr
    report = json.loads(output.read_text())
    assert report["model"] == "demo-vit"
    final = {}
    for record in _records(workdir):
        if record["step"] == 2:
            final.update(record)
    for name in ("digits/top1", "digits/top5", "digits_probe/top1"):
        assert report["results"][name] == final[name], name
    # The probe's search settings came along in the run's saved config.
    assert final["digits_probe/l2"] == report["results"]["digits_probe/l2"] == 0.5
    assert f"digits/top1: {final['digits/top1']:.4f}" in evaluate.stdout
    # The added evaluator reads the same set with the same prompts.
    assert report["results"]["extra/top1"] == final["digits/top1"]

    missing = run_module(
        "jaxclip.evaluate", "--config=configs/digits.py", f"--checkpoint={tmp_path}/x"
    )
    assert missing.returncode == 2 and "error:" in missing.stderr
    no_config = run_module("jaxclip.evaluate", f"--checkpoint={tmp_path}/x")
    assert no_config.returncode != 0
    assert "--config is required" in no_config.stderr


def _retrieval_reference(image_emb, text_emb, text_to_image, k):
    """R@k both ways from a float64 score matrix (ties: the lower index first)."""
    scores = image_emb.astype(np.float64) @ text_emb.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")
    i2t = np.mean(
        [
            np.isin(order[i, :k], np.flatnonzero(text_to_image == i)).any()
            for i in range(len(scores))
        ]
    )
    order = np.argsort(-scores.T, axis=1, kind="stable")
    t2i = np.mean([image in order[t, :k] for t, image in enumerate(text_to_image)])
    return i2t, t2i


def test_coco_style_retrieval_with_the_benchmark_config(tmp_path):
    """configs/evaluate.py:coco on a tiny Karpathy JSON, against jaxclip.load's
    embeddings ranked in float64."""
    from PIL import Image

    import jaxclip
    from jaxclip.evaluate.standalone import evaluate_checkpoint
    from jaxclip.train.state import TrainState, make_optimizer

    rng = np.random.default_rng(0)
    names = ["red", "green", "blue", "white", "black", "grey"]
    entries = []
    for number, name in enumerate(names):
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{number}.png")
        sentences = [{"raw": f"a {name} picture"}, {"raw": f"something {name}"}]
        entries.append(
            {"filename": f"{number}.png", "split": "test", "sentences": sentences}
        )
    entries.append({"filename": "9.png", "split": "train", "sentences": [{"raw": "x"}]})
    (tmp_path / "karpathy.json").write_text(json.dumps({"images": entries}))

    # A tiny-vit checkpoint as the trainer writes it.
    config = base_config()
    config.model.name = "tiny-vit"
    model = CLIP(get_model_config("tiny-vit"), scan=False)
    params = nn.meta.unbox(
        model.init(
            jax.random.key(2),
            jnp.zeros((1, 32, 32, 3)),
            jnp.zeros((1, CONTEXT), jnp.int32),
            train=False,
        )["params"]
    )
    state = TrainState(
        step=jnp.asarray(3, jnp.int32),
        params=params,
        opt_state=make_optimizer(config).init(params),
        batch_stats={},
        nonfinite_streak=jnp.asarray(0, jnp.int32),
        nonfinite_total=jnp.asarray(0, jnp.int32),
    )
    checkpointer = Checkpointer(str(tmp_path / "run" / "checkpoints"), async_save=False)
    checkpointer.save(3, state, {}, json.loads(config.to_json_best_effort()))
    checkpointer.close()

    eval_config = recipe_module("evaluate").get_config("coco")
    eval_config.evals.coco.path = str(tmp_path / "karpathy.json")
    eval_config.evals.coco.data_dir = str(tmp_path)
    eval_config.evals.coco.batch_size = 4  # several batches, the last one padded
    report = evaluate_checkpoint(eval_config, str(tmp_path / "run"), [])
    results = report["results"]

    loaded = jaxclip.load(str(tmp_path / "run"))
    images = np.stack([np.asarray(Image.open(tmp_path / f"{n}.png")) for n in range(6)])
    captions = [s["raw"] for entry in entries[:6] for s in entry["sentences"]]
    image_emb = loaded.model.encode_image(loaded.variables, images)
    text_emb = loaded.model.encode_text(loaded.variables, captions)
    text_to_image = np.repeat(np.arange(6), 2)
    for k in (1, 5, 10):
        i2t, t2i = _retrieval_reference(image_emb, text_emb, text_to_image, k)
        assert results[f"coco/image_to_text/R@{k}"] == pytest.approx(i2t)
        assert results[f"coco/text_to_image/R@{k}"] == pytest.approx(t2i)
