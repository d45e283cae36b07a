"""pytest under efarun: every rank runs the same tests in the same order (the collectives
match across ranks). Run with ``efarun -n 2 python -m pytest python/tests/test_comm.py``
(ci/python runs 2 and 4 ranks)."""

import os

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # ci/python: one JUnit file per rank (EFA_PYTEST_JUNIT/<run>-rank<R>.xml), counted by
    # ci/test-count.py.
    out = os.environ.get("EFA_PYTEST_JUNIT")
    if out:
        rank = os.environ.get("EFA_RANK", os.environ.get("RANK", "0"))
        run = os.environ.get("EFA_PYTEST_RUN", "pytest")
        config.option.xmlpath = os.path.join(out, f"{run}-rank{rank}.xml")
    if "EFA_RANK" not in os.environ and "RANK" not in os.environ:
        print("SKIPPED: efa python tests: not started by a launcher (run under efarun -n 2)")
    config.addinivalue_line(
        "markers",
        "min_ranks(n, why): the test needs a job of at least n ranks; with fewer it is "
        "skipped, saying so and why (every rank skips alike: the size is the job's)",
    )


@pytest.fixture(autouse=True)
def _min_ranks(request):
    """Skips a test marked ``min_ranks(n, why)`` when the job has fewer than n ranks, as the
    test module's ``world_size`` fixture tells."""
    mark = request.node.get_closest_marker("min_ranks")
    if mark is None:
        return
    need, why = mark.args
    have = request.getfixturevalue("world_size")
    if have < need:
        pytest.skip(f"needs >= {need} ranks, the job has {have}: {why}")


@pytest.fixture(scope="session")
def comm():
    import efa

    if "EFA_RANK" not in os.environ and "RANK" not in os.environ:
        pytest.skip("not under a launcher: run with efarun -n 2 python -m pytest")
    c = efa.Communicator(timeout=60)
    yield c
    c.finalize()
