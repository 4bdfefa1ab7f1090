"""The constructors of the three Kafka clients the engine uses: one seam for an in-memory fake.

The engine builds a ``Consumer`` (poll thread), and with ``ON_FAILURE=dlq`` a ``Producer`` and an
``AdminClient`` for the dead-letter topic. It calls them only through a :class:`KafkaClients`, so a
test can hand it fakes (``tests/fake_kafka.py``) and drive the real engine without a broker. Each
factory takes the librdkafka config dict and is called on the thread that runs the engine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient

ClientFactory = Callable[[dict[str, Any]], Any]


@dataclass(frozen=True)
class KafkaClients:
    """Which classes build the clients; the defaults are confluent-kafka's own."""

    consumer: ClientFactory = Consumer
    producer: ClientFactory = Producer
    admin: ClientFactory = AdminClient


REAL_CLIENTS = KafkaClients()
