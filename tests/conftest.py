"""Tests run on the CPU with 8 emulated devices, at XLA's lowest backend optimisation
level and with one compilation cache for the session (tests/process_util.py); this
must happen before JAX starts."""

import os

import process_util

_CREATED_CACHE = process_util.configure_session()


def pytest_unconfigure(config):
    # Only the process that created the cache removes it (not an xdist worker).
    if _CREATED_CACHE:
        process_util.remove_cache(_CREATED_CACHE)


def _path(item) -> str:
    return item.nodeid.split("::")[0]


def _has(item, *markers: str) -> bool:
    return all(item.get_closest_marker(marker) for marker in markers)


def _weight(tests: list) -> int:
    """A rough cost of a file: a slow test counts 1, a slow test that starts child
    processes 5 (several JAX processes, each importing and compiling)."""
    return sum(_has(t, "slow") + 4 * _has(t, "slow", "multiprocess") for t in tests)


def _order(tests: list) -> tuple[bool, int]:
    """Within a worker's run: files with a test that starts child processes (the
    longest tests) first, then the heavier files."""
    return any(_has(t, "slow", "multiprocess") for t in tests), _weight(tests)


def pytest_collection_modifyitems(items):
    """Every worker of `pytest -n N` starts with files that hold slow tests, and ends
    with quick ones, each file's tests kept together (so a file's fixtures are built
    once).

    xdist's worksteal hands worker i the i-th of N consecutive runs of this list,
    equal in length, then lets an idle worker take the back half of another's queue.
    A plain "slow files first" list gives the first worker nearly every slow file and
    the others only quick tests, which then reach the slow files late, stolen one
    half-queue at a time. Here the slow files are shared out by their weight (the
    heaviest first, each to the lightest run), each run starts with its files that
    start child processes (the longest tests), and is filled up with quick tests,
    which the stealing then balances.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    files: dict[str, list] = {}
    for item in items:
        files.setdefault(_path(item), []).append(item)
    slow = [tests for tests in files.values() if _weight(tests)]
    quick = [t for tests in files.values() if not _weight(tests) for t in tests]
    runs: list[list[list]] = [[] for _ in range(workers)]
    for tests in sorted(slow, key=_weight, reverse=True):  # stable on ties
        min(runs, key=lambda run: sum(map(_weight, run))).append(tests)
    runs_items = [
        [t for tests in sorted(run, key=_order, reverse=True) for t in tests]
        for run in runs
    ]
    # The run lengths worksteal's first split gives each worker.
    lengths, left = [], len(items)
    for remaining in range(workers, 0, -1):
        lengths.append(left // remaining)
        left -= lengths[-1]
    if any(len(run) > length for run, length in zip(runs_items, lengths)):
        # Too many slow tests to share out this way: all of them first.
        runs_items, lengths = [[t for run in runs_items for t in run]], [len(items)]
    ordered = []
    for run, length in zip(runs_items, lengths):
        fill = max(0, length - len(run))
        ordered += run + quick[:fill]
        quick = quick[fill:]
    items[:] = ordered + quick
