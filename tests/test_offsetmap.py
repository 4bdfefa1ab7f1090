"""Offset map codec and bounded-window policy: round trips, the limit, corrupt and foreign input. No broker."""

from __future__ import annotations

import base64
import random

import pytest

from mtc75.core.offsetmap import (
    DEFAULT_LIMIT,
    MAX_OFFSET,
    FinishedOffsets,
    OffsetMapError,
    StaleOffsetMap,
    WindowPolicy,
    decode,
    default_window,
    encode,
    map_capacity,
)

C = 10**12  # a committed offset with a realistic number of digits


def _round_trip(committed: int, finished: set[int], limit: int = DEFAULT_LIMIT) -> str:
    text = encode(committed, finished, limit)
    assert text is not None
    decoded = decode(text, committed)
    if not finished:
        assert text == "" and decoded is None
        return text
    assert decoded is not None
    assert set(decoded) == finished
    assert decoded.count == len(finished)
    assert decoded.end == max(finished) + 1
    for off in finished:
        assert off in decoded
    for off in (committed, committed + 1, max(finished) + 1):
        assert (off in decoded) == (off in finished)
    return text


def _alternating(committed: int, gaps: int) -> set[int]:
    return set(range(committed + 2, committed + 2 * gaps + 1, 2))


# -- round trips ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(40))
def test_random_sets_round_trip(seed: int) -> None:
    rng = random.Random(seed)
    committed = rng.choice([0, 7, C, MAX_OFFSET - 50_000])
    span = rng.choice([1, 2, 9, 64, 1000, 20_000])
    density = rng.random()
    finished = {committed + 1 + i for i in range(span) if rng.random() < density}
    _round_trip(committed, finished, limit=10**7)


def test_edge_cases_round_trip() -> None:
    assert encode(C, []) == ""  # nothing above: a commit clears an older map
    assert decode("", C) is None and decode(None, C) is None
    _round_trip(C, {C + 1})  # the first offset above
    _round_trip(C, {C + 2})  # one unfinished, then one finished
    _round_trip(C, set(range(C + 1, C + 5001)))  # contiguous from the start (engine would have moved on)
    _round_trip(C, set(range(C + 2, C + 5002)))  # the slow head: one stuck, the rest done
    _round_trip(C, _alternating(C, 10_000))  # worst case
    _round_trip(0, {1, 8, 9, 16, 17})  # byte boundaries of the bitmap
    _round_trip(MAX_OFFSET - 3, {MAX_OFFSET - 1, MAX_OFFSET})  # near 2**63
    _round_trip(MAX_OFFSET - 20_000, _alternating(MAX_OFFSET - 20_000, 10_000))
    _round_trip(MAX_OFFSET - 1, {MAX_OFFSET})


