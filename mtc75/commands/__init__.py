"""The commands: ``mtc75-consumer``, ``mtc75-produce`` and ``mtc75-create-topic`` once installed, ``python -m
mtc75 <command>``, and the repository's scripts (mtc75_consumer.py, producer.py, create_topic.py), all fronts
over the same ``main`` of :mod:`mtc75.commands.consumer`, :mod:`~mtc75.commands.produce` and
:mod:`~mtc75.commands.create_topic`. The console-script entry points live here and import their command only
when called, so a missing optional dependency is one line, not a traceback. Main thread only.
"""

from __future__ import annotations

import importlib
import sys

# command -> its module under mtc75.commands
COMMANDS = {"consumer": "consumer", "produce": "produce", "create-topic": "create_topic"}
# Top-level modules of the ``cli`` extra (pyproject.toml): without them the commands cannot run.
CLI_EXTRA = ("termcolor", "rich", "faker", "prometheus_client", "psutil", "matplotlib")


def missing_extra(err: ModuleNotFoundError) -> str | None:
    """The module of the ``cli`` extra that ``err`` says is missing (None: another module, a real bug)."""
    name = (err.name or "").split(".")[0]
    return name if name in CLI_EXTRA else None


def run(command: str, argv: list[str] | None = None, via: str = "installed") -> int:
    """Run ``command`` (a key of COMMANDS) reached ``via`` the installed console scripts or ``"module"``
    (``python -m mtc75``)."""
    prog = f"mtc75-{command}" if via == "installed" else f"python -m mtc75 {command}"
    try:
        module = importlib.import_module(f"mtc75.commands.{COMMANDS[command]}")
        from mtc75.app.cli import INSTALLED, MODULE

        code: int = module.main(argv, front=INSTALLED if via == "installed" else MODULE)
    except ModuleNotFoundError as err:  # at import, or a view imported on demand (--report: matplotlib)
        missing = missing_extra(err)
        if missing is None:
            raise
        print(f"{prog}: error: needs {missing}, part of the cli extra: pip install 'mtc75[cli]'", file=sys.stderr)
        return 2
    return code


def mtc75_consumer() -> int:
    """``mtc75-consumer``."""
    return run("consumer")


def mtc75_produce() -> int:
    """``mtc75-produce``."""
    return run("produce")


def mtc75_create_topic() -> int:
    """``mtc75-create-topic``."""
    return run("create-topic")
