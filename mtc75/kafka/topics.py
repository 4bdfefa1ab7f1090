"""Topic checks and creation, with "already exists" treated as success."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ClusterMetadata, NewTopic

from mtc75.core.subscription import Subscription
from mtc75.errors import BrokerUnreachable, KafkaUnavailable, Mtc75Error, TopicNotFound
from mtc75.kafka.clients import new_client

logger = logging.getLogger(__name__)

METADATA_TIMEOUT = 10.0


def fetch_metadata(client: Any, bootstrap: str, topic: str | None = None,
                   timeout: float = METADATA_TIMEOUT) -> ClusterMetadata:
    """Cluster metadata, or one BrokerUnreachable line (the scripts add how to start a broker)."""
    try:
        return client.list_topics(topic, timeout=timeout)
    except KafkaException as err:
        raise BrokerUnreachable(
            f"cannot reach Kafka at {bootstrap} within {timeout:.0f}s ({err.args[0].str()})"
        ) from None


def require_topic(client: Any, bootstrap: str, topic: str) -> int:
    """The partition count of an existing topic; TopicNotFound when it is missing."""
    return require_topics(client, bootstrap, Subscription((topic,)))[topic]


def require_topics(client: Any, bootstrap: str, subscription: Subscription) -> dict[str, int]:
    """The partition count of each topic ``subscription`` names or matches now; TopicNotFound naming every
    named topic that is missing. A pattern needs no topic to exist (one created later is consumed then).

    Names only: one metadata request per name, as for one topic. With a pattern: the whole cluster's metadata,
    once (librdkafka asks for the same to match patterns)."""
    found: dict[str, int] = {}
    if subscription.patterns:
        topics = fetch_metadata(client, bootstrap).topics
        for name, info in topics.items():
            if info.error is None and info.partitions and subscription.matching(name) is not None:
                found[name] = len(info.partitions)
    else:
        topics = {}
        for name in subscription.names:
            topics.update(fetch_metadata(client, bootstrap, name).topics)
    missing = []
    for name in subscription.names:
        info = topics.get(name)
        if info is None or info.error is not None:
            missing.append(name)
        else:
            found[name] = len(info.partitions)
    if missing:
        listed = ", ".join(repr(name) for name in missing)
        raise TopicNotFound(f"topic {listed} does not exist on {bootstrap}" if len(missing) == 1
                            else f"topics {listed} do not exist on {bootstrap}")
    return found


# A CreateTopics answer that says nothing about the topic, only that the cluster did not answer in time or
# was moving (the errors of admin results never carry librdkafka's retriable flag): trying again may help.
CREATE_TRANSIENT = (
    KafkaError._TIMED_OUT, KafkaError.REQUEST_TIMED_OUT, KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN,
    KafkaError.NOT_CONTROLLER, KafkaError.LEADER_NOT_AVAILABLE, KafkaError.BROKER_NOT_AVAILABLE,
    KafkaError.NETWORK_EXCEPTION,
)
AUTO_REPLICATION = 0  # REPLICATION_FACTOR meaning "as many replicas as brokers, at most 3"
MAX_AUTO_REPLICATION = 3


def auto_replication(brokers: int) -> int:
    """The replication factor for a cluster of ``brokers``: one per broker, three at most.

    Three copies survive losing any one broker with min.insync.replicas=2; more only cost disk and I/O.
    """
    return max(1, min(brokers, MAX_AUTO_REPLICATION))


def create_topic(
    conf: Mapping[str, Any], topic: str, partitions: int, replication_factor: int, timeout: float = 30.0,
    *, admin_factory: Callable[[dict[str, Any]], Any] = AdminClient,
) -> bool:
    """Create ``topic`` and wait until metadata shows it; False when it already existed (see create_topics)."""
    return topic in create_topics(conf, {topic: partitions}, replication_factor, timeout, admin_factory=admin_factory)


def create_topics(
    conf: Mapping[str, Any], wanted: Mapping[str, int], replication_factor: int, timeout: float = 30.0,
    *, admin_factory: Callable[[dict[str, Any]], Any] = AdminClient,
) -> set[str]:
    """Create the topics of ``wanted`` (name -> partitions) in one request and wait until metadata shows them;
    returns those created (the others already existed).

    ``replication_factor`` 0 (AUTO_REPLICATION) takes :func:`auto_replication` of the brokers the
    cluster lists; -1 leaves it to the broker's ``default.replication.factor``.
    ``admin_factory`` builds the admin client (tests pass an in-memory fake). Everything together takes at
    most ``timeout`` seconds. Errors (naming the topic): KafkaUnavailable when trying again may help (no
    broker, no answer, a retriable refusal, metadata slow to show it), Mtc75Error otherwise.
    """
    deadline = time.monotonic() + timeout

    def left(cap: float = timeout) -> float:
        return max(0.01, min(cap, deadline - time.monotonic()))

    admin = new_client(admin_factory, conf, "librdkafka admin")
    bootstrap = str(conf.get("bootstrap.servers"))
    cluster = fetch_metadata(admin, bootstrap, timeout=left(METADATA_TIMEOUT))
    if replication_factor == AUTO_REPLICATION:
        replication_factor = auto_replication(len(cluster.brokers))
    futures = admin.create_topics(
        [NewTopic(topic, num_partitions=count, replication_factor=replication_factor)
         for topic, count in wanted.items()],
        operation_timeout=left(), request_timeout=left(),
    )
    created: set[str] = set()
    for topic in wanted:
        try:
            futures[topic].result(timeout=left())
            created.add(topic)
        except TimeoutError:
            raise KafkaUnavailable(f"cannot create topic {topic!r}: no answer within {timeout:.0f}s") from None
        except KafkaException as err:
            kerr: KafkaError = err.args[0]
            if kerr.code() != KafkaError.TOPIC_ALREADY_EXISTS:
                kind = KafkaUnavailable if kerr.retriable() or kerr.code() in CREATE_TRANSIENT else Mtc75Error
                raise kind(f"cannot create topic {topic!r}: {kerr.str()}") from None
    waiting = dict(wanted)
    while True:
        one = next(iter(waiting)) if len(waiting) == 1 else None  # several: the whole list, in one request
        shown = fetch_metadata(admin, bootstrap, one, timeout=left(METADATA_TIMEOUT)).topics
        for topic, count in list(waiting.items()):
            info = shown.get(topic)
            if info is None or info.error is not None or not info.partitions:
                continue
            if topic in created and len(info.partitions) != count:
                continue  # its partitions are still being created
            if topic not in created and len(info.partitions) != count:
                logger.warning("topic %s already has %d partitions, not %d", topic, len(info.partitions), count)
            del waiting[topic]
        if not waiting:
            return created
        if time.monotonic() >= deadline:
            names = ", ".join(repr(t) for t in waiting)
            raise KafkaUnavailable(f"topic {names} was created but did not appear in metadata within "
                                   f"{timeout:.0f}s")
        time.sleep(0.05)  # metadata propagation on the broker: short, bounded by the deadline


def replica_counts(conf: Mapping[str, Any], topic: str) -> tuple[int, int]:
    """``(partitions, replicas of each)`` of an existing topic, as the cluster reports them."""
    admin = AdminClient(dict(conf))
    info = fetch_metadata(admin, str(conf.get("bootstrap.servers")), topic).topics.get(topic)
    if info is None or info.error is not None or not info.partitions:
        raise TopicNotFound(f"topic {topic!r} does not exist on {conf.get('bootstrap.servers')}")
    return len(info.partitions), min(len(p.replicas) for p in info.partitions.values())
