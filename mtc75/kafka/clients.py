"""How the engine builds its Kafka clients: one seam for an in-memory fake, one place for config errors.

The engine builds a ``Consumer`` (poll thread), an ``AdminClient`` for the topic-id watch, and with
``ON_FAILURE=dlq`` a ``Producer`` and an ``AdminClient`` for the dead-letter topic; a share-group run
(GROUP_TYPE="share") builds a ``ShareConsumer`` instead of the ``Consumer`` and an ``AdminClient`` for the
topic, the group's configs and the broker probe. It builds them only
through a :class:`ClientFactories`, so a test can hand it fakes (``tests/fake_kafka.py``) and drive the
real engine without a broker, and always via :func:`new_client`: librdkafka checks every property when
a client is created and raises ``KafkaException`` (or ``TypeError``/``ValueError`` from the Python
layer for a value of the wrong type); left alone that is a traceback, here it is one ConfigError line
(exit 2). Each factory takes the librdkafka config dict. Any thread may call this module; the engine
calls it on the thread that runs it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from confluent_kafka import Consumer, KafkaException, Producer, ShareConsumer
from confluent_kafka.admin import AdminClient

from mtc75.errors import ConfigError

Factory = Callable[[dict[str, Any]], Any]
T = TypeVar("T")


@dataclass(frozen=True)
class ClientFactories:
    """Which classes build the clients; the defaults are confluent-kafka's own."""

    consumer: Factory = Consumer
    producer: Factory = Producer
    admin: Factory = AdminClient
    share_consumer: Factory = ShareConsumer


REAL_FACTORIES = ClientFactories()


def new_client(factory: Callable[[dict[str, Any]], T], conf: Mapping[str, Any], kind: str) -> T:
    """``factory(conf)``; a property librdkafka refuses becomes ``ConfigError`` naming the client kind."""
    try:
        return factory(dict(conf))
    except KafkaException as err:
        raise ConfigError(f"invalid {kind} configuration: {err.args[0].str()}") from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid {kind} configuration: {err}") from None
