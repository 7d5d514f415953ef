"""A local HTTP file server for download tests, with controls to make requests fail.

The server listens on 127.0.0.1 only, on a port the OS chooses, and serves the
files under one directory. It supports ``Range: bytes=N-`` and ``bytes=N-M``
(206 Partial Content, or 416 when N is at or past the end of the file). A test
can make it respond with 500 for a path, or cut a response off after N body
bytes while the headers still carry the full Content-Length.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

logger = logging.getLogger(__name__)

_BYTE_RANGE = re.compile(r"bytes=(\d+)-(\d*)")
_CHUNK_SIZE = 64 * 1024


class FileServer:
    """An HTTP server for the files under ``root``, with request log and failure controls.

    Paths in every attribute are relative to ``root``, without a leading slash,
    for example ``"cifar-10-python.tar.gz"`` or ``"mirror/stl10_binary.tar.gz"``.

    Attributes:
        url: base URL ending in "/", such as ``http://127.0.0.1:41234/``.
        root: the served directory.
        requests: one ``(path, range_header)`` per request received, in arrival
            order; ``range_header`` is the Range header's value, or None.
        fail_after_bytes: path -> N. A GET for that path sends the full headers
            and then only N body bytes before the server closes the connection.
        fail_times: path -> how many of the next GETs ``fail_after_bytes`` cuts
            off. A path missing here is cut off on every GET.
        error_paths: paths that get a 500 Internal Server Error response.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.requests: list[tuple[str, str | None]] = []
        self.fail_after_bytes: dict[str, int] = {}
        self.fail_times: dict[str, int] = {}
        self.error_paths: set[str] = set()
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def start(self) -> None:
        """Bind to 127.0.0.1 on a free port and serve from a background thread."""
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), _FileRequestHandler)
        httpd.daemon_threads = True
        httpd.file_server = self  # type: ignore[attr-defined]
        self._httpd = httpd
        host, port = httpd.server_address[:2]
        self.url = f"http://{host}:{port}/"

        # A short poll interval keeps stop(), and so each test's teardown, fast.
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="test-http-server", daemon=True
        )
        self._thread.start()
        logger.debug("test HTTP server started at %s serving %s", self.url, self.root)

    def stop(self) -> None:
        """Stop serving, close the listening socket and wait for the server thread."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._httpd = None
        self._thread = None
        logger.debug("test HTTP server at %s stopped", self.url)

    def __enter__(self) -> FileServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def request_count(self, path: str) -> int:
        """Count the requests received for ``path``."""
        with self._lock:
            return sum(1 for requested, _ in self.requests if requested == path)

    def _record(self, path: str, range_header: str | None) -> None:
        with self._lock:
            self.requests.append((path, range_header))

    def _take_truncation(self, path: str) -> int | None:
        """Return the byte count to cut this response off at, or None to send it whole."""
        with self._lock:
            if path not in self.fail_after_bytes:
                return None
            remaining = self.fail_times.get(path)
            if remaining is not None:
                if remaining <= 0:
                    return None
                self.fail_times[path] = remaining - 1
            return self.fail_after_bytes[path]

    def _resolve(self, path: str) -> Path | None:
        """Map a request path to a file under ``root``, or None if there is no such file."""
        root = self.root.resolve()
        candidate = (root / path).resolve()
        if not candidate.is_relative_to(root) or not candidate.is_file():
            return None
        return candidate


class _FileRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Seconds an idle keep-alive connection stays open, so no handler thread outlives a test for long.
    timeout = 5

    def do_GET(self) -> None:  # noqa: N802 (name fixed by BaseHTTPRequestHandler)
        self._respond(send_body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._respond(send_body=False)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (signature of the base class)
        logger.debug("%s %s", self.address_string(), format % args)

    def _respond(self, send_body: bool) -> None:
        server: FileServer = self.server.file_server  # type: ignore[attr-defined]
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        range_header = self.headers.get("Range")
        server._record(path, range_header)

        if path in server.error_paths:
            self.send_error(HTTPStatus.INTERNAL_SERVER_ERROR, "Error requested by the test")
            return
        file_path = server._resolve(path)
        if file_path is None:
            self.send_error(HTTPStatus.NOT_FOUND, f"File not found: {path}")
            return

        size = file_path.stat().st_size
        start, end = 0, size - 1
        status = HTTPStatus.OK
        byte_range = _parse_byte_range(range_header)
        if byte_range is not None:
            start, last = byte_range
            if start >= size:
                self._send_range_not_satisfiable(size)
                return
            end = size - 1 if last is None else min(last, size - 1)
            status = HTTPStatus.PARTIAL_CONTENT
        length = end - start + 1

        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        if status == HTTPStatus.PARTIAL_CONTENT:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if send_body:
            self._send_body(server, path, file_path, start, length)

    def _send_body(self, server: FileServer, path: str, file_path: Path, start: int, length: int) -> None:
        cutoff = server._take_truncation(path)
        to_send = length if cutoff is None else min(cutoff, length)

        with open(file_path, "rb") as file:
            file.seek(start)
            remaining = to_send
            while remaining > 0:
                chunk = file.read(min(_CHUNK_SIZE, remaining))
                if not chunk:
                    break
                self.wfile.write(chunk)
                remaining -= len(chunk)

        if to_send < length:
            # Close the connection so the client sees end of stream before Content-Length bytes.
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            logger.debug("cut off %s after %d of %d bytes", path, to_send, length)

    def _send_range_not_satisfiable(self, size: int) -> None:
        self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
        self.send_header("Content-Range", f"bytes */{size}")
        self.send_header("Content-Length", "0")
        self.end_headers()


def _parse_byte_range(header: str | None) -> tuple[int, int | None] | None:
    """Parse ``bytes=N-`` or ``bytes=N-M`` into (N, M or None).

    Any other form, including suffix ranges and several ranges, returns None, and
    the server then ignores the header and sends the whole file, which RFC 9110
    allows.
    """
    if header is None:
        return None
    match = _BYTE_RANGE.fullmatch(header.strip())
    if match is None:
        return None
    first = int(match.group(1))
    last = int(match.group(2)) if match.group(2) else None
    if last is not None and last < first:
        return None
    return first, last
