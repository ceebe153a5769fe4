"""The device prefetcher keeps the input pipeline's state, and the performance
fields of the config (prefetch depth, peak FLOPs) are validated."""

from __future__ import annotations

import numpy as np
import pytest
from config_util import base

from jaxclip import sharding
from jaxclip.config import ConfigError, validate_config
from jaxclip.data.pipeline import shapes_iterator
from jaxclip.train.prefetch import DevicePrefetcher


def test_prefetcher_keeps_the_consumed_state():
    mesh = sharding.make_mesh((8, 1, 1))
    plain = shapes_iterator(0, 8, 32, 16)
    prefetched = DevicePrefetcher(shapes_iterator(0, 8, 32, 16), mesh, size=2)
    for _ in range(3):
        want = next(plain)
        got = next(prefetched)
        prefetched.fill()  # two batches ahead now
        np.testing.assert_array_equal(np.asarray(got["images"]), want["images"])
        np.testing.assert_array_equal(np.asarray(got["tokens"]), want["tokens"])
        assert prefetched.get_state() == plain.get_state()
    prefetched.set_state(plain.get_state())
    np.testing.assert_array_equal(
        np.asarray(next(prefetched)["tokens"]), next(plain)["tokens"]
    )


@pytest.mark.parametrize(
    "field, value",
    [
        ("train.prefetch", 0),
        ("mfu.peak_flops", -1.0),
    ],
)
def test_performance_fields_are_validated(field, value):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate_config(base({field: value}))
