"""Every tunable in one frozen, validated object, and the one place that builds librdkafka dicts.

A setting ``X`` comes, lowest precedence first, from its default here, then ``config.py``, then the
environment variable ``MTC75_X`` (the broker address also from ``KAFKA_BOOTSTRAP_SERVERS``), then the
command-line flag ``--x-with-dashes`` of the script that uses it. librdkafka properties come from
``CONSUMER_CONFIG`` / ``PRODUCER_CONFIG`` and then ``-X key=value`` flags, applied last.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import runpy
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from mtc75.core.fetchsize import FETCH_SIZE_MODES, NAMED, SMALL, FetchSizes
from mtc75.core.offsetmap import default_window
from mtc75.core.ordering import ORDERINGS
from mtc75.core.retry import FAILURE_MODES
from mtc75.core.subscription import (
    DEAD_LETTER_EXCLUSION,
    DEAD_LETTER_SUFFIX,
    INTERNAL_EXCLUSION,
    INTERNAL_PREFIX,
    Subscription,
    as_setting,
    parse_topics,
)
from mtc75.errors import ConfigError

ENV_PREFIX = "MTC75_"
# librdkafka logs through this logger instead of raw stderr; scripts show it only with -vv (-v: debug).
LIBRDKAFKA_LOGGER = logging.getLogger("mtc75.librdkafka")
OFFSET_RESETS = ("earliest", "latest", "error")
GUARANTEES = ("at_least_once", "exactly_once")  # PROCESSING_GUARANTEE (docs/outputs.md)
AUTO = "auto"  # MAX_THREAD_COUNT = "auto"
FORMATS = ("bytes", "str", "json")  # KEY_FORMAT / VALUE_FORMAT: mtc75/kafka/deserializers.py BUILT_INS
RUNNERS = ("threads", "processes")  # RUNNER: where a plain handler runs
GROUP_TYPES = ("consumer", "share")  # GROUP_TYPE: a consumer group (partitions) or a share group (KIP-932)
SHARE_POLL_RECORDS = 500  # Kafka's max.poll.records default: the fewest records a share poll asks for


@dataclass(frozen=True)
class Spec:
    """How one setting is parsed, checked and explained."""

    name: str
    kind: type
    help: str
    minimum: float | None = None
    choices: tuple[str, ...] = ()
    positive: bool = False  # strictly greater than ``minimum``
    auto: bool = False  # also accepts the word "auto" (MAX_THREAD_COUNT: the count is tuned while running)


def _spec(kind: type, help: str, **kw: Any) -> dict[str, Any]:
    return {"metadata": {"kind": kind, "help": help, **kw}}


@dataclass(frozen=True)
class Settings:
    """The validated settings of one run. Build it with :func:`load_settings` or ``Settings().replace(...)``."""

    BOOTSTRAP_SERVERS: str = field(default="127.0.0.1:9092", **_spec(str, "Kafka bootstrap servers"))
    TOPIC: str | tuple[str, ...] = field(
        default="mtc75-demo",
        **_spec(tuple, "topic to consume (and produce to): a name; several (a list, comma-separated, or the flag "
                "repeated); or a pattern starting with ^ (librdkafka's regex, e.g. ^orders-.*: topics created "
                "later that match are consumed too); the producer and create-topic take one name"),
    )
    NUM_PARTITIONS: int = field(default=6, **_spec(int, "partitions create_topic.py creates", minimum=1))
    REPLICATION_FACTOR: int = field(
        default=0,
        **_spec(int, "replicas create_topic.py asks for (0 = one per broker, at most 3; -1 = broker default)",
                minimum=-1),
    )
    GROUP_ID: str = field(default="mtc75-consumer", **_spec(str, "consumer group id"))
    GROUP_TYPE: str = field(
        default="consumer",
        **_spec(str, "consumer (a consumer group: each partition read by one member, in order) or share (a share "
                "group, Kafka 4.2+: every member takes records of every partition, each acknowledged on its own)",
                choices=GROUP_TYPES),
    )
    MAX_THREAD_COUNT: int | str = field(
        default=75,
        **_spec(int, 'worker threads = semaphore permits, or "auto": tuned while running between MIN_THREAD_COUNT '
                "and MAX_THREAD_LIMIT", minimum=1, auto=True),
    )
    MIN_THREAD_COUNT: int = field(
        default=1, **_spec(int, 'fewest threads MAX_THREAD_COUNT="auto" uses (and where it starts)', minimum=1)
    )
    MAX_THREAD_LIMIT: int = field(
        default=256, **_spec(int, 'most threads MAX_THREAD_COUNT="auto" may use', minimum=1)
    )
    PAUSE_INTERVAL: float = field(
        default=0.5,
        **_spec(float, "seconds a saturated consumer stays paused before re-checking", minimum=0, positive=True),
    )
    PROCESSING_SLEEP: float = field(
        default=0.5, **_spec(float, "seconds of simulated work per message (default handler)", minimum=0)
    )
    PRODUCER_SLEEP: float = field(
        default=0.0, **_spec(float, "seconds between produced messages (0 = as fast as possible)", minimum=0)
    )
    PRODUCER_RATE: float = field(
        default=0.0, **_spec(float, "messages per second the producer sends (0 = use PRODUCER_SLEEP)", minimum=0)
    )
    PRODUCER_MESSAGE_COUNT: int = field(
        default=10_000, **_spec(int, "messages producer.py sends (0 = until Ctrl-C)", minimum=0)
    )
    AUTO_OFFSET_RESET: str = field(
        default="earliest", **_spec(str, "where a new group starts reading", choices=OFFSET_RESETS)
    )
    MAX_BACKLOG: int = field(
        default=5_000,
        **_spec(int, "most fetched messages held waiting for a free thread", minimum=1),
    )
    OFFSET_WINDOW: int = field(
        default=0,
        **_spec(int, "most offsets between a partition's oldest unfinished message and its next one before that "
                "partition alone is paused (0 = 2 x MAX_BACKLOG, capped so the offset map fits)", minimum=0),
    )
    COMMIT_INTERVAL: float = field(
        default=0.5, **_spec(float, "seconds between commits of completed offsets", minimum=0, positive=True)
    )
    REVOKE_TIMEOUT: float = field(
        default=10.0, **_spec(float, "seconds a rebalance waits for in-flight handlers", minimum=0)
    )
    SHUTDOWN_TIMEOUT: float = field(
        default=30.0, **_spec(float, "seconds shutdown waits for in-flight handlers", minimum=0)
    )
    MAX_ATTEMPTS: int = field(
        default=3, **_spec(int, "tries per message before ON_FAILURE applies", minimum=1)
    )
    RETRY_BACKOFF: float = field(
        default=0.5, **_spec(float, "seconds before the first retry; doubles per attempt, jittered", minimum=0)
    )
    RETRY_BACKOFF_MAX: float = field(
        default=10.0, **_spec(float, "longest wait between two attempts, in seconds", minimum=0)
    )
    ON_FAILURE: str = field(
        default="dlq",
        **_spec(str, "after the last attempt: dlq (publish to <topic>.dlq), skip, or stop", choices=FAILURE_MODES),
    )
    PROCESSING_GUARANTEE: str = field(
        default="at_least_once",
        **_spec(str, "at_least_once (commit what finished; outputs confirmed first) or exactly_once (outputs and "
                "offsets committed in one Kafka transaction per commit interval; readers use read_committed)",
                choices=GUARANTEES),
    )
    ORDERING: str = field(
        default="unordered",
        **_spec(str, "unordered (any message when a thread is free), partition (one at a time per partition, "
                "in offset order) or key (one at a time per key, in offset order; keyless: each its own key)",
                choices=ORDERINGS),
    )
    MAX_RATE: float = field(
        default=0.0,
        **_spec(float, "most messages per second this consumer starts (0 = no limit); a retry counts again",
                minimum=0),
    )
    KEY_RATE: float = field(
        default=0.0,
        **_spec(float, "most messages per second started per key (0 = no limit); keyless messages are not limited "
                "by it", minimum=0),
    )
    RATE_BURST: float = field(
        default=0.1,
        **_spec(float, "seconds of MAX_RATE / KEY_RATE that may start at once after an idle spell: a bucket holds "
                "max(1, rate x RATE_BURST) messages", minimum=0),
    )
    BATCH_SIZE: int = field(
        default=1,
        **_spec(int, "most messages per handler call: above 1 the handler gets a list of one partition's messages "
                "in offset order (a batch handler)", minimum=1),
    )
    BATCH_WAIT: float = field(
        default=0.05,
        **_spec(float, "most seconds a batch waits to fill while messages arrive (BATCH_SIZE > 1)", minimum=0),
    )
    RUNNER: str = field(
        default="threads",
        **_spec(str, "where a plain handler runs: threads, or processes (PROCESS_COUNT worker processes, for handlers "
                "that compute in Python; MAX_THREAD_COUNT still bounds the messages in flight); async def "
                "handlers always run on the event loop", choices=RUNNERS),
    )
    PROCESS_COUNT: int = field(
        default=0, **_spec(int, 'worker processes of RUNNER="processes" (0 = one per core)', minimum=0)
    )
    FETCH_SIZES: str = field(
        default="auto",
        **_spec(str, "fetch.max.bytes / max.partition.fetch.bytes: auto (chosen at start-up from a short probe of "
                "the topic: large when uncompressed, small when compressed), small (2 MB / 512 KB) or large "
                "(50 MB / 1 MB); librdkafka properties set by the user win", choices=FETCH_SIZE_MODES),
    )
    KEY_FORMAT: str = field(
        default="bytes",
        **_spec(str, "what the handler's message.key() returns: bytes (as fetched), str (UTF-8) or json; a key "
                "that does not decode fails its message at once (ON_FAILURE, not retried)", choices=FORMATS),
    )
    VALUE_FORMAT: str = field(
        default="bytes",
        **_spec(str, "what the handler's message.value() returns: bytes (as fetched), str (UTF-8) or json; a "
                "value that does not decode fails its message at once (ON_FAILURE, not retried)", choices=FORMATS),
    )
    MAX_PAYLOAD_BYTES: int = field(
        default=100_000, **_spec(int, "larger payloads are rejected by the default handler", minimum=1)
    )
    BROKER_DOWN_TIMEOUT: float = field(
        default=60.0,
        **_spec(float, "seconds without any reachable broker before the consumer gives up", minimum=0, positive=True),
    )
    CONSUMER_CONFIG: Mapping[str, str] = field(
        default_factory=lambda: MappingProxyType({}), **_spec(dict, "extra librdkafka consumer properties")
    )
    PRODUCER_CONFIG: Mapping[str, str] = field(
        default_factory=lambda: MappingProxyType({}), **_spec(dict, "extra librdkafka producer properties")
    )

    def __post_init__(self) -> None:
        if self.MIN_THREAD_COUNT > self.MAX_THREAD_LIMIT:
            raise ConfigError(
                f"invalid MIN_THREAD_COUNT={self.MIN_THREAD_COUNT}: must be <= MAX_THREAD_LIMIT={self.MAX_THREAD_LIMIT}"
            )
        if self.GROUP_TYPE == "share" and self.ORDERING != "unordered":
            raise ConfigError(f"invalid ORDERING={self.ORDERING!r} with GROUP_TYPE='share': share groups give no order")
        if self.GROUP_TYPE == "share" and self.AUTO_OFFSET_RESET == "error":
            raise ConfigError("invalid AUTO_OFFSET_RESET='error' with GROUP_TYPE='share': a share group starts at "
                              "earliest or latest")
        if self.GROUP_TYPE == "share" and self.PROCESSING_GUARANTEE == "exactly_once":
            raise ConfigError("invalid PROCESSING_GUARANTEE='exactly_once' with GROUP_TYPE='share': a share group's "
                              "acknowledgements cannot join a Kafka transaction; use at_least_once")
        if self.GROUP_TYPE == "share" and self.subscription.patterns:
            raise ConfigError(f"invalid TOPIC={self.subscription.describe()!r} with GROUP_TYPE='share': a share group "
                              "subscribes to named topics (one or several), not to a pattern")
        if self.GROUP_TYPE == "share" and self.BATCH_SIZE > 1:
            raise ConfigError(f"invalid BATCH_SIZE={self.BATCH_SIZE} with GROUP_TYPE='share': a share member handles "
                              "records one by one (each acknowledged on its own); use BATCH_SIZE=1")

    @property
    def subscription(self) -> Subscription:
        """TOPIC's names and patterns (:mod:`mtc75.core.subscription`)."""
        return Subscription.of(self.TOPIC)

    def one_topic(self, who: str) -> str:
        """TOPIC as one topic name, for ``who`` (the producer, create-topic); ConfigError when it is not one."""
        name = self.subscription.single()
        if name is None:
            raise ConfigError(f"{who} takes one topic name; TOPIC is {self.subscription.describe()!r}")
        return name

    @property
    def auto_threads(self) -> bool:
        """MAX_THREAD_COUNT = "auto": the thread count is tuned while running (mtc75.engine.autothreads)."""
        return self.MAX_THREAD_COUNT == AUTO

    def initial_threads(self) -> int:
        """The permit count a run starts with: MAX_THREAD_COUNT, or MIN_THREAD_COUNT under "auto"."""
        return self.MIN_THREAD_COUNT if self.MAX_THREAD_COUNT == AUTO else int(self.MAX_THREAD_COUNT)

    def worker_processes(self) -> int:
        """Worker processes to run the handler in: PROCESS_COUNT (0: one per core) under RUNNER="processes",
        else 0 (threads)."""
        if self.RUNNER != "processes":
            return 0
        if self.PROCESS_COUNT:
            return self.PROCESS_COUNT
        try:
            return len(os.sched_getaffinity(0)) or 1
        except AttributeError:  # not on Linux
            return os.cpu_count() or 1

    def offset_window(self) -> int:
        """OFFSET_WINDOW, or its default: offsetmap.default_window(MAX_BACKLOG) (10,000 for 5,000)."""
        return self.OFFSET_WINDOW or default_window(self.MAX_BACKLOG)

    def replace(self, **changes: Any) -> Settings:
        """A validated copy with ``changes`` applied (used by tests and the demo)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, raw in changes.items():
            if name not in values:
                raise ConfigError(f"unknown setting {name}")
            values[name] = coerce(SPECS[name], raw, "replace()")
        return Settings(**values)

    def user_fetch_sizes(self, overrides: Mapping[str, str] = MappingProxyType({})) -> bool:
        """The user set fetch.max.bytes or max.partition.fetch.bytes (CONSUMER_CONFIG or ``-X``): no probe."""
        return any(key in source for key in SMALL.conf() for source in (self.CONSUMER_CONFIG, overrides))

    def consumer_config(
        self, overrides: Mapping[str, str] = MappingProxyType({}), fetch: FetchSizes | None = None,
    ) -> dict[str, Any]:
        """The librdkafka consumer dict: our required properties, then CONSUMER_CONFIG, then ``-X`` overrides.

        ``fetch``: the fetch sizes a probe chose (FETCH_SIZES = "auto"); None: FETCH_SIZES' own pair
        (SMALL under "auto"). Either way a fetch size the user set wins.
        """
        if fetch is None:
            fetch = NAMED.get(self.FETCH_SIZES, SMALL)
        conf: dict[str, Any] = {
            "bootstrap.servers": self.BOOTSTRAP_SERVERS,
            "logger": LIBRDKAFKA_LOGGER,
            "group.id": self.GROUP_ID,
            "auto.offset.reset": self.AUTO_OFFSET_RESET,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            # Bound what librdkafka prefetches: the engine keeps its own backlog, so a deep client
            # queue only costs memory and is dropped on every pause anyway. On librdkafka's defaults
            # (64 MB / 100,000 messages queued, 50 MB fetches) a bare loop on lz4 100 B peaked at 223 MB.
            # Over either queue bound the fetcher backs off fetch.queue.backoff.ms (1 s by default):
            # a no-op handler's completions stopped for ~0.8 s several times per run. Backoff 10 ms, the
            # count bound 30,000 (the rate of 60,000 on lz4 100 B, 20 MB less) and the byte bound 32 MB
            # (3,200 x 10 KB; the former 4 MB = 27,000 x 150 B starved the fetcher): 150 B uncompressed
            # 1.76x and 10 KB 1.43x the former 1 s / 100,000 / 4 MB, lz4 100 B 0.90x (noise: 0.64-1.34
            # per pass), at 60 / 60 / 117 MB peak RSS (make bench, median of 3 passes; BENCHMARKS.md).
            "fetch.queue.backoff.ms": 10,
            "queued.min.messages": 30_000,
            "queued.max.messages.kbytes": 32 * 1024,
            # fetch.max.bytes / max.partition.fetch.bytes bound the compressed bytes in flight, which
            # librdkafka decompresses whole: lz4 100 B peaked at 117 MB with 2 MB / 512 KB, 231 MB with
            # 50 MB / 1 MB; uncompressed 10 KB ran at 0.59 of a raw loop with the first, 1.06 with the
            # second (99 MB). So FETCH_SIZES="auto" chooses per topic at start-up (mtc75.core.fetchsize).
            **fetch.conf(),
            # A resumed partition's first fetch waits for any fetch still outstanding at the broker;
            # with the default 500 ms long-poll that idles the pool after every pause.
            "fetch.wait.max.ms": 50,
            # Partitions added to the topic are seen at the next metadata refresh: librdkafka's 5 min
            # default left them unread that long. 10 s: new partitions consumed within ~10-15 s
            # (test_faults_hardening.py), for one small metadata request per 10 s.
            "topic.metadata.refresh.interval.ms": 10_000,
        }
        conf.update(self.CONSUMER_CONFIG)
        conf.update(overrides)
        subscription = self.subscription
        if subscription.patterns and "topic.blacklist" not in conf:  # the user's topic.blacklist wins
            # A pattern would also match the dead-letter topics (^orders.* matches orders.dlq), and with dlq a
            # message failing there again goes to orders.dlq.dlq, which matches too; and Kafka's internal topics.
            # Left out of what patterns see -- unless a name of the subscription is one (it would hide it).
            names = subscription.names
            hidden = [exclusion for exclusion, wanted in (
                (DEAD_LETTER_EXCLUSION, self.ON_FAILURE == "dlq" and not any(n.endswith(DEAD_LETTER_SUFFIX)
                                                                            for n in names)),
                (INTERNAL_EXCLUSION, not any(n.startswith(INTERNAL_PREFIX) for n in names))) if wanted]
            if hidden:
                conf["topic.blacklist"] = ",".join(hidden)
        for key in ("enable.auto.commit", "enable.auto.offset.store"):
            if str(conf[key]).lower() not in ("false", "0"):
                raise ConfigError(f"{key}={conf[key]} is not supported: MTC75 commits only completed work")
        return conf

    def share_consumer_config(self, overrides: Mapping[str, str] = MappingProxyType({})) -> dict[str, Any]:
        """The librdkafka share consumer dict (GROUP_TYPE="share"): our properties, CONSUMER_CONFIG, ``-X``.

        Explicit acknowledgement: MTC75 acknowledges each record when its handler finishes. A poll asks for
        four records per thread (at least Kafka's 500), at most MAX_BACKLOG more than the threads: the broker
        may still hand out whole producer batches; the engine keeps what its threads finish within the lock.
        """
        bound = self.MAX_THREAD_LIMIT if self.auto_threads else int(self.MAX_THREAD_COUNT)
        conf: dict[str, Any] = {
            "bootstrap.servers": self.BOOTSTRAP_SERVERS,
            "logger": LIBRDKAFKA_LOGGER,
            "group.id": self.GROUP_ID,
            "share.acknowledgement.mode": "explicit",
            "max.poll.records": min(max(SHARE_POLL_RECORDS, 4 * bound), self.MAX_BACKLOG + bound),
        }
        conf.update(self.CONSUMER_CONFIG)
        conf.update(overrides)
        if str(conf["share.acknowledgement.mode"]).lower() != "explicit":
            raise ConfigError(f"share.acknowledgement.mode={conf['share.acknowledgement.mode']} is not supported: "
                              "MTC75 acknowledges each record when its handler finishes")
        return conf

    def producer_config(self, overrides: Mapping[str, str] = MappingProxyType({})) -> dict[str, Any]:
        """The librdkafka producer dict: safe defaults, then PRODUCER_CONFIG, then ``-X`` overrides."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.BOOTSTRAP_SERVERS,
            "logger": LIBRDKAFKA_LOGGER,
            # Acknowledged only once every in-sync replica has it (min.insync.replicas=2 on the 3-node
            # cluster), and retries never duplicate or reorder: the cluster test kills a leader mid-run
            # and loses none of the acknowledged records.
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 5,
        }
        conf.update(self.PRODUCER_CONFIG)
        conf.update(overrides)
        return conf

    def admin_config(self, overrides: Mapping[str, str] = MappingProxyType({})) -> dict[str, Any]:
        """The librdkafka admin dict: only the connection-level ``-X`` overrides make sense here."""
        conf: dict[str, Any] = {"bootstrap.servers": self.BOOTSTRAP_SERVERS, "logger": LIBRDKAFKA_LOGGER}
        conf.update(overrides)
        return conf


