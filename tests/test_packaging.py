"""`pip install .` builds a wheel holding the library and its commands, and the installed copy runs on its own:
imports, console scripts, ``python -m mtc75`` and a short consumer run against the real broker, from a folder
outside the repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

import mtc75
from tests.kafka_helpers import ROOT, produce_numbered


def _build_wheel(tmp_path: Path) -> Path:
    """The wheel pip builds from a copy of the sources, in an isolated environment (setuptools from PyPI)."""
    source = tmp_path / "src"  # setuptools writes build/ and *.egg-info next to the sources
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".kafka", "build", "*.egg-info", "__pycache__", ".*_cache", "demo-report"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(tmp_path / "dist"),
         str(source)],
        capture_output=True, text=True, timeout=240,
    )
    assert build.returncode == 0, build.stderr
    [wheel] = (tmp_path / "dist").glob("mtc75-*.whl")
    return wheel


@pytest.mark.pypi
@pytest.mark.timeout(300)
def test_the_wheel_holds_the_library_only_and_imports_from_where_it_is_installed(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"mtc75", wheel.name.split("-py")[0] + ".dist-info"}  # no tests/, bench/, kafka/, scripts
    assert {"mtc75/__init__.py", "mtc75/api.py", "mtc75/engine/engine.py", "mtc75/py.typed",
            "mtc75/__main__.py", "mtc75/commands/consumer.py"} <= set(names)
    info = f"{wheel.name.split('-py')[0]}.dist-info"
    metadata = zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode()
    assert "Requires-Dist: confluent-kafka" in metadata
    assert "License-Expression: Apache-2.0" in metadata and f"{info}/licenses/LICENSE" in names
    entry_points = zipfile.ZipFile(wheel).read(f"{info}/entry_points.txt").decode()
    for command in ("mtc75-consumer", "mtc75-produce", "mtc75-create-topic"):
        assert f"{command} = mtc75.commands:" in entry_points

    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target),
                              str(wheel)], capture_output=True, text=True, timeout=120)
    assert install.returncode == 0, install.stderr
    # Where a top-level ``tests`` would come from: not from the wheel. (Another installed package may
    # ship one: sentry-arroyo 2.48, the bench's peer, puts a ``tests`` package into site-packages.)
    probe = ("import importlib.util, mtc75; print(mtc75.__file__); print(sorted(mtc75.__all__)); "
             "spec = importlib.util.find_spec('tests'); "
             "print(list(spec.submodule_search_locations or [spec.origin]) if spec else [])")
    run = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(target)},
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    where, exported, tests = run.stdout.splitlines()
    assert where.startswith(str(target))  # the installed copy, not the repository's
    assert "'Consumer'" in exported and "'Stats'" in exported
    assert str(target) not in tests and not (target / "tests").exists()  # the wheel installed no tests


@pytest.mark.pypi
@pytest.mark.timeout(400)
def test_the_installed_commands_run_outside_the_repository(
    tmp_path: Path, bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str]
) -> None:
    """A fresh venv with the wheel: the console scripts and ``python -m mtc75`` from a folder that is not the
    repository, then a consumer run against the real broker with its settings from flags and MTC75_* only."""
    wheel = _build_wheel(tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    # The dependencies come from this environment's site-packages (no second download of the [cli] extra);
    # mtc75 itself only from the wheel: this environment has none installed (PYTHONPATH is what finds ours).
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--quiet", str(wheel)],
                             capture_output=True, text=True, timeout=120)
    assert install.returncode == 0, install.stderr
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MTC75_", "KAFKA_", "PYTHON"))}
    env |= {"NO_COLOR": "1", "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"}

    def run(*args: str, timeout: float = 60, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(args), cwd=work, env=env | extra, capture_output=True, text=True, timeout=timeout)

    where = run(str(python), "-c", "import mtc75, importlib.resources as r; print(mtc75.__file__); "
                                   "print(r.files('mtc75').joinpath('py.typed').is_file())")
    assert where.returncode == 0, where.stderr
    assert where.stdout.split() == [str(Path(site, "mtc75", "__init__.py")), "True"]
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
