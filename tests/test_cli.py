"""The admin CLI (``python -m proxy domain|repo|package|origin|quarantine …``) as real processes.

Each test runs the commands against a temp data directory and a temp config file that defines
domain ``default`` with ``public`` (upstream: a connection ``fake``) and ``team`` (upstream:
``public``). Exit codes: 0 done, 1 refused (message on stderr), 2 usage or configuration error.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import ProxyFactory, write_config_file
from tests.fakes.dists import build_wheel
from tests.fakes.pypi import FakePyPI
from tests.test_admin_api import publish

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        assert self.code == 0, self.err
        return json.loads(self.out)


class Cli:
    """``python -m proxy`` with ``--config`` pointing at the test's config file."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("ARTIFACT_PROXY_")}

    async def __call__(self, *args: str, config: bool = True) -> Run:
        extra = ["--config", str(self.config)] if config else []
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            *args,
            *extra,
            cwd=ROOT,
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return Run(proc.returncode, out.decode(), err.decode())

    async def ok(self, *args: str) -> str:
        run = await self(*args)
        assert run.code == 0, run.err
        return run.out


@pytest.fixture
async def cli(tmp_path: Path) -> Cli:
    config = tmp_path / "proxy.toml"
    await asyncio.to_thread(write_config_file, config, tmp_path / "data", "http://127.0.0.1:9/simple/")
    return Cli(config)


DEFAULT = ("--domain", "default")
TEAM = ("--domain", "default", "--repo", "team")


async def test_a_fresh_data_directory_starts_from_the_config(cli: Cli, tmp_path: Path) -> None:
    out = await cli.ok("repo", "list", *DEFAULT)
    assert out.splitlines() == ["default/public <- fake", "default/team <- public"]
    assert await asyncio.to_thread((tmp_path / "data" / "index.sqlite3").exists)
    assert (await cli.ok("domain", "list")).strip() == "default  repositories: public, team"


async def test_repositories_are_created_described_changed_and_deleted(cli: Cli) -> None:
    out = await cli.ok(
        "repo", "create", *DEFAULT, "--name", "ml", "--upstream", "team", "--description", "ML team",
        "--min-release-age", "3d",
    )  # fmt: skip
    assert out.strip() == "created default/ml <- team  [min release age 3d]  ML team"
    assert "default/ml <- team" in await cli.ok("repo", "list", *DEFAULT)

    described = await cli.ok("repo", "describe", *DEFAULT, "--name", "ml")
    assert "upstreams:       team" in described
    assert "min release age: 3d" in described
    assert "defined in:      the index (API or CLI)" in described
    assert (await cli("repo", "describe", *DEFAULT, "--name", "ml", "--json")).json() == {
        "domain": "default",
        "name": "ml",
        "description": "ML team",
        "upstreams": ["team"],
        "min_release_age": 259200.0,
        "allow_redeploy": False,
        "anonymous_read": False,
        "downstreams": [],
        "from_config": False,
    }
    team = (await cli("repo", "describe", *DEFAULT, "--name", "team", "--json")).json()
    assert team["downstreams"] == ["ml"]

    run = await cli("repo", "set-upstreams", *DEFAULT, "--name", "ml", "--upstream", "public", "fake")
    assert run.code == 0, run.err
    assert run.out.strip() == "changed default/ml <- public, fake  [min release age 3d]  ML team"
    assert run.err == ""  # ml is not in the config file: nothing to warn about
    listed = (await cli("repo", "list", *DEFAULT, "--json")).json()
    assert [r["name"] for r in listed["repositories"]] == ["ml", "public", "team"]
    assert listed["repositories"][0]["upstreams"] == ["public", "fake"]

    assert (
        await cli.ok("repo", "delete", *DEFAULT, "--name", "ml")
    ).strip() == "deleted repository default/ml"
    gone = await cli("repo", "describe", *DEFAULT, "--name", "ml")
    assert gone.code == 1
    assert "repository 'ml' does not exist in domain 'default'" in gone.err


async def test_refusals_exit_1_with_the_reason(cli: Cli) -> None:
    run = await cli("repo", "list", "--domain", "nope")
    assert (run.code, run.out) == (1, "")
    assert run.err.strip() == "artifact-proxy: domain 'nope' does not exist"

    run = await cli("repo", "set-upstreams", *DEFAULT, "--name", "public", "--upstream", "team")
    assert run.code == 1
    assert "upstream cycle" in run.err and "team -> public -> team" in run.err

    run = await cli("repo", "create", *DEFAULT, "--name", "x1", "--upstream", "nowhere")
    assert run.code == 1
    assert "'nowhere' is neither a repository" in run.err

    run = await cli("repo", "create", *DEFAULT, "--name", "team")
    assert run.code == 1
    assert "already exists" in run.err

    run = await cli("repo", "delete", *DEFAULT, "--name", "public")
    assert run.code == 1
    assert "upstream of team" in run.err

    run = await cli("package", "describe", *TEAM, "--format", "cargo", "--package", "x")
    assert run.code == 1
    assert "unknown format 'cargo'" in run.err


