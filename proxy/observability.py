"""Logging and the access log: one line per request with status, cache result, bytes, duration."""

from __future__ import annotations

import atexit
import collections
import copy
import json
import logging
import sys
import threading
import time
from typing import TextIO

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from proxy.errors import REQUEST_ID

ACCESS_FIELDS = ("method", "path", "status", "cache", "bytes", "ms", "request_id")


class JsonFormatter(logging.Formatter):
    """One JSON object per line (``--log-format json``); access lines carry their fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ACCESS_FIELDS:
            if key in record.__dict__:
                doc[key] = record.__dict__[key]
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:  # formatted before it was queued (setup_logging)
            doc["exception"] = record.exc_text
        return json.dumps(doc, separators=(",", ":"))


LOG_QUEUE_LINES = 10_000  # lines waiting for the writer thread before new ones are dropped
LOG_FLUSH_SECONDS = 0.05  # how often the writer thread writes what came (warnings: at once)
_TRACEBACKS = logging.Formatter()


class _BackgroundWriter(logging.Handler):
    """Queues records and writes them from a thread, many lines per ``write``.

    The thread wakes every ``LOG_FLUSH_SECONDS`` (or at once for a warning or worse), so a request
    pays for its record and an ``append``, not for a lock hand-off, a thread switch and a
    system call. If the thread falls ``LOG_QUEUE_LINES`` lines behind, lines are dropped and
    the next write says how many.
    """

    def __init__(self, stream: TextIO, formatter: logging.Formatter) -> None:
        super().__init__()
        self.setFormatter(formatter)
        self._stream = stream
        self._pending: collections.deque[logging.LogRecord] = collections.deque()
        self._wake = threading.Event()
        self._closed = False
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="log writer", daemon=True)
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        if len(self._pending) >= LOG_QUEUE_LINES:
            self.dropped += 1
            return
        # The arguments are merged now (they may change after the call) and a traceback turned
        # into text; time stamp, layout and JSON are the writer thread's work.
        record = copy.copy(record)
        record.msg = record.getMessage()
        record.args = None
        if record.exc_info:
            record.exc_text = _TRACEBACKS.formatException(record.exc_info)
            record.exc_info = None
        self._pending.append(record)
        if record.levelno >= logging.WARNING:
            self._wake.set()

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(LOG_FLUSH_SECONDS)
            self._wake.clear()
            self._write_pending()

    def _write_pending(self) -> None:
        lines: list[str] = []
        while self._pending:
            record = self._pending.popleft()
            try:
                lines.append(self.format(record))
            except Exception:  # noqa: BLE001 - a bad record must not stop the writer
                self.handleError(record)
        if self.dropped:
            dropped, self.dropped = self.dropped, 0
            lines.append(f"{dropped} log line(s) dropped: stderr was not keeping up")
        if lines:
            try:
                self._stream.write("\n".join(lines) + "\n")
                self._stream.flush()
            except (OSError, ValueError):
                pass  # stderr is gone; nothing else can be told

    def flush(self) -> None:
        """Write what is queued now (from the calling thread)."""
        self._write_pending()

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)
        self._write_pending()
        super().close()


class OutageOneLiner(logging.Filter):
    """A reconnect that failed, as one line (``…: ConnectionRefusedError: …``), not a traceback.

    asyncpg's pool logs every failed attempt to restore its connections with the traceback
    attached (again after 1, 2, 4 … 60 s while the cluster's database is down). That outage is
    an expected one: readiness and the 503s say so, and a traceback in the log is how this
    proxy marks a bug. The exception's type and message stay (they name no password: the
    driver's messages quote the host and port at most); any other record passes unchanged.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and (
            isinstance(error, OSError | TimeoutError) or type(error).__module__.startswith("asyncpg")
        ):
            record.msg = f"{record.getMessage()}: {type(error).__name__}: {error}"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


# Loggers of libraries that report an unreachable service with a traceback (see OutageOneLiner).
ONE_LINE_OUTAGES = ("asyncpg.pool",)


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Single-line logs on stderr, plain or JSON: what container runtimes collect.

    Written by a thread (``_BackgroundWriter``): an access line per request written from the
    event loop cost about 30 µs of a 65 µs page hit, and a stderr that stops draining (a stuck
    log collector) would have stopped every request with it. What is queued is written at exit
    (not after a SIGKILL: at most the last ``LOG_FLUSH_SECONDS``).
    """
    if fmt == "json":
        formatter: logging.Formatter = JsonFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    root = logging.getLogger()
    for old in root.handlers:
        if isinstance(old, _BackgroundWriter):
            old.close()
    handler = _BackgroundWriter(sys.stderr, formatter)
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ONE_LINE_OUTAGES:
        library = logging.getLogger(name)
        if not any(isinstance(f, OutageOneLiner) for f in library.filters):
            library.addFilter(OutageOneLiner())
    atexit.register(handler.close)


class AccessLogger(AbstractAccessLogger):
    """``METHOD path status cache=X bytes=N ms=T id=R`` — never a header, so never a secret."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        fields = {
            "method": request.method,
            "path": request.path,
            "status": response.status,
            "cache": response.headers.get("X-Cache", "-"),
            "bytes": response.body_length,
            "ms": round(time * 1000, 1),
            "request_id": request.get(REQUEST_ID, "-"),
        }
        self.logger.info(
            "%s %s %d cache=%s bytes=%d ms=%.1f id=%s",
            *fields.values(),
            extra=fields,
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)
