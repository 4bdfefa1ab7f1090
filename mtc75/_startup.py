"""Imported first by every top-level script: Ctrl-C while the script is still importing (about half a
second: confluent_kafka, rich, ...) ends it with one line and exit 130 instead of a traceback.

Only a script of this project run as ``__main__``, or one of its installed console scripts, gets the handler
(tests that import the scripts keep their own); the command replaces it with its own handler once it is ready.
Main thread only (import time).
"""

from __future__ import annotations

import _signal  # the C module: `signal` itself imports enum, a few ms more without a handler
import os
import sys
from types import FrameType

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONSOLE_SCRIPTS = ("mtc75-consumer", "mtc75-produce", "mtc75-create-topic")  # pyproject.toml [project.scripts]


def _interrupted(_signum: int, _frame: FrameType | None) -> None:
    os.write(2, f"{os.path.basename(sys.argv[0])}: interrupted\n".encode())
    os._exit(130)  # nothing has started yet: nothing to finish or commit


def _is_our_script() -> bool:
    if sys.argv and os.path.basename(sys.argv[0]) in _CONSOLE_SCRIPTS:
        return True
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    return bool(main_file) and os.path.dirname(os.path.abspath(str(main_file))) == _ROOT


if _is_our_script():
    _signal.signal(_signal.SIGINT, _interrupted)
