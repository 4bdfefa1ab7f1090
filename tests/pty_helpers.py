"""Run a script on a pseudo-terminal, as a user's terminal would, and collect what it drew."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable

from tests.kafka_helpers import ROOT

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def strip_ansi(text: str) -> str:
    return ANSI.sub("", text)


def _plain(chunks: list[bytes]) -> str:
    return strip_ansi(b"".join(chunks).decode(errors="replace"))


def run_in_pty(
    script: str, *args: str, env: dict[str, str], timeout: float = 90, columns: int = 120, rows: int = 40,
    until: Callable[[str], bool] | None = None,
) -> tuple[int | None, str]:
    """(exit code, everything written to the terminal); the process is killed at ``timeout``.

    With ``until``, the run is also ended (SIGTERM, then kill) as soon as the plain output satisfies it.
    """
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    env = {k: v for k, v in env.items() if k != "NO_COLOR"} | {"TERM": "xterm-256color"}
    proc = subprocess.Popen([sys.executable, str(ROOT / script), *args], stdin=slave, stdout=slave, stderr=slave,
                            env=env, cwd=ROOT, close_fds=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
            if until is not None and proc.poll() is None and until(_plain(chunks)):
                proc.terminate()
                until = None
    finally:
        if proc.poll() is None:
            proc.kill()
        code = proc.wait(timeout=30)
        os.close(master)
    return code, b"".join(chunks).decode(errors="replace")
