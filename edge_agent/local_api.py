"""The device service's local HTTP API: how apps on the device send inputs and get outputs.

::

    POST /v1/infer     body: an .npz, one array per model input (first axis = samples);
                       optional X-Splitinfer-Timeout: this request's deadline, seconds
                       200: an .npz of the outputs (Content-Type: application/x-npz)
                            X-Splitinfer-Timings: {"e2e": 4.1, "head": 0.3, …} (ms)
                            X-Splitinfer-Split-Id, -Request-Id, -Served-By, -Attempts
                            X-Splitinfer-Ignored: keys of the body that are not inputs
                            (comma-separated, each percent-encoded: label, %E3%83%A9)
    GET  /v1/split     the split served: id, model, inputs and outputs (name, dtype, shape)
    GET  /healthz      200 {"status": "ready", …} when requests can be answered, else 503
                       {"status": "connecting" | "disconnected" | "stopping", "reason": …}
    GET  /metrics      Prometheus text (:mod:`edge_agent.metrics`)

    curl -s --data-binary @in.npz -H 'Content-Type: application/x-npz' \\
         -o out.npz http://127.0.0.1:8470/v1/infer

Errors are JSON ``{"error": CODE, "message": …}`` naming what was wrong and what was
expected: 400 a body that is no readable .npz (``allow_pickle=False``: object arrays and
pickles are refused; each input's .npy header is checked against the bytes its member
holds before numpy allocates), lacks an input, or has the wrong dtype or shape; 411 no
``Content-Length``; 408 a body that has not arrived whole within 30 s; 413 a body (or its
arrays unpacked) over ``max_body``; 429 more than ``max_in_flight`` requests at once
(``Retry-After: 1``); 503 not connected to the broker (at boot until the first
connection, or while reconnecting: ``Retry-After``), no worker subscribed, or shutting
down; 504 no answer before the deadline; 502 the worker answered with an error.

The standard library's :class:`~http.server.ThreadingHTTPServer` serves it in threads (one
per connection; bodies are read and parsed there), and each inference hops onto the
service's event loop (:meth:`Backend.infer`). :meth:`LocalAPI.stop_accepting` closes the
listening socket; requests already read are answered, later ones on kept-alive
connections get 503 ``shutting_down``; :meth:`LocalAPI.wait_idle` waits for the ones in
flight.
"""

from __future__ import annotations

import io
import json
import logging
import lzma
import math
import socket
import threading
import time
import zipfile
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote

import numpy as np
import numpy.typing as npt

from splitinfer.errors import (
    BadInputError,
    DeadlineExceeded,
    ErrorCode,
    NoSubscriberError,
    RemoteError,
    SplitInferError,
    TransportError,
    WireError,
)

if TYPE_CHECKING:
    from edge_agent.client import InferenceResult
    from edge_agent.metrics import ServiceMetrics
    from splitinfer.manifest import Manifest

__all__ = ["LocalAPI", "Backend", "Unavailable", "TooLarge", "read_npz", "write_npz", "NPZ_TYPE"]

log = logging.getLogger(__name__)
Array = npt.NDArray[Any]
NPZ_TYPE = "application/x-npz"
TIMEOUT_HEADER = "X-Splitinfer-Timeout"  # a request's own deadline, seconds
MAX_TIMEOUT_S = 3600.0


class Unavailable(TransportError):
    """The service cannot answer now (connecting, reconnecting, stopping): 503."""

    def __init__(self, message: str, *, status: str, retry_after: float | None = 1.0) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class TooLarge(BadInputError):
    """A request body, or its arrays once unpacked, over ``max_body``: 413."""


class Backend(Protocol):
    """What the HTTP API asks of the service (:class:`edge_agent.serve.EdgeService`)."""

    @property
    def manifest(self) -> Manifest: ...

    @property
    def metrics(self) -> ServiceMetrics: ...

    def health(self) -> tuple[bool, dict[str, Any]]:
        """(ready, the JSON body of /healthz)."""
        ...

    def infer(self, arrays: dict[str, Array], timeout: float | None = None
              ) -> InferenceResult:
        """Blocking (called from an HTTP thread); ``timeout`` (s) overrides the configured
        deadline for this request; raises our errors, :class:`Unavailable`."""
        ...


