"""Errors that end a command with one line on stderr and a defined exit code.

Scripts catch :class:`Mtc75Error` at the top of ``main()`` and print ``str(err)`` (plus, for some,
advice only a user of this repository can follow, added by :mod:`mtc75.app.cli`); library users catch
them like any exception. Anything else is a bug and may show a traceback. One error here is a single
message's, not a command's: :class:`DeserializationError` (the message fails; the consumer goes on).
"""

from __future__ import annotations


class Mtc75Error(Exception):
    """Base class: a user-facing failure with a one-line message."""

    exit_code = 1


class ConfigError(Mtc75Error):
    """A setting, flag, config file or handler is invalid."""

    exit_code = 2


class HandlerRefused(ConfigError):
    """The handler cannot be run as given (e.g. an async generator: ``async def`` with ``yield``)."""


class KafkaUnavailable(Mtc75Error):
    """The cluster cannot be reached, or the topic does not exist."""

    exit_code = 3


class BrokerUnreachable(KafkaUnavailable):
    """No broker answered the start-up metadata request in time."""


class TopicNotFound(KafkaUnavailable):
    """The topic to consume or produce does not exist on the cluster."""


class TopicGone(KafkaUnavailable):
    """The topic was deleted while the consumer ran and did not come back within the grace period."""


class OffsetOutOfRange(Mtc75Error):
    """With AUTO_OFFSET_RESET=error, a partition's position is out of range (records deleted or expired
    before they were handled) or the group has no committed offset for it: nothing says where to read."""

    exit_code = 1


class MessageFailed(Mtc75Error):
    """A message failed every attempt with ON_FAILURE=stop, or could not be dead-lettered."""

    exit_code = 5


class KafkaFatalError(Mtc75Error):
    """librdkafka reported a fatal error (e.g. a fenced static member): nothing after it is safe."""

    exit_code = 6


KafkaFatal = KafkaFatalError  # the name the engine and the hardening tests use; one type


class MisuseError(Mtc75Error, RuntimeError):
    """A call the consumer's state does not allow: ``run()`` twice or after ``close()``, ``close()`` from
    one of its own handlers (it would wait for itself), ``retune()`` after the run ended. Raised at once."""


class LauncherError(Mtc75Error):
    """A local launcher (the Kafka broker's, the schema registry's) could not fetch, build, start or stop its
    server: the tools' error, never the consumer's."""

    exit_code = 4


class BrokerError(LauncherError):
    """The local Kafka launcher could not fetch, start or stop the broker."""


class DeserializationError(Exception):
    """A message's key or value that its deserializer could not decode: a failure of that message alone.

    The handler is not called; the message goes to ON_FAILURE (``dlq``: the original bytes, this error's
    text in the ``mtc75.error`` header). Not retried unless ``retriable`` -- decoding the same bytes fails
    the same way every time, except when the deserializer could not reach its schema registry (an
    ``OSError``, an HTTP transport error, a registry answer 408, 429 or 5xx). ``__cause__`` is the
    deserializer's own exception.
    """

    def __init__(self, field: str, deserializer: str, cause: BaseException, *, retriable: bool = False) -> None:
        super().__init__(field, deserializer, cause)
        self.field = field  # "key" or "value"
        self.deserializer = deserializer  # a built-in's name ("json") or the callable's
        self.cause = cause
        self.retriable = retriable

    def __str__(self) -> str:
        # str(cause) is the deserializer's code and may raise: describe_error (runtime) guards the call.
        cause = self.cause
        return f"could not deserialize the {self.field} ({self.deserializer}): {type(cause).__name__}: {cause}"


class RegistryError(LauncherError):
    """The local schema-registry launcher (mtc75/tools/registry.py) could not build, start or stop it."""


class BatchError(Exception):
    """Raised by a batch handler to say which of its messages failed; the others are done.

    ``failures`` maps each failed message -- its index in the list the handler got, or the message itself --
    to its exception (a mapping, or pairs). The named messages are retried alone (then ON_FAILURE); a
    BatchError that names no message, or one that is not in the batch, fails the whole batch instead.
    Not an :class:`Mtc75Error`: user code raises it, MTC75 never does.
    """

    def __init__(self, failures: object, message: str = "") -> None:
        pairs = list(failures.items()) if hasattr(failures, "items") else list(failures)  # type: ignore[arg-type]
        super().__init__(message or f"{len(pairs)} messages of the batch failed")
        self.failures: list[tuple[object, BaseException]] = pairs
