"""The CI/CD recipes in examples/ (issue 13): run the "any CI" script end to end, validate the
YAML recipes with a YAML parser and their CI systems' own schemas, and renew a login's token.

The script test is real: ``sh examples/any-ci.sh`` with real pip and npm against a proxy with
access control on, whose upstreams are the fake PyPI and npm registry; the only credential the
script gets is the administrator's secret, from which ``artifact-proxy env`` issues a
short-lived read token.
"""

from __future__ import annotations

import asyncio
import base64
import configparser
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import aiohttp
import pytest
import yaml

from proxy.config import Overrides, parse_config
from tests.cluster import StartCluster
from tests.conftest import RunningProxy, serve_config
from tests.fakes.npm import FakeNpmRegistry, build_tarball
from tests.fakes.pypi import FakePyPI
from tests.s3_server import free_port

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ADMIN = "examples-admin-secret-" + "x" * 40
CHECK_JSONSCHEMA = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent)) or shutil.which(
    "check-jsonschema"
)

needs_npm = pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed")


async def run(*argv: str, cwd: Path, env: dict[str, str], timeout: float = 90) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def cli_shim(directory: Path) -> Path:
    """An ``artifact-proxy`` command running this interpreter's proxy package (blocking)."""
    directory.mkdir(parents=True, exist_ok=True)
    shim = directory / "artifact-proxy"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m proxy "$@"\n')
    shim.chmod(0o755)
    return directory


async def base_env(home: Path) -> dict[str, str]:
    """A clean environment with the CLI on PATH: this machine's pip and npm settings stay out."""
    bin_dir = await asyncio.to_thread(cli_shim, home / "bin")
    return {
        "PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(EXAMPLES.parent),  # the proxy package, wherever the job runs
        "HOME": str(home),
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_NO_CACHE_DIR": "1",
        "npm_config_cache": str(home / "npm-cache"),
        "npm_config_update_notifier": "false",
    }


@pytest.fixture
async def secured(tmp_path: Path, pypi: FakePyPI) -> AsyncIterator[tuple[RunningProxy, FakeNpmRegistry]]:
    """A proxy with access control on, PyPI and npm upstreams behind public, team -> public."""
    admin = tmp_path / "admin-token"
    await asyncio.to_thread(admin.write_text, ADMIN + "\n")
    npm = FakeNpmRegistry()
    await npm.start()
    raw: dict[str, Any] = {
        "server": {
            "data_dir": str(tmp_path / "data"),
            "auth": True,
            "admin_token_file": str(admin),
            "soft_deadline": "2s",
        },
        "upstreams": {
            "pypi": {"format": "pypi", "url": pypi.url, "retries": 1},
            "npm": {"format": "npm", "url": npm.url, "retries": 1},
        },
        "domains": [
            {
                "name": "default",
                "repositories": [
                    {"name": "public", "upstreams": ["pypi", "npm"]},
                    {"name": "team", "upstreams": ["public"]},
                ],
            }
        ],
    }
    config, runner, url = await serve_config(raw)
    try:
        yield RunningProxy(url=url, config=config, runner=runner), npm
    finally:
        await runner.cleanup()
        await npm.close()


# --- "any CI": the shell script -----------------------------------------------------------------


