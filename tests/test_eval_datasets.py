"""Evaluation data: the packaged class names and prompts, and the labelled and
captioned image sets (folder, CSV, tfds, Karpathy JSON), built from scratch here."""

from __future__ import annotations

import collections
import csv
import importlib.util
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxclip.evaluate import prompts
from jaxclip.evaluate.datasets import ClassificationSet, RetrievalSet

ASSETS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "jaxclip",
    "evaluate",
    "assets",
)
SIZE = 16

# ---------------------------------------------------------------------------
# Class names and prompt templates


def test_packaged_lists_counts_and_spot_checks():
    imagenet = prompts.class_names("imagenet")
    assert len(imagenet) == 1000
    # OpenAI's notebook: class 0 is the tench, 999 toilet tissue as 'toilet paper';
    # some of its edits (section 3.1.4 of the paper: crane vs crane).
    assert imagenet[0] == "tench" and imagenet[999] == "toilet paper"
    assert imagenet[134] == "crane bird" and imagenet[517] == "construction crane"
    assert imagenet[21] == "kite (bird of prey)" and imagenet[677] == "metal nail"
    assert len(prompts.templates("imagenet")) == 80
    assert len(prompts.templates("simple")) == 7
    assert prompts.templates("simple")[0] == "itap of a {}."
    cifar10 = prompts.class_names("cifar10")
    assert cifar10 == [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    cifar100 = prompts.class_names("cifar100")
    assert len(cifar100) == 100
    assert (cifar100[0], cifar100[1], cifar100[99]) == (
        "apple",
        "aquarium fish",
        "worm",
    )
    # CIFAR-100's label order is alphabetical in its own spelling (underscores).
    assert cifar100 == sorted(cifar100, key=lambda name: name.replace(" ", "_"))
    assert len(prompts.templates("cifar10")) == len(prompts.templates("cifar100")) == 18


def test_templates_have_one_placeholder_and_lists_no_duplicates():
    for name in prompts.TEMPLATE_SETS:
        listed = prompts.templates(name)
        assert len(set(listed)) == len(listed), name
        for template in listed:
            assert template.count("{}") == 1, template
            assert template.format("dog").count("dog") == 1
    for name in prompts.CLASS_NAME_SETS:
        listed = prompts.class_names(name)
        repeated = {
            entry: [i for i, other in enumerate(listed) if other == entry]
            for entry, n in collections.Counter(listed).items()
            if n > 1
        }
        # OpenAI's ImageNet list repeats two names, kept so the indices stay right.
        expected = (
            {"missile": [657, 744], "sunglasses": [836, 837]}
            if name == "imagenet"
            else {}
        )
        assert repeated == expected, name
        assert all(entry == entry.strip() and entry for entry in listed)


def test_every_asset_cites_its_source():
    listed = sorted(f for f in os.listdir(ASSETS) if f.endswith(".txt"))
    data_files = [f for f in listed if not f.startswith("LICENSE")]
    assert len(data_files) == 7
    for filename in data_files:
        with open(os.path.join(ASSETS, filename), encoding="utf-8") as f:
            text = f.read()
        header = [line for line in text.splitlines() if line.startswith("#")]
        assert text.startswith("#") and header, filename
        assert "github.com/openai/CLIP" in " ".join(header), filename
        assert "MIT licence" in " ".join(header), filename
        assert "commit " in " ".join(header), filename


def open_clip_metadata():
    """open_clip's zero_shot_metadata module, loaded from its file: it is plain data,
    and importing the `open_clip` package would pull in torch and torchvision (broken
    beside a CPU torch in some environments; see convert_util.py)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip_torch is not installed")
    path = os.path.join(spec.submodule_search_locations[0], "zero_shot_metadata.py")
    if not os.path.isfile(path):
        pytest.skip("this open_clip has no zero_shot_metadata.py")
    module_spec = importlib.util.spec_from_file_location("_zero_shot_metadata", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_lists_equal_open_clip():
    metadata = open_clip_metadata()
    assert prompts.class_names("imagenet") == list(metadata.IMAGENET_CLASSNAMES)
    for ours, theirs in (
        (prompts.templates("imagenet"), metadata.OPENAI_IMAGENET_TEMPLATES),
        (prompts.templates("simple"), metadata.SIMPLE_IMAGENET_TEMPLATES),
    ):
        assert len(ours) == len(theirs)
        for template, make_prompt in zip(ours, theirs):
            for name in ("tench", "toilet paper", "kite (bird of prey)"):
                assert template.format(name) == make_prompt(name)


def test_user_lists_and_errors(tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("# my classes\nred square\n  blue circle \n\n", encoding="utf-8")
    assert prompts.class_names(str(names)) == ["red square", "blue circle"]
    own = tmp_path / "templates.txt"
    own.write_text("\ufeff# from a BOM-writing editor\na photo of a {}.\n", "utf-8")
    assert prompts.templates(str(own)) == ["a photo of a {}."]

    with pytest.raises(ValueError, match=r"'imagenet', 'cifar10', 'cifar100'\]"):
        prompts.class_names("imagenet21k")
    with pytest.raises(ValueError, match="'simple'"):
        prompts.templates("nope")
    gap = tmp_path / "gap.txt"
    gap.write_text("cat\n\ndog\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2 is blank"):
        prompts.class_names(str(gap))
    bad = tmp_path / "bad_templates.txt"
    bad.write_text("a photo of a {}.\na photo of {0}.\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"template 2 .* exactly one '\{\}'"):
        prompts.templates(str(bad))
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no entries"):
        prompts.class_names(str(empty))


# ---------------------------------------------------------------------------
# Images, written here; the reference crop is plain PIL (resize, then crop)


def pixels_of(number: int, width: int, height: int) -> np.ndarray:
    """A gentle gradient around a colour unique to `number` (channels 40 apart)."""
    base = np.array([40 + 40 * (number % 5), 40 + 40 * (number // 5 % 5), 120])
    y, x = np.mgrid[0:height, 0:width]
    ramp = np.stack([x / width, y / height, (x + y) / (width + height)], -1)
    return np.clip(base + 60 * ramp - 30, 0, 255).astype(np.uint8)


def write_image(path, number: int, width: int, height: int, fmt: str = "PNG") -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    options = {"quality": 95} if fmt == "JPEG" else {}
    Image.fromarray(pixels_of(number, width, height)).save(path, fmt, **options)
    return str(path)


def reference_crop(path: str, size: int = SIZE) -> np.ndarray:
    """OpenCLIP's evaluation transform in plain PIL: the shorter side resized to
    `size` (bicubic), then torchvision's CenterCrop."""
    image = Image.open(path).convert("RGB")
    width, height = image.size
    scale = size / min(width, height)
    new_size = (
        (size, round(height * scale))
        if width <= height
        else (round(width * scale), size)
    )
    resized = image.resize(new_size, Image.Resampling.BICUBIC)
    left = int(round((new_size[0] - size) / 2))
    top = int(round((new_size[1] - size) / 2))
    return np.asarray(resized.crop((left, top, left + size, top + size)))


def assert_close_to_reference(images: np.ndarray, paths: list[str], exact=()) -> None:
    """Each image against its file's reference crop. The crop is resampled in one
    step (the square box resized), so where the reference's crop offset falls
    between source pixels the two differ by a fraction of a pixel: a few levels on
    these gradients. Where it falls on a pixel (`exact`) they agree bit for bit."""
    assert images.dtype == np.uint8 and images.shape == (len(paths), SIZE, SIZE, 3)
    for image, path in zip(images, paths):
        expected = reference_crop(path)
        diff = np.abs(image.astype(np.int64) - expected)
        if os.path.basename(path) in exact:
            assert diff.max() == 0, path
        else:
            assert diff.max() <= 10 and diff.mean() <= 2.5, (path, diff.max())


def write_corrupt(path) -> str:
    """A JPEG cut in half: identified by its header, fails to decode."""
    noise = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "JPEG")
    data = buffer.getvalue()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    return str(path)


