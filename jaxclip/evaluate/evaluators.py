"""Evaluators listed in the config, run during training and by `python -m jaxclip.evaluate`.

Each entry of `config.evals` is one evaluator, as in big_vision: a kind, a dataset and
a period.

    config.evals.imagenet = evaluators.spec(
        "zeroshot", "folder", path="/data/imagenet/val", classnames="imagenet",
        every_steps=5000)
    config.evals.coco = evaluators.spec(
        "retrieval", "karpathy", path="/data/coco/dataset_coco.json",
        data_dir="/data/coco")
    config.evals.coco_captions = evaluators.spec(      # CoCa models
        "captioning", "karpathy", path="/data/coco/dataset_coco.json",
        data_dir="/data/coco", method="beam", batch_size=64)

Results are named `<entry>/<metric>` (`imagenet/top1`, `coco/image_to_text/R@1`) and
go to the console, TensorBoard and `metrics.jsonl`. `params='ema'` evaluates the
run's exponential moving average of the parameters instead of the parameters
(`train.ema_decay` > 0; jaxclip/train/ema.py): give it its own entry to follow both,

    config.evals.imagenet_ema = evaluators.spec(
        "zeroshot", "folder", path="/data/imagenet/val", classnames="imagenet",
        params="ema", every_steps=5000)

Every process runs every evaluator (each embeds, or captions, its share of the
images; see embed.py), and gets the same numbers.

Kinds:
- `zeroshot`: top1, top5, mean_per_class_recall, with class embeddings from the
  prompt ensemble (`classnames`, `templates`; see prompts.py).
- `retrieval`: image_to_text/R@1,5,10, mean_rank, median_rank and the same for
  text_to_image, ranked sharded across the devices (retrieval.py).
- `linear_probe`: the CLIP paper's logistic regression on frozen image features of
  `train_split`, L2 strength chosen on a validation part of it (`l2_grid`, then
  `refine_steps` halvings around the best), scored on `split` (linear_probe.py, in
  JAX).
- `captioning` (CoCa models only): bleu4, cider (CIDEr-D) and exact_match of the
  captions the model writes (jaxclip/models/generate.py, with the entry's decoding
  options `method`, `max_len`, `min_len`, `num_beams`, `length_penalty`, `top_k`,
  `top_p`, `temperature`, `seed`) against each image's references, scored as the COCO
  caption evaluation does (caption_metrics.py). Its data: `shapes` (one caption per
  image), `csv` or `karpathy` (all an image's captions).

Datasets (`dataset`): `shapes` (the demo's held-out shapes), `digits` (scikit-learn's
digits, split 'train' or 'test'), `tfds` (`path` = the dataset name, `data_dir`,
`split`), `folder` (`path` = an ImageNet-style class-per-folder tree), `csv` (`path`
= a CSV/TSV file of image paths with labels, or with captions for retrieval) and
`karpathy` (`path` = a Karpathy split JSON for COCO/Flickr30k, `data_dir` = the
image root).
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from jaxclip import sharding
from jaxclip.config_rules import (
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    ConfigError,
    Rule,
    check_fields,
    int_at_least,
    is_number,
    number,
    one_of,
)
from jaxclip.data import digits, shapes
from jaxclip.data.tokenizer import TokenizerSpec
from jaxclip.evaluate import prompts
from jaxclip.evaluate.caption_metrics import caption_metrics
from jaxclip.evaluate.datasets import ArrayImages, ClassificationSet, RetrievalSet
from jaxclip.evaluate.embed import embed_rows, map_rows
from jaxclip.evaluate.linear_probe import (
    DEFAULT_L2_GRID,
    DEFAULT_REFINE_STEPS,
    linear_probe,
)
from jaxclip.evaluate.retrieval import retrieval_metrics
from jaxclip.evaluate.zeroshot import (
    class_embeddings,
    classification_metrics,
    prompt_texts,
)
from jaxclip.models.build import Encoders, make_encoders
from jaxclip.models.clip import CLIP
from jaxclip.models.coca import CoCa
from jaxclip.models.generate import METHODS, Decoding, ids_to_texts, make_generator
from jaxclip.models.registry import ModelConfig

# The registry of choices: each kind and the datasets it can read.
DATASETS_BY_KIND = {
    "zeroshot": ("shapes", "digits", "tfds", "folder", "csv"),
    "retrieval": ("csv", "karpathy"),
    "linear_probe": ("shapes", "digits", "tfds", "folder", "csv"),
    "captioning": ("shapes", "csv", "karpathy"),
}
KINDS = tuple(DATASETS_BY_KIND)

# Every field of an entry with its default (`spec` fills in the rest).
LIST_FIELDS = ("classnames", "templates")  # spec() takes lists for these

_DEFAULTS = {
    "kind": "zeroshot",  # zeroshot | retrieval | linear_probe | captioning
    "dataset": "shapes",  # shapes | digits | tfds | folder | csv | karpathy
    # during training, every this many steps; 0: once, at the end; -1: off
    "every_steps": 0,
    "batch_size": 256,  # images (or texts) embedded per global batch
    # the weights evaluated: "params", or "ema" (their EMA; train.ema_decay > 0)
    "params": "params",
    "path": "",  # tfds name, folder root, CSV/TSV file or Karpathy JSON
    "split": "test",  # tfds / digits / Karpathy split evaluated
    "data_dir": "",  # tfds data_dir; Karpathy image root
    "num_examples": 0,  # only the first n images (0: all)
    "image_key": "image",  # tfds features
    "label_key": "label",
    "image_column": "filepath",  # CSV columns
    "label_column": "label",
    "caption_column": "title",
    # zeroshot: class names and prompts: "" (the dataset's own), a packaged set
    # (imagenet, cifar10, cifar100; templates also 'simple'), a list (held as JSON
    # text), or a file: one entry per line, or .json with a list
    "classnames": "",
    "templates": "",
    # linear_probe: what the probe is fit on: this split (tfds, digits), or for
    # folder and csv datasets this path
    "train_split": "train",
    "train_path": "",
    "train_num_examples": 0,
    # linear_probe: the l2 strengths fit first (the paper's 1e-6, 1e-4, ..., 1e6),
    # then this many halvings of the gap around the best; (l2,) fits that l2 alone
    # (one value leaves no gap to refine)
    "l2_grid": DEFAULT_L2_GRID,
    "refine_steps": DEFAULT_REFINE_STEPS,
    # captioning (CoCa): how captions are decoded (jaxclip/models/generate.py):
    # "greedy", "beam" (num_beams, length_penalty) or "sample" (top_k, top_p,
    # temperature, seed); at most max_len tokens, start and end included, and at
    # least min_len before the end
    "method": "greedy",
    "max_len": 30,
    "min_len": 5,
    "num_beams": 6,
    "length_penalty": 1.0,
    "top_k": 0,  # 0: no top-k cut
    "top_p": 1.0,  # 1: no nucleus cut
    "temperature": 1.0,
    "seed": 0,  # sampling: batch i draws with fold_in(key(seed), i)
}
DECODING_FIELDS = (
    "method",
    "max_len",
    "min_len",
    "num_beams",
    "length_penalty",
    "top_k",
    "top_p",
    "temperature",
)
# What captioning reports (caption_metrics.py computes them).
CAPTION_METRICS = ("bleu4", "cider", "exact_match")

# Types and ranges of an entry's fields; what depends on the kind and dataset is
# checked in `validate`.
_RULES = {
    "kind": one_of(KINDS),
    "every_steps": int_at_least(-1),
    "batch_size": POSITIVE_INT,
    "num_examples": int_at_least(0),
    "train_num_examples": int_at_least(0),
}
# A captioning entry's decoding options (only its: a config saved before they existed
# has entries without them). What depends on the model is checked in `check_model`.
_CAPTIONING_RULES = {
    "method": one_of(METHODS),
    "max_len": int_at_least(2),  # the start token and one more
    "min_len": NON_NEGATIVE_INT,
    "num_beams": POSITIVE_INT,
    "length_penalty": number(math.isfinite, "must be a finite number"),
    "top_k": NON_NEGATIVE_INT,
    "top_p": number(lambda value: 0 < value <= 1, "must be in (0, 1]"),
    "temperature": POSITIVE,
    "seed": NON_NEGATIVE_INT,
}
# A linear probe's search for its l2 strength (a config saved before these fields
# existed has entries without them: the paper's search).
_PROBE_RULES = {
    "l2_grid": Rule(
        lambda grid: (
            isinstance(grid, (tuple, list))
            and len(grid) > 0
            and all(is_number(l2) and math.isfinite(l2) and l2 > 0 for l2 in grid)
        ),
        "must be a non-empty list of finite numbers > 0",
    ),
    "refine_steps": NON_NEGATIVE_INT,
}
_NEEDS_PATH = ("tfds", "folder", "csv", "karpathy")
WEIGHTS = ("params", "ema")


def weights_of(entry: ml_collections.ConfigDict) -> str:
    """Which weights an entry evaluates: "params" or "ema" (a config saved before the
    field existed has no `params`: the params)."""
    return entry.get("params", "params")


def probe_search(entry: ml_collections.ConfigDict) -> dict[str, Any]:
    """A linear probe entry's `l2_grid` and `refine_steps`."""
    return {
        "l2_grid": entry.get("l2_grid", DEFAULT_L2_GRID),
        "refine_steps": entry.get("refine_steps", DEFAULT_REFINE_STEPS),
    }


