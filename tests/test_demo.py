"""`make demo` is the main job: it must work from the README, end by itself and show the pause."""

from __future__ import annotations

import os
import re
import subprocess
import time

import pytest

from tests.conftest import TEST_PORT
from tests.kafka_helpers import ROOT
from tests.local_kafka import free_pair
from tests.test_report import count_panels


@pytest.mark.kafka  # starts its own broker, on DEMO_PORT
@pytest.mark.timeout(420)
def test_make_demo_runs_end_to_end_with_its_own_broker() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MTC75_", "KAFKA_"))}
    env["NO_COLOR"] = "1"
    # Its own broker on a free pair (the demo stops only what it started): never one already running there.
    port = free_pair(TEST_PORT + 100)
    while (ROOT / ".kafka" / str(port) / "cluster.json").exists():  # a cluster node's folder: not the demo's
        port = free_pair(port + 2)
    demo_port = os.environ.get("MTC75_TEST_DEMO_PORT") or str(port)
    started = time.time()
    if "KAFKA_BOOTSTRAP_SERVERS" in os.environ:  # an external cluster: the demo uses it too
        env["KAFKA_BOOTSTRAP_SERVERS"] = os.environ["KAFKA_BOOTSTRAP_SERVERS"]
    result = subprocess.run(
        ["make", "--no-print-directory", "demo", f"KAFKA_PORT={demo_port}"], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=400,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "PAUSED" in output and "RESUMED" in output
    assert "threads   4/4" in output  # the status line shows the pool full
    assert "all 600 messages handled" in output
    assert re.search(r"== demo: removed topics (mtc75-demo-\S+) and \1\.dlq$", output, re.M)  # nothing left behind
    assert not re.search(r"^%\d\|", output, re.M)  # no raw librdkafka line: they go through logging
    report = ROOT / "demo-report"  # the README's example plot comes from here
    assert "run report: demo-report/report.png" in output
    for name in ("report.png", "timeseries.csv"):
        assert (report / name).stat().st_mtime >= started - 1, f"{name} was not written by this run"
    assert count_panels(report / "report.png") == 3
    if "KAFKA_BOOTSTRAP_SERVERS" not in env:
        assert "stopping the local Kafka it started" in output
        status = subprocess.run(
            [str(ROOT / ".venv" / "bin" / "python"), "-m", "mtc75.tools.broker", "status", "--port", demo_port],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
        )
        # it stopped what it started: `status` exits 1 for "not running" (2 would be a usage error)
        assert status.returncode == 1, status.stdout + status.stderr
        assert f"no MTC75 broker running on port {demo_port}" in status.stdout
