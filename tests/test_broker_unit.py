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
from mtc75.tools.broker import LocalKafka

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
    """A port p such that p and p+1 are both free right now."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port < 65534 and broker._port_free(port) and broker._port_free(port + 1):
            return port
    pytest.skip("no two adjacent free ports")


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
    assert kafka.bootstrap == f"127.0.0.1:{port}"
    assert kafka.log_path == tmp_path / str(port) / "broker.log"
    assert _props(tmp_path / str(port) / "log4j2.properties")["appender.file.fileName"] == str(kafka.log_path)


def test_default_home_is_dot_kafka_in_the_repo() -> None:
    repo = Path(broker.__file__).resolve().parents[2]
    assert LocalKafka(port=29092).log_path == repo / ".kafka" / "29092" / "broker.log"


@pytest.mark.parametrize("port", [0, 65535, -1])
def test_unusable_port_is_refused(port: int) -> None:
    with pytest.raises(BrokerError, match="invalid Kafka port"):
        LocalKafka(port=port)


# -- port conflicts ---------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
@pytest.mark.usefixtures("no_java_or_fetch")
def test_port_taken_by_another_program(tmp_path: Path, host: str) -> None:
    with socket.socket() as listener:
        listener.bind((host, 0))
        listener.listen()
        port = listener.getsockname()[1]

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
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        # A tmp home: this must not touch the repo's .kafka even if it got further.
        code = _main_in(tmp_path, ["start", "--port", str(port)])

    err = capsys.readouterr().err
    assert code == BrokerError.exit_code
    assert err.startswith("broker: error: ") and err.count("\n") == 1 and str(port) in err


def _main_in(home_parent: Path, argv: list[str]) -> int:
    saved = broker._REPO_ROOT
    broker._REPO_ROOT = home_parent
    try:
        return broker.main(argv)
    finally:
        broker._REPO_ROOT = saved


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