def test_folder_set_pixels_labels_ranges_and_skips(tmp_path, caplog):
    root = tmp_path / "val"
    # Folder names sort differently from the order written; one image is nested.
    files = {
        "n02": [("b.png", 1, 60, 40), ("a.png", 2, 40, 60)],
        "n01": [("c.png", 3, 20, 20), ("sub/d.jpg", 4, 90, 90)],
        "n03": [("e.PNG", 5, 33, 47), ("f.png", 6, 10, 14)],
    }
    for folder, entries in files.items():
        for name, number, width, height in entries:
            fmt = "JPEG" if name.endswith(".jpg") else "PNG"
            write_image(root / folder / name, number, width, height, fmt)
    (root / "n01" / "notes.txt").write_text("not an image, and not counted as one")
    (root / "n02" / "z.jpg").write_bytes(b"this is no image")
    write_corrupt(root / "n03" / "g.jpg")
    os.makedirs(root / ".cache" / "x")  # hidden: not a class

    with caplog.at_level("WARNING"):
        dataset = ClassificationSet.from_folder(str(root), SIZE, threads=2)
    assert dataset.class_names == ["n01", "n02", "n03"]
    order = ["n01/c.png", "n01/sub/d.jpg", "n02/a.png", "n02/b.png", "n03/e.PNG"]
    order.append("n03/f.png")
    paths = [str(root / name) for name in order]
    assert dataset.images.keys == paths
    np.testing.assert_array_equal(dataset.labels, [0, 0, 1, 1, 2, 2])
    assert dataset.labels.dtype == np.int32 and len(dataset) == 6
    assert dataset.skipped == {"corrupt_image": 1, "not_an_image": 1}
    assert "skipped 2 of 8 images" in caplog.text

    images = dataset.load(0, 6)
    # The JPEG's reference is decoded at full size, ours at 1/4 scale (draft mode).
    assert_close_to_reference(images, paths, exact=("c.png", "a.png", "b.png"))
    # Index ranges (one process's share) are the same pixels as the whole.
    np.testing.assert_array_equal(dataset.load(2, 5), images[2:5])
    np.testing.assert_array_equal(dataset.images[4:], images[4:])
    np.testing.assert_array_equal(dataset.images[-1], images[5])
    assert dataset.load(3, 3).shape == (0, SIZE, SIZE, 3)
    with pytest.raises(IndexError):
        dataset.load(5, 7)

    readable = {"n01": "tench", "n02": "goldfish", "n03": "great white shark"}
    named = ClassificationSet.from_folder(str(root), SIZE, class_names=readable)
    assert named.class_names == ["tench", "goldfish", "great white shark"]
    listed = ClassificationSet.from_folder(
        str(root), SIZE, class_names=["a", "b", "c"], num_examples=3
    )
    assert listed.class_names == ["a", "b", "c"] and len(listed) == 3
    np.testing.assert_array_equal(listed.labels, [0, 0, 1])
    with pytest.raises(ValueError, match="class_names has 2 names but"):
        ClassificationSet.from_folder(str(root), SIZE, class_names=["a", "b"])
    with pytest.raises(ValueError, match=r"no name for 1 of the 3 folders.*'n03'"):
        ClassificationSet.from_folder(
            str(root), SIZE, class_names={"n01": "a", "n02": "b"}
        )


