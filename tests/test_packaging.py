"""`pip install .` builds a wheel holding the library and its commands, and the installed copy runs on its own:
imports, console scripts, ``python -m mtc75`` and a short consumer run against the real broker, from a folder
outside the repository; and docs/service.md's service runs from a fresh venv holding ``mtc75[metrics]`` only.

The fresh venvs get no download: their dependencies are this environment's installed copies (the versions
requirements.txt pins), exposed one distribution at a time, only those the extra asks for (and theirs), so a
dependency the wheel forgot to declare is missing there as it would be for a user.

The installed copy includes the local Kafka launcher: its pom is package data, its jars and node folders go to
the user's cache folder ($XDG_CACHE_HOME/mtc75), so ``python -m mtc75.tools.broker start`` works outside the
repository.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import mtc75
from tests.conftest import TEST_PORT
from tests.kafka_helpers import ROOT, produce_numbered
from tests.local_kafka import free_pair
from tests.service_checks import run_and_check

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


@dataclass(frozen=True)
class Venv:
    python: Path
    bin: Path
    site: Path  # its site-packages, where the wheel went
    env: dict[str, str]  # no MTC75_*, KAFKA_* nor PYTHON* variables; its bin/ first on PATH


def _pins() -> dict[str, str]:
    """requirements.txt's pins: canonical name -> version."""
    lines = (line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines())
    return {canonicalize_name(name.split("[")[0]): version
            for name, version in (line.split("==") for line in lines if "==" in line)}


def _dependencies(wheel: Path, extra: str) -> dict[str, importlib.metadata.Distribution]:
    """What ``pip install "mtc75[extra]"`` needs, by the wheel's own Requires-Dist and then each dependency's:
    their installed copies in this environment, which must be the versions requirements.txt pins."""
    info = f"{wheel.name.split('-py')[0]}.dist-info"
    metadata = zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode()
    todo = [(Requirement(line.split(":", 1)[1].strip()), {"", extra})
            for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    found: dict[str, importlib.metadata.Distribution] = {}
    seen: set[tuple[str, str]] = set()
    pins = _pins()
    while todo:
        requirement, extras = todo.pop()
        if requirement.marker is not None and not any(requirement.marker.evaluate({"extra": e}) for e in extras):
            continue
        name = canonicalize_name(requirement.name)
        wanted = {(name, e) for e in {"", *requirement.extras}} - seen
        if not wanted:
            continue
        seen |= wanted
        dist = found.setdefault(name, importlib.metadata.distribution(name))
        assert pins.get(name) == dist.version, f"{name} {dist.version} is not the version requirements.txt pins"
        assert requirement.specifier.contains(dist.version, prereleases=True), (requirement, dist.version)
        todo += [(Requirement(text), {e for _, e in wanted}) for text in dist.requires or []]
    return found


def _fresh_venv(folder: Path, installed: Installed, extra: str) -> Venv:
    """A venv with the wheel installed as ``pip install "mtc75[extra]"`` would, and nothing else importable:
    no pip of its own (this environment's pip installs into it), no download (``--no-index``); the dependencies
    are links to this environment's copies of exactly those the extra needs, on a path file."""
    venv = folder / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True, timeout=60).stdout.strip())
    deps = folder / "deps"
    deps.mkdir()
    for dist in _dependencies(installed.wheel, extra).values():
        where = Path(dist.locate_file(""))
        for top in {Path(str(file)).parts[0] for file in dist.files or []} - {"..", "__pycache__"}:
            (deps / top).symlink_to(where / top)
    (site / "deps.pth").write_text(f"{deps}\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index",
                              "--quiet", f"{installed.wheel}[{extra}]"], capture_output=True, text=True, timeout=120)
    assert install.returncode == 0, install.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MTC75_", "KAFKA_", "PYTHON"))}
    env |= {"NO_COLOR": "1", "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"}
    return Venv(python, venv / "bin", site, env)


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
            "mtc75/tools/kafka-pom.xml", "mtc75/py.typed", "mtc75/__main__.py", "mtc75/commands/consumer.py"
            } <= set(names)
    info = f"{wheel.name.split('-py')[0]}.dist-info"
    metadata = zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode()
    assert "Requires-Dist: confluent-kafka" in metadata
    assert "License-Expression: Apache-2.0" in metadata and f"{info}/licenses/LICENSE" in names
    entry_points = zipfile.ZipFile(wheel).read(f"{info}/entry_points.txt").decode()
    for command in ("mtc75-consumer", "mtc75-produce", "mtc75-create-topic"):
        assert f"{command} = mtc75.commands:" in entry_points

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


