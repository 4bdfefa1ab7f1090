"""A 3-node Kafka cluster losing a partition leader to kill -9 while a producer and a consumer group run.

The module starts one cluster of its own (tests/local_kafka.py: its own folder, MTC75_TEST_CLUSTER_KAFKA_PORT
or the session port + 20, or the next free ports), shared by its tests and stopped at the end. It never
touches the session's broker, the fault tests' broker, or anything another suite started.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, PartitionMetadata

from mtc75.tools.broker import LocalCluster
from tests.conftest import TEST_PORT
from tests.kafka_helpers import (
    ROOT,
    all_offsets,
    committed_offsets,
    end_offsets,
    read_records,
    read_topic,
    report_figures,
    run_script,
    script_env,
    wait_until,
)
from tests.local_kafka import REPO_LIBS, owned_cluster, session_folder

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.faults, pytest.mark.timeout(420)]  # its own cluster

CLUSTER_PORT = int(os.environ.get("MTC75_TEST_CLUSTER_KAFKA_PORT", str(TEST_PORT + 20)))
SIZE = 3


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        pytest.skip("killing cluster nodes needs the local cluster (KAFKA_BOOTSTRAP_SERVERS is set)")
    with session_folder("cluster") as home:
        started = time.monotonic()
        local = owned_cluster(home, CLUSTER_PORT, SIZE)
        print(f"cluster of {SIZE} up in {time.monotonic() - started:.1f}s at {local.bootstrap}")
        try:
            yield local
        finally:
            local.stop()


def _admin(cluster: LocalCluster) -> AdminClient:
    return AdminClient({"bootstrap.servers": cluster.bootstrap})


def _partitions(admin: AdminClient, topic: str) -> dict[int, PartitionMetadata]:
    """The topic's partitions, or {} while metadata requests time out (e.g. sent to the node just killed)."""
    try:
        return admin.list_topics(topic, timeout=5).topics[topic].partitions
    except KafkaException:
        return {}


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _launcher(cluster: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    """The launcher's command line, as ``make broker BROKERS=3`` runs it (on this module's folder)."""
    node1 = cluster.nodes()[0]
    cmd = [sys.executable, "-m", "mtc75.tools.broker", *args, "--port", str(node1.port), "--brokers", str(SIZE),
           "--home", str(node1.folder.parent)]
    assert REPO_LIBS.exists()
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_cluster_defaults_and_create_topic_uses_the_cluster_size(
    cluster: LocalCluster, unique: Callable[[str], str]
) -> None:
    status = _launcher(cluster, "status")
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert len(lines) == SIZE and all("running (pid " in line for line in lines), status.stdout
    ports = [node.port for node in cluster.nodes()]
    assert len(set(ports)) == SIZE and all(f"127.0.0.1:{p} " in status.stdout for p in ports)

    topic = unique("rf")
    env = script_env(cluster.bootstrap)
    made = run_script("create_topic.py", "--topic", topic, "--num-partitions", "4", env=env)
    assert made.returncode == 0, made.stderr
    assert "4 partitions, 3 replicas each" in made.stderr
    admin = _admin(cluster)
    meta = admin.list_topics(timeout=10)
    assert all(len(p.replicas) == SIZE for p in meta.topics[topic].partitions.values())
    resource = ConfigResource(ConfigResource.Type.BROKER, str(cluster.nodes()[0].node_id))
    configs = admin.describe_configs([resource])[resource].result(timeout=10)
    wanted = {"default.replication.factor": "3", "min.insync.replicas": "2", "offsets.topic.replication.factor": "3",
              "transaction.state.log.replication.factor": "3", "transaction.state.log.min.isr": "2",
              "unclean.leader.election.enable": "false"}
    assert {k: configs[k].value for k in wanted} == wanted


def test_leader_killed_mid_run_nothing_acknowledged_is_lost_and_everyone_carries_on(
    cluster: LocalCluster, unique: Callable[[str], str], tmp_path: Path
) -> None:
    # The producer runs until told to stop, after the node is back: however long the restart takes
    # (10 s failover, then 30-90 s for a JVM start on this shared 2-core machine), it spans the outage.
    rate, partitions = 150, 6
    topic, strict, group = unique("ha"), unique("strict"), unique("g")
    admin = _admin(cluster)
    strict_topic = NewTopic(strict, 1, config={"min.insync.replicas": "3"})
    futures = admin.create_topics([NewTopic(topic, partitions), strict_topic])
    for future in futures.values():
        future.result(timeout=30)
    wait_until(lambda: topic in admin.list_topics(timeout=10).topics, 30, what="topic in metadata")
    record, log = tmp_path / "handled.txt", tmp_path / "consumers.log"
    env = script_env(cluster.bootstrap, MTC75_TEST_RECORD=str(record), MTC75_TEST_SLEEP="0.002")
    consumer_args = [sys.executable, str(ROOT / "mtc75_consumer.py"), "--topic", topic, "--group-id", group,
                     "--max-thread-count", "8", "--handler", "tests.recording_handler:handle", "-q"]
    consumers = []
    with open(log, "ab") as out:
        for _ in range(2):
            consumers.append(subprocess.Popen(consumer_args, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT))
    producer = subprocess.Popen(
        [sys.executable, str(ROOT / "producer.py"), "--topic", topic, "--count", "0", "--rate", str(rate), "-q"],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_until(lambda: len(read_records(record)) >= 500, 120, what="500 handled before the kill")
        leaders = {p.id: p.leader for p in admin.list_topics(topic, timeout=10).topics[topic].partitions.values()}
        victim = cluster.node(leaders[0])
        led = sorted(p for p, leader in leaders.items() if leader == victim.node_id)
        pid = victim.pid()
        assert pid is not None
        rss = {node.node_id: round(_rss_mb(p)) for node, p in cluster.status() if p is not None}
        os.kill(pid, signal.SIGKILL)
        killed_at, handled_at_kill = time.monotonic(), len(read_records(record))

        def moved() -> bool:
            now = _partitions(admin, topic)
            return bool(now) and all(now[p].leader not in (victim.node_id, -1) for p in led)

        wait_until(moved, 60, step=0.2, what="new leaders for the killed node's partitions")
        failover_s = time.monotonic() - killed_at
        wait_until(lambda: len(read_records(record)) > handled_at_kill + 200, 60, what="handling after failover")

        # acks=all is in force: with 2 of 3 replicas in sync, a topic needing 3 takes no write, and the
        # producer says so (exit 1, the count of failures) instead of dropping them silently.
        proof = run_script("producer.py", "--topic", strict, "--count", "5", "-q", "-X", "message.timeout.ms=4000",
                           env=env, timeout=60)
        assert proof.returncode == 1, proof.stdout + proof.stderr
        assert "delivered 0 failed 5" in proof.stdout and "5 messages failed" in proof.stderr, proof.stderr

        back = _launcher(cluster, "start")  # the launcher brings back only the missing node
        assert back.returncode == 0, back.stderr
        assert f"started node(s) {victim.node_id})" in back.stdout, back.stdout
        outage_s = time.monotonic() - killed_at

        def in_sync() -> bool:
            now = _partitions(admin, topic)
            return bool(now) and all(len(p.isrs) == SIZE for p in now.values())

        wait_until(in_sync, 60, step=0.5, what="the returned node back in every partition's ISR")
        after = len(read_records(record))
        wait_until(lambda: len(read_records(record)) >= after + 300, 60, what="handling with the node back")
        assert producer.poll() is None, "the producer stopped by itself"
        producer.send_signal(signal.SIGTERM)  # it flushes what is queued and reports
        out, err = producer.communicate(timeout=120)
        assert producer.returncode == 0, err
        done = re.search(r"done: sent (\d+) delivered (\d+) failed (\d+)", out)
        assert done is not None, out[-2000:]
        sent, n, failed = (int(x) for x in done.groups())
        assert failed == 0 and n == sent > 0
        ends = end_offsets(cluster.bootstrap, topic)
        wanted = all_offsets(ends)
        wait_until(lambda: wanted <= set(read_records(record)), 180, what="every offset handled")
        wait_until(lambda: committed_offsets(cluster.bootstrap, group, topic) == ends, 60, what="commits at end")
        for proc in consumers:
            assert proc.poll() is None, "a consumer gave up instead of carrying on"
            proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(timeout=60) for proc in consumers]
    finally:
        for proc in [*consumers, producer]:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    assert codes == [0, 0], log.read_text()[-3000:]
    # Every acknowledged record is in the log exactly once: ids 1..n (idempotence: no retry duplicates).
    assert sum(ends.values()) == n  # nothing beyond the acknowledged records either
    ids = Counter(json.loads(m.value())["id"] for m in read_topic(cluster.bootstrap, topic, n, timeout=60))
    assert sorted(ids) == list(range(1, n + 1))
    counts = Counter(read_records(record))
    offsets_meta = admin.list_topics("__consumer_offsets", timeout=10).topics["__consumer_offsets"].partitions
    assert all(len(p.replicas) == SIZE for p in offsets_meta.values())
    report_figures(
        "cluster_leader_kill", messages=n, acknowledged=n, lost=len(set(range(1, n + 1)) - set(ids)), in_log=len(ids),
        consumer_duplicates=sum(c - 1 for c in counts.values()), killed_node=victim.node_id,
        partitions_led=len(led), leader_failover_s=round(failover_s, 1), node_down_s=round(outage_s, 1),
        node_rss_mb=rss,
    )
