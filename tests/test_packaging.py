"""`pip install .` builds a wheel holding the library only, and the installed copy imports on its own."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.kafka_helpers import ROOT


@pytest.mark.pypi
@pytest.mark.timeout(300)
def test_the_wheel_holds_the_library_only_and_imports_from_where_it_is_installed(tmp_path: Path) -> None:
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
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"mtc75", wheel.name.split("-py")[0] + ".dist-info"}  # no tests/, bench/, kafka/, scripts
    assert {"mtc75/__init__.py", "mtc75/api.py", "mtc75/engine/engine.py"} <= set(names)
    metadata = zipfile.ZipFile(wheel).read(f"{wheel.name.split('-py')[0]}.dist-info/METADATA").decode()
    assert "Requires-Dist: confluent-kafka" in metadata

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
