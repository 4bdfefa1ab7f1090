"""Run a local Apache Kafka 4.4 (KRaft, share groups on) for the demo and the tests: one node, or a cluster of N.

The broker is plain ``java`` on jars that Maven fetches once from the pom shipped
in this package (``kafka-pom.xml``), so neither Docker nor a Kafka download is
needed.  State is kept per port under a home folder so that the demo broker and a
test broker on another port can run side by side.  The home is ``<repo>/.kafka``
when this module runs from a source checkout, else (an installed wheel)
``$XDG_CACHE_HOME/mtc75`` or ``~/.cache/mtc75``; ``--home`` moves the node folders::

    <home>/libs/                  jars, shared by all ports (always in the default home)
    <home>/<port>/data/           log.dirs, formatted on first start
    <home>/<port>/broker.log      the broker log of the current (or last) run
    <home>/<port>/broker.out      JVM stdout/stderr, appended across runs
    <home>/<port>/broker.pid      pid of the java process
    <home>/<port>/cluster.json    only in a cluster's node folders: the cluster id and every node's ports

A node listens for clients on ``<port>`` and for the KRaft quorum on ``<port>+1``.
A cluster of N (``--brokers N``) is N such nodes, each broker *and* controller
(a static quorum of N voters): node 1 on ``KAFKA_PORT``, node k on the next pair
of free ports above node k-1's, recorded in every node's cluster.json at the
first start and reused after.  ``start`` starts only the nodes that are not
running (a killed node comes back), ``stop`` stops them all, ``status`` lists them.

No node starts on a port in the kernel's ephemeral range (``ip_local_port_range``,
less ``ip_local_reserved_ports``): there a client reconnecting to a stopped node
can be given that very port as its source port and connect to itself, holding the
port so that the node cannot come back (seen 8 of 8 times on 4909x).

Which thread may call: any, one call at a time per object; launchers in other
processes are serialised by lock files in the node folders.

Usage: ``python -m mtc75.tools.broker {fetch,start,stop,status} [--port N] [--brokers N] [--home DIR]``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from mtc75.errors import BrokerError

__all__ = [
    "DEFAULT_PORT", "EphemeralPorts", "LocalCluster", "LocalKafka", "Node", "Quorum", "checkout_root",
    "default_home", "main",
]

DEFAULT_PORT = 9092
JAVA_MIN_VERSION = 17

_log = logging.getLogger(__name__)

_HOST = "127.0.0.1"
_MAX_PORT = 65534  # port + 1 is the controller
_NODE_ID = 1
_POM = Path(__file__).with_name("kafka-pom.xml")  # package data: an installed copy fetches from it too
_MARKER = ".pom.sha256"  # written into libs/ last: its presence means "complete"
# Share groups (KIP-932, GA since Kafka 4.2): a cluster formatted by 4.2+ has them by default; named at
# format time so that a Kafka bump cannot drop them silently (the share-group tests check the result).
_FORMAT_FEATURES = ("share.version=2",)
_PORT_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_RESERVED_PORTS_FILE = Path("/proc/sys/net/ipv4/ip_local_reserved_ports")
_IANA_EPHEMERAL = (49152, 65535)  # where there is no procfs (macOS, the BSDs use this range by default)
_JVM_OPTS = ("-Xms256m", "-Xmx1g")
# A cluster node gets half the single node's heap and one GC thread: three JVMs share 2 cores with the
# test suite. Measured mid-run in tests/test_cluster.py: 330-380 MB RSS per node (1 GB heap: 400-640 MB).
_CLUSTER_JVM_OPTS = ("-Xms128m", "-Xmx512m", "-XX:ParallelGCThreads=1", "-XX:ConcGCThreads=1")
_LAYOUT = "cluster.json"
_PORT_SCAN = 200  # how far above the previous node a cluster looks for a free pair of ports
_POLL = 0.25  # seconds between readiness rounds

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_MVN_NOISE = re.compile(r"^(To see the full|Re-run Maven|For more information|\[Help \d+\])")
_LOG_ERROR = re.compile(r"^\[[^\]]*\] (ERROR|FATAL) ")  # our log4j layout, below
_JAVA_EXCEPTION = re.compile(r'^(?:Exception in thread "[^"]*" )?([\w.$]+(?:Exception|Error)\b.*)')
_FINALIZED = re.compile(r"FinalizedFeatures\(.*?finalizedFeatures=\{([^}]*)\}")


@dataclass(frozen=True)
class Node:
    """One cluster node's identity: its KRaft node id, client port and controller port."""

    node_id: int
    port: int
    controller_port: int


