"""`pip install .` builds a wheel holding the library only, and the installed copy works on its own.

The installed copy includes the local Kafka launcher: its pom is package data, its jars and node folders go to
the user's cache folder ($XDG_CACHE_HOME/mtc75), so ``python -m mtc75.tools.broker start`` works outside the
repository.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import TEST_PORT
from tests.kafka_helpers import ROOT
from tests.local_kafka import free_pair

pytestmark = pytest.mark.pypi


@dataclass(frozen=True)
class Installed:
    wheel: Path
    target: Path  # what `pip install --target` made: the only place mtc75 is importable from


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    tmp_path = tmp_path_factory.mktemp("packaging")
    # A copy of the sources: setuptools writes build/ and *.egg-info next to them.
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".kafka", "build", "*.egg-info", "__pycache__", ".*_cache", "demo-report"))
    # pip builds in an isolated environment, as `pip install .` in a fresh venv does (setuptools from PyPI).
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(tmp_path / "dist"),
         str(source)],
        capture_output=True, text=True, timeout=240,
    )
    assert build.returncode == 0, build.stderr
    [wheel] = (tmp_path / "dist").glob("mtc75-*.whl")
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target),
                              str(wheel)], capture_output=True, text=True, timeout=120)
    assert install.returncode == 0, install.stderr
    return Installed(wheel, target)


def _outside(installed: Installed, *args: str, cwd: Path, timeout: float = 60,
             **env: str) -> subprocess.CompletedProcess[str]:
    """Python with only the installed copy of mtc75 on its path, run from a folder outside the repository."""
    base = {key: os.environ[key] for key in ("PATH", "HOME") if key in os.environ}
    return subprocess.run([sys.executable, *args], cwd=cwd, env={**base, "PYTHONPATH": str(installed.target), **env},
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(300)
def test_the_wheel_holds_the_library_only_and_imports_from_where_it_is_installed(
    installed: Installed, tmp_path: Path
) -> None:
    wheel, target = installed.wheel, installed.target
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"mtc75", wheel.name.split("-py")[0] + ".dist-info"}  # no tests/, bench/, scripts
    assert {"mtc75/__init__.py", "mtc75/api.py", "mtc75/engine/engine.py", "mtc75/testing.py",
            "mtc75/tools/kafka-pom.xml"} <= set(names)
    metadata = zipfile.ZipFile(wheel).read(f"{wheel.name.split('-py')[0]}.dist-info/METADATA").decode()
    assert "Requires-Dist: confluent-kafka" in metadata

    # Where a top-level ``tests`` would come from: not from the wheel. (Another installed package may
    # ship one: sentry-arroyo 2.48, the bench's peer, puts a ``tests`` package into site-packages.)
    probe = ("import importlib.util, mtc75; print(mtc75.__file__); print(sorted(mtc75.__all__)); "
             "spec = importlib.util.find_spec('tests'); "
             "print(list(spec.submodule_search_locations or [spec.origin]) if spec else [])")
    run = _outside(installed, "-c", probe, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    where, exported, tests = run.stdout.splitlines()
    assert where.startswith(str(target))  # the installed copy, not the repository's
    assert "'Consumer'" in exported and "'Stats'" in exported
    assert str(target) not in tests and not (target / "tests").exists()  # the wheel installed no tests


@pytest.mark.kafka  # starts a broker of its own (java + Maven), from the installed copy
@pytest.mark.timeout(420)
def test_the_installed_launcher_runs_kafka_from_the_user_cache(installed: Installed, tmp_path: Path) -> None:
    cache, elsewhere = tmp_path / "cache", tmp_path / "elsewhere"
    elsewhere.mkdir()
    home = cache / "mtc75"
    fetched = _outside(installed, "-m", "mtc75.tools.broker", "fetch", cwd=elsewhere, timeout=300,
                       XDG_CACHE_HOME=str(cache))
    assert fetched.returncode == 0, fetched.stderr
    assert fetched.stdout == f"Kafka jars are in {home / 'libs'}\n"
    assert any((home / "libs").glob("kafka_2.13-*.jar")) and (home / "libs" / ".pom.sha256").exists()
    assert not (installed.target / "mtc75" / "tools" / "target").exists()  # Maven wrote nothing beside the pom

    port = free_pair(TEST_PORT + 600)
    broker = ("-m", "mtc75.tools.broker")
    try:
        started = _outside(installed, *broker, "start", "--port", str(port), cwd=elsewhere, timeout=300,
                           XDG_CACHE_HOME=str(cache))
        assert started.returncode == 0, started.stderr
        lines = started.stdout.splitlines()
        assert lines[0] == f"Kafka is up at 127.0.0.1:{port} (log: {home / str(port) / 'broker.log'})"
        assert lines[-1] == f"export KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:{port}"
        assert (home / str(port) / "data" / "meta.properties").exists()
        status = _outside(installed, *broker, "status", "--port", str(port), cwd=elsewhere,
                          XDG_CACHE_HOME=str(cache))
        assert status.returncode == 0 and status.stdout.startswith(f"Kafka running at 127.0.0.1:{port}"), status
    finally:
        stopped = _outside(installed, *broker, "stop", "--port", str(port), cwd=elsewhere, timeout=120,
                           XDG_CACHE_HOME=str(cache))
    assert stopped.returncode == 0 and stopped.stdout == f"Kafka at 127.0.0.1:{port} stopped\n", stopped
