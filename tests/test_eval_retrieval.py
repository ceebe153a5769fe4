"""Sharded retrieval metrics against a float64 NumPy reference over the whole matrix."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxclip import ring, sharding
from jaxclip.evaluate import retrieval

DIM = 16


def _reference(image, text, text_to_image, ks, normalize=True) -> dict[str, float]:
    """Float64 metrics from the full score matrix and a stable descending argsort."""
    image, text = np.asarray(image, np.float64), np.asarray(text, np.float64)
    if normalize:
        image = image / np.linalg.norm(image, axis=1, keepdims=True)
        text = text / np.linalg.norm(text, axis=1, keepdims=True)
    scores = image @ text.T  # [images, texts]
    image_ids = np.arange(len(image))

    def ranks(scores, query_group, key_group):
        order = np.argsort(-scores, axis=1, kind="stable")  # ties: lower index first
        hits = key_group[order] == query_group[:, None]
        return hits.argmax(axis=1) + 1  # the first correct position, 1-based

    metrics = {}
    for direction, rank in (
        ("image_to_text", ranks(scores, image_ids, text_to_image)),
        ("text_to_image", ranks(scores.T, text_to_image, image_ids)),
    ):
        for k in ks:
            metrics[f"{direction}/R@{k}"] = float(np.mean(rank <= k))
        metrics[f"{direction}/mean_rank"] = float(np.mean(rank))
        metrics[f"{direction}/median_rank"] = float(np.median(rank))
    return metrics


def _tied_case(num_images: int, seed: int):
    """Embeddings with many exact ties, whose float32 scores are exact.

    Rows are ±1 vectors of length 16 times a power of two: every norm is a power of
    two, so normalising is exact in float32, and the dot products of the unit rows
    are multiples of 1/16. Images repeat (identical rows) and captions are their image
    with a few signs flipped, so correct and wrong candidates often tie exactly.
    Captions per image vary from 1 to 5.
    """
    rng = np.random.default_rng(seed)
    prototypes = rng.choice([-1.0, 1.0], size=(num_images // 3 + 1, DIM))
    image = prototypes[rng.integers(0, len(prototypes), num_images)]
    counts = rng.integers(1, 6, num_images)
    text_to_image = rng.permutation(np.repeat(np.arange(num_images), counts))
    text = image[text_to_image].copy()
    flips = rng.random(text.shape) < 0.15
    text[flips] *= -1
    image = image * 2.0 ** rng.integers(-3, 4, (num_images, 1))
    text = text * 2.0 ** rng.integers(-3, 4, (len(text), 1))
    return image.astype(np.float32), text.astype(np.float32), text_to_image


def _all_ks(num_texts: int) -> tuple[int, ...]:
    """Every k: R@k for all k pins down the whole distribution of ranks."""
    return tuple(range(1, num_texts + 1))


# name: (mesh shape, devices, block size). 37 images and about 110 captions leave
# padding on 8 shards, and the block sizes leave padded chunks (7 and 3) or give one
# chunk (1024).
MESHES = {
    "1-device": ((1, 1, 1), 1, 7),
    "8x1x1": ((8, 1, 1), 8, 3),
    "4x2x1": ((4, 2, 1), 8, 1024),
    "2x2x2": ((2, 2, 2), 8, 4),  # a tensor axis of 2: rows replicated over it
}


def _mesh(name: str):
    shape, devices, _ = MESHES[name]
    return sharding.make_mesh(shape, jax.devices()[:devices])


@pytest.mark.parametrize(
    "mesh_name, ring_mode",
    [(name, "auto") for name in MESHES] + [("8x1x1", "loop"), ("2x2x2", "loop")],
)
def test_exact_ties_equal_float64_reference_on_every_mesh(mesh_name, ring_mode):
    """37 images (not a multiple of 8), 1-5 captions each, many exact ties.

    The scores are exact, so every mesh must give the reference's numbers exactly,
    and therefore the same numbers as each other. 'loop' runs the ring as the
    `fori_loop` that TPUs and GPUs run (the CPU unrolls it on several devices).
    """
    image, text, text_to_image = _tied_case(37, seed=0)
    ks = _all_ks(len(text))
    with ring.forced(ring_mode):
        got = retrieval.retrieval_metrics(
            image,
            text,
            text_to_image,
            mesh=_mesh(mesh_name),
            ks=ks,
            block_size=MESHES[mesh_name][2],
        )
    assert got == _reference(image, text, text_to_image, ks)


def test_random_embeddings_equal_float64_reference():
    """Gaussian embeddings (no ties), more captions than images, several chunks."""
    rng = np.random.default_rng(1)
    num_images = 50
    text_to_image = np.concatenate([np.arange(num_images), rng.integers(0, 50, 71)])
    image = rng.normal(size=(num_images, DIM))
    text = 0.8 * image[text_to_image] + rng.normal(size=(len(text_to_image), DIM))
    ks = _all_ks(len(text))
    got = retrieval.retrieval_metrics(
        image, text, text_to_image, mesh=_mesh("4x2x1"), ks=ks, block_size=5
    )
    assert got == _reference(image, text, text_to_image, ks)


def test_mesh_in_context_and_sharded_inputs():
    """mesh=None takes the mesh of jax.set_mesh; inputs may be sharded jax arrays."""
    image, text, text_to_image = _tied_case(40, seed=2)
    text, text_to_image = text[:96], text_to_image[:96]  # a multiple of 8 rows
    text_to_image = np.concatenate([text_to_image, np.arange(40)])  # every image
    text = np.concatenate([text, image])
    mesh = _mesh("2x2x2")
    rows = NamedSharding(mesh, P(sharding.BATCH_AXES, None))
    ks = (1, 5, 10)
    with jax.set_mesh(mesh):
        got = retrieval.retrieval_metrics(
            jax.device_put(image, rows),
            jax.device_put(text, rows),
            text_to_image,
            ks=ks,
        )
    assert got == _reference(image, text, text_to_image, ks)


def test_identical_pairs_rank_first():
    """One-hot images, each caption its image's one-hot: every rank is 1."""
    num_images = 10
    image = np.eye(DIM, dtype=np.float32)[:num_images]
    text_to_image = np.array([0, 1, 1, 2, 3, 3, 3, 4, 5, 6, 7, 8, 9, 9])
    got = retrieval.retrieval_metrics(
        image, 3.0 * image[text_to_image], text_to_image, mesh=_mesh("8x1x1")
    )
    for direction in ("image_to_text", "text_to_image"):
        for k in (1, 5, 10):
            assert got[f"{direction}/R@{k}"] == 1.0
        assert got[f"{direction}/mean_rank"] == 1.0
        assert got[f"{direction}/median_rank"] == 1.0