# what zipfile and numpy raise for a damaged member: a bad deflate/bzip2/lzma stream, an
# unsupported compression method or encryption, a truncated array, a bad .npy header
_READ_ERRORS = (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError,
                NotImplementedError, RuntimeError, zlib.error, lzma.LZMAError)


def read_npz(body: bytes, names: list[str], max_bytes: int, *,
             content_type: str | None = None) -> tuple[dict[str, Array], list[str]]:
    """The model inputs ``names`` from an .npz body, and the other keys (ignored, not read).

    BadInputError naming what is wrong: not an .npz (a bare .npy, a pickle, garbage), a
    member that is no .npy array or is damaged, an object array, a missing input, inputs
    whose sample counts differ; :class:`TooLarge` for arrays that unpack past
    ``max_bytes`` (a zip bomb). Each input's .npy header is checked before numpy allocates
    anything: the shape and dtype it declares must fit the bytes the member holds, so a
    forged header cannot make numpy allocate gigabytes for a few bytes of body.
    ``content_type``, the request's, is named when the body is no .npz at all (a JSON or
    an image posted by mistake)."""
    expected = f"expected an .npz (numpy.savez) with one array per model input {names}"
    if body[:6] == b"\x93NUMPY":
        raise BadInputError(f"the body is a single .npy array; {expected}")
    try:
        archive = zipfile.ZipFile(io.BytesIO(body))
    except _READ_ERRORS as exc:
        sent = (f", sent as Content-Type {content_type}" if content_type and
                content_type.split(";")[0].strip().lower() != NPZ_TYPE else "")
        raise BadInputError(f"the body is not an .npz ({exc}{sent}); {expected}, sent as "
                            f"{NPZ_TYPE}") from None
    try:
        with archive:
            members = {(i.filename[:-4] if i.filename.endswith(".npy") else i.filename): i
                       for i in archive.infolist()}
            unpacked = sum(info.file_size for info in members.values())
            if unpacked > max_bytes:
                raise TooLarge(f"the .npz unpacks to {unpacked} bytes, over the {max_bytes} "
                               "byte limit (max_body); send fewer samples per request")
            missing = [n for n in names if n not in members]
            if missing:
                raise BadInputError(f"the .npz lacks input(s) {missing}: {expected}, got keys "
                                    f"{sorted(members)}")
            arrays = {n: _read_member(archive, members[n], n, expected) for n in names}
    except SplitInferError:
        raise
    except _READ_ERRORS as exc:  # a damaged or unreadable member, however zipfile says it
        raise BadInputError(f"the .npz cannot be read ({type(exc).__name__}: {exc}); "
                            f"{expected}") from None
    counts = {n: (a.shape[0] if a.ndim else 0) for n, a in arrays.items()}
    if len(set(counts.values())) != 1 or 0 in counts.values():
        raise BadInputError(f"every input needs the same, non-zero number of samples along "
                            f"the first axis, got {counts}")
    return arrays, sorted(set(members) - set(names))


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, name: str,
                 expected: str) -> Array:
    """One input's array, its header checked against the member's size before numpy
    allocates it (``allow_pickle=False``: no object arrays)."""
    fmt = np.lib.format
    with archive.open(info) as member:
        if member.read(len(fmt.MAGIC_PREFIX)) != fmt.MAGIC_PREFIX:
            raise BadInputError(f"input {name!r} ({info.filename}) is not a .npy array; "
                                f"{expected}")
        major, minor = member.read(2)
        if (major, minor) not in ((1, 0), (2, 0)):
            raise BadInputError(f"input {name!r}: .npy format version {major}.{minor} is "
                                "not read; expected 1.0 or 2.0 (numpy.savez of a plain array)")
        header = fmt.read_array_header_1_0 if major == 1 else fmt.read_array_header_2_0
        shape, _, dtype = header(member)
        if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
            raise BadInputError(f"input {name!r} has dtype {dtype}: {expected}, plain "
                                "numeric arrays, no object arrays or records")
        declared = math.prod(shape) * dtype.itemsize
        held = info.file_size - member.tell()
    if declared != held:
        raise BadInputError(f"input {name!r}: its .npy header declares shape {shape} "
                            f"{dtype} ({declared} bytes) but the member holds {held} bytes "
                            "of data; the .npz is damaged")
    with archive.open(info) as member:
        array: Array = fmt.read_array(member, allow_pickle=False)
    return array


