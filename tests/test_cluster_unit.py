"""Unit tests for the cluster side of mtc75.tools.broker: layout, config, folder checks, start/stop/status bookkeeping.

No Kafka, Maven or java: processes that look like brokers stand in for them (as in test_broker_unit.py).
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mtc75.errors import BrokerError
from mtc75.tools import broker
from mtc75.tools.broker import EphemeralPorts, LocalCluster, LocalKafka, Node, Quorum
from tests.conftest import TEST_PORT

UNIT_PORT = TEST_PORT + 500  # where these tests look for free ports: below the ephemeral range


def _props(path: Path) -> dict[str, str]:
    lines = path.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def _free_run(length: int) -> int:
    """A port p below the ephemeral range with p .. p+length-1 all free right now."""
    ephemeral = EphemeralPorts.of_this_machine()
    for port in range(UNIT_PORT, UNIT_PORT + 200):
        run = range(port, port + length)
        if all(p not in ephemeral and broker._port_free(p) for p in run):
            return port
    pytest.skip(f"no {length} adjacent free ports from {UNIT_PORT}")


QUORUM = Quorum("AAAAAAAAAAAAAAAAAAAAAA", (Node(1, 29092, 29093), Node(2, 29094, 29095), Node(3, 29096, 29097)))


@pytest.mark.parametrize("node", QUORUM.nodes)
def test_each_node_is_a_voter_with_replication_defaults_for_three(tmp_path: Path, node: Node) -> None:
    kafka = LocalKafka(node.port, home=tmp_path, quorum=QUORUM)
    kafka._write_config()
    props = _props(kafka.folder / "server.properties")
    assert kafka.node_id == node.node_id and props["node.id"] == str(node.node_id)
    assert props["controller.quorum.voters"] == "1@127.0.0.1:29093,2@127.0.0.1:29095,3@127.0.0.1:29097"
    assert "controller.quorum.bootstrap.servers" not in props  # static quorum: the voters say it all
    assert props["listeners"] == f"PLAINTEXT://127.0.0.1:{node.port},CONTROLLER://127.0.0.1:{node.controller_port}"
    assert props["log.dirs"] == str(tmp_path / str(node.port) / "data")
    assert (props["default.replication.factor"], props["min.insync.replicas"]) == ("3", "2")
    assert props["offsets.topic.replication.factor"] == props["transaction.state.log.replication.factor"] == "3"
    assert props["transaction.state.log.min.isr"] == props["share.coordinator.state.topic.min.isr"] == "2"
    assert props["unclean.leader.election.enable"] == "false"


def test_single_node_keeps_its_standalone_config(tmp_path: Path) -> None:
    kafka = LocalKafka(29092, home=tmp_path)
    kafka._write_config()
    props = _props(kafka.folder / "server.properties")
    assert "controller.quorum.voters" not in props and props["offsets.topic.replication.factor"] == "1"


def test_layout_takes_the_next_free_pairs_and_is_reused(tmp_path: Path) -> None:
    base = _free_run(9)
    with socket.socket() as busy:  # something else listens on base+2: node 2 must step over it
        busy.bind(("127.0.0.1", base + 2))
        busy.listen()
        cluster = LocalCluster(base, 3, home=tmp_path)
        quorum = cluster._plan()
    assert [(n.node_id, n.port, n.controller_port) for n in quorum.nodes] == [
        (1, base, base + 1), (2, base + 3, base + 4), (3, base + 5, base + 6)]
    for node in quorum.nodes:  # every node folder records the whole layout
        assert Quorum.from_json((tmp_path / str(node.port) / "cluster.json").read_text()) == quorum
    again = LocalCluster(base, 3, home=tmp_path)
    assert [n.port for n in again.nodes()] == [base, base + 3, base + 5]
    assert again.bootstrap == f"127.0.0.1:{base},127.0.0.1:{base + 3},127.0.0.1:{base + 5}"
    with pytest.raises(BrokerError, match=r"has 3 nodes, not 5; use BROKERS=3"):
        LocalCluster(base, 5, home=tmp_path).nodes()


def test_layout_keeps_every_node_below_the_ephemeral_range(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    base = _free_run(9)
    monkeypatch.setattr(broker, "_ephemeral", lambda: EphemeralPorts(base + 5, base + 1000))
    with pytest.raises(BrokerError, match=rf"outside the ephemeral range {base + 5}-{base + 1000}"):
        LocalCluster(base, 3, home=tmp_path)._plan()  # node 2 on base+2, node 3 would need base+4/base+5
    assert [n.port for n in LocalCluster(base, 2, home=tmp_path)._plan().nodes] == [base, base + 2]
    # Reserved ports are never handed out by the kernel: a node may take them.
    monkeypatch.setattr(broker, "_ephemeral", lambda: EphemeralPorts(base + 5, base + 1000, ((base + 5, base + 7),)))
    assert [n.port for n in LocalCluster(base, 3, home=tmp_path / "2")._plan().nodes] == [base, base + 2, base + 4]


def test_a_cluster_from_a_port_in_the_ephemeral_range_is_refused_before_its_layout(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(broker, "_ephemeral", lambda: EphemeralPorts(32768, 60999))
    code = broker.main(["start", "--port", "33092", "--brokers", "3", "--home", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 4 and err.startswith("broker: error: port 33092 ") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # no cluster.json recorded for ports it refused


def test_cluster_start_prints_the_export_line_with_every_node(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    quorum = LocalCluster(_free_run(9), 3, home=tmp_path)._plan()
    monkeypatch.setattr(LocalCluster, "start", lambda self, **kw: [1, 2, 3])
    first = quorum.nodes[0].port
    assert broker.main(["start", "--port", str(first), "--brokers", "3", "--home", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    every = ",".join(f"127.0.0.1:{n.port}" for n in quorum.nodes)
    assert out[0] == f"Kafka cluster of 3 is up at {every} (started node(s) 1, 2, 3)"
    assert out[-1] == f"export KAFKA_BOOTSTRAP_SERVERS={every}"


def test_layout_steps_over_another_nodes_folder(tmp_path: Path) -> None:
    base = _free_run(9)
    (tmp_path / str(base + 3)).mkdir()  # a stopped broker's folder: its ports are base+3, base+4
    quorum = LocalCluster(base, 2, home=tmp_path)._plan()
    assert quorum.nodes[1].port == base + 5


def test_a_cluster_node_folder_is_not_run_as_a_single_node_nor_the_reverse(tmp_path: Path) -> None:
    quorum = LocalCluster(_free_run(9), 3, home=tmp_path)._plan()
    second = quorum.nodes[1].port
    with pytest.raises(BrokerError, match=rf"node 2 of the 3-node cluster at port {quorum.nodes[0].port}.*BROKERS=3"):
        LocalKafka(second, home=tmp_path)._check_folder_kind()

    single = LocalKafka(29500, home=tmp_path)
    (single._data).mkdir(parents=True)
    (single._data / "meta.properties").write_text("node.id=1\n")
    lone = Quorum("x", (Node(1, 29500, 29501), Node(2, 29502, 29503)))
    with pytest.raises(BrokerError, match="holds a single-node broker's data"):
        LocalKafka(29500, home=tmp_path, quorum=lone)._check_folder_kind()


_FAKE = "import time; print('up', flush=True); time.sleep(120)"


@pytest.fixture
def fake_nodes() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def _impersonate(node: LocalKafka, procs: list[subprocess.Popen[str]]) -> subprocess.Popen[str]:
    node._write_config()
    proc = subprocess.Popen([sys.executable, "-c", _FAKE, "kafka.Kafka", str(node._server_props)],
                            stdout=subprocess.PIPE, text=True)
    procs.append(proc)
    assert proc.stdout is not None and proc.stdout.readline() == "up\n"
    node._pid_file.write_text(f"{proc.pid}\n")
    return proc


def test_start_launches_only_the_missing_nodes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_nodes: list[subprocess.Popen[str]]
) -> None:
    cluster = LocalCluster(_free_run(9), 3, home=tmp_path)
    cluster._plan()
    nodes = cluster.nodes()
    _impersonate(nodes[0], fake_nodes)
    _impersonate(nodes[2], fake_nodes)
    launched: list[int] = []
    monkeypatch.setattr(LocalKafka, "_launch", lambda self: launched.append(self.node_id))
    monkeypatch.setattr(LocalKafka, "wait_ready", lambda self, timeout: None)
    monkeypatch.setattr(LocalCluster, "_wait_all_listed", lambda self, nodes, deadline: None)

    assert cluster.start(timeout=5) == [2]
    assert launched == [2]


def test_status_lists_every_node_and_stop_signals_only_ours(
    tmp_path: Path, fake_nodes: list[subprocess.Popen[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    base = _free_run(9)
    cluster = LocalCluster(base, 3, home=tmp_path)
    cluster._plan()
    one, two, three = cluster.nodes()
    p1, p3 = _impersonate(one, fake_nodes), _impersonate(three, fake_nodes)
    stranger = subprocess.Popen([sys.executable, "-c", _FAKE], stdout=subprocess.PIPE, text=True)
    fake_nodes.append(stranger)
    two._pid_file.write_text(f"{stranger.pid}\n")  # a pid file naming some other program

    assert [(n.node_id, pid) for n, pid in cluster.status()] == [(1, p1.pid), (2, None), (3, p3.pid)]
    code = broker.main(["status", "--port", str(base), "--brokers", "3", "--home", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    assert code == 1 and len(lines) == 3
    assert lines[0].startswith(f"node 1  127.0.0.1:{base}  controller :{base + 1}  running (pid {p1.pid})")
    assert "node 2" in lines[1] and "not running" in lines[1]

    assert cluster.stop(timeout=10) == [1, 3]
    assert p1.wait(timeout=5) < 0 and p3.wait(timeout=5) < 0
    assert stranger.poll() is None  # not ours: untouched
    assert all(pid is None for _node, pid in cluster.status())


def test_status_of_a_cluster_never_started(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = broker.main(["status", "--port", "29700", "--brokers", "3", "--home", str(tmp_path)])
    assert code == 1
    assert capsys.readouterr().out == "no MTC75 cluster of 3 at port 29700 (never started)\n"


def test_bad_cluster_size_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        broker.main(["status", "--brokers", "0"])
    assert caught.value.code == 2 and "not a usable number of brokers" in capsys.readouterr().err


# -- what the cluster changes for clients ---------------------------------------------------------


@pytest.mark.parametrize(("brokers", "replicas"), [(1, 1), (2, 2), (3, 3), (5, 3), (0, 1)])
def test_auto_replication_is_one_per_broker_at_most_three(brokers: int, replicas: int) -> None:
    from mtc75.kafka.topics import auto_replication

    assert auto_replication(brokers) == replicas


def test_replication_defaults_to_auto_and_the_producer_waits_for_every_in_sync_replica() -> None:
    from mtc75.kafka.topics import AUTO_REPLICATION
    from mtc75.settings import Settings

    settings = Settings()
    assert settings.REPLICATION_FACTOR == AUTO_REPLICATION == 0
    conf = settings.producer_config()
    assert conf["acks"] == "all" and conf["enable.idempotence"] is True
    assert settings.producer_config({"acks": "1"})["acks"] == "1"  # -X still wins
