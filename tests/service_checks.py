"""The service example of docs/service.md, run as its user runs it and checked from outside (issue 28's "Done when").

Shared by tests/test_service_example.py (the checkout's mtc75) and tests/test_packaging.py (a wheel in a fresh
venv, outside the repository): ``run_and_check`` takes the Python to run it with, the folder and the environment.
The example is taken from the page itself (between the HTML comment naming this test and the end of its block)
with its topics, group, bootstrap and port replaced; each replaced literal must still be on the page.
Single-threaded: called from the test's own thread; every wait is bounded.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from confluent_kafka import Producer
from prometheus_client.parser import text_string_to_metric_families

from mtc75.kafka.deadletter import H_ATTEMPTS, H_ERROR, H_OFFSET, H_PARTITION, H_TOPIC
from tests.conftest import TEST_PORT
from tests.kafka_helpers import ROOT, committed_offsets, end_offsets, read_topic, stop_process, wait_until
from tests.local_kafka import free_pair

MARKER = "<!-- tests/test_service_example.py runs the next block"
GOOD = 25  # good messages per topic before the checks of /metrics, then one more each just before SIGTERM
PORT = TEST_PORT + 700  # where the example's HTTP server looks for a free port (below the ephemeral range)
STOP_BOUND = 30.0  # seconds from SIGTERM to exit: SHUTDOWN_TIMEOUT (30) is the most a handler may hold it


def docs_service_example() -> str:
    text = (ROOT / "docs" / "service.md").read_text()
    assert MARKER in text, "the service example of docs/service.md is gone"
    return text.split(MARKER, 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


def service_code(bootstrap: str, orders: str, payments: str, group: str, port: int) -> str:
    code = docs_service_example()
    for literal, value in (
        ('topic=["orders", "payments"]', f"topic={[orders, payments]!r}"),
        ('group_id="shop"', f"group_id={group!r}"),
        ('"127.0.0.1:9092"', repr(bootstrap)),
        ('("0.0.0.0", 8080)', repr(("127.0.0.1", port))),
    ):
        assert code.count(literal) == 1, f"docs/service.md no longer shows {literal} (the test replaces it)"
        code = code.replace(literal, value)
    return code


def _get(port: int, path: str) -> tuple[int, str] | None:
    """(status, body) of GET ``path``; None while nothing listens yet."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except (ConnectionError, urllib.error.URLError):
        return None


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


class _Sent:
    """What the test produced: the good events per topic and where each poison message landed."""

    def __init__(self, bootstrap: str) -> None:
        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
        self.good: dict[str, dict[int, int]] = {}  # topic -> id -> amount
        self.poison: dict[str, tuple[bytes, list[tuple[int, int]]]] = {}  # topic -> (value, [(partition, offset)])
        self.failures: list[str] = []

    def event(self, topic: str, event_id: int, amount: int) -> None:
        self.good.setdefault(topic, {})[event_id] = amount
        self._send(topic, json.dumps({"id": event_id, "amount": amount}).encode(), f"k{event_id}")

    def bad(self, topic: str, value: bytes) -> None:
        self.poison[topic] = (value, [])
        self._send(topic, value, "bad", where=self.poison[topic][1])

    def _send(self, topic: str, value: bytes, key: str, where: list[tuple[int, int]] | None = None) -> None:
        def report(err: object, msg: object) -> None:
            if err is not None:
                self.failures.append(str(err))
            elif where is not None:
                where.append((msg.partition(), msg.offset()))  # type: ignore[attr-defined]

        self.producer.produce(topic, value=value, key=key, on_delivery=report)

    def flush(self) -> None:
        left = self.producer.flush(30)
        assert left == 0 and not self.failures, f"produce failed: {left} undelivered, {self.failures[:3]}"


def _handled(log: Path) -> Counter[tuple[str, int, int]]:
    """The handler's log lines: (topic, id, amount) of each message it handled."""
    found = (re.search(r" INFO \S+ (\S+) (\d+): (\d+) cents$", line) for line in log.read_text().splitlines())
    return Counter((m[1], int(m[2]), int(m[3])) for m in found if m)