def test_all_bad_set_raises(tmp_path):
    os.makedirs(tmp_path / "only")
    write_corrupt(tmp_path / "only" / "broken.jpg")
    with pytest.raises(ValueError, match="none of its 1 images is usable"):
        ClassificationSet.from_folder(str(tmp_path), SIZE)


def write_rows(path, header: list[str], rows: list[list[str]]) -> str:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def test_csv_set_with_index_and_name_labels(tmp_path):
    for number in range(4):
        write_image(tmp_path / "img" / f"{number}.png", number, 24, 16)
    write_corrupt(tmp_path / "img" / "bad.jpg")
    by_index = write_rows(
        tmp_path / "by_index.csv",
        ["filepath", "label"],
        [
            ["img/2.png", "2"],
            ["img/0.png", "0"],
            ["img/missing.png", "1"],
            ["img/bad.jpg", "1"],
            ["img/3.png", " 1"],
        ],
    )
    dataset = ClassificationSet.from_csv(by_index, SIZE)
    assert dataset.class_names == ["0", "1", "2"]
    np.testing.assert_array_equal(dataset.labels, [2, 0, 1])
    assert dataset.skipped == {"corrupt_image": 1, "missing_image": 1}
    paths = [str(tmp_path / "img" / name) for name in ("2.png", "0.png", "3.png")]
    assert_close_to_reference(
        dataset.load(0, 3), paths, exact=("2.png", "0.png", "3.png")
    )
    # Unchecked, only missing files are left out; a bad image raises when loaded.
    unchecked = ClassificationSet.from_csv(by_index, SIZE, check_images=False)
    assert unchecked.skipped == {"missing_image": 1} and len(unchecked) == 4
    np.testing.assert_array_equal(unchecked.load(0, 2), dataset.load(0, 2))
    with pytest.raises(ValueError, match=r"bad\.jpg' cannot be used \(corrupt_image\)"):
        unchecked.load(2, 4)
    named = ClassificationSet.from_csv(by_index, SIZE, class_names=["x", "y", "z"])
    assert named.class_names == ["x", "y", "z"]
    with pytest.raises(ValueError, match="has label 2, but class_names has 2 names"):
        ClassificationSet.from_csv(by_index, SIZE, class_names=["x", "y"])

    by_name = write_rows(
        tmp_path / "by_name.tsv",
        ["path", "class"],
        [["img/1.png", "zebra"], ["img/0.png", "ant"], ["img/2.png", "zebra"]],
    )
    with open(by_name, encoding="utf-8") as f:  # csv wrote commas: make it a TSV
        text = f.read().replace(",", "\t")
    with open(by_name, "w", encoding="utf-8") as f:
        f.write(text)
    dataset = ClassificationSet.from_csv(by_name, SIZE, "path", "class", num_examples=2)
    assert dataset.class_names == ["ant", "zebra"]
    np.testing.assert_array_equal(dataset.labels, [1, 0])
    assert dataset.skipped == {}
    ordered = ClassificationSet.from_csv(
        by_name, SIZE, "path", "class", class_names=["zebra", "ant", "bee"]
    )
    np.testing.assert_array_equal(ordered.labels, [0, 1, 0])
    with pytest.raises(ValueError, match="no column 'label'"):
        ClassificationSet.from_csv(by_name, SIZE, "path")


