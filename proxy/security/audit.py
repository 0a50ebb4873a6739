"""The audit trail: who did what, from where, with what result; append-only and tamper-evident.

Every publish, delete, status change, copy, policy change, token issue and revocation,
authentication failure and authorization denial is recorded, and artifact fetches as configured
(``server.audit_fetches``: all, misses, none). A record names the principal and token id (never
the token), the client address, the action, what it touched and the result. Each record carries
the SHA-256 of the one before it, chained inside the write transaction (BEGIN IMMEDIATE), so the
proxy and the CLI can both append and ``audit verify`` detects an edited or removed record;
SQLite triggers refuse UPDATE and DELETE on the table.

Recording never blocks a request: events go to a queue and a writer task appends them in
batches. A write that fails is logged as an error and reported by ``/-/readyz``; the events are
kept and retried, not dropped silently.

Who is acting travels in a context variable set by the auth middleware: it reaches the publisher
and the package service without every signature carrying the request. (It is per-task context,
not shared mutable state.)
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from proxy.storage.index import Index

log = logging.getLogger("proxy.audit")

GENESIS = "0" * 64
BATCH = 200


@dataclass(frozen=True, slots=True)
class Actor:
    """Who is acting: a token's principal and id, or a local operator."""

    principal: str
    token_id: str = ""
    client: str = ""


SYSTEM = Actor("system", "", "local")
ACTOR: contextvars.ContextVar[Actor | None] = contextvars.ContextVar("actor", default=None)


