# MTC75: everything a fresh machine needs comes from here (venv, pinned packages, Kafka via Maven).
# make demo   - the main job: local Kafka, topic, consumer + producer burst, summary; ends by itself
# make test   - the whole test suite against a local Kafka it starts and stops itself
# make unit   - the tests that need no broker (engine against an in-memory Kafka fake, policies, CLI errors),
#               in parallel, without the few that wait seconds of real time (marker `slow`); < 30 s
# make bench  - throughput per topic shape, peers, memory and CPU figures (bench/results.json, BENCHMARKS.md),
#               then MAX_THREAD_COUNT="auto" against fixed counts (bench/autotune.json, bench/autotune.png)
#               and ordering modes against unordered (bench/ordering.json)
# make faults - only the fault-injection suite (RELIABILITY.md), printing its measured figures
# make broker / make broker-stop / make broker-status - a local Kafka for the three-terminal flow
#   (KAFKA_PORT, default 9092); BROKERS=3 runs a 3-node cluster: node 1 on KAFKA_PORT, the others on
#   the next free port pairs. `make broker BROKERS=3` again starts only the nodes that are not running.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
KAFKA_PORT ?= 9092
BROKERS ?= 1
export KAFKA_PORT

.PHONY: all setup kafka demo test unit bench faults lint broker broker-stop broker-status clean

all: setup

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

setup: $(VENV)/.installed

kafka: setup
	$(PY) -m mtc75.tools.broker fetch

demo: kafka
	$(PY) -m mtc75.tools.demo --port $(KAFKA_PORT) --report demo-report

# pytest's temporary folders under .kafka/pytest-tmp, not /tmp/pytest-of-$USER: other suites of the
# same user on this machine prune those (seen deleting a running test's files).
# Bytecode caches written even where PYTHONDONTWRITEBYTECODE is set: without them every pytest process (each
# xdist worker) rewrites and compiles every test module again, and every script a test starts compiles
# mtc75 again: most of a process's start-up CPU (__pycache__ is gitignored).
PYTEST_ENV := PYTHONDONTWRITEBYTECODE=
PYTEST := $(PYTEST_ENV) PYTEST_DEBUG_TEMPROOT=$(CURDIR)/.kafka/pytest-tmp $(PY) -m pytest
# The broker-free suite mostly waits (on threads, timeouts and the scripts it starts), so it runs on more
# workers than cores: on the 2-core machine 4 did better than 2 or 6.
UNIT_WORKERS ?= 4

# Two sessions: the broker-free tests in parallel (pytest-xdist, see unit), then the broker tests in one
# session (one broker; a worker each would start a broker each). Both run even when the first fails;
# make test fails if either did.
test: kafka lint
	mkdir -p .kafka/pytest-tmp
	$(PYTEST) -m "not kafka" -n $(UNIT_WORKERS); free=$$?; $(PYTEST) -m kafka; broker=$$?; \
		test $$free -eq 0 -a $$broker -eq 0

# No Kafka started or fetched: tests that need one carry the `kafka` marker (tests/conftest.py). Not here
# either, only in make test: the packaging test (marker `pypi`, about a minute of pip) and the tests marked
# `slow` (they wait out seconds of real time, e.g. the 10 s a script gives an unreachable broker).
# In parallel (pytest-xdist, UNIT_WORKERS processes).
unit: setup
	$(PYTEST_ENV) $(PY) -m pytest -m "not kafka and not pypi and not slow" -n $(UNIT_WORKERS)

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