def write_tfds_labelled(data_dir: str, name: str, examples, class_names) -> None:
    """A labelled tfds dataset (image + ClassLabel, split 'test') in array_record,
    written offline like tests/test_data_tfds.py's (no TensorFlow)."""
    tfds = pytest.importorskip("tensorflow_datasets")

    class Labelled(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "test data"}

        def _info(self):
            features = tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "label": tfds.features.ClassLabel(names=class_names),
                }
            )
            # Kept in the order written, so a test knows which example is where.
            return tfds.core.DatasetInfo(
                builder=self, features=features, disable_shuffling=True
            )

        def _split_generators(self, dl_manager):
            return {"test": self._generate_examples()}

        def _generate_examples(self):
            for index, (data, label) in enumerate(examples):
                yield str(index), {"image": data, "label": label}

    builder_class = type(
        "LabelledNamed", (Labelled,), {"name": name}, skip_registration=True
    )
    builder_class(data_dir=data_dir, file_format="array_record").download_and_prepare()


def test_tfds_set(tmp_path):
    source_dir = tmp_path / "png"
    paths = [write_image(source_dir / f"{n}.png", n, 20 + 10 * n, 20) for n in range(4)]
    examples = [
        (Path(path).read_bytes(), label) for path, label in zip(paths, [2, 0, 1, 2])
    ]
    corrupt = Path(write_corrupt(tmp_path / "bad.jpg")).read_bytes()
    examples.insert(2, (corrupt, 1))  # index 2 of the split is unusable
    data_dir = str(tmp_path / "tfds")
    write_tfds_labelled(data_dir, "tiny_labelled", examples, ["cat", "dog", "owl"])

    dataset = ClassificationSet.from_tfds(
        "tiny_labelled", "test", data_dir, image_size=SIZE
    )
    assert dataset.class_names == ["cat", "dog", "owl"]
    np.testing.assert_array_equal(dataset.labels, [2, 0, 1, 2])
    assert dataset.skipped == {"corrupt_image": 1}
    assert dataset.images.keys == [f"tiny_labelled/test/{i}" for i in (0, 1, 3, 4)]
    # 20x20 and 40x20 land on whole pixels; 30x20 and 50x20 do not.
    assert_close_to_reference(dataset.load(0, 4), paths, exact=("0.png", "2.png"))
    np.testing.assert_array_equal(dataset.load(1, 3), dataset.load(0, 4)[1:3])

    first = ClassificationSet.from_tfds(
        "tiny_labelled",
        "test",
        data_dir,
        image_size=SIZE,
        class_names=["a", "b", "c"],
        num_examples=2,
    )
    assert first.class_names == ["a", "b", "c"] and len(first) == 2
    with pytest.raises(ValueError, match=r"no split 'train'; it has \['test'\]"):
        ClassificationSet.from_tfds("tiny_labelled", "train", data_dir, image_size=SIZE)
    with pytest.raises(ValueError, match="no feature 'fine_label'"):
        ClassificationSet.from_tfds(
            "tiny_labelled", "test", data_dir, label_key="fine_label", image_size=SIZE
        )
    with pytest.raises(FileNotFoundError, match="'absent' not found"):
        ClassificationSet.from_tfds("absent", "test", data_dir, image_size=SIZE)


