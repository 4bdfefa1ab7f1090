"""The offset map: finished offsets above the committed one, carried in the commit's metadata string.

Pure: no Kafka, no clock, no logging. Any thread may call it; nothing here has shared state.

Why: the committed offset is the first unfinished message of a partition, so every message that
finished above a stuck one runs again after a crash or a rebalance (issue 9: 4,110 repeats behind
one 90 s message). Each commit now also says which offsets above it are already done, and the next
owner skips them. A consumer that ignores the metadata (kcat, an older MTC75) still resumes from a
correct committed offset: the map only ever saves work, it never hides unfinished work.

Format (ASCII; confluent-kafka's ``TopicPartition.metadata`` is a ``str``)::

    m1r:<committed>:<base64 payload>   run lengths
    m1b:<committed>:<base64 payload>   bitmap

``m1`` is the format version, ``r``/``b`` the encoding. ``<committed>`` is the decimal offset the map
is relative to; :func:`decode` refuses a map whose committed offset is not the one stored beside it
(another tool moved the offset and kept our metadata), so a stale map can never skip a message.
Offsets are counted from ``committed + 1`` (the committed offset itself is unfinished by definition).

* run lengths: unsigned LEB128 varints ``u0 f0 u1 f1 ...``: ``u0`` unfinished offsets (may be 0),
  then ``f0`` finished ones, and so on, alternating; it ends with a finished run.
* bitmap: bit ``i`` (least significant bit first, byte ``i // 8``) is set when ``committed + 1 + i``
  finished; trailing zero bytes are dropped.

:func:`encode` works out the size of both encodings first (arithmetic only, so a few finished offsets
far apart never allocate a huge bitmap), builds the smaller, and returns None when even that exceeds
``limit`` (the broker's ``offset.metadata.max.bytes``, 4096 by default): the caller then commits the
offset alone, as before, and logs that at debug level. :func:`decode` raises :class:`OffsetMapError`
for anything that is not a map of ours for this offset: the caller warns once and ignores it.
The bitmap needs ``span / 6`` characters whatever the pattern, so a window of at most
:func:`map_capacity` offsets always fits (see :class:`WindowPolicy`).

Measured with ``committed = 10**12`` (18 characters of header; ``tests/test_offsetmap.py`` asserts these):

=====================================================  ==============  ==============
pattern                                                1k              10k
=====================================================  ==============  ==============
slow head: 1 stuck, the rest of a 1k / 10k span done    22 (runs)       22 (runs)
75 unfinished at random in a 1k / 10k span             186 (bitmap)    262 (runs)
1k / 10k gaps at random in a 2k / 20k span             354 (bitmap)    3,354 (bitmap)
1k / 10k gaps alternating (the worst case)             354 (bitmap)    3,354 (bitmap)
=====================================================  ==============  ==============

So 10k gaps fit the default 4,096 even in the worst case (13k do not); the bitmap reaches the limit
at a span of :func:`map_capacity` = 24,432 offsets (with a 19-digit committed offset). On this machine
(2 shared cores) encoding the 10k-gap worst case takes about 10 ms and decoding it 13 ms; the slow
head and the 75 random gaps in 10k encode in under 2 ms. Encode on the poll thread only when a
partition's finished set changed since its last commit.
"""

from __future__ import annotations

import base64
import binascii
import bisect
from collections.abc import Iterable, Iterator

VERSION = "m1"
RUNS = VERSION + "r:"
BITMAP = VERSION + "b:"
DEFAULT_LIMIT = 4096  # the broker's offset.metadata.max.bytes default
MAX_OFFSET = (1 << 63) - 1  # Kafka offsets are int64
_MAX_VARINT_BYTES = 9  # 63 bits: any longer run length is beyond an int64 offset
_MAX_DIGITS = len(str(MAX_OFFSET))  # 19


class OffsetMapError(ValueError):
    """Metadata that is not a valid MTC75 offset map (another tool's, garbled, or stale)."""


class StaleOffsetMap(OffsetMapError):
    """A valid map written for another committed offset than the one stored beside it."""