def _timeout_header(text: str | None) -> float | None:
    """The request's own deadline from ``X-Splitinfer-Timeout`` (seconds), None if absent."""
    if text is None:
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds <= MAX_TIMEOUT_S:  # also refuses nan
        raise BadInputError(f"{TIMEOUT_HEADER} {text!r}: expected seconds, > 0 and <= "
                            f"{MAX_TIMEOUT_S:g}")
    return seconds


def _is_decimal(text: str) -> bool:
    """ASCII digits only: ``str.isdigit`` also takes '²', which ``int`` refuses."""
    return text.isascii() and text.isdigit()


def write_npz(arrays: dict[str, Array]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]  # numpy stubs match **kw to allow_pickle
    return buffer.getvalue()


def _status_of(exc: BaseException) -> tuple[int, str, str]:
    """HTTP status, error code, metrics outcome for an exception from the service."""
    if isinstance(exc, Unavailable):
        return 503, exc.status, "unavailable"
    if isinstance(exc, NoSubscriberError):
        return 503, "no_worker", "unavailable"
    if isinstance(exc, DeadlineExceeded):
        return 504, ErrorCode.DEADLINE_EXPIRED.value, "deadline"
    if isinstance(exc, RemoteError):
        return 502, str(getattr(exc, "code", "remote_error")), "remote_error"
    if isinstance(exc, WireError) and getattr(exc, "code", None) == ErrorCode.PAYLOAD_TOO_LARGE:
        return 413, ErrorCode.PAYLOAD_TOO_LARGE.value, "bad_input"
    if isinstance(exc, TooLarge):
        return 413, ErrorCode.PAYLOAD_TOO_LARGE.value, "bad_input"
    if isinstance(exc, BadInputError):
        return 400, "bad_input", "bad_input"
    if isinstance(exc, TransportError):
        return 503, "disconnected", "unavailable"
    return 500, ErrorCode.INTERNAL.value, "error"


def _server_class(host: str) -> type[ThreadingHTTPServer]:
    """ThreadingHTTPServer binds IPv4 only (``address_family`` is a class attribute): an
    IPv6 address such as ``[::1]:8470`` needs an AF_INET6 socket."""
    if ":" not in host:
        return ThreadingHTTPServer
    return type("ThreadingHTTPServer6", (ThreadingHTTPServer,),
                {"address_family": socket.AF_INET6})