def test_retrieval_csv_groups_captions(tmp_path):
    for number in range(3):
        write_image(tmp_path / "img" / f"{number}.png", number, 32, 16)
    write_corrupt(tmp_path / "img" / "bad.jpg")
    path = write_rows(
        tmp_path / "pairs.csv",
        ["filepath", "title"],
        [
            ["img/1.png", "one, first"],
            ["img/0.png", "zero, first"],
            ["./img/1.png", "one, second"],  # the same file, written differently
            ["img/bad.jpg", "a caption of a broken image"],
            ["img/2.png", "   "],  # its only caption is empty
            ["img/0.png", "zero, second"],
            ["img/1.png", "one, third"],
        ],
    )
    dataset = RetrievalSet.from_csv(path, SIZE)
    assert dataset.images.keys == [
        str(tmp_path / "img" / f) for f in ("1.png", "0.png")
    ]
    assert dataset.captions == [
        "one, first",
        "one, second",
        "one, third",
        "zero, first",
        "zero, second",
    ]
    np.testing.assert_array_equal(dataset.text_to_image, [0, 0, 0, 1, 1])
    assert dataset.skipped == {"corrupt_image": 1, "missing_caption": 1}
    assert dataset.skipped_captions == {"empty_caption": 1, "image_skipped": 1}
    assert_close_to_reference(
        dataset.load(0, 2), dataset.images.keys, exact=("1.png", "0.png")
    )

    first = RetrievalSet.from_csv(path, SIZE, num_examples=1)
    assert first.captions == ["one, first", "one, second", "one, third"]
    missing = write_rows(
        tmp_path / "missing.csv",
        ["image", "text"],
        [["img/0.png", "zero"], ["img/gone.png", "gone"], ["", "no path"]],
    )
    with pytest.raises(
        FileNotFoundError, match=r"2 of 3 image files do not exist.*gone"
    ):
        RetrievalSet.from_csv(missing, SIZE, "image", "text")


