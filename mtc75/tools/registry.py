"""Run a local schema registry with a Confluent-compatible API for the deserializer tests and examples.

Apicurio Registry (in-memory storage), built once with Maven from ``registry/`` (the pom says why it is
built and not only fetched) into ``<repo>/.registry/app``; each run gets its own folder for its log::

    .registry/app/                the built registry (runner jar + lib/), shared by all ports
    <home>/registry.log           the JVM's output of the current (or last) run

It listens on ``127.0.0.1:<port>``; confluent-kafka's ``SchemaRegistryClient`` takes :attr:`LocalRegistry.url`
(``http://127.0.0.1:<port>/apis/ccompat/v7``). The process belongs to the :class:`LocalRegistry` that started
it: :meth:`LocalRegistry.stop` (or the end of ``run``) ends it, nothing outlives the launcher.

Which thread may call: any, one call at a time per object; concurrent builds in other processes are
serialised by a lock file.

Usage: ``python -m mtc75.tools.registry {fetch,run} [--port N]`` (``make registry``: fetch, then run until Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType

from mtc75.errors import RegistryError
from mtc75.tools.broker import _locked, _maven_reason, _run

__all__ = ["DEFAULT_PORT", "LocalRegistry", "main"]

DEFAULT_PORT = 8081  # the Confluent Schema Registry's
API = "/apis/ccompat/v7"

_log = logging.getLogger(__name__)
_HOST = "127.0.0.1"
_REPO_ROOT = Path(__file__).resolve().parents[2]
_SOURCE = _REPO_ROOT / "registry"  # pom.xml and the little Java and config it adds
_HOME = _REPO_ROOT / ".registry"
_RUNNER = "mtc75-local-registry-1-runner.jar"
_MARKER = ".source.sha256"  # written into app/ last: its presence means "complete"
_JVM_OPTS = ("-Xms64m", "-Xmx512m", "-XX:ParallelGCThreads=1")
_POLL = 0.25


class LocalRegistry:
    """One registry process on ``127.0.0.1:port``, its log in ``home``."""

    def __init__(self, port: int = DEFAULT_PORT, home: Path | None = None) -> None:
        self.port = port
        self.home = home if home is not None else _HOME / str(port)
        self._app = _HOME / "app"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The Confluent-compatible API, as ``SchemaRegistryClient({"url": ...})`` takes it."""
        return f"http://{_HOST}:{self.port}{API}"

    @property
    def log_path(self) -> Path:
        return self.home / "registry.log"

    def fetch(self) -> None:
        """Build the registry with Maven unless ``.registry/app`` matches ``registry/`` (a few minutes the
        first time: about 130 MB of jars). Built into a temporary folder renamed into place when complete."""
        digest = _source_digest()
        if self._built(digest):
            return
        mvn = shutil.which("mvn")
        if mvn is None:
            raise RegistryError("Maven (mvn) is not on PATH but is needed once to build the schema registry;"
                                " install it (e.g. apt-get install maven) and retry")
        _HOME.mkdir(parents=True, exist_ok=True)
        with _locked(_HOME / ".fetch.lock"):
            if self._built(digest):  # another launcher built it meanwhile
                return
            _log.info("building the schema registry into %s (first run only)", self._app)
            tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=_HOME))
            try:
                res = _run([mvn, "-q", "-B", "-Dstyle.color=never", "-f", str(_SOURCE / "pom.xml"), "package",
                            "-DskipTests", f"-Dregistry.build.dir={tmp}"])
                if res.returncode != 0 or not (tmp / _RUNNER).exists():
                    raise RegistryError(f"Maven could not build the schema registry: {_maven_reason(res.stdout)}"
                                        f"; check access to Maven Central and {_SOURCE}")
                app = Path(tempfile.mkdtemp(prefix=".app-", dir=_HOME))
                (tmp / _RUNNER).rename(app / _RUNNER)
                (tmp / "lib").rename(app / "lib")
                (app / _MARKER).write_text(digest + "\n")
                if self._app.exists():
                    old = Path(tempfile.mkdtemp(prefix=".app-old-", dir=_HOME))
                    self._app.rename(old / "app")
                    shutil.rmtree(old, ignore_errors=True)
                app.rename(self._app)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

    def start(self, timeout: float = 120.0) -> None:
        """Build if needed, start, and wait until the API answers; a registry that does not come up is killed."""
        if self._proc is not None and self._proc.poll() is None:
            return
        self.fetch()
        java = shutil.which("java")
        if java is None:
            raise RegistryError("java is not on PATH; install a JDK 17+ and retry")
        self.home.mkdir(parents=True, exist_ok=True)
        cmd = [java, *_JVM_OPTS, f"-Dquarkus.http.port={self.port}", f"-Dquarkus.http.host={_HOST}",
               "-jar", str(self._app / _RUNNER)]
        _log.info("starting the schema registry on %s (log: %s)", self.url, self.log_path)
        with open(self.log_path, "wb") as log:
            # Own session: Ctrl-C in the launching terminal reaches the launcher, which stops it.
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                          cwd=self.home, start_new_session=True)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop(timeout=0)
            raise

    def stop(self, timeout: float = 20.0) -> bool:
        """SIGTERM, then SIGKILL after ``timeout``. False if it was not running."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return False
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        return True

    def answers(self) -> bool:
        """Whether the Confluent-compatible API answers (``GET /subjects``)."""
        try:
            with urllib.request.urlopen(f"{self.url}/subjects", timeout=2) as response:
                return response.status == 200  # type: ignore[no-any-return]
        except (OSError, urllib.error.URLError):
            return False

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.answers():
            proc = self._proc
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                raise RegistryError(f"the schema registry on port {self.port} exited during startup (exit code"
                                    f" {code}); see {self.log_path}: {_last_line(self.log_path)}")
            if time.monotonic() >= deadline:
                raise RegistryError(f"the schema registry on port {self.port} was not ready within {timeout:g}s;"
                                    f" see {self.log_path}")
            time.sleep(_POLL)

    def _built(self, digest: str) -> bool:
        try:
            return (self._app / _MARKER).read_text().strip() == digest and (self._app / _RUNNER).exists()
        except OSError:
            return False


def _source_digest() -> str:
    """sha256 over ``registry/``'s files (pom, Java, properties), so an edit rebuilds."""
    digest = hashlib.sha256()
    try:
        for path in sorted(p for p in _SOURCE.rglob("*") if p.is_file() and "target" not in p.parts):
            digest.update(str(path.relative_to(_SOURCE)).encode() + b"\0" + path.read_bytes())
    except OSError as exc:
        raise RegistryError(f"cannot read {_SOURCE} ({exc.strerror}); restore it") from None
    return digest.hexdigest()


def _last_line(path: Path) -> str:
    with contextlib.suppress(OSError):
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
        if lines:
            return lines[-1][:300]
    return "(empty)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtc75.tools.registry", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("fetch", "run"), help="fetch: build only; run: build, start, "
                        "and stop on Ctrl-C")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="HTTP port (default %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    registry = LocalRegistry(args.port)
    try:
        if args.command == "fetch":
            registry.fetch()
            print(f"the schema registry is built in {registry._app}")
            return 0
        registry.start()
        print(f"schema registry at {registry.url} (Ctrl-C stops it)", flush=True)

        def _stop(_sig: int, _frame: FrameType | None) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, _stop)
        with contextlib.suppress(KeyboardInterrupt):
            while registry._proc is not None and registry._proc.poll() is None:
                time.sleep(0.5)
        return 0
    except RegistryError as err:
        print(f"registry: {err}", file=sys.stderr)
        return err.exit_code
    finally:
        registry.stop()


if __name__ == "__main__":
    sys.exit(main())