def spec(kind: str, dataset: str, **fields: Any) -> ml_collections.ConfigDict:
    """One `config.evals` entry: every field with its default, then `fields`."""
    entry = ml_collections.ConfigDict(_DEFAULTS)
    entry.kind, entry.dataset = kind, dataset
    for name, value in fields.items():
        if name not in entry:
            raise ValueError(f"evaluator spec has no field {name!r}")
        if name in LIST_FIELDS and isinstance(value, (list, tuple)):
            value = json.dumps(list(value))  # an inline list (prompts.py reads it)
        entry[name] = value
    return entry


def validate(evals: ml_collections.ConfigDict) -> None:
    """Refuse an evaluator that cannot run, naming the field (raises ConfigError)."""
    for name, entry in evals.items():
        where = f"evals.{name}"
        if "/" in name:
            raise ConfigError(f"{where}: an evaluator name cannot contain '/'")
        unknown = sorted(set(entry.keys()) - set(_DEFAULTS))
        if unknown:
            raise ConfigError(f"{where}: unknown fields {unknown}")
        check_fields(entry, _RULES, prefix=f"{where}.")
        if weights_of(entry) not in WEIGHTS:
            raise ConfigError(
                f"{where}.params={weights_of(entry)!r} must be one of {list(WEIGHTS)} "
                "(the parameters, or their EMA)"
            )
        datasets = DATASETS_BY_KIND[entry.kind]
        if entry.get("dataset") not in datasets:
            raise ConfigError(
                f"{where}.dataset={entry.get('dataset')!r}; a {entry.kind} evaluator "
                f"reads one of {list(datasets)}"
            )
        _check_paths(entry, where)
        if entry.kind == "linear_probe":
            check_fields(probe_search(entry), _PROBE_RULES, prefix=f"{where}.")
        if entry.kind == "captioning":
            _check_decoding(entry, where)


