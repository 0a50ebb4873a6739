"""Logging and the access log: one line per request with status, cache result, bytes, duration."""

from __future__ import annotations

import logging
import sys

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from proxy.errors import REQUEST_ID


def setup_logging(level: str = "INFO") -> None:
    """Plain single-line logs on stderr: what container runtimes collect."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class AccessLogger(AbstractAccessLogger):
    """``METHOD path status cache=X bytes=N ms=T id=R`` — never a header, so never a secret."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            "%s %s %d cache=%s bytes=%d ms=%.1f id=%s",
            request.method,
            request.path,
            response.status,
            response.headers.get("X-Cache", "-"),
            response.body_length,
            time * 1000,
            request.get(REQUEST_ID, "-"),
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)
