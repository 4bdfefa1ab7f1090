"""Unit tests for mtc75.tools.broker that need neither Kafka nor Maven nor a network."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mtc75.errors import BrokerError
from mtc75.tools import broker
from mtc75.tools.broker import EphemeralPorts, LocalKafka
from tests.conftest import TEST_PORT
from tests.local_kafka import free_pair

# Ports for tests that bind (never in the ephemeral range, where the launcher refuses to start a node).
UNIT_PORT = TEST_PORT + 400

MAVEN_FAILURE = """\
\x1b[0m\x1b[0m[ERROR] Failed to execute goal on project mtc75-local-kafka: Could not resolve dependencies \
for project mtc75:mtc75-local-kafka:pom:1: Could not find artifact org.apache.kafka:kafka_2.13:jar:9.9.9 \
in central (https://repo.maven.apache.org/maven2) -> [Help 1]
[ERROR] \n[ERROR] To see the full stack trace of the errors, re-run Maven with the -e switch.
[ERROR] Re-run Maven using the -X switch to enable full debug logging.
[ERROR] \n[ERROR] For more information about the errors and possible solutions, please read the following articles:
[ERROR] [Help 1] http://cwiki.apache.org/confluence/display/MAVEN/DependencyResolutionException
\x1b[0m\x1b[0m"""


def _props(path: Path) -> dict[str, str]:
    lines = path.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def _free_port_pair() -> int:
    """A port p below the ephemeral range such that p and p+1 are both free right now."""
    return free_pair(UNIT_PORT)


def _script(bin_dir: Path, name: str, body: str) -> Path:
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def no_java_or_fetch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly if start() gets past its port check."""

    def refuse(*_args: object) -> None:
        raise AssertionError("start() went past the port check")

    monkeypatch.setattr(broker, "_find_java", refuse)
    monkeypatch.setattr(LocalKafka, "fetch", refuse)


_FAKE_BROKER = """\
import signal, sys, time
if sys.argv[1] == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("up", flush=True)
time.sleep(120)
"""


@pytest.fixture
def impersonate() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start a harmless process whose command line looks like *kafka*'s broker."""
    procs: list[subprocess.Popen[str]] = []

    def spawn(kafka: LocalKafka, *, stubborn: bool = False) -> subprocess.Popen[str]:
        kafka._write_config()
        cmd = [sys.executable, "-c", _FAKE_BROKER, "stubborn" if stubborn else "plain"]
        proc = subprocess.Popen([*cmd, "kafka.Kafka", str(kafka._server_props)], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline() == "up\n"  # signal handler is set
        kafka._pid_file.write_text(f"{proc.pid}\n")
        return proc

    yield spawn
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()  # reaps it and closes the pipe


# -- configuration --------------------------------------------------------------


@pytest.mark.parametrize("port", [9092, 29092, 40123])
def test_server_properties_follow_the_port(tmp_path: Path, port: int) -> None:
    kafka = LocalKafka(port=port, home=tmp_path)
    kafka._write_config()

    props = _props(tmp_path / str(port) / "server.properties")
    assert props["listeners"] == f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{port + 1}"
    assert props["advertised.listeners"] == f"PLAINTEXT://127.0.0.1:{port}"
    assert props["controller.quorum.bootstrap.servers"] == f"127.0.0.1:{port + 1}"
    assert props["log.dirs"] == str(tmp_path / str(port) / "data")
    assert props["process.roles"] == "broker,controller"
    assert props["auto.create.topics.enable"] == "false"
    assert props["group.share.heartbeat.interval.ms"] == props["group.share.min.heartbeat.interval.ms"] == "1000"
    assert kafka.bootstrap == f"127.0.0.1:{port}"
    assert kafka.log_path == tmp_path / str(port) / "broker.log"
    assert _props(tmp_path / str(port) / "log4j2.properties")["appender.file.fileName"] == str(kafka.log_path)


def test_default_home_is_dot_kafka_in_the_repo() -> None:
    repo = Path(broker.__file__).resolve().parents[2]
    assert broker.checkout_root() == repo
    assert LocalKafka(port=29092).log_path == repo / ".kafka" / "29092" / "broker.log"


def test_installed_the_home_is_the_user_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(broker, "checkout_root", lambda: None)  # as from a wheel in site-packages
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert broker.default_home() == tmp_path / "xdg" / "mtc75"
    assert LocalKafka(port=29092).folder == tmp_path / "xdg" / "mtc75" / "29092"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert broker.default_home() == tmp_path / "home" / ".cache" / "mtc75"
    assert broker._POM.parent == Path(broker.__file__).parent  # package data, not a file of the repository


@pytest.mark.parametrize("port", [0, 65535, -1])
def test_unusable_port_is_refused(port: int) -> None:
    with pytest.raises(BrokerError, match="invalid Kafka port"):
        LocalKafka(port=port)


# -- port conflicts ---------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
@pytest.mark.usefixtures("no_java_or_fetch")
def test_port_taken_by_another_program(tmp_path: Path, host: str) -> None:
    port = _free_port_pair()
    with socket.socket() as listener:
        listener.bind((host, port))
        listener.listen()

        with pytest.raises(BrokerError) as caught:
            LocalKafka(port=port, home=tmp_path).start(timeout=5)

    message = str(caught.value)
    assert f"port {port} " in message and "controller" not in message
    assert "KAFKA_PORT=" in message and "KAFKA_BOOTSTRAP_SERVERS" in message
    assert "\n" not in message


@pytest.mark.usefixtures("no_java_or_fetch")
def test_controller_port_taken(tmp_path: Path) -> None:
    port = _free_port_pair()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port + 1))
        listener.listen()
        with pytest.raises(BrokerError, match=rf"controller port \(port\+1\) {port + 1} "):
            LocalKafka(port=port, home=tmp_path).start(timeout=5)


def test_main_reports_port_taken_on_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    port = _free_port_pair()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen()
        # A tmp home: this must not touch the repo's .kafka even if it got further.
        code = _main_in(tmp_path, ["start", "--port", str(port)])

    err = capsys.readouterr().err
    assert code == BrokerError.exit_code
    assert err.startswith("broker: error: ") and err.count("\n") == 1 and str(port) in err


def _main_in(home: Path, argv: list[str]) -> int:
    return broker.main([*argv, "--home", str(home)])


# -- java -------------------------------------------------------------------------


def test_java_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "java" else real_which(name))
    monkeypatch.setattr(LocalKafka, "fetch", lambda self: pytest.fail("fetched before checking java"))

    with pytest.raises(BrokerError, match="java is not on PATH") as caught:
        LocalKafka(port=_free_port_pair(), home=tmp_path).start(timeout=5)
    assert "JDK 17" in str(caught.value)


@pytest.mark.parametrize(
    ("banner", "major"),
    [('java version "1.8.0_392"', 8), ('openjdk version "11.0.2" 2019-01-15', 11), ('openjdk version "16"', 16)],
)
def test_java_too_old(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, banner: str, major: int) -> None:
    _script(tmp_path / "bin", "java", f"echo '{banner}' >&2\n")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))

    with pytest.raises(BrokerError, match=rf"is Java {major} but Kafka 4 needs 17\+"):
        broker._find_java()


@pytest.mark.parametrize("banner", ['openjdk version "17.0.15" 2025-04-15', 'openjdk version "21" 2023-09-19'])
def test_java_recent_enough(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, banner: str) -> None:
    java = _script(tmp_path / "bin", "java", f"echo 'Picked up JAVA_TOOL_OPTIONS: -Dx=1' >&2\necho '{banner}' >&2\n")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert broker._find_java() == str(java)


def test_java_version_unreadable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _script(tmp_path / "bin", "java", "echo 'Segmentation fault' >&2\nexit 139\n")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(BrokerError, match=r"cannot tell the Java version.*Segmentation fault"):
        broker._find_java()


# -- fetch ------------------------------------------------------------------------


def _fake_mvn(bin_dir: Path, calls: Path, *, fail: bool) -> None:
    if fail:
        body = f"echo call >> {calls}\ncat <<'EOF'\n{MAVEN_FAILURE}\nEOF\nexit 1\n"
    else:  # put a jar where -DoutputDirectory says
        body = f'echo call >> {calls}\nfor a; do case $a in -DoutputDirectory=*) touch "${{a#*=}}/x.jar";; esac; done\n'
    _script(bin_dir, "mvn", body)


def test_fetch_is_cached_by_pom_hash(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    _fake_mvn(tmp_path / "bin", calls, fail=False)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    kafka = LocalKafka(port=29092, home=tmp_path / "home")

    kafka.fetch()
    kafka.fetch()
    libs = tmp_path / "home" / "libs"
    assert (libs / "x.jar").exists()
    assert (libs / ".pom.sha256").read_text().strip() == hashlib.sha256(broker._POM.read_bytes()).hexdigest()
    assert calls.read_text().count("call") == 1

    (libs / ".pom.sha256").write_text("0" * 64)  # as if kafka/pom.xml changed
    kafka.fetch()
    assert calls.read_text().count("call") == 2
    assert sorted(p.name for p in (tmp_path / "home").iterdir()) == [".fetch.lock", "libs"]


def test_failed_fetch_leaves_nothing_that_looks_complete(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _fake_mvn(tmp_path / "bin", tmp_path / "calls", fail=True)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    home = tmp_path / "home"

    with pytest.raises(BrokerError) as caught:
        LocalKafka(port=29092, home=home).fetch()

    message = str(caught.value)
    assert "Could not find artifact org.apache.kafka:kafka_2.13:jar:9.9.9" in message
    assert "\n" not in message and "\x1b" not in message and "[Help 1]" not in message
    assert sorted(p.name for p in home.iterdir()) == [".fetch.lock"]


def test_mvn_missing_only_matters_when_a_fetch_is_needed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "mvn" else real_which(name))
    kafka = LocalKafka(port=29092, home=tmp_path)

    with pytest.raises(BrokerError, match=r"Maven \(mvn\) is not on PATH"):
        kafka.fetch()

    (tmp_path / "libs").mkdir()
    (tmp_path / "libs" / ".pom.sha256").write_text(hashlib.sha256(broker._POM.read_bytes()).hexdigest())
    kafka.fetch()  # cached: no Maven needed


# -- pid file and process ---------------------------------------------------------


def test_stale_pid_file_is_removed(tmp_path: Path) -> None:
    kafka = LocalKafka(port=29092, home=tmp_path)
    kafka._dir.mkdir(parents=True)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    kafka._pid_file.write_text(f"{gone.pid}\n")

    assert not kafka.is_running()
    assert not kafka._pid_file.exists()


# The pid is filled in by the test: a pid in the test's id would differ between xdist workers.
@pytest.mark.parametrize("content", ["{pid}\n", "not a pid\n", ""], ids=["this pytest's pid", "not a pid", "empty"])
def test_pid_file_naming_something_else_is_stale(tmp_path: Path, content: str) -> None:
    kafka = LocalKafka(port=29092, home=tmp_path)
    kafka._dir.mkdir(parents=True)
    kafka._pid_file.write_text(content.format(pid=os.getpid()))  # e.g. the pid was reused by this very pytest

    assert kafka.stop(timeout=1) is False
    assert not kafka._pid_file.exists()


def test_stop_terminates_our_process(impersonate: Callable[..., subprocess.Popen[str]], tmp_path: Path) -> None:
    kafka = LocalKafka(port=29092, home=tmp_path)
    proc = impersonate(kafka)
    assert kafka.is_running()

    assert kafka.stop(timeout=10) is True
    assert proc.wait(timeout=5) == -signal.SIGTERM
    assert not kafka._pid_file.exists() and not kafka.is_running()
    assert kafka.stop() is False


def test_stop_kills_after_timeout(impersonate: Callable[..., subprocess.Popen[str]], tmp_path: Path) -> None:
    kafka = LocalKafka(port=29092, home=tmp_path)
    proc = impersonate(kafka, stubborn=True)

    assert kafka.stop(timeout=0.5) is True
    assert proc.wait(timeout=5) == -signal.SIGKILL
    assert not kafka._pid_file.exists()


def test_another_ports_pid_file_does_not_claim_the_process(
    impersonate: Callable[..., subprocess.Popen[str]], tmp_path: Path
) -> None:
    kafka, other = LocalKafka(port=29092, home=tmp_path), LocalKafka(port=29094, home=tmp_path)
    proc = impersonate(kafka)
    other._dir.mkdir(parents=True)
    other._pid_file.write_text(f"{proc.pid}\n")

    assert kafka.is_running()
    assert not other.is_running()
    assert other.stop(timeout=1) is False
    assert proc.poll() is None  # untouched


# -- diagnosis --------------------------------------------------------------------


def test_wait_ready_quotes_the_fatal_error_and_suggests_deleting_data(tmp_path: Path) -> None:
    kafka = LocalKafka(port=29092, home=tmp_path)
    kafka._dir.mkdir(parents=True)
    kafka.log_path.write_text(
        "[2026-01-01 10:00:00,000] INFO Starting (kafka.Kafka$)\n"
        "[2026-01-01 10:00:01,000] ERROR Exiting Kafka due to fatal exception (kafka.Kafka$)\n"
        "java.lang.RuntimeException: Stored node id 2 doesn't match previous node id 1 in "
        f"{kafka._data}/meta.properties.\n"
        "\tat org.apache.kafka.metadata.properties.MetaPropertiesEnsemble.verify(MetaPropertiesEnsemble.java:513)\n"
        "[2026-01-01 10:00:02,000] INFO shut down completely (kafka.Kafka$)\n"
    )

    with pytest.raises(BrokerError) as caught:
        kafka.wait_ready(timeout=5)

    message = str(caught.value)
    assert str(kafka.log_path) in message
    assert "ERROR Exiting Kafka due to fatal exception" in message
    assert "Stored node id 2 doesn't match" in message
    assert f"delete {kafka._data}" in message
    assert "\n" not in message


def test_wait_ready_without_errors_in_log_names_the_log(tmp_path: Path) -> None:
    kafka = LocalKafka(port=29092, home=tmp_path)
    with pytest.raises(BrokerError, match=r"is not running; see .*broker\.log$") as caught:
        kafka.wait_ready(timeout=5)
    assert "delete" not in str(caught.value)


def test_wait_ready_quotes_jvm_output_when_nothing_was_logged(tmp_path: Path) -> None:
    kafka = LocalKafka(port=29092, home=tmp_path)
    kafka._dir.mkdir(parents=True)
    out = tmp_path / "29092" / "broker.out"
    out.write_text(
        "Error: Could not find or load main class kafka.Kafka\nCaused by: java.lang.ClassNotFoundException\n\n"
    )

    with pytest.raises(BrokerError) as caught:
        kafka.wait_ready(timeout=5)
    assert str(caught.value).endswith(f"see {out}: Caused by: java.lang.ClassNotFoundException")


def test_maven_reason_skips_the_boilerplate() -> None:
    reason = broker._maven_reason(MAVEN_FAILURE)
    assert reason.startswith("Failed to execute goal on project mtc75-local-kafka")
    assert reason.endswith("in central (https://repo.maven.apache.org/maven2)")


# -- command line -----------------------------------------------------------------


def test_status_exit_code(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KAFKA_PORT", "29099")
    assert _main_in(tmp_path, ["status"]) == 1
    assert capsys.readouterr().out == "no MTC75 broker running on port 29099\n"
    assert _main_in(tmp_path, ["stop", "--port", "29098"]) == 0
    assert capsys.readouterr().out == "no MTC75 broker running on port 29098\n"


def test_bad_port_option_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        broker.main(["status", "--port", "nine"])
    assert caught.value.code == 2
    assert "not a usable port: 'nine'" in capsys.readouterr().err


def test_cluster_id_never_starts_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    import uuid

    ids = iter([uuid.UUID(bytes=b"\xf8" + bytes(15)), uuid.UUID(bytes=b"\x01" * 16)])  # "-A..." first, then "AQE..."
    monkeypatch.setattr(broker.uuid, "uuid4", lambda: next(ids))
    assert broker._cluster_id() == "AQEBAQEBAQEBAQEBAQEBAQ"


# -- the ephemeral port range -----------------------------------------------------


def _ranges(tmp_path: Path, span: str, reserved: str = "") -> EphemeralPorts:
    (tmp_path / "range").write_text(span)
    (tmp_path / "reserved").write_text(reserved)
    return EphemeralPorts.of_this_machine(tmp_path / "range", tmp_path / "reserved")


def test_ephemeral_range_is_read_with_its_reserved_ports(tmp_path: Path) -> None:
    ports = _ranges(tmp_path, "32768\t60999\n", "45092-45093,50000\n")
    assert (ports.first, ports.last) == (32768, 60999)
    assert 32767 not in ports and 32768 in ports and 60999 in ports and 61000 not in ports
    assert 45091 in ports and 45092 not in ports and 45093 not in ports and 45094 in ports  # reserved: usable
    assert 50000 not in ports and 50001 in ports
    assert 9092 not in _ranges(tmp_path, "32768 60999", "")  # an empty reserved file


def test_without_procfs_the_iana_range_counts(tmp_path: Path) -> None:
    ports = EphemeralPorts.of_this_machine(tmp_path / "missing", tmp_path / "missing-too")
    assert (ports.first, ports.last) == (49152, 65535) and "IANA" in ports.source
    assert 45092 not in ports and 49152 in ports


LINUX_DEFAULT = EphemeralPorts(32768, 60999)


@pytest.mark.parametrize("port", [45092, 32767])  # 32767: its controller port 32768 is inside
def test_start_refuses_a_port_in_the_ephemeral_range_before_anything_else(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, port: int
) -> None:
    monkeypatch.setattr(broker, "_ephemeral", lambda: LINUX_DEFAULT)
    with pytest.raises(BrokerError) as caught:
        LocalKafka(port=port, home=tmp_path).start(timeout=5)
    message = str(caught.value)
    assert f"port {port} " in message and "ephemeral port range 32768-60999" in message
    assert "below 32768" in message and f"ip_local_reserved_ports={port}-{port + 1}" in message
    assert "\n" not in message
    assert list(tmp_path.iterdir()) == []  # no node folder left behind for a port it refused


@pytest.mark.usefixtures("no_java_or_fetch")
def test_a_reserved_port_in_the_range_is_usable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    port = _free_port_pair()
    reserved = EphemeralPorts(port - 10, port + 10, ((port, port + 1),))
    monkeypatch.setattr(broker, "_ephemeral", lambda: reserved)
    with pytest.raises(AssertionError, match="went past the port check"):  # got as far as java: not refused
        LocalKafka(port=port, home=tmp_path).start(timeout=5)
    monkeypatch.setattr(broker, "_ephemeral", lambda: EphemeralPorts(port - 10, port + 10))
    with pytest.raises(BrokerError, match="ephemeral port range"):
        LocalKafka(port=port, home=tmp_path).start(timeout=5)


def test_make_broker_in_the_ephemeral_range_exits_4_with_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(broker, "_ephemeral", lambda: LINUX_DEFAULT)
    code = _main_in(tmp_path, ["start", "--port", "45092"])
    err = capsys.readouterr().err
    assert code == BrokerError.exit_code == 4
    assert err.startswith("broker: error: port 45092 ") and err.count("\n") == 1


def test_test_ports_in_the_ephemeral_range_are_refused_and_never_scanned_into(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base = _free_port_pair()
    monkeypatch.setattr(EphemeralPorts, "of_this_machine", classmethod(lambda cls: cls(base + 4, base + 1000)))
    with pytest.raises(BrokerError, match=rf"test port {base + 4} .*MTC75_TEST_KAFKA_PORT"):
        free_pair(base + 4)
    with pytest.raises(BrokerError, match=rf"test port {base + 3} "):  # its controller port base+4 is inside
        free_pair(base + 3)
    with socket.socket() as one, socket.socket() as three:  # every pair below base+4 has a busy port
        for sock, port in ((one, base + 1), (three, base + 3)):
            sock.bind(("127.0.0.1", port))
            sock.listen()
        with pytest.raises(BrokerError, match=rf"no two free adjacent ports in {base}-.*outside the ephemeral"):
            free_pair(base)  # base+4 and up are free, but inside the range


# -- share groups -----------------------------------------------------------------

_FEATURES_LOG = """\
[2026-01-01 10:00:00,000] INFO [ControllerServer id=1] Loaded new metadata FinalizedFeatures(metadataVersion=\
Optional[{mv}], finalizedFeatures={{{features}}}, finalizedFeaturesEpoch=11). \
(org.apache.kafka.metadata.publisher.FeaturesPublisher)
"""


def _log_features(kafka: LocalKafka, mv: str, features: str) -> None:
    kafka._dir.mkdir(parents=True, exist_ok=True)
    with open(kafka.log_path, "a") as log:
        log.write(_FEATURES_LOG.format(mv=mv, features=features))


def test_share_groups_on_says_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    kafka = LocalKafka(port=29092, home=tmp_path)
    assert kafka.finalized_features() is None  # no log yet
    _log_features(kafka, "4.4-IV2", "group.version=1, share.version=2, metadata.version=33")
    assert kafka.finalized_features() == {"group.version": 1, "share.version": 2, "metadata.version": 33}
    kafka.warn_without_share_groups()
    assert caplog.records == []


def test_data_of_an_older_kafka_warns_that_share_groups_are_off(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kafka = LocalKafka(port=29092, home=tmp_path)
    _log_features(kafka, "4.4-IV2", "share.version=2, metadata.version=33")
    _log_features(kafka, "4.1-IV1", "group.version=1, transaction.version=2, metadata.version=27")  # the last counts
    kafka.warn_without_share_groups()
    [record] = caplog.records
    assert record.levelname == "WARNING"
    text = record.getMessage()
    assert "share groups are off" in text and "metadata.version=27" in text and f"delete {kafka._data}" in text


def test_format_names_the_share_groups_feature(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[list[str]] = []
    monkeypatch.setattr(broker, "_run", lambda cmd: seen.append(cmd) or subprocess.CompletedProcess(cmd, 0, ""))
    LocalKafka(port=29092, home=tmp_path)._format("java")
    assert "--feature share.version=2" in " ".join(seen[0])


def test_a_java_exception_in_thread_main_is_quoted_without_the_prefix() -> None:
    lines = ['Exception in thread "main" java.lang.IllegalArgumentException: No feature:share.version with feature'
             " level 2", "\tat org.apache.kafka.server.common.Feature.lambda$fromFeatureLevel$4(Feature.java:150)"]
    assert broker._exception_line(lines) == (
        "java.lang.IllegalArgumentException: No feature:share.version with feature level 2")


# -- what `make broker` tells the user ---------------------------------------------


@pytest.mark.parametrize(("port", "export"), [(9092, False), (19092, True)])
def test_start_prints_the_export_line_when_the_scripts_would_miss_the_broker(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path, port: int, export: bool
) -> None:
    for started in (True, False):  # started now, or already running: the next command needs it either way
        monkeypatch.setattr(LocalKafka, "start", lambda self, *, _s=started, **kw: _s)
        assert _main_in(tmp_path, ["start", "--port", str(port)]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0].startswith(("Kafka is up at", "Kafka already running at"))
        line = f"export KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:{port}"
        assert (line in out) is export and len(out) == (3 if export else 1)
