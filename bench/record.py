"""Result files: every figure the docs quote comes from one of these, committed in the repository.

A result file is a small JSON document written by the run that measured it:

    {"section": "limit", "command": "python -m bench.run --only limit",
     "started_utc": "2026-11-28T10:00:00Z", "finished_utc": "...", "seconds": 312.4,
     "commit": "698045e...", "dirty": false,
     "machine": {"cores": 2, "load_avg_before": [1, 5, 15 min], "load_avg_after": [...],
                 "python": "3.11.2", "platform": "..."},
     "note": "",            # free text; a run that is not meant to be quoted as final says so here
     "figures": {...}}      # the raw figures, as the run produced them

Bench sections write ``bench/results/<section>.json`` (bench/run.py and the other bench modules, through
:func:`write`); test runs that report ``FIGURES`` lines write ``tests/figures/<name>.json`` through this
module's command line, which wraps the pytest command:

    python -m bench.record faults -- .venv/bin/python -m pytest -m faults -v

It runs the command with ``MTC75_FAULT_FIGURES`` pointing at a scratch file (tests/kafka_helpers.py
``report_figures`` appends one JSON line per record, with the test that wrote it), adds a JUnit XML
report to read each test's outcome, and writes ``{"figures": {"records": [...], "tests": {...}}}``:
every record with its test's outcome, and the suite's counts (passed, failed, ...). Its exit code is the
command's. ``python -m bench.docs`` turns these files into the tables and figure cells of BENCHMARKS.md
and RELIABILITY.md.

Thread contract: everything here runs on the caller's thread; nothing is shared.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH_RESULTS = ROOT / "bench" / "results"
TEST_FIGURES = ROOT / "tests" / "figures"
RESULT_DIRS = (BENCH_RESULTS, TEST_FIGURES)
REQUIRED = ("section", "command", "started_utc", "finished_utc", "commit", "machine", "figures")
MACHINE_REQUIRED = ("cores", "load_avg_before", "load_avg_after")


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def git_commit() -> tuple[str, bool]:
    """(HEAD's commit, whether tracked files differ from it); ("unknown", True) outside a checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        return "unknown", True
    return head, dirty


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


@dataclass
class Run:
    """One measuring run: started by :meth:`start`, its file written by :meth:`write`."""

    section: str
    command: str
    started_utc: str = ""
    commit: str = ""
    dirty: bool = False
    load_before: list[float] = field(default_factory=list)
    t0: float = 0.0

    @classmethod
    def start(cls, section: str, command: str) -> Run:
        commit, dirty = git_commit()
        return cls(section, command, utc_now(), commit, dirty, load_avg(), time.monotonic())

    def document(self, figures: Any, note: str = "") -> dict[str, Any]:
        return {
            "section": self.section, "command": self.command, "started_utc": self.started_utc,
            "finished_utc": utc_now(), "seconds": round(time.monotonic() - self.t0, 1),
            "commit": self.commit, "dirty": self.dirty,
            "machine": {"cores": os.cpu_count(), "load_avg_before": self.load_before, "load_avg_after": load_avg(),
                        "python": platform.python_version(), "platform": platform.platform()},
            "note": note, "figures": figures,
        }

    def write(self, figures: Any, directory: Path = BENCH_RESULTS, note: str = "") -> Path:
        return write(self.document(figures, note), directory)


def write(document: dict[str, Any], directory: Path = BENCH_RESULTS) -> Path:
    """Write ``document`` to ``directory/<section>.json`` (compact, one key per line at the top)."""
    missing = [k for k in REQUIRED if k not in document]
    if missing:
        raise ValueError(f"result document lacks {missing}")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{document['section']}.json"
    path.write_text(dumps(document) + "\n")
    return path


def _flat(value: Any) -> bool:
    """A scalar, or a list / dict of scalars and lists of scalars: written on one line."""
    if isinstance(value, dict):
        return all(_flat(v) and not isinstance(v, dict) for v in value.values())
    if isinstance(value, list):
        return all(not isinstance(v, (dict, list)) for v in value)
    return True


def dumps(value: Any, level: int = 0) -> str:
    """JSON for diffs: each record (a dict of plain values) or short structure on one line, the rest nested."""
    one = json.dumps(value, ensure_ascii=False)
    if _flat(value) or len(one) <= 100:
        return one
    pad = " " * (level + 1)
    if isinstance(value, dict):
        items = [f"{pad}{json.dumps(k)}: {dumps(v, level + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * level + "}"
    return "[\n" + ",\n".join(pad + dumps(v, level + 1) for v in value) + "\n" + " " * level + "]"


def problems(document: Any) -> list[str]:
    """What a committed result file lacks: every one names its command, its UTC date, commit and machine."""
    if not isinstance(document, dict):
        return ["not a JSON object"]
    out = [f"no {k!r}" for k in REQUIRED if k not in document]
    if not isinstance(document.get("command"), str) or not document.get("command", "").strip():
        out.append("no command")
    for key in ("started_utc", "finished_utc"):
        try:
            dt.datetime.strptime(str(document.get(key)), "%Y-%m-%dT%H:%M:%SZ")
        except ValueError:
            out.append(f"{key} is not a UTC date/time (YYYY-MM-DDTHH:MM:SSZ): {document.get(key)!r}")
    machine = document.get("machine")
    if not isinstance(machine, dict) or any(k not in machine for k in MACHINE_REQUIRED):
        out.append(f"machine lacks one of {MACHINE_REQUIRED}")
    return out


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def result_files() -> list[Path]:
    return sorted(p for d in RESULT_DIRS if d.is_dir() for p in d.glob("*.json"))


# -- test runs: FIGURES records and outcomes ---------------------------------------------------------



def outcomes(junit: Path) -> dict[str, str]:
    """Test id (``tests/test_x.py::test_name[param]``) -> passed / failed / error / skipped."""
    out: dict[str, str] = {}
    if not junit.exists():
        return out
    for case in ET.parse(junit).getroot().iter("testcase"):
        module = case.get("classname", "")
        nodeid = module.replace(".", "/") + ".py::" + case.get("name", "")
        kinds = {child.tag for child in case}
        out[nodeid] = ("failed" if "failure" in kinds else "error" if "error" in kinds
                       else "skipped" if "skipped" in kinds else "passed")
    return out


def counts(outcome: dict[str, str]) -> dict[str, int]:
    result: dict[str, int] = {}
    for value in outcome.values():
        result[value] = result.get(value, 0) + 1
    return result


def record_test_run(name: str, command: list[str], note: str = "") -> int:
    """Run a pytest ``command`` collecting its FIGURES records and outcomes into tests/figures/<name>.json."""
    shown = " ".join(shlex.quote(c) for c in command)
    shown = shown.replace(str(ROOT) + "/", "")
    run = Run.start(name, f"python -m bench.record {name} -- {shown}")
    with tempfile.TemporaryDirectory(prefix="mtc75-figures-") as tmp:
        lines, junit = Path(tmp) / "figures.jsonl", Path(tmp) / "junit.xml"
        env = dict(os.environ, MTC75_FAULT_FIGURES=str(lines))
        proc = subprocess.Popen([*command, f"--junit-xml={junit}"], cwd=ROOT, env=env)
        peak = os.getloadavg()[0]
        while proc.poll() is None:  # the 1-minute load average, sampled: before/after miss a busy middle
            peak = max(peak, os.getloadavg()[0])
            time.sleep(5)
        code = proc.returncode
        outcome = outcomes(junit)
        records = []
        for line in lines.read_text().splitlines() if lines.exists() else ():
            record = json.loads(line)
            record["outcome"] = outcome.get(str(record.get("test", "")), "unknown")
            records.append(record)
    figures = {"exit_code": code, "tests": counts(outcome), "records": records}
    document = run.document(figures, note)
    document["machine"]["load_avg_1m_peak"] = round(peak, 2)
    path = write(document, TEST_FIGURES)
    print(f"bench.record: {len(records)} FIGURES records, tests {figures['tests']} -> {path.relative_to(ROOT)}")
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.record", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="the result file: tests/figures/<name>.json")
    parser.add_argument("--note", default="", help="stored with the figures (say here when a run is not final)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the pytest command")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not re.fullmatch(r"[a-z0-9_-]+", args.name) or not command:
        parser.error("usage: python -m bench.record NAME -- PYTEST COMMAND (NAME: lower-case letters, digits, _ -)")
    return record_test_run(args.name, command, args.note)


if __name__ == "__main__":
    sys.exit(main())
