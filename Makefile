# MTC75: everything a fresh machine needs comes from here (venv, pinned packages, Kafka via Maven).
# make demo   - the main job: local Kafka, topic, consumer + producer burst, summary; ends by itself
# make test   - the whole test suite against a local Kafka it starts and stops itself
# make unit   - the tests that need no broker (engine against an in-memory Kafka fake, policies, CLI errors),
#               in parallel, without the few that wait seconds of real time (marker `slow`)
# make bench  - the engine and batch handlers against the fastest plain consume() loop, peers, memory and CPU
#               figures, "auto" on short bursts, then MAX_THREAD_COUNT="auto" against fixed counts, ordering
#               modes against unordered, the process runner against threads on a CPU-bound handler,
#               exactly-once against at-least-once, and one against two share-group members on one
#               partition: one result file per section in
#               bench/results/ (BENCHMARKS.md's tables: python -m bench.docs)
# make docs   - the docs site (MkDocs: docs/, README.md, ARCHITECTURE.md, RELIABILITY.md, BENCHMARKS.md) into site/,
#               strict: a broken link or reference fails it; `.venv/bin/mkdocs serve` to read it while editing
# make faults - only the fault-injection suite; its figures -> tests/figures/faults.json (RELIABILITY.md)
# make figures - make faults, then the end-to-end tests RELIABILITY.md quotes -> tests/figures/e2e.json
# make registry - a local schema registry (Apicurio, Confluent-compatible API at :REGISTRY_PORT/apis/ccompat/v7)
#   in the foreground until Ctrl-C; built once with Maven (registry/pom.xml); the deserializer tests start their own
# make broker / make broker-stop / make broker-status - a local Kafka for the three-terminal flow
#   (KAFKA_PORT, default 9092, below the kernel's ephemeral range 32768+: refused there with exit 4);
#   BROKERS=3 runs a 3-node cluster: node 1 on KAFKA_PORT, the others on the next free port pairs.
#   `make broker BROKERS=3` again starts only the nodes that are not running. Off 127.0.0.1:9092 it
#   prints the `export KAFKA_BOOTSTRAP_SERVERS=...` line the scripts need.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
KAFKA_PORT ?= 9092
REGISTRY_PORT ?= 8081
BROKERS ?= 1
export KAFKA_PORT

.PHONY: all setup kafka registry-app registry demo test unit bench faults figures lint docs broker broker-stop broker-status clean

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
# Bytecode caches written even where PYTHONDONTWRITEBYTECODE is set: without them every pytest process (each
# xdist worker) rewrites and compiles every test module again, and every script a test starts compiles
# mtc75 again: most of a process's start-up CPU (__pycache__ is gitignored).
PYTEST_ENV := PYTHONDONTWRITEBYTECODE=
PYTEST := $(PYTEST_ENV) PYTEST_DEBUG_TEMPROOT=$(CURDIR)/.kafka/pytest-tmp $(PY) -m pytest
# The broker-free suite mostly waits (on threads, timeouts and the scripts it starts), so it runs on more
# workers than cores: on the 2-core machine make unit took 44 s on 2, 31 s on 4, 24-27 s on 6, 29 s on 8.
UNIT_WORKERS ?= 6

# The broker tests mostly wait on the broker, the scripts they start and timers, not on the CPU: they run in
# parallel too, the workers sharing one broker (started once, tests/conftest.py); the tests that stop a broker
# or use the 3-node cluster keep their own and run together on one worker (--dist loadgroup,
# tests/xdist_groups.py).
KAFKA_WORKERS ?= 4

# Three sessions: the broker-free tests, the broker tests in parallel, then the few that measure throughput or
# timing (marker `alone`) one at a time. All run even when one fails; make test fails if any did.
test: kafka registry-app lint
	mkdir -p .kafka/pytest-tmp
	$(PYTEST) -m "not kafka" -n $(UNIT_WORKERS); free=$$?; \
		$(PYTEST) -m "kafka and not alone" -n $(KAFKA_WORKERS) --dist loadgroup --durations=15; broker=$$?; \
		$(PYTEST) -m "kafka and alone"; alone=$$?; \
		test $$free -eq 0 -a $$broker -eq 0 -a $$alone -eq 0

# No Kafka started or fetched: tests that need one carry the `kafka` marker (tests/conftest.py). Not here
# either, only in make test: the packaging test (marker `pypi`, about a minute of pip) and the tests marked
# `slow` (they wait out seconds of real time, e.g. the 10 s a script gives an unreachable broker).
# In parallel (pytest-xdist, UNIT_WORKERS processes).
unit: setup
	$(PYTEST_ENV) $(PY) -m pytest -m "not kafka and not pypi and not slow" -n $(UNIT_WORKERS)

# NO_MKDOCS_2_WARNING: mkdocs-material's banner about its successor, not about this site.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

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
	$(PY) -m bench.processes
	$(PY) -m bench.eos
	$(PY) -m bench.share
	$(PY) -m bench.costs
	$(PY) -m bench.docs

# The fault-injection suite alone; its FIGURES records and outcomes go to tests/figures/faults.json
# (bench/record.py), which RELIABILITY.md's figure cells are generated from (python -m bench.docs).
faults: kafka
	mkdir -p .kafka/pytest-tmp
	$(PYTEST_ENV) PYTEST_DEBUG_TEMPROOT=$(CURDIR)/.kafka/pytest-tmp $(PY) -m bench.record faults -- $(PY) -m pytest -m faults -v

# The end-to-end tests whose FIGURES records RELIABILITY.md quotes besides the fault suite's.
E2E_FIGURES := tests/test_ordering_e2e.py tests/test_async_e2e.py tests/test_reload_e2e.py tests/test_ratelimit_e2e.py \
	tests/test_handler_tracebacks.py tests/test_api_misuse.py tests/test_topics_e2e.py tests/test_batch_e2e.py \
	tests/test_process_e2e.py \
	tests/test_consumer_e2e.py::test_threads_stay_busy_through_pauses_over_a_saturated_run \
	tests/test_consumer_e2e.py::test_a_fast_handler_runs_in_chunks_and_a_failure_or_a_slow_spell_inside_a_chunk_loses_nothing

figures: faults
	PYTEST_DEBUG_TEMPROOT=$(CURDIR)/.kafka/pytest-tmp $(PY) -m bench.record e2e -- $(PY) -m pytest -v $(E2E_FIGURES)

lint: setup
	$(PY) -m ruff check .

broker: kafka
	$(PY) -m mtc75.tools.broker start --port $(KAFKA_PORT) --brokers $(BROKERS)

broker-stop: setup
	$(PY) -m mtc75.tools.broker stop --port $(KAFKA_PORT) --brokers $(BROKERS)

broker-status: setup
	$(PY) -m mtc75.tools.broker status --port $(KAFKA_PORT) --brokers $(BROKERS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache site
