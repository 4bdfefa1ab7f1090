"""Share groups (KIP-932) on the local Kafka 4.4: ShareConsumer members in explicit acknowledgement mode.

What a share-group mode builds on, as Kafka 4.4.0 and confluent-kafka 2.16.1 behave (measured here; the
tests below check the first five):

- The launcher formats every node with ``share.version=2``; 4.4 would too, and ``group.coordinator.rebalance.
  protocols`` (classic, consumer, streams) no longer lists share groups: the feature alone turns them on. Data
  formatted by Kafka 4.1 keeps share groups off (the client fails with UNSUPPORTED_VERSION) and the launcher warns.
- Locks: a record a member polled is locked to it for the broker's ``group.share.record.lock.duration.ms``
  (30 000 ms, the default, which the launcher keeps). A group overrides it with the *group* config
  ``share.record.lock.duration.ms``: ``AdminClient.incremental_alter_configs`` on ``ConfigResource(GROUP, id)``,
  bounded by ``group.share.min/max.record.lock.duration.ms`` (15 000-60 000; 1 000 is refused with
  INVALID_CONFIG). A lock that runs out releases the record to another member (seen: after 15.1 s with a
  15 s lock, delivery count 2); the first member's late acknowledgement then fails in ``commit_sync``'s
  per-partition result (INVALID_RECORD_STATE), it does not raise.
- A new group starts at the *latest* offset. ``share.auto.offset.reset=earliest`` is a group config set the
  same way, before the group's first fetch (the client refuses ``auto.offset.reset``), and only once a
  describe shows it: the broker applies an alter a moment after the call returns.
- A member gets its first records 1-2 s after subscribing (assignments come on heartbeats, 1 s on the local
  broker; Kafka's default 5 s gave 5-6 s); the first share group on a new broker waits ~6 s more while the
  broker creates ``__share_group_state``.
- ``poll()`` returns a batch: up to ``max.poll.records`` (500 by default), best-effort: the broker hands out
  whole producer batches, so one batch of 300 came back to ``max.poll.records=100``.
- Explicit mode: ``poll()`` raises IllegalStateException ("N records from previous poll have not been
  acknowledged") until every record of the previous batch is acknowledged; acknowledgements go out on the
  next poll or ``commit_sync``. RELEASE hands a record back at once (redelivered, ``delivery_count()`` + 1);
  REJECT archives it (never delivered again); ACCEPT completes it.
- After ``share.delivery.count.limit`` deliveries (group config, default 5, 2-10) a record is archived.
  ``close()`` releases what is still unacknowledged at once (another member got it 0.1 s later).
- The ShareConsumer is not thread-safe: one thread polls, acknowledges and commits.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
from confluent_kafka import AcknowledgeType, IllegalStateException, Message, Producer, ShareConsumer
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource

from mtc75.tools.broker import LocalKafka

pytestmark = pytest.mark.timeout(180)

DEFAULT_LOCK_MS = "30000"  # the broker's group.share.record.lock.duration.ms (Kafka's default, kept by the launcher)


def set_group_config(bootstrap: str, group: str, **values: str) -> dict[str, str]:
    """Set share-group configs (``share_record_lock_duration_ms`` -> ``share.record.lock.duration.ms``) on the
    GROUP resource, wait until the broker applies them, and return every share.* config the group then has.

    The alter returns once the controller took it; the broker applies it a moment later (a describe right
    after it was seen to show the old value), and a member fetching before that would start the group at
    the old ``share.auto.offset.reset``.
    """
    admin = AdminClient({"bootstrap.servers": bootstrap})
    wanted = {name.replace("_", "."): value for name, value in values.items()}
    entries = [ConfigEntry(name, value, incremental_operation=AlterConfigOpType.SET) for name, value in wanted.items()]
    resource = ConfigResource(ConfigResource.Type.GROUP, group, incremental_configs=entries)
    admin.incremental_alter_configs([resource])[resource].result(timeout=30)
    deadline = time.monotonic() + 30
    while True:
        [future] = admin.describe_configs([ConfigResource(ConfigResource.Type.GROUP, group)]).values()
        configs = {name: e.value for name, e in future.result(timeout=30).items() if name.startswith("share.")}
        if all(configs.get(name) == value for name, value in wanted.items()):
            return configs
        assert time.monotonic() < deadline, f"group {group} still has {configs}, not {wanted}"
        time.sleep(0.1)


def produce_small_batches(bootstrap: str, topic: str, count: int, batch: int = 10) -> None:
    """``count`` records in producer batches of ``batch``, so that no poll can take the whole topic at once."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})
    for i in range(count):
        producer.produce(topic, value=str(i).encode())
        if i % batch == batch - 1:
            assert producer.flush(30) == 0
    assert producer.flush(30) == 0