@pytest.mark.timeout(400)
def test_the_installed_commands_run_outside_the_repository(
    installed: Installed, tmp_path: Path, bootstrap: str, make_topic: Callable[..., str],
    unique: Callable[[str], str],
) -> None:
    """A fresh venv with the wheel and its [cli] extra: the console scripts and ``python -m mtc75`` from a folder
    that is not the repository, then a consumer run against the real broker with its settings from flags and
    MTC75_* only."""
    venv = _fresh_venv(tmp_path, installed, "cli")
    python, bin_dir, site = venv.python, venv.bin, venv.site
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = venv.env

    def run(*args: str, timeout: float = 60, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(args), cwd=work, env=env | extra, capture_output=True, text=True, timeout=timeout)

    where = run(str(python), "-c", "import mtc75, importlib.resources as r; print(mtc75.__file__); "
                                   "print(r.files('mtc75').joinpath('py.typed').is_file())")
    assert where.returncode == 0, where.stderr
    assert where.stdout.split() == [str(site / "mtc75" / "__init__.py"), "True"]
    for command in ("mtc75-consumer", "mtc75-produce", "mtc75-create-topic"):
        version = run(str(bin_dir / command), "--version")
        assert version.returncode == 0 and version.stdout.startswith(f"{command} {mtc75.__version__} "), version
        helped = run(str(bin_dir / command), "--help")
        assert helped.returncode == 0 and "KAFKA_BOOTSTRAP_SERVERS" in helped.stdout, helped.stderr
    listing = run(str(python), "-m", "mtc75", "--help")
    assert listing.returncode == 0 and "create-topic" in listing.stdout

    topic, group = make_topic(2, "installed"), unique("installed")
    produce_numbered(bootstrap, topic, 40)
    summary = work / "summary.json"
    consumed = run(str(bin_dir / "mtc75-consumer"), "--topic", topic, "--processing-sleep", "0.001",
                   "--max-messages", "40", "--idle-exit", "30", "--summary-json", str(summary), "--no-dashboard",
                   timeout=120, MTC75_GROUP_ID=group, KAFKA_BOOTSTRAP_SERVERS=bootstrap)
    assert consumed.returncode == 0, consumed.stderr
    assert json.loads(summary.read_text())["processed"] == 40


@pytest.mark.timeout(400)
def test_the_docs_service_example_runs_from_a_fresh_venv_with_the_metrics_extra(
    installed: Installed, tmp_path: Path, bootstrap: str, make_topic: Callable[..., str],
    unique: Callable[[str], str],
) -> None:
    """docs/service.md says the service needs ``pip install "mtc75[metrics]"``: in a venv with that and nothing
    else, from a folder outside the repository, it runs against the real broker and keeps every promise its page
    makes (tests/service_checks.py); the commands there say which extra they lack."""
    venv = _fresh_venv(tmp_path, installed, "metrics")
    work = tmp_path / "elsewhere"
    work.mkdir()
    probe = ("import importlib.util, mtc75, prometheus_client; print(mtc75.__file__); "
             "print([name for name in ('rich', 'termcolor', 'faker', 'psutil') if importlib.util.find_spec(name)])")
    where = subprocess.run([str(venv.python), "-c", probe], cwd=work, env=venv.env, capture_output=True, text=True,
                           timeout=60)
    assert where.returncode == 0, where.stderr
    assert where.stdout.splitlines() == [str(venv.site / "mtc75" / "__init__.py"), "[]"]  # the [cli] extra is not
    helped = subprocess.run([str(venv.bin / "mtc75-consumer"), "--help"], cwd=work, env=venv.env,
                            capture_output=True, text=True, timeout=60)
    assert (helped.returncode, helped.stdout) == (2, ""), helped
    assert helped.stderr == "mtc75-consumer: error: needs termcolor, part of the cli extra: pip install 'mtc75[cli]'\n"

    run_and_check(venv.python, work, venv.env, bootstrap, make_topic, unique)
