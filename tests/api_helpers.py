"""What the library API's broker-free tests share: a small in-memory cluster and a consumer on it with fast
timings (tests/fake_kafka.py; the consumer's threads are the library's, the fake's calls are thread-safe)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mtc75
from mtc75 import testing
from tests.fake_kafka import FakeKafka

TOPIC, GROUP = "orders", "billing"
WAIT = 10.0
FAST = {"commit_interval": 0.02, "pause_interval": 0.05, "shutdown_timeout": 5.0, "revoke_timeout": 5.0}


def new_cluster() -> FakeKafka:
    """A fake cluster with TOPIC of two partitions (each test module makes it its ``cluster`` fixture)."""
    fake = FakeKafka()
    fake.create_topic(TOPIC, 2)
    return fake


def make(cluster: FakeKafka, handler: Callable[[Any], object] = lambda m: None, **kw: Any) -> mtc75.Consumer:
    """A consumer of TOPIC as GROUP on ``cluster``, with FAST timings; ``kw`` adds or overrides any keyword."""
    return testing.consumer(cluster.factories(), handler, topic=TOPIC, **{"group_id": GROUP, **FAST, **kw})
