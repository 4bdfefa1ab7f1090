"""Start-up: the one place a run's parts are built and wired -- clients, dispatcher, checkpoint, assignments.

:func:`assemble` builds the Kafka consumer with this run's fetch sizes, checks that the cluster answers and
every named topic exists (one line naming the missing ones when not; a pattern needs none), learns the topics'
ids, makes sure each ``<topic>.dlq`` exists (ON_FAILURE dlq; a topic that appears later gets its own before its
first dead letter), and wires the parts the engine's poll loop drives. PROCESSING_GUARANTEE picks the
checkpoint and where handlers' output records go: ``at_least_once`` the plain
:class:`~mtc75.engine.checkpoint.OffsetCheckpoint` and an :class:`~mtc75.kafka.outputs.OutputProducer`;
``exactly_once`` the :class:`~mtc75.engine.transactions.TransactionalCheckpoint` for both (its producer's
transactions started before the group is joined, so a predecessor's open transaction is ended first). Every
client is built through the run's
:class:`~mtc75.kafka.clients.ClientFactories` (tests pass in-memory fakes) and
:func:`~mtc75.kafka.clients.new_client` (a property librdkafka refuses is one ConfigError line). The watch
and the dead-letter producer reach the cluster the consumer reaches: they get its connection properties.

Threads: the poll thread, before the poll loop starts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError

from mtc75.core.batching import BatchScheduler
from mtc75.core.fetchsize import choose, fixed
from mtc75.core.gate import PauseGate
from mtc75.core.offsetmap import map_capacity
from mtc75.core.ordering import new_scheduler
from mtc75.core.retry import RetryPolicy
from mtc75.core.subscription import DEAD_LETTER_SUFFIX, Subscription
from mtc75.engine.assignments import Assignments, revoke_wait
from mtc75.engine.backpressure import Backpressure
from mtc75.engine.checkpoint import OffsetCheckpoint
from mtc75.engine.failure import DeadLetterPolicy, StopPolicy
from mtc75.engine.faults import Faults
from mtc75.engine.ledger import Ledger
from mtc75.engine.topicguard import TopicGuard
from mtc75.engine.transactions import TransactionalCheckpoint, TransactionalDeadLetters, transactional_config
from mtc75.errors import ConfigError, Mtc75Error
from mtc75.kafka.client import KafkaClient, Relay, ResetLog, is_incremental
from mtc75.kafka.clients import ClientFactories, new_client
from mtc75.kafka.deadletter import DeadLetterProducer, DeadLetterTopics
from mtc75.kafka.fetchprobe import probe
from mtc75.kafka.outputs import OutputProducer
from mtc75.kafka.topics import METADATA_TIMEOUT, require_topics
from mtc75.kafka.topicwatch import TopicWatch
from mtc75.runtime.dispatcher import Dispatcher
from mtc75.runtime.invoker import Invoker
from mtc75.settings import AUTO, Settings

logger = logging.getLogger(__name__)

# -X properties that describe the connection, so the other clients reach the same cluster.
CONNECTION_PREFIXES = ("security.", "sasl.", "ssl.", "client.", "socket.", "broker.address.")


def consumer_conf(
    settings: Settings, overrides: Mapping[str, Any], factories: ClientFactories
) -> tuple[dict[str, Any], str, str]:
    """The consumer's config with this run's fetch sizes, which they are, and why: the user's, FETCH_SIZES',
    or a probe's choice (FETCH_SIZES="auto": one short fetch of the topic, :mod:`mtc75.kafka.fetchprobe`)."""
    conf = settings.consumer_config(overrides)
    if settings.user_fetch_sizes(overrides):
        reason = (f"fetch.max.bytes={conf['fetch.max.bytes']}, "
                  f"max.partition.fetch.bytes={conf['max.partition.fetch.bytes']}")
        return conf, "set by the user", reason
    choice = choose(probe(factories, conf, subscribed(conf, settings))) if settings.FETCH_SIZES == AUTO else fixed(
        settings.FETCH_SIZES)
    return settings.consumer_config(overrides, choice.sizes), str(choice.sizes), choice.reason


