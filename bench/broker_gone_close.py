"""How long librdkafka's close() takes once every broker is gone, and what it waits for (RELIABILITY.md).

    python -m bench.broker_gone_close PORT [--close-bound S] [-X key=value ...]

Starts its own broker on 127.0.0.1:PORT (folder .kafka/close-probe), runs the engine on 2 partitions of
400 messages with a 50 ms handler and 2 threads, stops the broker after 30 handled, and lets the
engine give up (BROKER_DOWN_TIMEOUT 5 s). The engine's close bound (CLOSE_TIMEOUT_DOWN, 2 s) is
raised to ``--close-bound`` so the real duration shows; prints ``CLOSE took ...``. ``-X debug=cgrp,protocol``
with ``-v`` shows librdkafka's reasons (look for CGRPTERM and REQTMOUT). Not part of make bench.
Runs on the main thread; the broker is stopped by a helper thread.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path

from confluent_kafka import Producer

from mtc75.api import Consumer
from mtc75.errors import Mtc75Error
from mtc75.kafka import client as kafka_client
from mtc75.kafka.client import KafkaClient
from mtc75.kafka.topics import create_topic
from mtc75.settings import Settings, parse_properties
from mtc75.tools.broker import LocalKafka

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("port", type=int)
    parser.add_argument("--close-bound", type=float, default=120.0)
    parser.add_argument("-v", action="store_true", help="librdkafka debug lines too")
    parser.add_argument("-X", dest="properties", action="append", default=[])
    args = parser.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.v else logging.INFO,
                        format="%(asctime)s.%(msecs)03d %(threadName)s %(message)s", datefmt="%H:%M:%S")
    kafka_client.CLOSE_TIMEOUT_DOWN = args.close_bound
    broker = LocalKafka(port=args.port, home=ROOT / ".kafka" / "close-probe")
    broker.start()
    topic, group = f"gone-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    create_topic({"bootstrap.servers": broker.bootstrap}, topic, 2, 1)
    producer = Producer({"bootstrap.servers": broker.bootstrap})
    for i in range(400):
        producer.produce(topic, json.dumps({"id": i}).encode(), partition=i % 2)
    producer.flush(30)
    handled: list[int] = []

    def handle(msg: object) -> None:
        time.sleep(0.05)
        handled.append(1)

    def stop_broker() -> None:
        while len(handled) < 30:
            time.sleep(0.05)
        logging.warning("stopping the broker")
        broker.stop()

    settings = Settings().replace(BOOTSTRAP_SERVERS=broker.bootstrap, TOPIC=topic, GROUP_ID=group, MAX_THREAD_COUNT=2,
                                  BROKER_DOWN_TIMEOUT=5.0)
    consumer = Consumer.from_settings(handle, settings, librdkafka=parse_properties(args.properties))
    close = KafkaClient.close

    def timed_close(self: KafkaClient) -> None:
        started = time.monotonic()
        close(self)
        print(f"CLOSE took {time.monotonic() - started:.2f}s, left behind: {self.close_timed_out}", flush=True)

    KafkaClient.close = timed_close  # type: ignore[method-assign]
    threading.Thread(target=stop_broker, name="stop-broker", daemon=True).start()
    try:
        consumer.run()
    except Mtc75Error as err:
        print(f"run ended: {err}", flush=True)
    os._exit(0)  # a close left behind would keep the interpreter waiting


if __name__ == "__main__":
    raise SystemExit(main())
