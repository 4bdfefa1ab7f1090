"""Message handlers: the ``Handler`` type, the seed's simulated work, loading ``package.module:function``.

Thread contract: ``load_handler`` and ``prepare_handler`` run on the thread that builds the consumer
(before any worker exists). A handler itself -- ``SimulatedWork`` included, whose log limiter has its
own lock -- is called by the runner's workers, many at once. ``describe_error``, ``is_async_handler``,
``handler_name`` and ``awaitable_result_error`` are pure and may be called from any thread.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from mtc75.errors import ConfigError, HandlerRefused
from mtc75.runtime.procworker import UnpicklableError

logger = logging.getLogger(__name__)

Handler = Callable[[Any], object]  # the one definition: called with a confluent_kafka.Message


class NotRunError(TypeError):
    """The handler returned without doing the work (it returned an awaitable nobody awaits)."""


def describe_error(err: BaseException) -> str:
    """``"Type: text"`` of a handler's exception, built so that it never raises itself.

    A handler's exception class is user code: its ``__str__`` may raise, or return something that is
    not a string. The failure must still be reported and retried, not kill the worker.
    """
    # an error of a worker process that could not cross as itself keeps its own type's name
    name = err.type_name if isinstance(err, UnpicklableError) else type(err).__name__
    try:
        text = str(err)
    except BaseException as inner:  # whatever __str__ raises, the failure is still reported
        text = f"<str() failed: {type(inner).__name__}>"
    return f"{name}: {text}" if text else name


class MalformedMessage(ValueError):
    """A payload the default handler cannot work on; retried, then dead-lettered like any failure."""


class SimulatedWork:
    """The seed's handler: sleep ``processing_sleep`` seconds per message, as I/O-bound work would.

    Payloads that are empty, not JSON or over ``max_payload_bytes`` raise :class:`MalformedMessage`
    before any work, so they take the retry / dead-letter path instead of passing silently.
    Each message gets a log line while the lines stay readable (at most ``lines_per_second``); past
    that, the consumer's status line is the only output, so a fast run is not slowed by printing.
    """

    def __init__(
        self, processing_sleep: float, lines_per_second: float = 20.0, max_payload_bytes: int = 100_000
    ) -> None:
        if processing_sleep < 0:
            raise ValueError(f"processing_sleep must be >= 0, got {processing_sleep}")
        if max_payload_bytes < 1:
            raise ValueError(f"max_payload_bytes must be >= 1, got {max_payload_bytes}")
        self.processing_sleep = processing_sleep
        self.max_payload_bytes = max_payload_bytes
        self._min_gap = 1.0 / lines_per_second if lines_per_second > 0 else float("inf")
        self._lock = threading.Lock()
        self._next_line_at = 0.0

    def __getstate__(self) -> dict[str, Any]:
        """Picklable for RUNNER="processes" (each worker process gets its own copy and its own log limiter)."""
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __call__(self, message: Any) -> None:
        # The fetched bytes, also under --value-format (a DecodedMessage keeps them in ``original``).
        payload = getattr(message, "original", message).value()
        check_payload(payload, self.max_payload_bytes)
        if self.processing_sleep:
            time.sleep(self.processing_sleep)
        if logger.isEnabledFor(logging.INFO) and self._may_log():
            logger.info(
                "%s handled %s[%d]@%d %s",
                threading.current_thread().name, message.topic(), message.partition(),
                message.offset(), _describe(payload),
            )

    def _may_log(self) -> bool:
        now = time.monotonic()
        with self._lock:
            if now < self._next_line_at:
                return False
            self._next_line_at = now + self._min_gap
            return True


def check_payload(value: bytes | None, max_bytes: int) -> None:
    """Raise MalformedMessage for an empty, oversized or non-JSON payload."""
    if not value:
        raise MalformedMessage("empty payload")
    if len(value) > max_bytes:
        raise MalformedMessage(f"payload of {len(value)} bytes exceeds MAX_PAYLOAD_BYTES={max_bytes}")
    try:
        json.loads(value)
    except ValueError as err:  # UnicodeDecodeError is a ValueError too
        raise MalformedMessage(f"payload is not JSON ({err})") from None


def _describe(value: bytes | None) -> str:
    """A short, never-failing description of a payload (malformed payloads are described, not raised)."""
    if not value:
        return "(empty)"
    try:
        record = json.loads(value)
    except ValueError:
        return f"({len(value)} bytes, not JSON)"
    if isinstance(record, dict):
        return f"id={record.get('id')} name={record.get('name')!r}"
    return f"({type(record).__name__})"


def load_handler(spec: str) -> Handler:
    """Import ``package.module:function``; any failure is one ConfigError line naming the spec."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"invalid handler {spec!r}: expected package.module:function")
    try:
        module = importlib.import_module(module_name)
    except SystemExit as err:  # sys.exit() at import: a silent exit 0 would look like success
        raise ConfigError(f"handler module {module_name!r} called sys.exit({err.code!r}) while importing") from None
    except Exception as err:
        raise ConfigError(f"cannot import handler module {module_name!r}: {type(err).__name__}: {err}") from None
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigError(f"handler {spec!r}: {module_name} has no attribute {attr!r}") from None
    if not callable(target):
        raise ConfigError(f"handler {spec!r} is not callable")
    return prepare_handler(target, spec)


