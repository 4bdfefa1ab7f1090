"""A 3-node Kafka cluster losing a partition leader to kill -9 while a producer and a consumer group run.

The module starts one cluster of its own (tests/local_kafka.py: its own folder, MTC75_TEST_CLUSTER_KAFKA_PORT
or the session port + 20, or the next free ports), shared by its tests and stopped at the end. It never
touches the session's broker, the fault tests' broker, or anything another suite started.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, PartitionMetadata

from mtc75.tools.broker import LocalCluster, LocalKafka
from tests.conftest import TEST_PORT
from tests.kafka_helpers import (
    ROOT,
    all_offsets,
    committed_offsets,
    end_offsets,
    read_colon_lines,
    read_records,
    read_topic,
    report_figures,
    run_script,
    script_env,
    start_consumer,
    stop_process,
    wait_until,
)
from tests.local_kafka import REPO_LIBS, owned_cluster, session_folder
from tests.test_share_groups import produce_small_batches, set_group_config, share_two_members

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


def _with_topic(cluster: LocalCluster, topic: str, partitions: int) -> AdminClient:
    """An admin client of ``cluster``, once it created ``topic`` and every partition is in its metadata."""
    admin = _admin(cluster)
    admin.create_topics([NewTopic(topic, partitions)])[topic].result(timeout=30)
    wait_until(lambda: len(_partitions(admin, topic)) == partitions, 30, what="topic in metadata")
    return admin


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


def test_share_groups_work_on_the_cluster_with_their_state_on_every_node(
    cluster: LocalCluster, unique: Callable[[str], str]
) -> None:
    topic, group, count = unique("share"), unique("share-g"), 200
    admin = _admin(cluster)
    admin.create_topics([NewTopic(topic, 3)])[topic].result(timeout=30)
    wait_until(lambda: topic in admin.list_topics(timeout=10).topics, 30, what="topic in metadata")
    set_group_config(cluster.bootstrap, group, share_auto_offset_reset="earliest")
    produce_small_batches(cluster.bootstrap, topic, count)

    got = share_two_members(cluster.bootstrap, topic, group, count)

    assert sorted(got[0] + got[1]) == list(range(count)) and got[0] and got[1]
    assert all((node.finalized_features() or {}).get("share.version", 0) >= 1 for node in cluster.nodes())
    state = admin.list_topics("__share_group_state", timeout=10).topics["__share_group_state"].partitions
    assert state and all(len(p.replicas) == SIZE for p in state.values())  # share-group state survives a node


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


# -- issue 22: commits through the loss of one node, and of the quorum ------------------------------------------


def _coordinator(admin: AdminClient, group: str, bootstrap: str) -> int:
    """The node id of ``group``'s coordinator (-1: unknown now): the leader of its partition of the offsets
    topic, which Kafka picks as abs(hashCode(group)) % partitions. Asked from metadata: describe_consumer_groups,
    retried on a new cluster, tripped a librdkafka assertion in the test process."""
    offsets = "__consumer_offsets"
    if not _partitions(admin, offsets):  # a new cluster: the first coordinator lookup creates the topic
        probe = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
        try:
            with contextlib.suppress(KafkaException):
                probe.committed([TopicPartition(offsets, 0)], timeout=10)
        finally:
            probe.close()
        wait_until(lambda: bool(_partitions(admin, offsets)), 60, step=0.5, what="the offsets topic")
    code = 0
    for char in group:
        code = (31 * code + ord(char)) & 0xFFFFFFFF
    code = code - (1 << 32) if code >= 1 << 31 else code
    parts = _partitions(admin, offsets)
    if not parts:
        return -1  # no metadata now (asked of the node just killed): unknown
    return parts[(0 if code == -(1 << 31) else abs(code)) % len(parts)].leader


class _Feed(threading.Thread):
    """Produces numbered JSON records at ``rate`` per second until stopped; counts what was acknowledged."""

    def __init__(self, bootstrap: str, topic: str, rate: float) -> None:
        super().__init__(name="test-feed", daemon=True)
        self._producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "acks": "all",
                                   "enable.idempotence": True, "message.timeout.ms": 300_000})
        self._topic, self._rate = topic, rate
        self._stop_event = threading.Event()
        self.sent = self.acked = self.failed = 0

    def _report(self, err: object, _msg: object) -> None:
        if err is None:
            self.acked += 1
        else:
            self.failed += 1

    def run(self) -> None:
        step = 1.0 / self._rate
        while not self._stop_event.wait(step):
            try:
                self._producer.produce(self._topic, json.dumps({"id": self.sent}).encode(), key=str(self.sent),
                                       on_delivery=self._report)
                self.sent += 1
            except BufferError:
                pass
            self._producer.poll(0)

    def stop(self) -> None:
        """Stop producing and wait (bounded) for every record to be acknowledged or failed."""
        self._stop_event.set()
        self.join(timeout=10)
        left = self._producer.flush(120)
        assert left == 0 and self.failed == 0, f"feed: {left} unacknowledged, {self.failed} failed"


class _Commits(threading.Thread):
    """Reads the group's committed offsets every ``step`` seconds (a client that never joins the group):
    ``samples`` holds (time, {partition: offset}) for each read that answered."""

    def __init__(self, bootstrap: str, group: str, topic: str, partitions: int, step: float = 0.5) -> None:
        super().__init__(name="test-commits", daemon=True)
        self._consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
        self._tps = [TopicPartition(topic, p) for p in range(partitions)]
        self._step = step
        self._stop_event = threading.Event()
        self.samples: list[tuple[float, dict[int, int]]] = []

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                got = self._consumer.committed(self._tps, timeout=2)
                self.samples.append((time.monotonic(), {tp.partition: tp.offset for tp in got}))
            except KafkaException:
                pass  # the coordinator is moving: no sample
            self._stop_event.wait(self._step)

    def covering(self, target: dict[int, int], since: float) -> float | None:
        """When the first sample taken after ``since`` had every partition committed at or past ``target``."""
        for at, offsets in self.samples:
            if at > since and all(offsets.get(p, -1) >= o for p, o in target.items()):
                return at
        return None

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)
        self._consumer.close()


def _handled_prefix(record: Path, partitions: int) -> dict[int, int]:
    """Per partition, the end of the contiguous prefix of handled offsets (what a full commit covers)."""
    seen: dict[int, set[int]] = {p: set() for p in range(partitions)}
    for p, o in read_records(record):
        seen[p].add(o)
    prefix = {}
    for p, offsets in seen.items():
        n = 0
        while n in offsets:
            n += 1
        prefix[p] = n
    return prefix


def test_a_killed_coordinator_stops_commits_only_until_the_group_has_a_new_one(
    cluster: LocalCluster, unique: Callable[[str], str], tmp_path: Path
) -> None:
    """Issue 22 item 1: kill -9 the group's coordinator and keep it down. The consumer goes on handling
    through the other two nodes; its commits must resume within seconds (a new coordinator, a topic-id
    check that does not wait on the dead node), keep going while the node stays down, and a SIGTERM in that
    state commits everything handled."""
    partitions, rate, shutdown = 3, 100, 10
    topic, group = unique("kc"), unique("g")
    admin = _with_topic(cluster, topic, partitions)
    record, log = tmp_path / "handled.txt", tmp_path / "consumer.log"
    env = script_env(cluster.bootstrap, MTC75_TEST_RECORD=str(record), MTC75_TEST_SLEEP="0.002")
    feed, commits = _Feed(cluster.bootstrap, topic, rate), _Commits(cluster.bootstrap, group, topic, partitions)
    feed.start()
    proc = start_consumer(["--topic", topic, "--group-id", group, "--max-thread-count", "4", "--shutdown-timeout",
                           str(shutdown), "--handler", "tests.recording_handler:handle"], env, log)
    victim = None
    try:
        commits.start()
        wait_until(lambda: len(read_records(record)) >= 300 and commits.covering({0: 1, 1: 1, 2: 1}, 0) is not None,
                   120, what="300 handled and a commit on every partition")
        victim = cluster.node(_coordinator(admin, group, cluster.bootstrap))
        pid = victim.pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        time.sleep(1.0)
        target = _handled_prefix(record, partitions)  # handled after the kill: only a new commit covers it
        handled_after_kill = len(read_records(record))

        def moved() -> bool:
            return _coordinator(admin, group, cluster.bootstrap) not in (victim.node_id, -1)

        wait_until(moved, 60, step=0.5, what="a new coordinator")
        new_coordinator_s = time.monotonic() - killed_at
        wait_until(lambda: commits.covering(target, killed_at) is not None, 60, step=0.5,
                   what="a commit of what was handled after the kill (node still down)")
        covered_at = commits.covering(target, killed_at)
        assert covered_at is not None
        resumed_s = covered_at - killed_at
        # The node stays down: commits go on, never stalling for long.
        watch_from = time.monotonic()
        time.sleep(20.0)
        gaps, last = [], None
        for at, offsets in commits.samples:
            if at < watch_from:
                continue
            total = sum(offsets.values())
            if last is None or total > last[1]:
                if last is not None:
                    gaps.append(at - last[0])
                last = (at, total)
        longest_gap_s = max(gaps) if gaps else float("inf")
        assert proc.poll() is None, log.read_text()[-3000:]
        assert len(read_records(record)) > handled_after_kill + 500, "handling stalled with the node down"
        # SIGTERM with the node still down and the feed running: what was handled is committed.
        proc.send_signal(signal.SIGTERM)
        term_at = time.monotonic()
        code = proc.wait(timeout=shutdown + 30)
        exit_s = time.monotonic() - term_at
        feed.stop()
        final = committed_offsets(cluster.bootstrap, group, topic)
        prefix = _handled_prefix(record, partitions)
        text = log.read_text()
        assert code == 0, text[-3000:]
        assert "not committing" not in text, text[-3000:]
        assert final == prefix, f"committed {final}, handled prefix {prefix}"
        assert resumed_s <= 30, f"commits resumed {resumed_s:.1f}s after the kill (new coordinator after " \
                                f"{new_coordinator_s:.1f}s)"
        assert longest_gap_s <= 10, f"commits stalled {longest_gap_s:.1f}s with the node down"
        assert exit_s <= shutdown + 5
    finally:
        commits.stop()
        stop_process(proc)
        if feed.is_alive():
            feed.stop()
        if victim is not None and victim.pid() is None:
            back = _launcher(cluster, "start")
            assert back.returncode == 0, back.stderr
    report_figures(
        "cluster_coordinator_killed", killed_node=victim.node_id, new_coordinator_s=round(new_coordinator_s, 1),
        commits_resumed_s=round(resumed_s, 1), longest_commit_gap_node_down_s=round(longest_gap_s, 1),
        sigterm_exit_s=round(exit_s, 1), committed_equals_handled=final == prefix, handled=len(read_records(record)),
    )


def test_two_nodes_down_the_consumer_waits_and_commits_again_once_they_are_back(
    cluster: LocalCluster, unique: Callable[[str], str], tmp_path: Path
) -> None:
    """Issue 22 item 1, the quorum: kill -9 two nodes of three (the coordinator and one more) for 30 s. One
    node still answers, so the consumer waits (it exits 3 only when no broker at all answers for
    BROKER_DOWN_TIMEOUT); once the nodes are back it commits again, and nothing acknowledged is lost."""
    partitions, rate, outage = 3, 50, 30.0
    topic, group = unique("q"), unique("g")
    admin = _with_topic(cluster, topic, partitions)
    record, log = tmp_path / "handled.txt", tmp_path / "consumer.log"
    env = script_env(cluster.bootstrap, MTC75_TEST_RECORD=str(record), MTC75_TEST_SLEEP="0.002")
    feed, commits = _Feed(cluster.bootstrap, topic, rate), _Commits(cluster.bootstrap, group, topic, partitions)
    feed.start()
    proc = start_consumer(["--topic", topic, "--group-id", group, "--max-thread-count", "4",
                           "--handler", "tests.recording_handler:handle"], env, log)
    victims: list[LocalKafka] = []
    try:
        commits.start()
        wait_until(lambda: len(read_records(record)) >= 200 and commits.covering({0: 1, 1: 1, 2: 1}, 0) is not None,
                   120, what="200 handled and a commit on every partition")
        coordinator = _coordinator(admin, group, cluster.bootstrap)
        other = next(node.node_id for node in cluster.nodes() if node.node_id != coordinator)
        victims = [cluster.node(coordinator), cluster.node(other)]
        for node in victims:
            pid = node.pid()
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
        down_at = time.monotonic()
        time.sleep(outage)
        running_through_outage = proc.poll() is None
        back = _launcher(cluster, "start")
        assert back.returncode == 0, back.stderr
        back_at = time.monotonic()
        time.sleep(5.0)
        target = _handled_prefix(record, partitions)  # handled after the nodes came back
        wait_until(lambda: commits.covering(target, back_at) is not None, 120, step=0.5,
                   what="a commit of what was handled after the nodes came back")
        covered_at = commits.covering(target, back_at)
        assert covered_at is not None
        feed.stop()
        ends = end_offsets(cluster.bootstrap, topic)
        wait_until(lambda: all_offsets(ends) <= set(read_records(record)), 120, what="every offset handled")
        wait_until(lambda: committed_offsets(cluster.bootstrap, group, topic) == ends, 60, what="commits at the end")
        still_running = proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        commits.stop()
        stop_process(proc)
        if feed.is_alive():
            feed.stop()
        if any(node.pid() is None for node in victims):
            _launcher(cluster, "start")
    text = log.read_text()
    assert running_through_outage and still_running, text[-3000:]
    assert code == 0, text[-3000:]
    assert sum(ends.values()) == feed.acked
    lost = len(all_offsets(ends) - set(read_records(record)))
    report_figures(
        "cluster_quorum_lost", killed_nodes=[node.node_id for node in victims], outage_s=round(back_at - down_at, 1),
        commits_after_back_s=round(covered_at - back_at, 1), acknowledged=feed.acked, lost=lost, exit_code=code,
        handled=len(read_records(record)),
    )


def _send(bootstrap: str, topic: str, records: list[dict[str, object]]) -> None:
    """JSON records to partition 0, each acknowledged (bounded)."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "acks": "all"})
    failed: list[object] = []
    for record in records:
        producer.produce(topic, json.dumps(record).encode(), partition=0,
                         on_delivery=lambda err, _m: err is not None and failed.append(err))
    assert producer.flush(60) == 0 and not failed, failed


