"""The HTTP endpoints of one consumer: ``/metrics`` (Prometheus), ``/healthz`` (liveness), ``/readyz``
(readiness); any other path is 404.

``/healthz`` and ``/readyz`` answer 200 or 503 with a small JSON body (``status``, ``reason``,
``last_poll_age``, ``assigned``) from :class:`mtc75.core.health.HealthWatch`, so a Kubernetes probe and a
person read the same thing.

Threads: the owning thread serves and closes; requests run on the server's threads (``mtc75-http`` and one
per request), which only read: the metrics registry (scrapes) and ``health()`` (a snapshot reference).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from mtc75.core.health import Health
from mtc75.errors import ConfigError

HEALTH_PATHS = ("/healthz", "/readyz")


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape in progress never holds the process at exit


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No access log on stderr: a probe every few seconds would drown the consumer's own lines."""


class Endpoints:
    """``/metrics``, ``/healthz`` and ``/readyz`` on one port (see the module notes)."""

    def __init__(self, registry: CollectorRegistry, health: Callable[[], Health]) -> None:
        self._metrics = make_wsgi_app(registry)
        self._health = health
        self._server: WSGIServer | None = None

    def app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        """The WSGI application (also usable inside a service's own WSGI server)."""
        path = environ.get("PATH_INFO") or "/"
        if path == "/metrics":
            result: Iterable[bytes] = self._metrics(environ, start_response)
            return result
        if path in HEALTH_PATHS:
            health = self._health()
            ok = health.alive if path == "/healthz" else health.ready
            body = json.dumps({
                "status": "ok" if ok else "unavailable", "reason": health.reason,
                "last_poll_age": None if health.last_poll_age is None else round(health.last_poll_age, 3),
                "assigned": health.assigned,
            }).encode()
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        body = b"not found: /metrics, /healthz or /readyz\n"
        start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Listen on a daemon thread; returns the bound port (useful with ``port=0``). ConfigError if it cannot."""
        try:
            server = make_server(addr, port, self.app, server_class=_Server, handler_class=_Quiet)
        except OSError as err:
            raise ConfigError(f"metrics_port {port}: cannot listen on {addr}:{port}: {err.strerror or err}") from None
        self._server = server
        threading.Thread(target=server.serve_forever, name="mtc75-http", daemon=True).start()
        return int(server.server_address[1])

    def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