def test_hand_computed_ranks():
    """Three images and five captions on a 2-D grid; ranks worked out by hand.

    Unit vectors (scaled, to check the normalising) with scores S[image, caption]:
        I0=(1,0)   T0=(1,0)->I1   T1=(0,1)->I0   T2=(0,-1)->I1   T3=(1,0)->I0
        I1=(0,1)   T4=(-1,0)->I2
        I2=(-1,0)
            T0  T1  T2  T3  T4
        I0   1   0   0   1  -1
        I1   0   1  -1   0   0
        I2  -1   0   0  -1   1
    image→text (best correct caption; a tie with a lower index is ahead):
        I0: best T3 (1), T0 ties at a lower index -> 2
        I1: best T0 (0), T1 (1) ahead; T3, T4 tie at higher indices -> 2
        I2: T4 (1) -> 1
    text→image: T0 -> 2 (I0 ahead), T1 -> 2 (I1 ahead; I2 ties later),
        T2 -> 3 (I0 and I2 ahead), T3 -> 1, T4 -> 1.
    Three ranks are in play on 8 devices: most shards hold only padding.
    """
    image = np.array([[1, 0], [0, 1], [-1, 0]], np.float32) * 2.0
    text = np.array([[1, 0], [0, 1], [0, -1], [1, 0], [-1, 0]], np.float32) * 0.25
    text_to_image = np.array([1, 0, 1, 0, 2])
    got = retrieval.retrieval_metrics(
        image, text, text_to_image, mesh=_mesh("8x1x1"), ks=(1, 2, 5)
    )
    assert got == {
        "image_to_text/R@1": 1 / 3,
        "image_to_text/R@2": 1.0,
        "image_to_text/R@5": 1.0,
        "image_to_text/mean_rank": 5 / 3,
        "image_to_text/median_rank": 2.0,
        "text_to_image/R@1": 2 / 5,
        "text_to_image/R@2": 4 / 5,
        "text_to_image/R@5": 1.0,
        "text_to_image/mean_rank": 9 / 5,
        "text_to_image/median_rank": 2.0,
    }
    assert got == _reference(image, text, text_to_image, (1, 2, 5))


