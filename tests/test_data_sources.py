"""Sources of raw records: tar shards, CSV/TSV, shapes; path expansion and errors."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from data_util import (
    caption_of,
    colour_of,
    mean_colour,
    number_from_caption,
    write_csv,
    write_shards,
    write_tar,
)
from PIL import Image

from jaxclip.data import shapes
from jaxclip.data.sources import (
    CsvSource,
    ShapesSource,
    TarShardSource,
    expand_braces,
    expand_paths,
)
from jaxclip.data.tar_index import BAD_REASONS, index_tar, split_key


def test_expand_braces():
    assert expand_braces("s/{00..03}.tar") == [f"s/0{i}.tar" for i in range(4)]
    assert expand_braces("{8..10}") == ["8", "9", "10"]
    assert expand_braces("{a,b}/{0..1}.tar") == [
        "a/0.tar",
        "a/1.tar",
        "b/0.tar",
        "b/1.tar",
    ]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_expand_paths_forms_and_missing_files(tmp_path):
    paths = write_shards(tmp_path, 3, 1)
    assert expand_paths(str(tmp_path / "{00000..00002}.tar")) == paths
    assert expand_paths(str(tmp_path)) == paths  # a directory: its *.tar
    assert expand_paths(str(tmp_path / "*.tar")) == paths
    assert expand_paths(paths[::-1]) == paths[::-1]  # a list keeps its order
    with pytest.raises(FileNotFoundError, match="00003.tar") as error:
        expand_paths(str(tmp_path / "{00000..00003}.tar"))
    assert "1 of 4" in str(error.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no \\*.tar files"):
        expand_paths(str(empty))


def test_split_key_follows_webdataset():
    assert split_key("dir/000123.jpg") == ("dir/000123", "jpg")
    assert split_key("000123.seg.PNG") == ("000123", "seg.png")
    assert split_key("a.b/000123.txt") == ("a.b/000123", "txt")
    assert split_key("README") is None


def test_tar_index_matches_tarfile_extraction(tmp_path):
    (path,) = write_shards(tmp_path, 1, 6)
    index = index_tar(path)
    with tarfile.open(path) as tar:
        contents = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    with open(path, "rb") as f:
        data = f.read()
    assert len(index) == 6
    for row, key in enumerate(index.keys.astype(str)):
        image = data[index.image_offset[row] :][: index.image_size[row]]
        caption = data[index.caption_offset[row] :][: index.caption_size[row]]
        image_name = next(n for n in contents if n.startswith(key) and "txt" not in n)
        assert image == contents[image_name] and image_name != f"{key}.json"
        assert caption == contents[f"{key}.txt"]


def test_tar_source_yields_the_right_pairs(tmp_path):
    write_shards(tmp_path, 3, 5)  # jpg, png, jpeg and webp members
    source = TarShardSource(str(tmp_path / "{00000..00002}.tar"))
    assert len(source) == 15 and source.num_shards == 3
    for index in range(15):
        record = source[index]
        assert record["error"] is None
        number = number_from_caption(record["caption"].decode())
        assert number == index and record["key"] == f"{index:06d}"
        assert record["caption"].decode() == caption_of(index)
        pixels = np.asarray(Image.open(io.BytesIO(record["image"])).convert("RGB"))
        np.testing.assert_allclose(mean_colour(pixels), colour_of(index), atol=4)


def test_csv_and_tsv_sources_yield_the_right_pairs(tmp_path):
    for separator in (",", "\t"):
        directory = tmp_path / repr(separator)
        path = write_csv(directory, 7, separator)
        source = CsvSource(path)  # separator from the extension
        assert len(source) == 7
        for index in range(7):
            record = source[index]
            assert record["caption"] == caption_of(index)
            pixels = np.asarray(Image.open(io.BytesIO(record["image"])))
            np.testing.assert_array_equal(mean_colour(pixels), colour_of(index))
        # The relative image paths resolve against the file, not the working dir.
        assert not os.path.exists(f"images/{0:04d}.png")


def test_csv_errors_name_the_file_and_column(tmp_path):
    path = write_csv(tmp_path, 2)
    with pytest.raises(ValueError, match="no column 'url'.*'filepath', 'title'"):
        CsvSource(path, image_column="url")
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        CsvSource(str(tmp_path / "missing.csv"))


def test_shapes_source_draws_the_shapes_data():
    for block_size in (1, 4):
        source = ShapesSource(seed=3, image_size=32, block_size=block_size)
        for index in (0, 5, 6):
            block, row = divmod(index, block_size)
            drawn = shapes.draw_batch(3, block, block_size, 32)
            record = source[index]
            np.testing.assert_array_equal(record["image"], drawn["images"][row])
            assert record["caption"] == drawn["captions"][row]


def test_tar_source_splits_shards_between_processes(tmp_path):
    write_shards(tmp_path, 5, 2)
    keys = []
    for process in range(3):
        source = TarShardSource(str(tmp_path), process, 3)
        assert source.split_by_shard
        keys.append({source[i]["key"] for i in range(len(source))})
    assert [len(k) for k in keys] == [4, 4, 2]  # shards 0,3 / 1,4 / 2
    assert set.union(*keys) == {f"{n:06d}" for n in range(10)}
    # Fewer shards than processes: every process indexes all, the pipeline splits.
    assert not TarShardSource(str(tmp_path / "00000.tar"), 1, 3).split_by_shard


def test_broken_tar_keeps_the_samples_before_the_break(tmp_path):
    (path,) = write_shards(tmp_path, 1, 4)
    with open(path, "rb") as f:
        data = f.read()
    index = index_tar(path)
    # Cut inside the third sample's image.
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: int(index.image_offset[2]) + 10])
    broken = index_tar(str(cut))
    assert list(broken.keys.astype(str)) == ["000000", "000001", "000002"]
    truncated = BAD_REASONS.index("truncated_tar")
    assert list(broken.problem) == [-1, -1, truncated]
    # Not a tar at all: one truncated record, so the break is counted.
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"x" * 2000)
    assert list(index_tar(str(garbage)).problem) == [truncated]
    # A tar with a sample that has no image member.
    write_tar(tmp_path / "noimage.tar", [("a.txt", b"cap"), ("a.json", b"{}")])
    missing_image = BAD_REASONS.index("missing_image")
    assert list(index_tar(str(tmp_path / "noimage.tar")).problem) == [missing_image]


def test_fast_header_scan_agrees_with_tarfile(tmp_path):
    import jaxclip.data.tar_index as tar_index

    (plain,) = write_shards(tmp_path / "plain", 1, 5)
    long_name = "d" * 120 + "/000007"  # needs a pax header: the tarfile fallback
    pax = tmp_path / "pax.tar"
    write_tar(pax, [(f"{long_name}.jpg", b"x"), (f"{long_name}.txt", b"caption")])
    gnu = tmp_path / "gnu.tar"
    with tarfile.open(gnu, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, content in (("dir/000008.jpg", b"img"), ("dir/000008.txt", b"cap")):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    data = Path(plain).read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2 + 100])
    with tarfile.open(plain) as tar:
        third_header = tar.getmembers()[2].offset  # a header, not member data
    corrupt = tmp_path / "corrupt.tar"
    garbled = data[:third_header] + b"\x01" * 512 + data[third_header + 512 :]
    corrupt.write_bytes(garbled)
    for path in (plain, gnu, cut, corrupt):
        size = os.path.getsize(path)
        fast, fast_break = tar_index._scan_ustar(str(path), size)
        slow, slow_break = tar_index._scan_with_tarfile(str(path), size)
        assert fast == slow, path
        assert (fast_break is None) == (slow_break is None) == (path in (plain, gnu))
    assert len(tar_index._scan_ustar(str(corrupt), len(garbled))[0]) == 2
    with pytest.raises(tar_index._NeedsTarfile):
        tar_index._scan_ustar(str(pax), os.path.getsize(pax))
    assert list(index_tar(str(pax)).keys.astype(str)) == [long_name]
