"""What TOPIC subscribes to: topic names, and patterns (librdkafka's form: a string starting with ``^``).

Pure: parsing, validation and matching, no Kafka. A subscription is one or more *entries*: a name (the topic
must exist at start-up; deleted while consuming, the run ends after a grace) or a pattern (a regular
expression; a topic created later that matches is consumed too; none need exist, and a matching topic that is
deleted only stops matching). Names and patterns may be mixed, as librdkafka allows.

Written forms (:func:`parse_topics`): a list or tuple of entries; or one string, split at commas -- except that
an entry starting with ``^`` is a pattern that runs to the end of the string (a pattern may hold commas,
``^a{1,3}``), so in a string patterns come last. librdkafka matches with POSIX extended regular expressions:
``\\d`` and ``(?...)`` (lookahead, flags, non-capturing groups) are refused here, since librdkafka would
refuse them at subscribe time or never match; Python's ``re`` checks the rest and matches for the logs
and the fetch probe (the two agree on the POSIX subset; POSIX classes such as ``[[:digit:]]`` are
translated for Python, :func:`python_regex`).

Dead-letter topics (``<topic>.dlq``) would match many patterns (``^orders.*`` matches ``orders.dlq``): with
ON_FAILURE=dlq a message that fails again there goes to ``orders.dlq.dlq``, which matches too, and so on.
:data:`DEAD_LETTER_EXCLUSION` is the ``topic.blacklist`` entry that leaves them out of what a pattern sees
(:meth:`mtc75.settings.Settings.consumer_config`). Likewise :data:`INTERNAL_EXCLUSION`: librdkafka's patterns
match Kafka's internal topics (``^.*`` matched ``__consumer_offsets`` here), which no handler means to read.

Threads: values only (frozen); any thread.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

PATTERN_PREFIX = "^"  # librdkafka's rule: an entry starting with ^ is a regular expression
DEAD_LETTER_SUFFIX = ".dlq"  # <topic>.dlq: where ON_FAILURE=dlq sends a failed message of <topic>
# topic.blacklist entry (librdkafka: regular expressions, comma-separated) that hides dead-letter topics.
DEAD_LETTER_EXCLUSION = r"\.dlq$"
INTERNAL_PREFIX = "__"  # Kafka's own topics: __consumer_offsets, __transaction_state, ...
INTERNAL_EXCLUSION = "^__"
MAX_NAME = 249  # Kafka's longest topic name
LEGAL_NAME = re.compile(r"[A-Za-z0-9._-]+")  # Kafka's topic-name characters
# Python-only syntax librdkafka's POSIX regular expressions do not have (they would be refused at subscribe
# time or never match): say so now, with the setting's name, rather than after connecting.
NOT_POSIX = (("(?", "(?...) groups (lookahead, flags, non-capturing)"), ("\\d", "\\d (write [0-9])"),
             ("\\D", "\\D (write [^0-9])"))


def parse_topics(raw: object) -> tuple[str, ...]:
    """The entries of a TOPIC value (see the module notes), in order, without repeats; ValueError says why not."""
    if isinstance(raw, str):
        entries = _split(raw)
    elif isinstance(raw, list | tuple):
        entries = []
        for item in raw:
            if not isinstance(item, str):
                raise ValueError(f"each topic must be a string, got {type(item).__name__} {item!r}")
            entries += _split(item)
    else:
        raise ValueError("must be a topic name, a list of them, or a pattern starting with ^")
    if not entries:
        raise ValueError("must not be empty")
    for entry in entries:
        check_entry(entry)
    return tuple(dict.fromkeys(entries))


def _split(text: str) -> list[str]:
    """One string's entries: comma-separated names, and a pattern (``^...``) running to the end."""
    out: list[str] = []
    rest = text.strip()
    while rest:
        if rest.startswith(PATTERN_PREFIX):
            out.append(rest)
            break
        head, _, rest = rest.partition(",")
        if head.strip():
            out.append(head.strip())
        rest = rest.strip()
    return out