class FinishedOffsets:
    """Finished offsets above a committed one, as sorted half-open ranges ``[lo, hi)``.

    Compact whatever the claimed lengths: a run of 2**40 finished offsets is one range.
    """

    __slots__ = ("_his", "_los", "committed", "ranges")

    def __init__(self, committed: int, ranges: Iterable[tuple[int, int]]) -> None:
        self.committed = committed
        self.ranges: tuple[tuple[int, int], ...] = tuple(ranges)
        self._los = [lo for lo, _ in self.ranges]
        self._his = [hi for _, hi in self.ranges]

    def __contains__(self, offset: object) -> bool:
        if not isinstance(offset, int):
            return False
        i = bisect.bisect_right(self._los, offset) - 1
        return i >= 0 and offset < self._his[i]

    def __iter__(self) -> Iterator[int]:
        """Every finished offset, ascending (as many as :attr:`count`: mind a huge run)."""
        for lo, hi in self.ranges:
            yield from range(lo, hi)

    def __bool__(self) -> bool:
        return bool(self.ranges)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FinishedOffsets) and (self.committed, self.ranges) == (other.committed, other.ranges)

    def __hash__(self) -> int:
        return hash((self.committed, self.ranges))

    def __repr__(self) -> str:
        return f"FinishedOffsets(committed={self.committed}, ranges={list(self.ranges)})"

    @property
    def count(self) -> int:
        return sum(hi - lo for lo, hi in self.ranges)

    @property
    def end(self) -> int:
        """One past the highest finished offset (``committed + 1`` when empty): no offset at or past it is skipped."""
        return self._his[-1] if self._his else self.committed + 1


# -- encoding -------------------------------------------------------------------------------------