class LocalAPI:
    """Serve :class:`Backend` on ``host:port`` (0: a free port) until :meth:`close`."""

    def __init__(self, backend: Backend, *, host: str = "127.0.0.1", port: int = 8470,
                 max_body: int = 16 * 1024 ** 2, max_in_flight: int = 16,
                 body_timeout_s: float = 30.0) -> None:
        self.backend = backend
        self.max_body = max_body
        self.body_timeout_s = body_timeout_s  # the whole body, not each read of it
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self.max_in_flight = max_in_flight
        self._idle = threading.Condition()
        self._in_flight = 0
        self.draining = False
        self._httpd = _server_class(host)((host, port), _handler(self))
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def start(self) -> LocalAPI:
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.1}, name="local-api",
                                        daemon=True)
        self._thread.start()
        return self

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop_accepting(self) -> None:
        """Close the listening socket: new connections are refused from now on; requests
        still arriving on open connections are answered 503 ``shutting_down``."""
        self.draining = True
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._httpd.shutdown()  # returns once serve_forever has stopped
        self._httpd.server_close()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no inference request is in flight; False when ``timeout`` ran out."""
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout)

    def close(self) -> None:
        self.stop_accepting()

    # ------------------------------------------------------------ request accounting

    def _begin(self) -> None:
        with self._idle:
            self._in_flight += 1
        self.backend.metrics.in_flight.inc()

    def _end(self) -> None:
        self.backend.metrics.in_flight.dec()
        with self._idle:
            self._in_flight -= 1
            self._idle.notify_all()


def _handler(api: LocalAPI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: a camera loop reuses its connection
        server_version = "splitinfer-edge"
        timeout = 30  # a client stalled mid-request (or idle on keep-alive) is dropped
        # TCP_NODELAY: headers and body are two writes; with Nagle the body waits for the
        # client's delayed ACK (measured: 48 ms a request on keep-alive, against 4 ms e2e)
        disable_nagle_algorithm = True

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                ready, body = api.backend.health()
                self._json(200 if ready else 503, body)
            elif path == "/metrics":
                text, content_type = api.backend.metrics.render()
                self._send(200, text, content_type)
            elif path == "/v1/split":
                self._json(200, _split_info(api.backend.manifest))
            elif path == "/v1/infer":
                self._error(405, "method_not_allowed", "POST an .npz to /v1/infer",
                            allow="POST")
            else:
                self._not_found()

        def do_POST(self) -> None:
            path = self.path.split("?", 1)[0]
            if path != "/v1/infer":
                self._drain_body()
                if path in ("/healthz", "/metrics", "/v1/split"):
                    self._error(405, "method_not_allowed", f"{path} answers GET", allow="GET")
                else:
                    self._not_found()
                return
            api._begin()
            try:
                self._infer()
            finally:
                api._end()

        def _infer(self) -> None:
            metrics = api.backend.metrics
            names = [s.name for s in api.backend.manifest.inputs]
            if self.headers.get("Transfer-Encoding", "").lower() not in ("", "identity"):
                self.close_connection = True
                metrics.observe("bad_input")
                self._error(411, "length_required", "send the .npz with a Content-Length "
                            "(chunked transfer encoding is not read)")
                return
            length_text = self.headers.get("Content-Length")
            if length_text is None or not _is_decimal(length_text.strip()):
                self.close_connection = True
                metrics.observe("bad_input")
                self._error(411, "length_required", f"Content-Length {length_text!r}: "
                            f"expected the byte length of an .npz with arrays {names}")
                return
            length = int(length_text)
            if length > api.max_body:
                # read what a client may still be sending (so it sees the 413, not a reset),
                # up to a bound; past it the connection is dropped after the answer
                self._discard(length)
                self.close_connection = True
                metrics.observe("bad_input")
                self._error(413, ErrorCode.PAYLOAD_TOO_LARGE.value, f"body of {length} bytes"
                            f" is over the {api.max_body} byte limit (max_body); send fewer "
                            "samples per request")
                return
            body = self._read_body(length)
            if body is None:
                self.close_connection = True
                metrics.observe("bad_input")
                self._error(408, "request_timeout", f"the body of {length} bytes did not "
                            f"arrive within {api.body_timeout_s:g} s; send it whole, at once")
                return
            if len(body) != length:
                self.close_connection = True
                metrics.observe("bad_input")
                self._error(400, "bad_input", f"body ended after {len(body)} of {length} "
                            "bytes")
                return
            if api.draining:
                self.close_connection = True
                metrics.observe("unavailable")
                self._error(503, "shutting_down", "the service is stopping", retry_after=1)
                return
            if not api._slots.acquire(blocking=False):
                metrics.observe("overloaded")
                self._error(429, ErrorCode.OVERLOADED.value, f"{api.max_in_flight} requests "
                            "in flight already (max_in_flight); retry shortly",
                            retry_after=1)
                return
            try:  # the slot is free again before the answer goes out
                timeout = _timeout_header(self.headers.get(TIMEOUT_HEADER))
                arrays, ignored = read_npz(body, names, api.max_body,
                                           content_type=self.headers.get("Content-Type"))
                result = api.backend.infer(arrays, timeout)
            except Exception as exc:  # every failure is one answer, never a dropped socket
                api._slots.release()
                status, code, outcome = _status_of(exc)
                metrics.observe(outcome)
                if status >= 500 and not isinstance(exc, SplitInferError):
                    log.exception("inference failed")
                    message = f"internal error ({type(exc).__name__}); see the service's log"
                else:
                    message = str(exc)
                # 503 and 429 are states, not events (an app polling at boot would write a
                # line per frame): counted in /metrics, logged at debug only
                log.log(logging.DEBUG if status in (429, 503) else logging.INFO,
                        "POST /v1/infer: %d %s: %s", status, code, message)
                retry = getattr(exc, "retry_after", 1.0 if status == 503 else None)
                self._error(status, code, message, retry_after=retry)
                return
            api._slots.release()
            metrics.observe("ok", result.timings)
            payload = write_npz(result.outputs)
            timings = {k: round(v * 1000.0, 3) for k, v in result.timings.items()}
            headers = {"X-Splitinfer-Timings": json.dumps(timings, separators=(",", ":")),
                       "X-Splitinfer-Split-Id": result.split_id,
                       "X-Splitinfer-Request-Id": result.request_id,
                       "X-Splitinfer-Served-By": result.served_by,
                       "X-Splitinfer-Attempts": str(result.attempts)}
            if result.fallback:
                headers["X-Splitinfer-Fallback"] = result.fallback
            if ignored:  # the body's own key names: percent-encoded, never raw in a header
                headers["X-Splitinfer-Ignored"] = ",".join(quote(k, safe="") for k in ignored)
            self._send(200, payload, NPZ_TYPE, headers)

        # -------------------------------------------------------------- replies

        def _read_body(self, length: int) -> bytes | None:
            """The body; None when it did not arrive whole within ``body_timeout_s``. The
            socket's own timeout is per read: a client trickling a byte every 29 s held a
            thread, and counted as in flight (stretching every SIGTERM drain), for ever."""
            deadline = time.monotonic() + api.body_timeout_s
            chunks: list[bytes] = []
            left = length
            try:
                while left > 0:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return None
                    self.connection.settimeout(remaining)
                    chunk = self.rfile.read1(min(left, 1 << 16))
                    if not chunk:
                        break
                    chunks.append(chunk)
                    left -= len(chunk)
            except TimeoutError:
                return None
            finally:
                self.connection.settimeout(self.timeout)
            return b"".join(chunks)

        def _discard(self, length: int) -> None:
            left = length if length <= max(4 * api.max_body, 1 << 20) else 0
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)

        def _drain_body(self) -> None:
            length = self.headers.get("Content-Length", "0")
            if _is_decimal(length) and int(length) <= api.max_body:
                self.rfile.read(int(length))
            else:
                self.close_connection = True

        def send_error(self, code: int, message: str | None = None,
                       explain: str | None = None) -> None:
            """What http.server answers by itself (an unknown method, a bad request line,
            headers too long): JSON like every other error, not its HTML page."""
            self.close_connection = True
            short = self.responses.get(code, ("error", ""))[0]
            text = message or short
            if explain:
                text = f"{text}: {explain}"
            if self.command not in (None, "", "HEAD"):
                text += "; expected POST /v1/infer, GET /v1/split, GET /healthz, GET /metrics"
            self._error(code, "".join(c if c.isalnum() else "_" for c in short.lower()), text)

        def _not_found(self) -> None:
            self._error(404, "not_found", f"no {self.path}; expected POST /v1/infer, "
                        "GET /v1/split, GET /healthz, GET /metrics")

        def _json(self, status: int, body: dict[str, Any],
                  headers: dict[str, str] | None = None) -> None:
            self._send(status, (json.dumps(body) + "\n").encode(), "application/json",
                       headers)

        def _error(self, status: int, code: str, message: str, *,
                   retry_after: float | None = None, allow: str | None = None) -> None:
            headers = {}
            if retry_after is not None:
                headers["Retry-After"] = str(max(1, round(retry_after)))
            if allow is not None:
                headers["Allow"] = allow
            self._json(status, {"error": code, "message": message}, headers)

        def _send(self, status: int, body: bytes, content_type: str,
                  headers: dict[str, str] | None = None) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                if api.draining or self.close_connection:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                if self.command != "HEAD":  # only send_error answers HEAD: headers only
                    self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError) as exc:
                log.info("%s %s: the client left before the answer (%s)", self.command,
                         self.path, exc)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s " + format, self.address_string(), *args)

    return Handler


def _split_info(manifest: Manifest) -> dict[str, Any]:
    def specs(items: Any) -> list[dict[str, Any]]:
        return [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in items]

    return {"split_id": manifest.split_id, "model": manifest.model, "kind": manifest.kind,
            "inputs": specs(manifest.inputs), "outputs": specs(manifest.outputs)}
