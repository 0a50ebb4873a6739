"""Time-limited access tokens: issued, verified, listed, revoked.

A token is 256 random bits, shown once and kept only as its SHA-256 (a hash of so much entropy
needs no salt or slow hash: it cannot be guessed, only stolen, and the hash is useless to a
thief). Verification looks the hash up and compares it in constant time. A token is scoped to a
domain (and optionally one repository), carries a set of permissions, and expires within the
configured bounds (15 minutes to 12 hours by default, CodeArtifact's). Verified tokens are kept
in memory for a few seconds so cache hits never touch SQLite; a revocation here drops them at
once, and one made by another process (the CLI) within the housekeeping interval.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass

from cachetools import TTLCache

from proxy.errors import BadRequest, NotFound, Unauthorized
from proxy.storage.index import Index

PERMISSIONS = ("read", "publish", "delete", "admin")
PREFIX = "apt_"  # recognisable in leak scanners, and never confused with an upstream's token
VERIFIED_SECONDS = 10.0


REALM = 'Basic realm="artifact-proxy", charset="UTF-8"'


def unauthenticated(message: str, **detail: object) -> Unauthorized:
    """A 401 with the challenge that makes pip, mvn and NuGet send (or ask for) credentials."""
    return Unauthorized(message, detail=detail, headers={"WWW-Authenticate": REALM})


@dataclass(frozen=True, slots=True)
class Token:
    """A token's record (never its secret)."""

    id: str
    principal: str
    domain: str | None  # None: every domain
    repository: str | None  # None: every repository of the domain
    permissions: frozenset[str]
    created_at: float
    expires_at: float
    revoked_at: float | None = None
    last_used_at: float | None = None
    issued_by: str = ""

    def allows(self, domain: str | None, repository: str | None, permission: str) -> bool:
        """Whether this token may do ``permission`` there (admin implies every permission)."""
        if self.domain is not None and self.domain != domain:
            return False
        if self.repository is not None and repository is not None and self.repository != repository:
            return False
        if self.repository is not None and repository is None and permission == "admin":
            return False  # a repository-scoped token administers nothing domain-wide
        return permission in self.permissions or "admin" in self.permissions

    def describe(self) -> dict[str, object]:
        return {
            "id": self.id,
            "principal": self.principal,
            "domain": self.domain,
            "repository": self.repository,
            "permissions": sorted(self.permissions),
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "revoked_at": self.revoked_at,
            "last_used_at": self.last_used_at,
            "issued_by": self.issued_by,
        }


@dataclass(frozen=True, slots=True)
class Issued:
    """A new token: its record and, this once, its secret."""

    token: Token
    secret: str


@dataclass(frozen=True, slots=True)
class TokenBounds:
    default: float
    minimum: float
    maximum: float


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_permissions(raw: Iterable[str]) -> frozenset[str]:
    perms = frozenset(p.strip() for p in raw if p.strip())
    unknown = sorted(perms - set(PERMISSIONS))
    if unknown or not perms:
        raise BadRequest(
            f"permissions: a non-empty list of {', '.join(PERMISSIONS)}"
            + (f" (unknown: {', '.join(unknown)})" if unknown else ""),
            detail={"field": "permissions"},
        )
    return perms


