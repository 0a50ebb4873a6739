"""Upstream credentials: held by the proxy, injected into upstream requests, renewed ahead.

Build agents hold no upstream secret: each external connection may have one provider, behind
one interface (``current()`` and ``invalidate()``):

- ``basic`` / ``bearer``: a secret from an environment variable or a file (the file is re-read
  when it changes, for mounted Kubernetes secrets); never inline in the TOML.
- ``command``: a command that prints ``{"token": …, "expiration": ISO-8601}`` (the
  credential-process pattern), so any vault or script can supply short-lived tokens.
- ``codeartifact``: CodeArtifact's ``GetAuthorizationToken``, signed with SigV4 (sigv4.py).

Expiring tokens are renewed ahead of expiry (when 75% of the lifetime has passed or 5 minutes
before it ends, whichever is earlier; the margin is capped at a quarter of the lifetime, so a
token living two minutes is not renewed continuously), one refresh at a time however many
requests wait. While a refresh fails and the old token is still valid, the old one is used and
the refresh retried with backoff. After a 401/403 from the upstream the client invalidates,
refreshes once and retries once. ``status()`` tells expiry, last refresh and last error, never
the secret.

Renewed once for all (:class:`SharedCredentials`). Every process sharing the index — the
workers of ``serve --workers N`` on one SQLite file, every node of a cluster on PostgreSQL —
would otherwise renew each token itself. Instead, a process due to renew takes the lease
``credential:<upstream>`` (storage/leases.py), asks the token service, and stores the token in
``shared_credentials`` sealed with the server's encryption key (AES-GCM under a key derived for
this use, the upstream's name and the expiry bound in); the others, due at the same moment,
wait for that row and use it while it is fresh by the same renewal rule. A 401 makes a process
accept only a row renewed after the token that was refused. The lease is held only while
fetching (renewed meanwhile); a holder that dies frees it within ``CREDENTIAL_LEASE_TTL``.
Without an encryption key nothing is shared (a token in the clear in the index would break
invariant 15, and no key is derived from anything else): each process renews for itself, as a
lone process does, and the proxy says so once at startup. Trouble with the index while sharing
is logged and the process renews for itself.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import json
import logging
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlencode, urlsplit

import aiohttp

from proxy.config import CredentialsConfig, UpstreamConfig
from proxy.errors import UpstreamUnavailable
from proxy.storage.leases import LeaseBusy, Leases, node_id
from proxy.upstream.discovery import (
    NPM_REGISTRY,
    PIP_INDEX_URL,
    DiscoveryError,
    npm_registry_url,
    pip_index_url,
)
from proxy.upstream.sigv4 import load_credentials, sign

if TYPE_CHECKING:
    from proxy.storage.crypto import Sealer
    from proxy.storage.index import Index

log = logging.getLogger("proxy.credentials")

REFRESH_RATIO = 0.75
REFRESH_MARGIN = 300.0
MAX_BACKOFF = 60.0
FILE_CHECK_SECONDS = 1.0
COMMAND_TIMEOUT = 60.0
CREDENTIAL_LEASE_TTL = 60.0  # a renewer that died blocks the others' renewal at most this long
SHARED_POLL = 0.1  # seconds between looks at the shared row while another process renews
SEAL_INFO = b"artifact-proxy shared upstream credential v1"


@dataclass(frozen=True, slots=True)
class Credential:
    """An ``Authorization`` header value and when it stops working (None: never)."""

    authorization: str
    expires_at: float | None = None
    issued_at: float = 0.0

    def __repr__(self) -> str:
        return f"Credential(expires_at={self.expires_at})"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class CredentialProvider(ABC):
    """See the module docstring."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream

    @abstractmethod
    async def current(self) -> Credential:
        """The credential to send now; UpstreamUnavailable naming the problem if there is none."""

    @abstractmethod
    def invalidate(self) -> None:
        """The upstream refused the current credential: get a new one before the next request."""

    def status(self) -> dict[str, Any]:
        return {}

    async def aclose(self) -> None:
        return None


