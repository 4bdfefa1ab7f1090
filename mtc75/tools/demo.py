"""``make demo``: the three-terminal flow in one, self-contained and ending by itself.

Starts a local Kafka unless ``KAFKA_BOOTSTRAP_SERVERS`` names a cluster, creates a fresh topic,
runs the real scripts -- the consumer with a few threads, then the producer with a burst large
enough to saturate them -- so the output shows threads filling up, the pause and the resume.
It checks the consumer's summary, removes its topic and the topic's dead-letter topic (which the
consumer creates), and stops whatever it started. Main thread only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from mtc75.app.cli import error_line, paint, use_color
from mtc75.errors import Mtc75Error
from mtc75.settings import LIBRDKAFKA_LOGGER
from mtc75.tools.broker import DEFAULT_PORT, LocalKafka

ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT = 240.0  # the whole demo takes well under a minute; this only guards against a hang


def _say(text: str, color: bool) -> None:
    print(paint(f"== demo: {text}", "magenta", color, bold=True), flush=True)


def _script(name: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / name), *args]


def remove_topics(bootstrap: str, topics: list[str], timeout: float = 10.0) -> list[str]:
    """Delete ``topics`` (one missing already counts as removed); returns why each of the others was not.

    The admin client logs through the library's librdkafka logger, never raw on stderr, and lives until
    every deletion has answered (a client destroyed at once would drop the requests).
    """
    admin = AdminClient({"bootstrap.servers": bootstrap, "logger": LIBRDKAFKA_LOGGER})
    failed = []
    unique = list(dict.fromkeys(topics))  # a name twice in one request crashed confluent-kafka 2.16.1 (SIGSEGV)
    for topic, future in admin.delete_topics(unique, operation_timeout=timeout, request_timeout=timeout).items():
        try:
            future.result(timeout=timeout + 5)
        except KafkaException as err:
            if err.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                failed.append(f"{topic}: {err.args[0].str()}")
        except Exception as err:  # a timeout: the broker did not answer
            failed.append(f"{topic}: {type(err).__name__}: {err}")
    return failed


def run_demo(messages: int, threads: int, sleep: float, pause_interval: float, port: int,
             report: Path | None = None) -> int:
    color = use_color()
    env = dict(os.environ)
    broker: LocalKafka | None = None
    bootstrap = env.get("KAFKA_BOOTSTRAP_SERVERS")
    if not bootstrap:
        broker = LocalKafka(port=port)
        _say(f"starting a local Kafka on 127.0.0.1:{port} (first run fetches it with Maven)", color)
        broker.fetch()
        if not broker.start():
            broker = None  # already running: not ours to stop
        bootstrap = f"127.0.0.1:{port}"
        env["KAFKA_BOOTSTRAP_SERVERS"] = bootstrap
    stamp = time.strftime("%Y%m%d-%H%M%S")
    topic, group = f"mtc75-demo-{stamp}", f"mtc75-demo-{stamp}"
    common = ["--topic", topic]
    try:
        _say(f"creating topic {topic} on {bootstrap}", color)
        subprocess.run(_script("create_topic.py", *common, "--num-partitions", "3"), env=env, check=True,
                       timeout=60)
        with tempfile.TemporaryDirectory() as tmp:
            summary_path = Path(tmp) / "summary.json"
            _say(f"consumer: {threads} threads, {sleep}s of work per message, pause interval {pause_interval}s "
                 f"-> at most {threads / sleep:.0f} msg/s", color)
            _say(f"producer: a burst of {messages} Faker records, faster than the threads can keep up", color)
            extra = ["--report", str(report)] if report is not None else []
            consumer = subprocess.Popen(
                _script(
                    "mtc75_consumer.py", *common, "--group-id", group, "--max-thread-count", str(threads),
                    "--processing-sleep", str(sleep), "--pause-interval", str(pause_interval),
                    "--max-messages", str(messages), "--idle-exit", "60", "--summary-json", str(summary_path),
                    "--no-reload", *extra,
                ),
                env=env,
            )
            # The consumer owns the terminal (its dashboard); the producer's output is shown afterwards.
            produced = subprocess.run(_script("producer.py", *common, "--count", str(messages)), env=env,
                                      check=True, timeout=120, capture_output=True, text=True)
            try:
                code = consumer.wait(timeout=RUN_TIMEOUT)
            except subprocess.TimeoutExpired:
                consumer.kill()
                raise Mtc75Error(f"consumer did not finish within {RUN_TIMEOUT:.0f}s") from None
            if code != 0:
                raise Mtc75Error(f"consumer exited with {code}")
            summary = json.loads(summary_path.read_text())
        _say("producer " + (produced.stdout.strip().splitlines() or ["(no output)"])[-1], color)
        _say("summary " + json.dumps(summary), color)
        if summary["processed"] < messages or summary["pauses"] < 1:
            raise Mtc75Error(f"expected {messages} messages and at least one pause, got {summary}")
        _say(f"all {messages} messages handled; threads saturated {summary['pauses']} times and the consumer "
             f"paused {summary['paused_seconds']:.1f}s in all without leaving its group", color)
        if report is not None:
            _say(f"run report: {report / 'report.png'} (plot) and {report / 'timeseries.csv'}", color)
        return 0
    except subprocess.CalledProcessError as err:
        why = (err.stderr or "").strip().splitlines()
        raise Mtc75Error(f"{Path(err.cmd[1]).name} exited with {err.returncode}"
                         + (f": {why[-1]}" if why else "")) from None
    finally:
        # cleanup only: the demo's verdict is already made
        failed = remove_topics(bootstrap, [topic, f"{topic}.dlq"])
        _say(f"could not remove {'; '.join(failed)}" if failed else f"removed topics {topic} and {topic}.dlq", color)
        if broker is not None:
            _say("stopping the local Kafka it started", color)
            broker.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=600)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--processing-sleep", type=float, default=0.1)
    parser.add_argument("--pause-interval", type=float, default=1.0)
    parser.add_argument("--port", type=int, default=int(os.environ.get("KAFKA_PORT", DEFAULT_PORT)))
    parser.add_argument("--report", type=Path, metavar="DIR", help="the consumer writes its run report here")
    args = parser.parse_args(argv)
    try:
        return run_demo(args.messages, args.threads, args.processing_sleep, args.pause_interval, args.port,
                        args.report)
    except Mtc75Error as err:
        print(error_line("demo", err), file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