async def test_usage_and_configuration_errors_exit_2(cli: Cli, tmp_path: Path) -> None:
    run = await cli("repo", "create", *DEFAULT, "--name", "x1", "--min-release-age", "3 days")
    assert run.code == 2
    assert "min_release_age" in run.err
    run = await cli("repo", "create", *DEFAULT)  # no --name
    assert run.code == 2
    assert "--name" in run.err
    run = await cli("origin", "set", *TEAM, "--format", "pypi", "--pattern", "x", "--publish", "MAYBE")
    assert run.code == 2
    run = await cli("repo", "list", *DEFAULT, "--config", str(tmp_path / "missing.toml"), config=False)
    assert run.code == 2
    assert "configuration error" in run.err


async def test_changing_a_repository_of_the_config_file_warns(cli: Cli) -> None:
    run = await cli("repo", "set-upstreams", *DEFAULT, "--name", "team", "--no-upstreams")
    assert run.code == 0, run.err
    assert run.out.strip() == "changed default/team <- (no upstreams)"
    assert "note: default/team is defined in the config file" in run.err
    # The CLI shows what the index holds (what a running proxy serves), not the file again.
    assert "default/team <- (no upstreams)" in await cli.ok("repo", "list", *DEFAULT)


async def test_domains_are_created_and_deleted(cli: Cli) -> None:
    assert (await cli.ok("domain", "create", "--name", "acme")).strip() == "created domain acme"
    assert (await cli("domain", "list", "--json")).json() == {
        "domains": [
            {"name": "acme", "repositories": []},
            {"name": "default", "repositories": ["public", "team"]},
        ]
    }
    await cli.ok("repo", "create", "--domain", "acme", "--name", "tools")
    run = await cli("domain", "delete", "--name", "acme")
    assert run.code == 1
    assert "still has repositories: tools" in run.err
    await cli.ok("repo", "delete", "--domain", "acme", "--name", "tools")
    deleted = await cli("domain", "delete", "--name", "acme", "--json")
    assert (deleted.code, deleted.out) == (0, "")  # like the API's 204: nothing to say
    assert "acme" not in await cli.ok("domain", "list")


async def test_package_list_of_an_empty_repository(cli: Cli) -> None:
    assert (await cli.ok("package", "list", *TEAM)).strip() == "no packages in default/team"
    assert (await cli("package", "list", *TEAM, "--format", "pypi", "--json")).json() == {"packages": []}
    run = await cli("package", "describe", *TEAM, "--format", "pypi", "--package", "Alpha")
    assert run.code == 1
    assert "package 'alpha' has no versions in default/team" in run.err
    version = ("--format", "pypi", "--package", "alpha", "--version", "1.0")
    run = await cli("package", "set-status", *TEAM, *version, "--status", "Unlisted")
    assert run.code == 1
    assert "alpha 1.0 is not a version of default/team" in run.err


async def test_origin_rules_are_set_shown_and_deleted(cli: Cli) -> None:
    set_rule = ("origin", "set", *TEAM, "--format", "pypi")
    out = await cli.ok(*set_rule, "--pattern", "Acme_*", "--upstream", "BLOCK")
    assert out.strip() == "set pypi  acme-*  publish=ALLOW  upstream=BLOCK"
    await cli.ok(*set_rule, "--pattern", "internal-tool", "--publish", "BLOCK")
    assert (await cli.ok("origin", "get", *TEAM)).splitlines() == [
        "pypi  acme-*  publish=ALLOW  upstream=BLOCK",
        "pypi  internal-tool  publish=BLOCK  upstream=ALLOW",
    ]
    assert (await cli("origin", "get", *TEAM, "--format", "pypi", "--json")).json() == {
        "rules": [
            {"format": "pypi", "pattern": "acme-*", "publish": "ALLOW", "upstream": "BLOCK"},
            {"format": "pypi", "pattern": "internal-tool", "publish": "BLOCK", "upstream": "ALLOW"},
        ]
    }
    run = await cli(*set_rule, "--pattern", "a*b*")
    assert run.code == 1
    assert "pattern" in run.err

    delete = ("origin", "delete", *TEAM, "--format", "pypi")
    assert (await cli.ok(*delete, "--pattern", "acme-*")).strip() == "deleted origin rule acme-*"
    await cli.ok(*delete, "--pattern", "Internal_Tool")
    assert (await cli.ok("origin", "get", *TEAM)).strip() == "no origin rules in default/team"
    run = await cli(*delete, "--pattern", "acme-*")
    assert run.code == 1
    assert "no origin rule 'acme-*'" in run.err


