"""Live re-tuning: saving config.py changes MAX_THREAD_COUNT, PAUSE_INTERVAL, the rate limits (MAX_RATE,
KEY_RATE, RATE_BURST) or PROCESSING_SLEEP at once.

A small daemon thread checks the file (inode, modification time, size) twice a second. A change is
read once the file has settled -- not written for ``SETTLE`` seconds, or unchanged since the last
check -- so an editor's truncate-then-write is not read half-way. The file runs in a child process
(:func:`read_isolated`), bounded in time and memory: whatever it does -- raise ``SystemExit`` or
``KeyboardInterrupt``, call ``os._exit``, loop for ever, allocate without end, change the working
directory or the signal handlers -- happens there, not in the consumer. Its values are merged
exactly as at start-up (defaults, config file, environment, flags: a value given by flag or
environment variable still wins), and the live-tunable ones that changed go to ``apply``.

A file that does not load -- a syntax error, a bad value, an exit, a timeout -- is one warning line
and the running values stay. A setting *removed* from the file keeps its running value (a file
briefly empty or cut short must not read as "every setting back to its default"); its default
applies at the next start, which the warning line says. Other changed settings are named once as
needing a restart.

Threads: the script's main thread starts and closes the watcher; reading and ``apply`` run on the
watcher's thread, so :func:`retuner` only calls what any thread may: ``Consumer.retune`` (the API takes
a lock) and one float assignment the workers read (``SimulatedWork.processing_sleep``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mtc75.api import Consumer
from mtc75.errors import ConfigError
from mtc75.runtime.handlers import SimulatedWork
from mtc75.settings import LIVE, MAX_CONFIG_BYTES, SPECS, Settings, config_values, describe_raise

logger = logging.getLogger(__name__)

LIVE_SETTINGS = (*LIVE, "PROCESSING_SLEEP")  # the engine's live settings, and the simulated work's
CHECK_INTERVAL = 0.5  # seconds between checks of the file
SETTLE = 0.2  # seconds without a write before a changed file is read (else: read at the next check)
LOAD_TIMEOUT = 10.0  # seconds the child process may take to run the file (Python's own start included)
LOAD_MEMORY = 2 << 30  # bytes of address space the child may use
MAX_RESULT_BYTES = 16 << 20  # the values a file may hand back (a string built in a loop stays out)

# Runs in the child (python -I -c): the parent's sys.path and argv, limits, then the file, exactly as
# runpy.run_path does at start-up. Values go back as JSON when they are plain data; the names of the
# others (a function in CONSUMER_CONFIG, a custom object) go back as "opaque". os._exit at the end: a
# thread or atexit hook the file left behind cannot keep the child alive.
_CHILD = r"""
import json, os, resource, runpy, sys
job = json.loads(sys.argv[1])
sys.path[:] = job["path"]
sys.argv[:] = job["argv"]
for limit, value in ((resource.RLIMIT_AS, job["memory"]), (resource.RLIMIT_CPU, job["cpu"])):
    try:
        resource.setrlimit(limit, (value, value))
    except (ValueError, OSError):
        pass

def plain(value, depth=0):
    kind = type(value)
    if value is None or kind in (bool, int, float, str):
        return True
    if depth > 32:
        return False
    if kind is list or kind is tuple:
        return all(plain(v, depth + 1) for v in value)
    if kind is dict:
        return all(type(k) is str and plain(v, depth + 1) for k, v in value.items())
    return False

def text(err):
    if isinstance(err, SystemExit):
        return "called sys.exit(%r)" % (err.code,)
    try:
        said = str(err)
    except BaseException:
        said = ""
    return "raised %s: %s" % (type(err).__name__, said) if said else "raised " + type(err).__name__

out = {}
try:
    namespace = runpy.run_path(job["file"])
    values, opaque = {}, []
    for name, value in namespace.items():
        if not name.isupper() or name.startswith("_"):
            continue
        try:
            if not plain(value):
                raise TypeError
            values[name] = json.loads(json.dumps(value))
        except BaseException:  # not plain data, or not representable (an int of 5,000 digits)
            opaque.append(name)
    out = {"values": values, "opaque": opaque}
except SyntaxError as err:
    out = {"syntax": [err.lineno, str(err.msg)]}
except BaseException as err:
    out = {"raised": text(err)}
try:
    with open(job["result"], "w") as result:
        json.dump(out, result)
except BaseException:
    os._exit(3)
