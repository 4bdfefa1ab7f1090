"""FETCH_SIZES: the pure policy (mtc75.core.fetchsize), the setting, and the probe against the in-memory fake.

No broker: the probe and the engine run on tests/fake_kafka.py, whose statistics report a topic's bytes on
the wire as its payload divided by the ratio set with ``FakeKafka.compress``.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from confluent_kafka import KafkaError, TopicPartition

from mtc75.core.fetchsize import LARGE, MIN_SAMPLE_BYTES, SMALL, UNCOMPRESSED_RATIO, Sample, choose, fixed
from mtc75.errors import ConfigError
from mtc75.kafka.clients import ClientFactories
from mtc75.kafka.fetchprobe import ENOUGH_BYTES, probe
from mtc75.settings import Settings, load_settings
from tests.fake_kafka import FakeKafka
from tests.kafka_helpers import BoundConsumer

pytestmark = pytest.mark.timeout(60)

TOPIC, GROUP = "events", "readers"
RECORD = b"x" * 1000  # 200 of them: 200 KB, over MIN_SAMPLE_BYTES


def settings(**changes: Any) -> Settings:
    values: dict[str, Any] = {"TOPIC": TOPIC, "GROUP_ID": GROUP, "MAX_THREAD_COUNT": 4, "COMMIT_INTERVAL": 0.02,
                              "ON_FAILURE": "skip", "SHUTDOWN_TIMEOUT": 5.0}
    values.update(changes)
    return Settings().replace(**values)


def fill(cluster: FakeKafka, partitions: int = 3, count: int = 200, value: bytes = RECORD) -> None:
    cluster.create_topic(TOPIC, partitions)
    for i in range(count):
        cluster.produce(TOPIC, i % partitions, value, key=b"k%d" % i)


# -- the policy ---------------------------------------------------------------------------------------


def test_uncompressed_samples_get_large_fetches_and_compressed_ones_small() -> None:
    ten_kb = Sample(wire_bytes=8_928_890, payload_bytes=8_913_370, messages=891)  # measured: 10 KB uncompressed
    lz4 = Sample(wire_bytes=2_101_806, payload_bytes=14_868_590, messages=133_407)  # measured: lz4 100 B
    assert choose(ten_kb).sizes == LARGE
    assert choose(lz4).sizes == SMALL
    assert "payload/wire 1.00, mean message 10,004 B" in choose(ten_kb).reason
    assert "payload/wire 7.07, mean message 111 B: compressed" in choose(lz4).reason


def test_a_ratio_exactly_at_the_threshold_counts_as_uncompressed_and_just_above_as_compressed() -> None:
    wire = 1_000_000
    assert choose(Sample(wire, int(wire * UNCOMPRESSED_RATIO), 1000)).sizes == LARGE
    assert choose(Sample(wire, int(wire * UNCOMPRESSED_RATIO) + 1, 1000)).sizes == SMALL


@pytest.mark.parametrize("sample", [
    None,  # the probe failed or found nothing to read
    Sample(0, 0, 0),  # empty
    Sample(0, 5000, 10),  # messages without bytes received (cannot judge)
    Sample(MIN_SAMPLE_BYTES - 1, MIN_SAMPLE_BYTES - 1, 50),  # too little to judge, although uncompressed
])
def test_nothing_or_too_little_observed_keeps_the_small_defaults(sample: Sample | None) -> None:
    choice = choose(sample)
    assert choice.sizes == SMALL and choice.reason


def test_at_the_minimum_sample_an_uncompressed_topic_gets_large_fetches() -> None:
    assert choose(Sample(MIN_SAMPLE_BYTES, MIN_SAMPLE_BYTES, 64)).sizes == LARGE


def test_the_pairs_and_the_fixed_modes() -> None:
    assert SMALL.conf() == {"fetch.max.bytes": 2 * 1024 * 1024, "max.partition.fetch.bytes": 512 * 1024}
    assert LARGE.conf() == {"fetch.max.bytes": 50 * 1024 * 1024, "max.partition.fetch.bytes": 1024 * 1024}
    assert str(LARGE) == "large (50 MB / 1 MB)" and str(SMALL) == "small (2 MB / 512 KB)"
    assert fixed("large").sizes == LARGE and fixed("small").sizes == SMALL


# -- the setting --------------------------------------------------------------------------------------


def test_fetch_sizes_setting_from_env_and_its_pairs_in_the_consumer_config() -> None:
    assert Settings().FETCH_SIZES == "auto"
    assert load_settings(None, env={"MTC75_FETCH_SIZES": "large"}).FETCH_SIZES == "large"
    with pytest.raises(ConfigError, match="FETCH_SIZES"):
        load_settings(None, env={"MTC75_FETCH_SIZES": "huge"})
    assert Settings().consumer_config()["fetch.max.bytes"] == SMALL.fetch_max_bytes  # auto before a probe
    assert Settings().replace(FETCH_SIZES="large").consumer_config()["fetch.max.bytes"] == LARGE.fetch_max_bytes
    assert Settings().consumer_config(fetch=LARGE)["max.partition.fetch.bytes"] == LARGE.partition_bytes


def test_a_fetch_size_the_user_set_wins_over_every_choice() -> None:
    user = {"max.partition.fetch.bytes": "65536"}
    assert not Settings().user_fetch_sizes()
    assert Settings().user_fetch_sizes(user)
    assert Settings().replace(CONSUMER_CONFIG={"fetch.max.bytes": 9_000_000}).user_fetch_sizes()
    conf = Settings().consumer_config(user, fetch=LARGE)
    assert conf["max.partition.fetch.bytes"] == "65536" and conf["fetch.max.bytes"] == LARGE.fetch_max_bytes


# -- the probe against the fake -----------------------------------------------------------------------


def conf(**extra: Any) -> dict[str, Any]:
    return settings().consumer_config(extra)


def test_the_probe_samples_the_topic_without_committing_and_closes_its_consumer() -> None:
    cluster = FakeKafka()
    fill(cluster)
    sample = probe(cluster.factories(), conf(), TOPIC)
    assert sample is not None and sample.messages == 200
    assert sample.payload_bytes == sum(len(m.value()) + len(m.key()) for m in cluster.messages(TOPIC))
    assert choose(sample).sizes == LARGE
    assert cluster.commits == [] and cluster.consumers == []
    assert [p.closed for p in cluster.probes] == [True]
    assert not any(name == "subscribe" for name, _ in cluster.probes[0].calls)


def test_a_compressed_topic_samples_as_compressed() -> None:
    cluster = FakeKafka()
    fill(cluster)
    cluster.compress(TOPIC, 4.0)
    sample = probe(cluster.factories(), conf(), TOPIC)
    assert sample is not None and sample.ratio == pytest.approx(4.0, rel=0.01)
    assert choose(sample).sizes == SMALL


def test_the_probe_reads_from_the_groups_committed_offsets() -> None:
    cluster = FakeKafka()
    fill(cluster, partitions=1)
    committer = cluster.factories().consumer({"group.id": GROUP})
    committer.assign([TopicPartition(TOPIC, 0)])
    committer.commit(offsets=[TopicPartition(TOPIC, 0, 150)], asynchronous=False)
    sample = probe(cluster.factories(), conf(), TOPIC)
    assert sample is not None and sample.messages == 50  # offsets 150-199 only
    assert cluster.committed(GROUP, TOPIC, 0) == 150


@pytest.mark.parametrize("case", ["empty", "all committed", "latest without commits", "missing topic",
                                  "unreachable", "refused config"])
def test_nothing_to_read_or_any_failure_gives_no_sample_and_never_raises(case: str) -> None:
    cluster = FakeKafka()
    clients = cluster.factories()
    extra: dict[str, Any] = {}
    if case == "empty":
        cluster.create_topic(TOPIC, 3)
    elif case == "all committed":
        fill(cluster, partitions=1)
        committer = clients.consumer({"group.id": GROUP})
        committer.assign([TopicPartition(TOPIC, 0)])
        committer.commit(offsets=[TopicPartition(TOPIC, 0, 200)], asynchronous=False)
    elif case == "latest without commits":
        fill(cluster)
        extra = {"auto.offset.reset": "latest"}
    elif case == "unreachable":
        fill(cluster)
        cluster.unreachable = True
    elif case == "refused config":
        fill(cluster)

        def refuse(c: dict[str, Any]) -> Any:
            raise ValueError("bad property")

        clients = ClientFactories(consumer=refuse)
    assert probe(clients, conf(**extra), TOPIC) is None
    assert cluster.commits[1:] == []  # the probe commits nothing (one commit: the test's own, above)
    assert all(p.closed and p.fetched == 0 for p in cluster.probes)


def test_injected_faults_stay_for_the_engines_consumer() -> None:
    cluster = FakeKafka()
    fill(cluster)
    cluster.fail_fetch(KafkaError(KafkaError._TRANSPORT, "for the engine"))
    cluster.client_error(KafkaError(KafkaError._TRANSPORT, "for the engine too"))
    assert probe(cluster.factories(), conf(), TOPIC) is not None
    assert len(cluster._fetch_errors) == 1 and len(cluster._client_errors) == 1


# -- the engine ---------------------------------------------------------------------------------------


def run_engine(cluster: FakeKafka, factories: ClientFactories | None = None, overrides: dict[str, str] | None = None,
               **changes: Any) -> tuple[BoundConsumer, list[tuple[int, int]]]:
    handled: list[tuple[int, int]] = []
    lock = threading.Lock()

    def handler(message: Any) -> None:
        with lock:
            handled.append((message.partition(), message.offset()))

    engine = BoundConsumer(settings(**changes), handler, factories=factories or cluster.factories(),
                           overrides=overrides or {}, max_messages=len(cluster.messages(TOPIC)))
    stats = engine.run()
    assert stats.processed == len(cluster.messages(TOPIC))
    return engine, handled


def test_the_engine_builds_its_client_with_the_probes_choice_and_consumes_everything() -> None:
    cluster = FakeKafka()
    fill(cluster)
    engine, handled = run_engine(cluster)
    assert cluster.consumers[0].conf["fetch.max.bytes"] == LARGE.fetch_max_bytes
    assert cluster.consumers[0].conf["max.partition.fetch.bytes"] == LARGE.partition_bytes
    assert engine.stats().fetch_sizes == str(LARGE) and engine.stats().summary()["fetch_sizes"] == str(LARGE)
    assert sorted(handled) == sorted((m.partition(), m.offset()) for m in cluster.messages(TOPIC))
    assert [cluster.committed(GROUP, TOPIC, p) for p in range(3)] == [67, 67, 66]
    assert len(cluster.probes) == 1 and cluster.probes[0].closed


def test_the_engine_on_a_compressed_topic_keeps_the_small_sizes() -> None:
    cluster = FakeKafka()
    fill(cluster)
    cluster.compress(TOPIC, 3.0)
    engine, _ = run_engine(cluster)
    assert cluster.consumers[0].conf["fetch.max.bytes"] == SMALL.fetch_max_bytes
    assert engine.stats().fetch_sizes == str(SMALL)


@pytest.mark.parametrize("how", ["override", "consumer config", "fixed small"])
def test_no_probe_when_the_user_chose(how: str) -> None:
    cluster = FakeKafka()
    fill(cluster)
    if how == "override":
        engine, _ = run_engine(cluster, overrides={"fetch.max.bytes": "3000000"})
        assert cluster.consumers[0].conf["fetch.max.bytes"] == "3000000"
        assert cluster.consumers[0].conf["max.partition.fetch.bytes"] == SMALL.partition_bytes
        assert engine.stats().fetch_sizes == "set by the user"
    elif how == "consumer config":
        run_engine(cluster, CONSUMER_CONFIG={"max.partition.fetch.bytes": 100_000})
        assert cluster.consumers[0].conf["max.partition.fetch.bytes"] == 100_000
    else:
        run_engine(cluster, FETCH_SIZES="small")
        assert cluster.consumers[0].conf["fetch.max.bytes"] == SMALL.fetch_max_bytes
    assert cluster.probes == []


def test_a_probe_that_blows_up_does_not_fail_the_run() -> None:
    cluster = FakeKafka()
    fill(cluster)
    real = cluster.factories()

    def consumer(c: dict[str, Any]) -> Any:
        built = real.consumer(c)
        if "statistics.interval.ms" in c:
            built.committed = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))  # type: ignore[method-assign]
        return built

    engine, handled = run_engine(cluster, factories=ClientFactories(consumer=consumer, producer=real.producer,
                                                               admin=real.admin))
    assert engine.stats().fetch_sizes == str(SMALL) and len(handled) == 200


def test_the_library_keyword_and_the_summary_line() -> None:
    from mtc75 import testing
    from mtc75.commands.consumer import _summary_line
    from tests.stats_factory import make_stats

    cluster = FakeKafka()
    fill(cluster)
    consumer = testing.consumer(cluster.factories(), lambda message: None, topic=TOPIC, group_id=GROUP,
                                fetch_sizes="large", on_failure="skip")
    stats = consumer.run(max_messages=200)
    assert cluster.probes == [] and cluster.consumers[0].conf["fetch.max.bytes"] == LARGE.fetch_max_bytes
    assert stats.fetch_sizes == str(LARGE)
    with pytest.raises(ConfigError, match=r"fetch_sizes|FETCH_SIZES"):
        testing.consumer(cluster.factories(), lambda message: None, topic=TOPIC, group_id=GROUP,
                         fetch_sizes="medium")
    assert "fetch sizes large (50 MB / 1 MB)" in _summary_line(make_stats(fetch_sizes=str(LARGE)))
    assert "fetch sizes" not in _summary_line(make_stats())



def test_the_probe_stops_fetching_once_it_has_its_sample_and_reports_a_settled_snapshot() -> None:
    cluster = FakeKafka()
    fill(cluster, count=6000)  # 6 MB; the probe wants about 2 MB
    sample = probe(cluster.factories(), conf(), TOPIC)
    assert sample is not None and sample.wire_bytes >= ENOUGH_BYTES and sample.messages < 6000
    assert sample.messages == cluster.probes[0].fetched  # the report after the pause counts all it fetched
    assert any(name == "pause" for name, _ in cluster.probes[0].calls)
