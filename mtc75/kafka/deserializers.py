"""Deserializers: the handler gets decoded keys and values, the dead-letter topic the fetched bytes.

A deserializer is a built-in format's name (``"bytes"``: as fetched, ``"str"``: UTF-8, ``"json"``:
``json.loads``), any callable ``fn(data: bytes) -> object``, or a ``confluent_kafka.serialization.Deserializer``
-- e.g. ``confluent_kafka.schema_registry.avro.AvroDeserializer`` -- called as ``fn(data, ctx)`` with the
message's ``SerializationContext`` (topic, field, headers). A key or value that is None (no key, a
tombstone) stays None: no deserializer is called for it.

:func:`decoder` builds the function the invoker (mtc75/runtime/invoker.py) calls before the handler, on the
worker that runs it: the poll thread, the bottleneck of the fast path, does no per-message CPU work for
it, and with no deserializer set there is no such function, so that path is unchanged. It returns a
:class:`DecodedMessage`; the Work keeps the fetched ``confluent_kafka.Message``, so a retry decodes the
same bytes again and a dead-letter record carries the original ones. A deserializer that raises makes a
:class:`mtc75.errors.DeserializationError`: that message's failure, not retried unless the deserializer could
not reach its schema registry (:func:`is_transient`).

Thread contract: :func:`decoder` runs on the thread that builds the consumer; the function it returns is
called by many workers at once (and on the event loop for async handlers), so a user's deserializer must be
safe to call from several threads at once. A :class:`DecodedMessage` belongs to the handler call it was
made for.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from typing import Any

from confluent_kafka.serialization import Deserializer, MessageField, SerializationContext

from mtc75.errors import ConfigError, DeserializationError

# The built-in formats (mtc75/settings.py FORMATS names them for KEY_FORMAT / VALUE_FORMAT): None = as fetched.
BUILT_INS: dict[str, Callable[[bytes], Any] | None] = {
    "bytes": None,
    "str": bytes.decode,  # UTF-8, strict: bytes that are not UTF-8 fail
    "json": json.loads,  # takes bytes (UTF-8, -16 or -32)
}
# A schema registry's answers worth another attempt: timeout, throttled, server errors.
RETRIABLE_HTTP = frozenset({408, 429})
CAUSE_DEPTH = 8  # how far down __cause__ / __context__ is_transient looks

DeserializerSpec = Callable[..., Any] | str | None  # what key_deserializer= / value_deserializer= take


class DecodedMessage:
    """What the handler gets when a deserializer is set: ``key()`` and ``value()`` return the decoded
    objects; ``topic()``, ``partition()``, ``offset()``, ``headers()``, ``timestamp()`` ... those of
    ``original``, the fetched ``confluent_kafka.Message`` (its bytes are what a dead-letter record carries)."""

    __slots__ = ("_key", "_value", "original")

    def __init__(self, original: Any, key: Any, value: Any) -> None:
        self.original = original
        self._key = key
        self._value = value

    def key(self) -> Any:
        return self._key

    def value(self) -> Any:
        return self._value

    def topic(self) -> str:
        return self.original.topic()  # type: ignore[no-any-return]

    def partition(self) -> int:
        return self.original.partition()  # type: ignore[no-any-return]

    def offset(self) -> int:
        return self.original.offset()  # type: ignore[no-any-return]

    def headers(self) -> list[tuple[str, bytes]] | None:
        return self.original.headers()  # type: ignore[no-any-return]

    def timestamp(self) -> tuple[int, int]:
        return self.original.timestamp()  # type: ignore[no-any-return]

    def error(self) -> Any:
        return self.original.error()

    def latency(self) -> float | None:
        return self.original.latency()  # type: ignore[no-any-return]

    def leader_epoch(self) -> int | None:
        return self.original.leader_epoch()  # type: ignore[no-any-return]

    def __len__(self) -> int:
        """The fetched value's size in bytes, as for a Message."""
        return len(self.original)

    def __repr__(self) -> str:
        return f"DecodedMessage({self.original.topic()}[{self.original.partition()}]@{self.original.offset()})"


class _Field:
    """One field's deserializer: how to call it and what to call it in an error."""

    __slots__ = ("fn", "name", "wants_ctx")

    def __init__(self, fn: Callable[..., Any], name: str, wants_ctx: bool) -> None:
        self.fn, self.name, self.wants_ctx = fn, name, wants_ctx