os._exit(0)
"""


def read_isolated(
    path: Path, timeout: float = LOAD_TIMEOUT, stop: threading.Event | None = None
) -> tuple[dict[str, Any], set[str]]:
    """Run the settings file ``path`` in a child process: (its plain setting values, names of the others).

    Raises ConfigError, with one line, for anything that is not a clean run of a settings file:
    a syntax error, an exception or exit of any kind, an unknown name, no result within ``timeout``
    or before ``stop`` is set (the child and anything it started are killed then), or a child that
    died (out of memory, ``os._exit``, a signal).
    """
    with tempfile.TemporaryDirectory(prefix="mtc75-reload-") as folder:
        result = Path(folder) / "values.json"
        job = json.dumps({"file": str(path), "result": str(result), "path": sys.path, "argv": sys.argv,
                          "memory": LOAD_MEMORY, "cpu": int(timeout) + 1})
        try:
            child = subprocess.Popen(
                [sys.executable, "-I", "-c", _CHILD, job], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True,  # its own group: killed whole on a timeout
            )
        except OSError as err:
            raise ConfigError(f"no process to read {path.name} in: {err.strerror or err}") from None
        deadline = time.monotonic() + timeout
        code: int | None = None
        while code is None:
            try:
                code = child.wait(max(0.0, min(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                stopped = stop is not None and stop.is_set()
                if not stopped and time.monotonic() < deadline:
                    continue
                try:
                    os.killpg(child.pid, signal.SIGKILL)  # its group: what the file started goes too
                except OSError:
                    pass
                child.wait()
                if stopped:
                    raise ConfigError(f"{path.name} not read: the watcher is closing") from None
                raise ConfigError(f"{path.name} still running after {timeout:g}s (an endless loop?)") from None
        if code != 0 or not result.exists():
            how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
            raise ConfigError(f"{path.name} ended the process reading it ({how}: os._exit, or out of memory)")
        if result.stat().st_size > MAX_RESULT_BYTES:
            raise ConfigError(f"{path.name}: its values take more than {MAX_RESULT_BYTES} bytes")
        out = json.loads(result.read_text())
    if "syntax" in out:
        line, msg = out["syntax"]
        raise ConfigError(f"{path}:{line}: syntax error: {msg}")
    if "raised" in out:
        raise ConfigError(f"{path}: {out['raised']} while it was read")
    opaque = set(out["opaque"])
    config_values({**out["values"], **dict.fromkeys(opaque)}, path)  # unknown names: ConfigError
    return out["values"], opaque


def diff(old: Settings, new: Settings) -> tuple[dict[str, Any], list[str]]:
    """(live changes as ``{name: new value}``, names of other changed settings that need a restart)."""
    live = {n: getattr(new, n) for n in LIVE_SETTINGS if getattr(old, n) != getattr(new, n)}
    restart = [n for n in SPECS if n not in LIVE_SETTINGS and getattr(old, n) != getattr(new, n)]
    return live, restart


def retuner(consumer: Consumer, work: object) -> Callable[[dict[str, Any]], None]:
    """The ``apply`` for a running consumer: the engine's live settings to :meth:`Consumer.retune`, the
    sleep to the default handler."""

    def apply(changes: dict[str, Any]) -> None:
        consumer.retune(**{name.lower(): changes[name] for name in LIVE if name in changes})
        if "PROCESSING_SLEEP" in changes:
            if isinstance(work, SimulatedWork):
                work.processing_sleep = changes["PROCESSING_SLEEP"]
            else:
                logger.warning("PROCESSING_SLEEP applies only to the default handler, not to --handler")

    return apply


Stamp = tuple[int, int, int]  # (inode, mtime in ns, size): an atomic rename changes the inode


class ConfigWatcher:
    """Applies live-tunable changes of ``path`` while a consumer runs.

    ``load(file_values)`` builds the settings as the script did at start-up from the file's values
    (environment and flags on top); ``apply`` receives the changed live values (it runs on the watcher
    thread, so it must be thread-safe). :meth:`check` is the one step the thread repeats, public so
    tests can drive it without the thread; ``read`` (default :func:`read_isolated`, its child killed
    when the watcher closes) runs the file.
    """

    def __init__(
        self,
        path: Path,
        current: Settings,
        load: Callable[[Mapping[str, Any]], Settings],
        apply: Callable[[dict[str, Any]], None],
        interval: float = CHECK_INTERVAL,
        read: Callable[[Path], tuple[dict[str, Any], set[str]]] | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be > 0, got {interval}")
        self.path = path
        self.current = current
        self._load = load
        self._apply = apply
        self._interval = interval
        self._seen = self._loaded = self._read_stamp()  # the last stamp checked / the last one read
        self._stop = threading.Event()
        # the default reader's child is killed when the watcher closes (a file that loops ends with it)
        self._read = read if read is not None else lambda p: read_isolated(p, stop=self._stop)
        self._thread: threading.Thread | None = None
        self._warned: set[str] = set()  # "name=repr(value)" already named as needing a restart
        self._removed: set[str] = set()  # names already said to be no longer set in the file

    def _read_stamp(self) -> Stamp | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def check(self) -> bool:
        """Reload if the file changed and settled since the last read; True when live values were applied."""
        stamp = self._read_stamp()
        if stamp != self._seen:
            self._seen = stamp
            # Written just now: maybe still being written (truncate, then write). Read at the next check.
            if stamp is not None and time.time_ns() - stamp[1] < SETTLE * 1e9:
                return False
        if stamp == self._loaded:
            return False
        self._loaded = stamp
        name = self.path.name
        if stamp is None:
            logger.warning("%s is gone; keeping the running values", name)
            return False
        try:
            problem = self._problem()
            if problem is not None:
                raise ConfigError(f"{name}: {problem}")
            values, opaque = self._read(self.path)
            if self._read_stamp() != stamp:
                self._loaded = None  # written again while it ran: read it once it settles
                return False
            new, removed = self._settings(values, opaque)
        except ConfigError as err:
            if not self._stop.is_set():  # closing: the read was cut short on purpose
                logger.warning("%s not reloaded: %s; keeping the running values", name, err)
            return False
        live, restart = diff(self.current, new)
        self._removed &= set(removed)  # a name set again and removed again is said again
        removed = [n for n in removed if n not in self._removed]
        self._removed.update(removed)
        if removed:
            logger.warning("%s: %s no longer set; the running values stay until a restart (which takes the "
                           "default)", name, ", ".join(removed))
        pending = [f"{n}={getattr(new, n)!r}" for n in restart]
        if any(p not in self._warned for p in pending):
            fresh = [n for n, p in zip(restart, pending, strict=True) if p not in self._warned]
            self._warned.update(pending)
            logger.warning("%s: %s changed; restart to apply (live: %s)", name, ", ".join(fresh),
                           ", ".join(LIVE_SETTINGS))
        if not live:
            return False
        try:
            self._apply(live)
        except (ConfigError, ValueError, RuntimeError) as err:
            logger.warning("%s not applied: %s; keeping the running values", name, err)
            return False
        changes = ", ".join(f"{n} {getattr(self.current, n)!r} -> {v!r}" for n, v in live.items())
        self.current = self.current.replace(**live)
        logger.warning("%s reloaded: %s", name, changes)
        return True

    def _problem(self) -> str | None:
        """Why the file is not read at all: not a regular file (a FIFO would block), or too large."""
        try:
            st = os.stat(self.path)
        except OSError as err:
            return err.strerror or str(err)
        if not stat.S_ISREG(st.st_mode):
            return "not a regular file"
        if st.st_size > MAX_CONFIG_BYTES:
            return f"{st.st_size} bytes, more than a settings file may have ({MAX_CONFIG_BYTES})"
        return None

    def _settings(self, values: dict[str, Any], opaque: set[str]) -> tuple[Settings, list[str]]:
        """The settings to run with now, and the names removed from the file whose default would differ.

        Removed names keep their running values (see the module notes); so do names whose values could
        not cross the process boundary (a function in CONSUMER_CONFIG: never live, so never compared).
        """
        kept = {n: getattr(self.current, n) for n in SPECS if n not in values}
        new = self._load({**values, **kept})
        absent = [n for n in SPECS if n not in values and n not in opaque]
        if not absent:
            return new, []
        try:
            restart = self._load({**values, **{n: kept[n] for n in opaque}})
        except ConfigError:
            restart = Settings()
        removed = [n for n in absent if getattr(restart, n) != getattr(new, n)]
        return new, removed

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mtc75-reload", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.check()
            except BaseException as err:  # the watcher must never die nor take the consumer down
                logger.warning("%s: reload failed: %s; keeping the running values", self.path.name,
                               describe_raise(err))

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