def test_retrieval_karpathy_json(tmp_path):
    coco_root = tmp_path / "coco"
    for number, folder in ((0, "val2014"), (1, "val2014"), (2, "train2014")):
        write_image(coco_root / folder / f"COCO_{number}.jpg", number, 48, 32, "JPEG")
    entries = [
        {"filepath": "val2014", "filename": "COCO_0.jpg", "split": "test"},
        {"filepath": "train2014", "filename": "COCO_2.jpg", "split": "restval"},
        {"filepath": "val2014", "filename": "COCO_1.jpg", "split": "test"},
    ]
    for number, entry in enumerate(entries):
        entry["sentences"] = [
            {"raw": f"image {number}, sentence {k}.", "tokens": ["image"]}
            for k in range(2 + number)
        ]
    coco = tmp_path / "dataset_coco.json"
    coco.write_text(json.dumps({"images": entries, "dataset": "coco"}))

    dataset = RetrievalSet.from_karpathy_json(
        str(coco), str(coco_root), image_size=SIZE
    )
    assert dataset.images.keys == [
        str(coco_root / "val2014" / "COCO_0.jpg"),
        str(coco_root / "val2014" / "COCO_1.jpg"),
    ]
    assert dataset.captions == [
        "image 0, sentence 0.",
        "image 0, sentence 1.",
        "image 2, sentence 0.",
        "image 2, sentence 1.",
        "image 2, sentence 2.",
        "image 2, sentence 3.",
    ]
    np.testing.assert_array_equal(dataset.text_to_image, [0, 0, 1, 1, 1, 1])
    assert dataset.skipped == {} and dataset.skipped_captions == {}
    assert_close_to_reference(dataset.load(0, 2), dataset.images.keys)
    restval = RetrievalSet.from_karpathy_json(
        str(coco), str(coco_root), "restval", image_size=SIZE
    )
    assert len(restval) == 1 and len(restval.captions) == 3
    with pytest.raises(ValueError, match=r"no images in split 'val'.*'restval': 1"):
        RetrievalSet.from_karpathy_json(
            str(coco), str(coco_root), "val", image_size=SIZE
        )
    with pytest.raises(FileNotFoundError, match="2 of 2 image files do not exist"):
        RetrievalSet.from_karpathy_json(str(coco), str(tmp_path), image_size=SIZE)

    # Flickr30k's file has no 'filepath': images sit directly under the root.
    flickr_root = tmp_path / "flickr30k-images"
    write_image(flickr_root / "1000092795.jpg", 7, 40, 30, "JPEG")
    flickr = tmp_path / "dataset_flickr30k.json"
    flickr.write_text(
        json.dumps(
            {
                "images": [
                    {
                        "filename": "1000092795.jpg",
                        "split": "test",
                        "sentences": [{"raw": "Two young guys."}, {"raw": "Two men."}],
                    }
                ]
            }
        )
    )
    dataset = RetrievalSet.from_karpathy_json(
        str(flickr), str(flickr_root), image_size=SIZE
    )
    assert dataset.captions == ["Two young guys.", "Two men."]
    assert dataset.images.keys == [str(flickr_root / "1000092795.jpg")]
    with pytest.raises(ValueError, match="images\\[0\\] lacks 'sentences'"):
        flickr.write_text(json.dumps({"images": [{"filename": "x", "split": "test"}]}))
        RetrievalSet.from_karpathy_json(str(flickr), str(flickr_root), image_size=SIZE)