def _check_decoding(entry: ml_collections.ConfigDict, where: str) -> None:
    check_fields(entry, _CAPTIONING_RULES, prefix=f"{where}.")
    if entry.min_len > entry.max_len:
        raise ConfigError(
            f"{where}.min_len={entry.min_len} must be at most "
            f"{where}.max_len={entry.max_len} (the most tokens a caption has, "
            "start and end included)"
        )


def check_model(
    evals: ml_collections.ConfigDict, model: ModelConfig, model_name: str
) -> None:
    """Refuse an evaluator the model evaluated cannot run (raises ConfigError):
    captioning needs CoCa's text decoder, and decoding options `generate` can run
    on it (lengths within its context, beams and top_k within its vocabulary)."""
    for name, entry in evals.items():
        if entry.kind != "captioning":
            continue
        if not model.is_coca:
            raise ConfigError(
                f"evals.{name}: a captioning evaluator needs a CoCa model (its text "
                f"decoder writes the captions); {model_name!r} is not one "
                "(docs/coca.md)"
            )
        decoding = Decoding(**decoding_options(entry))
        try:  # generate's own check: lengths, beams and top_k against the model
            decoding.check(model.text.context_length, model.text.vocab_size)
        except ValueError as e:
            raise ConfigError(f"evals.{name}: {e}, for {model_name!r}") from None