def test_without_normalizing_ranks_by_dot_product():
    """normalize=False: a long caption outranks a well-aligned short one."""
    image = np.array([[1, 0], [0, 1]], np.float32)
    text = np.array([[1, 0], [4, 4]], np.float32)  # T1 belongs to I1
    text_to_image = np.array([0, 1])
    ks = (1,)
    # No mesh given or in context: one device.
    got = retrieval.retrieval_metrics(
        image, text, text_to_image, ks=ks, normalize=False
    )
    assert got == _reference(image, text, text_to_image, ks, normalize=False)
    assert got["image_to_text/R@1"] == 0.5  # I0 sees T1 (4) ahead of T0 (1)


def test_scores_memory_is_a_block_per_device():
    """The compiled kernel's temporaries stay far below the whole score matrix."""
    num_images, num_texts, block = 512, 2048, 32
    rng = np.random.default_rng(3)
    mesh = _mesh("8x1x1")
    rows = NamedSharding(mesh, P(sharding.BATCH_AXES, None))
    image = jax.device_put(rng.normal(size=(num_images, DIM)).astype(np.float32), rows)
    text = jax.device_put(rng.normal(size=(num_texts, DIM)).astype(np.float32), rows)
    groups = np.arange(num_texts, dtype=np.int32) % num_images
    chunks = num_texts // 8 // block
    compiled = retrieval._ranks.lower(
        image,
        text,
        np.arange(num_images, dtype=np.int32),
        groups,
        mesh=mesh,
        ring=ring.Ring.of(mesh),
        num_chunks=chunks,
    ).compile()
    temp_bytes = compiled.memory_analysis().temp_size_in_bytes
    # Per device: [64 queries, 32 keys] scores and masks, and a [256, 16] key block;
    # the device's strip of the whole matrix would be [64, 2048].
    local_scores = num_images // 8 * block * 4
    key_block = num_texts // 8 * DIM * 4
    strip = num_images // 8 * num_texts * 4
    assert temp_bytes < 12 * local_scores + 2 * key_block, temp_bytes
    assert temp_bytes < strip / 4, temp_bytes


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: {**a, "text_emb": a["text_emb"][:, :8]}, "same dim"),
        (lambda a: {**a, "image_emb": a["image_emb"][0]}, "2-D"),
        (lambda a: {**a, "image_emb": a["image_emb"][:0]}, "at least one image"),
        (lambda a: {**a, "text_to_image": a["text_to_image"][:-1]}, "shape"),
        (lambda a: {**a, "text_to_image": a["text_to_image"] + 0.0}, "integers"),
        (lambda a: {**a, "text_to_image": a["text_to_image"] - 1}, r"\[0, 4\)"),
        (lambda a: {**a, "text_to_image": a["text_to_image"] + 1}, r"\[0, 4\)"),
        (
            lambda a: {**a, "text_to_image": a["text_to_image"] % 3},
            r"no caption.*\[3\]",
        ),
        (lambda a: {**a, "image_emb": a["image_emb"] * 0}, "row 0 is all zeros"),
        (lambda a: {**a, "text_emb": a["text_emb"] * np.nan}, "text_emb holds NaN"),
        (lambda a: {**a, "ks": (1, 0)}, "ks"),
        (lambda a: {**a, "block_size": 0}, "block_size"),
    ],
)
def test_bad_input_is_refused(change, message):
    image, text, text_to_image = _tied_case(4, seed=4)
    text_to_image = np.arange(len(text)) % 4  # every image has a caption
    args = {"image_emb": image, "text_emb": text, "text_to_image": text_to_image}
    args = change(args)
    with pytest.raises(ValueError, match=message):
        retrieval.retrieval_metrics(**args, mesh=_mesh("1-device"))
