"""Start-up: the one place a run's parts are built and wired -- clients, dispatcher, checkpoint, assignments.

:func:`assemble` builds the Kafka consumer with this run's fetch sizes, checks that the cluster answers and
the topic exists (one line when not), learns the topic's id, makes sure ``<topic>.dlq`` exists (ON_FAILURE
dlq), and wires the parts the engine's poll loop drives. PROCESSING_GUARANTEE picks the checkpoint and where
handlers' output records go: ``at_least_once`` the plain :class:`~mtc75.engine.checkpoint.OffsetCheckpoint` and
an :class:`~mtc75.kafka.outputs.OutputProducer`; ``exactly_once`` the
:class:`~mtc75.engine.transactions.TransactionalCheckpoint` for both (its producer's transactions started
before the group is joined, so a predecessor's open transaction is ended first). Every client is built through the run's
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
from mtc75.kafka.deadletter import DeadLetterProducer
from mtc75.kafka.fetchprobe import probe
from mtc75.kafka.outputs import OutputProducer
from mtc75.kafka.topics import METADATA_TIMEOUT, require_topic
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
    choice = choose(probe(factories, conf, settings.TOPIC)) if settings.FETCH_SIZES == AUTO else fixed(
        settings.FETCH_SIZES)
    return settings.consumer_config(overrides, choice.sizes), str(choice.sizes), choice.reason


def connection(conf: Mapping[str, Any]) -> dict[str, Any]:
    """The consumer properties that say how to reach the cluster, for the other clients."""
    return {k: v for k, v in conf.items() if k.startswith(CONNECTION_PREFIXES) and k not in ("logger", "error_cb")}


def open_watch(settings: Settings, conf: Mapping[str, Any], factories: ClientFactories) -> TopicWatch:
    """The topic-id watch, with the id of the topic as it is now (a re-created topic is noticed later). It builds
    its admin clients itself: a fresh one after a check that got no answer (a dead node it kept asking)."""
    admin_conf = settings.admin_config(connection(conf))
    watch = TopicWatch(lambda: new_client(factories.admin, admin_conf, "librdkafka admin"), settings.TOPIC)
    watch.start(METADATA_TIMEOUT)
    return watch


def open_dead_letters(
    settings: Settings, conf: Mapping[str, Any], factories: ClientFactories, partitions: int,
    on_error: Callable[[KafkaError], None],
) -> DeadLetterProducer:
    """The dead-letter producer, with ``<topic>.dlq`` made sure to exist before any message can need it."""
    link = connection(conf)
    letters = DeadLetterProducer(
        settings.producer_config(link), settings.TOPIC, settings.RETRY_BACKOFF_MAX or 1.0, on_error,
        factories=factories,
    )
    letters.ensure_topic(partitions, settings.REPLICATION_FACTOR, settings.admin_config(link))
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
                      client: KafkaClient, wiring: Wiring, guard: Relay, rewind: Relay) -> TransactionalCheckpoint:
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
                                   shared_id)


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
    client = faults.client = KafkaClient(consumer, settings.TOPIC, cooperative=is_incremental(conf), log=log)
    backpressure = Backpressure(client, ledger.tracker, dispatcher, wiring.gate, settings.offset_window())
    guard = Relay()  # the topic guard, once the watch exists
    rewind = Relay()  # the assignments' rewind, once they exist
    exactly_once = settings.PROCESSING_GUARANTEE == "exactly_once"
    checkpoint: OffsetCheckpoint | TransactionalCheckpoint
    if exactly_once:
        checkpoint = ledger.outputs = open_transactions(settings, conf, factories, client, wiring, guard, rewind)
    else:
        checkpoint = OffsetCheckpoint(client, ledger.tracker, settings.COMMIT_INTERVAL, faults.is_fatal, guard)
        ledger.outputs = open_outputs(settings, conf, factories, ledger, wiring)
    on_commit.to = checkpoint.on_commit
    assignments = Assignments(client, ledger, dispatcher, backpressure, checkpoint,
                              revoke_wait(settings.REVOKE_TIMEOUT, conf), wiring.on_first_assignment)
    rewind.to = assignments.rewind
    parts(Parts(client, dispatcher, backpressure, checkpoint, assignments, fetch_sizes))
    partitions = require_topic(consumer, settings.BOOTSTRAP_SERVERS, settings.TOPIC)
    watch = checkpoint.watch = open_watch(settings, conf, factories)
    faults.watching = lambda: watch.enabled
    where = str(conf.get("auto.offset.reset", "earliest")).lower()
    guard.to = TopicGuard(watch, assignments.reset, where, wiring.halt).changed
    assignments.reset_to = where
    if settings.ON_FAILURE == "dlq":
        letters = open_dead_letters(settings, conf, factories, partitions, faults.on_error)
        ledger.failure = (TransactionalDeadLetters(checkpoint, letters.topic)
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
        settings.TOPIC, settings.GROUP_ID, settings.MAX_THREAD_COUNT, dispatcher.workers,
        f" in flight in {processes} worker processes" if processes else "",
        settings.PAUSE_INTERVAL, "incremental" if is_incremental(conf) else "eager",
    )