SPECS: dict[str, Spec] = {
    f.name: Spec(name=f.name, **f.metadata) for f in dataclasses.fields(Settings)
}


def flag_name(name: str) -> str:
    """``MAX_THREAD_COUNT`` -> ``--max-thread-count``."""
    return "--" + name.lower().replace("_", "-")


def coerce(spec: Spec, raw: Any, source: str) -> Any:
    """Parse and check one value; the error names the setting, the value and where it came from."""

    def bad(why: str) -> ConfigError:
        return ConfigError(f"invalid {spec.name}={raw!r} (from {source}): {why}")

    if spec.kind is tuple:  # TOPIC: names and patterns (mtc75.core.subscription)
        try:
            return as_setting(parse_topics(raw))
        except ValueError as err:
            raise bad(str(err)) from None
    if spec.kind is dict:
        if not isinstance(raw, Mapping):
            raise bad("must be a dict of librdkafka properties")
        for key in raw:
            if not isinstance(key, str):
                raise bad("property names must be strings")
        return MappingProxyType(dict(raw))
    if spec.kind is str:
        value = str(raw).strip()
        if not value:
            raise bad("must not be empty")
        if spec.choices and value not in spec.choices:
            raise bad("must be one of " + ", ".join(spec.choices))
        return value
    if spec.auto and isinstance(raw, str) and raw.strip().lower() == AUTO:
        return AUTO
    value = _number(spec.kind, raw, bad, spec.auto)
    if spec.minimum is not None:
        if spec.positive and value <= spec.minimum:
            raise bad(f"must be > {spec.minimum:g}")
        if value < spec.minimum:
            raise bad(f"must be >= {spec.minimum:g}")
    return value


