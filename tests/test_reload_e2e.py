"""Live reload against a real run (issue 22, item 6): nothing the user's config.py does stops the watcher or
the consumer, a file being written is never read as "every setting removed", and a config file that
calls sys.exit() at start-up is exit 2 with one line."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.kafka_helpers import (
    Lines,
    committed_offsets,
    produce_numbered,
    report_figures,
    run_script,
    script_env,
    start_script,
    stop_process,
    wait_until,
    write_touched,
)

pytestmark = pytest.mark.timeout(240)

GOOD = "MAX_THREAD_COUNT = 2\nPROCESSING_SLEEP = 0.1\n"
# What a user's edit may do; each must be one warning line while the consumer runs on with 2 threads.
HOSTILE = {
    "sys.exit(1)": "import sys\nsys.exit(1)\n",
    "raise KeyboardInterrupt": "raise KeyboardInterrupt\n",
    "raise SystemExit(0)": "raise SystemExit(0)\n",
    "os._exit(0)": "import os\nos._exit(0)\n",
    "endless loop": "while True:\n    pass\n",
}


def _threads(line: str) -> str | None:
    found = re.match(r"threads\s+\d+/(\S+)", line)
    return found.group(1) if found else None


def test_no_edit_stops_the_watcher_or_the_consumer_and_a_half_written_file_changes_nothing(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path
) -> None:
    topic = make_topic(partitions=2)
    produce_numbered(bootstrap, topic, 3000)  # 2 threads x 0.1 s: far more than the test's minute of work
    config = tmp_path / "config.py"
    write_touched(config, GOOD)
    proc = start_script("mtc75_consumer.py", "--config", str(config), "--topic", topic, "--group-id", unique("g"),
                        env=script_env(bootstrap))
    lines = Lines(proc)
    reported: dict[str, float] = {}

    def warnings() -> list[str]:
        return [line for line in list(lines.err) if "WARNING" in line and "config.py" in line]

    try:
        wait_until(lambda: any(_threads(line) == "2" for line in lines.out), timeout=60, what="2 threads busy")
        for name, body in HOSTILE.items():
            seen = len(warnings())
            saved = write_touched(config, GOOD + body)
            wait_until(lambda s=seen: len(warnings()) > s, timeout=20, what=f"{name}: its warning line")  # type: ignore[misc]
            reported[name] = time.monotonic() - saved
            assert proc.poll() is None, f"{name}: the consumer exited ({proc.returncode})"

        # An editor that truncates, then writes in two goes, a second apart each (real mtimes: the
        # watcher sees the empty file and the half file settle): nothing may fall back to a default.
        seen = len(warnings())
        config.write_text("")
        time.sleep(1.5)
        config.write_text("PROCESSING_SLEEP = 0.1\n")
        time.sleep(1.5)
        config.write_text(GOOD)
        time.sleep(1.5)
        removed = [line for line in warnings()[seen:] if "no longer set" in line]
        assert len(removed) == 1 and "MAX_THREAD_COUNT" in removed[0], warnings()[seen:]
        assert len(warnings()) == seen + 1, warnings()[seen:]

        saved = write_touched(config, GOOD.replace("= 2", "= 5"))
        wait_until(lambda: any(_threads(line) == "5" for line in lines.out), timeout=5, what="a status line with /5")
        applied_after = time.monotonic() - saved
        proc.terminate()
        assert proc.wait(timeout=60) == 0
    finally:
        stop_process(proc)
    lines.join()
    counts = [_threads(line) for line in lines.out if _threads(line)]
    before = counts[:counts.index("5")]
    assert set(before) == {"2"}, sorted(set(counts))  # never 75 (a default), never anything but 2 until the edit
    assert "Traceback" not in "".join(lines.err), "".join(lines.err)[-3000:]
    assert sum("not reloaded" in line for line in lines.err) == len(HOSTILE)  # one line each, no more
    report_figures("reload_hostile_edits", hostile_edits=len(HOSTILE),
                   seconds_to_warning={k: round(v, 2) for k, v in reported.items()},
                   half_written_file_lines=len(removed), status_lines_before_good_edit=len(before),
                   thread_counts_seen_before=sorted(set(before)),
                   good_edit_applied_after_s=round(applied_after, 2))


@pytest.mark.parametrize("body", ["import sys\nsys.exit(0)\n", "raise KeyboardInterrupt\n"])
def test_a_config_file_that_exits_at_start_up_is_exit_2_with_one_line(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path, body: str
) -> None:
    topic, group = make_topic(partitions=1), unique("g")
    produce_numbered(bootstrap, topic, 10)
    config = tmp_path / "config.py"
    config.write_text(GOOD + body)
    result = run_script("mtc75_consumer.py", "--config", str(config), "--topic", topic, "--group-id", group,
                        "--idle-exit", "3", env=script_env(bootstrap))
    errors = [line for line in result.stderr.splitlines() if line]
    assert result.returncode == 2, result.stderr
    assert len(errors) == 1 and errors[0].startswith("mtc75_consumer.py: error: ") and "config.py" in errors[0]
    assert committed_offsets(bootstrap, group, topic) == {0: -1001}, "it consumed"  # -1001: nothing committed
    report_figures("config_exits_at_start", body=body.strip(), exit_code=result.returncode, error_lines=len(errors))
