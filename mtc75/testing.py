"""The test seam: an :class:`mtc75.Consumer` built on client factories of your own, e.g. an in-memory fake.

``consumer(factories, handler, topic=..., group_id=..., ...)`` takes the constructor's keywords;
``from_settings(factories, handler, settings, ...)`` those of :meth:`mtc75.Consumer.from_settings`. Every
Kafka client of the run is built by ``factories`` (:class:`mtc75.kafka.clients.ClientFactories`: a
``consumer``, a ``producer`` and an ``admin`` factory, each called with the librdkafka config dict), so a
test drives the real engine without a broker (this repository's tests/fake_kafka.py is one such fake).
Threads: as for :class:`mtc75.Consumer`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from mtc75.api import Consumer, settings_from_keywords
from mtc75.core.failures import Failure
from mtc75.core.stats import Stats
from mtc75.kafka.clients import ClientFactories
from mtc75.kafka.deserializers import DeserializerSpec
from mtc75.runtime.invoker import CallObserver
from mtc75.settings import Settings


def consumer(
    factories: ClientFactories,
    handler: Callable[[Any], object],
    *,
    cls: type[Consumer] = Consumer,
    librdkafka: Mapping[str, Any] | None = None,
    on_status: Callable[[Stats], None] | None = None,
    status_interval: float = 1.0,
    observers: Sequence[CallObserver] = (),
    metrics_port: int | None = None,
    metrics_addr: str = "127.0.0.1",
    metrics_registry: Any = None,
    key_deserializer: DeserializerSpec = None,
    value_deserializer: DeserializerSpec = None,
    on_error: Callable[[Failure], object] | None = None,
    **settings: Any,
) -> Consumer:
    """``mtc75.Consumer(handler, **settings)`` on ``factories`` (``topic`` and ``group_id`` as there); ``cls``:
    a subclass of mtc75.Consumer to build instead."""
    built = cls._built(
        handler, settings_from_keywords(settings), librdkafka, on_status, status_interval, observers, factories,
        (key_deserializer, value_deserializer), on_error,
    )
    built._ask_metrics(metrics_port, metrics_addr, metrics_registry)
    return built


def from_settings(
    factories: ClientFactories,
    handler: Callable[[Any], object],
    settings: Settings,
    *,
    librdkafka: Mapping[str, Any] | None = None,
    on_status: Callable[[Stats], None] | None = None,
    status_interval: float = 1.0,
    observers: Sequence[CallObserver] = (),
    key_deserializer: DeserializerSpec = None,
    value_deserializer: DeserializerSpec = None,
    on_error: Callable[[Failure], object] | None = None,
) -> Consumer:
    """``mtc75.Consumer.from_settings(handler, settings, ...)`` on ``factories``."""
    return Consumer._built(handler, settings, librdkafka, on_status, status_interval, observers, factories,
                           (key_deserializer, value_deserializer), on_error)