def run_and_check(python: Path | str, workdir: Path, env: dict[str, str], bootstrap: str,
                  make_topic: Callable[..., str], unique: Callable[[str], str]) -> None:
    """Run docs/service.md's example with ``python`` in ``workdir`` and check every promise of the page."""
    orders, payments, group = make_topic(3, "orders"), make_topic(2, "payments"), unique("shop")
    port = free_pair(PORT)
    (workdir / "service.py").write_text(service_code(bootstrap, orders, payments, group, port))
    log = workdir / "service.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(python), "service.py"], cwd=workdir, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        # /readyz: 503 until the group assigned both topics' partitions, then 200; every answer says why.
        answers: list[tuple[int, dict[str, object]]] = []
        deadline = time.monotonic() + 60
        while not answers or answers[-1][0] != 200:
            assert proc.poll() is None, f"the service exited ({proc.returncode}):\n{log.read_text()}"
            assert time.monotonic() < deadline, f"/readyz never answered 200: {answers[-3:]}\n{log.read_text()}"
            answer = _get(port, "/readyz")
            if answer is not None:
                status, body = answer[0], json.loads(answer[1])
                answers.append((status, body))
                assert status in (200, 503), answers
                assert (status == 200) == (body["assigned"] == 5 and body["reason"] == "ok"), answers
            time.sleep(0.05)
        healthz = _get(port, "/healthz")
        assert healthz is not None and healthz[0] == 200 and json.loads(healthz[1])["reason"] == "ok", healthz
        elsewhere = _get(port, "/metricsz")
        assert elsewhere is not None and elsewhere[0] == 404, elsewhere

        # Good JSON events on both topics, and one poison message each: not JSON on orders (the deserializer
        # fails it at once), a negative amount on payments (the handler raises, three attempts).
        sent = _Sent(bootstrap)
        for i in range(GOOD):
            sent.event(orders, i, 100 + 7 * i)
            sent.event(payments, 1000 + i, 50 + 3 * i)
            if i == GOOD // 2:
                sent.bad(orders, b'{"id": 77, "amount": 1')
                sent.bad(payments, json.dumps({"id": 99, "amount": -5}).encode())
        sent.flush()
        total = 2 * GOOD + 2
        scraped: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

        def all_processed() -> bool:
            nonlocal scraped
            answer = _get(port, "/metrics")
            assert answer is not None and answer[0] == 200, answer
            scraped = _samples(answer[1])
            # registered before the run turns ready: absent now means not on the service's registry at all
            assert ("mtc75_processed_total", ()) in scraped, f"no mtc75_* metrics on /metrics:\n{answer[1]}"
            return scraped[("mtc75_processed_total", ())] >= total

        wait_until(all_processed, timeout=60, step=0.2, what=f"mtc75_processed_total {total} on /metrics")
        # One scrape of the service's own registry: MTC75's metrics and the service's own, side by side.
        assert scraped[("mtc75_processed_total", ())] == total
        assert scraped[("mtc75_dead_lettered_total", ())] == 2, scraped[("mtc75_dead_lettered_total", ())]
        for topic in (orders, payments):
            own = scraped.get(("shop_amount_cents_total", (("topic", topic),)))
            assert own == sum(sent.good[topic].values()), f"shop_amount_cents_total of {topic}: {own}"
        lagged = {dict(labels)["topic"] for name, labels in scraped if name == "mtc75_lag"}
        assert lagged == {orders, payments}
        assert {dict(labels)["group"] for name, labels in scraped if name == "mtc75_lag"} == {group}

        # The last two events, and SIGTERM as soon as they are handled, so that their commit is most likely the
        # shutdown's, not a periodic one's (COMMIT_INTERVAL 0.5 s).
        sent.event(orders, GOOD, 1)
        sent.event(payments, 1000 + GOOD, 2)
        sent.flush()
        wait_until(lambda: sum(_handled(log).values()) >= 2 * GOOD + 2, timeout=30, what="the last two events")
        proc.send_signal(signal.SIGTERM)
        sigterm = time.monotonic()
        proc.wait(timeout=STOP_BOUND + 30)
        stopped_in = time.monotonic() - sigterm
    finally:
        stop_process(proc)  # type: ignore[arg-type]
    lines = log.read_text().splitlines()
    assert proc.returncode == 0, "\n".join(lines[-30:])
    assert stopped_in < STOP_BOUND, f"SIGTERM to exit took {stopped_in:.1f}s"

    # Every good event handled once (none twice, none lost), and nothing else reached the handler.
    expected = Counter((topic, i, amount) for topic, events in sent.good.items() for i, amount in events.items())
    assert _handled(log) == expected
    # Each poison message on its own topic's dead-letter topic: original bytes and coordinates, attempts, error.
    for topic, attempts, error in ((orders, b"1", "DeserializationError: could not deserialize the value (json)"),
                                   (payments, b"3", f"ValueError: negative amount in {payments} 99")):
        value, [(partition, offset)] = sent.poison[topic]
        assert sum(end_offsets(bootstrap, f"{topic}.dlq").values()) == 1, f"{topic}.dlq"
        [dead] = read_topic(bootstrap, f"{topic}.dlq", 1)
        headers = dict(dead.headers() or [])
        assert dead.value() == value
        assert (headers[H_TOPIC], headers[H_PARTITION], headers[H_OFFSET], headers[H_ATTEMPTS]) == (
            topic.encode(), str(partition).encode(), str(offset).encode(), attempts)
        assert headers[H_ERROR].decode().startswith(error), headers[H_ERROR]
        # on_error heard the outcome, on its own thread
        gave_up = [line for line in lines if f" ERROR mtc75-on-error gave up on {topic}[{partition}]@{offset} "
                   f"(dead_lettered): {error}" in line]
        assert len(gave_up) == 1, [line for line in lines if "gave up" in line]
    assert lines[-1].endswith(f" INFO MainThread stopped: {total + 2} handled, 2 dead-lettered"), lines[-1]
    for topic in (orders, payments):  # everything committed at the end, the last two events included
        assert committed_offsets(bootstrap, group, topic) == end_offsets(bootstrap, topic), topic
