"""Which fetch sizes (``fetch.max.bytes`` / ``max.partition.fetch.bytes``) a consumer of this topic gets.

Pure: no Kafka, no clock. Any thread may call it (nothing here is shared or mutable). The Kafka side --
a short probe that reads one fetch and reports what it saw -- is :mod:`mtc75.kafka.fetchprobe`.

No static pair serves every topic shape (BENCHMARKS.md, "Fetch settings"). librdkafka decompresses
each fetched batch whole and keeps the buffer until its last message is consumed, so the memory a
fetch costs is its compressed bytes times the compression ratio:

- lz4 ~100 B messages: 2 MB / 512 KB peaked at 117 MB RSS for 1,000,000 messages; librdkafka's
  50 MB / 1 MB took the same run to 231 MB (the bound is 150 MB).
- uncompressed 10 KB records: 2 MB / 512 KB is only 200 records per round trip, 0.59 of a raw
  ``consume()`` loop; 50 MB / 1 MB gave 1.06 of the raw loop at 99 MB. Uncompressed, memory is about
  the bytes on the wire, and those are bounded by ``queued.max.messages.kbytes`` (32 MB here) whatever
  the fetch size: uncompressed 150 B on 50 MB / 1 MB peaked at 75 MB.

So the probe's ratio of payload (key + value) to bytes received decides: about 1 or less means
uncompressed (or incompressible) data, where large fetches cost little extra; more means each fetched
byte expands in memory, and the small sizes keep it bounded.
"""

from __future__ import annotations

from dataclasses import dataclass

MB = 1024 * 1024


@dataclass(frozen=True)
class FetchSizes:
    """One (``fetch.max.bytes``, ``max.partition.fetch.bytes``) pair, with its name for logs and summaries."""

    name: str
    fetch_max_bytes: int
    partition_bytes: int

    def conf(self) -> dict[str, int]:
        """The two librdkafka properties."""
        return {"fetch.max.bytes": self.fetch_max_bytes, "max.partition.fetch.bytes": self.partition_bytes}

    def __str__(self) -> str:
        return f"{self.name} ({_size(self.fetch_max_bytes)} / {_size(self.partition_bytes)})"


# MTC75's sizes for compressed data: 117 MB peak on 1,000,000 x lz4 100 B (231 MB with LARGE).
SMALL = FetchSizes("small", 2 * MB, 512 * 1024)
# librdkafka's own defaults: uncompressed 10 KB at 1.06 of a raw loop (0.59 with SMALL), 99 MB peak.
LARGE = FetchSizes("large", 50 * MB, 1 * MB)
NAMED = {SMALL.name: SMALL, LARGE.name: LARGE}
FETCH_SIZE_MODES = ("auto", SMALL.name, LARGE.name)  # the FETCH_SIZES setting

# Payload bytes per byte received at or below which LARGE is chosen: uncompressed data reads ~0.9-1.0,
# lz4 text ~7. Peak memory with LARGE grows with the ratio (BENCHMARKS.md, "Fetch settings"); the probe
# under-states a ratio by at most 1/8 (mtc75.kafka.fetchprobe), so 1.5 keeps the peak well inside 150 MB.
UNCOMPRESSED_RATIO = 1.5
# Below this many bytes received the ratio says little: a few KB of metadata and coordinator replies
# count as received too and would make a small compressed sample look uncompressed.
MIN_SAMPLE_BYTES = 64 * 1024


@dataclass(frozen=True)
class Sample:
    """What one probe fetch saw: bytes received, payload bytes (key + value) and messages in them."""

    wire_bytes: int
    payload_bytes: int
    messages: int

    @property
    def ratio(self) -> float:
        """Payload bytes per byte received (0 when nothing was received)."""
        return self.payload_bytes / self.wire_bytes if self.wire_bytes > 0 else 0.0


@dataclass(frozen=True)
class Choice:
    """The sizes a run uses and why, in words for the INFO line and the run summary."""

    sizes: FetchSizes
    reason: str


def choose(sample: Sample | None) -> Choice:
    """The sizes for a topic from its probe sample; nothing (or too little) observed -> SMALL."""
    if sample is None or sample.messages <= 0:
        return Choice(SMALL, "nothing to probe (empty topic, or the probe failed)")
    if sample.wire_bytes < MIN_SAMPLE_BYTES:
        return Choice(SMALL, f"probe read only {_size(sample.wire_bytes)} ({sample.messages} messages): too "
                             f"little to judge compression")
    mean = sample.payload_bytes / sample.messages
    observed = f"payload/wire {sample.ratio:.2f}, mean message {mean:,.0f} B"
    if sample.ratio <= UNCOMPRESSED_RATIO:
        return Choice(LARGE, f"{observed}: uncompressed (ratio <= {UNCOMPRESSED_RATIO})")
    return Choice(SMALL, f"{observed}: compressed (ratio > {UNCOMPRESSED_RATIO})")


def fixed(mode: str) -> Choice:
    """FETCH_SIZES set to ``small`` or ``large``: no probe."""
    return Choice(NAMED[mode], f"FETCH_SIZES={mode}")


def _size(n: int) -> str:
    if n >= MB and n % MB == 0:
        return f"{n // MB} MB"
    if n >= 1024:
        return f"{n / 1024:,.0f} KB"
    return f"{n} B"
