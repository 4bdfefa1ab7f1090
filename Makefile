# MTC75: everything a fresh machine needs comes from here (venv, pinned packages, Kafka via Maven).
# make demo   - the main job: local Kafka, topic, consumer + producer burst, summary; ends by itself
# make test   - the whole test suite against a local Kafka it starts and stops itself
# make unit   - every test that needs no broker (engine against an in-memory Kafka fake, policies, CLI errors)
# make bench  - throughput per topic shape, peers, memory and CPU figures (bench/results.json, BENCHMARKS.md),
#               then MAX_THREAD_COUNT="auto" against fixed counts (bench/autotune.json, bench/autotune.png)
#               and ordering modes against unordered (bench/ordering.json)
# make faults - only the fault-injection suite (RELIABILITY.md), printing its measured figures
# make registry - a local schema registry (Apicurio, Confluent-compatible API at :REGISTRY_PORT/apis/ccompat/v7)
#   in the foreground until Ctrl-C; built once with Maven (registry/pom.xml); the deserializer tests start their own
# make broker / make broker-stop / make broker-status - a local Kafka for the three-terminal flow
#   (KAFKA_PORT, default 9092); BROKERS=3 runs a 3-node cluster: node 1 on KAFKA_PORT, the others on
#   the next free port pairs. `make broker BROKERS=3` again starts only the nodes that are not running.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
KAFKA_PORT ?= 9092
REGISTRY_PORT ?= 8081
BROKERS ?= 1
export KAFKA_PORT

.PHONY: all setup kafka registry-app registry demo test unit bench faults lint broker broker-stop broker-status clean

all: setup

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

setup: $(VENV)/.installed

kafka: setup
	$(PY) -m mtc75.tools.broker fetch

# Built before the suite runs (a few minutes the first time), not inside a test's timeout.
registry-app: setup
	$(PY) -m mtc75.tools.registry fetch

registry: registry-app
	$(PY) -m mtc75.tools.registry run --port $(REGISTRY_PORT)

demo: kafka
	$(PY) -m mtc75.tools.demo --port $(KAFKA_PORT) --report demo-report

# pytest's temporary folders under .kafka/pytest-tmp, not /tmp/pytest-of-$USER: other suites of the
# same user on this machine prune those (seen deleting a running test's files).
PYTEST := PYTEST_DEBUG_TEMPROOT=$(CURDIR)/.kafka/pytest-tmp $(PY) -m pytest

test: kafka registry-app lint
	mkdir -p .kafka/pytest-tmp
	$(PYTEST)

# No Kafka started or fetched: tests that need one carry the `kafka` marker (tests/conftest.py);
# the packaging test (marker `pypi`, about a minute of pip) runs only in make test.
unit: setup
	$(PY) -m pytest -m "not kafka and not pypi"

# Bench peers: sentry-arroyo (PyPI) and Confluent Parallel Consumer (bench/parallel-consumer, Maven Central;
# skipped with a note when mvn is missing).
$(VENV)/.bench-installed: requirements-bench.txt $(VENV)/.installed
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-bench.txt
	touch $@

bench/parallel-consumer/target/classpath.txt: bench/parallel-consumer/pom.xml bench/parallel-consumer/src/main/java/mtc75/bench/PcPeer.java
	if command -v mvn >/dev/null; then mvn -q -B -f bench/parallel-consumer/pom.xml compile \
		dependency:build-classpath -Dmdep.outputFile=target/classpath.txt; fi

bench: kafka $(VENV)/.bench-installed bench/parallel-consumer/target/classpath.txt
	$(PY) -m bench.run
	$(PY) -m bench.autotune
	$(PY) -m bench.ordering --with-fifo

# The fault-injection suite alone; its measured figures go to .kafka/fault-figures.jsonl (see RELIABILITY.md).
faults: kafka
	rm -f .kafka/fault-figures.jsonl
	mkdir -p .kafka/pytest-tmp
	MTC75_FAULT_FIGURES=$(CURDIR)/.kafka/fault-figures.jsonl $(PYTEST) -m faults -v
	@echo "measured figures (.kafka/fault-figures.jsonl):" && cat .kafka/fault-figures.jsonl

lint: setup
	$(PY) -m ruff check .

broker: kafka
	$(PY) -m mtc75.tools.broker start --port $(KAFKA_PORT) --brokers $(BROKERS)

broker-stop: setup
	$(PY) -m mtc75.tools.broker stop --port $(KAFKA_PORT) --brokers $(BROKERS)

broker-status: setup
	$(PY) -m mtc75.tools.broker status --port $(KAFKA_PORT) --brokers $(BROKERS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
