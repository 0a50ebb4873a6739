"""``--log-format json``: one JSON object per line; access lines carry their fields."""

from __future__ import annotations

import io
import json
import logging

from proxy.observability import JsonFormatter


def test_json_log_lines_carry_the_access_fields() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("test.json.access")
    logger.addHandler(handler)
    logger.propagate = False
    fields = {
        "method": "GET",
        "path": "/x",
        "status": 200,
        "cache": "HIT",
        "bytes": 5,
        "ms": 1.5,
        "request_id": "r1",
    }
    logger.warning("%s %s", "GET", "/x", extra=fields)
    logger.warning("plain message")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "GET /x" and first["level"] == "WARNING" and first["time"].endswith("Z")
    assert {k: first[k] for k in fields} == fields
    assert second["message"] == "plain message" and "status" not in second
