"""Deserializers (``key_deserializer=`` / ``value_deserializer=``, KEY_FORMAT / VALUE_FORMAT): the handler gets
decoded keys and values; a message that does not decode is dead-lettered with its original bytes, at once.

Broker-free through mtc75.testing and the in-memory fake (tests/fake_kafka.py), plus one real-broker test
of JSON values end to end.
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
import os
import socket
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fastavro
import pytest
from confluent_kafka import Producer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.schema_registry.json_schema import JSONDeserializer, JSONSerializer
from confluent_kafka.serialization import Deserializer, MessageField, SerializationContext, StringDeserializer

import mtc75
from mtc75 import testing
from mtc75.core.offsets import OffsetTracker
from mtc75.core.ordering import FairFifoScheduler
from mtc75.core.retry import RetryPolicy
from mtc75.core.work import Work
from mtc75.kafka.deadletter import H_ATTEMPTS, H_ERROR, H_OFFSET
from mtc75.kafka.deserializers import BUILT_INS, DecodedMessage, decoder, is_transient
from mtc75.runtime.dispatcher import Dispatcher
from mtc75.runtime.invoker import Invoker
from mtc75.settings import FORMATS, load_settings
from mtc75.tools.registry import LocalRegistry
from tests.conftest import TEST_PORT
from tests.fake_kafka import FakeKafka, FakeMessage
from tests.kafka_helpers import produce_numbered, read_topic, run_script, script_env, wait_until
from tests.test_chunks import _drain, _fast, _run

pytestmark = pytest.mark.timeout(120)

TOPIC, GROUP = "orders", "billing"
WAIT = 10.0
FAST = {"commit_interval": 0.02, "pause_interval": 0.05, "shutdown_timeout": 5.0, "revoke_timeout": 5.0}
# The schema registry's port (below 32768, as every test port): beside the test broker's by default.
REGISTRY_PORT = int(os.environ.get("MTC75_TEST_REGISTRY_PORT", str(TEST_PORT + 30)))
# Three attempts, quickly: a poison message that were retried would show attempts 3 and retried 2.
NO_RETRY = {"max_attempts": 3, "retry_backoff": 0.01, "retry_backoff_max": 0.01}


@pytest.fixture
def cluster() -> FakeKafka:
    fake = FakeKafka()
    fake.create_topic(TOPIC, 1)
    return fake


def make(cluster: FakeKafka, handler: Callable[[Any], object], **kw: Any) -> mtc75.Consumer:
    return testing.consumer(cluster.factories(), handler, topic=TOPIC, **{"group_id": GROUP, **FAST, **kw})


def produce(cluster: FakeKafka, *values: bytes | None, key: bytes | None = b"k") -> None:
    for value in values:
        cluster.produce(TOPIC, 0, value, key=key, headers=[("trace", b"t1")])


def dlq_records(cluster: FakeKafka) -> list[tuple[bytes | None, dict[str, bytes]]]:
    return [(m.value(), dict(m.headers() or [])) for m in cluster.messages(TOPIC + ".dlq")]


# -- what the handler gets ---------------------------------------------------------------------------


def test_the_built_in_formats_are_the_settings_choices_and_bytes_adds_nothing() -> None:
    assert tuple(BUILT_INS) == FORMATS
    assert decoder(None, None) is None and decoder("bytes", "bytes") is None  # the handler gets the Message


def test_json_values_and_str_keys_reach_the_handler_decoded_with_the_messages_metadata(cluster: FakeKafka) -> None:
    produce(cluster, b'{"id": 1}', b"[2]")
    seen: list[Any] = []
    stats = make(cluster, seen.append, key_deserializer="str", value_deserializer="json").run(max_messages=2)
    assert stats.processed == 2
    assert [(m.key(), m.value()) for m in seen] == [("k", {"id": 1}), ("k", [2])]
    first = seen[0]
    assert isinstance(first, DecodedMessage) and isinstance(first.original, FakeMessage)
    assert (first.topic(), first.partition(), first.offset(), first.headers(), first.timestamp()) == (
        TOPIC, 0, 0, [("trace", b"t1")], (0, 0))
    assert first.original.value() == b'{"id": 1}'  # the fetched bytes stay reachable


def test_a_missing_key_and_a_tombstone_stay_none_without_calling_the_deserializer(cluster: FakeKafka) -> None:
    produce(cluster, None, key=None)
    calls: list[bytes] = []

    def decode(data: bytes) -> str:
        calls.append(data)
        return "decoded"

    seen: list[Any] = []
    make(cluster, seen.append, key_deserializer=decode, value_deserializer=decode).run(max_messages=1)
    assert [(m.key(), m.value()) for m in seen] == [(None, None)] and calls == []


def test_a_confluent_deserializer_gets_the_serialization_context(cluster: FakeKafka) -> None:
    produce(cluster, b"v")
    contexts: list[tuple[str, str, Any]] = []

    class Upper(Deserializer):
        def __call__(self, value: bytes | None, ctx: SerializationContext | None = None) -> Any:
            assert ctx is not None
            contexts.append((ctx.topic, ctx.field, ctx.headers))
            return value.upper() if value is not None else None

    seen: list[Any] = []
    make(cluster, seen.append, key_deserializer=Upper(), value_deserializer=Upper()).run(max_messages=1)
    assert [(m.key(), m.value()) for m in seen] == [(b"K", b"V")]
    assert contexts == [(TOPIC, "key", [("trace", b"t1")]), (TOPIC, "value", [("trace", b"t1")])]
    seen.clear()
    produce(cluster, b"w")  # confluent-kafka's own: StringDeserializer
    make(cluster, seen.append, key_deserializer=StringDeserializer("utf_8"), group_id="other").run(max_messages=2)
    assert [(m.key(), m.value()) for m in seen] == [("k", b"v"), ("k", b"w")]


def test_an_async_handler_gets_decoded_values_and_its_poison_is_dead_lettered(cluster: FakeKafka) -> None:
    produce(cluster, b'{"id": 0}', b"{not json", b'{"id": 2}')
    seen: list[Any] = []

    async def handle(message: Any) -> None:
        await asyncio.sleep(0)
        seen.append(message.value())

    stats = make(cluster, handle, value_deserializer="json", **NO_RETRY).run(max_messages=3)
    assert stats.workers == "coroutines"
    assert sorted(v["id"] for v in seen) == [0, 2]
    [(value, headers)] = dlq_records(cluster)
    assert value == b"{not json" and headers[H_ATTEMPTS] == b"1"
    assert headers[H_ERROR].startswith(b"DeserializationError: could not deserialize the value (json): JSONDecodeError")


def test_settings_choose_the_formats_from_env_and_flags_like_any_other(cluster: FakeKafka) -> None:
    produce(cluster, b'{"id": 1}')
    settings = load_settings(None, env={"MTC75_VALUE_FORMAT": "json"}, flags={"KEY_FORMAT": "str",
                                                                            "TOPIC": TOPIC, "GROUP_ID": GROUP})
    seen: list[Any] = []
    testing.from_settings(cluster.factories(), seen.append, settings).run(max_messages=1)
    assert [(m.key(), m.value()) for m in seen] == [("k", {"id": 1})]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"value_deserializer": "xml"}, "invalid value_deserializer='xml': must be a callable or one of bytes, str, json"),
    ({"key_deserializer": 42}, "invalid key_deserializer: must be a callable or a format name, got int"),
    ({"value_format": "xml"}, "invalid VALUE_FORMAT='xml' (from keyword value_format): must be one of bytes, str"),
    ({"value_format": "json", "value_deserializer": json.loads}, "value_deserializer= and VALUE_FORMAT='json' are"),
])
def test_what_cannot_deserialize_is_a_config_error_before_anything_connects(
    cluster: FakeKafka, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(mtc75.ConfigError) as caught:
        make(cluster, lambda m: None, **kwargs)
    assert message in str(caught.value)
    assert cluster.consumers == []


def test_an_async_deserializer_is_refused(cluster: FakeKafka) -> None:
    async def decode(data: bytes) -> Any:
        return data

    class AsyncDeserializer:
        async def __call__(self, data: bytes, ctx: Any = None) -> Any:
            return data

    for bad in (decode, AsyncDeserializer(), functools.partial(decode)):
        with pytest.raises(mtc75.ConfigError, match=r"is async: deserializers .* are not awaited"):
            make(cluster, lambda m: None, value_deserializer=bad)


# -- failures ----------------------------------------------------------------------------------------


def test_a_value_that_does_not_decode_is_dead_lettered_at_once_with_its_original_bytes(cluster: FakeKafka) -> None:
    produce(cluster, b'{"id": 0}', b'{"id": 1}', b"\xff\xfe garbage", b'{"id": 3}')
    seen: list[int] = []
    stats = make(cluster, lambda m: seen.append(m.value()["id"]), value_deserializer="json", **NO_RETRY).run(
        max_messages=4)
    assert sorted(seen) == [0, 1, 3]  # the handler never saw the poison one
    [(value, headers)] = dlq_records(cluster)
    assert value == b"\xff\xfe garbage"  # the fetched bytes, not a decoded object
    assert (headers[H_OFFSET], headers[H_ATTEMPTS], headers["trace"]) == (b"2", b"1", b"t1")
    assert headers[H_ERROR].startswith(b"DeserializationError: could not deserialize the value (json): ")
    assert (stats.processed, stats.failed, stats.retried, stats.dead_lettered) == (4, 1, 0, 1)
    assert cluster.committed(GROUP, TOPIC, 0) == 4


def test_a_key_that_does_not_decode_fails_its_message_and_names_the_key(cluster: FakeKafka) -> None:
    produce(cluster, b"a")
    produce(cluster, b"b", key=b"\xff")
    seen: list[Any] = []
    stats = make(cluster, seen.append, key_deserializer="str", on_failure="skip", **NO_RETRY).run(max_messages=2)
    assert [m.value() for m in seen] == [b"a"]  # value "bytes": as fetched
    assert (stats.failed, stats.skipped, stats.retried) == (1, 1, 0)


def test_a_deserializer_that_cannot_reach_its_registry_is_retried_like_a_handler(cluster: FakeKafka) -> None:
    produce(cluster, b"a", b"b")
    calls: Counter[bytes] = Counter()

    def flaky(data: bytes) -> bytes:
        calls[data] += 1
        if data == b"b" and calls[data] < 3:
            raise ConnectionRefusedError("registry down")
        return data

    seen: list[bytes] = []
    stats = make(cluster, lambda m: seen.append(m.value()), value_deserializer=flaky, max_attempts=3,
                 retry_backoff=0.01, retry_backoff_max=0.01).run(max_messages=2)
    assert seen == [b"a", b"b"] and calls[b"b"] == 3 and stats.retried == 2 and stats.failed == 0


@pytest.mark.parametrize("field", ["key", "value"])
def test_a_deserializer_raising_a_base_exception_fails_its_message_not_the_worker(
    cluster: FakeKafka, field: str
) -> None:
    produce(cluster, b"a", key=b"a")
    produce(cluster, b"b", key=b"b")

    def explode(data: bytes) -> bytes:
        if data == b"a":
            raise SystemExit(3)  # not a DeserializationError: retried like a handler's raise
        return data

    seen: list[bytes] = []
    stats = make(cluster, lambda m: seen.append(m.value()), on_failure="skip", max_attempts=2, retry_backoff=0.01,
                 retry_backoff_max=0.01, **{f"{field}_deserializer": explode}).run(max_messages=2)
    assert seen == [b"b"] and (stats.failed, stats.retried, stats.skipped) == (1, 1, 1)


@pytest.mark.parametrize(("error", "transient"), [
    (ValueError("bad bytes"), False),
    (SchemaRegistryError(404, 40403, "Schema not found"), False),
    (SchemaRegistryError(503, -1, "unavailable"), True),
    (SchemaRegistryError(429, -1, "slow down"), True),
    (TimeoutError("read timed out"), True),
])
def test_only_a_registry_out_of_reach_is_a_transient_failure(error: Exception, transient: bool) -> None:
    assert is_transient(error) is transient
    wrapped = RuntimeError("deserializer failed")
    wrapped.__cause__ = error
    assert is_transient(wrapped) is transient  # also when a user's deserializer wraps it


def test_an_httpx_transport_error_is_transient() -> None:
    from confluent_kafka.schema_registry.common._httpx_compat import httpx

    assert is_transient(httpx.ConnectError("connection refused"))
    assert is_transient(httpx.ReadTimeout("read timed out"))
    assert not is_transient(httpx.DecodingError("a garbled answer"))  # an HTTP error, not the transport's


def test_a_chunk_decodes_each_message_on_the_worker_and_settles_its_poison_alone_without_retry() -> None:
    tracker = OffsetTracker()
    tracker.assign([("t", 0)])
    seen: list[int] = []

    def value(offset: int) -> bytes:
        return b"not json" if offset == 7 else json.dumps({"n": offset}).encode()

    d = Dispatcher(Invoker(lambda m: seen.append(m.value()["n"]), decode=decoder(None, "json")), 2,
                   RetryPolicy(max_attempts=3, base=0.0, cap=0.0), scheduler=FairFifoScheduler())
    _fast(d)
    state = tracker.get(("t", 0))
    assert state is not None
    run = _run(tracker, 0, 0, 100)
    done: list[Work] = []
    d.put([Work.chunk([FakeMessage("t", 0, o, value(o)) for o in run.offsets], state, 0)])
    wait_until(lambda: (_drain(d, tracker, done), sum(w.size for w in done) == 100)[1], WAIT)
    d.shutdown(wait=True)
    assert max(w.size for w in done) > 1  # chunks, not single messages
    [failed] = [w for w in done if w.failed]
    assert (failed.offset, failed.size, failed.attempts, d.retried) == (7, 1, 1, 0)
    assert failed.error.startswith("DeserializationError: could not deserialize the value (json): JSONDecodeError")
    assert failed.message.value() == b"not json"
    assert sorted(seen) == [o for o in range(100) if o != 7]


def test_a_real_registry_client_that_cannot_connect_is_retried_then_dead_lettered(cluster: FakeKafka) -> None:
    with socket.socket() as taken:  # bound, not listening: connecting is refused, and nobody else gets the port
        taken.bind(("127.0.0.1", 0))
        client = SchemaRegistryClient({"url": f"http://127.0.0.1:{taken.getsockname()[1]}", "max.retries": 0})
        framed = b"\x00\x00\x00\x00\x01" + avro_bytes({"id": 1, "item": "x"})  # schema id 1, unknown here
        produce(cluster, framed)
        stats = make(cluster, lambda m: None, value_deserializer=AvroDeserializer(client), **NO_RETRY).run(
            max_messages=1)
    [(value, headers)] = dlq_records(cluster)
    assert value == framed and headers[H_ATTEMPTS] == b"3" and stats.retried == 2
    assert b"could not deserialize the value (confluent_kafka.schema_registry._sync.avro.AvroDeserializer): " \
           b"ConnectError" in headers[H_ERROR]


# -- schemaless Avro (fastavro): the hook with a format of the user's own -----------------------------

AVRO_SCHEMA = fastavro.parse_schema({
    "type": "record", "name": "Order", "fields": [{"name": "id", "type": "long"}, {"name": "item", "type": "string"}],
})


def avro_value(data: bytes) -> dict[str, Any]:
    """The example of docs/deserializers.md: a schemaless Avro record of a schema both sides know."""
    return fastavro.schemaless_reader(io.BytesIO(data), AVRO_SCHEMA)  # type: ignore[no-any-return]


def avro_bytes(record: dict[str, Any]) -> bytes:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, AVRO_SCHEMA, record)
    return out.getvalue()


def test_schemaless_avro_values_decode_and_a_truncated_one_is_dead_lettered(cluster: FakeKafka) -> None:
    good = [avro_bytes({"id": i, "item": f"item-{i}"}) for i in range(3)]
    produce(cluster, good[0], good[1][:2], good[2])  # the second one cut short
    seen: list[dict[str, Any]] = []
    stats = make(cluster, lambda m: seen.append(m.value()), value_deserializer=avro_value, **NO_RETRY).run(
        max_messages=3)
    assert seen == [{"id": 0, "item": "item-0"}, {"id": 2, "item": "item-2"}]
    [(value, headers)] = dlq_records(cluster)
    assert value == good[1][:2] and headers[H_ATTEMPTS] == b"1"
    assert b"could not deserialize the value (tests.test_deserializers.avro_value)" in headers[H_ERROR]
    assert stats.dead_lettered == 1


# -- a real broker ------------------------------------------------------------------------------------


def test_the_consumer_script_takes_value_format_and_refuses_a_bad_one(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str]
) -> None:
    topic = make_topic(partitions=2)
    produce_numbered(bootstrap, topic, 6)
    args = ("--topic", topic, "--group-id", unique("g"), "--processing-sleep", "0", "--no-dashboard")
    # the default handler checks the fetched bytes, also when the handler gets decoded values
    result = run_script("mtc75_consumer.py", *args, "--value-format", "json", "--key-format", "str",
                        "--max-messages", "6", env=script_env(bootstrap), timeout=60)
    assert result.returncode == 0, result.stderr
    assert "summary: processed 6, failed 0" in result.stdout
    result = run_script("mtc75_consumer.py", *args, env=script_env(bootstrap, MTC75_VALUE_FORMAT="xml"), timeout=30)
    assert result.returncode == 2
    assert "invalid VALUE_FORMAT='xml' (from MTC75_VALUE_FORMAT): must be one of bytes, str, json" in result.stderr


def produce_records(bootstrap: str, topic: str, records: list[tuple[str, bytes, list[tuple[str, bytes]]]]) -> None:
    """``(key, value, headers)`` records, all delivered (the producer is gone before the broker is)."""
    producer = Producer({"bootstrap.servers": bootstrap})
    for key, value, headers in records:
        producer.produce(topic, key=key, value=value, headers=headers)
    assert producer.flush(30) == 0


def test_json_values_end_to_end_with_one_poison_message_dead_lettered(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str]
) -> None:
    topic = make_topic(partitions=3)
    poison = b'{"id": 13, "truncated'
    produce_records(bootstrap, topic, [(f"k{i}", poison if i == 13 else json.dumps({"id": i}).encode(),
                                        [("n", str(i).encode())]) for i in range(30)])
    seen: list[tuple[Any, Any, bytes]] = []
    consumer = mtc75.Consumer(
        lambda m: seen.append((m.key(), m.value(), dict(m.headers())["n"])), topic=topic, group_id=unique("g"),
        bootstrap_servers=bootstrap, key_deserializer="str", value_deserializer="json", max_thread_count=4,
        commit_interval=0.1, **NO_RETRY,
    )
    stats = consumer.run(max_messages=30, idle_exit=30)
    assert (stats.processed, stats.failed, stats.retried, stats.dead_lettered) == (30, 1, 0, 1)
    assert sorted(v["id"] for _k, v, _n in seen) == [i for i in range(30) if i != 13]
    assert all(k == f"k{v['id']}" and n == str(v["id"]).encode() for k, v, n in seen)
    [record] = read_topic(bootstrap, topic + ".dlq", 1)
    headers = dict(record.headers() or [])
    assert (record.key(), record.value()) == (b"k13", poison)
    assert (headers[H_ATTEMPTS], headers["n"]) == (b"1", b"13")
    assert headers[H_ERROR].startswith(b"DeserializationError: could not deserialize the value (json): JSONDecodeError")


@pytest.fixture(scope="module")
def schema_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    """A real registry (Apicurio, Confluent-compatible API) for this module, on its own port; stopped after."""
    registry = LocalRegistry(REGISTRY_PORT, home=Path(tmp_path_factory.mktemp("registry")))
    registry.start(timeout=180)  # built on first use (mtc75/tools/registry.py); ~25 s to start on a loaded machine
    try:
        yield registry
    finally:
        registry.stop()


ORDER_SCHEMA = json.dumps({
    "type": "record", "name": "Order", "fields": [{"name": "id", "type": "long"}, {"name": "item", "type": "string"}],
})


@pytest.mark.timeout(300)
def test_avro_through_a_real_schema_registry_with_broken_payloads_dead_lettered(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], schema_registry: LocalRegistry
) -> None:
    topic = make_topic(partitions=2)
    serialize = AvroSerializer(SchemaRegistryClient({"url": schema_registry.url}), ORDER_SCHEMA)
    values = [serialize({"id": i, "item": f"item-{i}"}, SerializationContext(topic, MessageField.VALUE))
              for i in range(20)]
    cut_short = values[7][:-3]  # framing and schema id intact, the record cut short
    unknown_id = b"\x00\x00\x0f\x42\x3f" + values[8][5:]  # a schema id the registry does not have
    values[7], values[8] = cut_short, unknown_id
    produce_records(bootstrap, topic, [(f"k{i}", value, []) for i, value in enumerate(values)])
    seen: list[dict[str, Any]] = []
    deserialize = AvroDeserializer(SchemaRegistryClient({"url": schema_registry.url}))  # nothing cached yet
    consumer = mtc75.Consumer(
        lambda m: seen.append(m.value()), topic=topic, group_id=unique("g"), bootstrap_servers=bootstrap,
        value_deserializer=deserialize, max_thread_count=4, commit_interval=0.1, **NO_RETRY,
    )
    stats = consumer.run(max_messages=20, idle_exit=60)
    assert (stats.processed, stats.retried, stats.dead_lettered) == (20, 0, 2)
    assert sorted(v["id"] for v in seen) == [i for i in range(20) if i not in (7, 8)]
    assert all(v["item"] == f"item-{v['id']}" for v in seen)
    dead = {m.key(): (m.value(), dict(m.headers() or [])) for m in read_topic(bootstrap, topic + ".dlq", 2)}
    assert sorted(dead) == [b"k7", b"k8"]
    assert dead[b"k7"][0] == cut_short and dead[b"k8"][0] == unknown_id  # the original bytes
    assert all(headers[H_ATTEMPTS] == b"1" for _value, headers in dead.values())
    assert b"could not deserialize the value" in dead[b"k7"][1][H_ERROR]
    assert b"SchemaRegistryError" in dead[b"k8"][1][H_ERROR] and b"404" in dead[b"k8"][1][H_ERROR]


@pytest.mark.timeout(300)
def test_json_schema_through_a_real_schema_registry_with_an_invalid_record_dead_lettered(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], schema_registry: LocalRegistry
) -> None:
    schema = json.dumps({"$schema": "http://json-schema.org/draft-07/schema#", "title": "Order", "type": "object",
                         "properties": {"id": {"type": "integer"}}, "required": ["id"]})
    topic = make_topic(partitions=1)
    serialize = JSONSerializer(schema, SchemaRegistryClient({"url": schema_registry.url}))
    values = [serialize({"id": i}, SerializationContext(topic, MessageField.VALUE)) for i in range(10)]
    invalid = values[4][:5] + b'{"id": "four"}'  # well-framed JSON that breaks the schema
    values[4] = invalid
    produce_records(bootstrap, topic, [(f"k{i}", value, []) for i, value in enumerate(values)])
    seen: list[int] = []
    deserialize = JSONDeserializer(None, schema_registry_client=SchemaRegistryClient({"url": schema_registry.url}))
    stats = mtc75.Consumer(
        lambda m: seen.append(m.value()["id"]), topic=topic, group_id=unique("g"), bootstrap_servers=bootstrap,
        value_deserializer=deserialize, commit_interval=0.1, **NO_RETRY,
    ).run(max_messages=10, idle_exit=60)
    assert (stats.processed, stats.retried, stats.dead_lettered) == (10, 0, 1)
    assert sorted(seen) == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    [record] = read_topic(bootstrap, topic + ".dlq", 1)
    assert record.value() == invalid
    assert b"SerializationError: 'four' is not of type 'integer'" in dict(record.headers() or [])[H_ERROR]
