"""``artifact-proxy token|audit`` commands: against the data directory, or a proxy's API.

``token create`` prints the token and nothing else on stdout, so ``TOKEN=$(artifact-proxy token
create …)`` works. Run on the proxy's host it writes the data directory directly (the running
proxy sees the new token at once: tokens are looked up, not cached, on first use); with
``--endpoint`` it asks a proxy's API, with the admin credential from ``ARTIFACT_PROXY_TOKEN``
(or ``ARTIFACT_PROXY_ADMIN_TOKEN``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from typing import Any

import aiohttp

from proxy.config import ConfigError, parse_duration
from proxy.errors import BadRequest, NotFound, ProxyError, Unauthorized
from proxy.model import RepoRef
from proxy.pipeline.services import Pipeline
from proxy.security.tokens import parse_permissions

CREDENTIAL_ENVS = ("ARTIFACT_PROXY_TOKEN", "ARTIFACT_PROXY_ADMIN_TOKEN")


def add_security_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """``token create|list|revoke`` and ``audit [query]|verify``."""
    token = sub.add_parser("token", help="issue, list and revoke access tokens")
    actions = token.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", parents=[common], help="issue a token (printed once)")
    create.add_argument("--domain", required=True)
    create.add_argument("--repo", help="limit the token to one repository")
    create.add_argument("--principal", required=True, help="who the token is for")
    create.add_argument("--permissions", default="read", help="comma-separated: read,publish,delete,admin")
    create.add_argument("--duration", help="lifetime, e.g. 12h (default and bounds from the config)")
    create.add_argument("--endpoint", help="ask this proxy's API instead of writing the data directory")
    create.set_defaults(security=_token_create)
    listing = actions.add_parser("list", parents=[common], help="list tokens (never their secrets)")
    listing.add_argument("--domain")
    listing.set_defaults(security=_token_list)
    revoke = actions.add_parser("revoke", parents=[common], help="revoke a token by id")
    revoke.add_argument("--id", required=True)
    revoke.set_defaults(security=_token_revoke)

    audit = sub.add_parser("audit", parents=[common], help="query or verify the audit trail")
    audit.add_argument("what", nargs="?", choices=["query", "verify"], default="query")
    audit.add_argument("--since", help="a duration back from now (e.g. 2h) or an ISO-8601 time")
    audit.add_argument("--principal")
    audit.add_argument("--action")
    audit.add_argument("--package")
    audit.add_argument("--domain")
    audit.set_defaults(security=_audit)


async def run_security(pipeline: Pipeline | None, args: argparse.Namespace) -> tuple[Any, list[str]]:
    """(JSON data, lines to print) of a security command; ``pipeline`` None for remote ones."""
    result: tuple[Any, list[str]] = await args.security(pipeline, args)
    return result


def wants_local(args: argparse.Namespace) -> bool:
    return not getattr(args, "endpoint", None)


def _duration(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return parse_duration(text, "--duration")
    except ConfigError as exc:
        raise BadRequest(str(exc)) from exc


async def _token_create(pipeline: Pipeline | None, args: argparse.Namespace) -> tuple[Any, list[str]]:
    permissions = sorted(parse_permissions(args.permissions.split(",")))
    if pipeline is None:
        body = {
            "domain": args.domain,
            "repository": args.repo,
            "principal": args.principal,
            "permissions": permissions,
            "duration": _duration(args.duration),
        }
        data = await _call(args.endpoint, "POST", "/-/api/v1/tokens", json_body=body)
        return data, [str(data["token"])]
    if pipeline.registry.domain(args.domain) is None:
        raise NotFound(f"domain {args.domain!r} does not exist")
    if args.repo:
        pipeline.registry.repository(RepoRef(args.domain, args.repo))
    issued = await pipeline.tokens.issue(
        principal=args.principal,
        domain=args.domain,
        repository=args.repo,
        permissions=frozenset(permissions),
        duration=_duration(args.duration),
        issued_by="cli",
    )
    pipeline.audit.record(
        "token_issue",
        domain=args.domain,
        repository=args.repo or "",
        detail={"token_id": issued.token.id, "for": args.principal},
    )
    return {**issued.token.describe(), "token": issued.secret}, [issued.secret]


async def _token_list(pipeline: Pipeline | None, args: argparse.Namespace) -> tuple[Any, list[str]]:
    assert pipeline is not None
    tokens = await pipeline.tokens.list(args.domain)
    lines = []
    for t in tokens:
        scope = f"{t.domain or '*'}/{t.repository or '*'}"
        state = "revoked" if t.revoked_at else ("expired" if t.expires_at < _now() else "active")
        used = _iso(t.last_used_at) if t.last_used_at else "never"
        lines.append(
            f"{t.id}  {t.principal}  {scope}  {','.join(sorted(t.permissions))}  "
            f"expires {_iso(t.expires_at)}  last used {used}  {state}"
        )
    return {"tokens": [t.describe() for t in tokens]}, lines or ["no tokens"]


async def _token_revoke(pipeline: Pipeline | None, args: argparse.Namespace) -> tuple[Any, list[str]]:
    assert pipeline is not None
    token = await pipeline.tokens.revoke(args.id)
    pipeline.audit.record("token_revoke", domain=token.domain or "", detail={"token_id": token.id})
    return token.describe(), [f"revoked token {token.id} ({token.principal})"]


async def _audit(pipeline: Pipeline | None, args: argparse.Namespace) -> tuple[Any, list[str]]:
    assert pipeline is not None
    if args.what == "verify":
        ok, count, problem = await pipeline.audit.verify()
        if not ok:
            raise ProxyError(f"the audit trail is broken after {count} intact records: {problem}")
        return {"intact": True, "records": count}, [f"audit trail intact: {count} records"]
    records = await pipeline.audit.query(
        since=_since(args.since),
        principal=args.principal,
        action=args.action,
        package=args.package,
        domain=args.domain,
        limit=100_000,
    )
    lines = [
        f"{_iso(r['at'])}  {r['principal']}  {r['action']}  {r['result']}  "
        f"{r['domain']}/{r['repository']}  {r['format']} {r['package']} {r['version']}".rstrip()
        for r in records
    ]
    return {"records": records}, lines or ["no audit records"]


def _since(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return _now() - parse_duration(text, "--since")
    except ConfigError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise BadRequest("--since: a duration such as 2h, or an ISO-8601 time") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def _now() -> float:
    return datetime.datetime.now(datetime.UTC).timestamp()


def _iso(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def api_credential() -> str:
    for name in CREDENTIAL_ENVS:
        if os.environ.get(name):
            return os.environ[name]
    raise Unauthorized(f"--endpoint needs a token in {' or '.join(CREDENTIAL_ENVS)}")


async def _call(
    endpoint: str, method: str, path: str, *, json_body: Any = None, query: dict[str, str] | None = None
) -> dict[str, Any]:
    """One authenticated call to a proxy's API; its error message becomes ours."""
    url = endpoint.rstrip("/") + path
    headers = {"Authorization": f"Bearer {api_credential()}"}
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, url, json=json_body, params=query, headers=headers) as resp,
    ):
        text = await resp.text()
        try:
            data = json.loads(text) if text else {}
        except json.JSONDecodeError:
            data = {"message": text[:200]}
        if resp.status >= 400:
            raise ProxyError(f"{endpoint} answered {resp.status}: {data.get('message', '')}")
        return data if isinstance(data, dict) else {"data": data}


async def remote_token(endpoint: str, domain: str, duration: float | None) -> dict[str, Any]:
    """A fresh token from a proxy: exchanged for the caller's own (CodeArtifact's call)."""
    query = {"domain": domain}
    if duration:
        query["duration"] = str(int(duration))
    return await _call(endpoint, "POST", "/v1/authorization-token", query=query)