@dataclass(frozen=True)
class Quorum:
    """A static KRaft quorum: every node is a broker and a voting controller."""

    cluster_id: str
    nodes: tuple[Node, ...]

    def node(self, port: int) -> Node:
        for node in self.nodes:
            if node.port == port:
                return node
        raise BrokerError(f"port {port} is not a node of the cluster at port {self.nodes[0].port}")

    def server_properties(self) -> dict[str, str]:
        """What a cluster node adds to the single node's server.properties."""
        replicas = min(len(self.nodes), 3)
        min_isr = max(1, replicas - 1)  # 3 replicas: an acknowledged write survives losing any one node
        return {
            "controller.quorum.voters": ",".join(f"{n.node_id}@{_HOST}:{n.controller_port}" for n in self.nodes),
            "default.replication.factor": str(replicas),
            "min.insync.replicas": str(min_isr),
            "offsets.topic.replication.factor": str(replicas),
            "transaction.state.log.replication.factor": str(replicas),
            "transaction.state.log.min.isr": str(min_isr),
            "share.coordinator.state.topic.replication.factor": str(replicas),
            "share.coordinator.state.topic.min.isr": str(min_isr),
            "unclean.leader.election.enable": "false",
            # Three JVMs on 2 cores: fewer request threads than the defaults (3 network, 8 I/O).
            "num.network.threads": "2",
            "num.io.threads": "2",
        }

    def to_json(self) -> str:
        nodes = [{"node_id": n.node_id, "port": n.port, "controller_port": n.controller_port} for n in self.nodes]
        return json.dumps({"cluster_id": self.cluster_id, "nodes": nodes}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Quorum:
        raw = json.loads(text)
        nodes = tuple(Node(int(n["node_id"]), int(n["port"]), int(n["controller_port"])) for n in raw["nodes"])
        return cls(str(raw["cluster_id"]), nodes)


@dataclass(frozen=True)
class EphemeralPorts:
    """The ports the kernel hands out as source ports of outgoing connections: where no node may listen.

    ``first``-``last`` is ``ip_local_port_range``; ``reserved`` are the ``(low, high)`` spans of
    ``ip_local_reserved_ports``, which the kernel never hands out, so a node may listen there.
    """

    first: int
    last: int
    reserved: tuple[tuple[int, int], ...] = ()
    source: str = str(_PORT_RANGE_FILE)

    def __contains__(self, port: object) -> bool:
        if not isinstance(port, int) or not self.first <= port <= self.last:
            return False
        return not any(low <= port <= high for low, high in self.reserved)

    @classmethod
    def of_this_machine(
        cls, range_file: Path = _PORT_RANGE_FILE, reserved_file: Path = _RESERVED_PORTS_FILE
    ) -> EphemeralPorts:
        """Read from procfs; the IANA range 49152-65535 where it cannot be read (no procfs)."""
        try:
            first, last = (int(word) for word in range_file.read_text().split())
        except (OSError, ValueError):
            return cls(*_IANA_EPHEMERAL, source="the IANA default (no ip_local_port_range here)")
        reserved: list[tuple[int, int]] = []
        with contextlib.suppress(OSError, ValueError):  # "8080,9000-9100" or empty
            for item in filter(None, reserved_file.read_text().strip().split(",")):
                low, _, high = item.partition("-")
                reserved.append((int(low), int(high or low)))
        return cls(first, last, tuple(reserved), str(range_file))

    def check(self, port: int) -> None:
        """Raise BrokerError unless both ``port`` and its controller port ``port+1`` are outside the range."""
        inside = [p for p in (port, port + 1) if p in self]
        if inside:
            raise BrokerError(
                f"port {port} (with its controller port {port + 1}) lies in this machine's ephemeral port range"
                f" {self.first}-{self.last} ({self.source}): a client reconnecting to a stopped broker there can"
                f" connect to itself and hold the port; use a port below {self.first}, e.g. KAFKA_PORT=19092,"
                f" or reserve both: sysctl -w net.ipv4.ip_local_reserved_ports={port}-{port + 1}"
            )


def checkout_root() -> Path | None:
    """The source checkout this module runs from, or None when it runs from an installed wheel."""
    root = Path(__file__).resolve().parents[2]
    try:
        return root if 'name = "mtc75"' in (root / "pyproject.toml").read_text() else None
    except OSError:
        return None


def default_home() -> Path:
    """``<repo>/.kafka`` in a checkout, else ``$XDG_CACHE_HOME/mtc75`` (``~/.cache/mtc75``): jars and node folders."""
    root = checkout_root()
    if root is not None:
        return root / ".kafka"
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "mtc75"


class LocalKafka:
    """One local Kafka broker+controller on ``127.0.0.1:<port>``.

    The controller listens on ``port + 1``.  The java process runs in its own
    session and outlives this object and the Python process that started it;
    the pid file is how later calls (``stop``, ``status``) find it again.
    """

    def __init__(
        self, port: int = DEFAULT_PORT, home: Path | None = None, *, libs: Path | None = None,
        quorum: Quorum | None = None,
    ) -> None:
        if not 0 < port <= _MAX_PORT:
            raise BrokerError(f"invalid Kafka port {port}: need 1-{_MAX_PORT} (port+1 is the controller)")
        self._port = port
        self._controller_port = port + 1
        self._home = (default_home() if home is None else home).absolute()
        self._libs = (self._home / "libs" if libs is None else libs).absolute()
        # None: a single node formatted --standalone; else one voter of a static quorum.
        self._quorum = quorum
        self._node_id = _NODE_ID if quorum is None else quorum.node(port).node_id
        self._dir = self._home / str(port)
        self._data = self._dir / "data"
        self._server_props = self._dir / "server.properties"
        self._log4j_props = self._dir / "log4j2.properties"
        self._log = self._dir / "broker.log"
        self._out = self._dir / "broker.out"
        self._pid_file = self._dir / "broker.pid"
        # Set by start(): the child we spawned (kept so we can reap it) and where
        # this run's output begins in the append-only broker.out.
        self._proc: subprocess.Popen[bytes] | None = None
        self._out_offset = 0

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.bootstrap} home={self._home}>"

    @property
    def bootstrap(self) -> str:
        """The ``bootstrap.servers`` value for clients."""
        return f"{_HOST}:{self._port}"

    @property
    def log_path(self) -> Path:
        """The broker log of the current (or last) run."""
        return self._log

    @property
    def port(self) -> int:
        return self._port

    @property
    def node_id(self) -> int:
        return self._node_id

    @property
    def folder(self) -> Path:
        """``<home>/<port>``: config, data, logs and the pid file of this node."""
        return self._dir

    def pid(self) -> int | None:
        """The pid of our running broker (from our pid file, checked), or None."""
        return self._live_pid()

    def fetch(self) -> None:
        """Download the Kafka jars with Maven unless ``libs/`` matches the pom.

        Maven fills a temporary directory that is renamed into place only
        once it is complete, so an interrupted fetch is never mistaken for a
        finished one.
        """
        try:
            digest = hashlib.sha256(_POM.read_bytes()).hexdigest()
        except OSError as exc:
            raise BrokerError(f"cannot read {_POM} ({exc.strerror}); restore it, or reinstall mtc75") from None
        if self._libs_match(digest):
            return
        mvn = shutil.which("mvn")
        if mvn is None:
            raise BrokerError(
                "Maven (mvn) is not on PATH but is needed once to download the Kafka"
                " jars; install it (e.g. apt-get install maven) and retry"
            )
        with _locked(self._home / ".fetch.lock"):
            if self._libs_match(digest):  # another launcher fetched meanwhile
                return
            _log.info("fetching Kafka jars into %s (first run only)", self._libs)
            tmp = Path(tempfile.mkdtemp(prefix=".libs-", dir=self._home))
            try:
                goal = ["dependency:copy-dependencies", "-DincludeScope=runtime", f"-DoutputDirectory={tmp}"]
                res = _run([mvn, "-q", "-B", "-Dstyle.color=never", "-f", str(_POM), *goal])
                if res.returncode != 0:
                    raise BrokerError(
                        f"Maven could not fetch the Kafka jars: {_maven_reason(res.stdout)}"
                        f"; check access to Maven Central and {_POM}"
                    )
                if not any(tmp.glob("*.jar")):
                    raise BrokerError(f"Maven fetched no jars; check {_POM}")
                (tmp / _MARKER).write_text(digest + "\n")
                if self._libs.exists():
                    old = Path(tempfile.mkdtemp(prefix=".libs-old-", dir=self._home))
                    self._libs.rename(old / "libs")
                    shutil.rmtree(old, ignore_errors=True)
                tmp.rename(self._libs)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

    def is_running(self) -> bool:
        """Whether our pid file names a live ``kafka.Kafka`` using our config."""
        return self._live_pid() is not None

    def start(self, timeout: float = 90.0) -> bool:
        """Start the broker and wait until it answers metadata requests.

        Returns False (at once, if it answers) when our broker was already
        running, True when this call started it.  If startup fails the new
        process is killed, so a broken broker never lingers.
        """
        if self._live_pid() is None:
            _ephemeral().check(self._port)  # before the lock creates the node folder
        with _locked(self._dir / ".lock"):
            if self._live_pid() is not None:
                if not self._answers(timeout=min(timeout, 2.0)):
                    self.wait_ready(timeout)  # e.g. still starting from another call
                self.warn_without_share_groups()
                return False
            self._launch()
            try:
                self.wait_ready(timeout)
            except BaseException:
                self._kill_spawned()
                raise
            self.warn_without_share_groups()
            return True

    def _launch(self) -> None:
        """Check the ports, write the config, format on first use and spawn; the caller holds our lock."""
        self._check_folder_kind()
        _ephemeral().check(self._port)
        self._check_ports_free()
        java = _find_java()
        self.fetch()
        self._write_config()
        if not (self._data / "meta.properties").exists():
            self._format(java)
        self._spawn(java)

    def _check_folder_kind(self) -> None:
        """Refuse to run a cluster node's data as a single node, or the reverse (the node ids would clash)."""
        layout = _read_layout(self._dir / _LAYOUT)
        formatted = (self._data / "meta.properties").exists()
        if self._quorum is None and layout is not None:
            first = layout.nodes[0].port
            raise BrokerError(
                f"{self._dir} holds node {layout.node(self._port).node_id} of the {len(layout.nodes)}-node cluster"
                f" at port {first}; start it with 'make broker BROKERS={len(layout.nodes)} KAFKA_PORT={first}'"
            )
        if self._quorum is not None and layout is None and formatted:
            raise BrokerError(
                f"{self._data} holds a single-node broker's data, not a cluster node's; use another KAFKA_PORT,"
                f" or delete {self._dir} if its data is disposable"
            )

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the broker: SIGTERM for a clean shutdown, SIGKILL after *timeout*.

        Returns False if no broker of ours was running.
        """
        with _locked(self._dir / ".lock"):
            pid = self._live_pid()
            if pid is None:
                return False
            _log.info("stopping Kafka on %s (pid %d)", self.bootstrap, pid)
            _signal(pid, signal.SIGTERM)
            if not self._wait_gone(pid, timeout):
                _log.warning("Kafka (pid %d) still up after %gs; killing it", pid, timeout)
                _signal(pid, signal.SIGKILL)
                self._wait_gone(pid, 10.0)
            self._pid_file.unlink(missing_ok=True)
            self._proc = None
            return True

    def wait_ready(self, timeout: float) -> None:
        """Block until the broker answers, or raise BrokerError.

        Checks every round that the process is still alive, so a crash is
        reported at once rather than after *timeout*.
        """
        deadline = time.monotonic() + timeout
        while True:
            if self._live_pid() is None:
                if self._proc is None:
                    what = "is not running"
                else:
                    what = f"exited during startup (exit code {self._proc.poll()})"
                raise BrokerError(f"Kafka on port {self._port} {what}; {self._diagnosis()}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerError(f"Kafka on port {self._port} was not ready within {timeout:g}s; {self._diagnosis()}")
            if self._answers(timeout=min(1.0, max(remaining, 0.1))):
                return
            time.sleep(min(_POLL, max(deadline - time.monotonic(), 0.0)))

    def finalized_features(self) -> dict[str, int] | None:
        """The cluster's finalized feature levels as this run's log last reported them; None before it did.

        Read from the controller's "Loaded new metadata FinalizedFeatures(...)" line: no client call,
        and the Python client has no DescribeFeatures.
        """
        try:
            text = self._log.read_text(errors="replace")
        except OSError:
            return None
        found = _FINALIZED.findall(text)
        if not found:
            return None
        levels = (item.split("=", 1) for item in found[-1].split(", ") if "=" in item)
        return {name.strip(): int(level) for name, level in levels if level.strip().isdigit()}

    def warn_without_share_groups(self) -> None:
        """Log a warning when this run's cluster has share groups off (data formatted by an older Kafka)."""
        features = self.finalized_features()
        if features is not None and features.get("share.version", 0) < 1:
            _log.warning(
                "share groups are off on the Kafka at %s: its data was formatted by an older Kafka"
                " (finalized features %s); if the data is disposable, stop it, delete %s and start again",
                self.bootstrap, ", ".join(f"{k}={v}" for k, v in sorted(features.items())) or "none",
                self._data,
            )

    def _libs_match(self, digest: str) -> bool:
        try:
            return (self._libs / _MARKER).read_text().strip() == digest
        except OSError:
            return False

    def _live_pid(self) -> int | None:
        """The pid in our pid file if it is our broker; removes a stale file."""
        try:
            pid = int(self._pid_file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            pid = 0
        if pid > 0 and self._is_ours(pid):
            return pid
        _log.debug("removing stale pid file %s", self._pid_file)
        self._pid_file.unlink(missing_ok=True)
        return None

    def _is_ours(self, pid: int) -> bool:
        proc = self._proc
        if proc is not None and proc.pid == pid:
            return proc.poll() is None  # our child: reaps it, no zombie lingers
        cmdline = _cmdline(pid)  # also rejects a pid reused by another program
        return "kafka.Kafka" in cmdline and f" {self._server_props}" in cmdline

    def _wait_gone(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self._is_ours(pid):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)
        return True

    def _answers(self, timeout: float) -> bool:
        """Whether the broker serves metadata and lists itself as a broker."""
        if not _port_accepts(self._port):
            return False  # not listening yet: spare the client its retries
        # Imported here so that fetch/stop/status work without the client.
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        # log_level 0: refused connections while starting are expected, not news.
        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0})
        try:
            return self._node_id in admin.list_topics(timeout=timeout).brokers
        except KafkaException:
            return False

    def _check_ports_free(self) -> None:
        for what, port in (
            ("port", self._port),
            ("controller port (port+1)", self._controller_port),
        ):
            if not _port_free(port):
                raise BrokerError(
                    f"{what} {port} on {_HOST} is in use by another program, not this"
                    f" MTC75 broker; run it elsewhere with KAFKA_PORT=<other>, or use"
                    " an existing cluster via KAFKA_BOOTSTRAP_SERVERS"
                )

    def _write_config(self) -> None:
        """Write server.properties and log4j2.properties (on every start)."""
        self._dir.mkdir(parents=True, exist_ok=True)
        plain, controller = f"{_HOST}:{self._port}", f"{_HOST}:{self._controller_port}"
        server = {
            "process.roles": "broker,controller",
            "node.id": str(self._node_id),
            "controller.quorum.bootstrap.servers": controller,
            "listeners": f"PLAINTEXT://{plain},CONTROLLER://{controller}",
            "advertised.listeners": f"PLAINTEXT://{plain}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self._data),
            "num.partitions": "1",
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            # Share-group members learn their assignment on a heartbeat: every second, not Kafka's 5 s, so a
            # member joins a share group (and a test or the demo gets its first records) without waiting.
            "group.share.heartbeat.interval.ms": "1000",
            "group.share.min.heartbeat.interval.ms": "1000",
            # A typo in a topic name must fail loudly, not create a new topic.
            "auto.create.topics.enable": "false",
            "delete.topic.enable": "true",
        }
        if self._quorum is not None:
            del server["controller.quorum.bootstrap.servers"]  # a static quorum names its voters instead
            server.update(self._quorum.server_properties())
        log4j = {
            "appender.file.type": "File",
            "appender.file.name": "file",
            "appender.file.fileName": str(self._log),
            "appender.file.append": "false",  # so errors we quote are this run's
            "appender.file.layout.type": "PatternLayout",
            "appender.file.layout.pattern": "[%d] %p %m (%c)%n",
            "rootLogger.level": "INFO",
            "rootLogger.appenderRef.file.ref": "file",
        }
        for path, props in ((self._server_props, server), (self._log4j_props, log4j)):
            lines = [f"{key}={value}\n" for key, value in props.items()]
            path.write_text("# Written by mtc75/tools/broker.py on start.\n" + "".join(lines))

    def _format(self, java: str) -> None:
        if self._quorum is None:
            cluster_id, how = _cluster_id(), ["--standalone"]
        else:  # a static quorum (controller.quorum.voters): every node formatted with the one cluster id
            cluster_id, how = self._quorum.cluster_id, []
        _log.info("formatting %s (cluster id %s)", self._data, cluster_id)
        features = [arg for feature in _FORMAT_FEATURES for arg in ("--feature", feature)]
        args = ["format", *how, *features, "-t", cluster_id, "-c", str(self._server_props)]
        res = _run([java, "-cp", self._classpath(), "kafka.tools.StorageTool", *args])
        if res.returncode != 0:
            lines = res.stdout.splitlines()
            reason = _exception_line(lines) or _last_line(res.stdout)
            raise BrokerError(f"formatting {self._data} failed: {reason}; delete {self._data} and retry")

    def _spawn(self, java: str) -> None:
        jvm_opts = _JVM_OPTS if self._quorum is None else _CLUSTER_JVM_OPTS
        cmd = [java, *jvm_opts, f"-Dlog4j2.configurationFile={self._log4j_props}"]
        cmd += ["-cp", self._classpath(), "kafka.Kafka", str(self._server_props)]
        _log.info("starting Kafka on %s (log: %s)", self.bootstrap, self._log)
        self._log.unlink(missing_ok=True)  # never quote a previous run's errors
        with open(self._out, "ab") as out:
            self._out_offset = out.tell()
            # Own session: neither Ctrl-C in the launching shell nor the exit of
            # the launcher may take the broker down (`make broker` returns).
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self._dir,
                start_new_session=True,
            )
        # Popen returns while execve is still loading java, before the kernel
        # fills in /proc/<pid>/cmdline; until then other launchers reading the
        # pid file would take the broker for a stale entry.
        deadline = time.monotonic() + 2.0
        while not _cmdline(self._proc.pid) and self._proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        tmp = self._pid_file.with_suffix(".tmp")
        tmp.write_text(f"{self._proc.pid}\n")
        tmp.replace(self._pid_file)

    def _kill_spawned(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        self._pid_file.unlink(missing_ok=True)

    def _classpath(self) -> str:
        return str(self._libs / "*")  # expanded by the JVM, not by a shell

    def _diagnosis(self) -> str:
        """Where to look, with this run's last ERROR/FATAL line if any."""
        source, reason = self._log, _last_log_error(self._log)
        if not reason and (tail := _tail(self._out, self._out_offset)):
            source, reason = self._out, tail  # the JVM died before logging began
        text = f"see {source}: {reason}" if reason else f"see {source}"
        if re.search(r"meta\.properties|cluster[ ._-]?id", reason, re.IGNORECASE):
            text += f"; if its data is disposable, delete {self._data} and retry"
        return text


class LocalCluster:
    """A local Kafka cluster of ``size`` nodes on ``127.0.0.1``: node 1 on ``port``, the others above it.

    The layout (cluster id, every node's ports) is chosen at the first start and written to each
    node's ``cluster.json``; later calls read it, so a node killed with -9 comes back on its ports
    with its data.  Node processes outlive this object, like :class:`LocalKafka`'s.
    """

    def __init__(self, port: int = DEFAULT_PORT, size: int = 3, home: Path | None = None, *,
                 libs: Path | None = None) -> None:
        if size < 1:
            raise BrokerError(f"invalid cluster size {size}: need 1 or more brokers")
        if not 0 < port <= _MAX_PORT:
            raise BrokerError(f"invalid Kafka port {port}: need 1-{_MAX_PORT} (port+1 is the controller)")
        self._port = port
        self._size = size
        self._home = (default_home() if home is None else home).absolute()
        self._libs = (self._home / "libs" if libs is None else libs).absolute()
        self._layout_file = self._home / str(port) / _LAYOUT

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._size} nodes from port {self._port} home={self._home}>"

    @property
    def bootstrap(self) -> str:
        """``bootstrap.servers`` naming every node (the planned ports before the first start)."""
        return ",".join(node.bootstrap for node in self.nodes())

    def nodes(self) -> list[LocalKafka]:
        """The nodes of the recorded layout, or an empty list before the first start."""
        quorum = self._layout()
        if quorum is None:
            return []
        return [LocalKafka(n.port, self._home, libs=self._libs, quorum=quorum) for n in quorum.nodes]

    def node(self, node_id: int) -> LocalKafka:
        for node in self.nodes():
            if node.node_id == node_id:
                return node
        raise BrokerError(f"the cluster at port {self._port} has no node {node_id}")

    def status(self) -> list[tuple[LocalKafka, int | None]]:
        """Each node with the pid of its running broker (None when it is not running)."""
        return [(node, node.pid()) for node in self.nodes()]

    def start(self, timeout: float = 180.0) -> list[int]:
        """Start every node that is not running and wait until all of them serve as brokers.

        Returns the node ids this call started (empty when all were up).  Nodes are spawned
        together and then awaited: a quorum of 3 elects no leader until two voters run.  If
        startup fails, the nodes this call spawned are killed.
        """
        deadline = time.monotonic() + timeout
        _ephemeral().check(self._port)  # before a layout is chosen and recorded
        with _locked(self._home / str(self._port) / ".cluster.lock"):
            quorum = self._layout() or self._plan()
            nodes = [LocalKafka(n.port, self._home, libs=self._libs, quorum=quorum) for n in quorum.nodes]
            spawned: list[LocalKafka] = []
            try:
                # In parallel: formatting and JVM start-up are seconds of CPU each (measured: 64 s for
                # three nodes one after another on this 2-core machine under the test suite's load).
                with ThreadPoolExecutor(len(nodes)) as pool:
                    launches = [pool.submit(self._launch_if_down, node) for node in nodes]
                failures = [err for launch in launches if (err := launch.exception()) is not None]
                spawned += [node for launch in launches if not launch.exception() and (node := launch.result())]
                if failures:
                    raise failures[0]
                for node in nodes:
                    node.wait_ready(max(deadline - time.monotonic(), 1.0))
                self._wait_all_listed(nodes, deadline)
                nodes[0].warn_without_share_groups()  # features are the cluster's: one node's log says it
            except BaseException:
                for node in spawned:
                    node._kill_spawned()
                raise
            return [node.node_id for node in spawned]

    @staticmethod
    def _launch_if_down(node: LocalKafka) -> LocalKafka | None:
        with _locked(node.folder / ".lock"):
            if node.pid() is not None:
                return None
            node._launch()
            return node

    def stop(self, timeout: float = 30.0) -> list[int]:
        """Stop every running node (SIGTERM to all at once, SIGKILL after *timeout*); returns their ids.

        All at once: stopped one by one, the last nodes lose their quorum and each waits out a
        controlled shutdown that cannot complete.
        """
        nodes = self.nodes()
        with contextlib.ExitStack() as locks:
            for node in nodes:
                locks.enter_context(_locked(node.folder / ".lock"))
            running = [(node, pid) for node in nodes if (pid := node.pid()) is not None]
            for node, pid in running:
                _log.info("stopping Kafka node %d on %s (pid %d)", node.node_id, node.bootstrap, pid)
                _signal(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for node, pid in running:
                if not node._wait_gone(pid, max(deadline - time.monotonic(), 0.0)):
                    _log.warning("Kafka node %d (pid %d) still up after %gs; killing it", node.node_id, pid, timeout)
                    _signal(pid, signal.SIGKILL)
                    node._wait_gone(pid, 10.0)
                node._pid_file.unlink(missing_ok=True)
                node._proc = None
        return [node.node_id for node, _pid in running]

    def _layout(self) -> Quorum | None:
        quorum = _read_layout(self._layout_file)
        if quorum is not None and len(quorum.nodes) != self._size:
            raise BrokerError(
                f"the cluster at port {self._port} has {len(quorum.nodes)} nodes, not {self._size};"
                f" use BROKERS={len(quorum.nodes)}, or stop it and delete its node folders under {self._home}"
            )
        return quorum

    def _plan(self) -> Quorum:
        """Choose the ports (node 1 on ours, each next node on the next free pair) and record them."""
        nodes = [Node(1, self._port, self._port + 1)]
        taken = {self._port, self._port + 1}
        for node_id in range(2, self._size + 1):
            port = self._next_pair(nodes[-1].port + 2, taken)
            nodes.append(Node(node_id, port, port + 1))
            taken |= {port, port + 1}
        quorum = Quorum(_cluster_id(), tuple(nodes))
        for node in nodes:
            folder = self._home / str(node.port)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / _LAYOUT).write_text(quorum.to_json())
        _log.info("cluster layout: %s", ", ".join(f"node {n.node_id} on {n.port}/{n.controller_port}" for n in nodes))
        return quorum

    def _next_pair(self, start: int, taken: set[int]) -> int:
        """The first port >= start with port and port+1 free and outside the ephemeral range, clear of every
        other node folder here."""
        ephemeral = _ephemeral()
        for port in range(start, min(start + _PORT_SCAN, _MAX_PORT)):
            if port in taken or port + 1 in taken or port in ephemeral or port + 1 in ephemeral:
                continue
            if any((self._home / str(p)).exists() for p in (port - 1, port, port + 1)):
                continue  # a node (running or not) whose ports would overlap ours
            if _port_free(port) and _port_free(port + 1):
                return port
        raise BrokerError(
            f"no two free adjacent ports in {start}-{start + _PORT_SCAN} on {_HOST} outside the ephemeral range"
            f" {ephemeral.first}-{ephemeral.last} for the next cluster node; choose another KAFKA_PORT"
        )

    def _wait_all_listed(self, nodes: list[LocalKafka], deadline: float) -> None:
        """Until the cluster's metadata lists every node as a broker (each one saw the others)."""
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        wanted = {node.node_id for node in nodes}
        admin = AdminClient({"bootstrap.servers": ",".join(n.bootstrap for n in nodes), "log_level": 0})
        seen: set[int] = set()
        while time.monotonic() < deadline:
            try:
                seen = set(admin.list_topics(timeout=2.0).brokers)
            except KafkaException:
                seen = set()
            if wanted <= seen:
                return
            time.sleep(_POLL)
        raise BrokerError(
            f"the cluster at port {self._port} lists brokers {sorted(seen)}, not {sorted(wanted)};"
            f" see the broker.log files under {self._home}"
        )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise launchers that share a home (e.g. pytest-xdist workers)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _ephemeral() -> EphemeralPorts:
    """This machine's ephemeral ports, read on every call (a sysctl may change them)."""
    return EphemeralPorts.of_this_machine()