class TokenStore:
    """The ``tokens`` table and the short-lived cache of verified tokens."""

    def __init__(self, index: Index, default: float, minimum: float, maximum: float) -> None:
        self._index = index
        self.bounds = TokenBounds(default, minimum, maximum)
        self._verified: TTLCache[str, Token] = TTLCache(maxsize=10_000, ttl=VERIFIED_SECONDS)
        self._epoch = 0  # counts forget_verified(): a lookup begun before one is not cached
        self._used: dict[str, float] = {}

    def duration(self, requested: float | None) -> float:
        """The lifetime to give: the default, or the request checked against the bounds."""
        if requested is None or requested == 0:
            return self.bounds.default
        if not self.bounds.minimum <= requested <= self.bounds.maximum:
            raise BadRequest(
                f"duration must be between {self.bounds.minimum:g} and {self.bounds.maximum:g} seconds",
                detail={"field": "duration"},
            )
        return requested

    async def issue(
        self,
        *,
        principal: str,
        domain: str | None,
        repository: str | None,
        permissions: frozenset[str],
        duration: float | None,
        issued_by: str,
    ) -> Issued:
        if not principal or len(principal) > 200 or any(c in principal for c in "\r\n\t"):
            raise BadRequest("principal: a name of up to 200 characters", detail={"field": "principal"})
        now = time.time()
        token = Token(
            id=secrets.token_hex(8),
            principal=principal,
            domain=domain,
            repository=repository,
            permissions=permissions,
            created_at=now,
            expires_at=now + self.duration(duration),
            issued_by=issued_by,
        )
        secret = PREFIX + secrets.token_urlsafe(32)
        async with self._index.transaction():
            await self._index.db.execute(
                "INSERT INTO tokens (id, secret_hash, principal, domain, repository, permissions, "
                "created_at, expires_at, issued_by) VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    token.id,
                    secret_hash(secret),
                    principal,
                    domain,
                    repository,
                    json.dumps(sorted(permissions)),
                    token.created_at,
                    token.expires_at,
                    issued_by,
                ),
            )
        return Issued(token, secret)

    async def verify(self, secret: str) -> Token:
        """The token for ``secret``; 401 saying why when it is unknown, expired or revoked."""
        digest = secret_hash(secret)
        token = self._verified.get(digest)
        if token is None:
            epoch = self._epoch
            sql = f"SELECT secret_hash, {_COLUMNS} FROM tokens WHERE secret_hash=?"
            async with self._index.db.execute(sql, (digest,)) as cur:
                row = await cur.fetchone()
            if row is None or not hmac.compare_digest(str(row[0]), digest):
                raise unauthenticated("the token is not valid (unknown to this proxy)")
            token = _token(tuple(row[1:]))
            # A revocation that landed while this row was read must not be undone by caching it.
            if epoch == self._epoch:
                self._verified[digest] = token
        now = time.time()
        if token.revoked_at is not None:
            raise unauthenticated(f"token {token.id} was revoked", token_id=token.id)
        if now >= token.expires_at:
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(token.expires_at))
            raise unauthenticated(f"token {token.id} expired at {when}", token_id=token.id)
        self._used[token.id] = now
        return token

    async def list(self, domain: str | None = None) -> list[Token]:
        sql = f"SELECT {_COLUMNS} FROM tokens"
        args: tuple[object, ...] = ()
        if domain is not None:
            sql += " WHERE domain=?"
            args = (domain,)
        async with self._index.db.execute(sql + " ORDER BY created_at", args) as cur:
            rows = await cur.fetchall()
        return [_token(tuple(r)) for r in rows]

    async def get(self, token_id: str) -> Token:
        async with self._index.db.execute(f"SELECT {_COLUMNS} FROM tokens WHERE id=?", (token_id,)) as cur:
            row = await cur.fetchone()
        if row is None:
            raise NotFound(f"no token {token_id!r}", detail={"token_id": token_id})
        return _token(tuple(row))

    async def revoke(self, token_id: str) -> Token:
        await self.get(token_id)  # 404 for an unknown id
        async with self._index.transaction():
            await self._index.db.execute(
                "UPDATE tokens SET revoked_at=? WHERE id=? AND revoked_at IS NULL", (time.time(), token_id)
            )
        self.forget_verified()
        return await self.get(token_id)

    def forget_verified(self) -> None:
        """Drop verified tokens from memory (after a revocation, here or by another process)."""
        self._epoch += 1
        self._verified.clear()

    async def flush_last_used(self) -> None:
        used, self._used = self._used, {}
        if not used:
            return
        async with self._index.transaction(shared=False):  # bookkeeping: no cache depends on it
            await self._index.db.executemany(
                "UPDATE tokens SET last_used_at=? WHERE id=?", [(at, tid) for tid, at in used.items()]
            )


_COLUMNS = (
    "id, principal, domain, repository, permissions, created_at, expires_at, revoked_at, "
    "last_used_at, issued_by"
)


def _token(row: tuple[object, ...]) -> Token:
    return Token(
        id=str(row[0]),
        principal=str(row[1]),
        domain=None if row[2] is None else str(row[2]),
        repository=None if row[3] is None else str(row[3]),
        permissions=frozenset(json.loads(str(row[4]))),
        created_at=float(str(row[5])),
        expires_at=float(str(row[6])),
        revoked_at=None if row[7] is None else float(str(row[7])),
        last_used_at=None if row[8] is None else float(str(row[8])),
        issued_by=str(row[9] or ""),
    )
