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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from mtc75.core.offsetmap import default_window
from mtc75.core.ordering import ORDERINGS
from mtc75.core.retry import FAILURE_MODES
from mtc75.errors import ConfigError

ENV_PREFIX = "MTC75_"
# librdkafka logs through this logger instead of raw stderr; scripts show it only with -vv.
LIBRDKAFKA_LOGGER = logging.getLogger("mtc75.librdkafka")
OFFSET_RESETS = ("earliest", "latest", "error")


@dataclass(frozen=True)
class Spec:
    """How one setting is parsed, checked and explained."""

    name: str
    kind: type
    help: str
    minimum: float | None = None
    choices: tuple[str, ...] = ()
    positive: bool = False  # strictly greater than ``minimum``


def _spec(kind: type, help: str, **kw: Any) -> dict[str, Any]:
    return {"metadata": {"kind": kind, "help": help, **kw}}


@dataclass(frozen=True)
class Settings:
    """The validated settings of one run. Build it with :func:`load_settings` or ``Settings().replace(...)``."""

    BOOTSTRAP_SERVERS: str = field(default="127.0.0.1:9092", **_spec(str, "Kafka bootstrap servers"))
    TOPIC: str = field(default="mtc75-demo", **_spec(str, "topic to produce to and consume from"))
    NUM_PARTITIONS: int = field(default=6, **_spec(int, "partitions create_topic.py creates", minimum=1))
    REPLICATION_FACTOR: int = field(
        default=0,
        **_spec(int, "replicas create_topic.py asks for (0 = one per broker, at most 3; -1 = broker default)",
                minimum=-1),
    )
    GROUP_ID: str = field(default="mtc75-consumer", **_spec(str, "consumer group id"))
    MAX_THREAD_COUNT: int = field(default=75, **_spec(int, "worker threads = semaphore permits", minimum=1))
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
    ORDERING: str = field(
        default="unordered",
        **_spec(str, "unordered (any message when a thread is free), partition (one at a time per partition, "
                "in offset order) or key (one at a time per key, in offset order; keyless: each its own key)",
                choices=ORDERINGS),
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

    def consumer_config(self, overrides: Mapping[str, str] = MappingProxyType({})) -> dict[str, Any]:
        """The librdkafka consumer dict: our required properties, then CONSUMER_CONFIG, then ``-X`` overrides."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.BOOTSTRAP_SERVERS,
            "logger": LIBRDKAFKA_LOGGER,
            "group.id": self.GROUP_ID,
            "auto.offset.reset": self.AUTO_OFFSET_RESET,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            # Bound what librdkafka prefetches: the engine keeps its own backlog, so a deep client
            # queue only costs memory and is dropped on every pause anyway. With the defaults
            # (64 MB queue, 50 MB fetches) a consumer of small messages peaked above 300 MB.
            # 4 MB: below it, fast handlers starve between fetches (measured: 2 MB halves a no-op
            # handler's rate); above it memory grows with little gain (see BENCHMARKS.md).
            "queued.max.messages.kbytes": 4096,
            "fetch.max.bytes": 2 * 1024 * 1024,
            "max.partition.fetch.bytes": 512 * 1024,
            # Not changed yet (issue 16): fetch.queue.backoff.ms=10 with queued.min.messages=30000 and
            # queued.max.messages.kbytes=32768 ran a no-op handler 3.3x faster on 150 B uncompressed
            # data (BENCHMARKS.md), but with them a consumer whose broker went away hung in close()
            # (test_faults.py broker_gone: 4 of 7 runs with all three, 3 of 4 with either part alone;
            # 1 of 3 on these settings with this branch's code, 0 of 3 on main's code: cause not established).
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
        for key in ("enable.auto.commit", "enable.auto.offset.store"):
            if str(conf[key]).lower() not in ("false", "0"):
                raise ConfigError(f"{key}={conf[key]} is not supported: MTC75 commits only completed work")
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
    value = _number(spec.kind, raw, bad)
    if spec.minimum is not None:
        if spec.positive and value <= spec.minimum:
            raise bad(f"must be > {spec.minimum:g}")
        if value < spec.minimum:
            raise bad(f"must be >= {spec.minimum:g}")
    return value


def _number(kind: type, raw: Any, bad: Callable[[str], ConfigError]) -> int | float:
    if isinstance(raw, bool):
        raise bad(f"must be {'an integer' if kind is int else 'a number'}")
    if kind is int:
        if isinstance(raw, int):
            return raw
        try:
            return int(str(raw).strip().replace("_", ""))
        except ValueError:
            raise bad("must be an integer") from None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise bad("must be a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise bad("must be a finite number")
    return value


def read_config_file(path: Path) -> dict[str, Any]:
    """The upper-case names of a config.py; unknown names are errors so typos do not pass silently."""
    try:
        namespace = runpy.run_path(str(path))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except SyntaxError as err:
        raise ConfigError(f"{path}:{err.lineno}: syntax error: {err.msg}") from None
    except Exception as err:  # the user's file may raise anything
        raise ConfigError(f"{path}: {type(err).__name__}: {err}") from None
    values = {k: v for k, v in namespace.items() if k.isupper() and not k.startswith("_")}
    unknown = sorted(set(values) - set(SPECS))
    if unknown:
        raise ConfigError(f"{path}: unknown setting {unknown[0]} (known: see README settings table)")
    return values


def load_settings(
    config_path: Path | None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Settings:
    """Merge defaults, config file, environment and flags (in that order) and validate each value once."""
    env = os.environ if env is None else env
    raw: dict[str, tuple[Any, str]] = {}
    if config_path is not None:
        for name, value in read_config_file(config_path).items():
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


def parse_properties(pairs: Sequence[str]) -> dict[str, str]:
    """``["key=value", ...]`` from repeated ``-X`` flags, as kcat takes them."""
    props: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"invalid -X {pair!r}: expected key=value")
        props[key.strip()] = value
    return props