class StaticSecret(CredentialProvider):
    """``basic`` or ``bearer`` from an environment variable or a file (re-read on change)."""

    def __init__(self, upstream: str, config: CredentialsConfig, env: Mapping[str, str]) -> None:
        super().__init__(upstream)
        self._config = config
        self._env = env
        self._cached: tuple[float, Credential] | None = None  # (file mtime, credential)
        self._checked = 0.0

    async def current(self) -> Credential:
        secret_file = self._config.secret_file
        if self._config.secret_from_url is not None:
            if self._cached is None:
                secret = await asyncio.to_thread(
                    self._password_in_discovered_url, self._config.secret_from_url
                )
                self._cached = (0.0, self._credential(secret))
            return self._cached[1]
        if secret_file is None:
            if self._cached is None:
                self._cached = (0.0, self._credential(self._env.get(self._config.secret_env or "", "")))
            return self._cached[1]
        now = time.monotonic()
        if self._cached is not None and now - self._checked < FILE_CHECK_SECONDS:
            return self._cached[1]
        self._checked = now
        try:
            mtime = await asyncio.to_thread(lambda: secret_file.stat().st_mtime)
            if self._cached is None or self._cached[0] != mtime:
                text = await asyncio.to_thread(secret_file.read_text, encoding="utf-8")
                self._cached = (mtime, self._credential(text.strip()))
        except OSError as exc:
            if self._cached is None:
                raise UpstreamUnavailable(
                    f"credentials for upstream {self.upstream}: cannot read {secret_file}: {exc.strerror}",
                    detail={"upstream": self.upstream},
                ) from exc
        assert self._cached is not None
        return self._cached[1]

    def invalidate(self) -> None:
        self._checked = 0.0  # look at the file again at once
        if self._config.secret_from_url is not None:
            self._cached = None  # and at pip's setup: its login may have written a new token

    def _password_in_discovered_url(self, key: str) -> str:
        """The password of the URL pip's (or npm's) setup names, read again (files: in a thread)."""
        discover = {PIP_INDEX_URL: pip_index_url, NPM_REGISTRY: npm_registry_url}[key]
        try:
            return unquote(urlsplit(discover(self._env)).password or "")
        except DiscoveryError:
            return ""

    def _credential(self, secret: str) -> Credential:
        if not secret:
            raise UpstreamUnavailable(
                f"credentials for upstream {self.upstream}: the secret is empty or not set",
                detail={"upstream": self.upstream},
            )
        if self._config.type == "bearer":
            return Credential(f"Bearer {secret}")
        return Credential(basic(self._config.username, secret))


