"""Tests run on the CPU with 8 emulated devices, at XLA's lowest backend optimisation
level and with one compilation cache for the session (tests/process_util.py); this
must happen before JAX starts."""

import process_util

_CREATED_CACHE = process_util.configure_session()


def pytest_unconfigure(config):
    # Only the process that created the cache removes it (not an xdist worker).
    if _CREATED_CACHE:
        process_util.remove_cache(_CREATED_CACHE)


def pytest_collection_modifyitems(items):
    """Files with slow tests run first, each file's tests kept together (so a file's
    fixtures are built once): both workers of `pytest -n 2` start the long tests
    early, rather than one of them meeting a long test when the other is done."""
    path = lambda item: item.nodeid.split("::")[0]  # noqa: E731
    slow = {path(item) for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: path(item) not in slow)  # stable: order kept otherwise
