"""What the commands share: setting flags, ``-X`` properties, ``--help`` and ``--version``, logging, colors,
exit codes, and the :class:`Front` a command is reached through (the repository's scripts, the installed
console scripts, ``python -m mtc75``).

Only the commands (:mod:`mtc75.commands`) call into this module, from their main thread; the engine never
prints or configures logging. The log formatter runs on whichever thread logs (it keeps no state);
``StdoutLines`` on the main thread, which in the consumer is also the poll thread (it calls ``run()`` itself).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from termcolor import colored

from mtc75.errors import BrokerUnreachable, ConfigError, Mtc75Error, TopicNotFound
from mtc75.settings import (
    ENV_PREFIX,
    LIBRDKAFKA_LOGGER,
    SPECS,
    Settings,
    flag_name,
    load_settings,
    parse_properties,
    read_config_file,
)

CONFIG_ENV = "MTC75_CONFIG"  # the settings file, when --config does not name one
BOOTSTRAP_ENV = "KAFKA_BOOTSTRAP_SERVERS"


@dataclass(frozen=True)
class Front:
    """How a user reaches the commands, which the help, the examples and the advice in error lines follow.

    ``commands``: command name (``consumer``, ``produce``, ``create-topic``) -> (prog, how it is typed), e.g.
    ``("mtc75_consumer.py", "python mtc75_consumer.py")``; ``config``: the settings file read when neither
    ``--config`` nor ``MTC75_CONFIG`` names one (and it exists); ``broker_hint``: what to do when no broker answers.
    """

    commands: Mapping[str, tuple[str, str]]
    config: Path | None = None
    broker_hint: str = f"set {BOOTSTRAP_ENV} (or --bootstrap-servers) to a running broker"
    hints: Mapping[type[Mtc75Error], str] = field(default_factory=dict)

    def prog(self, command: str) -> str:
        return self.commands[command][0]

    def typed(self, command: str) -> str:
        return self.commands[command][1]

    def advice(self) -> dict[type[Mtc75Error], str]:
        """Advice for errors a user of this front can act on (the library's errors state facts only)."""
        return {BrokerUnreachable: self.broker_hint,
                TopicNotFound: f"create each with '{self.typed('create-topic')} --topic NAME'", **self.hints}


# The console scripts a `pip install` puts on PATH (pyproject.toml [project.scripts]).
INSTALLED = Front({name: (f"mtc75-{name}", f"mtc75-{name}") for name in ("consumer", "produce", "create-topic")})
# ``python -m mtc75 <command>`` (mtc75/__main__.py).
MODULE = Front({name: (f"python -m mtc75 {name}", f"python -m mtc75 {name}")
                for name in ("consumer", "produce", "create-topic")})


def scripts(folder: Path) -> Front:
    """The repository's scripts in ``folder``, beside its config.py and Makefile."""
    names = {"consumer": "mtc75_consumer.py", "produce": "producer.py", "create-topic": "create_topic.py"}
    return Front({name: (script, f"python {script}") for name, script in names.items()}, folder / "config.py",
                 f"start one with 'make broker' or set {BOOTSTRAP_ENV}",
                 {TopicNotFound: "create it with 'python create_topic.py' (--topic NAME for each of several)"})


ENVIRONMENT = f"""environment:
  {BOOTSTRAP_ENV}  where Kafka is (host:port,...); MTC75_BOOTSTRAP_SERVERS and --bootstrap-servers win
  MTC75_<SETTING>          any setting above, e.g. MTC75_MAX_THREAD_COUNT=8; its flag wins
  {CONFIG_ENV}             a settings file (Python, NAME = value), when --config is not given
  NO_COLOR                 no colours
"""
# Every exit code of mtc75.errors but the broker launcher's (4): tests/test_commands.py holds them together.
EXIT_CODES = """exit codes:
  0        done: Ctrl-C / SIGTERM (after finishing and committing), --max-messages, --idle-exit
  1        a runtime failure (e.g. records that were not delivered)
  2        a bad setting, flag, config file or handler
  3        Kafka unreachable, the topic missing (or deleted while consuming), no broker for BROKER_DOWN_TIMEOUT
  5        a message failed every attempt with ON_FAILURE=stop, or could not be dead-lettered
  6        a fatal Kafka error (e.g. this member was fenced): stopped at once
  130/143  a second Ctrl-C / SIGTERM: exited at once
"""


def version_line(prog: str) -> str:
    """``prog 0.1.0 (confluent-kafka 2.16.1, librdkafka 2.16.0)``."""
    import confluent_kafka

    from mtc75 import __version__

    return (f"{prog} {__version__} (confluent-kafka {confluent_kafka.__version__}, "
            f"librdkafka {confluent_kafka.libversion()[0]})")


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
    """Usage errors as one line and exit code 2, like every other bad input; ``--help`` shows effective defaults."""

    def __init__(self, *args: Any, front: Front = INSTALLED, settings: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.front = front
        self.settings = tuple(settings)  # the setting flags, whose help shows the effective default
        self._argv: list[str] = []

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        self._argv = list(sys.argv[1:] if args is None else args)  # the help reads --config from them
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def show_effective_defaults(self) -> None:
        """Each setting's help names the value this run would take without its flag, and where it comes from."""
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--config", type=Path)
        known, _ = pre.parse_known_args(self._argv)
        path = config_file(known.config, self.front)
        try:
            settings = load_settings(path)
            in_file = set(read_config_file(path)) if path is not None else set()
        except ConfigError as err:
            settings, in_file = Settings(), set()
            self.epilog = f"(built-in defaults shown: {err})\n\n{self.epilog or ''}"
        for action in self._actions:
            if action.dest in self.settings:
                name = action.dest
                source = _source(name, in_file, path)
                where = f" from {source}" if source else ""
                text = f"{SPECS[name].help} (default {getattr(settings, name)!r}{where}; env {ENV_PREFIX}{name})"
                action.help = text.replace("%", "%%")  # argparse %-formats help: a value may hold a '%'


def _source(name: str, in_file: set[str], path: Path | None) -> str:
    """Where a setting's effective default comes from ("" for the built-in one), as load_settings ranks them."""
    if ENV_PREFIX + name in os.environ:
        return ENV_PREFIX + name
    if name == "BOOTSTRAP_SERVERS" and os.environ.get(BOOTSTRAP_ENV):
        return BOOTSTRAP_ENV
    return path.name if path is not None and name in in_file else ""


class _Help(argparse.Action):
    """``-h`` / ``--help``: the help with the defaults this run would take (config file and environment read)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: Any = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any,
                 option_string: str | None = None) -> None:
        if isinstance(parser, OneLineParser):
            parser.show_effective_defaults()
        parser.print_help()
        parser.exit()


def base_parser(command: str, description: str, epilog: str, settings: Sequence[str],
                front: Front = INSTALLED) -> OneLineParser:
    """A parser with ``--config``, ``-X``, ``-v``/``-q``, ``--version`` and one ``--x-with-dashes`` flag per setting.

    ``epilog``: the command's examples, with ``{cmd}`` for how the command is typed through ``front``.
    """
    prog = front.prog(command)
    parser = OneLineParser(
        prog=prog, description=description, add_help=False,
        epilog=epilog.format(cmd=front.typed(command)) + "\n" + ENVIRONMENT + "\n" + EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter, front=front, settings=settings,
    )
    parser.add_argument("-h", "--help", action=_Help, help="show this help (defaults as this run would take them)")
    parser.add_argument("--version", action="version", version=version_line(prog))
    group = parser.add_argument_group(
        "settings (a flag wins over its MTC75_* environment variable, which wins over the config file)")
    defaults = Settings()
    for name in settings:
        spec = SPECS[name]
        # TOPIC: the flag may be repeated (each a name, comma-separated names, or a pattern)
        many = {"action": "append"} if spec.kind is tuple else {}
        group.add_argument(
            flag_name(name), dest=name, metavar=name, default=None,
            help=f"{spec.help} (default {getattr(defaults, name)!r}; env {ENV_PREFIX}{name})", **many,
        )
    default = f"${CONFIG_ENV}, else {front.config}" if front.config is not None else f"${CONFIG_ENV}, else none"
    parser.add_argument("--config", type=Path, default=None, metavar="PATH",
                        help=f"settings file (default: {default})")
    parser.set_defaults(front=front)
    parser.add_argument(
        "-X", dest="properties", action="append", default=[], metavar="KEY=VALUE",
        help="librdkafka property, applied last; repeatable (e.g. -X fetch.wait.max.ms=50)",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="debug output, a failing handler's traceback included (-vv: also librdkafka's own log)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    return parser


def config_file(flag: Path | None, front: Front) -> Path | None:
    """The settings file in use: ``--config``, else ``MTC75_CONFIG``, else the front's own when it exists."""
    if flag is not None:
        return flag
    named = os.environ.get(CONFIG_ENV)
    if named:
        return Path(named)
    return front.config if front.config is not None and front.config.exists() else None


def config_path(args: argparse.Namespace) -> Path | None:
    """The settings file of parsed arguments (see :func:`config_file`)."""
    return config_file(args.config, args.front)


def resolve(
    args: argparse.Namespace, settings: Sequence[str], file_values: Mapping[str, Any] | None = None
) -> tuple[Settings, dict[str, str]]:
    """Settings and ``-X`` properties from parsed arguments (raises ConfigError).

    ``file_values``: the config file's values already read (live reload); None reads the file here.
    """
    flags = {name: getattr(args, name) for name in settings}
    settings_ = load_settings(config_path(args), flags=flags, file_values=file_values)
    return settings_, parse_properties(args.properties)


# Advice only a user of this repository's scripts can follow (the library's errors state facts only).
HINTS: Mapping[type[Mtc75Error], str] = scripts(Path(".")).advice()


def error_line(prog: str, err: Mtc75Error, hints: Mapping[type[Mtc75Error], str] = HINTS) -> str:
    """``prog: error: <what happened>[; <what to do>]``."""
    hint = next((text for kind, text in hints.items() if isinstance(err, kind)), None)
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


def run_main(main: Callable[[], int], prog: str, hints: Mapping[type[Mtc75Error], str] = HINTS) -> int:
    """Turn user-facing errors into one stderr line and their exit code; Ctrl-C into 130."""
    try:
        return main()
    except Mtc75Error as err:
        print(error_line(prog, err, hints), file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