def prepare_handler(handler: Handler, name: str | None = None) -> Handler:
    """``handler`` checked before any message is fetched; refuses what no runner can run.

    A plain function runs on worker threads; an ``async def`` one (a callable object whose
    ``__call__`` is one, a ``functools.partial`` of one) is awaited on the event loop
    (:func:`is_async_handler`; the engine picks the runner). An async generator is refused: calling it
    returns no awaitable, so nothing would ever run. A handler that hides its coroutine (a plain
    function returning one) is caught at run time by the thread runner, a failure (:func:`result_error`).
    """
    if not callable(handler):
        raise ConfigError(f"handler {name!r} is not callable" if name else
                          f"handler must be callable, got {type(handler).__name__}")
    if _call_kind(handler) == "asyncgen":
        raise HandlerRefused(
            f"handler {name or _name(handler)} is an async generator (async def with yield): it returns no "
            "awaitable, so its work would never run; make it a plain async def"
        )
    return handler


def awaitable_result_error(result: object) -> str | None:
    """Why a handler's return value means the work did not run (an awaitable nobody awaits), else None.

    A returned coroutine is closed, so Python does not warn about it later.
    """
    if not inspect.isawaitable(result):
        return None
    close = getattr(result, "close", None)
    if callable(close):
        with contextlib.suppress(Exception):  # closing is a courtesy; the failure is reported either way
            close()
    return (
        f"handler returned {type(result).__name__} (an awaitable) from a plain function, and nothing awaits it; "
        "make the handler itself async def to have it awaited"
    )


def result_error(result: object) -> NotRunError | None:
    """The failure a handler's non-None return value stands for (a returned awaitable), else None."""
    refused = awaitable_result_error(result)
    return None if refused is None else NotRunError(refused)


def is_async_handler(handler: object) -> bool:
    """True for a handler to run on the event loop: an ``async def`` function or method, an object
    whose ``__call__`` is ``async def``, or a ``functools.partial`` of either (nested too).

    A plain function that returns an awaitable is not one: nothing can tell before calling it, so it
    stays a plain handler, and its returned awaitable is a failure (:func:`awaitable_result_error`).
    An ``async def`` with ``yield`` (an async generator) is neither: :func:`prepare_handler` refuses it.
    """
    return _call_kind(handler) == "coroutine"


def _call_kind(handler: object) -> str:
    """``"coroutine"``, ``"asyncgen"`` or ``"sync"``: what calling ``handler`` returns, by its definition."""
    target = handler
    while isinstance(target, functools.partial):
        target = target.func
    if not (inspect.isfunction(target) or inspect.ismethod(target)):
        call = getattr(type(target), "__call__", None)  # noqa: B004 - the class's, as a call uses it
        if call is not None:
            target = call
    if inspect.iscoroutinefunction(target):
        return "coroutine"
    if inspect.isasyncgenfunction(target):
        return "asyncgen"
    return "sync"


def handler_name(handler: object) -> str:
    """A readable name for logs: ``module.qualname`` of the function behind partials and objects."""
    target = handler
    while isinstance(target, functools.partial):
        target = target.func
    module = getattr(target, "__module__", None) or type(target).__module__
    qualname = getattr(target, "__qualname__", None) or type(target).__qualname__
    return f"{module}.{qualname}" if module and module != "builtins" else qualname


def _name(handler: object) -> str:
    return getattr(handler, "__qualname__", None) or type(handler).__name__