def subscribed(conf: Mapping[str, Any], settings: Settings) -> Subscription:
    """TOPIC as the consumer sees it: what ``topic.blacklist`` leaves out, patterns do not match."""
    blacklist = conf.get("topic.blacklist")
    return Subscription.of(settings.TOPIC, str(blacklist) if blacklist is not None else None)


def connection(conf: Mapping[str, Any]) -> dict[str, Any]:
    """The consumer properties that say how to reach the cluster, for the other clients."""
    return {k: v for k, v in conf.items() if k.startswith(CONNECTION_PREFIXES) and k not in ("logger", "error_cb")}


def open_watch(settings: Settings, conf: Mapping[str, Any], factories: ClientFactories,
               topics: list[str]) -> TopicWatch:
    """The topic-id watch, with the ids of the named ``topics`` as they are now (a re-created topic is noticed
    later; the others join when first assigned). It builds its admin clients itself: a fresh one after a check
    that got no answer (a dead node it kept asking)."""
    admin_conf = settings.admin_config(connection(conf))
    watch = TopicWatch(lambda: new_client(factories.admin, admin_conf, "librdkafka admin"), topics)
    watch.start(METADATA_TIMEOUT)
    return watch


def open_dead_letters(
    settings: Settings, conf: Mapping[str, Any], factories: ClientFactories, partitions: Mapping[str, int],
    on_error: Callable[[KafkaError], None],
) -> DeadLetterProducer:
    """The dead-letter producer, with the ``<topic>.dlq`` of every topic consumed now made sure to exist before
    any message can need it (the others' before their first dead letter)."""
    link = connection(conf)
    topics = DeadLetterTopics(settings.admin_config(link), settings.REPLICATION_FACTOR, factories)
    letters = DeadLetterProducer(settings.producer_config(link), settings.RETRY_BACKOFF_MAX or 1.0, on_error,
                                 factories=factories, topics=topics)
    letters.check_config()
    topics.ensure(partitions)
    return letters


def open_outputs(settings: Settings, conf: Mapping[str, Any], factories: ClientFactories, ledger: Ledger,
                 wiring: Wiring) -> OutputProducer:
    """At least once: the producer of handlers' output records (built once now, so a property it refuses is
    a start-up error; it connects at the first record)."""

    def given_up(work: Any, error: Mtc75Error) -> None:
        ledger.abandon([work])  # the commit stays below it
        wiring.fail(error)

    outputs = OutputProducer(settings.producer_config(connection(conf)), settings.RETRY_BACKOFF_MAX or 1.0,
                             given_up, wiring.faults.on_error, factories=factories)
    outputs.check()
    return outputs


def open_transactions(settings: Settings, conf: Mapping[str, Any], factories: ClientFactories,
                      client: KafkaClient, wiring: Wiring, guard: Relay, rewind: Relay,
                      keep: tuple[str, ...]) -> TransactionalCheckpoint:
    """Exactly once: the transactional producer and its checkpoint (transactions start later: ``start()``)."""
    isolation = str(conf.get("isolation.level", "read_committed")).lower()
    if isolation != "read_committed":
        raise ConfigError(f"isolation.level={isolation} with PROCESSING_GUARANTEE=exactly_once: the input would "
                          "include records of aborted transactions; use read_committed (the default)")
    capacity = map_capacity()
    if settings.offset_window() > capacity - 500:
        raise ConfigError(f"OFFSET_WINDOW={settings.offset_window()} with PROCESSING_GUARANTEE=exactly_once: the "
                          f"offset map must always fit the commit, so at most {capacity - 500} (0: the default)")
    pconf = transactional_config(settings.producer_config(connection(conf)), settings.GROUP_ID, conf)
    # Fatal errors are the checkpoint's (it replaces the producer or halts), others the engine's.
    forward = pconf.pop("error_cb", wiring.faults.on_error)
    new_client(factories.producer, pconf, "transactional producer")  # a refused property: a start-up error
    logger.info("exactly_once: transactional.id %s", pconf["transactional.id"])

    def new_producer(error_cb: Callable[[KafkaError], None]) -> Any:
        return new_client(factories.producer, {**pconf, "error_cb": error_cb}, "transactional producer")

    shared_id = "group.instance.id" in conf or "transactional.id" in settings.PRODUCER_CONFIG
    return TransactionalCheckpoint(client, wiring.ledger.tracker, settings.COMMIT_INTERVAL, new_producer, forward,
                                   guard, wiring.halt, rewind, float(pconf["transaction.timeout.ms"]) / 1000.0,
                                   shared_id, keep=keep)


