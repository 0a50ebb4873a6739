"""HTTP endpoints of access control: tokens, CodeArtifact's token call, the audit trail.

POST   /-/api/v1/tokens               issue (admin of the token's domain)
GET    /-/api/v1/tokens?domain=D      list: ids, principals, scopes, expiry, last use; never secrets
DELETE /-/api/v1/tokens/{id}          revoke
POST   /v1/authorization-token?domain=D&duration=SECONDS
                                      CodeArtifact's GetAuthorizationToken: any valid token of
                                      the domain gets a fresh one with the same scope, so
                                      scripts written for `aws codeartifact` work by changing
                                      the endpoint, and long jobs renew before expiry
GET    /-/api/v1/audit?since&principal&action&package&domain
                                      the trail (admin of the domain, or of the proxy)
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxy.config import ConfigError, parse_duration
from proxy.errors import BadRequest, Forbidden, NotFound
from proxy.model import RepoRef
from proxy.security.access import TOKEN_KEY, AccessControl
from proxy.security.audit import AuditLog
from proxy.security.policy import Grant, Policies, describe
from proxy.security.tokens import Token, TokenStore, parse_permissions

API = "/-/api/v1"


class SecurityRoutes:
    """See the module docstring."""

    def __init__(
        self, tokens: TokenStore, audit: AuditLog, access: AccessControl, policies: Policies
    ) -> None:
        self.tokens = tokens
        self.audit = audit
        self.access = access
        self.policies = policies

    def register(self, router: web.UrlDispatcher) -> None:
        need = self.access.require
        need(router.add_post(f"{API}/tokens", self.issue), "admin", "authenticated")
        need(router.add_get(f"{API}/tokens", self.list), "admin", "authenticated")
        need(router.add_delete(f"{API}/tokens/{{id}}", self.revoke), "admin", "authenticated")
        need(router.add_post("/v1/authorization-token", self.codeartifact_token), "read", "authenticated")
        need(router.add_get(f"{API}/audit", self.query_audit), "admin", "authenticated")
        policy = f"{API}/domains/{{domain}}/policy"
        need(router.add_get(policy, self.get_policy), "admin", "domain")
        need(router.add_put(policy, self.put_policy), "admin", "domain")

    def _domain(self, name: str) -> None:
        if self.access.registry.domain(name) is None:
            raise NotFound(f"domain {name!r} does not exist", detail={"domain": name})

    def _caller(self, request: web.Request) -> Token:
        token = request.get(TOKEN_KEY)
        if not isinstance(token, Token):  # auth off: the operator is trusted as administrator
            return self.access.bootstrap
        return token

    def _require_admin(self, request: web.Request, domain: str | None) -> Token:
        caller = self._caller(request)
        where = f"domain {domain}" if domain else "this proxy"
        if not caller.allows(domain, None, "admin"):
            raise Forbidden(
                f"token {caller.id} ({caller.principal}) does not have the admin permission on {where}",
                detail={"permission": "admin", "token_id": caller.id},
            )
        # The domain's policy has the last word here too, as in the access middleware: else a
        # principal whose admin a policy took away could still mint tokens, for any principal.
        if caller is not self.access.bootstrap and not self.policies.permits(
            caller.principal, domain, None, "admin"
        ):
            raise Forbidden(
                f"the access policy of {where} does not give {caller.principal} the admin permission",
                detail={"permission": "admin", "token_id": caller.id},
            )
        return caller

    async def issue(self, request: web.Request) -> web.StreamResponse:
        body = await _json(request)
        domain = _str(body, "domain")
        if domain is None:
            raise BadRequest("field 'domain' is required", detail={"field": "domain"})
        self._domain(domain)
        repository = _str(body, "repository")
        if repository is not None:
            self.access.registry.repository(RepoRef(domain, repository))
        caller = self._require_admin(request, domain)
        raw = body.get("permissions", ["read"])
        if isinstance(raw, str):
            raw = raw.split(",")
        if not isinstance(raw, list) or not all(isinstance(p, str) for p in raw):
            raise BadRequest("permissions: a list of names", detail={"field": "permissions"})
        issued = await self.tokens.issue(
            principal=_str(body, "principal") or caller.principal,
            domain=domain,
            repository=repository,
            permissions=parse_permissions(raw),
            duration=_duration(body.get("duration")),
            issued_by=caller.principal,
        )
        self.audit.record(
            "token_issue",
            domain=domain,
            repository=repository or "",
            detail={"token_id": issued.token.id, "for": issued.token.principal},
        )
        return web.json_response({**issued.token.describe(), "token": issued.secret}, status=201)

    async def list(self, request: web.Request) -> web.StreamResponse:
        domain = request.query.get("domain") or None
        self._require_admin(request, domain)
        tokens = await self.tokens.list(domain)
        return web.json_response({"tokens": [t.describe() for t in tokens]})

    async def revoke(self, request: web.Request) -> web.StreamResponse:
        token = await self.tokens.get(request.match_info["id"])
        self._require_admin(request, token.domain)
        await self.tokens.revoke(token.id)
        self.audit.record("token_revoke", domain=token.domain or "", detail={"token_id": token.id})
        return web.Response(status=204)

    async def codeartifact_token(self, request: web.Request) -> web.StreamResponse:
        domain = request.query.get("domain")
        if not domain:
            raise BadRequest("query parameter 'domain' is required", detail={"field": "domain"})
        self._domain(domain)
        caller = self._caller(request)
        if caller.domain not in (None, domain):
            raise Forbidden(
                f"token {caller.id} ({caller.principal}) belongs to another domain",
                detail={"token_id": caller.id},
            )
        raw = request.query.get("duration")
        duration = None
        if raw:
            if not raw.isdigit():
                raise BadRequest("duration: seconds", detail={"field": "duration"})
            duration = float(raw)
        issued = await self.tokens.issue(
            principal=caller.principal,
            domain=domain,
            repository=caller.repository,
            permissions=caller.permissions,
            duration=duration,
            issued_by=caller.principal,
        )
        self.audit.record(
            "token_issue", domain=domain, detail={"token_id": issued.token.id, "exchange": True}
        )
        return web.json_response({"authorizationToken": issued.secret, "expiration": issued.token.expires_at})

    async def get_policy(self, request: web.Request) -> web.StreamResponse:
        domain = request.match_info["domain"]
        self._domain(domain)
        return web.json_response({"domain": domain, "grants": describe(self.policies.grants(domain))})

    async def put_policy(self, request: web.Request) -> web.StreamResponse:
        """Replace a domain's grants (an empty list: tokens alone decide again)."""
        domain = request.match_info["domain"]
        self._domain(domain)
        body = await _json(request)
        raw = body.get("grants")
        if not isinstance(raw, list):
            raise BadRequest("field 'grants' must be a list", detail={"field": "grants"})
        grants = []
        for item in raw:
            if (
                not isinstance(item, dict)
                or not isinstance(item.get("principal"), str)
                or not item["principal"]
            ):
                raise BadRequest("each grant needs a 'principal'", detail={"field": "grants"})
            repository = _str(item, "repository") or ""
            if repository:
                self.access.registry.repository(RepoRef(domain, repository))
            perms = item.get("permissions")
            if not isinstance(perms, list) or not all(isinstance(p, str) for p in perms):
                raise BadRequest("each grant needs 'permissions', a list", detail={"field": "grants"})
            grants.append(Grant(item["principal"], parse_permissions(perms), repository))
        await self.policies.replace(domain, grants)
        self.audit.record("policy", domain=domain, detail={"grants": describe(grants)})
        return web.json_response({"domain": domain, "grants": describe(grants)})

    async def query_audit(self, request: web.Request) -> web.StreamResponse:
        domain = request.query.get("domain") or None
        self._require_admin(request, domain)
        since = request.query.get("since")
        try:
            since_value = float(since) if since else None
        except ValueError as exc:
            raise BadRequest("since: seconds since the epoch", detail={"field": "since"}) from exc
        records = await self.audit.query(
            since=since_value,
            principal=request.query.get("principal"),
            action=request.query.get("action"),
            package=request.query.get("package"),
            domain=domain,
        )
        return web.json_response({"records": records})


async def _json(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError as exc:
        raise BadRequest("the body must be a JSON object") from exc
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def _str(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise BadRequest(f"field {key!r} must be a string", detail={"field": key})
    return value


def _duration(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return parse_duration(value, "duration")
        except ConfigError as exc:
            raise BadRequest(str(exc), detail={"field": "duration"}) from exc
    raise BadRequest("duration: seconds or a duration such as 12h", detail={"field": "duration"})
