"""docs/service.md's service, run against the real broker as its user runs it (issue 28's "Done when"): two
topics of JSON values, poison messages to each topic's own DLQ, ``on_error``, ``/healthz`` and ``/readyz`` from
``health()``, ``/metrics`` from the service's own registry, SIGTERM to a clean exit with everything committed.

The checks are in tests/service_checks.py; tests/test_packaging.py runs them again from an installed wheel.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.kafka_helpers import ROOT
from tests.service_checks import run_and_check

pytestmark = pytest.mark.timeout(240)


def test_the_docs_service_example_runs_against_the_broker(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MTC75_", "KAFKA_"))}
    env["PYTHONPATH"] = str(ROOT)
    run_and_check(sys.executable, tmp_path, env, bootstrap, make_topic, unique)