def say_subscription(subscription: Subscription, found: Mapping[str, int], conf: Mapping[str, Any]) -> None:
    """What each pattern matches now (nothing yet is not an error), and the dead-letter topics it would match."""
    refresh = float(conf.get("topic.metadata.refresh.interval.ms", 300_000)) / 1000
    for pattern in subscription.patterns:
        matched = sorted(t for t in found if subscription.matching(t) == pattern and not subscription.named(t))
        if matched:
            logger.info("pattern %s matches %d topics now: %s", pattern, len(matched), ", ".join(matched))
        else:
            logger.info("pattern %s matches no topic yet: a topic created later that matches is consumed once "
                        "librdkafka's metadata shows it (topic.metadata.refresh.interval.ms, %.0fs)", pattern, refresh)
    dead = sorted(t for t in found if t.endswith(DEAD_LETTER_SUFFIX) and not subscription.named(t))
    if dead:
        logger.warning("the subscription %s matches dead-letter topics (%s): their records are consumed too",
                       subscription.describe(), ", ".join(dead))


@dataclass(frozen=True)
class Parts:
    """What the poll loop drives, built once per run."""

    client: KafkaClient
    dispatcher: Dispatcher
    backpressure: Backpressure
    checkpoint: OffsetCheckpoint | TransactionalCheckpoint
    assignments: Assignments
    fetch_sizes: str  # which fetch sizes the run uses, for the summary


@dataclass(frozen=True)
class Wiring:
    """What the engine hands start-up: its own parts and its callbacks."""

    invoker: Invoker
    threads: int  # the permits the dispatcher starts with
    ledger: Ledger
    gate: PauseGate
    faults: Faults
    halt: Callable[[Mtc75Error], None]  # stop at once, commit nothing
    fail: Callable[[Mtc75Error], None]  # end the run with this error, committing what is safe
    on_first_assignment: Callable[[], None]


