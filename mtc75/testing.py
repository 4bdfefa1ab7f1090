"""The test seam: an :class:`mtc75.Consumer` built on client factories of your own, e.g. an in-memory fake.

``consumer(factories, handler, topic=..., group_id=..., ...)`` takes the constructor's keywords;
``from_settings(factories, handler, settings, ...)`` those of :meth:`mtc75.Consumer.from_settings`. Every
Kafka client of the run is built by ``factories`` (:class:`mtc75.kafka.clients.ClientFactories`: a
``consumer``, a ``producer`` and an ``admin`` factory, each called with the librdkafka config dict), so a
test drives the real engine without a broker (this repository's tests/fake_kafka.py is one such fake).
Threads: as for :class:`mtc75.Consumer`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mtc75.api import Consumer, building_on
from mtc75.kafka.clients import ClientFactories
from mtc75.settings import Settings


def consumer(factories: ClientFactories, handler: Callable[[Any], object], *, cls: type[Consumer] = Consumer,
             **keywords: Any) -> Consumer:
    """``mtc75.Consumer(handler, **keywords)`` on ``factories`` (``topic`` and ``group_id`` as there); ``cls``:
    a subclass of mtc75.Consumer to build instead."""
    with building_on(factories):
        return cls(handler, **keywords)


def from_settings(factories: ClientFactories, handler: Callable[[Any], object], settings: Settings,
                  **keywords: Any) -> Consumer:
    """``mtc75.Consumer.from_settings(handler, settings, **keywords)`` on ``factories``."""
    with building_on(factories):
        return Consumer.from_settings(handler, settings, **keywords)
