"""The commands without a broker: ``python -m mtc75``, ``--version``, ``--help`` with the effective defaults,
the environment and the exit codes, settings outside the repository, a missing optional dependency."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

import mtc75
from mtc75 import errors
from tests.kafka_helpers import ROOT

SCRIPTS = ("mtc75_consumer.py", "producer.py", "create_topic.py")
COMMANDS = ("consumer", "produce", "create-topic")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MTC75_", "KAFKA_"))}
    return env | {"PYTHONPATH": str(ROOT), "NO_COLOR": "1", "COLUMNS": "200"} | extra


def _module(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m mtc75 ...`` from ``cwd`` (a folder outside the repository)."""
    return subprocess.run([sys.executable, "-m", "mtc75", *args], cwd=cwd, env=_env(**env), capture_output=True,
                          text=True, timeout=60)


def _script(name: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / name), *args], cwd=ROOT, env=_env(**env), capture_output=True,
                          text=True, timeout=60)


def _setting_help(help_text: str, flag: str) -> str:
    """The help paragraph of one setting flag, on one line."""
    match = re.search(rf"\n  {flag} \S+\s+(.*?)(?=\n  -|\n\n)", help_text, re.S)
    assert match is not None, help_text
    return " ".join(match.group(1).split())


def test_python_m_mtc75_lists_its_commands_and_refuses_an_unknown_one(tmp_path: Path) -> None:
    listing = _module("--help", cwd=tmp_path)
    assert listing.returncode == 0
    for command in COMMANDS:
        assert re.search(rf"^  {command} ", listing.stdout, re.M)
    for args in ([], ["consume"]):
        wrong = _module(*args, cwd=tmp_path)
        assert wrong.returncode == 2
        assert wrong.stderr.strip().splitlines()[-1].startswith("python -m mtc75: error: ")


def test_every_command_and_script_tells_its_version(tmp_path: Path) -> None:
    import confluent_kafka

    tail = f" {mtc75.__version__} (confluent-kafka {confluent_kafka.__version__}, librdkafka "
    for command in COMMANDS:
        result = _module(command, "--version", cwd=tmp_path)
        assert result.returncode == 0 and result.stdout.startswith(f"python -m mtc75 {command}{tail}"), result
    for script in SCRIPTS:
        result = _script(script, "--version")
        assert result.returncode == 0 and result.stdout.startswith(f"{script}{tail}"), result
    top = _module("--version", cwd=tmp_path)
    assert top.returncode == 0 and top.stdout.startswith(f"python -m mtc75{tail}")


def test_help_shows_the_default_this_run_would_take_and_where_it_comes_from(tmp_path: Path) -> None:
    config = tmp_path / "service.py"
    config.write_text("MAX_THREAD_COUNT = 12\nTOPIC = 'orders'\n")
    result = _module("consumer", "--help", cwd=tmp_path, MTC75_CONFIG=str(config), MTC75_PAUSE_INTERVAL="2.5",
                     KAFKA_BOOTSTRAP_SERVERS="kafka-1:9092", MTC75_GROUP_ID="100%-billing")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "(default 12 from service.py;" in _setting_help(text, "--max-thread-count")
    assert "(default 'orders' from service.py;" in _setting_help(text, "--topic")
    assert "(default 2.5 from MTC75_PAUSE_INTERVAL;" in _setting_help(text, "--pause-interval")
    assert "(default 'kafka-1:9092' from KAFKA_BOOTSTRAP_SERVERS;" in _setting_help(text, "--bootstrap-servers")
    assert "(default 'dlq'; env MTC75_ON_FAILURE)" in _setting_help(text, "--on-failure")  # built in
    assert "(default '100%-billing' from MTC75_GROUP_ID;" in _setting_help(text, "--group-id")  # a '%' is text
    # --config on the command line wins over MTC75_CONFIG, also for the help
    other = tmp_path / "other.py"
    other.write_text("MAX_THREAD_COUNT = 3\n")
    again = _module("consumer", "--config", str(other), "--help", cwd=tmp_path, MTC75_CONFIG=str(config))
    assert "(default 3 from other.py;" in _setting_help(again.stdout, "--max-thread-count")


