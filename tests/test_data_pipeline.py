"""The grain pipeline: pairing, shuffling, per-process shares, exact resumption, bad
samples counted by reason, mixing, and the state checks."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from data_util import (
    BAD_SHARD_SKIPS,
    caption_of,
    colour_of,
    mean_colour,
    write_bad_shards,
    write_csv,
    write_shards,
)
from PIL import Image

import jaxclip
from jaxclip.data import shapes
from jaxclip.data.pipeline import DataIterator, build_dataset, checkpoint_state
from jaxclip.data.sources import CsvSource, ShapesSource, TarShardSource
from jaxclip.data.tokenizer import TokenizerSpec
from jaxclip.data.transforms import DEFAULT_MAX_IMAGE_PIXELS, ImageTextTransform

IMAGE_SIZE, CONTEXT = 16, 8


def make_iterator(
    sources,
    *,
    batch_size=4,
    seed=0,
    shuffle=True,
    threads=2,
    workers=0,
    weights=None,
    process_index=0,
    process_count=1,
    max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS,
    gather=None,
    max_bad_in_a_row=100_000,
) -> DataIterator:
    dataset = build_dataset(
        sources,
        weights,
        seed=seed,
        batch_size=batch_size,
        transform=ImageTextTransform(IMAGE_SIZE, max_image_pixels=max_image_pixels),
        tokenizer=TokenizerSpec(),
        context_length=CONTEXT,
        process_index=process_index,
        process_count=process_count,
        shuffle=shuffle,
        threads=threads,
        workers=workers,
        max_bad_in_a_row=max_bad_in_a_row,
    )
    fingerprint = {"lengths": [len(source) for source in sources], "seed": seed}
    extra = {} if gather is None else {"gather": gather}
    return DataIterator(
        dataset,
        "webdataset",
        fingerprint,
        process_index,
        process_count,
        with_keys=True,
        **extra,
    )


def take(iterator: DataIterator, batches: int) -> list[dict]:
    return [next(iterator) for _ in range(batches)]


def keys_of(batches: list[dict]) -> list[str]:
    return [str(key) for batch in batches for key in batch["keys"]]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("shards")
    write_shards(directory, 3, 5)  # samples 0..14
    return directory


def test_batches_pair_each_image_with_its_caption(shard_dir):
    iterator = make_iterator([TarShardSource(str(shard_dir))], batch_size=5)
    try:
        for batch in take(iterator, 6):  # two epochs
            assert batch["images"].dtype == np.uint8
            assert batch["images"].shape == (5, IMAGE_SIZE, IMAGE_SIZE, 3)
            assert batch["tokens"].dtype == np.int32
            for key, image, tokens in zip(
                batch["keys"], batch["images"], batch["tokens"]
            ):
                number = int(key)
                np.testing.assert_allclose(
                    mean_colour(image), colour_of(number), atol=5
                )
                expected = jaxclip.tokenize(caption_of(number), CONTEXT)[0]
                np.testing.assert_array_equal(tokens, expected)
    finally:
        iterator.close()


def test_each_epoch_is_a_new_permutation_fixed_by_the_seed(shard_dir):
    def first_epochs(seed: int) -> list[str]:
        iterator = make_iterator(
            [TarShardSource(str(shard_dir))], batch_size=5, seed=seed
        )
        try:
            return keys_of(take(iterator, 6))
        finally:
            iterator.close()

    keys = first_epochs(0)
    everything = {f"{n:06d}" for n in range(15)}
    assert set(keys[:15]) == set(keys[15:]) == everything
    assert keys[:15] != keys[15:]  # reshuffled
    assert keys[:15] != sorted(keys[:15])
    assert first_epochs(0) == keys
    assert first_epochs(1) != keys


@pytest.mark.parametrize(
    "workers",
    # grain's 2 worker processes, started twice: each imports the pipeline afresh.
    [0, pytest.param(2, marks=[pytest.mark.slow, pytest.mark.multiprocess])],
)
def test_resumed_iterator_yields_what_an_uninterrupted_one_would(shard_dir, workers):
    def fresh() -> DataIterator:
        return make_iterator(
            [TarShardSource(str(shard_dir))], batch_size=4, workers=workers
        )

    first = fresh()
    try:
        take(first, 3)
        # What the checkpoint stores: JSON, written by orbax.
        state = json.loads(json.dumps(first.get_state()))
        expected = take(first, 4)  # the uninterrupted run goes on; crosses an epoch
    finally:
        first.close()
    resumed = fresh()  # a new run, as after a kill: fresh sources and workers
    try:
        resumed.set_state(state)
        rest = take(resumed, 4)
    finally:
        resumed.close()
    assert keys_of(rest) == keys_of(expected)
    for got, want in zip(rest, expected):
        np.testing.assert_array_equal(got["images"], want["images"])
        np.testing.assert_array_equal(got["tokens"], want["tokens"])


@pytest.mark.parametrize("num_shards", [5, 2])
def test_processes_read_disjoint_shares_that_cover_the_data(tmp_path, num_shards):
    # 5 shards over 3 processes: split by shard. 2 shards: split by sample.
    write_shards(tmp_path, num_shards, 3)
    total = 3 * num_shards
    shares = []
    for process in range(3):
        source = TarShardSource(str(tmp_path), process, 3)
        share = len(source) if source.split_by_shard else len(range(process, total, 3))
        iterator = make_iterator(
            [source], batch_size=1, process_index=process, process_count=3
        )
        try:
            keys = keys_of(take(iterator, share))  # one epoch of this share
        finally:
            iterator.close()
        assert len(set(keys)) == share
        shares.append(set(keys))
    assert sum(len(share) for share in shares) == total
    assert set.union(*shares) == {f"{n:06d}" for n in range(total)}


def test_bad_samples_are_skipped_and_counted_by_reason(tmp_path):
    paths, good = write_bad_shards(tmp_path)
    iterator = make_iterator(
        [TarShardSource(paths)],
        batch_size=4,
        shuffle=False,
        max_image_pixels=1_000_000,
    )
    try:
        first_pass = take(iterator, 2)  # the 8 good samples: exactly one pass
        assert sorted(int(key) for key in keys_of(first_pass)) == good
        for batch in first_pass:
            for key, image in zip(batch["keys"], batch["images"]):
                np.testing.assert_allclose(
                    mean_colour(image), colour_of(int(key)), atol=5
                )
        assert iterator.skipped() == BAD_SHARD_SKIPS
        metrics = iterator.metrics()
        assert metrics["data/skipped"] == sum(BAD_SHARD_SKIPS.values())
        for reason, count in BAD_SHARD_SKIPS.items():
            assert metrics[f"data/skipped/{reason}"] == count
        take(iterator, 2)  # training goes on; the second pass counts again
        assert iterator.skipped() == {k: 2 * v for k, v in BAD_SHARD_SKIPS.items()}
    finally:
        iterator.close()


def test_data_with_no_usable_sample_is_an_error(tmp_path):
    paths, _ = write_bad_shards(tmp_path)
    iterator = make_iterator(
        [TarShardSource(paths[1])], max_image_pixels=10, max_bad_in_a_row=500
    )
    try:  # every image is now over the pixel limit
        with pytest.raises(
            RuntimeError, match="no usable sample in the last 500.*bomb"
        ):
            next(iterator)
    finally:
        iterator.close()


def test_missing_shard_is_an_error_at_start_naming_it(tmp_path):
    write_shards(tmp_path, 2, 1)
    with pytest.raises(FileNotFoundError, match=r"00002\.tar"):
        TarShardSource(str(tmp_path / "{00000..00002}.tar"))


def test_mixing_follows_the_weights(shard_dir, tmp_path):
    csv_path = write_csv(tmp_path, 6)
    iterator = make_iterator(
        [TarShardSource(str(shard_dir)), CsvSource(csv_path)],
        weights=[3.0, 1.0],
        batch_size=8,
    )
    try:
        keys = keys_of(take(iterator, 10))
    finally:
        iterator.close()
    from_csv = sum(key.startswith("pairs.csv:") for key in keys)
    assert abs(from_csv - len(keys) / 4) <= 2
    assert {key for key in keys if key.startswith("pairs.csv:")} == {
        f"pairs.csv:{n}" for n in range(6)
    }


def test_state_from_another_pipeline_is_refused(shard_dir):
    iterator = make_iterator([TarShardSource(str(shard_dir))])
    other_seed = make_iterator([TarShardSource(str(shard_dir))], seed=5)
    try:
        take(iterator, 1)
        state = checkpoint_state(iterator.get_state())
        with pytest.raises(ValueError, match="seed: saved 0, now 5"):
            other_seed.set_state(state)
        with pytest.raises(ValueError, match="data.source='csv'"):
            iterator.set_state({**state, "source": "csv"})
        with pytest.raises(ValueError, match="saved by 2 processes; this run has 1"):
            iterator.set_state({**state, "processes": state["processes"] * 2})
        local = iterator.get_state()  # one process's own state restores it too
        with pytest.raises(ValueError, match="process 1's; this is process 0"):
            iterator.set_state({**local, "process_index": 1})
    finally:
        iterator.close()
        other_seed.close()


def test_every_process_restores_its_own_position(tmp_path):
    """Two processes, simulated with threads and a gather that waits for both."""
    write_shards(tmp_path, 4, 3)
    slots: list = [None, None]
    barrier = threading.Barrier(2)

    def gather(payload, process):
        slots[process] = payload
        barrier.wait()
        result = list(slots)
        barrier.wait()
        return result

    def run(process: int, out: dict) -> None:
        def fresh():
            return make_iterator(
                [TarShardSource(str(tmp_path), process, 2)],
                process_index=process,
                process_count=2,
                batch_size=2,
            )

        straight = fresh()
        out["expected"] = keys_of(take(straight, 5))
        straight.close()
        first = fresh()
        take(first, 2 + process)  # the processes stop at different positions...
        # ...and both positions are saved.
        out["state"] = checkpoint_state(
            first.get_state(), gather=lambda payload: gather(payload, process)
        )
        first.close()

    outputs = [{}, {}]
    threads = [threading.Thread(target=run, args=(p, outputs[p])) for p in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outputs[0]["state"] == outputs[1]["state"]
    for process in (0, 1):
        resumed = make_iterator(
            [TarShardSource(str(tmp_path), process, 2)],
            process_index=process,
            process_count=2,
            batch_size=2,
        )
        resumed.set_state(outputs[process]["state"])
        got = keys_of(take(resumed, 3 - process))
        resumed.close()
        assert got == outputs[process]["expected"][2 * (2 + process) :]


def test_crops_differ_between_epochs_and_repeat_between_runs(tmp_path):
    # Gradient images: any change of crop box changes the pixels.
    (tmp_path / "images").mkdir()
    rows = ["filepath,title"]
    for number in range(3):
        x = np.linspace(0, 255, 90)[None, :, None] * np.ones((60, 1, 3))
        image = (x + 20 * number).clip(0, 255).astype(np.uint8)
        Image.fromarray(image).save(tmp_path / "images" / f"{number}.png")
        rows.append(f"images/{number}.png,{caption_of(number)}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")

    def two_epochs() -> dict[str, list[np.ndarray]]:
        iterator = make_iterator([CsvSource(str(tmp_path / "pairs.csv"))], batch_size=3)
        try:
            by_key: dict[str, list[np.ndarray]] = {}
            for batch in take(iterator, 2):
                for key, image in zip(batch["keys"], batch["images"]):
                    by_key.setdefault(str(key), []).append(image)
            return by_key
        finally:
            iterator.close()

    first, again = two_epochs(), two_epochs()
    assert sorted(first) == [f"pairs.csv:{n}" for n in range(3)]
    for key, (epoch_1, epoch_2) in first.items():
        assert not np.array_equal(epoch_1, epoch_2), key  # a new random square
        np.testing.assert_array_equal(epoch_1, again[key][0])
        np.testing.assert_array_equal(epoch_2, again[key][1])


def shapes_pipeline(process_index: int, process_count: int, batch_size: int = 8):
    """data.source='shapes' as make_train_iterator builds it, for one process."""
    local = batch_size // process_count
    sources = [ShapesSource(3, IMAGE_SIZE, batch_size)]

    def dataset(start_batch=0):
        return build_dataset(
            sources,
            None,
            seed=3,
            batch_size=local,
            transform=ImageTextTransform(IMAGE_SIZE),
            tokenizer=TokenizerSpec(),
            context_length=CONTEXT,
            process_index=process_index,
            process_count=process_count,
            threads=2,
            prefetch=1,
            start=start_batch * local,
        )

    return DataIterator(
        dataset(),
        "shapes",
        {"seed": 3},
        process_index,
        process_count,
        restart=dataset,
    )


def test_shapes_batches_are_the_same_on_any_number_of_processes():
    """Global batch k is shapes.draw_batch(seed, k, B), whatever the process count;
    each process holds its rows, and the state is the batch count alone."""
    want = [shapes.draw_batch(3, k, 8, IMAGE_SIZE) for k in range(3)]
    for count in (1, 2, 4):
        iterators = [shapes_pipeline(p, count) for p in range(count)]
        for k in range(3):
            rows = [next(iterator) for iterator in iterators]
            images = np.concatenate([row["images"] for row in rows])
            np.testing.assert_array_equal(images, want[k]["images"])
            tokens = np.concatenate([row["tokens"] for row in rows])
            expected = TokenizerSpec()(want[k]["captions"], CONTEXT)
            np.testing.assert_array_equal(tokens, expected)
        states = [checkpoint_state(iterator.get_state()) for iterator in iterators]
        assert states == [{"source": "shapes", "global": states[0]["global"]}] * count
        assert states[0]["global"]["batches"] == 3
        for iterator in iterators:
            iterator.close()


def test_shapes_resume_exactly_on_another_process_count():
    single = shapes_pipeline(0, 1)
    take(single, 2)
    state = checkpoint_state(single.get_state())
    expected = next(single)["images"]
    single.close()
    halves = [shapes_pipeline(p, 2) for p in (0, 1)]
    for half in halves:
        half.set_state(json.loads(json.dumps(state)))
        assert half.batches == 2
    images = np.concatenate([next(half)["images"] for half in halves])
    np.testing.assert_array_equal(images, expected)
    per_process = {"source": "shapes", "processes": [state["global"]]}
    with pytest.raises(ValueError, match="per-process order; this pipeline reads in"):
        halves[0].set_state(per_process)
    with pytest.raises(ValueError, match="seed: saved 4, now 3"):
        changed = {**state["global"], "fingerprint": {"seed": 4}}
        halves[0].set_state({"source": "shapes", "global": changed})
    for half in halves:
        half.close()
