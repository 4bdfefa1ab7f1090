"""Brokers a test session owns: started in a folder of its own, on ports that were free, stopped by it alone.

Two suites on one machine (another checkout, a CI run beside a developer) must never share, reuse or stop each
other's broker. So every broker a session starts lives under a folder of the session's own
(``.kafka/sessions/<pid>-<random>/``, not pytest's temporary folders, which concurrent pytest runs of one user
prune: seen here deleting a cluster's data while it started). Its pid file names a java process whose command
line holds that folder's server.properties, which no other session's launcher takes for its own
(``LocalKafka._is_ours``); ``stop()`` signals only that process. Ports come from the preferred one (an
``MTC75_TEST_*`` variable, so helpers on one machine stay in their own ranges) or the next free pair above it;
a port lost to a race between the check and the bind is retried on the next pair. No pair is taken inside the
kernel's ephemeral range (a client reconnecting to a stopped node there can connect to itself and hold its
port): a preferred port inside it is refused, naming the variable, and the scan stops below it.

Called from pytest fixtures (the main thread).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from mtc75.errors import BrokerError
from mtc75.tools import broker as launcher
from mtc75.tools.broker import LocalCluster, LocalKafka

ROOT = Path(__file__).resolve().parent.parent
REPO_LIBS = launcher.default_home() / "libs"  # the jars are shared (<repo>/.kafka/libs); only state is per session
PORT_SCAN = 60  # how far above the preferred port to look for a free pair
ATTEMPTS = 4  # binds lost to another program between our check and the broker's bind

T = TypeVar("T", LocalKafka, LocalCluster)


@contextlib.contextmanager
def session_folder(name: str) -> Iterator[Path]:
    """A new folder for brokers of this process, removed (with their data) when the block ends."""
    path = new_session_root() / name
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)


def new_session_root() -> Path:
    """A folder name no other session (or process of this one) uses; not created."""
    return ROOT / ".kafka" / "sessions" / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


def free_pair(preferred: int, avoid: frozenset[int] = frozenset()) -> int:
    """The first port p >= preferred with p and p+1 free now, outside the ephemeral range, neither in ``avoid``."""
    ephemeral = launcher.EphemeralPorts.of_this_machine()
    if preferred in ephemeral or preferred + 1 in ephemeral:
        raise BrokerError(
            f"test port {preferred} lies in this machine's ephemeral port range {ephemeral.first}-{ephemeral.last}"
            f" ({ephemeral.source}); set MTC75_TEST_KAFKA_PORT (and MTC75_TEST_FAULT_KAFKA_PORT,"
            f" MTC75_TEST_CLUSTER_KAFKA_PORT) below {ephemeral.first}"
        )
    for port in range(preferred, preferred + PORT_SCAN):
        if {port, port + 1} & avoid or port in ephemeral or port + 1 in ephemeral:
            continue
        if launcher._port_free(port) and launcher._port_free(port + 1):
            return port
    raise BrokerError(
        f"no two free adjacent ports in {preferred}-{preferred + PORT_SCAN} on 127.0.0.1 outside the ephemeral"
        f" range {ephemeral.first}-{ephemeral.last}"
    )


def start_owned(make: Callable[[int], T], preferred: int, avoid: frozenset[int] = frozenset()) -> T:
    """``make(port)`` on the first free pair from ``preferred``, started by this call (never one found running)."""
    tried = frozenset(avoid)
    last: BrokerError | None = None
    for _ in range(ATTEMPTS):
        port = free_pair(preferred, tried)
        kafka = make(port)
        try:
            started = kafka.start()
        except BrokerError as err:  # e.g. taken between free_pair() and the bind: try the next pair
            if "in use" not in str(err):
                raise
            last, tried = err, tried | {port, port + 1}
            continue
        if not started:  # False, or no node started: then it was not ours to own
            raise BrokerError(f"a broker was already running in this session's own folder on port {port}")
        return kafka
    raise BrokerError(f"no broker could bind near port {preferred}: {last}")


def owned_broker(home: Path, preferred: int, avoid: frozenset[int] = frozenset()) -> LocalKafka:
    """A single-node broker of this session (fetches the jars once into the repo's .kafka/libs)."""
    LocalKafka(preferred, home=REPO_LIBS.parent, libs=REPO_LIBS).fetch()
    return start_owned(lambda port: LocalKafka(port, home=home, libs=REPO_LIBS), preferred, avoid)


def owned_cluster(home: Path, preferred: int, size: int) -> LocalCluster:
    """A cluster of ``size`` nodes of this session: node 1 on a free pair from ``preferred``."""
    LocalKafka(preferred, home=REPO_LIBS.parent, libs=REPO_LIBS).fetch()
    return start_owned(lambda port: LocalCluster(port, size, home=home, libs=REPO_LIBS), preferred)


_SHARED_PORT = "port"  # in the run's folder: the shared broker's port, written once it answers


def shared_broker(root: Path, preferred: int) -> LocalKafka:
    """The broker the xdist workers of one run share, in ``root`` (named by the controller): started by the
    first worker that asks (under a lock: the others wait for it to answer), found by the others."""
    root.mkdir(parents=True, exist_ok=True)
    port_file = root / _SHARED_PORT
    with launcher._locked(root / ".start.lock"):
        if port_file.exists():
            broker = LocalKafka(int(port_file.read_text()), home=root / "kafka", libs=REPO_LIBS)
            if not broker.is_running():
                raise BrokerError(f"the run's shared broker {broker.bootstrap} is gone; see {broker.log_path}")
            return broker
        broker = owned_broker(root / "kafka", preferred)
        port_file.write_text(f"{broker.port}\n")
        return broker


def stop_shared(root: Path) -> None:
    """Stop the run's shared broker if a worker started one, and remove the run's folder (the controller, last)."""
    try:
        port = int((root / _SHARED_PORT).read_text())
    except (OSError, ValueError):
        port = None
    if port is not None:
        LocalKafka(port, home=root / "kafka", libs=REPO_LIBS).stop()
    shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def restartable_broker(local_kafka: LocalKafka | None, name: str, preferred: int) -> Iterator[LocalKafka]:
    """A broker a test module may stop and restart (its own, in folder ``name``), stopped when the block ends;
    skips the test where only an outside broker is given (KAFKA_BOOTSTRAP_SERVERS)."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or local_kafka is None:
        pytest.skip("stopping a broker needs the local one (KAFKA_BOOTSTRAP_SERVERS is set)")
    taken = frozenset({local_kafka.port, local_kafka.port + 1})
    with session_folder(name) as home:
        broker = owned_broker(home, preferred, avoid=taken)
        try:
            yield broker
        finally:
            broker.stop()