def _share_consumer(bootstrap: str, group: str) -> ShareConsumer:
    return ShareConsumer({"bootstrap.servers": bootstrap, "group.id": group,
                          "share.acknowledgement.mode": "explicit", "max.poll.records": 20})


def share_two_members(bootstrap: str, topic: str, group: str, count: int, timeout: float = 90) -> list[list[int]]:
    """Two members of ``group`` take ``topic`` until ``count`` records are in; the values each one accepted.

    Member 0 holds its first batch unacknowledged until member 1 has a record of its own, so both must
    take part whatever the timing; each member polls, acknowledges and commits on its own thread.
    """
    got: list[list[int]] = [[], []]
    lock = threading.Lock()
    second_has_one = threading.Event()
    deadline = time.monotonic() + timeout
    errors: list[BaseException] = []

    def total() -> int:
        with lock:
            return len(got[0]) + len(got[1])

    def member(index: int) -> None:
        consumer = _share_consumer(bootstrap, group)
        try:
            consumer.subscribe([topic])
            while total() < count and time.monotonic() < deadline:
                batch = [m for m in consumer.poll(0.5) if m.error() is None]
                if not batch:
                    continue
                if index == 0 and not second_has_one.is_set():
                    second_has_one.wait(max(deadline - time.monotonic(), 0))  # its records stay locked to it
                for message in batch:
                    consumer.acknowledge(message)  # ACCEPT
                failed = {tp: err for tp, err in consumer.commit_sync(30).items() if err is not None}
                assert not failed, failed
                with lock:
                    got[index] += [int(m.value()) for m in batch]
                if index == 1:
                    second_has_one.set()
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)
            second_has_one.set()
        finally:
            consumer.close()

    threads = [threading.Thread(target=member, args=(i,), name=f"share-member-{i}") for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 30)
    assert not errors, errors
    assert not any(thread.is_alive() for thread in threads)
    return got


def test_two_share_consumers_get_every_record_once(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], local_kafka: LocalKafka | None
) -> None:
    if local_kafka is not None:  # the launcher's own record of what it started
        assert (local_kafka.finalized_features() or {}).get("share.version", 0) >= 1
    topic, group, count = make_topic(3, "share"), unique("share-g"), 300
    admin = AdminClient({"bootstrap.servers": bootstrap})
    broker_id = str(next(iter(admin.list_topics(timeout=10).brokers)))
    broker = ConfigResource(ConfigResource.Type.BROKER, broker_id)
    broker_configs = admin.describe_configs([broker])[broker].result(timeout=30)
    assert broker_configs["group.share.record.lock.duration.ms"].value == DEFAULT_LOCK_MS
    # Per group: the lock (here 45 s) and where a new group starts (else only records produced after it joined).
    configs = set_group_config(bootstrap, group, share_auto_offset_reset="earliest",
                               share_record_lock_duration_ms="45000")
    assert configs["share.auto.offset.reset"] == "earliest" and configs["share.record.lock.duration.ms"] == "45000"
    produce_small_batches(bootstrap, topic, count)

    got = share_two_members(bootstrap, topic, group, count)

    everything = sorted(got[0] + got[1])
    assert everything == list(range(count))  # every record, none twice
    assert got[0] and got[1], [len(g) for g in got]  # both members took part


def test_release_redelivers_reject_drops_and_poll_waits_for_acknowledgements(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str]
) -> None:
    topic, group = make_topic(1, "share-ack"), unique("share-ack-g")
    set_group_config(bootstrap, group, share_auto_offset_reset="earliest")
    produce_small_batches(bootstrap, topic, 5, batch=5)
    consumer = _share_consumer(bootstrap, group)
    try:
        consumer.subscribe([topic])
        batch = _first_batch(consumer, 5)
        assert [m.offset() for m in batch] == [0, 1, 2, 3, 4] and {m.delivery_count() for m in batch} == {1}
        with pytest.raises(IllegalStateException, match="not been acknowledged"):
            consumer.poll(0.5)  # explicit mode: the previous batch first
        consumer.acknowledge(batch[0], AcknowledgeType.REJECT)
        consumer.acknowledge(batch[1], AcknowledgeType.RELEASE)
        for message in batch[2:]:
            consumer.acknowledge(message)
        assert all(err is None for err in consumer.commit_sync(30).values())
        again = _first_batch(consumer, 1)
        assert [(m.offset(), m.delivery_count()) for m in again] == [(1, 2)]  # released: back, counted; rejected: gone
        consumer.acknowledge(again[0])
        assert all(err is None for err in consumer.commit_sync(30).values())
        assert [m for m in consumer.poll(2.0) if m.error() is None] == []
    finally:
        consumer.close()


def _first_batch(consumer: ShareConsumer, at_least: int, timeout: float = 60) -> list[Message]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = [m for m in consumer.poll(0.5) if m.error() is None]
        if batch:
            assert len(batch) >= at_least, [m.offset() for m in batch]
            return batch
    raise AssertionError(f"no records within {timeout:g}s")
