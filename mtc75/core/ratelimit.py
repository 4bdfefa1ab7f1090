"""Rate limits: when a message may start under MAX_RATE and KEY_RATE (pure: no threads, no Kafka, no clock).

``MAX_RATE`` bounds the messages per second this consumer starts, ``KEY_RATE`` those of each key (0 turns
either off). Each limit is a token bucket that fills at ``rate`` tokens a second and holds at most
``capacity = max(1, rate x RATE_BURST)`` of them: after an idle spell, up to ``capacity`` messages start at
once, then one every ``1 / rate`` seconds. A Work of ``n`` messages (a chunk, a batch) takes ``n`` tokens.

The buckets *reserve*: :meth:`TokenBucket.reserve` answers when the tokens will be there and takes them
now, leaving a debt that the next reservation queues behind. So the caller never asks twice: a message
whose start lies in the future waits for it elsewhere (the dispatcher's delay queue, holding no thread)
and starts then without asking again; reservations come out spaced ``1 / rate`` apart, in the order they
were made. A Work larger than ``capacity`` waits until the bucket is full and leaves the rest as debt, so
the long-run rate holds for any Work size.

A Work pays its key tokens first and the consumer's tokens only once its key's start has come: a message
waiting for its key never holds tokens the other keys could use. ``work.paid`` (bits ``PAID_KEY`` and
``PAID_RATE``) records what this start already paid, so a Work that waited is not charged again; it is
cleared when the Work may start, so a retry (another handler call) pays again.

Key buckets come and go with the keys: a bucket that has filled up again is the same as a new one, so
:class:`KeyBuckets` drops those whenever its count doubles since the last sweep (amortised O(1) per
reservation; what it keeps is bounded by the keys reserved within the last ``capacity / rate`` seconds
plus those with a start still ahead).

A hot key's messages cannot start faster than its rate and cannot be committed past: :class:`KeyHolds`
says which partitions to pause alone while too many of theirs wait for their keys' tokens (the engine's
backpressure acts on it; the pause gate does not count those messages). ``RATE_RESERVE_SECONDS`` is what
the gate keeps at a resume while ``MAX_RATE`` binds (mtc75/core/gate.py ``reserve``).

Thread contract: no lock of its own. The dispatcher's throttle (mtc75/runtime/throttle.py) calls the buckets,
:class:`RateLimits` and :class:`WaitTime` with the dispatcher's lock held; :class:`KeyHolds` is the poll thread's.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping

from mtc75.core.offsets import Partition
from mtc75.core.work import Work

PAID_KEY = 1  # work.paid: this start's key tokens are taken
PAID_RATE = 2  # work.paid: this start's MAX_RATE tokens are taken
PAID_ALL = PAID_KEY | PAID_RATE
SWEEP_MIN = 1024  # key buckets kept before the first sweep
NO_CAP = 1 << 62  # RateLimits.chunk_cap without a limit
# Seconds of MAX_RATE the backlog keeps when a pause ends (PauseGate.reserve): a refetch on a loaded machine
# takes longer than the gate's 50 ms bridge, and a token that finds the backlog empty is lost (the bucket
# holds only RATE_BURST), so the rate would fall short of the limit.
RATE_RESERVE_SECONDS = 0.5
# Seconds of KEY_RATE a partition may hold waiting for its keys' tokens before it is held alone (KeyHolds):
# enough that a held hot key still has messages when its partition's refetch after the release comes back.
KEY_HOLD_SECONDS = 0.5


def capacity(rate: float, burst: float) -> float:
    """Tokens a bucket of ``rate`` holds: ``burst`` seconds' worth, at least one message."""
    return max(1.0, rate * burst)


def _check(rate: float, burst: float) -> None:
    if not rate > 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    if not burst >= 0:
        raise ValueError(f"burst must be >= 0, got {burst}")


