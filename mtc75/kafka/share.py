"""The share-group client (GROUP_TYPE="share"): librdkafka's ``ShareConsumer`` in explicit acknowledgement mode,
and the share group's own configs.

A share consumer (KIP-932; confluent-kafka 2.16, Kafka 4.2+) polls batches of records from every partition
of the topic, each locked to this member until it is acknowledged -- ACCEPT, RELEASE (delivered again) or
REJECT (archived) -- or its lock ends. ``acknowledge`` only records the decision; it reaches the broker
with the next ``poll`` or commit (:meth:`ShareClient.send`, :meth:`ShareClient.flush`), and the broker's
answer comes back to the acknowledgement callback. In explicit mode ``poll`` refuses to run while a record
of the previous poll is unacknowledged, and raises nothing else for the engine to handle but Kafka errors,
which go to ``on_error`` like librdkafka's ``error_cb``. A share consumer cannot pause, seek or list
topics: the broker probe asks the admin client.

:func:`group_config` reads what the engine needs of the group (the lock duration, the delivery limit) and
makes ``share.auto.offset.reset`` what AUTO_OFFSET_RESET says: a share group starts at the latest offset
unless told otherwise, the client refuses ``auto.offset.reset``, and the group config is applied a moment
after the alter returns, so it waits (bounded) until a describe shows it.

Threads: the poll thread only, like :class:`~mtc75.kafka.client.KafkaClient` (the acknowledgement callback
runs inside its ``poll``/commit calls); ``close`` as there, on a helper thread while the poll thread waits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import AcknowledgeType, KafkaError, KafkaException
from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource

from mtc75.kafka.client import ClientLink

logger = logging.getLogger(__name__)

ACCEPT, RELEASE, REJECT = AcknowledgeType.ACCEPT, AcknowledgeType.RELEASE, AcknowledgeType.REJECT
# Kafka's defaults, used when the group's configs cannot be read (an older broker, no DescribeConfigs right).
DEFAULT_LOCK_MS = 30_000
DEFAULT_DELIVERY_LIMIT = 5
CONFIG_TIMEOUT = 10.0  # longest the start-up reads the group's configs, and waits for an alter to show
LOCK_MS, DELIVERY_LIMIT = "share.record.lock.duration.ms", "share.delivery.count.limit"
RESET = "share.auto.offset.reset"

AckCallback = Callable[[dict[Any, set[int]], KafkaException | None], None]


@dataclass(frozen=True)
class GroupConfig:
    """What the share engine needs of its group."""

    lock_seconds: float  # share.record.lock.duration.ms: how long a polled record stays this member's
    delivery_limit: int  # share.delivery.count.limit: deliveries before the broker archives a record
    reset: str  # share.auto.offset.reset: where partitions new to the group start


def group_config(admin: Any, group: str, reset: str) -> GroupConfig:
    """The group's configs, after setting ``share.auto.offset.reset`` to ``reset`` where it differs.

    Never fails the run: a config that cannot be read is Kafka's default, and an alter that is refused
    (no AlterConfigs right on the group) or does not show in time is one warning naming what the group does.
    """
    configs = _describe(admin, group)
    if configs is not None and configs.get(RESET) != reset:
        configs = _apply_reset(admin, group, reset, configs)
    if configs is None:
        configs = {}
    return GroupConfig(
        lock_seconds=_number(configs, LOCK_MS, DEFAULT_LOCK_MS) / 1000.0,
        delivery_limit=int(_number(configs, DELIVERY_LIMIT, DEFAULT_DELIVERY_LIMIT)),
        reset=configs.get(RESET, reset),
    )


def _describe(admin: Any, group: str) -> dict[str, str] | None:
    resource = ConfigResource(ConfigResource.Type.GROUP, group)
    try:
        [future] = admin.describe_configs([resource], request_timeout=CONFIG_TIMEOUT).values()
        entries = future.result(timeout=CONFIG_TIMEOUT)
    except (KafkaException, TimeoutError) as err:
        logger.warning("cannot read the configs of share group %s (%s): assuming a %.0f s lock and %d deliveries",
                       group, _text(err), DEFAULT_LOCK_MS / 1000, DEFAULT_DELIVERY_LIMIT)
        return None
    return {name: entry.value for name, entry in entries.items() if name.startswith("share.")}


def _apply_reset(admin: Any, group: str, reset: str, configs: dict[str, str]) -> dict[str, str]:
    entry = ConfigEntry(RESET, reset, incremental_operation=AlterConfigOpType.SET)
    resource = ConfigResource(ConfigResource.Type.GROUP, group, incremental_configs=[entry])
    try:
        admin.incremental_alter_configs([resource], request_timeout=CONFIG_TIMEOUT)[resource].result(
            timeout=CONFIG_TIMEOUT)
    except (KafkaException, TimeoutError) as err:
        logger.warning("cannot set %s=%s on share group %s (%s): partitions new to the group start at %s",
                       RESET, reset, group, _text(err), configs.get(RESET, "latest"))
        return configs
    deadline = time.monotonic() + CONFIG_TIMEOUT
    while time.monotonic() < deadline:
        now = _describe(admin, group)
        if now is not None and now.get(RESET) == reset:
            logger.info("share group %s: %s=%s", group, RESET, reset)
            return now
        time.sleep(0.1)  # the broker applies an alter a moment after it returned (bounded by the deadline)
    logger.warning("share group %s: %s=%s not applied within %.0fs; partitions new to the group may start at %s",
                   group, RESET, reset, CONFIG_TIMEOUT, configs.get(RESET, "latest"))
    return configs


def _number(configs: dict[str, str], name: str, default: int) -> float:
    try:
        return float(configs[name])
    except (KeyError, TypeError, ValueError):
        return float(default)


def _text(err: BaseException) -> str:
    if isinstance(err, KafkaException) and err.args and isinstance(err.args[0], KafkaError):
        return str(err.args[0].str())
    return str(err) or type(err).__name__


class ShareClient(ClientLink):
    """One ``ShareConsumer`` for the share engine (see the module notes)."""

    def __init__(self, consumer: Any, topics: tuple[str, ...], admin: Any, on_error: Callable[[KafkaError], None],
                 on_acks: AckCallback) -> None:
        super().__init__(consumer, topics[0], admin)
        self._topics = topics
        self._on_error = on_error
        consumer.set_acknowledgement_commit_callback(on_acks)
        self.acknowledge = consumer.acknowledge  # (message, ACCEPT | RELEASE | REJECT): recorded, sent later

    def subscribe(self) -> None:
        self.consumer.subscribe(list(self._topics))

    def poll(self, timeout: float) -> list[Any]:
        """The next batch (records and error events); also sends what was acknowledged since the last call."""
        try:
            return list(self.consumer.poll(timeout))
        except KafkaException as err:  # e.g. max.poll.interval.ms exceeded while every thread was stuck
            self._on_error(err.args[0])
            return []

    def send(self) -> None:
        """Send the acknowledgements recorded so far now, without waiting (the callback gets the answer)."""
        try:
            self.consumer.commit_async()
        except KafkaException as err:
            self._on_error(err.args[0])

    def flush(self, timeout: float) -> None:
        """Send the acknowledgements recorded so far and wait (bounded) for the broker's answer."""
        try:
            self.consumer.commit_sync(timeout)
        except KafkaException as err:
            self._on_error(err.args[0])