@needs_npm
@pytest.mark.timeout(180)
async def test_any_ci_script_builds_through_the_proxy_with_a_fresh_token(
    secured: tuple[RunningProxy, FakeNpmRegistry], pypi: FakePyPI, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    proxy, npm = secured
    tarball = await asyncio.to_thread(build_tarball, tmp_path / "packs", "left-pad-ci", "1.3.0")
    await npm.add_version_async("left-pad-ci", tarball, version="1.3.0")
    work = tmp_path / "work"
    await asyncio.to_thread(work.mkdir)
    await asyncio.to_thread((work / "requirements.txt").write_text, "alpha==1.0\n")
    manifest = {
        "name": "ci-app",
        "version": "1.0.0",
        "private": True,
        "dependencies": {"left-pad-ci": "^1.0.0"},
    }
    await asyncio.to_thread((work / "package.json").write_text, json.dumps(manifest))

    # Without a token the repository is closed: what follows works only through the token.
    async with http.get(f"{proxy.url}/default/pypi/team/simple/alpha/") as resp:
        assert resp.status == 401

    env = await base_env(tmp_path / "home") | {
        "ARTIFACT_PROXY_ENDPOINT": proxy.url,
        "ARTIFACT_PROXY_REPO": "team",
        "ARTIFACT_PROXY_ADMIN_TOKEN": ADMIN,
        "ARTIFACT_PROXY_TOKEN_DURATION": "20m",
        "PIP": f"{sys.executable} -m pip",
        "PIP_TARGET": str(work / "site"),
    }
    code, out, err = await run("sh", str(EXAMPLES / "any-ci.sh"), cwd=work, env=env, timeout=150)
    assert code == 0, out + err
    assert ADMIN not in out + err
    assert await asyncio.to_thread(
        (work / "site" / "alpha" / "__init__.py").is_file
    )  # and beta, its dependency
    assert await asyncio.to_thread((work / "site" / "beta" / "__init__.py").is_file)
    installed = json.loads(
        await asyncio.to_thread((work / "node_modules" / "left-pad-ci" / "package.json").read_text)
    )
    assert installed["version"] == "1.3.0"
    assert npm.hits[npm.tarball_path("left-pad-ci", "1.3.0")] == 1
    assert any("alpha" in path for path in pypi.hits)

    # The token the script used: issued to "ci", read only, scoped to team, about 20 minutes.
    headers = {"Authorization": f"Bearer {ADMIN}"}
    async with http.get(
        f"{proxy.url}/-/api/v1/tokens", headers=headers, params={"domain": "default"}
    ) as resp:
        tokens = (await resp.json())["tokens"]
    ci = [t for t in tokens if t["principal"] == "ci"]
    assert len(ci) == 1 and ci[0]["repository"] == "team" and ci[0]["permissions"] == ["read"]
    assert 19 * 60 < ci[0]["expires_at"] - ci[0]["created_at"] <= 20 * 60

    # What the build pulled is now tracked: the incident question answered for it.
    dependents = f"{proxy.url}/-/api/v1/domains/default/repositories/team/dependents/pypi"
    async with http.get(dependents, headers=headers, params={"name": "beta", "range": "1.0"}) as resp:
        answer = await resp.json()
    assert [(e["package"], e["version"], e["path"]) for e in answer["dependents"]] == [
        ("alpha", "1.0", ["alpha@1.0", "beta@1.0"])
    ]


async def test_env_prints_exports_and_an_npmrc_without_the_secret(
    secured: tuple[RunningProxy, FakeNpmRegistry], tmp_path: Path
) -> None:
    proxy, _ = secured
    npmrc = tmp_path / "ci.npmrc"
    env = await base_env(tmp_path / "home") | {"ARTIFACT_PROXY_ADMIN_TOKEN": ADMIN}
    argv = [
        sys.executable,
        "-m",
        "proxy",
        "env",
        "--endpoint",
        proxy.url,
        "--domain",
        "default",
        "--repo",
        "team",
    ]
    argv += ["--tool", "pip", "--tool", "twine", "--tool", "npm", "--npmrc", str(npmrc)]
    code, out, err = await run(*argv, cwd=tmp_path, env=env)
    assert code == 0, err
    exports = dict(re.findall(r"^export (\w+)=(.*)$", out, re.MULTILINE))
    token = exports["ARTIFACT_PROXY_TOKEN"]
    assert token.startswith("apt_")
    index = urlsplit(exports["PIP_INDEX_URL"].strip("'"))
    assert (index.username, unquote(index.password or "")) == ("aws", token)
    assert index.path == "/default/pypi/team/simple/"
    assert (
        exports["TWINE_PASSWORD"] == token
        and exports["npm_config_registry"] == f"{proxy.url}/default/npm/team/"
    )
    text = await asyncio.to_thread(npmrc.read_text)
    assert token not in text and "_authToken=${ARTIFACT_PROXY_TOKEN}" in text
    assert (await asyncio.to_thread(npmrc.stat)).st_mode & 0o077 == 0


# --- the YAML recipes ---------------------------------------------------------------------------


async def check_schema(schema: str, path: Path) -> None:
    """The CI system's own schema, as vendored by check-jsonschema (no network needed)."""
    assert CHECK_JSONSCHEMA is not None, "check-jsonschema is in the test extras"
    code, out, err = await run(
        CHECK_JSONSCHEMA, "--builtin-schema", schema, str(path), cwd=EXAMPLES, env=dict(os.environ)
    )
    assert code == 0, out + err


async def test_github_actions_workflow_is_valid_and_logs_in_every_tool() -> None:
    path = EXAMPLES / "github-actions.yml"
    doc = yaml.safe_load(await asyncio.to_thread(path.read_text))
    await check_schema("vendor.github-workflows", path)
    job = doc["jobs"]["build"]
    service = job["services"]["artifact-proxy"]
    assert service["ports"] == ["8080:8080"] and "/-/readyz" in service["options"]
    assert doc["env"]["ARTIFACT_PROXY_ENDPOINT"] == "http://127.0.0.1:8080"
    login = next(step["run"] for step in job["steps"] if "artifact-proxy login" in step.get("run", ""))
    assert "for tool in pip npm maven nuget" in login and "--duration 1h" in login
    # Every option the step passes is one `artifact-proxy login` accepts.
    options = set(re.findall(r"--[a-z-]+", login))
    assert options <= await asyncio.to_thread(_options_of, "login")


async def test_gitlab_job_is_valid_and_runs_the_tested_script() -> None:
    path = EXAMPLES / "gitlab-ci.yml"
    doc = yaml.safe_load(await asyncio.to_thread(path.read_text))
    await check_schema("vendor.gitlab-ci", path)
    job = doc["build"]
    assert job["script"] == ["sh examples/any-ci.sh"]
    alias = job["services"][0]["alias"]
    assert urlsplit(job["variables"]["ARTIFACT_PROXY_ENDPOINT"]).hostname == alias


async def test_jenkins_stage_runs_the_tested_script_with_a_bound_credential() -> None:
    text = await asyncio.to_thread((EXAMPLES / "Jenkinsfile").read_text)
    code = re.sub(r"//.*", "", text)
    assert code.count("{") == code.count("}") and code.count("(") == code.count(")")
    assert "sh 'sh examples/any-ci.sh'" in code
    assert re.search(
        r"withCredentials\(\[string\(credentialsId: '[\w-]+', variable: 'ARTIFACT_PROXY_TOKEN'\)\]\)", code
    )
    assert re.search(r"stage\('[^']+'\)", code)


def test_kubernetes_sidecar_pod_is_well_formed_and_its_config_loads() -> None:
    docs = list(yaml.safe_load_all((EXAMPLES / "kubernetes-sidecar.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"ConfigMap", "Pod"}
    pod = kinds["Pod"]["spec"]
    (sidecar,) = pod["initContainers"]
    assert sidecar["restartPolicy"] == "Always"  # a native sidecar: up before the build, down after
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/-/readyz", "port": 8080}
    (build,) = pod["containers"]
    assert build["command"] == ["sh", "examples/any-ci.sh"]
    build_env = {e["name"]: e.get("value") for e in build["env"]}
    endpoint = urlsplit(build_env["ARTIFACT_PROXY_ENDPOINT"])
    # The sidecar's config: mounted from the ConfigMap where --config points, loaded by the proxy.
    config_path = Path(sidecar["args"][sidecar["args"].index("--config") + 1])
    mount = next(m for m in sidecar["volumeMounts"] if config_path.parent == Path(m["mountPath"]))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    configmap = kinds["ConfigMap"]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    raw = tomllib.loads(configmap["data"][config_path.name])
    env = {"PIP_INDEX_URL": "http://127.0.0.1:9/simple/", "npm_config_registry": "http://127.0.0.1:9/"}
    config = parse_config(raw, Overrides(), env)
    assert (config.server.host, config.server.port) == (endpoint.hostname, endpoint.port)
    repos = {r.name for d in config.domains for r in d.repositories}
    assert build_env["ARTIFACT_PROXY_REPO"] in repos
    data_mount = next(m for m in sidecar["volumeMounts"] if m["mountPath"] == str(config.server.data_dir))
    assert any(v["name"] == data_mount["name"] and "emptyDir" in v for v in pod["volumes"])


def _options_of(command: str) -> set[str]:
    """The options a subcommand of the CLI accepts (building the parser reads files: blocking)."""
    from proxy.cli import build_parser

    for action in build_parser()._actions:
        choices = getattr(action, "choices", None)
        if isinstance(choices, dict) and command in choices:
            return {opt for a in choices[command]._actions for opt in a.option_strings}
    raise AssertionError(f"no subcommand {command}")


# --- login --renew-every ------------------------------------------------------------------------


def _token_in(pip_conf: str) -> str | None:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(pip_conf)
    url = parser.get("global", "index-url", fallback="")
    return unquote(urlsplit(url).password or "") or None


@pytest.mark.timeout(120)
async def test_login_renew_every_rewrites_the_config_with_fresh_tokens(
    secured: tuple[RunningProxy, FakeNpmRegistry], tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    proxy, _ = secured
    headers = {"Authorization": f"Bearer {ADMIN}"}
    body = {"domain": "default", "repository": "team", "principal": "ci", "permissions": ["read"]}
    async with http.post(f"{proxy.url}/-/api/v1/tokens", json=body, headers=headers) as resp:
        assert resp.status == 201
        first = (await resp.json())["token"]
    conf = tmp_path / "pip.conf"
    env = await base_env(tmp_path / "home") | {"ARTIFACT_PROXY_TOKEN": first}  # exchanged, then the newest
    argv = [
        sys.executable,
        "-m",
        "proxy",
        "login",
        "--tool",
        "pip",
        "--endpoint",
        proxy.url,
        "--domain",
        "default",
    ]
    argv += ["--repo", "team", "--config-file", str(conf), "--renew-every", "2s"]
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=tmp_path, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    seen: list[str] = []
    try:
        for _ in range(300):  # up to 30 s: three distinct tokens written, one after another
            if await asyncio.to_thread(conf.exists):
                token = _token_in(await asyncio.to_thread(conf.read_text))
                if token and (not seen or seen[-1] != token):
                    seen.append(token)
            if len(seen) == 3 or proc.returncode is not None:
                break
            await asyncio.sleep(0.1)
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()
    assert len(seen) == 3, seen
    assert first not in seen and len(set(seen)) == 3
    mode = (await asyncio.to_thread(conf.stat)).st_mode
    assert mode & 0o077 == 0
    # A read token is no admin: the dependency queries are admin API calls.
    dependents = f"{proxy.url}/-/api/v1/domains/default/repositories/team/dependents/pypi"
    async with http.get(dependents, params={"name": "beta", "range": "1.0"}) as resp:
        assert resp.status == 401
    async with http.get(
        dependents, params={"name": "beta", "range": "1.0"}, headers={"Authorization": f"Bearer {first}"}
    ) as resp:
        assert resp.status == 403
    # Each token in turn works, the replaced ones too until their own expiry.
    for token in [first, *seen]:
        auth = {"Authorization": "Basic " + base64.b64encode(f"aws:{token}".encode()).decode()}
        async with http.get(f"{proxy.url}/default/pypi/team/simple/alpha/", headers=auth) as resp:
            assert resp.status == 200, token[:8]


# --- the cluster example (issue 12): three nodes, PostgreSQL, MinIO, HAProxy ------------------------

CLUSTER = EXAMPLES / "cluster"
HAPROXY = shutil.which("haproxy") or (
    "/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None
)
needs_haproxy = pytest.mark.skipif(
    HAPROXY is None, reason="HAProxy is not installed (Debian package `haproxy`): its config is not checked"
)


def _compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((CLUSTER / "docker-compose.yml").read_text())
    return doc


def _node_services(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in doc["services"].items() if name.startswith("proxy-")}


def _host_paths(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host path, container path) of the bind mounts (``./x:/y[:ro]``) of a service."""
    out = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            out.append((source, target))
    return out


def test_cluster_compose_file_is_valid_and_wires_three_nodes() -> None:
    path = CLUSTER / "docker-compose.yml"
    assert CHECK_JSONSCHEMA is not None, "check-jsonschema is in the test extras"
    done = subprocess.run(
        [CHECK_JSONSCHEMA, "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr  # Compose's own schema, vendored
    doc = _compose()
    services = doc["services"]
    nodes = _node_services(doc)
    assert sorted(nodes) == ["proxy-1", "proxy-2", "proxy-3"]
    assert {"postgres", "minio", "minio-init", "loadbalancer"} <= set(services)

    # Every file the compose file points at exists: the build context's Dockerfile, the mounts.
    for name, service in services.items():
        if "build" in service:
            context = (CLUSTER / service["build"]["context"]).resolve()
            assert (context / service["build"].get("dockerfile", "Dockerfile")).is_file(), name
            assert (context / "pyproject.toml").is_file(), name  # the repository itself
        for source, _ in _host_paths(service):
            assert (CLUSTER / source).is_file(), (name, source)

    # The nodes: one image, one config file mounted where --config points, one volume each at
    # the config's data_dir, the database URL and the bucket's keys from the environment.
    raw = tomllib.loads((CLUSTER / "proxy.toml").read_text())
    data_dir = raw["server"]["data_dir"]
    volumes = set()
    for name, node in nodes.items():
        assert node["build"]["context"] == "../.."
        config_path = node["command"][node["command"].index("--config") + 1]
        assert ("./proxy.toml", config_path) in _host_paths(node), name
        (data,) = [v.split(":")[0] for v in node["volumes"] if v.split(":")[1] == data_dir]
        assert data in doc["volumes"], name
        volumes.add(data)
        env = node["environment"]
        assert env["ARTIFACT_PROXY_INDEX_URL"].startswith("${ARTIFACT_PROXY_INDEX_URL:-postgresql://")
        assert re.fullmatch(r"\$\{MINIO_ROOT_USER:\?[^}]+\}", env["AWS_ACCESS_KEY_ID"])
        assert re.fullmatch(r"\$\{MINIO_ROOT_PASSWORD:\?[^}]+\}", env["AWS_SECRET_ACCESS_KEY"])
        assert node["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert node["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    assert len(volumes) == 3  # each node its own disk cache

    # The database: a health check the nodes wait on, the user and database the URL names.
    postgres = services["postgres"]
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    index = urlsplit(raw["index"]["url"])
    assert index.hostname == "postgres" and index.username == postgres["environment"]["POSTGRES_USER"]
    assert index.path.strip("/") == postgres["environment"]["POSTGRES_DB"]
    fallback = nodes["proxy-1"]["environment"]["ARTIFACT_PROXY_INDEX_URL"]
    fallback = fallback.removeprefix("${ARTIFACT_PROXY_INDEX_URL:-").removesuffix("}")
    default_url = urlsplit(re.sub(r"\$\{POSTGRES_PASSWORD:\?[^}]*\}", "pw", fallback))
    assert (default_url.hostname, default_url.path) == (index.hostname, index.path)
    assert (default_url.username, default_url.password) == (index.username, "pw")

    # MinIO, and the one-shot that makes the bucket the config names.
    endpoint = urlsplit(raw["storage"]["endpoint_url"])
    assert endpoint.hostname == "minio" and "minio" in services
    init = services["minio-init"]
    script = " ".join(init["command"])
    assert f"mc mb --ignore-existing cluster/{raw['storage']['bucket']}" in script
    assert f"http://minio:{endpoint.port}" in script
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"

    # The load balancer: the only published port, its config mounted where HAProxy reads it.
    published = [name for name, s in services.items() if s.get("ports")]
    assert published == ["loadbalancer"]
    lb = services["loadbalancer"]
    assert lb["image"].startswith("haproxy:")
    assert ("./haproxy.cfg", "/usr/local/etc/haproxy/haproxy.cfg") in _host_paths(lb)
    cfg = (CLUSTER / "haproxy.cfg").read_text()
    port = raw["server"]["listen"].rsplit(":", 1)[1]
    servers = re.findall(r"^\s*server (\S+) (\S+)$", cfg, re.MULTILINE)
    assert servers == [(name, f"{name}:{port}") for name in sorted(nodes)]
    assert re.search(r"^\s*http-check send meth GET uri /-/readyz$", cfg, re.MULTILINE)

    # Every variable the file needs is one the README tells the reader to set.
    readme = (CLUSTER / "README.md").read_text()
    required = set(re.findall(r"\$\{(\w+):\?", path.read_text()))
    assert required == {
        "POSTGRES_PASSWORD",
        "MINIO_ROOT_USER",
        "MINIO_ROOT_PASSWORD",
        "ARTIFACT_PROXY_ADMIN_TOKEN",
    }
    for name in required:
        assert f"{name}=" in readme, name


def test_cluster_config_loads_with_the_proxy_own_parser() -> None:
    raw = tomllib.loads((CLUSTER / "proxy.toml").read_text())
    secret_url = "postgresql://proxy:not-the-real-one@postgres:5432/proxy"
    env = {"ARTIFACT_PROXY_INDEX_URL": secret_url, "PIP_INDEX_URL": "http://127.0.0.1:9/simple/"}
    config = parse_config(raw, Overrides(), env)
    storage = config.storage
    assert (storage.backend, storage.bucket, storage.prefix) == ("s3", "artifact-proxy", "prod/")
    assert (storage.endpoint_url, storage.region, storage.local_cache) == (
        "http://minio:9000",
        "us-east-1",
        20 * 2**30,
    )
    assert config.index.url == secret_url and config.index.shared  # the environment wins
    assert (config.server.host, config.server.port, str(config.server.data_dir)) == ("0.0.0.0", 8080, "/data")
    assert config.upstreams["pypi"].url == "http://127.0.0.1:9/simple/"  # "pip:index-url", resolved
    # Without the variable, the file's URL (no password in the file).
    alone = parse_config(raw, Overrides(), {"PIP_INDEX_URL": "http://127.0.0.1:9/simple/"})
    assert alone.index.url == raw["index"]["url"] and urlsplit(alone.index.url).password is None
    assert "local_cache" in raw["storage"] and "url" in raw["index"]  # the keys as issue 12 names them


@needs_haproxy
async def test_cluster_haproxy_config_passes_haproxy_check() -> None:
    assert HAPROXY is not None
    code, out, err = await run(HAPROXY, "-c", "-f", str(CLUSTER / "haproxy.cfg"), cwd=CLUSTER, env={})
    assert code == 0, out + err
    # The only warnings: the compose services' names, which resolve only inside Docker.
    warnings = [line for line in (out + err).splitlines() if "[WARNING]" in line or "[ALERT]" in line]
    assert all("could not resolve address 'proxy-" in line for line in warnings), warnings


async def _haproxy_servers(sock: Path) -> dict[str, dict[str, str]]:
    """HAProxy's ``show stat`` for the backend's servers: name → columns (status, stot, …)."""
    reader, writer = await asyncio.open_unix_connection(str(sock))
    try:
        writer.write(b"show stat\n")
        await writer.drain()
        text = (await asyncio.wait_for(reader.read(), 10)).decode()
    finally:
        writer.close()
    lines = [line for line in text.splitlines() if line.strip()]
    header = lines[0].lstrip("# ").split(",")
    rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:]]
    return {r["svname"]: r for r in rows if r["pxname"] == "nodes" and r["svname"].startswith("proxy-")}


async def _until_states(sock: Path, want: dict[str, str], bound: float = 20.0) -> dict[str, dict[str, str]]:
    deadline = asyncio.get_running_loop().time() + bound
    seen: dict[str, dict[str, str]] = {}
    while asyncio.get_running_loop().time() < deadline:
        with contextlib.suppress(OSError):
            seen = await _haproxy_servers(sock)
            if {name: seen[name]["status"] for name in want if name in seen} == want:
                return seen
        await asyncio.sleep(0.1)
    raise AssertionError(
        f"HAProxy's servers never reached {want}: {[(n, r['status']) for n, r in seen.items()]}"
    )


@needs_haproxy
@pytest.mark.timeout(90)
async def test_cluster_haproxy_sends_nothing_to_a_node_that_is_not_ready(
    cluster_factory: StartCluster, pypi: FakePyPI, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """The example's haproxy.cfg in front of two real nodes: HAProxy's own check request
    (HTTP/1.0, no Host) gets /-/readyz's 200; a node whose readiness fails is out of rotation
    while it still listens, and back once it is ready again."""
    assert HAPROXY is not None
    # Each node its own SQLite index: what is tested here is the check, not the sharing.
    a, b = await cluster_factory(2, upstream_url=pypi.url)
    port = free_port()
    sock = tmp_path / "haproxy.sock"
    cfg = (await asyncio.to_thread((CLUSTER / "haproxy.cfg").read_text)).replace(
        "global\n", f"global\n    stats socket {sock} level admin\n", 1
    )
    cfg = cfg.replace("bind :8080", f"bind 127.0.0.1:{port}")
    cfg = cfg.replace("server proxy-1 proxy-1:8080", f"server proxy-1 127.0.0.1:{a.port}")
    cfg = cfg.replace("server proxy-2 proxy-2:8080", f"server proxy-2 127.0.0.1:{b.port}")
    cfg = re.sub(r"^\s*server proxy-3 .*\n", "", cfg, flags=re.MULTILINE)
    cfg = cfg.replace(" inter 2s ", " inter 200ms ")  # the same checks, ten times as often
    path = tmp_path / "haproxy.cfg"
    await asyncio.to_thread(path.write_text, cfg)
    log = await asyncio.to_thread(open, tmp_path / "haproxy.log", "wb")
    try:
        proc = await asyncio.create_subprocess_exec(
            HAPROXY, "-db", "-f", str(path), stdout=log, stderr=log, stdin=asyncio.subprocess.DEVNULL
        )
    finally:
        await asyncio.to_thread(log.close)
    lb = f"http://127.0.0.1:{port}"
    try:
        await _until_states(sock, {"proxy-1": "UP", "proxy-2": "UP"})
        async with http.get(f"{lb}/default/pypi/public/simple/alpha/") as resp:
            assert resp.status == 200

        # Node A stops being ready (its staging directory is gone) but still answers on its port.
        tmp, away = a.data_dir / "tmp", a.data_dir / "tmp.away"
        await asyncio.to_thread(tmp.rename, away)
        async with http.get(f"{a.url}/-/readyz") as resp:
            assert resp.status == 503 and (await resp.json())["checks"]["tmp"] == "not writable"
        before = await _until_states(sock, {"proxy-1": "DOWN", "proxy-2": "UP"})
        for _ in range(10):
            async with http.get(f"{lb}/default/pypi/public/simple/alpha/") as resp:
                assert resp.status == 200
        after = await _haproxy_servers(sock)
        assert int(after["proxy-1"]["stot"]) == int(before["proxy-1"]["stot"])  # none went to A
        assert int(after["proxy-2"]["stot"]) - int(before["proxy-2"]["stot"]) == 10

        # Ready again: back in rotation by itself.
        await asyncio.to_thread(away.rename, tmp)
        await _until_states(sock, {"proxy-1": "UP", "proxy-2": "UP"})
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()