@dataclass(frozen=True, slots=True)
class AuditEvent:
    at: float
    principal: str
    token_id: str
    client: str
    action: str
    domain: str = ""
    repository: str = ""
    format: str = ""
    package: str = ""
    version: str = ""
    digest: str = ""
    result: str = "ok"
    detail: Mapping[str, Any] = field(default_factory=dict)

    def canonical(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"), default=str).encode()


def chain_hash(prev: str, event: AuditEvent) -> str:
    return hashlib.sha256(prev.encode() + b"\n" + event.canonical()).hexdigest()


class AuditLog:
    """See the module docstring. One per process, built in ``build_services``."""

    def __init__(self, index: Index, *, fetches: str = "misses", file: Path | None = None) -> None:
        self._index = index
        self.fetches = fetches
        self._file = file
        self._queue: list[AuditEvent] = []
        self._wakeup = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self.failing: str | None = None  # the last write error, for /-/readyz
        self._listeners: list[Callable[[AuditEvent], None]] = []
        self._flushing = asyncio.Lock()  # one appender at a time: the writer task, a query, shutdown

    def subscribe(self, listener: Callable[[AuditEvent], None]) -> None:
        """Be told of every event as it is recorded (webhooks); listeners must not block."""
        self._listeners.append(listener)

    def record(self, action: str, *, result: str = "ok", **fields: Any) -> None:
        """Queue one event for the current actor (never blocks, never raises)."""
        event = self._event(action, result, fields)
        self._queue.append(event)
        self._wakeup.set()
        self._tell(event)

    def _tell(self, event: AuditEvent) -> None:
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                log.exception("audit listener failed")

    def _event(self, action: str, result: str, fields: dict[str, Any]) -> AuditEvent:
        actor = ACTOR.get() or SYSTEM
        detail = fields.pop("detail", None) or {}
        return AuditEvent(
            at=time.time(),
            principal=actor.principal,
            token_id=actor.token_id,
            client=actor.client,
            action=action,
            result=result,
            detail=detail,
            **{k: "" if v is None else str(v) for k, v in fields.items()},
        )

    def fetch(self, status: str, **fields: Any) -> None:
        """An artifact fetch, recorded as ``server.audit_fetches`` says (listeners hear misses)."""
        if self.fetches == "all" or (self.fetches == "misses" and status != "HIT"):
            self.record("fetch", result=status.lower(), **fields)
        elif status != "HIT" and self._listeners:
            self._tell(self._event("fetch", status.lower(), fields))

    def start(self) -> None:
        if self._writer is None:
            self._writer = asyncio.create_task(self._run(), name="audit writer")

    async def aclose(self) -> None:
        await self.flush()
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None

    async def flush(self) -> None:
        """Write everything queued so far (the CLI and shutdown call it; tests too)."""
        async with self._flushing:
            while self._queue:
                batch = self._queue[:BATCH]
                await self._append(batch)
                del self._queue[: len(batch)]

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            try:
                await self.flush()
                self.failing = None
            except Exception as exc:  # noqa: BLE001 - reported, retried, never silent
                self.failing = f"audit writes are failing: {exc}"
                log.error("%s (%d events waiting; retrying)", self.failing, len(self._queue))
                await asyncio.sleep(1.0)
                self._wakeup.set()

    async def _append(self, events: list[AuditEvent]) -> None:
        lines = []
        async with self._index.transaction(shared=False):  # no worker caches audit records
            db = self._index.db
            async with db.execute("SELECT hash FROM audit ORDER BY seq DESC LIMIT 1") as cur:
                row = await cur.fetchone()
            prev = str(row[0]) if row else GENESIS
            for event in events:
                digest = chain_hash(prev, event)
                await db.execute(
                    "INSERT INTO audit (at, principal, token_id, client, action, domain, repository, "
                    "format, package, version, digest, result, detail, prev_hash, hash) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        event.at,
                        event.principal,
                        event.token_id,
                        event.client,
                        event.action,
                        event.domain,
                        event.repository,
                        event.format,
                        event.package,
                        event.version,
                        event.digest,
                        event.result,
                        json.dumps(dict(event.detail), sort_keys=True, default=str),
                        prev,
                        digest,
                    ),
                )
                lines.append(json.dumps({**asdict(event), "prev_hash": prev, "hash": digest}, default=str))
                prev = digest
        if self._file is not None:
            await asyncio.to_thread(_append_lines, self._file, lines)

    async def query(
        self,
        *,
        since: float | None = None,
        principal: str | None = None,
        action: str | None = None,
        package: str | None = None,
        domain: str | None = None,
        limit: int = 1000,
    ) -> list[dict[str, Any]]:
        await self.flush()
        where: list[str] = []
        args: list[object] = []
        for column, value in (
            ("principal", principal),
            ("action", action),
            ("package", package),
            ("domain", domain),
        ):
            if value is not None:
                where.append(f"{column}=?")
                args.append(value)
        if since is not None:
            where.append("at>=?")
            args.append(since)
        sql = f"SELECT {_FIELDS} FROM audit"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq LIMIT ?"
        async with self._index.db.execute(sql, (*args, limit)) as cur:
            rows = await cur.fetchall()
        return [_row(tuple(r)) for r in rows]

    async def verify(self) -> tuple[bool, int, str]:
        """(intact, records checked, what is wrong): walks the chain from the first record."""
        await self.flush()
        prev, count = GENESIS, 0
        async with self._index.db.execute(f"SELECT {_FIELDS} FROM audit ORDER BY seq") as cur:
            async for raw in cur:
                row = _row(tuple(raw))
                event = AuditEvent(**{k: row[k] for k in _EVENT_KEYS})
                if row["prev_hash"] != prev:
                    return False, count, f"record {row['seq']}: the previous record is missing or changed"
                if chain_hash(prev, event) != row["hash"]:
                    return False, count, f"record {row['seq']}: its content does not match its hash"
                prev, count = row["hash"], count + 1
        return True, count, ""


_EVENT_KEYS = tuple(AuditEvent.__dataclass_fields__)
_FIELDS = "seq, " + ", ".join(_EVENT_KEYS) + ", prev_hash, hash"


def _row(raw: tuple[Any, ...]) -> dict[str, Any]:
    names = ["seq", *_EVENT_KEYS, "prev_hash", "hash"]
    row = dict(zip(names, raw, strict=True))
    row["detail"] = json.loads(row["detail"] or "{}")
    return row


def _append_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as out:
        out.write("".join(line + "\n" for line in lines))