def _check_paths(entry: ml_collections.ConfigDict, where: str) -> None:
    """What the entry's dataset needs besides its name: paths, or a known split."""
    if entry.dataset in _NEEDS_PATH and not entry.path:
        raise ConfigError(f"{where}: dataset={entry.dataset!r} needs a path")
    if (
        entry.kind == "linear_probe"
        and entry.dataset in ("folder", "csv")
        and not entry.train_path
    ):
        raise ConfigError(
            f"{where}: a linear probe on dataset={entry.dataset!r} needs "
            "train_path (the images to fit on; path holds those it is scored on)"
        )
    if entry.dataset == "karpathy" and not entry.data_dir:
        raise ConfigError(f"{where}: dataset='karpathy' needs data_dir (the images)")
    if entry.dataset == "digits":
        for field in ("split", "train_split"):
            if entry[field] not in digits.SPLITS:
                raise ConfigError(
                    f"{where}.{field}={entry[field]!r}; digits has splits "
                    f"{list(digits.SPLITS)}"
                )


# --- Datasets.


def _limit(count: int) -> int | None:
    return count or None


def classification_set(
    entry: ml_collections.ConfigDict,
    image_size: int,
    split: str,
    num_examples: int,
    seed: int = 0,
    path: str = "",
) -> ClassificationSet:
    """The labelled images an evaluator reads (at `path`, default the entry's)."""
    limit = _limit(num_examples)
    path = path or entry.path
    if entry.dataset == "shapes":
        held_out = shapes.eval_set(seed, num_examples or 1000, image_size)
        return ClassificationSet.from_arrays(
            held_out["images"], held_out["label"], shapes.class_names(), "shapes"
        )
    if entry.dataset == "digits":
        data = digits.labelled(split, image_size)
        images, labels = data["images"][:limit], data["label"][:limit]
        return ClassificationSet.from_arrays(
            images, labels, digits.class_names(), f"digits/{split}"
        )
    names = prompts.class_names(entry.classnames) if entry.classnames else None
    if entry.dataset == "tfds":
        return ClassificationSet.from_tfds(
            path,
            split,
            entry.data_dir or None,
            entry.image_key,
            entry.label_key,
            image_size=image_size,
            class_names=names,
            num_examples=limit,
        )
    if entry.dataset == "folder":
        return ClassificationSet.from_folder(
            path, image_size, class_names=names, num_examples=limit
        )
    return ClassificationSet.from_csv(
        path,
        image_size,
        entry.image_column,
        entry.label_column,
        class_names=names,
        num_examples=limit,
    )


def retrieval_set(entry: ml_collections.ConfigDict, image_size: int) -> RetrievalSet:
    """The captioned images a retrieval evaluator reads, built once."""
    limit = _limit(entry.num_examples)
    if entry.dataset == "karpathy":
        return RetrievalSet.from_karpathy_json(
            entry.path,
            entry.data_dir,
            entry.split,
            image_size=image_size,
            num_examples=limit,
        )
    return RetrievalSet.from_csv(
        entry.path,
        image_size,
        entry.image_column,
        entry.caption_column,
        num_examples=limit,
    )


def caption_set(
    entry: ml_collections.ConfigDict, image_size: int, seed: int = 0
) -> RetrievalSet:
    """The images a captioning evaluator captions, with their reference captions: the
    held-out shapes (one caption each), or a retrieval set's (several per image)."""
    if entry.dataset != "shapes":
        return retrieval_set(entry, image_size)
    held_out = shapes.eval_set(seed, entry.num_examples or 1000, image_size)
    count = len(held_out["captions"])
    return RetrievalSet(
        ArrayImages(held_out["images"]),
        held_out["captions"],
        np.arange(count),
        {},
        {},
        "shapes",
    )


def default_templates(entry: ml_collections.ConfigDict) -> list[str]:
    """The prompts used when `templates` is empty: the dataset's own sentences for the
    built-in sets, the matching packaged set for CIFAR, else the CLIP paper's 80."""
    if entry.templates:
        return prompts.templates(entry.templates)
    if entry.dataset == "shapes":
        return list(shapes.ZEROSHOT_TEMPLATES)
    if entry.dataset == "digits":
        return list(digits.ZEROSHOT_TEMPLATES)
    for name in (entry.classnames, entry.path.split(":")[0]):
        if name in prompts.TEMPLATE_SETS:
            return prompts.templates(name)
    return prompts.templates("imagenet")