class TokenBucket:
    """One bucket: ``rate`` tokens a second, at most ``capacity``; it starts full."""

    __slots__ = ("rate", "capacity", "_zero_at")

    def __init__(self, rate: float, burst: float, now: float, tokens: float | None = None) -> None:
        _check(rate, burst)
        self.rate = rate
        self.capacity = capacity(rate, burst)
        # The time at which the bucket held no token, filling at ``rate`` since (capped at ``capacity``):
        # tokens(t) = min(capacity, (t - _zero_at) * rate); after it, a debt.
        held = self.capacity if tokens is None else min(tokens, self.capacity)
        self._zero_at = now - held / rate

    def tokens(self, now: float) -> float:
        """Tokens in the bucket at ``now`` (negative: reservations ahead of it)."""
        return min(self.capacity, (now - self._zero_at) * self.rate)

    def reserve(self, now: float, n: int = 1) -> float:
        """Take ``n`` tokens; returns when they are there (``now`` when they are now)."""
        rate = self.rate
        zero = self._zero_at
        full = now - self.capacity / rate
        if zero < full:
            zero = full
        start = zero + min(n, self.capacity) / rate
        self._zero_at = zero + n / rate
        return start if start > now else now

    def refund(self, n: int) -> None:
        """Give back ``n`` tokens reserved for a start that will not happen (a re-plan)."""
        self._zero_at -= n / self.rate

    def retuned(self, rate: float, burst: float, now: float) -> TokenBucket:
        """The bucket under a new rate and burst, holding the tokens (or the debt) this one holds now."""
        return TokenBucket(rate, burst, now, self.tokens(now))


class KeyBuckets:
    """One bucket per key, ``rate`` tokens a second each, dropped once full again (see the module notes)."""

    def __init__(self, rate: float, burst: float) -> None:
        _check(rate, burst)
        self.rate = rate
        self.burst = burst
        self.capacity = capacity(rate, burst)
        self._zero_at: dict[Hashable, float] = {}  # per key, as TokenBucket._zero_at; absent = full
        self._sweep_at = SWEEP_MIN

    def __len__(self) -> int:
        return len(self._zero_at)

    def reserve(self, key: Hashable, now: float, n: int = 1) -> float:
        """Take ``n`` of ``key``'s tokens; returns when they are there."""
        rate = self.rate
        full = now - self.capacity / rate
        zeros = self._zero_at
        zero = zeros.get(key, full)
        if zero < full:
            zero = full
        start = zero + min(n, self.capacity) / rate
        zeros[key] = zero + n / rate
        if len(zeros) > self._sweep_at:
            self.sweep(now)
        return start if start > now else now

    def refund(self, key: Hashable, n: int) -> None:
        if key in self._zero_at:
            self._zero_at[key] -= n / self.rate

    def sweep(self, now: float) -> None:
        """Drop the buckets that are full again (the same as none)."""
        full = now - self.capacity / self.rate
        self._zero_at = {key: zero for key, zero in self._zero_at.items() if zero > full}
        self._sweep_at = max(SWEEP_MIN, 2 * len(self._zero_at))

    def retuned(self, rate: float, burst: float, now: float) -> KeyBuckets:
        """The buckets under a new rate and burst, each holding the tokens (or debt) it holds now."""
        new = KeyBuckets(rate, burst)
        old_full = now - self.capacity / self.rate
        for key, zero in self._zero_at.items():
            if zero > old_full:  # not full: carry its tokens over (capped at the new capacity)
                held = min((now - zero) * self.rate, new.capacity)
                new._zero_at[key] = now - held / rate
        new.sweep(now)
        return new


def keys_of(work: Work) -> Iterable[tuple[Hashable, int]]:
    """``(key, messages)`` of a Work's keyed messages (a keyless message has no key bucket)."""
    if work.size == 1:
        key = work.message.key()
        return () if key is None else ((key, 1),)
    counts = Counter(m.key() for m in work.messages)
    counts.pop(None, None)
    return counts.items()