def _number(kind: type, raw: Any, bad: Callable[[str], ConfigError], auto: bool = False) -> int | float:
    if isinstance(raw, bool):
        raise bad(f"must be {'an integer' if kind is int else 'a number'}")
    if kind is int:
        if isinstance(raw, int):
            return raw
        try:
            return int(str(raw).strip().replace("_", ""))
        except ValueError:
            raise bad('must be an integer or "auto"' if auto else "must be an integer") from None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise bad("must be a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise bad("must be a finite number")
    return value


MAX_CONFIG_BYTES = 1 << 20  # a settings file is a few KB; a larger one is refused, not read


def config_file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be a settings file (a directory, over MAX_CONFIG_BYTES), or None."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "not found"
    except OSError as err:
        return err.strerror or str(err)
    if stat.S_ISDIR(st.st_mode):
        return "is a directory"
    if stat.S_ISREG(st.st_mode) and st.st_size > MAX_CONFIG_BYTES:
        return f"{st.st_size} bytes, more than a settings file may have ({MAX_CONFIG_BYTES})"
    return None


def read_config_file(path: Path) -> dict[str, Any]:
    """The upper-case names of a config.py; unknown names are errors so typos do not pass silently.

    The file is Python run in this process: whatever it raises -- ``sys.exit()``, ``KeyboardInterrupt``
    included -- is a ConfigError naming it (a script exits 2), never the caller's own exit.
    """
    problem = config_file_problem(path)
    if problem is not None:
        raise ConfigError(f"config file {path}: {problem}")
    try:
        namespace = runpy.run_path(str(path))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except SyntaxError as err:
        raise ConfigError(f"{path}:{err.lineno}: syntax error: {err.msg}") from None
    except BaseException as err:  # the user's file may raise anything, sys.exit() included
        raise ConfigError(f"{path}: {describe_raise(err)} while it was read") from None
    return config_values(namespace, path)


def config_values(namespace: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """The settings among a config file's names (upper case, no leading underscore); unknown ones are errors."""
    values = {k: v for k, v in namespace.items() if k.isupper() and not k.startswith("_")}
    unknown = sorted(set(values) - set(SPECS))
    if unknown:
        raise ConfigError(f"{path}: unknown setting {unknown[0]} (known: see --help, or docs/settings.md)")
    return values


def describe_raise(err: BaseException) -> str:
    """``"raised Type: text"`` / ``"called sys.exit(code)"`` for what a config file raised; never raises."""
    if isinstance(err, SystemExit):
        return f"called sys.exit({err.code!r})"
    name = type(err).__name__
    try:
        text = str(err)
    except BaseException:  # a user's exception whose __str__ raises
        text = ""
    return f"raised {name}: {text}" if text else f"raised {name}"


def load_settings(
    config_path: Path | None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
    *,
    file_values: Mapping[str, Any] | None = None,
) -> Settings:
    """Merge defaults, config file, environment and flags (in that order) and validate each value once.

    ``file_values``: the config file's values, already read (live reload reads the file in a child
    process); ``config_path`` then only names their source.
    """
    env = os.environ if env is None else env
    raw: dict[str, tuple[Any, str]] = {}
    if config_path is not None:
        values = read_config_file(config_path) if file_values is None else file_values
        for name, value in values.items():
            raw[name] = (value, str(config_path))
    if env.get("KAFKA_BOOTSTRAP_SERVERS"):
        raw["BOOTSTRAP_SERVERS"] = (env["KAFKA_BOOTSTRAP_SERVERS"], "KAFKA_BOOTSTRAP_SERVERS")
    for name, spec in SPECS.items():
        key = ENV_PREFIX + name
        if key in env and spec.kind is not dict:
            raw[name] = (env[key], key)
    for name, value in (flags or {}).items():
        if value is not None:
            raw[name] = (value, flag_name(name))
    values = {name: coerce(SPECS[name], value, source) for name, (value, source) in raw.items()}
    return Settings(**values)


# The settings a running consumer takes live (retune(), the config watcher); the rest need a restart.
LIVE = ("MAX_THREAD_COUNT", "PAUSE_INTERVAL", "MAX_RATE", "KEY_RATE", "RATE_BURST", "BATCH_SIZE", "BATCH_WAIT")


def live_changes(**keywords: Any) -> dict[str, Any]:
    """Validated ``{NAME: value}`` from ``retune()`` keywords (None: unchanged); ConfigError for a bad one."""
    changes: dict[str, Any] = {}
    for keyword, value in keywords.items():
        name = keyword.upper()
        if name not in LIVE:
            raise ConfigError(f"retune({keyword}=): not a setting a running consumer can change")
        if value is not None:
            changes[name] = coerce(SPECS[name], value, f"retune({keyword}=)")
    return changes


def check_bounds(max_messages: Any, idle_exit: Any) -> None:
    """``run()``'s bounds: ``max_messages`` an integer >= 1, ``idle_exit`` a number > 0 (or None)."""
    if max_messages is not None and (isinstance(max_messages, bool) or not isinstance(max_messages, int)
                                     or max_messages < 1):
        raise ConfigError(f"invalid max_messages={max_messages!r}: must be an integer >= 1")
    if idle_exit is not None and (isinstance(idle_exit, bool) or not isinstance(idle_exit, int | float)
                                  or not idle_exit > 0):
        raise ConfigError(f"invalid idle_exit={idle_exit!r}: must be a number > 0")


def parse_properties(pairs: Sequence[str]) -> dict[str, str]:
    """``["key=value", ...]`` from repeated ``-X`` flags, as kcat takes them."""
    props: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"invalid -X {pair!r}: expected key=value")
        props[key.strip()] = value
    return props