def _cluster_id() -> str:
    """A random cluster id as Kafka makes them: URL-safe base64 of a UUID, never starting with '-'.

    One in 64 ids starts with '-', and StorageTool then reads ``-t -abc...`` as a missing argument
    (seen here: a `make demo` failed with "argument --cluster-id/-t: expected one argument").
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def _read_layout(path: Path) -> Quorum | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise BrokerError(f"cannot read {path} ({exc.strerror})") from None
    try:
        return Quorum.from_json(text)
    except (ValueError, KeyError, TypeError) as exc:
        raise BrokerError(f"{path} is damaged ({exc}); delete the cluster's node folders and start again") from None


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    """Run *cmd* to completion, stdout and stderr merged into ``.stdout``."""
    return subprocess.run(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
    )


def _find_java() -> str:
    """The ``java`` on PATH, if it is recent enough for Kafka 4."""
    java = shutil.which("java")
    if java is None:
        raise BrokerError(
            f"java is not on PATH; install a JDK {JAVA_MIN_VERSION}+ (e.g. apt-get"
            f" install openjdk-{JAVA_MIN_VERSION}-jre-headless) and retry"
        )
    try:
        output = _run([java, "-version"]).stdout
    except OSError as exc:
        raise BrokerError(f"cannot run {java} ({exc.strerror}); fix your JDK") from None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', output)
    if match is None:
        raise BrokerError(
            f"cannot tell the Java version from `{java} -version`"
            f" ({_last_line(output) or 'no output'}); Kafka needs {JAVA_MIN_VERSION}+"
        )
    major = int(match[1])
    if major == 1 and match[2]:  # "1.8.0_392" style
        major = int(match[2])
    if major < JAVA_MIN_VERSION:
        raise BrokerError(
            f"{java} is Java {major} but Kafka 4 needs {JAVA_MIN_VERSION}+; install"
            " a newer JDK and put it first on PATH"
        )
    return java


def _cmdline(pid: int) -> str:
    """The command line of *pid*, arguments joined by spaces; "" if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        if Path("/proc/self").exists():
            return ""
    else:
        return raw.replace(b"\0", b" ").decode(errors="replace")
    # No procfs (macOS): ask ps.
    return _run(["ps", "-ww", "-o", "args=", "-p", str(pid)]).stdout.strip()


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _port_free(port: int) -> bool:
    """Whether Kafka could listen on *port* (Java also sets SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((_HOST, port))
        except OSError:
            return False
    return True


def _port_accepts(port: int) -> bool:
    try:
        with socket.create_connection((_HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def _maven_reason(output: str) -> str:
    """The line of Maven's output that says what went wrong."""
    lines = [_ANSI.sub("", s).removeprefix("[ERROR]").strip() for s in output.splitlines()]
    lines = [s for s in lines if s and not _MVN_NOISE.match(s)]
    return _shorten(lines[-1].removesuffix("-> [Help 1]")) if lines else "no output"