class RateLimits:
    """MAX_RATE and KEY_RATE of one consumer: when each Work may start (see the module notes)."""

    def __init__(self, max_rate: float, key_rate: float, burst: float, now: float) -> None:
        if max_rate < 0 or key_rate < 0:
            raise ValueError(f"rates must be >= 0, got max_rate={max_rate}, key_rate={key_rate}")
        self.max_rate = max_rate
        self.key_rate = key_rate
        self.burst = burst
        self.all = TokenBucket(max_rate, burst, now) if max_rate else None
        self.keys = KeyBuckets(key_rate, burst) if key_rate else None

    @property
    def chunk_cap(self) -> int:
        """Most messages a chunk may hold: one under KEY_RATE (a chunk waiting for one hot key would hold
        the other keys' messages), else what the bucket holds, so chunks never burst past it."""
        if self.keys is not None:
            return 1
        if self.all is not None:
            return int(self.all.capacity)
        return NO_CAP

    def admit(self, work: Work, now: float) -> float:
        """When ``work`` may start; its tokens are taken. ``now`` (and ``work.paid`` cleared): it may start;
        a later time: it waits for it, ``work.paid`` telling what it paid (its cause: :func:`cause`)."""
        keys = self.keys
        if keys is not None and not work.paid & PAID_KEY:
            work.paid |= PAID_KEY
            start = now
            for key, count in keys_of(work):
                at = keys.reserve(key, now, count)
                if at > start:
                    start = at
            if start > now:
                return start
        bucket = self.all
        if bucket is not None and not work.paid & PAID_RATE:
            work.paid |= PAID_RATE
            start = bucket.reserve(now, work.size)
            if start > now:
                return start
        work.paid = 0
        return now

    def refund(self, work: Work) -> None:
        """``work`` waits and will not start at its reserved time (a re-plan): give its tokens back."""
        if work.paid & PAID_RATE and self.all is not None:
            self.all.refund(work.size)
        if work.paid & PAID_KEY and self.keys is not None:
            for key, count in keys_of(work):
                self.keys.refund(key, count)
        work.paid = 0

    def retuned(self, max_rate: float, key_rate: float, burst: float, now: float) -> RateLimits:
        """These limits under new settings: a bucket that stays keeps its tokens, a new one starts full."""
        new = RateLimits(max_rate, key_rate, burst, now)
        if new.all is not None and self.all is not None:
            new.all = self.all.retuned(max_rate, burst, now)
        if new.keys is not None and self.keys is not None:
            new.keys = self.keys.retuned(key_rate, burst, now)
        return new


def cause(work: Work) -> int:
    """What a waiting Work waits for: ``PAID_RATE`` (MAX_RATE) or ``PAID_KEY`` (its key's KEY_RATE)."""
    return PAID_RATE if work.paid & PAID_RATE else PAID_KEY


class WaitTime:
    """Seconds during which at least one message waited for a token of one limit, and how many wait now
    (messages: a chunk counts its own)."""

    __slots__ = ("waiting", "_since", "_seconds")

    def __init__(self) -> None:
        self.waiting = 0
        self._since = 0.0
        self._seconds = 0.0

    def add(self, now: float, messages: int = 1) -> None:
        if not self.waiting:
            self._since = now
        self.waiting += messages

    def remove(self, now: float, messages: int = 1) -> None:
        self.waiting -= messages
        if not self.waiting:
            self._seconds += now - self._since

    def seconds(self, now: float) -> float:
        return self._seconds + (now - self._since if self.waiting else 0.0)


def key_hold_bound(key_rate: float, high: int) -> int:
    """Messages of one partition that may wait for their keys' tokens before it is held: KEY_HOLD_SECONDS
    of the key's rate (so a held hot key still has work when its partition's refetch comes back), at least 2,
    at most the gate's high watermark."""
    return max(1, min(high, max(2, math.ceil(key_rate * KEY_HOLD_SECONDS))))


class KeyHolds:
    """Partitions paused alone while too many of their messages wait for their keys' KEY_RATE tokens.

    A hot key's messages cannot start faster than its rate, and the ones fetched behind it in its partition
    cannot be committed past it: so rather than let them fill the backlog (which would pause every
    partition), the partition that holds them is paused alone once ``bound`` of them wait, and resumed once
    they are down to half of it. The pause gate does not count them (mtc75/engine/backpressure.py), and the
    other partitions go on. Poll thread only (no lock).
    """

    def __init__(self) -> None:
        self._held: set[Partition] = set()
        self.holds = 0  # how many times a partition was held (logs, tests)

    def __contains__(self, tp: object) -> bool:
        return tp in self._held

    def __len__(self) -> int:
        return len(self._held)

    def update(self, waiting: Mapping[Partition, int], bound: int) -> tuple[list[Partition], list[Partition]]:
        """``(to_hold, to_release)`` for ``waiting`` messages per partition (a partition left out: none)."""
        to_release = [tp for tp in self._held if waiting.get(tp, 0) <= bound // 2]
        self._held.difference_update(to_release)
        to_hold = [tp for tp, count in waiting.items() if count >= bound and tp not in self._held]
        self._held.update(to_hold)
        self.holds += len(to_hold)
        return to_hold, to_release

    def forget(self, tps: Iterable[Partition]) -> list[Partition]:
        """Partitions given up (revoke, lost, re-assigned, reset): returns those that were held."""
        held = [tp for tp in tps if tp in self._held]
        self._held.difference_update(held)
        return held