async def test_quarantine_is_added_listed_and_removed(cli: Cli) -> None:
    add = ("quarantine", "add", *TEAM, "--format", "pypi")
    out = await cli.ok(*add, "--pattern", "Evil@6.6.6", "--reason", "malware")
    assert out.strip() == "quarantined pypi  evil@6.6.6  (malware)"
    await cli.ok(*add, "--pattern", "typo*")
    assert (await cli.ok("quarantine", "list", *TEAM)).splitlines() == [
        "pypi  evil@6.6.6  (malware)",
        "pypi  typo*",
    ]
    assert (await cli("quarantine", "list", *TEAM, "--json")).json() == {
        "entries": [
            {"format": "pypi", "pattern": "evil@6.6.6", "reason": "malware"},
            {"format": "pypi", "pattern": "typo*", "reason": ""},
        ]
    }
    remove = ("quarantine", "remove", *TEAM, "--format", "pypi")
    assert (await cli.ok(*remove, "--pattern", "evil@6.6.6")).strip() == "lifted quarantine evil@6.6.6"
    await cli.ok(*remove, "--pattern", "typo*")
    assert (await cli.ok("quarantine", "list", *TEAM)).strip() == "nothing quarantined in default/team"
    run = await cli(*remove, "--pattern", "typo*")
    assert run.code == 1
    assert "no quarantine entry" in run.err


async def test_a_running_proxy_sees_what_the_cli_changes(
    proxy_factory: ProxyFactory, pypi: FakePyPI, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """The CLI writes the index of a proxy that is running; the proxy notices within seconds."""
    data_dir = tmp_path / "shared"
    proxy = await proxy_factory(pypi.url, data_dir=data_dir)
    config = tmp_path / "shared.toml"
    await asyncio.to_thread(write_config_file, config, data_dir, pypi.url)
    cli = Cli(config)
    api = f"{proxy.url}/-/api/v1/domains/default/repositories"

    run = await cli("repo", "create", *DEFAULT, "--name", "ml", "--upstream", "public", "--json")
    created = run.json()
    for _ in range(100):
        async with http.get(f"{api}/ml") as resp:
            if resp.status == 200:
                assert await resp.json() == created  # the CLI's --json is the API's answer
                break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("the running proxy did not notice the repository the CLI created")
    async with http.get(proxy.simple("ml") + "beta/") as resp:
        assert resp.status == 200

    async with http.post(api, json={"name": "web", "upstreams": ["ml"]}) as resp:
        assert resp.status == 201
    assert "default/web <- ml" in await cli.ok("repo", "list", *DEFAULT)


async def test_versions_are_managed_from_the_cli(
    proxy_factory: ProxyFactory, pypi: FakePyPI, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    data_dir = tmp_path / "shared"
    proxy = await proxy_factory(pypi.url, data_dir=data_dir)
    config = tmp_path / "shared.toml"
    await asyncio.to_thread(write_config_file, config, data_dir, pypi.url)
    cli = Cli(config)
    wheel = await asyncio.to_thread(build_wheel, tmp_path, "internal-lib", "1.0")
    await publish(http, proxy, "team", wheel)
    which = (*TEAM, "--format", "pypi", "--package", "Internal_Lib")

    described = await cli.ok("package", "describe", *which)
    assert "pypi internal-lib in default/team" in described
    assert "1.0  Published  (published)" in described
    assert f"{wheel.name}  " in described
    assert "pypi  internal-lib  (published)" in await cli.ok("package", "list", *TEAM)

    out = await cli.ok("package", "set-status", *which, "--version", "1.0", "--status", "Archived")
    assert out.strip() == "internal-lib 1.0 is now Archived"
    url = proxy.files("internal-lib", wheel.name, repo="team")
    for _ in range(100):  # the running proxy notices the change within seconds
        async with http.get(url) as resp:
            if resp.status == 404:
                break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("the running proxy still serves a version the CLI archived")

    await cli.ok("package", "set-status", *which, "--version", "1.0", "--status", "Published")
    await cli.ok("repo", "create", *DEFAULT, "--name", "release")
    out = await cli.ok("package", "copy", *which, "--version", "1.0", "--to", "release")
    assert out.strip() == "copied internal-lib 1.0 from team to release"
    run = await cli("package", "copy", *which, "--version", "1.0", "--to", "release")
    assert run.code == 1
    assert "already has files in release" in run.err

    out = await cli.ok("package", "delete", *which, "--version", "1.0")
    assert out.strip() == "deleted Internal_Lib 1.0 from default/team"
    release = (await cli("package", "describe", *DEFAULT, "--repo", "release", *which[4:], "--json")).json()
    assert [v["status"] for v in release["versions"]] == ["Published"]
    for _ in range(100):
        async with http.get(proxy.files("internal-lib", wheel.name, repo="release")) as resp:
            if resp.status == 200:
                break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("the copy made by the CLI is not served")
