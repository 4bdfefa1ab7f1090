"""MTC75 (Maximum Thread Control 75): a bounded-concurrency Kafka consumer, as a library.

    import mtc75

    def handle(message):  # runs on a worker thread; raise to retry
        ...

    stats = mtc75.Consumer(handle, topic="orders", group_id="billing", max_thread_count=8).run(idle_exit=5)

See :class:`mtc75.Consumer` and docs/library.md ("Use it as a library"). The command-line scripts of the
repository are built from the same engine; everything else in this package is internal.
Which thread may call what: see :class:`mtc75.Consumer` (mtc75/api.py); importing is thread-agnostic.
"""

from __future__ import annotations

# First, before the imports below (logging, confluent_kafka, the engine: most of a script's start-up): a
# script's ``import mtc75._startup`` runs this file first, and Ctrl-C meanwhile must be exit 130, not a
# traceback. It does nothing unless ``__main__`` is one of the repository's scripts.
import mtc75._startup  # noqa: F401

import logging

from mtc75.api import Consumer
from mtc75.core.failures import Failure
from mtc75.core.health import Health
from mtc75.core.output import Output
from mtc75.core.stats import Stats
from mtc75.errors import (
    BatchError,
    BrokerUnreachable,
    ConfigError,
    DeserializationError,
    HandlerRefused,
    KafkaFatalError,
    KafkaUnavailable,
    MessageFailed,
    MisuseError,
    Mtc75Error,
    OffsetOutOfRange,
    TopicGone,
    TopicNotFound,
)
from mtc75.kafka.deserializers import DecodedMessage

__version__ = "0.1.0"
__all__ = [
    "BatchError",
    "BrokerUnreachable",
    "ConfigError",
    "Consumer",
    "DecodedMessage",
    "DeserializationError",
    "Failure",
    "HandlerRefused",
    "Health",
    "KafkaFatalError",
    "KafkaUnavailable",
    "MessageFailed",
    "MisuseError",
    "Mtc75Error",
    "OffsetOutOfRange",
    "Output",
    "Stats",
    "TopicGone",
    "TopicNotFound",
    "__version__",
]

# A library logs, and the application decides where records go: without its own logging set up,
# nothing of ours reaches stderr through logging's last-resort handler.
logging.getLogger(__name__).addHandler(logging.NullHandler())