def test_the_repository_scripts_show_the_repository_config_and_a_broken_one_still_gets_help(tmp_path: Path) -> None:
    repo = _script("mtc75_consumer.py", "--help")
    assert "from config.py;" in _setting_help(repo.stdout, "--max-thread-count")
    broken = tmp_path / "broken.py"
    broken.write_text("MAX_THREAD_COUNT = 'lots'\n")
    result = _script("mtc75_consumer.py", "--config", str(broken), "--help")
    assert result.returncode == 0
    assert "(default 75; env MTC75_MAX_THREAD_COUNT)" in _setting_help(result.stdout, "--max-thread-count")
    assert "built-in defaults shown: invalid MAX_THREAD_COUNT='lots'" in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_help_names_the_bootstrap_variable_and_every_exit_code(command: str, tmp_path: Path) -> None:
    text = _module(command, "--help", cwd=tmp_path).stdout
    assert "KAFKA_BOOTSTRAP_SERVERS" in text and "MTC75_CONFIG" in text
    listed = set(re.findall(r"^  (\d+)(?:/(\d+))? ", text.split("exit codes:")[1], re.M))
    codes = {int(code) for pair in listed for code in pair if code}
    raised = {cls.exit_code for _, cls in inspect.getmembers(errors, inspect.isclass)
              if issubclass(cls, errors.Mtc75Error) and not issubclass(cls, errors.LauncherError)}  # 4: the launchers'
    assert raised | {0, 130, 143} <= codes, sorted(codes)


def _installed(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``mtc75-consumer ...`` as its console script calls it (tests/test_packaging.py runs the real one)."""
    code = "import sys; from mtc75.commands import mtc75_consumer; sys.exit(mtc75_consumer())"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=_env(**env), capture_output=True,
                          text=True, timeout=60)


def _front(front: str, cwd: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """``python -m mtc75 consumer`` or ``mtc75-consumer`` in ``cwd``, with a config.py there it must not read."""
    (cwd / "config.py").write_text("MAX_THREAD_COUNT = 'a file in the working folder is not read'\n")

    def command(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        if front == "mtc75-consumer":
            return _installed(*args, cwd=cwd, **env)
        return _module("consumer", *args, cwd=cwd, **env)

    return command


@pytest.mark.parametrize("front", ["python -m mtc75 consumer", "mtc75-consumer"])
def test_installed_commands_read_no_config_file_unless_told(front: str, tmp_path: Path) -> None:
    result = _front(front, tmp_path)("--help")
    assert "(default 75; env MTC75_MAX_THREAD_COUNT)" in _setting_help(result.stdout, "--max-thread-count")


@pytest.mark.slow  # waits out the 10 s metadata timeout it reports: make test runs it, make unit does not
@pytest.mark.parametrize("front", ["python -m mtc75 consumer", "mtc75-consumer"])
def test_installed_commands_run_on_flags_and_variables_alone(front: str, tmp_path: Path) -> None:
    # the settings come from flags and MTC75_* alone, not config.py (the broker is unreachable: exit 3, not 2)
    run = _front(front, tmp_path)("--topic", "t", "--group-id", "g", MTC75_BOOTSTRAP_SERVERS="127.0.0.1:1")
    assert run.returncode == 3, run.stderr
    line = run.stderr.strip().splitlines()[-1]
    assert line.startswith(f"{front}: error: cannot reach Kafka") and "make broker" not in line
    assert "KAFKA_BOOTSTRAP_SERVERS" in line


def test_a_missing_cli_dependency_is_one_line_naming_the_extra(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['termcolor'] = None; from mtc75.commands import run; "
            "sys.exit(run('consumer', ['--help']))")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert result.stderr == "mtc75-consumer: error: needs termcolor, part of the cli extra: pip install 'mtc75[cli]'\n"


def test_the_wheel_lists_every_package_of_mtc75() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "mtc75").rglob("__init__.py")}
    assert found == listed


def test_ctrl_c_while_an_installed_command_imports_is_exit_130_not_a_traceback(tmp_path: Path) -> None:
    """The console script's wrapper imports mtc75 first: its start-up handler is in place from then on."""
    wrapper = tmp_path / "mtc75-consumer"  # what pip writes, named like it
    wrapper.write_text("import signal, mtc75\nprint(getattr(signal.getsignal(signal.SIGINT), '__name__', None))\n")
    result = subprocess.run([sys.executable, str(wrapper)], cwd=tmp_path, env=_env(), capture_output=True,
                            text=True, timeout=60)
    assert result.stdout.strip() == "_interrupted", result.stderr
    other = tmp_path / "my-service"  # anyone else's program keeps Python's own Ctrl-C
    other.write_text(wrapper.read_text())
    result = subprocess.run([sys.executable, str(other)], cwd=tmp_path, env=_env(), capture_output=True,
                            text=True, timeout=60)
    assert result.stdout.strip() == "default_int_handler", result.stderr