# POSIX bracket classes (librdkafka's regular expressions have them, Python's do not) as Python ranges
POSIX_CLASSES = {
    "[:alnum:]": "a-zA-Z0-9", "[:alpha:]": "a-zA-Z", "[:digit:]": "0-9", "[:lower:]": "a-z", "[:upper:]": "A-Z",
    "[:xdigit:]": "0-9A-Fa-f", "[:space:]": " \\t\\n\\r\\f\\v", "[:blank:]": " \\t", "[:punct:]": re.escape(
        "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"), "[:word:]": "a-zA-Z0-9_",
}


def python_regex(pattern: str) -> str:
    """``pattern`` with its POSIX bracket classes written as Python's ``re`` reads them."""
    for posix, python in POSIX_CLASSES.items():
        pattern = pattern.replace(posix, python)
    return pattern


def check_entry(entry: str) -> None:
    """ValueError naming ``entry`` when it is neither a legal topic name nor a pattern librdkafka can take."""
    if is_pattern(entry):
        for syntax, what in NOT_POSIX:
            if syntax in entry:
                raise ValueError(f"pattern {entry!r}: librdkafka's regular expressions (POSIX) have no {what}")
        try:
            re.compile(python_regex(entry))
        except re.error as err:
            raise ValueError(f"pattern {entry!r} is not a regular expression: {err}") from None
        return
    if len(entry) > MAX_NAME or not LEGAL_NAME.fullmatch(entry) or entry in (".", ".."):
        raise ValueError(f"{entry!r} is not a topic name (letters, digits, '.', '_' and '-', at most {MAX_NAME}; "
                         f"a pattern starts with {PATTERN_PREFIX})")


def is_pattern(entry: str) -> bool:
    return entry.startswith(PATTERN_PREFIX)


def dead_letter_topic(topic: str) -> str:
    """Where ON_FAILURE=dlq sends the failed messages of ``topic``."""
    return topic + DEAD_LETTER_SUFFIX


@dataclass(frozen=True)
class Subscription:
    """The entries of TOPIC, and which topics they name or match (see the module notes).

    ``excluded``: regular expressions of topics no pattern sees (librdkafka's ``topic.blacklist``; named
    topics are left alone here -- naming one is a user's explicit choice).
    """

    entries: tuple[str, ...]
    excluded: tuple[str, ...] = ()

    @classmethod
    def of(cls, raw: object, excluded: str | None = None) -> Subscription:
        """From a TOPIC value (ValueError when it is not one) and a ``topic.blacklist`` value."""
        blacklist = tuple(e.strip() for e in (excluded or "").split(",") if e.strip())
        return cls(parse_topics(raw), blacklist)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(e for e in self.entries if not is_pattern(e))

    @property
    def patterns(self) -> tuple[str, ...]:
        return tuple(e for e in self.entries if is_pattern(e))

    def named(self, topic: str) -> bool:
        """``topic`` is one of the names (it must exist; deleted, the run ends after a grace)."""
        return topic in self.names

    def matching(self, topic: str) -> str | None:
        """The first pattern that matches ``topic`` (None: none does, or the topic is excluded)."""
        if any(_search(x, topic) for x in self.excluded):
            return None
        return next((p for p in self.patterns if _search(p, topic)), None)

    def covers(self, topic: str) -> bool:
        """``topic`` is named or matched."""
        return self.named(topic) or self.matching(topic) is not None

    def select(self, topics: Iterable[str]) -> list[str]:
        """The topics of ``topics`` this subscription consumes, sorted."""
        return sorted(t for t in set(topics) if self.covers(t))

    def describe(self) -> str:
        """``orders``, ``orders, payments``, ``^orders-.*`` -- for log lines and titles."""
        return ", ".join(self.entries)

    def single(self) -> str | None:
        """The one topic name, when the subscription is exactly one name (else None)."""
        return self.entries[0] if len(self.entries) == 1 and not self.patterns else None


def as_setting(entries: Sequence[str]) -> str | tuple[str, ...]:
    """TOPIC's value: a string for one entry (as before lists existed), a tuple for several."""
    return entries[0] if len(entries) == 1 else tuple(entries)


def _search(pattern: str, topic: str) -> bool:
    try:
        return re.search(python_regex(pattern), topic) is not None
    except re.error:  # a user's topic.blacklist entry Python cannot read: librdkafka decides, not us
        return False
