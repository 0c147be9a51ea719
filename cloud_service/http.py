"""The worker's HTTP endpoint: ``/metrics``, ``/healthz``, ``/readyz``.

``/metrics`` is prometheus-client's text exposition of one worker's own registry
(:attr:`cloud_service.metrics.Metrics.registry`), ``/healthz`` answers 200 while the
process is alive, ``/readyz`` 200 only while ``ready()`` says so (the server,
:meth:`cloud_service.server.Server.readiness`: subscribed on a live connection and every
split directory served, a hot reload in progress included), else 503; ``ready()`` may
return a bool or ``(bool, text)``, the text (the reasons, the stale splits) being the
body. Everything else is 404. Served by the standard
library's threading HTTP server in a daemon thread, bound to 127.0.0.1 unless told.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

__all__ = ["MetricsHTTP"]


class MetricsHTTP:
    """Serve ``registry`` and the health probes on ``host:port`` (0 = a free port)."""

    def __init__(self, registry: CollectorRegistry,
                 ready: Callable[[], bool | tuple[bool, str]], *,
                 host: str = "127.0.0.1", port: int = 0) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 10  # a client that stalls mid-request loses its connection

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._reply(200, generate_latest(outer.registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._reply(200, b"ok\n")
                elif path == "/readyz":
                    ok, text = outer.readiness()
                    self._reply(200 if ok else 503, text.encode())
                else:
                    self._reply(404, b"not found: /metrics, /healthz, /readyz\n")

            def _reply(self, status: int, body: bytes,
                       content_type: str = "text/plain; charset=utf-8") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # scrapes every few seconds must not fill the worker's log

        self.registry = registry
        self._ready = ready
        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    def is_ready(self) -> bool:
        return self.readiness()[0]

    def readiness(self) -> tuple[bool, str]:
        """(ready, body of /readyz)."""
        try:
            got = self._ready()
        except Exception as exc:
            return False, f"not ready\nreadiness check failed: {exc!r}\n"
        if isinstance(got, tuple):
            ok, text = bool(got[0]), str(got[1])
            return ok, text if text.endswith("\n") else text + "\n"
        return bool(got), "ready\n" if got else "not ready\n"

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    def start(self) -> MetricsHTTP:
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        name="metrics-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(5)
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> MetricsHTTP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
