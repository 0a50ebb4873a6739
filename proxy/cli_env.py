"""``artifact-proxy env`` and ``login --renew-every``: tokens for CI jobs, short-lived and renewed.

``env`` prints shell ``export`` lines that point the tools at a repository with a fresh token,
for any CI system::

    eval "$(artifact-proxy env --domain default --repo team --tool pip --tool npm)"

pip and uv read ``PIP_INDEX_URL`` / ``UV_INDEX_URL`` (the token in the URL's password), twine
``TWINE_REPOSITORY_URL``/``TWINE_USERNAME``/``TWINE_PASSWORD``. npm keeps credentials only in
an .npmrc keyed by registry, so ``env`` writes a small one (readable by its owner only) that
names ``${ARTIFACT_PROXY_TOKEN}`` instead of the secret — npm expands variables in .npmrc — and
exports ``NPM_CONFIG_USERCONFIG`` to it; pnpm and yarn (classic) read the same. Maven and NuGet
have no such variables: use ``artifact-proxy login --tool maven|nuget`` for them.

``login --renew-every 6h`` keeps running (in the foreground, or put it in the background with
``&``) and writes a fresh token into the tool's config at that interval, so a build longer than
a token's lifetime keeps working; the tokens it replaces stay valid until their own expiry, so
a client reading the old config mid-request is not cut off.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from proxy.config import ConfigError, parse_duration
from proxy.errors import BadRequest
from proxy.login import USER, Target

if TYPE_CHECKING:
    from proxy.pipeline.services import Pipeline

ENV_TOOLS = ("pip", "uv", "twine", "npm", "pnpm", "yarn")
MIN_RENEWAL = 1.0  # seconds: a smaller interval is a mistake, not a need
Once = Callable[["Pipeline | None", argparse.Namespace], Awaitable[tuple[Any, list[str]]]]


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    """What ``login`` and ``env`` both need: the repository, the token's lifetime, the proxy."""
    parser.add_argument("--domain", required=True)
    parser.add_argument("--repo", required=True)
    parser.add_argument("--duration", help="token lifetime, e.g. 1h (default from the proxy's config)")
    parser.add_argument(
        "--endpoint", help="the proxy's URL (default: server.public_url, else its listen address)"
    )


def add_env_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    env = sub.add_parser("env", parents=[common], help="print export lines that point tools at a repository")
    env.add_argument("--tool", action="append", required=True, choices=ENV_TOOLS, help="repeat for several")
    add_target_arguments(env)
    env.add_argument("--permissions", default="read", help="for a token issued locally (default read)")
    env.add_argument("--principal", default="ci", help="for a token issued locally (default ci)")
    env.add_argument("--npmrc", type=Path, help="where to write the npm config (default: a new temp file)")
    env.set_defaults(security=env_command, exchanges=True)


async def env_command(pipeline: Pipeline | None, args: argparse.Namespace) -> tuple[Any, list[str]]:
    """(the variables, the export lines): what ``eval`` should set in the calling shell."""
    from proxy.cli_security import fresh_token

    endpoint = (args.endpoint or args.default_endpoint).rstrip("/")
    secret, expires = await fresh_token(pipeline, args, endpoint)
    target = Target(endpoint, args.domain, args.repo, secret)
    variables: dict[str, str] = {
        "ARTIFACT_PROXY_TOKEN": secret,
        "ARTIFACT_PROXY_TOKEN_EXPIRES": str(int(expires)),
    }
    tools = set(args.tool)
    index = target.with_credentials(target.base("pypi") + "/simple/")
    if "pip" in tools:
        variables["PIP_INDEX_URL"] = index
    if "uv" in tools:
        variables["UV_INDEX_URL"] = index
    if "twine" in tools:
        variables |= {
            "TWINE_REPOSITORY_URL": target.base("pypi") + "/",
            "TWINE_USERNAME": USER,
            "TWINE_PASSWORD": secret,
        }
    if tools & {"npm", "pnpm", "yarn"}:
        registry = target.base("npm") + "/"
        npmrc = await asyncio.to_thread(_write_npmrc, args.npmrc, registry)
        variables |= {"npm_config_registry": registry, "NPM_CONFIG_USERCONFIG": str(npmrc)}
    lines = [f"export {name}={shlex.quote(value)}" for name, value in variables.items()]
    shown = {
        k: ("***" if k in ("ARTIFACT_PROXY_TOKEN", "TWINE_PASSWORD") else v) for k, v in variables.items()
    }
    return {"variables": shown, "expires_at": expires}, lines


def _write_npmrc(path: Path | None, registry: str) -> Path:
    """An .npmrc for the registry whose token is ``${ARTIFACT_PROXY_TOKEN}``: no secret in the file."""
    key = "//" + registry.split("://", 1)[1]
    text = f"registry={registry}\n{key}:_authToken=${{ARTIFACT_PROXY_TOKEN}}\n"
    if path is None:
        fd, name = tempfile.mkstemp(prefix="artifact-proxy-", suffix=".npmrc")
        path = Path(name)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
    return path


async def renew_forever(
    pipeline: Pipeline | None, args: argparse.Namespace, once: Once
) -> tuple[Any, list[str]]:
    """``login --renew-every``: log in now and again at every interval, until stopped."""
    try:
        every = parse_duration(args.renew_every, "--renew-every")
    except ConfigError as exc:
        raise BadRequest(str(exc)) from exc
    if every < MIN_RENEWAL:
        raise BadRequest(f"--renew-every: at least {MIN_RENEWAL:g}s")
    if args.dry_run:
        raise BadRequest("--renew-every writes the config: it cannot be a --dry-run")
    while True:
        _, lines = await once(pipeline, args)
        print("\n".join(lines), flush=True)
        if os.environ.get("ARTIFACT_PROXY_TOKEN") and pipeline is None:
            # The next exchange presents the newest token: the first may expire before the job ends.
            os.environ["ARTIFACT_PROXY_TOKEN"] = str(args.issued_token)
        print(f"next renewal in {every:g}s", file=sys.stderr, flush=True)
        await asyncio.sleep(every)
