"""What a handler is to worker processes (RUNNER="processes"): pickled once, on the poll thread, when the
Invoker is built, so that a handler or deserializer that cannot cross is refused at start with one line.

Thread contract: pure (no state); called on the thread that builds the Invoker.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

from mtc75.errors import ConfigError, HandlerRefused
from mtc75.runtime.handlers import Handler, handler_name
from mtc75.runtime.procworker import safe_text


def pickled_handler(handler: Handler, name: str, decode: Callable[[Any], Any] | None = None,
                    batches: bool = False) -> bytes:
    """What worker processes need to call ``handler`` as here, pickled: the handler -- a module-level function
    travels as its importable name (``module.qualname``); a partial or an object as its parts -- and its
    kind: a batch handler or not, and how to build the decode function there (its ``rebuild``: a function
    and its arguments, :func:`mtc75.kafka.deserializers.decoder` with the deserializers' specs).
    HandlerRefused or ConfigError say why one cannot cross."""
    if handler_name(handler).startswith("__main__."):
        raise HandlerRefused(
            f"handler {name} is defined in the script being run (__main__): worker processes import a handler "
            "by its module's name; move it into a module (e.g. myapp/jobs.py) and pass myapp.jobs.handle"
        )
    try:
        blob = pickle.dumps(handler, pickle.HIGHEST_PROTOCOL)
    except BaseException as err:  # a lambda, a nested function, an object holding a lock or a client
        raise HandlerRefused(
            f"handler {name} cannot be sent to worker processes ({type(err).__name__}: {safe_text(err)}); give a "
            "function defined at the top level of an importable module (or a picklable object)"
        ) from None
    rebuild = getattr(decode, "rebuild", None) if decode is not None else None
    try:
        kind = pickle.dumps((batches, rebuild), pickle.HIGHEST_PROTOCOL)
    except BaseException as err:  # a deserializer object holding a client, a lambda
        raise ConfigError(
            f"a deserializer cannot be sent to worker processes ({type(err).__name__}: {safe_text(err)}): with "
            'RUNNER="processes" give "json", "str", a function defined at the top level of a module, or a '
            "picklable object"
        ) from None
    return pickle.dumps((blob, kind), pickle.HIGHEST_PROTOCOL)