def test_sigterm_with_the_cluster_degraded_exits_within_shutdown_timeout_and_a_few_seconds(
    cluster: LocalCluster, unique: Callable[[str], str], tmp_path: Path
) -> None:
    """Issue 22 item 2: SIGTERM just after the group's coordinator was killed, while a handler hangs, a
    dead-letter record waits for its leader (the killed node) and finished work waits for the final commit
    (no periodic commit: COMMIT_INTERVAL 300 s). Every wait of the shutdown -- the handler, the dead letter,
    the topic-id check, the final commit (which waits for a new coordinator), close() -- shares one deadline:
    the process exits within SHUTDOWN_TIMEOUT + a few seconds, and commits nothing past the hung message."""
    shutdown, slack = 2.0, 6.0  # slack: as test_faults_hardening.py's hung-handler tests (EXIT_SLACK)
    topic, group = unique("sd"), unique("g")
    admin = _admin(cluster)
    coordinator = _coordinator(admin, group, cluster.bootstrap)
    a, b = (node.node_id for node in cluster.nodes() if node.node_id != coordinator)
    # The source partition lives on the two nodes that stay up (a write to it is acknowledged at once after
    # the kill); the dead-letter topic is led by the coordinator.
    futures = admin.create_topics([
        NewTopic(topic, num_partitions=1, replica_assignment=[[a, b]]),
        NewTopic(f"{topic}.dlq", num_partitions=1, replica_assignment=[[coordinator, a, b]]),
    ])
    for future in futures.values():
        future.result(timeout=30)
    wait_until(lambda: len(_partitions(admin, topic)) == 1 and len(_partitions(admin, f"{topic}.dlq")) == 1, 30,
               what="topics in metadata")
    _send(cluster.bootstrap, topic, [{"id": i} for i in range(20)])
    record, log = tmp_path / "handled.txt", tmp_path / "consumer.log"
    env = script_env(cluster.bootstrap, MTC75_TEST_RECORD=str(record))
    proc = start_consumer(["--topic", topic, "--group-id", group, "--max-thread-count", "2", "--on-failure", "dlq",
                           "--max-attempts", "1", "--shutdown-timeout", str(shutdown), "--commit-interval", "300",
                           "--handler", "tests.hardening_handler:handle"], env, log)
    victim = cluster.node(coordinator)
    try:
        wait_until(lambda: len(read_colon_lines(record, 4)) >= 20, 120, what="20 handled")
        _send(cluster.bootstrap, topic, [{"id": 20, "act": "hang"}])
        time.sleep(1.0)  # the hang runs
        pid = victim.pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        # 21's dead letter waits for the dead leader; 22-29 finish above the hung 20 (an offset map to commit)
        _send(cluster.bootstrap, topic, [{"id": 21, "act": "fail"}, *({"id": i} for i in range(22, 30))])
        wait_until(lambda: len(read_colon_lines(record, 4)) >= 28, 30, what="22-29 handled")
        proc.send_signal(signal.SIGTERM)
        term_at = time.monotonic()
        try:
            code = proc.wait(timeout=shutdown + 60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running 60 s past SHUTDOWN_TIMEOUT: {log.read_text()[-3000:]}")
        exit_s = time.monotonic() - term_at
    finally:
        stop_process(proc)
        if victim.pid() is None:
            back = _launcher(cluster, "start")
            assert back.returncode == 0, back.stderr
    text = log.read_text()
    committed = committed_offsets(cluster.bootstrap, group, topic)[0]
    assert code == 0, text[-3000:]
    assert "abandoned 1 handlers" in text, text[-3000:]
    assert committed <= 20, f"committed {committed}, past the hung message at offset 20"
    assert exit_s <= shutdown + slack, f"exit {exit_s:.1f}s after SIGTERM (SHUTDOWN_TIMEOUT {shutdown:g}s)"
    report_figures("cluster_degraded_shutdown", shutdown_timeout_s=shutdown, exit_after_s=round(exit_s, 1),
                   exit_code=code, committed=committed, killed_node=coordinator)