def _last_log_error(path: Path) -> str:
    """The last ERROR/FATAL line of a log, with the exception that follows it."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    for i in range(len(lines) - 1, -1, -1):
        if _LOG_ERROR.match(lines[i]):
            text = lines[i].split("] ", 1)[1]  # drop the timestamp
            cause = _exception_line(lines[i + 1 : i + 3])
            return _shorten(f"{text} - {cause}" if cause else text)
    return ""


def _exception_line(lines: list[str]) -> str:
    for line in lines:
        if match := _JAVA_EXCEPTION.match(line.strip()):
            return _shorten(match[1])
    return ""


def _tail(path: Path, offset: int) -> str:
    """The last non-blank line written to *path* after *offset*."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return _last_line(f.read().decode(errors="replace"))
    except OSError:
        return ""


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return _shorten(lines[-1]) if lines else ""


def _shorten(text: str, limit: int = 400) -> str:
    text = " ".join(text.split())  # messages must stay on one line
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _display(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


def _port_arg(text: str) -> int:
    port = int(text) if text.isdigit() else 0
    if not 0 < port <= _MAX_PORT:
        raise argparse.ArgumentTypeError(f"not a usable port: {text!r}")
    return port


def _size_arg(text: str) -> int:
    size = int(text) if text.isdigit() else 0
    if not 0 < size <= 9:
        raise argparse.ArgumentTypeError(f"not a usable number of brokers: {text!r} (1-9)")
    return size


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m mtc75.tools.broker`` (used by the Makefile)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--port",
        type=_port_arg,
        default=os.environ.get("KAFKA_PORT", str(DEFAULT_PORT)),
        help="broker port; the controller uses port+1 (default: $KAFKA_PORT or 9092)",
    )
    common.add_argument(
        "--brokers",
        type=_size_arg,
        default=os.environ.get("BROKERS", "1"),
        help="nodes in the cluster: node 1 on --port, the others on the next free port pairs (default: $BROKERS or 1)",
    )
    common.add_argument("--home", type=Path, help="folder for the node folders (default: <repo>/.kafka in a"
                        " checkout, else $XDG_CACHE_HOME/mtc75)")
    common.add_argument("--timeout", type=float, help="seconds to wait")
    parser = argparse.ArgumentParser(
        prog="python -m mtc75.tools.broker", description="Local Kafka (1 or N nodes) for MTC75."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("fetch", "download the Kafka jars (once)"),
        ("start", "start the broker (every cluster node not running) and wait until it is ready"),
        ("stop", "stop the broker (every cluster node)"),
        ("status", "list the node(s); exit 0 if all are running, else 1"),
    ):
        commands.add_parser(name, parents=[common], help=text)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # `start` leaves the broker running on purpose; Popen would call that a leak.
    warnings.filterwarnings("ignore", r"subprocess \d+ is still running", ResourceWarning)

    libs = default_home() / "libs"  # the jars stay in the default home whatever --home says
    timeout = {} if args.timeout is None else {"timeout": args.timeout}
    try:
        if args.command == "fetch":
            LocalKafka(args.port, libs=libs).fetch()
            print(f"Kafka jars are in {_display(libs)}")
            return 0
        if args.brokers > 1:
            return _cluster_command(LocalCluster(args.port, args.brokers, args.home, libs=libs), args, timeout)
        return _single_command(LocalKafka(args.port, args.home, libs=libs), args, timeout)
    except BrokerError as err:
        print(f"broker: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130


def _single_command(kafka: LocalKafka, args: argparse.Namespace, timeout: dict[str, float]) -> int:
    where = f"{kafka.bootstrap} (log: {_display(kafka.log_path)})"
    if args.command == "start":
        if kafka.start(**timeout):
            print(f"Kafka is up at {where}")
        else:
            print(f"Kafka already running at {where}")
        _print_export(kafka.bootstrap)
    elif args.command == "stop":
        if kafka.stop(**timeout):
            print(f"Kafka at {kafka.bootstrap} stopped")
        else:
            print(f"no MTC75 broker running on port {args.port}")
    elif kafka.is_running():
        print(f"Kafka running at {where}")
    else:
        print(f"no MTC75 broker running on port {args.port}")
        return 1
    return 0


def _cluster_command(cluster: LocalCluster, args: argparse.Namespace, timeout: dict[str, float]) -> int:
    size = args.brokers
    if args.command == "start":
        started = cluster.start(**timeout)
        what = f"started node(s) {_ids(started)}" if started else "all nodes were already running"
        print(f"Kafka cluster of {size} is up at {cluster.bootstrap} ({what})")
        _print_export(cluster.bootstrap)
    elif args.command == "stop":
        stopped = cluster.stop(**timeout)
        if stopped:
            print(f"Kafka cluster at port {args.port}: stopped node(s) {_ids(stopped)}")
        else:
            print(f"no MTC75 cluster node running from port {args.port}")
    else:
        listing = cluster.status()
        if not listing:
            print(f"no MTC75 cluster of {size} at port {args.port} (never started)")
            return 1
        for node, pid in listing:
            state = f"running (pid {pid})" if pid is not None else "not running"
            print(f"node {node.node_id}  {node.bootstrap}  controller :{node.port + 1}  {state}"
                  f"  {_display(node.folder)}")
        return 0 if all(pid is not None for _node, pid in listing) else 1
    return 0


def _print_export(bootstrap: str) -> None:
    """The line that points the scripts (which talk to 127.0.0.1:9092 unless told) at a broker elsewhere."""
    if bootstrap != f"{_HOST}:{DEFAULT_PORT}":
        print(f"The scripts use {_HOST}:{DEFAULT_PORT} unless told; in each shell that runs them:")
        print(f"export KAFKA_BOOTSTRAP_SERVERS={bootstrap}")


def _ids(ids: list[int]) -> str:
    return ", ".join(str(i) for i in ids)


if __name__ == "__main__":
    sys.exit(main())