def decoder(key: DeserializerSpec, value: DeserializerSpec) -> Callable[[Any], DecodedMessage] | None:
    """The function that turns a fetched message into a :class:`DecodedMessage`, or None when both fields
    stay bytes (``"bytes"`` or None). Refuses, with a ConfigError, what cannot deserialize."""
    key_field = _field(key, "key")
    value_field = _field(value, "value")
    if key_field is None and value_field is None:
        return None

    key_fn, key_ctx = (None, False) if key_field is None else (key_field.fn, key_field.wants_ctx)
    value_fn, value_ctx = (None, False) if value_field is None else (value_field.fn, value_field.wants_ctx)

    def decode(message: Any) -> DecodedMessage:
        # Worker thread. Inline rather than a helper per field: this runs once per message.
        key = message.key()
        if key is not None and key_fn is not None:
            try:
                key = key_fn(key, _context(message, MessageField.KEY)) if key_ctx else key_fn(key)
            except Exception as err:  # a BaseException stays the worker's to report: retried like a handler's
                raise _failure(key_field, MessageField.KEY, err) from err
        value = message.value()
        if value is not None and value_fn is not None:
            try:
                value = value_fn(value, _context(message, MessageField.VALUE)) if value_ctx else value_fn(value)
            except Exception as err:
                raise _failure(value_field, MessageField.VALUE, err) from err
        return DecodedMessage(message, key, value)

    # How a worker process (RUNNER="processes") builds it again: a function is pickled by name, not by code.
    decode.rebuild = (decoder, (key, value))  # type: ignore[attr-defined]
    return decode


def _context(message: Any, which: str) -> SerializationContext:
    return SerializationContext(message.topic(), which, message.headers())


def _failure(field: _Field | None, which: str, err: Exception) -> DeserializationError:
    """The message's failure: not retried unless the deserializer could not reach its registry."""
    name = field.name if field is not None else "?"
    return DeserializationError(which, name, err, retriable=is_transient(err))


def _field(spec: DeserializerSpec, which: str) -> _Field | None:
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec not in BUILT_INS:
            raise ConfigError(
                f"invalid {which}_deserializer={spec!r}: must be a callable or one of " + ", ".join(BUILT_INS)
            )
        fn = BUILT_INS[spec]
        return None if fn is None else _Field(fn, spec, False)
    if not callable(spec):
        raise ConfigError(f"invalid {which}_deserializer: must be a callable or a format name, "
                          f"got {type(spec).__name__}")
    call = spec if inspect.isfunction(spec) or inspect.ismethod(spec) else getattr(type(spec), "__call__", spec)  # noqa: B004
    if any(inspect.iscoroutinefunction(f) or inspect.isasyncgenfunction(f) for f in (spec, call)):  # partials too
        raise ConfigError(
            f"{which}_deserializer {_name(spec)} is async: deserializers are called before the handler on its "
            "worker and are not awaited; use a plain one (e.g. AvroDeserializer, not AsyncAvroDeserializer)"
        )
    return _Field(spec, _name(spec), isinstance(spec, Deserializer))


def is_transient(err: BaseException) -> bool:
    """Whether a deserializer's failure may pass on another attempt: it could not reach its schema registry
    (an ``OSError``, an ``httpx`` transport error, a registry answer 408, 429 or 5xx), here or in the
    exceptions it was raised from. Anything else -- bad bytes, an unknown schema id -- fails the same way
    every time."""
    seen = 0
    current: BaseException | None = err
    while current is not None and seen < CAUSE_DEPTH:
        if isinstance(current, OSError):
            return True
        for cls in type(current).__mro__:  # httpx (or httpx2) is the registry client's, and optional
            if cls.__name__ == "TransportError" and cls.__module__.startswith("httpx"):
                return True
        status = getattr(current, "http_status_code", None)  # confluent_kafka's SchemaRegistryError
        if isinstance(status, int) and (status in RETRIABLE_HTTP or 500 <= status < 600):
            return True
        current = current.__cause__ or current.__context__
        seen += 1
    return False


def _name(fn: object) -> str:
    """A deserializer's name for the error header: ``module.qualname`` of a function, else its class."""
    qualname = getattr(fn, "__qualname__", None)
    if qualname is None:
        qualname = type(fn).__qualname__
    module = getattr(fn, "__module__", None) or type(fn).__module__
    return f"{module}.{qualname}" if module and module != "builtins" else qualname