# --- Evaluators.

Variables = dict[str, Any]


class Evaluator:
    """One `config.evals` entry over data read once; `run(variables)` evaluates.

    `tokens`: the prompts' tokens (zeroshot, class by class as `prompt_texts` orders
    them) or the captions' (retrieval), tokenized once here rather than at every run.
    `train_data`: what a linear probe is fit on. `generate`: a captioning evaluator's
    jitted `(variables, uint8 images, key) -> int32 ids [n, max_len]`
    (`generate.make_generator` with the entry's decoding options).
    """

    def __init__(
        self,
        name: str,
        entry: ml_collections.ConfigDict,
        encoders: Encoders,
        mesh: Mesh,
        data: ClassificationSet | RetrievalSet,
        tokens: np.ndarray | None = None,
        train_data: ClassificationSet | None = None,
        generate: Callable[..., jax.Array] | None = None,
    ):
        self.name, self.entry, self.mesh = name, entry, mesh
        self.encode_images, self.encode_texts = encoders
        self.data, self.tokens, self.train_data = data, tokens, train_data
        self.generate = generate

    @property
    def every_steps(self) -> int:
        return self.entry.every_steps

    def due(self, step: int) -> bool:
        """Whether this evaluator runs after training step `step` (periodic ones)."""
        return self.every_steps > 0 and step % self.every_steps == 0

    def due_at_end(self, last_step: int) -> bool:
        """Whether it runs once training ends (unless it just ran at `last_step`)."""
        return self.every_steps >= 0 and not self.due(last_step)

    def _embed_images(self, variables: Variables, data: Any) -> np.ndarray:
        return embed_rows(
            lambda images: self.encode_images(variables, images),
            data.load,
            len(data),
            self.entry.batch_size,
            self.mesh,
        )

    def _embed_tokens(self, variables: Variables, tokens: np.ndarray) -> np.ndarray:
        return embed_rows(
            lambda batch: self.encode_texts(variables, batch),
            lambda start, stop: tokens[start:stop],
            len(tokens),
            self.entry.batch_size,
            self.mesh,
        )

    def run(self, variables: Variables) -> dict[str, float]:
        """This evaluator's metrics, named `<name>/<metric>`."""
        start = time.perf_counter()
        if self.entry.kind == "zeroshot":
            results = self._zeroshot(variables)
        elif self.entry.kind == "retrieval":
            results = self._retrieval(variables)
        elif self.entry.kind == "captioning":
            results = self._captioning(variables)
        else:
            results = self._linear_probe(variables)
        skipped = sum(self.data.skipped.values())
        if self.train_data is not None:
            skipped += sum(self.train_data.skipped.values())
        if skipped:
            results["skipped"] = skipped
        results["seconds"] = time.perf_counter() - start
        return {f"{self.name}/{metric}": float(v) for metric, v in results.items()}

    def _zeroshot(self, variables: Variables) -> dict[str, float]:
        prompts = self._embed_tokens(variables, self.tokens)
        classifier = class_embeddings(prompts, len(self.data.class_names))
        features = _normalize(self._embed_images(variables, self.data))
        logits = features @ np.asarray(classifier, np.float32).T
        return classification_metrics(logits, self.data.labels)

    def _retrieval(self, variables: Variables) -> dict[str, float]:
        image_emb = self._embed_images(variables, self.data)
        text_emb = self._embed_tokens(variables, self.tokens)
        return retrieval_metrics(
            image_emb, text_emb, self.data.text_to_image, mesh=self.mesh
        )

    def _linear_probe(self, variables: Variables) -> dict[str, float]:
        search = probe_search(self.entry)
        train = _normalize(self._embed_images(variables, self.train_data))
        test = _normalize(self._embed_images(variables, self.data))
        results = linear_probe(
            train,
            self.train_data.labels,
            test,
            self.data.labels,
            len(self.data.class_names),
            grid=search["l2_grid"],
            refine_steps=search["refine_steps"],
            mesh=self.mesh,
        )
        # linear_probe names its metrics 'linear_probe/...'; the entry names them here.
        return {metric.split("/", 1)[-1]: value for metric, value in results.items()}

    def captions(self, variables: Variables) -> list[str]:
        """The generated caption of each image (captioning), the same on every
        process: batches of `batch_size` images, sharded over the mesh's batch axes."""
        batch_keys = None
        if self.entry.method == "sample":
            base = jax.random.key(self.entry.seed)
            replicated = sharding.replicated(self.mesh)
            batch_keys = (
                jax.device_put(jax.random.fold_in(base, i), replicated)
                for i in itertools.count()
            )

        def generate(images: jax.Array) -> jax.Array:
            key = next(batch_keys) if batch_keys is not None else None
            return self.generate(variables, images, key)

        ids = map_rows(
            generate, self.data.load, len(self.data), self.entry.batch_size, self.mesh
        )
        return ids_to_texts(ids)

    def _captioning(self, variables: Variables) -> dict[str, float]:
        scores = caption_metrics(
            self.captions(variables), self.data.captions_by_image()
        )
        return {metric: scores[metric] for metric in CAPTION_METRICS}


