"""``artifact-proxy token|audit`` commands: against the data directory, or a proxy's API.

``token create`` prints the token and nothing else on stdout, so ``TOKEN=$(artifact-proxy token
create …)`` works. Run on the proxy's host it writes the data directory directly (the running
proxy sees the new token at once: tokens are looked up, not cached, on first use); with
``--endpoint`` it asks a proxy's API, with the admin credential from ``ARTIFACT_PROXY_TOKEN``
(or ``ARTIFACT_PROXY_ADMIN_TOKEN``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import getpass
import json
import os
from pathlib import Path
from typing import Any

import aiohttp

from proxy.cli_env import add_env_parser, add_target_arguments, renew_forever
from proxy.config import ConfigError, parse_duration
from proxy.errors import BadRequest, NotFound, ProxyError, Unauthorized
from proxy.login import TOOLS, Target, default_path, masked, plan
from proxy.model import RepoRef
from proxy.pipeline.services import Pipeline
from proxy.security.tokens import parse_permissions
from proxy.storage.local import rekey

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

    rekey = sub.add_parser("rekey", parents=[common], help="seal every blob with the current encryption key")
    rekey.set_defaults(security=_rekey)

    login = sub.add_parser("login", parents=[common], help="write a tool's config to use a repository")
    login.add_argument("--tool", required=True, choices=TOOLS)
    add_target_arguments(login)
    login.add_argument("--extra", action="store_true", help="add the repository beside the main index")
    login.add_argument("--scope", help="npm: route only this @scope to the repository")
    login.add_argument("--permissions", default="read,publish", help="for a token issued locally")
    login.add_argument("--principal", default=getpass.getuser(), help="for a token issued locally")
    login.add_argument("--config-file", type=Path, help="write this file instead of the tool's default")
    login.add_argument("--dry-run", action="store_true", help="print what would be written")
    login.add_argument(
        "--renew-every", help="keep running: write a fresh token this often (e.g. 6h), for long jobs"
    )
    login.set_defaults(security=_login, exchanges=True)
    add_env_parser(sub, common)


async def run_security(pipeline: Pipeline | None, args: argparse.Namespace) -> tuple[Any, list[str]]:
    """(JSON data, lines to print) of a security command; ``pipeline`` None for remote ones."""
    result: tuple[Any, list[str]] = await args.security(pipeline, args)
    return result


def wants_local(args: argparse.Namespace) -> bool:
    if getattr(args, "remote", False):  # talks to a running proxy only (warm)
        return False
    if getattr(args, "exchanges", False):  # login, env: with a credential in the environment, ask the API
        return not any(os.environ.get(name) for name in CREDENTIAL_ENVS)
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


async def _rekey(pipeline: Pipeline | None, args: argparse.Namespace) -> tuple[Any, list[str]]:
    assert pipeline is not None
    blobs = pipeline.blobs
    if pipeline.config.storage.backend != "local":  # the bucket's objects would keep the old key
        raise BadRequest('rekey works on the local blob backend only ([storage] backend = "local")')
    try:
        rewritten, kept = await asyncio.to_thread(rekey, blobs, blobs.root.parent.parent / "tmp")
    except ValueError as exc:
        raise BadRequest(str(exc)) from exc
    pipeline.audit.record("rekey", detail={"rewritten": rewritten, "current": kept})
    return {"rewritten": rewritten, "already_current": kept}, [
        f"sealed {rewritten} blob(s) with the current key; {kept} already were"
    ]


async def fresh_token(
    pipeline: Pipeline | None, args: argparse.Namespace, endpoint: str
) -> tuple[str, float]:
    """A new token for ``login`` and ``env``: (secret, expiry). From the data directory on the
    proxy's host; else exchanged for ``ARTIFACT_PROXY_TOKEN`` or issued with the admin token."""
    duration = _duration(args.duration)
    if pipeline is None:
        if os.environ.get(CREDENTIAL_ENVS[0]):  # a token of the domain: exchange it for a fresh one
            data = await remote_token(endpoint, args.domain, duration)
            return str(data["authorizationToken"]), float(data["expiration"])
        body = {  # the administrator's: issue one for the principal
            "domain": args.domain,
            "repository": args.repo,
            "principal": args.principal,
            "permissions": args.permissions.split(","),
            "duration": duration,
        }
        data = await _call(endpoint, "POST", "/-/api/v1/tokens", json_body=body)
        return str(data["token"]), float(data["expires_at"])
    local = argparse.Namespace(**{**vars(args), "endpoint": None})  # _token_create writes the data dir
    data, _ = await _token_create(pipeline, local)
    return str(data["token"]), float(data["expires_at"])


async def _login(pipeline: Pipeline | None, args: argparse.Namespace) -> tuple[Any, list[str]]:
    if getattr(args, "renew_every", None):
        return await renew_forever(pipeline, args, _login_once)
    return await _login_once(pipeline, args)


async def _login_once(pipeline: Pipeline | None, args: argparse.Namespace) -> tuple[Any, list[str]]:
    endpoint = (args.endpoint or args.default_endpoint).rstrip("/")
    secret, expires = await fresh_token(pipeline, args, endpoint)
    args.issued_token = secret  # --renew-every exchanges the newest token for the next one
    target = Target(endpoint, args.domain, args.repo, secret, extra=args.extra, scope=args.scope)
    path = args.config_file or default_path(args.tool)
    current = await asyncio.to_thread(_read_text, path)
    try:
        edit = plan(args.tool, path, current, target)
    except ValueError as exc:
        raise BadRequest(f"{path}: {exc}") from exc
    lines = [f"{'would write' if args.dry_run else 'wrote'} {path}:"] + [f"  {c}" for c in edit.changes]
    lines.append(f"the token expires at {_iso(expires)}")
    if args.dry_run:
        lines += ["", masked(edit.text, secret)]
    else:
        await asyncio.to_thread(_write_private, path, edit.text)
    return {"path": str(path), "changes": edit.changes, "expires_at": expires, "dry_run": args.dry_run}, lines


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8") if path.exists() else ""


def _write_private(path: Path, text: str) -> None:
    """Write a file that holds a token: readable by its owner only, replaced atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
    os.replace(tmp, path)


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
