"""The access check: one middleware, before any adapter code runs.

Every route that serves or changes packages declares what it needs when the app is built: a
permission (read, publish, delete, admin) and where it applies (the repository in its path, the
domain in its path, or the whole proxy). The middleware finds the caller's credential the way
each client already sends one (HTTP Basic with the token as password: pip, uv, twine, mvn,
NuGet feeds; ``Authorization: Bearer``: npm's ``_authToken``; ``X-NuGet-ApiKey``: nuget push),
verifies it, and answers 401 (with a Basic challenge, so clients prompt or use their credential
helpers) or 403 naming the missing permission. Repositories may allow anonymous reads. Failures
and denials go to the audit trail; the token itself never goes anywhere.

The bootstrap administrator's secret comes from ``ARTIFACT_PROXY_ADMIN_TOKEN`` or the file named
by ``server.admin_token_file``; there is no default.

Guessing is slowed per client: after ``server.auth_failure_limit`` failed authentications from
one address within ``server.auth_failure_window``, that address's credentialed requests get a
429 until the window ends, before its credential is even looked at (so a guess made then
tells nothing). The address is the peer's, or with ``server.trust_forwarded`` the one the
nearest proxy appended to ``X-Forwarded-For`` (the last entry: earlier ones are whatever the
client wrote). IPv6 clients are counted per /64, the block one host usually holds. Counts
live in this process's memory (several worker processes each count their own).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import math
import time
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Literal

from aiohttp import hdrs, web
from cachetools import TTLCache

from proxy.config import ServerConfig
from proxy.errors import Forbidden, Handler, NotFound, TooManyRequests, Unauthorized
from proxy.model import RepoRef
from proxy.pipeline.registry import RepositoryRegistry
from proxy.security.audit import ACTOR, Actor, AuditLog
from proxy.security.policy import Policies
from proxy.security.tokens import PERMISSIONS, Token, TokenStore, unauthenticated

Scope = Literal["repository", "domain", "proxy", "authenticated"]
ADMIN_TOKEN_ENV = "ARTIFACT_PROXY_ADMIN_TOKEN"  # noqa: S105 - the variable's name, not a secret
DEFAULT_PERMISSION = {"GET": "read", "HEAD": "read", "POST": "publish", "PUT": "publish", "DELETE": "delete"}
TOKEN_KEY = web.RequestKey("token", object)
MAX_TRACKED_CLIENTS = 100_000  # bounds the limiter's memory whatever the number of addresses


@dataclass(frozen=True, slots=True)
class Requirement:
    permission: str
    scope: Scope


def bootstrap_token(secret: str | None) -> tuple[str | None, Token]:
    """The built-in administrator: every permission on every domain, never stored."""
    token = Token(
        id="bootstrap",
        principal="admin",
        domain=None,
        repository=None,
        permissions=frozenset(PERMISSIONS),
        created_at=0.0,
        expires_at=float("inf"),
    )
    return secret, token


class FailureLimiter:
    """Failed authentications per client key in a fixed window (starting at the first failure)."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        # key -> [failures, monotonic time of the first]; mutated in place so the entry still
        # expires one window after the first failure, not after the latest.
        self._seen: TTLCache[str, list[float]] = TTLCache(MAX_TRACKED_CLIENTS, max(window, 0.001))

    def check(self, client: str) -> None:
        """429 while ``client`` is over the limit."""
        if self.limit <= 0:
            return
        entry = self._seen.get(client_key(client))
        if entry is not None and entry[0] >= self.limit:
            retry = max(1, math.ceil(entry[1] + self.window - time.monotonic()))
            raise TooManyRequests(
                f"too many failed authentications from this client; retry in {retry} s",
                detail={"retry_after": retry},
                headers={"Retry-After": str(retry)},
            )

    def failed(self, client: str) -> None:
        if self.limit <= 0:
            return
        key = client_key(client)
        entry = self._seen.get(key)
        if entry is None:
            self._seen[key] = [1.0, time.monotonic()]
        else:
            entry[0] += 1


