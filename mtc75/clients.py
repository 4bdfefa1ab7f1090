"""Creating librdkafka clients: an invalid or unknown property is one ConfigError line (exit 2).

librdkafka checks every property when a client is created and raises ``KafkaException`` (or
``TypeError``/``ValueError`` from the Python layer for a value of the wrong type); left alone that is a
traceback. Any thread may call this.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from confluent_kafka import KafkaException

from mtc75.errors import ConfigError

T = TypeVar("T")


def new_client(factory: Callable[[dict[str, Any]], T], conf: Mapping[str, Any], kind: str) -> T:
    """``factory(conf)``; a property librdkafka refuses becomes ``ConfigError`` naming the client kind."""
    try:
        return factory(dict(conf))
    except KafkaException as err:
        raise ConfigError(f"invalid {kind} configuration: {err.args[0].str()}") from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid {kind} configuration: {err}") from None