def test_both_encodings_are_exercised_and_the_smaller_is_chosen() -> None:
    sparse = set(range(C + 2, C + 10_001))
    dense = _alternating(C, 1000)
    rle, bitmap = encode(C, sparse), encode(C, dense)
    assert rle is not None and rle.startswith(f"m1r:{C}:")
    assert bitmap is not None and bitmap.startswith(f"m1b:{C}:")
    # the other encoding of each, built by hand, is larger
    header = len(f"m1r:{C}:")
    assert len(rle) < header + 4 * ((10_000 // 8 + 2) // 3)  # a 10k-bit bitmap
    assert len(bitmap) < header + 4 * ((2 * 1000 + 2) // 3)  # 2,000 one-byte runs


@pytest.mark.parametrize(
    ("name", "finished", "expected"),
    [
        # (pattern, gaps = unfinished offsets) -> characters with committed = 10**12 (18 of header)
        ("slow head, span 1k", set(range(C + 2, C + 1001)), 22),
        ("slow head, span 10k", set(range(C + 2, C + 10_001)), 22),
        ("75 random unfinished in 1k", None, 186),
        ("75 random unfinished in 10k", None, 262),
        ("1k gaps at random in 2k", None, 354),
        ("10k gaps at random in 20k", None, 3354),
        ("1k gaps alternating", _alternating(C, 1000), 354),
        ("10k gaps alternating", _alternating(C, 10_000), 3354),
    ],
)
def test_measured_sizes(name: str, finished: set[int] | None, expected: int) -> None:
    """The figures in the module docstring (and the report), kept honest."""
    if finished is None:
        rng = random.Random(1)
        if name.startswith("75"):
            span = range(C + 1, C + 1 + (1000 if "1k" in name else 10_000))
            finished = set(span) - set(rng.sample(span, 75))
        else:
            gaps = 1000 if name.startswith("1k") else 10_000
            span = range(C + 1, C + 1 + 2 * gaps)
            finished = set(span) - set(rng.sample(span, gaps))
    text = _round_trip(C, finished, limit=10**6)
    assert len(text) == pytest.approx(expected, abs=8)
    assert len(text) <= DEFAULT_LIMIT


# -- the limit ------------------------------------------------------------------------------------


def test_a_map_that_does_not_fit_is_none_and_one_that_just_fits_is_kept() -> None:
    finished = _alternating(C, 10_000)
    text = encode(C, finished, limit=10**6)
    assert text is not None
    assert encode(C, finished, limit=len(text)) == text
    assert encode(C, finished, limit=len(text) - 1) is None
    assert encode(C, _alternating(C, 13_000)) is None  # 13k gaps: 4,354 > 4,096 characters
    assert encode(C, {C + 5}, limit=3) is None  # not even the header fits


def test_map_capacity_always_fits_and_one_more_offset_may_not() -> None:
    cap = map_capacity()
    assert cap == 24_432
    worst = MAX_OFFSET - cap - 100  # a 19-digit committed offset: the longest header
    assert encode(worst, {worst + cap}) is not None  # a single finished offset at the far end: bitmap or runs
    every_other = set(range(worst + 2, worst + cap + 1, 2))
    assert encode(worst, every_other) is not None
    assert encode(worst, every_other | {worst + cap + 24}) is None  # 3 more bytes of bitmap: over
    assert map_capacity(10) == 0


def test_huge_sparse_span_is_encoded_without_allocating_a_bitmap() -> None:
    text = encode(0, {1, MAX_OFFSET})  # a bitmap would be 2**60 bytes
    assert text is not None and text.startswith("m1r:0:")
    decoded = decode(text, 0)
    assert decoded is not None and MAX_OFFSET in decoded and 2 not in decoded and decoded.count == 2


def test_bad_arguments_are_value_errors() -> None:
    with pytest.raises(ValueError, match="not above"):
        encode(C, {C})
    with pytest.raises(ValueError, match="not above"):
        encode(C, {C - 1, C + 3})
    with pytest.raises(ValueError, match="beyond int64"):
        encode(0, {MAX_OFFSET + 1})
    with pytest.raises(ValueError, match="committed offset"):
        encode(-1, {3})
    with pytest.raises(ValueError, match="limit"):
        encode(0, {3}, limit=-1)


# -- corrupt and foreign input --------------------------------------------------------------------


def _payload(text: str) -> bytes:
    return base64.b64decode(text.rsplit(":", 1)[1])


def _with_payload(tag: str, committed: int, raw: bytes) -> str:
    return f"{tag}{committed}:{base64.b64encode(raw).decode()}"


@pytest.mark.parametrize(
    "metadata",
    [
        "processed-by=kcat",
        "{'app': 'other'}",
        "m2r:0:AAE=",  # a future version
        "m1x:0:AAE=",  # an unknown encoding
        "M1R:0:AAE=",
        " m1r:0:AAE=",
        "m1r",
        "m1r:",
        "m1r:0",  # no payload separator
        "m1r:0:",  # empty payload
        "m1r::AAE=",  # no committed offset
        "m1r:-1:AAE=",
        "m1r:+0:AAE=",
        "m1r:00:AAE=",
        "m1r:\u0660:AAE=",  # an Arabic-Indic zero: isdigit() but not ASCII
        "m1r:99999999999999999999:AAE=",
        "m1r:0:AAE",  # truncated base64 (padding missing)
        "m1r:0:A@E=",  # not the alphabet
        "m1r:0:AAF=",  # non-canonical padding bits
        "m1r:0:AAE=\n",
        "m1r:0:é",
    ],
)
def test_foreign_or_garbled_metadata_raises_offset_map_error(metadata: str) -> None:
    committed = 0
    with pytest.raises(OffsetMapError):
        decode(metadata, committed)


def test_metadata_without_a_valid_committed_offset_or_of_another_type_raises() -> None:
    text = encode(0, {2})
    assert text is not None
    for committed in (-1001, -1, MAX_OFFSET + 1):  # OFFSET_INVALID and friends
        with pytest.raises(OffsetMapError, match="committed offset"):
            decode(text, committed)
    assert decode("", -1001) is None  # nothing to apply: not an error
    with pytest.raises(OffsetMapError, match="str"):
        decode(text.encode(), 0)  # type: ignore[arg-type]


def test_corrupt_run_lengths_raise() -> None:
    good = encode(0, {3, 4, 90})
    assert good is not None and good.startswith("m1r:")
    raw = _payload(good)
    assert decode(_with_payload("m1r:", 0, raw), 0) is not None  # the hand-built form is right
    every = decode(_with_payload("m1r:", 0, b"\x00" + b"\xff" * 8 + b"\x7f"), 0)  # 1 .. 2**63 - 1: the limit
    assert every is not None and every.ranges == ((1, MAX_OFFSET + 1),)
    bad = [
        raw[:-1],  # truncated: odd number of runs
        raw[:-1] + b"\x80",  # truncated inside a varint
        raw + b"\x00\x00",  # an empty unfinished run, then an empty finished run
        b"\x00\x00",  # an empty finished run
        b"\x01\x80\x00",  # a non-canonical varint (0x80 0x00 is 0)
        b"\x00" + b"\xff" * 9 + b"\x01",  # a varint longer than 63 bits
        b"\x01" + b"\xff" * 8 + b"\x7f",  # 1 unfinished, then 2**63 - 1 finished: past int64
        b"\xff" * 8 + b"\x7f" + b"\x01" * 3,  # many runs whose sum passes int64
    ]
    for raw_bad in bad:
        with pytest.raises(OffsetMapError):
            decode(_with_payload("m1r:", 0, raw_bad), 0)


def test_huge_claimed_runs_stay_compact() -> None:
    """A short string claiming 2**55 finished offsets decodes to one range, not 2**55 integers."""
    raw = b"\x00" + b"\xff" * 7 + b"\x7f"  # 0 unfinished, then 2**56 - 1 finished
    decoded = decode(_with_payload("m1r:", 0, raw), 0)
    assert decoded is not None
    assert decoded.ranges == ((1, 2**56),)
    assert decoded.count == 2**56 - 1
    assert 2**40 in decoded and 2**56 not in decoded
    # ... and the caller that knows the partition's end offset refuses such a map
    with pytest.raises(OffsetMapError, match="end offset"):
        decode(_with_payload("m1r:", 0, raw), 0, end_offset=1000)


def test_end_offset_bounds_what_a_map_may_claim() -> None:
    text = encode(C, {C + 2, C + 9})
    assert decode(text, C, end_offset=C + 10) is not None
    with pytest.raises(OffsetMapError, match="end offset"):
        decode(text, C, end_offset=C + 9)


def test_corrupt_bitmap_raises() -> None:
    good = encode(0, _alternating(0, 100))
    assert good is not None and good.startswith("m1b:")
    raw = _payload(good)
    with pytest.raises(OffsetMapError, match="empty byte"):
        decode(_with_payload("m1b:", 0, raw + b"\x00"), 0)
    near = MAX_OFFSET - 4
    with pytest.raises(OffsetMapError, match="int64"):
        decode(_with_payload("m1b:", near, b"\x80\x01"), near)  # bit 8 is offset near + 9 > 2**63 - 1


def test_a_map_for_another_committed_offset_is_stale() -> None:
    """Another tool moved the offset (e.g. a reset) but kept our metadata: never skip by it."""
    text = encode(C, {C + 2, C + 3})
    assert text is not None
    with pytest.raises(StaleOffsetMap):
        decode(text, C - 100)
    with pytest.raises(StaleOffsetMap):
        decode(text, C + 1)


def test_finished_offsets_structure() -> None:
    fo = FinishedOffsets(10, [(12, 14), (20, 21)])
    assert list(fo) == [12, 13, 20]
    assert fo.count == 3 and fo.end == 21 and fo
    assert 11 not in fo and 14 not in fo and 20 in fo and "12" not in fo
    same = FinishedOffsets(10, ((12, 14), (20, 21)))
    assert fo == same and hash(fo) == hash(same)
    empty = FinishedOffsets(10, [])
    assert not empty and empty.end == 11 and 11 not in empty


# -- bounded window -------------------------------------------------------------------------------


def test_default_window_derives_from_max_backlog_and_fits_the_map() -> None:
    assert default_window(5000) == 10_000
    assert default_window(1) == 2
    assert default_window(20_000) == map_capacity() - 500  # capped: the map must always fit
    # a held partition's span is at most the bound plus one fetch: its worst-case map fits
    for backlog in (1, 100, 5000, 11_966, 11_967, 50_000):
        bound = default_window(backlog) + 500
        assert encode(MAX_OFFSET - bound - 1, _alternating(MAX_OFFSET - bound - 1, bound // 2)) is not None
    with pytest.raises(ValueError):
        default_window(0)
    with pytest.raises(ValueError):
        default_window(10, overshoot=-1)


def test_window_holds_at_the_bound_and_releases_with_hysteresis() -> None:
    policy = WindowPolicy(bound=100)
    assert policy.resume_at == 75
    assert not policy.hold(False, watermark=1000, next_offset=1099)
    assert policy.hold(False, watermark=1000, next_offset=1100)  # span reached the bound
    assert policy.hold(True, watermark=1001, next_offset=1100)  # the watermark crept: still held
    assert policy.hold(True, watermark=1024, next_offset=1100)
    assert not policy.hold(True, watermark=1025, next_offset=1100)  # back to resume_at: released
    assert not policy.hold(False, watermark=1025, next_offset=1100)
    assert policy.span(1000, 900) == 0  # a watermark ahead of the fetch position: nothing held


def test_window_bad_arguments() -> None:
    with pytest.raises(ValueError):
        WindowPolicy(0)
    with pytest.raises(ValueError):
        WindowPolicy(10, resume_at=10)
    assert WindowPolicy(1).resume_at == 0
