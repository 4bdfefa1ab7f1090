"""An in-memory share group (KIP-932) beside tests/fake_kafka.py's cluster: ``ShareConsumer`` and group configs.

:class:`FakeShareGroups` keeps, per share group and partition, every record's state as the broker does:
available, acquired (by a member, until its lock deadline, with a delivery count), acknowledged (accepted),
or archived (rejected, or released / expired on its last delivery). ``FakeShareGroups.factories()`` gives
the engine a ``share_consumer`` factory and an admin client that also answers ``describe_configs`` and
``incremental_alter_configs`` on a GROUP resource.

What :class:`FakeShareConsumer` does as confluent-kafka 2.16.1 with Kafka 4.4 does (tests/test_share_groups.py
checks these on the real broker): ``poll`` raises IllegalStateException while a record of the previous poll
is unacknowledged; ``acknowledge`` only records; acknowledgements go out with the next ``poll``,
``commit_async`` or ``commit_sync``, and the acknowledgement callback gets them (offsets per partition, the
error) on the thread that made that call; an acknowledgement of a record no longer acquired by this member
is refused with INVALID_RECORD_STATE; RELEASE makes a record available again (its next delivery counts one
more); ``close`` releases what is unacknowledged. ``oversize`` makes a poll hand out more than
``max.poll.records`` (the broker completes producer batches). Locks expire on ``clock`` (monotonic by
default; the tests that need expiry use a short lock or a fake clock).

Threads: one engine poll thread calls a consumer; the test thread reads the counts (under the cluster's lock).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import AcknowledgeType, IllegalStateException, KafkaError, KafkaException, TopicPartition

from mtc75.kafka.clients import ClientFactories
from tests.fake_kafka import FakeAdmin, FakeKafka, FakeMessage

AVAILABLE, ACQUIRED, ACKED, ARCHIVED = "available", "acquired", "acked", "archived"
DEFAULTS = {"share.record.lock.duration.ms": "30000", "share.delivery.count.limit": "5",
            "share.auto.offset.reset": "latest"}


class ShareMessage(FakeMessage):
    """A polled record: a FakeMessage with its delivery count."""

    def __init__(self, base: FakeMessage, count: int) -> None:
        super().__init__(base.topic(), base.partition(), base.offset(), base.value(), base.key(), base.headers())
        self._count = count

    def delivery_count(self) -> int:
        return self._count


@dataclass
class Record:
    state: str = AVAILABLE
    count: int = 0  # deliveries so far
    owner: int = 0  # the member that holds it while ACQUIRED
    deadline: float = 0.0


@dataclass
class GroupState:
    configs: dict[str, str] = field(default_factory=lambda: dict(DEFAULTS))
    records: dict[tuple[str, int, int], Record] = field(default_factory=dict)
    started: set[tuple[str, int]] = field(default_factory=set)  # partitions the group has begun (reset applied)


class FakeShareGroups:
    """Share groups over ``cluster``'s topics (see the module notes)."""

    def __init__(self, cluster: FakeKafka, clock: Callable[[], float] = time.monotonic) -> None:
        self.cluster = cluster
        self.clock = clock
        self.groups: dict[str, GroupState] = {}
        self.consumers: list[FakeShareConsumer] = []
        self.acks: list[tuple[tuple[str, int, int], AcknowledgeType, bool]] = []  # (record, kind, refused)
        self.oversize = 0  # records a poll hands out beyond max.poll.records (whole producer batches)
        self.alters = 0  # incremental_alter_configs calls served
        self._members = 0

    def factories(self) -> ClientFactories:
        return dataclasses.replace(self.cluster.factories(), share_consumer=self._new_consumer,
                                   admin=lambda conf: ShareAdmin(self, conf))

    def group(self, name: str) -> GroupState:
        with self.cluster._lock:
            return self.groups.setdefault(name, GroupState())

    def states(self, group: str) -> dict[str, int]:
        """How many records of ``group`` are in each state."""
        with self.cluster._lock:
            out: dict[str, int] = {}
            for record in self.groups.get(group, GroupState()).records.values():
                out[record.state] = out.get(record.state, 0) + 1
            return out

    def _new_consumer(self, conf: dict[str, Any]) -> FakeShareConsumer:
        if conf.get("share.acknowledgement.mode") != "explicit":
            raise KafkaException(KafkaError(KafkaError._INVALID_ARG, "fake: only explicit mode is modelled"))
        with self.cluster._changed:
            self._members += 1
            consumer = FakeShareConsumer(self, conf, self._members)
            self.consumers.append(consumer)
            self.cluster._changed.notify_all()
        return consumer

    # -- the broker's side (caller holds the cluster's lock) --------------------------------------------

    def _acquire(self, member: int, group: str, topic: str, limit: int) -> list[ShareMessage]:
        state = self.groups.setdefault(group, GroupState())
        lock = float(state.configs["share.record.lock.duration.ms"]) / 1000
        max_count = int(state.configs["share.delivery.count.limit"])
        now = self.clock()
        out: list[ShareMessage] = []
        logs = self.cluster._logs.get(topic, [])
        for partition, log in enumerate(logs):
            if (topic, partition) not in state.started:
                state.started.add((topic, partition))
                if state.configs["share.auto.offset.reset"] == "latest":
                    for message in log:
                        state.records[(topic, partition, message.offset())] = Record(ACKED)
            for message in log:
                if len(out) >= limit:
                    return out
                record = state.records.setdefault((topic, partition, message.offset()), Record())
                if record.state == ACQUIRED and record.deadline <= now:
                    record.state = ARCHIVED if record.count >= max_count else AVAILABLE
                if record.state != AVAILABLE:
                    continue
                record.state, record.owner, record.deadline = ACQUIRED, member, now + lock
                record.count += 1
                out.append(ShareMessage(message, record.count))
        return out

    def _apply(self, member: int, group: str, key: tuple[str, int, int], kind: AcknowledgeType) -> bool:
        """One acknowledgement; False when refused (the record is not this member's any more)."""
        state = self.groups.setdefault(group, GroupState())
        record = state.records.get(key)
        refused = record is None or record.state != ACQUIRED or record.owner != member or \
            record.deadline <= self.clock()
        if not refused:
            assert record is not None
            if kind == AcknowledgeType.ACCEPT:
                record.state = ACKED
            elif kind == AcknowledgeType.REJECT:
                record.state = ARCHIVED
            else:
                limit = int(state.configs["share.delivery.count.limit"])
                record.state = ARCHIVED if record.count >= limit else AVAILABLE
        self.acks.append((key, kind, refused))
        self.cluster._changed.notify_all()
        return not refused