def assemble(settings: Settings, overrides: Mapping[str, Any], factories: ClientFactories, wiring: Wiring,
             parts: Callable[[Parts], None]) -> None:
    """Build the run's parts and subscribe. ``parts`` gets them as soon as they exist (before the topic
    check), so that shutdown can close what was built even when start-up fails."""
    faults, ledger = wiring.faults, wiring.ledger
    retry = RetryPolicy(settings.MAX_ATTEMPTS, settings.RETRY_BACKOFF, settings.RETRY_BACKOFF_MAX)
    scheduler = BatchScheduler(settings.ORDERING, settings.BATCH_SIZE, settings.BATCH_WAIT) \
        if wiring.invoker.batches else new_scheduler(settings.ORDERING)
    # First: RUNNER="processes" starts its worker processes here, and a handler they cannot load is refused
    # before anything connects (the fetch-size probe included).
    dispatcher = Dispatcher(wiring.invoker, wiring.threads, retry, scheduler=scheduler, failure_hook=ledger.hook)
    ledger.batching = wiring.invoker.batches
    dispatcher.limit_rates(settings.MAX_RATE, settings.KEY_RATE, settings.RATE_BURST)
    try:
        conf, fetch_sizes, reason = consumer_conf(settings, overrides, factories)
        conf.setdefault("error_cb", faults.on_error)
        conf["on_commit"] = on_commit = Relay()  # the checkpoint, once it exists
        log = conf["logger"] = ResetLog(conf.get("logger"))  # librdkafka's log, watched for offset resets
        consumer = new_client(factories.consumer, conf, "librdkafka consumer")
    except BaseException:
        dispatcher.shutdown(wait=False)  # no parts yet for the engine's shutdown: stop the runner here
        raise
    subscription = subscribed(conf, settings)
    client = faults.client = KafkaClient(consumer, subscription, cooperative=is_incremental(conf), log=log)
    backpressure = Backpressure(client, ledger.tracker, dispatcher, wiring.gate, settings.offset_window())
    guard = Relay()  # the topic guard, once the watch exists
    rewind = Relay()  # the assignments' rewind, once they exist
    exactly_once = settings.PROCESSING_GUARANTEE == "exactly_once"
    checkpoint: OffsetCheckpoint | TransactionalCheckpoint
    if exactly_once:
        checkpoint = ledger.outputs = open_transactions(settings, conf, factories, client, wiring, guard, rewind,
                                                            subscription.names)
    else:
        checkpoint = OffsetCheckpoint(client, ledger.tracker, settings.COMMIT_INTERVAL, faults.is_fatal, guard,
                                      keep=subscription.names)
        ledger.outputs = open_outputs(settings, conf, factories, ledger, wiring)
    on_commit.to = checkpoint.on_commit
    assignments = Assignments(client, ledger, dispatcher, backpressure, checkpoint,
                              revoke_wait(settings.REVOKE_TIMEOUT, conf), wiring.on_first_assignment)
    rewind.to = assignments.rewind
    parts(Parts(client, dispatcher, backpressure, checkpoint, assignments, fetch_sizes))
    found = require_topics(consumer, settings.BOOTSTRAP_SERVERS, subscription)
    say_subscription(subscription, found, conf)
    watch = checkpoint.watch = open_watch(settings, conf, factories, list(subscription.names))
    where = str(conf.get("auto.offset.reset", "earliest")).lower()
    topic_guard = TopicGuard(watch, subscription, assignments.reset, where, wiring.halt, wiring.fail)
    guard.to, faults.guarded, faults.expected = topic_guard.changed, topic_guard.decides, topic_guard.expected
    assignments.reset_to = where
    if settings.ON_FAILURE == "dlq":
        letters = open_dead_letters(settings, conf, factories, found, faults.on_error)
        ledger.failure = (TransactionalDeadLetters(checkpoint, letters.topics)
                          if isinstance(checkpoint, TransactionalCheckpoint)
                          else DeadLetterPolicy(letters, ledger.tracker, wiring.fail))
    elif settings.ON_FAILURE == "stop":
        ledger.failure = StopPolicy(ledger.tracker, wiring.fail)
    if isinstance(checkpoint, TransactionalCheckpoint):
        checkpoint.start()  # fences this member's predecessor and ends its open transaction, before the join
        assignments.strict_maps = True  # finished work run again would write its outputs twice
        assignments.committed_timeout = checkpoint.committed_timeout
    faults.checked = True
    logger.info("fetch sizes %s: %s", fetch_sizes, reason)
    client.subscribe(assignments.on_assign, assignments.on_revoke, assignments.on_lost)
    processes = wiring.invoker.processes
    logger.info(
        "consuming %s as group %s with %s %s%s (pause interval %.2fs, %s assignment)",
        subscription.describe(), settings.GROUP_ID, settings.MAX_THREAD_COUNT, dispatcher.workers,
        f" in flight in {processes} worker processes" if processes else "",
        settings.PAUSE_INTERVAL, "incremental" if is_incremental(conf) else "eager",
    )
