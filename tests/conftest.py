"""Fixtures: one real Kafka for the session (local unless KAFKA_BOOTSTRAP_SERVERS names one), unique topics.

The local broker is this session's own (tests/local_kafka.py): started in a folder of the session on
MTC75_TEST_KAFKA_PORT or the next free pair of ports, stopped at the end, never shared with another session.
Under pytest-xdist (``make test``: ``-n``, ``--dist loadgroup``) the workers of one session share it: the first
worker that needs it starts it, the controller stops it after the last worker ended. A test that stops or kills
a broker has one of its own (a module-scoped fixture); the tests that use a module-scoped fixture of one name run
on one worker (tests/xdist_groups.py), so each such server is started once per module, as without xdist, and
never two of one name at once.

Hooks and fixtures run on the main thread of the controller or of a worker.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mtc75.kafka.topics import create_topic
from mtc75.tools.broker import LocalKafka
from tests.local_kafka import new_session_root, owned_broker, session_folder, shared_broker, stop_shared
from tests.xdist_groups import GroupScheduling, write_groups

# Below the kernel's ephemeral range (32768-60999 here): a client that keeps reconnecting to a stopped broker
# on an ephemeral port can connect to itself (source port = that port), and the broker cannot start there
# again (seen: a killed cluster node could not be brought back on 48112). tests/local_kafka.py refuses a
# port inside the range, and the launcher never puts a node there.
TEST_PORT = int(os.environ.get("MTC75_TEST_KAFKA_PORT", "29092"))  # preferred: the next free pair if taken
# This process's xdist worker number (0 without xdist): workers that start brokers of their own at once prefer
# distinct ports (a pair each from their base), so they do not race for one pair.
WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
# A test that asks for one of these fixtures talks to a real Kafka; `make unit` runs all the others.
KAFKA_FIXTURES = {"local_kafka", "bootstrap", "make_topic", "own_broker"}
# Handed by the xdist controller to each worker: the session's folder (the broker the workers share, the groups).
SESSION_FOLDER = "mtc75_session_folder"
_session_root = pytest.StashKey[Path]()


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> Iterator[None]:
    """Mark every test that needs a broker ``kafka`` (by its fixtures) before ``-m`` selects, so ``-m "not kafka"``
    needs none. On an xdist worker, once every other hook has ordered and selected: the tests that wait longest
    first (broker tests, then ``slow`` ones; the many short ones fill the workers at the end), and tell the
    controller which tests share a costly fixture (tests/xdist_groups.py)."""
    for item in items:
        if KAFKA_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.kafka)
    yield
    root = getattr(config, "workerinput", {}).get(SESSION_FOLDER)
    if root is not None:
        items.sort(key=lambda item: (item.get_closest_marker("kafka") is None, item.get_closest_marker("slow") is None))
        write_groups(Path(root), items)


@pytest.hookimpl(optionalhook=True)  # an xdist hook: the controller, once per worker it starts
def pytest_configure_node(node: Any) -> None:
    node.workerinput[SESSION_FOLDER] = str(node.config.stash.setdefault(_session_root, new_session_root()))


@pytest.hookimpl(optionalhook=True)  # an xdist hook: the controller, once
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadgroup`` by tests/xdist_groups.py (xdist's own no longer groups under pytest 9.2)."""
    if config.getvalue("dist") != "loadgroup":
        return None
    return GroupScheduling(config, log, lambda: config.stash[_session_root])


def pytest_unconfigure(config: pytest.Config) -> None:
    """The controller, after every worker ended: stop the broker they shared, if one of them started it."""
    root = config.stash.get(_session_root, None)
    if root is not None:
        stop_shared(root)


@pytest.fixture(scope="session")
def local_kafka(pytestconfig: pytest.Config) -> Iterator[LocalKafka | None]:
    """The broker this session started (None when the suite runs against an external cluster)."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield None
        return
    shared = getattr(pytestconfig, "workerinput", {}).get(SESSION_FOLDER)
    if shared is not None:  # an xdist worker: the session's broker, stopped by the controller
        yield shared_broker(Path(shared), TEST_PORT)
        return
    with session_folder("kafka") as home:
        broker = owned_broker(home, TEST_PORT)
        try:
            yield broker
        finally:
            broker.stop()


@pytest.fixture(scope="session")
def bootstrap(local_kafka: LocalKafka | None) -> str:
    return local_kafka.bootstrap if local_kafka is not None else os.environ["KAFKA_BOOTSTRAP_SERVERS"]


@pytest.fixture
def unique() -> Callable[[str], str]:
    """Names no other test (or earlier run) uses: topics and groups are never shared."""
    run = uuid.uuid4().hex[:8]
    return lambda prefix: f"{prefix}-{run}"


@pytest.fixture
def make_topic(bootstrap: str, unique: Callable[[str], str]) -> Callable[..., str]:
    def make(partitions: int = 3, prefix: str = "t") -> str:
        topic = unique(prefix)
        create_topic({"bootstrap.servers": bootstrap}, topic, partitions, 1)
        return topic

    return make