def client_key(address: str) -> str:
    """What the limiter counts by: the address, or an IPv6 address's /64."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is None:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class AccessControl:
    """The route requirements and the middleware that enforces them. Built in ``build_app``."""

    def __init__(
        self,
        server: ServerConfig,
        tokens: TokenStore,
        registry: RepositoryRegistry,
        audit: AuditLog,
        admin_secret: str | None,
        policies: Policies | None = None,
    ) -> None:
        self.policies = policies
        self.enabled = server.auth
        self._trust_forwarded = server.trust_forwarded
        self.tokens = tokens
        self.registry = registry
        self._audit = audit
        self._admin_secret, self.bootstrap = bootstrap_token(admin_secret)
        self._requirements: dict[tuple[Hashable, str], Requirement] = {}
        self.failures = FailureLimiter(server.auth_failure_limit, server.auth_failure_window)

    def use_admin_secret(self, secret: str) -> None:
        self._admin_secret = secret

    @property
    def has_admin(self) -> bool:
        return bool(self._admin_secret)

    def require(self, route: web.AbstractRoute, permission: str, scope: Scope) -> None:
        """Declare what a route needs (HEAD is checked as GET)."""
        method = "GET" if route.method == "HEAD" else route.method
        self._requirements[(route.resource, method)] = Requirement(permission, scope)

    def requirement(self, request: web.Request) -> Requirement | None:
        route = request.match_info.route
        method = "GET" if request.method == "HEAD" else request.method
        return self._requirements.get((route.resource, method))

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        need = self.requirement(request)
        client = self.client_address(request)
        if need is None or not self.enabled:
            ACTOR.set(Actor("anonymous" if self.enabled else "anonymous (auth off)", "", client))
            return await handler(request)
        info = request.match_info
        domain, repo = info.get("domain"), info.get("repo")
        where = {"domain": domain or "", "repository": repo or ""}
        try:
            token = await self.authenticate(request, client)
        except Exception as exc:
            ACTOR.set(Actor("unknown", "", client))
            self._audit.record("auth_failure", result="denied", detail={"reason": str(exc)}, **where)
            raise
        if token is None:
            ACTOR.set(Actor("anonymous", "", client))
            anonymous = need.permission == "read" and need.scope == "repository" and domain and repo
            if anonymous and self._anonymous_read(domain or "", repo or ""):
                return await handler(request)
            self._audit.record("auth_failure", result="denied", detail={"reason": "no credentials"}, **where)
            raise unauthenticated(
                f"authentication required: {need.permission} on {_where(need, domain, repo)} needs a token "
                "(HTTP Basic with the token as password, Bearer, or X-NuGet-ApiKey)"
            )
        ACTOR.set(Actor(token.principal, token.id, client))
        request[TOKEN_KEY] = token
        if need.scope == "authenticated":
            return await handler(request)
        target_repo = repo if need.scope == "repository" else None
        target_domain = None if need.scope == "proxy" else domain
        allowed = token.allows(target_domain, target_repo, need.permission)
        refused_by_policy = (
            allowed
            and token is not self.bootstrap
            and self.policies is not None
            and not self.policies.permits(token.principal, target_domain, target_repo, need.permission)
        )
        if refused_by_policy:
            self._audit.record("denied", result="denied", detail={"permission": need.permission}, **where)
            raise Forbidden(
                f"the access policy of domain {domain} does not give {token.principal} the "
                f"{need.permission} permission on {_where(need, domain, repo)}",
                detail={"permission": need.permission, "token_id": token.id},
            )
        if not allowed:
            self._audit.record("denied", result="denied", detail={"permission": need.permission}, **where)
            raise Forbidden(
                f"token {token.id} ({token.principal}) does not have the {need.permission} permission "
                f"on {_where(need, domain, repo)}",
                detail={"permission": need.permission, "token_id": token.id},
            )
        # Only a caller who could use the repository learns whether it exists (a 404); to any
        # other, one that does not exist is refused like one it may not use: no existence oracle.
        if need.scope == "repository" and domain and repo:
            self.registry.repository(RepoRef(domain, repo))
        return await handler(request)

    def _anonymous_read(self, domain: str, repo: str) -> bool:
        try:
            return self.registry.repository(RepoRef(domain, repo)).anonymous_read
        except NotFound:
            return False  # answered as a repository without anonymous reads: a 401, not a 404

    async def authenticate(self, request: web.Request, client: str | None = None) -> Token | None:
        """The caller's token, None without a credential; 401 for a bad one, 429 for a client
        that failed too often (checked before the credential is looked at)."""
        client = self.client_address(request) if client is None else client
        headers = request.headers
        if hdrs.AUTHORIZATION in headers or "X-NuGet-ApiKey" in headers:
            self.failures.check(client)
        try:
            secret = credential(headers)
            if secret is None:
                return None
            if self._admin_secret and hmac.compare_digest(secret.encode(), self._admin_secret.encode()):
                return self.bootstrap
            return await self.tokens.verify(secret)
        except Unauthorized:
            self.failures.failed(client)
            raise

    def client_address(self, request: web.Request) -> str:
        """The peer, or behind a trusted proxy the address that proxy appended (the last entry
        of ``X-Forwarded-For``; the ones before it are whatever the client sent)."""
        if self._trust_forwarded and (forwarded := request.headers.get("X-Forwarded-For")):
            return forwarded.rsplit(",", 1)[-1].strip()
        return request.remote or ""


def credential(headers: Mapping[str, str]) -> str | None:
    """The secret a client sent: Basic password (or user when no password), Bearer, or NuGet's key."""
    header = headers.get(hdrs.AUTHORIZATION)
    if header:
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(value.strip(), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise unauthenticated("malformed Basic credentials") from None
            user, _, password = decoded.partition(":")
            return password or user or None
        # Named only when it looks like a scheme: a client that sends a bare token as the
        # header would otherwise see (and log, and audit) it echoed back.
        named = f" {scheme!r}" if scheme.isalpha() and len(scheme) <= 16 else ""
        raise unauthenticated(f"unsupported authorization scheme{named} (use Basic or Bearer)")
    key = headers.get("X-NuGet-ApiKey")
    return key.strip() if key and key.strip() else None


def _where(need: Requirement, domain: str | None, repo: str | None) -> str:
    if need.scope == "repository":
        return f"repository {domain}/{repo}"
    if need.scope == "domain" and domain:
        return f"domain {domain}"
    return "this proxy"


def expiry_text(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


__all__ = ["AccessControl", "NotFound", "Requirement", "credential"]