class Renewing(CredentialProvider):
    """A token that expires, renewed ahead of time by ``fetch`` (see the module docstring)."""

    def __init__(
        self,
        upstream: str,
        fetch: Callable[[], Awaitable[tuple[str, float]]],
        scheme: str,
        user: str,
        close: Callable[[], Awaitable[None]] | None = None,
        shared: SharedCredentials | None = None,
    ) -> None:
        super().__init__(upstream)
        self._fetch = fetch
        self._shared = shared
        self.renewed_by: str | None = None  # with sharing: the process that asked the token service
        self._close = close
        self._scheme = scheme
        self._user = user
        self._credential: Credential | None = None
        self._refresh: asyncio.Task[Credential] | None = None
        self._forced = False
        self._retry_at = 0.0
        self._failures = 0
        self.refreshes = 0
        self.last_refresh: float | None = None
        self.last_error: str | None = None

    async def current(self) -> Credential:
        cred = self._credential
        now = time.time()
        if cred is None or self._forced or (cred.expires_at is not None and now >= cred.expires_at):
            return await self._refreshed()
        if now >= self._renew_at(cred) and now >= self._retry_at:
            self._start_refresh()  # in the background: this request still uses the valid token
        return cred

    def invalidate(self) -> None:
        self._forced = True
        self._retry_at = 0.0

    def status(self) -> dict[str, Any]:
        cred = self._credential
        return {
            "expires_at": cred.expires_at if cred else None,
            "last_refresh": self.last_refresh,
            "last_error": self.last_error,
            "refreshes": self.refreshes,
            "shared": self._shared is not None,
            "renewed_by": self.renewed_by,
        }

    async def aclose(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._refresh
        if self._close is not None:
            await self._close()

    @staticmethod
    def _renew_at(cred: Credential) -> float:
        assert cred.expires_at is not None
        lifetime = max(cred.expires_at - cred.issued_at, 0.0)
        # The 5-minute margin never reaches back past the first quarter of a short token's life.
        margin = min(REFRESH_MARGIN, (1 - REFRESH_RATIO) * lifetime)
        return min(cred.issued_at + REFRESH_RATIO * lifetime, cred.expires_at - margin)

    def _start_refresh(self) -> asyncio.Task[Credential]:
        if self._refresh is None:
            self._refresh = asyncio.create_task(self._do_refresh(), name=f"credentials {self.upstream}")
            self._refresh.add_done_callback(self._refreshed_done)
        return self._refresh

    def _refreshed_done(self, task: asyncio.Task[Credential]) -> None:
        self._refresh = None
        if not task.cancelled():
            task.exception()  # retrieved: waiters got it, a background refresh logged it

    async def _refreshed(self) -> Credential:
        try:
            return await asyncio.shield(self._start_refresh())
        except UpstreamUnavailable:
            raise
        except Exception as exc:
            raise UpstreamUnavailable(
                f"credentials for upstream {self.upstream} could not be obtained: {exc}",
                detail={"upstream": self.upstream},
            ) from exc

    async def _do_refresh(self) -> Credential:
        started = time.time()
        try:
            if self._shared is None:
                token, expires_at = await self._fetch()
                renewed_by = None
            else:
                previous = self._credential
                obtained = await self._shared.obtain(
                    self.upstream, self._fetch, newer_than=previous.issued_at if previous else None
                )
                token, expires_at, started = obtained.token, obtained.expires_at, obtained.issued_at
                renewed_by = obtained.renewed_by
        except Exception as exc:
            self._failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            self._retry_at = time.time() + min(MAX_BACKOFF, 2.0 ** (self._failures - 1))
            log.error("credentials for upstream %s: refresh failed: %s", self.upstream, self.last_error)
            if isinstance(exc, UpstreamUnavailable):
                raise
            raise UpstreamUnavailable(
                f"credentials for upstream {self.upstream} could not be renewed: {self.last_error}",
                detail={"upstream": self.upstream},
            ) from exc
        header = f"Bearer {token}" if self._scheme == "bearer" else basic(self._user, token)
        cred = Credential(header, expires_at, started)
        self._credential = cred
        self._forced = False
        self._failures = 0
        self._retry_at = 0.0
        self.refreshes += 1
        self.last_refresh = time.time()
        self.last_error = None
        self.renewed_by = renewed_by
        if self._shared is None or renewed_by == self._shared.holder:
            log.info("credentials for upstream %s renewed; valid %.0fs", self.upstream, expires_at - started)
        else:
            log.debug("credentials for upstream %s: using the token %s renewed", self.upstream, renewed_by)
        return cred


@dataclass(frozen=True, slots=True)
class Obtained:
    """A token from the shared renewal: its expiry, when it was asked for, and by whom."""

    token: str
    expires_at: float
    issued_at: float
    renewed_by: str

    def __repr__(self) -> str:
        return f"Obtained(expires_at={self.expires_at}, renewed_by={self.renewed_by!r})"


class SharedCredentials:
    """One renewal of each upstream token for every process sharing the index (module docstring)."""

    def __init__(self, index: Index, sealer: Sealer, holder: str | None = None) -> None:
        self.index = index
        self.leases = Leases(index)
        self.holder = holder or node_id()
        self._sealer = sealer
        self._warned = False

    async def obtain(
        self,
        upstream: str,
        fetch: Callable[[], Awaitable[tuple[str, float]]],
        *,
        newer_than: float | None = None,
    ) -> Obtained:
        """A fresh token: the shared row's, or one fetched under the lease and shared.

        ``newer_than``: the issue time of the token held now; only a row renewed later is taken
        (after a 401 the row may still hold the token that was refused).
        """
        lease = f"credential:{upstream}"
        deadline = time.monotonic() + 2 * CREDENTIAL_LEASE_TTL
        renewer: str | None = None  # another process renewing: we read until it is done
        while True:
            try:
                row = await self._usable(upstream, newer_than)
                if row is not None:
                    return row
                if renewer is not None:  # reads only while it works (no write per look)
                    info = await self.leases.holder(lease)
                    renewer = info.holder if info is not None else None
                if renewer is None:
                    async with self.leases.hold(lease, self.holder, CREDENTIAL_LEASE_TTL):
                        row = await self._usable(upstream, newer_than)  # renewed meanwhile
                        if row is not None:
                            return row
                        return await self._fetch_and_share(upstream, fetch)
                if time.monotonic() >= deadline:
                    raise UpstreamUnavailable(
                        f"credentials for upstream {upstream}: {renewer} has been renewing them for too long",
                        detail={"upstream": upstream},
                    )
            except LeaseBusy as busy:
                renewer = busy.info.holder
            except UpstreamUnavailable:
                raise
            except _FetchFailed as failed:
                raise failed.error from failed.error.__cause__
            except Exception as exc:  # noqa: BLE001 - the index is in trouble: renew alone
                if not self._warned:
                    self._warned = True
                    log.warning(
                        "credentials for upstream %s: the shared renewal failed (%s); renewing here",
                        upstream,
                        type(exc).__name__,
                    )
                started = time.time()
                token, expires_at = await fetch()
                return Obtained(token, expires_at, started, self.holder)
            await asyncio.sleep(SHARED_POLL)

    async def _fetch_and_share(
        self, upstream: str, fetch: Callable[[], Awaitable[tuple[str, float]]]
    ) -> Obtained:
        started = time.time()
        try:
            token, expires_at = await fetch()
        except Exception as exc:  # noqa: BLE001 - re-raised as it was by obtain()
            raise _FetchFailed(exc) from None
        got = Obtained(token, expires_at, started, self.holder)
        try:
            sealed = await asyncio.to_thread(self._seal, upstream, token, expires_at)
            sql = (
                "INSERT INTO shared_credentials (upstream, sealed, expires_at, renewed_at, renewed_by) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (upstream) DO UPDATE SET sealed = excluded.sealed, "
                "expires_at = excluded.expires_at, renewed_at = excluded.renewed_at, "
                "renewed_by = excluded.renewed_by"
            )
            async with self.index.transaction(shared=False):
                await self.index.db.execute(sql, (upstream, sealed, expires_at, started, self.holder))
        except Exception as exc:  # noqa: BLE001 - ours is good: the others renew for themselves
            log.warning(
                "credentials for upstream %s: could not share the renewal (%s)", upstream, type(exc).__name__
            )
        return got

    async def _usable(self, upstream: str, newer_than: float | None) -> Obtained | None:
        """The shared token while it is fresh (the renewal rule of :class:`Renewing`)."""
        sql = "SELECT sealed, expires_at, renewed_at, renewed_by FROM shared_credentials WHERE upstream = ?"
        async with self.index.db.execute(sql, (upstream,)) as cur:
            row = await cur.fetchone()
        if row is None:
            return None
        expires_at, renewed_at = float(row[1]), float(row[2])
        if newer_than is not None and renewed_at <= newer_than:
            return None
        if time.time() >= Renewing._renew_at(Credential("", expires_at, renewed_at)):
            return None
        token = await asyncio.to_thread(self._open, upstream, bytes(row[0]), expires_at)
        if token is None:  # sealed with a key we lack, or tampered with: renew it ourselves
            return None
        return Obtained(token, expires_at, renewed_at, str(row[3]))

    @staticmethod
    def _aad(upstream: str, expires_at: float) -> bytes:
        return f"{upstream}\n{expires_at!r}".encode()

    def _seal(self, upstream: str, token: str, expires_at: float) -> bytes:
        return self._sealer.seal_value(token.encode(), SEAL_INFO, self._aad(upstream, expires_at))

    def _open(self, upstream: str, blob: bytes, expires_at: float) -> str | None:
        plain = self._sealer.open_value(blob, SEAL_INFO, self._aad(upstream, expires_at))
        return None if plain is None else plain.decode()


class _FetchFailed(Exception):
    """The token service's own failure, carried out of obtain()'s handling of index trouble."""

    def __init__(self, error: Exception) -> None:
        super().__init__("fetch failed")
        self.error = error


def shared_renewal(
    index: Index, sealer: Sealer | None, upstreams: Mapping[str, UpstreamConfig]
) -> SharedCredentials | None:
    """The shared renewal for these upstreams, or None (said once, when tokens need renewing but
    there is no key to seal them with)."""
    renewing = sorted(
        name
        for name, up in upstreams.items()
        if up.credentials and up.credentials.type in {"command", "codeartifact"}
    )
    if not renewing:
        return None
    if sealer is None:
        log.info(
            "upstream tokens (%s) are renewed by each process on its own: sharing one renewal "
            "needs server.encryption_key_file or server.encryption_key_env to seal them with",
            ", ".join(renewing),
        )
        return None
    return SharedCredentials(index, sealer)


async def run_command(command: tuple[str, ...]) -> tuple[str, float]:
    """The credential-process pattern: a command prints {"token": …, "expiration": ISO-8601}."""
    proc = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), COMMAND_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"{command[0]} did not answer within {COMMAND_TIMEOUT:.0f}s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"{command[0]} exited {proc.returncode}: {err.decode(errors='replace')[-200:]}")
    try:
        doc = json.loads(out)
        token = str(doc["token"])
        expiration = _timestamp(doc["expiration"])
    except (ValueError, KeyError, TypeError) as exc:
        raise RuntimeError(f'{command[0]} must print {{"token": …, "expiration": ISO-8601}}') from exc
    return token, expiration


