"""Output records: what a handler returns to have records written for a message it handled.

A handler returns None (nothing to write), one :class:`Output`, or a list, tuple or generator of them.
The message counts done only once its outputs are written: confirmed by Kafka (``at_least_once``), or
produced inside the open transaction that commits its offset (``exactly_once``).

:func:`outputs_of` is the one reading of a return value (the invoker's, on the worker that called the
handler): a tuple of Outputs, an error (the message failed: retried, then ON_FAILURE), or None (nothing
to write). Any other value -- a number, a dict, a string, an object -- is ignored as before outputs
existed (a handler returning an incidental value keeps working); :func:`ignored_type` names it so the
invoker can warn once. A list, tuple or generator is read whole: all Outputs, or a TypeError.

Pure: no Kafka, no threads; ``Output`` is an immutable value any thread may read.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import NamedTuple


class Output(NamedTuple):
    """One record to write: ``topic``, ``value`` (bytes, str or None), ``key``, ``headers`` (a list of
    ``(name, value)`` pairs or a dict) and ``partition`` (None: the producer's partitioner, by key)."""

    topic: str
    value: bytes | str | None
    key: bytes | str | None = None
    headers: list[tuple[str, bytes | str | None]] | Mapping[str, bytes | str | None] | None = None
    partition: int | None = None


# Containers read as "several outputs"; anything else that is iterable (str, bytes, dict, a file) is not.
SEQUENCES = (list, tuple, types.GeneratorType)


def outputs_of(result: object) -> tuple[Output, ...] | BaseException | None:
    """What a handler's non-None, non-awaitable return value means (see the module notes)."""
    if isinstance(result, Output):
        problem = invalid(result)
        return (result,) if problem is None else TypeError(problem)
    if not isinstance(result, SEQUENCES):
        return None  # ignored: not an output
    try:
        items = tuple(result)
    except BaseException as err:  # a generator's body raised: the message failed, as if the handler had
        return err
    for item in items:
        if not isinstance(item, Output):
            return TypeError(f"handler returned a {type(result).__name__} holding a {type(item).__name__}: "
                             "a returned list, tuple or generator must hold only mtc75.Output records")
        problem = invalid(item)
        if problem is not None:
            return TypeError(problem)
    return items


def ignored_type(result: object) -> str | None:
    """The type name of a return value :func:`outputs_of` ignores, else None."""
    if result is None or isinstance(result, (Output, *SEQUENCES)):
        return None
    return type(result).__name__


def invalid(output: Output) -> str | None:
    """Why ``output`` cannot be written (a wrong field type), else None."""
    if not isinstance(output.topic, str) or not output.topic:
        return f"Output.topic must be a non-empty str, got {output.topic!r}"
    for name in ("value", "key"):
        field = getattr(output, name)
        if field is not None and not isinstance(field, bytes | str):
            return f"Output.{name} must be bytes, str or None, got {type(field).__name__}"
    headers = output.headers
    if headers is not None and not isinstance(headers, list | tuple | Mapping):
        return f"Output.headers must be a list of (name, value) pairs or a dict, got {type(headers).__name__}"
    part = output.partition
    if part is not None and (isinstance(part, bool) or not isinstance(part, int) or part < 0):
        return f"Output.partition must be None or an int >= 0, got {part!r}"
    return None

