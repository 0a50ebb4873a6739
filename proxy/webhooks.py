"""Event notifications: package events POSTed to configured URLs, signed, retried, never blocking.

Like CodeArtifact's package version state change events and Nexus webhooks: ``publish``,
``delete``, ``status``, ``copy`` and ``ingest`` (an artifact fetched from an upstream into the
cache) are taken from the audit trail as they are recorded, matched against each ``[[webhooks]]``
entry (events, domain, repository), and delivered by a background task: a JSON body, an
``X-Artifact-Proxy-Signature: sha256=<HMAC-SHA256 of the body>`` header when the entry names a
secret, retries with backoff (1 s, 2 s, 4 s, 8 s) on errors and 5xx. A request never waits for a
delivery; deliveries and failures are counted for the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import aiohttp

from proxy.config import WebhookConfig
from proxy.security.audit import AuditEvent

log = logging.getLogger("proxy.webhooks")

QUEUE_LIMIT = 10_000
ATTEMPTS = 5
_ACTIONS = {"publish": "publish", "delete": "delete", "status": "status", "copy": "copy", "fetch": "ingest"}


class WebhookDispatcher:
    """See the module docstring. Built in ``build_services``; started with the app."""

    def __init__(self, hooks: tuple[WebhookConfig, ...], env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self._hooks = [(hook, env.get(hook.secret_env or "", "").encode() or None) for hook in hooks]
        self._queue: asyncio.Queue[tuple[WebhookConfig, bytes | None, bytes, str]] = asyncio.Queue(
            QUEUE_LIMIT
        )
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self.delivered = 0
        self.failed = 0
        self.dropped = 0

    def observe(self, event: AuditEvent) -> None:
        """An audit event: queue a delivery for every hook that wants it (never blocks)."""
        kind = _ACTIONS.get(event.action)
        if (
            kind is None
            or (kind == "ingest" and event.result != "miss")
            or event.result not in {"ok", "miss"}
        ):
            return
        for hook, secret in self._hooks:
            if kind not in hook.events:
                continue
            if hook.domain is not None and hook.domain != event.domain:
                continue
            if hook.repository is not None and hook.repository != event.repository:
                continue
            body = json.dumps(_payload(kind, event), sort_keys=True).encode()
            try:
                self._queue.put_nowait((hook, secret, body, kind))
            except asyncio.QueueFull:
                self.dropped += 1
                log.error("webhook queue full: %s event for %s dropped", kind, hook.url)

    def start(self) -> None:
        if self._hooks and self._task is None:
            self._task = asyncio.create_task(self._run(), name="webhooks")

    async def aclose(self, grace: float = 5.0) -> None:
        """Deliver what is queued (for up to ``grace`` seconds), then stop."""
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), grace)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._session is not None:
            await self._session.close()

    async def _run(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10), trust_env=False)
        while True:
            hook, secret, body, kind = await self._queue.get()
            try:
                await self._deliver(hook, secret, body, kind)
            finally:
                self._queue.task_done()

    async def _deliver(self, hook: WebhookConfig, secret: bytes | None, body: bytes, kind: str) -> None:
        assert self._session is not None
        headers = {"Content-Type": "application/json", "X-Artifact-Proxy-Event": kind}
        if secret is not None:
            headers["X-Artifact-Proxy-Signature"] = (
                "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
            )
        for attempt in range(ATTEMPTS):
            if attempt:
                await asyncio.sleep(2.0 ** (attempt - 1))
            try:
                async with self._session.post(hook.url, data=body, headers=headers) as resp:
                    if resp.status < 500:
                        if resp.status >= 400:
                            break  # the receiver refuses it: retrying will not help
                        self.delivered += 1
                        return
                    reason = f"HTTP {resp.status}"
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                reason = type(exc).__name__
            log.warning(
                "webhook %s: %s event not delivered (%s), attempt %d", hook.url, kind, reason, attempt + 1
            )
        self.failed += 1
        log.error("webhook %s: gave up on a %s event", hook.url, kind)


def _payload(kind: str, event: AuditEvent) -> dict[str, Any]:
    return {
        "event": kind,
        "time": event.at,
        "domain": event.domain,
        "repository": event.repository,
        "format": event.format,
        "package": event.package,
        "version": event.version,
        "digest": event.digest,
        "principal": event.principal,
        "detail": dict(event.detail),
    }
