"""MTC75 settings: edit and re-run (or override: env MTC75_<NAME>, flag --name-with-dashes).

Every name here is checked at start-up: a typo or a bad value stops the script with one line.
"""

# Where Kafka is. KAFKA_BOOTSTRAP_SERVERS in the environment also overrides this.
BOOTSTRAP_SERVERS = "127.0.0.1:9092"
TOPIC = "mtc75-demo"
NUM_PARTITIONS = 6
# Replicas per partition for create_topic.py and <TOPIC>.dlq: 0 = one per broker, at most 3 (1 on a
# single node, 3 on `make broker BROKERS=3`); -1 = the broker's default.replication.factor.
REPLICATION_FACTOR = 0
GROUP_ID = "mtc75-consumer"

# The consumer: at most MAX_THREAD_COUNT messages are handled at once (threads = semaphore permits).
# "auto": the consumer finds the count that serves best while it runs, between MIN_THREAD_COUNT and
# MAX_THREAD_LIMIT (docs/watching.md: MAX_THREAD_COUNT = "auto"); saving this file switches modes live.
MAX_THREAD_COUNT = 75
MIN_THREAD_COUNT = 1
MAX_THREAD_LIMIT = 256
# When every thread is busy and the backlog is full, the assigned partitions pause. The backlog holds
# about this many seconds of work, so a pause lasts about one interval: it ends when the threads have
# caught up (sooner if they are faster than measured), and each interval still saturated adds another.
PAUSE_INTERVAL = 0.5
# Simulated work per message in the default handler (the seed's time.sleep()).
PROCESSING_SLEEP = 0.5
# Where a group with no committed offset starts: "earliest" sees messages produced before it started.
AUTO_OFFSET_RESET = "earliest"
# Most fetched messages held waiting for a free thread (the gate sizes the live backlog below this).
MAX_BACKLOG = 5000
# Seconds between commits of the completed watermark (at-least-once: only finished work is committed).
COMMIT_INTERVAL = 0.5
# Seconds a rebalance, and a shutdown, wait for running handlers before giving their partitions up.
REVOKE_TIMEOUT = 10.0
SHUTDOWN_TIMEOUT = 30.0

# A handler that raises is retried up to MAX_ATTEMPTS tries in all, waiting RETRY_BACKOFF seconds,
# doubling per attempt up to RETRY_BACKOFF_MAX (jittered). The waiting message holds no thread.
MAX_ATTEMPTS = 3
RETRY_BACKOFF = 0.5
RETRY_BACKOFF_MAX = 10.0
# After the last attempt: "dlq" publishes it to <TOPIC>.dlq (created if missing), "skip" moves on,
# "stop" commits what is safe and exits with code 5.
ON_FAILURE = "dlq"
# What a handler's output records (return mtc75.Output(...)) and the commits promise: "at_least_once"
# (a message is committed once its outputs are confirmed; a crash may write some twice) or "exactly_once"
# (outputs and offsets commit together in one Kafka transaction every COMMIT_INTERVAL; readers of the
# output topic use isolation.level=read_committed). docs/outputs.md.
PROCESSING_GUARANTEE = "at_least_once"
# Which messages may run at the same time: "unordered" (any, as soon as a thread is free), "partition"
# (one per partition, in offset order) or "key" (one per key within a partition, in offset order; different
# keys in parallel; a message without a key is its own key). Waiting partitions and keys take turns.
ORDERING = "unordered"
# Rate limits that hold without leaving the group: at most MAX_RATE messages per second start in this
# consumer, and at most KEY_RATE per key (0 = no limit; a retry is another start). A message waiting for
# its turn holds no thread; a hot key waits while other keys go on. After an idle spell up to RATE_BURST
# seconds' worth (at least one message) may start at once. Several consumers in a group: give each its
# share (docs/rate-limits.md). Saving this file changes them live.
MAX_RATE = 0.0
KEY_RATE = 0.0
RATE_BURST = 0.1
# Batch handlers: above 1 the handler is called with a list of up to BATCH_SIZE messages of one partition, in
# offset order (one call per batch: a bulk insert, a bulk API); a batch waits at most BATCH_WAIT seconds to fill.
BATCH_SIZE = 1
BATCH_WAIT = 0.05
# Where a plain handler runs: "threads", or "processes" for handlers that compute in Python (the GIL lets
# one thread compute at a time): PROCESS_COUNT worker processes (0 = one per core) run it, and
# MAX_THREAD_COUNT still bounds the messages in flight (docs/processes.md).
RUNNER = "threads"
PROCESS_COUNT = 0
# librdkafka's fetch.max.bytes / max.partition.fetch.bytes: "auto" probes the topic at start-up (one
# fetch, ~0.2-0.5 s) and takes "large" (50 MB / 1 MB) for uncompressed data, "small" (2 MB / 512 KB) for
# compressed; or set "small" / "large" yourself. Either property set in CONSUMER_CONFIG or -X wins.
FETCH_SIZES = "auto"
# What the handler's message.key() / message.value() return: "bytes" (as fetched), "str" (UTF-8) or "json".
# One that does not decode is dead-lettered at once with its original bytes (docs/deserializers.md).
KEY_FORMAT = "bytes"
VALUE_FORMAT = "bytes"
# The default handler rejects (and so retries, then dead-letters) empty, non-JSON or larger payloads.
MAX_PAYLOAD_BYTES = 100_000
# Seconds the consumer keeps going with no broker reachable before it exits with code 3.
BROKER_DOWN_TIMEOUT = 60.0

# The producer: how many Faker records to send (0 = until Ctrl-C) and the pause between them.
PRODUCER_MESSAGE_COUNT = 10_000
PRODUCER_SLEEP = 0.0
# Or a steady rate in messages per second instead of a fixed sleep (0 = off; when set it wins over the sleep).
PRODUCER_RATE = 0.0

# Any librdkafka property (https://github.com/confluentinc/librdkafka/blob/master/CONFIGURATION.md);
# the -X key=value flag of each script is applied after these.
CONSUMER_CONFIG: dict[str, str] = {}
PRODUCER_CONFIG: dict[str, str] = {}