def encode(committed: int, finished: Iterable[int], limit: int = DEFAULT_LIMIT) -> str | None:
    """The metadata string for ``committed`` and the ``finished`` offsets above it.

    Returns ``""`` when nothing above it finished (a commit then clears an older map), and None when
    the map does not fit in ``limit`` characters: commit the offset alone. Raises ValueError when a
    finished offset is not above ``committed`` (the committed offset is the first unfinished one).
    """
    _check_offset(committed)
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    offsets = sorted(set(finished))
    if not offsets:
        return ""
    if offsets[0] <= committed:
        raise ValueError(f"finished offset {offsets[0]} is not above the committed offset {committed}")
    if offsets[-1] > MAX_OFFSET:
        raise ValueError(f"finished offset {offsets[-1]} is beyond int64")
    runs = _runs(committed + 1, offsets)
    header = len(RUNS) + len(str(committed)) + 1
    span = offsets[-1] - committed  # bits in the bitmap
    bitmap_len = header + _b64_len((span + 7) // 8)
    if bitmap_len > limit and header + _b64_len(_runs_bytes(runs)) > limit:
        return None  # checked before building anything: a sparse huge span must not allocate a bitmap
    run_text = _runs_payload(runs)
    run_len = header + len(run_text)
    if bitmap_len < run_len:
        text = f"{BITMAP}{committed}:{_bitmap_payload(committed + 1, offsets, span)}"
    else:
        text = f"{RUNS}{committed}:{run_text}"
    return text if len(text) <= limit else None


def map_capacity(limit: int = DEFAULT_LIMIT, committed: int = MAX_OFFSET) -> int:
    """The largest span above ``committed`` whose map fits ``limit`` whatever is finished in it.

    The bitmap's size depends only on the span, so this is the span of the largest bitmap that fits;
    with the default committed offset (19 digits, the longest header) it holds for every offset.
    """
    room = limit - (len(BITMAP) + len(str(committed)) + 1)
    if room < 4:
        return 0
    return (room // 4) * 3 * 8


def _runs(start: int, offsets: list[int]) -> list[int]:
    """Alternating run lengths: unfinished, finished, unfinished, ... ending with a finished run."""
    runs: list[int] = []
    expected = start
    run_start = offsets[0]
    prev = offsets[0] - 1
    for off in offsets:
        if off != prev + 1:
            runs.append(run_start - expected)
            runs.append(prev + 1 - run_start)
            expected = prev + 1
            run_start = off
        prev = off
    runs.append(run_start - expected)
    runs.append(prev + 1 - run_start)
    return runs


def _varint_len(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def _runs_bytes(runs: list[int]) -> int:
    return sum(_varint_len(v) for v in runs)


def _runs_payload(runs: list[int]) -> str:
    out = bytearray()
    for value in runs:
        while True:
            byte = value & 0x7F
            value >>= 7
            if value:
                out.append(byte | 0x80)
            else:
                out.append(byte)
                break
    return base64.b64encode(bytes(out)).decode("ascii")


def _bitmap_payload(start: int, offsets: list[int], span: int) -> str:
    bits = bytearray((span + 7) // 8)
    for off in offsets:
        i = off - start
        bits[i >> 3] |= 1 << (i & 7)
    return base64.b64encode(bytes(bits)).decode("ascii")


def _b64_len(nbytes: int) -> int:
    return 4 * ((nbytes + 2) // 3)


# -- decoding -------------------------------------------------------------------------------------


def decode(metadata: str | None, committed: int, end_offset: int | None = None) -> FinishedOffsets | None:
    """The finished offsets a commit's metadata records above ``committed``.

    Returns None when the metadata is empty or absent (no map: nothing to skip). Raises
    :class:`OffsetMapError` for anything else that is not a valid map: another tool's metadata,
    garbage, a truncated string, a map beyond int64 or reaching ``end_offset`` (the partition's end
    offset: no offset there exists yet, so a map claiming it is forged or stale), and
    :class:`StaleOffsetMap` when it was written for another committed offset. The caller warns and
    ignores it. Memory use is bounded by the length of ``metadata``, whatever run lengths it claims.
    """
    if not metadata:
        return None
    if not isinstance(metadata, str):
        raise OffsetMapError(f"offset map metadata must be a str, got {type(metadata).__name__}")
    if not 0 <= committed <= MAX_OFFSET:  # e.g. OFFSET_INVALID (-1001): no offset to apply a map to
        raise OffsetMapError(f"metadata without a valid committed offset ({committed})")
    if metadata.startswith(RUNS):
        kind = RUNS
    elif metadata.startswith(BITMAP):
        kind = BITMAP
    else:
        raise OffsetMapError(f"not an MTC75 offset map (tag {metadata[:4]!r})")
    base_text, sep, payload_text = metadata[len(kind):].partition(":")
    if not sep:
        raise OffsetMapError("offset map without a committed offset")
    base = _parse_base(base_text)
    if base != committed:
        raise StaleOffsetMap(f"offset map written for offset {base}, committed offset is {committed}")
    payload = _b64decode(payload_text)
    start = committed + 1
    ranges = _decode_runs(start, payload) if kind == RUNS else _decode_bitmap(start, payload)
    if ranges and ranges[-1][1] - 1 > MAX_OFFSET:
        raise OffsetMapError("offset map reaches beyond int64")
    if ranges and end_offset is not None and ranges[-1][1] > end_offset:
        raise OffsetMapError(f"offset map reaches offset {ranges[-1][1] - 1}, past the end offset {end_offset}")
    return FinishedOffsets(committed, ranges)


def _check_offset(committed: int) -> None:
    if not 0 <= committed <= MAX_OFFSET:
        raise ValueError(f"committed offset must be within 0..2**63-1, got {committed}")


def _parse_base(text: str) -> int:
    if not text or len(text) > _MAX_DIGITS or not text.isascii() or not text.isdigit():
        raise OffsetMapError(f"offset map with a bad committed offset {text[:24]!r}")
    if len(text) > 1 and text[0] == "0":
        raise OffsetMapError(f"offset map with a non-canonical committed offset {text!r}")
    value = int(text)
    if value > MAX_OFFSET:
        raise OffsetMapError("offset map committed offset beyond int64")
    return value


def _b64decode(text: str) -> bytes:
    if not text:
        raise OffsetMapError("offset map with an empty payload")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise OffsetMapError("offset map payload is not base64") from None
    if base64.b64encode(raw).decode("ascii") != text:  # non-zero padding bits: not what encode writes
        raise OffsetMapError("offset map payload is not canonical base64")
    return raw


def _decode_runs(start: int, payload: bytes) -> list[tuple[int, int]]:
    values = _read_varints(payload)
    if len(values) % 2:
        raise OffsetMapError("offset map run lengths end on an unfinished run (truncated?)")
    ranges: list[tuple[int, int]] = []
    pos = start
    for i in range(0, len(values), 2):
        gap, done = values[i], values[i + 1]
        if (i and gap == 0) or done == 0:
            raise OffsetMapError("offset map with an empty run")
        lo = pos + gap
        pos = lo + done
        ranges.append((lo, pos))  # past int64 is refused by the caller, on the last (highest) range
    return ranges


def _read_varints(payload: bytes) -> list[int]:
    values: list[int] = []
    value = shift = length = 0
    for byte in payload:
        value |= (byte & 0x7F) << shift
        shift += 7
        length += 1
        if length > _MAX_VARINT_BYTES:
            raise OffsetMapError("offset map run length beyond int64")
        if not byte & 0x80:
            if length > 1 and byte == 0:
                raise OffsetMapError("offset map with a non-canonical run length")
            values.append(value)
            value = shift = length = 0
    if length:
        raise OffsetMapError("offset map truncated inside a run length")
    return values


def _decode_bitmap(start: int, payload: bytes) -> list[tuple[int, int]]:
    if payload[-1] == 0:
        raise OffsetMapError("offset map bitmap ends with an empty byte (not what encode writes)")
    ranges: list[tuple[int, int]] = []
    run_lo = -1
    for i, byte in enumerate(payload):
        if byte in (0, 0xFF) and (run_lo < 0) == (byte == 0):
            continue  # a whole byte that continues the current state
        for bit in range(8):
            finished = byte >> bit & 1
            if finished and run_lo < 0:
                run_lo = i * 8 + bit
            elif not finished and run_lo >= 0:
                ranges.append((start + run_lo, start + i * 8 + bit))
                run_lo = -1
    if run_lo >= 0:  # the last bit was set: the run ends with the bitmap
        ranges.append((start + run_lo, start + len(payload) * 8))
    return ranges


# -- bounded window -------------------------------------------------------------------------------


def default_window(max_backlog: int, limit: int = DEFAULT_LIMIT, overshoot: int = 500) -> int:
    """The default window bound (offsets between the watermark and the next offset to fetch).

    ``2 * MAX_BACKLOG``: without a stuck message the span is the backlog plus the running handlers
    (at most ``MAX_BACKLOG`` plus the threads), so the bound never holds a healthy partition back,
    and behind a stuck one it lets about one more backlog's worth finish before that partition waits.
    Capped at :func:`map_capacity` of ``limit`` less ``overshoot`` (the messages one fetch may still
    deliver after the bound is reached: the engine's batch of 500), so the map of a held partition
    always fits the metadata limit. With the defaults (5,000 and 4,096): 10,000 offsets, whose
    worst-case map is about 1,700 characters; above ``MAX_BACKLOG`` 11,966 the cap (23,932) applies.
    """
    if max_backlog < 1:
        raise ValueError(f"max_backlog must be >= 1, got {max_backlog}")
    if overshoot < 0:
        raise ValueError(f"overshoot must be >= 0, got {overshoot}")
    return max(1, min(2 * max_backlog, map_capacity(limit) - overshoot))


class WindowPolicy:
    """Whether a partition must stop taking messages until its watermark moves: pure, stateless.

    ``span = next_offset - watermark``: ``watermark`` is the partition's first unfinished offset (the
    position a commit would store; before the first completion, the first offset taken), and
    ``next_offset`` one past the last offset taken from it. Everything in between is fetched,
    running or finished-but-uncommitted, and is what the offset map must cover. A partition is held
    (paused) once the span reaches ``bound`` and released when it is back to ``resume_at`` (a quarter
    of the bound lower by default): librdkafka drops a paused partition's prefetched messages, so a
    watermark creeping forward one offset at a time must not pause and resume it on every step.
    """

    def __init__(self, bound: int, resume_at: int | None = None) -> None:
        if bound < 1:
            raise ValueError(f"bound must be >= 1, got {bound}")
        if resume_at is None:
            resume_at = bound - max(1, bound // 4)
        if not 0 <= resume_at < bound:
            raise ValueError(f"resume_at must be within 0..bound-1, got {resume_at}")
        self.bound = bound
        self.resume_at = resume_at

    @staticmethod
    def span(watermark: int, next_offset: int) -> int:
        return max(0, next_offset - watermark)

    def hold(self, held: bool, watermark: int, next_offset: int) -> bool:
        """Whether the partition is (still) held, given whether it is held now."""
        span = self.span(watermark, next_offset)
        return span > self.resume_at if held else span >= self.bound
