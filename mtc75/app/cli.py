"""What the three scripts share: setting flags, ``-X`` properties, logging, colors and exit codes.

Only scripts call into this module, from their main thread; the engine never prints or configures
logging. The log formatter runs on whichever thread logs (it keeps no state); ``StdoutLines`` on the
main thread, which in mtc75_consumer.py is also the poll thread (it calls ``run()`` itself).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from termcolor import colored

from mtc75.errors import BrokerUnreachable, ConfigError, Mtc75Error, TopicNotFound
from mtc75.settings import LIBRDKAFKA_LOGGER, SPECS, Settings, flag_name, load_settings, parse_properties

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "config.py"


def use_color(stream: object = sys.stdout) -> bool:
    """Colors only on a terminal, and never when NO_COLOR is set (https://no-color.org)."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and "NO_COLOR" not in os.environ


def paint(text: str, color: str | None, enabled: bool, bold: bool = False) -> str:
    if not enabled or color is None:
        return text
    return colored(text, color, attrs=["bold"] if bold else None)


_LEVEL_COLORS = {logging.WARNING: "yellow", logging.ERROR: "red", logging.CRITICAL: "red"}


# The engine marks its pause and resume records with ``extra={"mtc75_event": ...}``
# (mtc75.engine.backpressure.PAUSE_EVENT / RESUME_EVENT): colours follow that field, never the wording.
_EVENT_COLORS = {"pause": "red", "resume": "green"}


class _ColorFormatter(logging.Formatter):
    """Warnings yellow, errors red; the pause and resume lines stand out in bold red and green."""

    def __init__(self, color: bool) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(message)s", datefmt="%H:%M:%S")
        self._color = color

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        event = _EVENT_COLORS.get(getattr(record, "mtc75_event", ""))
        if event is not None:
            return paint(text, event, self._color, bold=True)
        return paint(text, _LEVEL_COLORS.get(record.levelno), self._color)


def setup_logging(verbose: int = 0, quiet: bool = False) -> None:
    """Log lines on stderr: -v debug (a failing handler's traceback included), -vv librdkafka's own log too."""
    level = logging.WARNING if quiet else logging.DEBUG if verbose >= 1 else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_ColorFormatter(use_color(sys.stderr)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    LIBRDKAFKA_LOGGER.setLevel(logging.DEBUG if verbose >= 2 else logging.CRITICAL)


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line and exit code 2, like every other bad input."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def base_parser(prog: str, description: str, epilog: str, settings: Sequence[str]) -> OneLineParser:
    """A parser with ``--config``, ``-X``, ``-v``/``-q`` and one ``--x-with-dashes`` flag per setting."""
    parser = OneLineParser(
        prog=prog, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    group = parser.add_argument_group("settings (override config.py and MTC75_* environment variables)")
    defaults = Settings()
    for name in settings:
        spec = SPECS[name]
        group.add_argument(
            flag_name(name), dest=name, metavar=name, default=None,
            help=f"{spec.help} (default {getattr(defaults, name)!r}; env MTC75_{name})",
        )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="settings file (default: %(default)s)")
    parser.add_argument(
        "-X", dest="properties", action="append", default=[], metavar="KEY=VALUE",
        help="librdkafka property, applied last; repeatable (e.g. -X fetch.wait.max.ms=50)",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="debug output, a failing handler's traceback included (-vv: also librdkafka's own log)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    return parser


def config_path(args: argparse.Namespace) -> Path | None:
    """The settings file in use: ``--config``, or the default config.py when it exists."""
    return args.config if args.config.exists() or args.config != DEFAULT_CONFIG else None


def resolve(
    args: argparse.Namespace, settings: Sequence[str], file_values: Mapping[str, Any] | None = None
) -> tuple[Settings, dict[str, str]]:
    """Settings and ``-X`` properties from parsed arguments (raises ConfigError).

    ``file_values``: the config file's values already read (live reload); None reads the file here.
    """
    flags = {name: getattr(args, name) for name in settings}
    settings_ = load_settings(config_path(args), flags=flags, file_values=file_values)
    return settings_, parse_properties(args.properties)


# Advice only a user of this repository's scripts can follow: the library's errors state facts only.
HINTS: dict[type[Mtc75Error], str] = {
    BrokerUnreachable: "start one with 'make broker' or set KAFKA_BOOTSTRAP_SERVERS",
    TopicNotFound: "create it with 'python create_topic.py'",
}


def error_line(prog: str, err: Mtc75Error) -> str:
    """``prog: error: <what happened>[; <what to do>]``."""
    hint = next((text for kind, text in HINTS.items() if isinstance(err, kind)), None)
    return f"{prog}: error: {err}" + (f"; {hint}" if hint else "")


class StdoutLines:
    """Lines on stdout that stop, quietly, when the reader goes away (``... | head -5``), as Unix tools do.

    The first write to a closed pipe points stdout at /dev/null (so nothing later, not even the
    interpreter's last flush, fails again) and logs one line on stderr; the run goes on. Main thread.
    """

    def __init__(self) -> None:
        self.closed = False

    def say(self, text: str) -> None:
        if self.closed:
            return
        try:
            print(text, flush=True)
        except (BrokenPipeError, ValueError):  # ValueError: sys.stdout itself was closed
            self.closed = True
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)
            except (OSError, ValueError):
                pass
            logging.getLogger("mtc75").warning("stdout closed: no more status lines (still running)")


def check_writable(path: Path, flag: str) -> None:
    """Fail at start, not after the run, when ``path`` cannot be written (raises ConfigError)."""
    if path.is_dir():
        raise ConfigError(f"{flag} {path}: is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ConfigError(f"{flag} {path}: directory {parent} does not exist")
    target = path if path.exists() else parent
    if not os.access(target, os.W_OK):
        raise ConfigError(f"{flag} {path}: not writable")


def run_main(main: Callable[[], int], prog: str) -> int:
    """Turn user-facing errors into one stderr line and their exit code; Ctrl-C into 130."""
    try:
        return main()
    except Mtc75Error as err:
        print(error_line(prog, err), file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