def _normalize(features: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(features, axis=-1, keepdims=True)
    return features / np.maximum(norms, np.finfo(np.float32).tiny)


def read_data(
    entry: ml_collections.ConfigDict,
    image_size: int,
    context_length: int,
    tokenizer: TokenizerSpec,
    seed: int = 0,
) -> tuple[
    ClassificationSet | RetrievalSet, np.ndarray | None, ClassificationSet | None
]:
    """What one entry's evaluator reads, once: `(data, tokens, train_data)` as
    `Evaluator` takes them (tokens of the prompts or captions; a probe's train set)."""
    if entry.kind == "captioning":
        return caption_set(entry, image_size, seed), None, None
    if entry.kind == "retrieval":
        data = retrieval_set(entry, image_size)
        return data, tokenizer(data.captions, context_length), None
    data = classification_set(entry, image_size, entry.split, entry.num_examples, seed)
    if entry.kind == "zeroshot":
        texts = prompt_texts(data.class_names, default_templates(entry))
        return data, tokenizer(texts, context_length), None
    train_data = classification_set(
        entry,
        image_size,
        entry.train_split,
        entry.train_num_examples,
        seed,
        path=entry.train_path,
    )
    return data, None, train_data


def make_evaluators(
    evals: ml_collections.ConfigDict,
    model: CLIP | CoCa,
    mean: Sequence[float],
    std: Sequence[float],
    mesh: Mesh,
    tokenizer: TokenizerSpec,
    seed: int = 0,
) -> list[Evaluator]:
    """One Evaluator per `config.evals` entry, in the config's order, its data read;
    images are normalised with `mean` and `std` as the model was trained.

    The entries must have passed `validate` and `check_model` (validate_config and
    validate_evals_config run them before anything is built)."""
    encoders = make_encoders(model, mean, std)
    image_size = model.config.vision.image_size
    context_length = model.config.text.context_length
    evaluators = []
    for name, entry in evals.items():
        generate = None
        if entry.kind == "captioning":
            generate = make_generator(model, mean, std, **decoding_options(entry))
        data = read_data(entry, image_size, context_length, tokenizer, seed)
        evaluators.append(
            Evaluator(name, entry, encoders, mesh, *data, generate=generate)
        )
    return evaluators


def decoding_options(entry: ml_collections.ConfigDict) -> dict[str, Any]:
    """A captioning entry's keyword arguments for `generate` (all but the key)."""
    return {field: entry[field] for field in DECODING_FIELDS}


def run_all(
    evaluators: Sequence[Evaluator],
    variables: Variables,
    ema_variables: Variables | None = None,
) -> dict[str, float]:
    """Every evaluator's metrics, merged; those with `params='ema'` run on
    `ema_variables` (the same variables with the EMA as their params)."""
    results: dict[str, float] = {}
    for evaluator in evaluators:
        if weights_of(evaluator.entry) == "ema":
            if ema_variables is None:
                raise ValueError(
                    f"evals.{evaluator.name}.params='ema', but these weights have no "
                    "EMA of the parameters"
                )
            results.update(evaluator.run(ema_variables))
        else:
            results.update(evaluator.run(variables))
    return results