class FakeShareConsumer:
    """confluent_kafka.ShareConsumer in memory (explicit acknowledgement mode; see the module notes)."""

    def __init__(self, groups: FakeShareGroups, conf: dict[str, Any], member: int) -> None:
        self._groups = groups
        self.conf = conf
        self._member = member
        self._group = str(conf["group.id"])
        self._limit = int(conf.get("max.poll.records", 500))
        self._topics: list[str] = []
        self._batch: dict[tuple[str, int, int], ShareMessage] = {}  # the last poll's unacknowledged records
        self._recorded: dict[tuple[str, int, int], AcknowledgeType] = {}  # acknowledged, not yet sent
        self._callback: Callable[[dict[TopicPartition, set[int]], KafkaException | None], None] | None = None
        self.polls: list[int] = []  # records each poll returned
        self.closed = False

    def subscribe(self, topics: list[str]) -> None:
        self._topics = list(topics)

    def set_acknowledgement_commit_callback(self, callback: Any) -> None:
        self._callback = callback

    def acknowledge(self, message: Any, ack_type: AcknowledgeType = AcknowledgeType.ACCEPT) -> None:
        key = (message.topic(), message.partition(), message.offset())
        self._batch.pop(key, None)
        self._recorded[key] = ack_type

    def poll(self, timeout: float = -1) -> list[ShareMessage]:
        if self._batch:
            raise IllegalStateException(f"{len(self._batch)} records from previous poll have not been acknowledged")
        self._send()
        cluster = self._groups.cluster
        deadline = time.monotonic() + max(0.0, timeout)
        with cluster._changed:
            while True:
                got = []
                for topic in self._topics:  # each topic in turn, as far as the limit allows
                    got += self._groups._acquire(self._member, self._group, topic,
                                                 self._limit + self._groups.oversize - len(got))
                if got or time.monotonic() >= deadline:
                    break
                cluster._changed.wait(max(0.0, deadline - time.monotonic()))
        self._batch = {(m.topic(), m.partition(), m.offset()): m for m in got}
        self.polls.append(len(got))
        return got

    def commit_async(self) -> None:
        self._send()

    def commit_sync(self, timeout: float = 60) -> dict[TopicPartition, KafkaException | None]:
        return self._send()

    def close(self) -> None:
        for key in list(self._batch):
            self._recorded[key] = AcknowledgeType.RELEASE
        self._batch.clear()
        self._send()
        self.closed = True

    def _send(self) -> dict[TopicPartition, KafkaException | None]:
        recorded, self._recorded = self._recorded, {}
        ok: dict[tuple[str, int], set[int]] = {}
        refused: dict[tuple[str, int], set[int]] = {}
        with self._groups.cluster._changed:
            for key, kind in recorded.items():
                done = self._groups._apply(self._member, self._group, key, kind)
                (ok if done else refused).setdefault(key[:2], set()).add(key[2])
        result: dict[TopicPartition, KafkaException | None] = {}
        error = KafkaException(KafkaError(KafkaError.INVALID_RECORD_STATE, "fake: the record state is invalid"))
        for offsets, err in ((ok, None), (refused, error)):
            for (topic, partition), numbers in offsets.items():
                if self._callback is not None:
                    self._callback({TopicPartition(topic, partition): numbers}, err)
                result[TopicPartition(topic, partition)] = err
        return result


class ShareAdmin(FakeAdmin):
    """The fake admin client, plus the share groups' configs (DescribeConfigs / IncrementalAlterConfigs)."""

    def __init__(self, groups: FakeShareGroups, conf: dict[str, Any]) -> None:
        super().__init__(groups.cluster, conf)
        self._groups = groups

    def describe_configs(self, resources: list[Any], **_: Any) -> dict[Any, Future[Any]]:
        out: dict[Any, Future[Any]] = {}
        for resource in resources:
            future: Future[Any] = Future()
            configs = self._groups.group(resource.name).configs
            future.set_result({name: _Entry(value) for name, value in configs.items()})
            out[resource] = future
        return out

    def incremental_alter_configs(self, resources: list[Any], **_: Any) -> dict[Any, Future[None]]:
        out: dict[Any, Future[None]] = {}
        for resource in resources:
            state = self._groups.group(resource.name)
            with self._groups.cluster._lock:
                for entry in resource.incremental_configs:
                    state.configs[entry.name] = str(entry.value)
                self._groups.alters += 1
            future: Future[None] = Future()
            future.set_result(None)
            out[resource] = future
        return out


@dataclass
class _Entry:
    value: str