def _timestamp(value: Any) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    moment = datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


class CodeArtifactToken:
    """GetAuthorizationToken: ``POST {endpoint}/v1/authorization-token?domain=…``, SigV4-signed."""

    def __init__(self, config: CredentialsConfig, env: Mapping[str, str]) -> None:
        self._config = config
        self._env = env
        self._session: aiohttp.ClientSession | None = None

    async def __call__(self) -> tuple[str, float]:
        config = self._config
        endpoint = (config.endpoint_url or f"https://codeartifact.{config.region}.amazonaws.com").rstrip("/")
        query = {
            "domain": config.domain,
            "domain-owner": config.domain_owner,
            "duration": str(int(config.duration)),
        }
        url = f"{endpoint}/v1/authorization-token?{urlencode(query)}"
        aws = await asyncio.to_thread(load_credentials, self._env)
        headers = sign("POST", url, region=config.region, service="codeartifact", credentials=aws)
        if self._session is None:
            self._session = aiohttp.ClientSession(trust_env=False)
        timeout = aiohttp.ClientTimeout(total=30)
        async with self._session.post(url, headers=headers, timeout=timeout) as resp:
            text = await resp.text()
            if resp.status != 200:
                raise RuntimeError(f"CodeArtifact answered {resp.status}: {text[:200]}")
            doc = json.loads(text)
        return str(doc["authorizationToken"]), _timestamp(doc["expiration"])

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


def build_provider(
    upstream: str,
    fmt: str,
    config: CredentialsConfig | None,
    env: Mapping[str, str] | None = None,
    shared: SharedCredentials | None = None,
) -> CredentialProvider | None:
    """The provider a connection's ``[credentials]`` table describes (None without one);
    ``shared``: renew expiring tokens once for every process sharing the index."""
    if config is None:
        return None
    env = os.environ if env is None else env
    if config.type in {"basic", "bearer"}:
        return StaticSecret(upstream, config, env)
    scheme = "bearer" if fmt == "npm" else "basic"  # CodeArtifact's npm endpoint wants Bearer
    if config.type == "command":
        command = config.command
        return Renewing(upstream, lambda: run_command(command), scheme, config.username, shared=shared)
    fetcher = CodeArtifactToken(config, env)
    return Renewing(upstream, fetcher, scheme, config.username, close=fetcher.aclose, shared=shared)
