"""Logging and the access log: one line per request with status, cache result, bytes, duration."""

from __future__ import annotations

import json
import logging
import sys
import time

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
        return json.dumps(doc, separators=(",", ":"))


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Single-line logs on stderr, plain or JSON: what container runtimes collect."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        formatter: logging.Formatter = JsonFormatter()
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


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
