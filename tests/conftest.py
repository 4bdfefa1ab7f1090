"""Fixtures: one real Kafka for the session (local unless KAFKA_BOOTSTRAP_SERVERS names one), unique topics.

The local broker is this session's own (tests/local_kafka.py): started in a folder of the session on
MTC75_TEST_KAFKA_PORT or the next free pair of ports, stopped at the end, never shared.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator

import pytest

from mtc75.kafka.topics import create_topic
from mtc75.tools.broker import LocalKafka
from tests.local_kafka import owned_broker, session_folder

# Below the kernel's ephemeral range (32768-60999 here): a client that keeps reconnecting to a stopped broker
# on an ephemeral port can connect to itself (source port = that port), and the broker cannot start there
# again (seen: a killed cluster node could not be brought back on 48112). tests/local_kafka.py refuses a
# port inside the range, and the launcher never puts a node there.
TEST_PORT = int(os.environ.get("MTC75_TEST_KAFKA_PORT", "29092"))  # preferred: the next free pair if taken
# A test that asks for one of these fixtures talks to a real Kafka; `make unit` runs all the others.
KAFKA_FIXTURES = {"local_kafka", "bootstrap", "make_topic", "own_broker"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that needs a broker ``kafka`` (by its fixtures), so ``-m "not kafka"`` needs none."""
    for item in items:
        if KAFKA_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.kafka)


@pytest.fixture(scope="session")
def local_kafka() -> Iterator[LocalKafka | None]:
    """The broker this session started (None when the suite runs against an external cluster)."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield None
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
