"""Configuration: TOML in, frozen dataclasses out, validated once at startup.

Every error names the key that is wrong and why, so a typo in a sidecar's config fails the
container at once instead of surfacing as odd behaviour under load. Overrides are applied in
this order: embedded default or file → environment variables → command-line flags.
"""

from __future__ import annotations

import importlib.resources
import ipaddress
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from proxy.upstream.discovery import (
    NPM_REGISTRY,
    PIP_INDEX_URL,
    DiscoveryError,
    npm_registry_url,
    pip_index_url,
)

NAME_RE = re.compile(r"^[a-z][a-z0-9-]{1,49}\Z")  # \Z: "$" accepts a trailing newline
UPSTREAM_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
KNOWN_FORMATS = ("pypi", "npm", "maven", "nuget")

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


class ConfigError(ValueError):
    """A configuration problem, worded for the operator: it names the key and the reason."""


class _Skipped(Exception):
    """An ``optional`` connection whose registry could not be discovered on this machine."""


def parse_duration(value: object, key: str) -> float:
    """Seconds from ``"250ms"``, ``"30s"``, ``"10m"``, ``"12h"``, ``"7d"`` or a bare number."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a duration such as '10m', got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION_RE.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ConfigError(f"{key}: expected a duration such as '10m' or '30s', got {value!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(f"{key}: a duration must be a finite, non-negative number, got {value!r}")
    return seconds


def parse_size(value: object, key: str) -> int:
    """Bytes from ``"512KiB"``, ``"50MiB"``, ``"1GiB"``, ``"1GB"`` or a bare number."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size such as '50MiB', got {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE_RE.match(value)):
        size = int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "b").lower()])
    else:
        raise ConfigError(f"{key}: expected a size such as '50MiB' or '1GiB', got {value!r}")
    if size < 0:
        raise ConfigError(f"{key}: a size cannot be negative")
    return size


def parse_listen(value: object, key: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) into its parts."""
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected 'host:port', got {value!r}")
    m = re.match(r"^\[([0-9A-Fa-f:.]+)\]:(\d+)$", value) or re.match(r"^([^:\[\]]+):(\d+)$", value)
    if not m:
        raise ConfigError(f"{key}: expected 'host:port' such as '127.0.0.1:8080', got {value!r}")
    port = int(m.group(2))
    if not 0 <= port <= 65535:
        raise ConfigError(f"{key}: port {port} is out of range")
    return m.group(1), port


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Settings of the listening process and its data directory."""

    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path = Path("data")
    offline: bool = False
    public_url: str | None = None
    trust_forwarded: bool = False
    soft_deadline: float = 3.0
    negative_ttl: float = 60.0
    max_staleness: float = 0.0
    max_metadata_size: int = 64 * 2**20
    max_asset_size: int = 20 * 2**30
    max_upload_size: int = 2**30
    asset_timeout: float = 3600.0
    hot_cache_entries: int = 4096
    memory_cache_size: int = 128 * 2**20
    shutdown_timeout: float = 30.0
    # A client connection that is idle, or has not sent a whole request head, this long after it
    # opened (or after its last answer) is closed: slowloris clients cannot hold sockets for ever.
    client_timeout: float = 75.0
    # Access control (proxy/security/): on unless a config turns it off for local development.
    auth: bool = True
    admin_token_file: Path | None = None  # else ARTIFACT_PROXY_ADMIN_TOKEN; never a default
    token_default_duration: float = 12 * 3600.0
    token_min_duration: float = 15 * 60.0  # CodeArtifact's bounds
    token_max_duration: float = 12 * 3600.0
    # Brute force: after this many failed authentications from one client address within the
    # window, its credentialed requests get a 429 until the window ends (0 turns it off).
    auth_failure_limit: int = 60
    auth_failure_window: float = 60.0
    audit_fetches: str = "misses"  # all | misses | none
    audit_file: Path | None = None  # also write the trail as JSON lines here
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Encryption at rest (storage/crypto.py): base64 AES-256 keys, the first one current.
    encryption_key_env: str | None = None  # e.g. "ARTIFACT_PROXY_ENCRYPTION_KEYS"
    encryption_key_file: Path | None = None
    gc_max_size: int = 0  # a blob store budget enforced in the background (0: off; see `gc`)
    gc_interval: float = 3600.0


@dataclass(frozen=True, slots=True)
class CredentialsConfig:
    """How the proxy authenticates to one connection (upstream/credentials.py); never a secret."""

    type: str  # basic | bearer | command | codeartifact
    username: str = "aws"
    secret_env: str | None = None  # basic: password_env, bearer: token_env
    secret_file: Path | None = None  # basic: password_file, bearer: token_file
    command: tuple[str, ...] = ()
    domain: str = ""
    domain_owner: str = ""
    region: str = ""
    duration: float = 12 * 3600.0
    endpoint_url: str | None = None
    # basic: the password is the one in the URL that this discovery key ("pip:index-url")
    # finds at run time; the config itself never holds it.
    secret_from_url: str | None = None


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """An external connection: one remote registry of one format."""

    name: str
    format: str
    url: str
    metadata_ttl: float = 600.0
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    metadata_timeout: float = 30.0
    retries: int = 2
    max_connections: int = 32
    allow_hosts: tuple[str, ...] = ()
    breaker_threshold: int = 5
    breaker_cooldown: float = 30.0
    ca_bundle: Path | None = None  # PEM CAs trusted for this connection (besides the system's)
    credentials: CredentialsConfig | None = None

    @property
    def origin(self) -> tuple[str, str, int]:
        """(scheme, host, port) of the URL: the one origin trusted without an address check."""
        parts = urlsplit(self.url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return parts.scheme, (parts.hostname or "").lower(), port


@dataclass(frozen=True, slots=True)
class RepositoryConfig:
    """A repository: its name and its ordered upstreams (connections or sibling repositories)."""

    name: str
    upstreams: tuple[str, ...] = ()
    description: str = ""
    min_release_age: float = 0.0
    allow_redeploy: bool = False  # Maven: a release file may be deployed again with other bytes
    anonymous_read: bool = False  # clients without a token may read (server.auth on)


@dataclass(frozen=True, slots=True)
class DomainConfig:
    """A tenant: a namespace of repositories."""

    name: str
    repositories: tuple[RepositoryConfig, ...] = ()

    def repository(self, name: str) -> RepositoryConfig | None:
        """The repository called ``name``, if this domain has one."""
        for repo in self.repositories:
            if repo.name == name:
                return repo
        return None


WEBHOOK_EVENTS = ("publish", "delete", "status", "copy", "ingest")


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    """Where to POST package events (proxy/webhooks.py); the signing secret only by reference."""

    url: str
    events: tuple[str, ...] = WEBHOOK_EVENTS
    domain: str | None = None  # None: every domain
    repository: str | None = None  # None: every repository of the domain
    secret_env: str | None = None  # HMAC-SHA256 key for the signature header


STORAGE_BACKENDS = ("local", "s3")
SERVE_MODES = ("stream", "redirect")


@dataclass(frozen=True, slots=True)
class StorageConfig:
    """``[storage]``: where blobs live (storage/backends.py). Never holds credentials: S3 keys come
    from the standard AWS environment variables, so a config file can be shared and logged."""

    backend: str = "local"
    bucket: str = ""
    prefix: str = ""
    endpoint_url: str | None = None  # MinIO, Ceph, a test server; None: AWS's regional endpoint
    region: str = "us-east-1"
    local_cache: int = 20 * 2**30  # this node's disk cache of hot blobs in front of the bucket
    # "stream": the node sends every blob; "redirect": a blob not on this node's disk is a 302 to
    # a pre-signed URL valid for ``redirect_expiry`` (the client then fetches from the bucket).
    serve: str = "stream"
    redirect_expiry: float = 300.0
    multipart_threshold: int = 64 * 2**20  # larger blobs are uploaded in parts of this size
    timeout: float = 60.0  # one object-store request (a part, a HEAD, a listing page)


@dataclass(frozen=True, slots=True)
class IndexConfig:
    """``[index]``: where the index lives. ``url`` None is the SQLite file in the data directory
    (one machine, the fast path); ``postgresql://…`` is a database shared by every node of a
    cluster (storage/postgres.py). The URL may carry a password: it is never logged."""

    url: str | None = None
    pool_size: int = 10  # connections per process to PostgreSQL
    # How long a node starting before its database waits for it (then exits, saying why).
    startup_wait: float = 60.0

    @property
    def shared(self) -> bool:
        """Whether several nodes share this index (and must coordinate through it)."""
        return self.url is not None


@dataclass(frozen=True, slots=True)
class Config:
    """The whole, validated configuration."""

    server: ServerConfig = field(default_factory=ServerConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    upstreams: Mapping[str, UpstreamConfig] = field(default_factory=dict)
    domains: tuple[DomainConfig, ...] = ()
    webhooks: tuple[WebhookConfig, ...] = ()
    notes: tuple[str, ...] = ()  # what the operator should hear at startup (left-out connections)

    def domain(self, name: str) -> DomainConfig | None:
        """The domain called ``name``, if configured."""
        for domain in self.domains:
            if domain.name == name:
                return domain
        return None


@dataclass(frozen=True, slots=True)
class Overrides:
    """Values from the command line or the environment that win over the file."""

    config_file: Path | None = None
    listen: str | None = None
    data_dir: Path | None = None
    offline: bool | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Overrides:
        """Read ``ARTIFACT_PROXY_*`` variables, for containers that configure by environment."""
        offline_raw = env.get("ARTIFACT_PROXY_OFFLINE")
        offline = None
        if offline_raw is not None and offline_raw != "":
            lowered = offline_raw.strip().lower()
            if lowered not in {"1", "0", "true", "false", "yes", "no", "on", "off"}:
                raise ConfigError(f"ARTIFACT_PROXY_OFFLINE: expected true or false, got {offline_raw!r}")
            offline = lowered in {"1", "true", "yes", "on"}
        return cls(
            config_file=Path(env["ARTIFACT_PROXY_CONFIG"]) if env.get("ARTIFACT_PROXY_CONFIG") else None,
            listen=env.get("ARTIFACT_PROXY_LISTEN") or None,
            data_dir=Path(env["ARTIFACT_PROXY_DATA_DIR"]) if env.get("ARTIFACT_PROXY_DATA_DIR") else None,
            offline=offline,
        )

    def over(self, base: Overrides) -> Overrides:
        """These overrides, falling back to ``base`` where unset (flags over environment)."""
        return Overrides(
            config_file=self.config_file or base.config_file,
            listen=self.listen or base.listen,
            data_dir=self.data_dir or base.data_dir,
            offline=self.offline if self.offline is not None else base.offline,
            tls_cert=self.tls_cert or base.tls_cert,
            tls_key=self.tls_key or base.tls_key,
        )


def default_config_text() -> str:
    """The embedded default: packaged beside the code, or read from the source tree."""
    packaged = importlib.resources.files("proxy").joinpath("default.toml")
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    source_tree = Path(__file__).resolve().parent.parent / "config" / "default.toml"
    return source_tree.read_text(encoding="utf-8")


def load_config(overrides: Overrides, env: Mapping[str, str]) -> Config:
    """Read the file named by the overrides (or the embedded default) and validate it."""
    if overrides.config_file is not None:
        try:
            text = overrides.config_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"config file {overrides.config_file}: {exc.strerror}") from exc
        source = str(overrides.config_file)
    else:
        text = default_config_text()
        source = "embedded default config"
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from exc
    return parse_config(raw, overrides, env)


def parse_config(raw: Mapping[str, Any], overrides: Overrides, env: Mapping[str, str]) -> Config:
    """Validate a decoded TOML document and apply overrides."""
    _only_keys(raw, "", {"server", "storage", "index", "upstreams", "domains", "webhooks"})
    server = _parse_server(_table(raw, "server"), overrides)
    storage = parse_storage(_table(raw, "storage"))
    index = parse_index(_table(raw, "index"), env)
    upstreams_raw = _table(raw, "upstreams")
    upstreams: dict[str, UpstreamConfig] = {}
    notes: list[str] = []
    for name in upstreams_raw:
        try:
            upstreams[name] = _parse_upstream(
                name, _table(upstreams_raw, name, prefix="upstreams"), server, env
            )
        except _Skipped as skipped:
            notes.append(str(skipped))
    domains_raw = raw.get("domains", [])
    if not isinstance(domains_raw, list):
        raise ConfigError("domains: expected an array of tables ([[domains]])")
    if index.url is not None and storage.backend == "local":
        notes.append(
            "the index is on PostgreSQL but blobs are on this node's disk: run one node on this "
            'index only (other nodes could not read the blobs; use [storage] backend = "s3")'
        )
    skipped_names = set(upstreams_raw) - set(upstreams)
    if skipped_names:  # a left-out connection leaves the upstream lists that named it
        domains_raw = _without_upstreams(domains_raw, skipped_names)
    domains = tuple(_parse_domain(i, d, upstreams) for i, d in enumerate(domains_raw))
    names = [d.name for d in domains]
    if len(names) != len(set(names)):
        raise ConfigError("domains: a domain name is used twice")
    webhooks = tuple(_parse_webhook(i, w, env) for i, w in enumerate(raw.get("webhooks") or []))
    config = Config(
        server=server,
        storage=storage,
        index=index,
        upstreams=upstreams,
        domains=domains,
        notes=tuple(notes),
        webhooks=webhooks,
    )
    check_upstream_graph(config)
    return config


def parse_index(raw: Mapping[str, Any], env: Mapping[str, str]) -> IndexConfig:
    """``[index]``. ``ARTIFACT_PROXY_INDEX_URL`` wins over the file, so a container can take the
    database URL (and its password) from a secret rather than from a file anyone can read."""
    p = "index"
    _only_keys(raw, p, {"url", "pool_size", "startup_wait"})
    url = env.get("ARTIFACT_PROXY_INDEX_URL") or _get(raw, "url", p, str, None)
    if url is not None:
        scheme = urlsplit(url).scheme
        if scheme not in {"postgresql", "postgres"}:
            raise ConfigError(f"index.url: expected a postgresql:// URL, got a {scheme or 'relative'}: URL")
        if not urlsplit(url).path.strip("/"):
            raise ConfigError("index.url: name the database, as in postgresql://proxy@db/proxy")
    pool = _get(raw, "pool_size", p, int, IndexConfig().pool_size)
    if not 2 <= pool <= 200:
        raise ConfigError("index.pool_size: between 2 and 200 connections")
    wait = IndexConfig().startup_wait
    if "startup_wait" in raw:
        wait = parse_duration(raw["startup_wait"], f"{p}.startup_wait")
    return IndexConfig(url=url, pool_size=pool, startup_wait=wait)


def parse_storage(raw: Mapping[str, Any]) -> StorageConfig:
    """``[storage]``; keys other than ``backend`` matter only for the S3 backend."""
    p = "storage"
    _only_keys(
        raw,
        p,
        {
            "backend", "bucket", "prefix", "endpoint_url", "region", "local_cache", "serve",
            "redirect_expiry", "multipart_threshold", "timeout",
        },
    )  # fmt: skip
    d = StorageConfig()
    backend = _get(raw, "backend", p, str, d.backend)
    if backend not in STORAGE_BACKENDS:
        known = ", ".join(STORAGE_BACKENDS)
        raise ConfigError(f"storage.backend: unknown backend {backend!r} (known: {known})")
    serve = _get(raw, "serve", p, str, d.serve)
    if serve not in SERVE_MODES:
        raise ConfigError(f"storage.serve: expected one of {', '.join(SERVE_MODES)}, got {serve!r}")
    bucket = _get(raw, "bucket", p, str, d.bucket)
    if backend == "s3" and not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
        raise ConfigError(f"storage.bucket: the s3 backend needs a valid bucket name, got {bucket!r}")
    prefix = _get(raw, "prefix", p, str, d.prefix)
    if prefix.startswith("/") or ".." in prefix.split("/"):
        raise ConfigError(f"storage.prefix: expected a relative key prefix such as 'prod/', got {prefix!r}")
    endpoint = _get(raw, "endpoint_url", p, str, None)
    if endpoint is not None and urlsplit(endpoint).scheme not in {"http", "https"}:
        raise ConfigError(f"storage.endpoint_url: expected an http(s) URL, got {endpoint!r}")
    if endpoint is not None and urlsplit(endpoint).username:
        raise ConfigError("storage.endpoint_url: credentials never go in the config file")
    expiry = d.redirect_expiry
    if "redirect_expiry" in raw:
        expiry = parse_duration(raw["redirect_expiry"], f"{p}.redirect_expiry")
    if not 1 <= expiry <= 7 * 86400:
        raise ConfigError("storage.redirect_expiry: a pre-signed URL lives between 1s and 7 days")
    threshold = d.multipart_threshold
    if "multipart_threshold" in raw:
        threshold = parse_size(raw["multipart_threshold"], f"{p}.multipart_threshold")
    if threshold < 5 * 2**20:
        raise ConfigError("storage.multipart_threshold: S3 parts are at least 5MiB")
    cache = parse_size(raw["local_cache"], f"{p}.local_cache") if "local_cache" in raw else d.local_cache
    return StorageConfig(
        backend=backend,
        bucket=bucket,
        prefix=prefix,
        endpoint_url=endpoint.rstrip("/") if endpoint else None,
        region=_get(raw, "region", p, str, d.region),
        local_cache=cache,
        serve=serve,
        redirect_expiry=expiry,
        multipart_threshold=threshold,
        timeout=parse_duration(raw["timeout"], f"{p}.timeout") if "timeout" in raw else d.timeout,
    )


def _parse_webhook(i: int, raw: object, env: Mapping[str, str]) -> WebhookConfig:
    p = f"webhooks[{i}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a table ([[webhooks]])")
    _only_keys(raw, p, {"url", "events", "domain", "repository", "secret_env"})
    url = _get(raw, "url", p, str, "")
    if urlsplit(url).scheme not in {"http", "https"}:
        raise ConfigError(f"{p}.url: expected an http(s) URL, got {url!r}")
    events = tuple(_get(raw, "events", p, list, list(WEBHOOK_EVENTS)))
    unknown = [e for e in events if e not in WEBHOOK_EVENTS]
    if unknown or not events:
        raise ConfigError(f"{p}.events: a list of {', '.join(WEBHOOK_EVENTS)}")
    secret_env = _get(raw, "secret_env", p, str, None)
    if secret_env is not None and not env.get(secret_env):
        raise ConfigError(f"{p}.secret_env: the environment variable {secret_env} is not set")
    return WebhookConfig(
        url=url,
        events=events,
        domain=_get(raw, "domain", p, str, None),
        repository=_get(raw, "repository", p, str, None),
        secret_env=secret_env,
    )


def _without_upstreams(domains_raw: list[Any], names: set[str]) -> list[Any]:
    out = []
    for domain in domains_raw:
        if not isinstance(domain, dict) or not isinstance(domain.get("repositories"), list):
            out.append(domain)
            continue
        repos = []
        for repo in domain["repositories"]:
            if isinstance(repo, dict) and isinstance(repo.get("upstreams"), list):
                repo = {**repo, "upstreams": [u for u in repo["upstreams"] if u not in names]}
            repos.append(repo)
        out.append({**domain, "repositories": repos})
    return out


def check_upstream_graph(config: Config) -> None:
    """Reject cycles among repositories: resolution would otherwise never end."""
    for domain in config.domains:
        graph = {r.name: [u for u in r.upstreams if domain.repository(u)] for r in domain.repositories}
        state: dict[str, int] = {}
        for name in graph:
            _visit(domain.name, graph, state, name, [])


def _visit(
    domain: str, graph: dict[str, list[str]], state: dict[str, int], node: str, path: list[str]
) -> None:
    """Depth-first walk; a node met again while still on the path closes a cycle."""
    if state.get(node) == 2:
        return
    if state.get(node) == 1:
        cycle = " -> ".join([*path[path.index(node) :], node])
        raise ConfigError(f"domains.{domain}: upstream cycle {cycle}")
    state[node] = 1
    for nxt in graph[node]:
        _visit(domain, graph, state, nxt, [*path, node])
    state[node] = 2


def validate_domain(domain: DomainConfig, connections: Mapping[str, object]) -> None:
    """Check a domain's repositories: unique names, known upstreams, no cycles.

    Used for the config file at startup and for every change made through the admin API.
    """
    name = domain.name
    repo_names = {r.name for r in domain.repositories}
    if len(repo_names) != len(domain.repositories):
        raise ConfigError(f"domains.{name}.repositories: a repository name is used twice")
    for repo in domain.repositories:
        if len(set(repo.upstreams)) != len(repo.upstreams):
            raise ConfigError(f"domains.{name}.{repo.name}.upstreams: a name is listed twice")
        if repo.name in connections:
            raise ConfigError(
                f"domains.{name}.{repo.name}: a repository cannot share its name with a connection "
                "under [upstreams] (upstream lists would be ambiguous)"
            )
        for upstream in repo.upstreams:
            if upstream == repo.name:
                raise ConfigError(
                    f"domains.{name}.{repo.name}.upstreams: a repository cannot be its own upstream"
                )
            if upstream not in repo_names and upstream not in connections:
                raise ConfigError(
                    f"domains.{name}.{repo.name}.upstreams: {upstream!r} is neither a repository of "
                    "this domain nor a connection under [upstreams]"
                )
    check_upstream_graph(Config(domains=(domain,)))


def _table(raw: Mapping[str, Any], key: str, prefix: str = "") -> Mapping[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{_join(prefix, key)}: expected a table")
    return value


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _only_keys(raw: Mapping[str, Any], prefix: str, allowed: set[str]) -> None:
    for key in raw:
        if key not in allowed:
            raise ConfigError(f"{_join(prefix, key)}: unknown setting (known: {', '.join(sorted(allowed))})")


def _get(raw: Mapping[str, Any], key: str, prefix: str, kind: type, default: Any) -> Any:
    if key not in raw:
        return default
    value = raw[key]
    if kind is int and isinstance(value, bool):
        raise ConfigError(f"{_join(prefix, key)}: expected an integer, got {value!r}")
    if not isinstance(value, kind):
        raise ConfigError(f"{_join(prefix, key)}: expected {kind.__name__}, got {value!r}")
    return value


def _parse_server(raw: Mapping[str, Any], overrides: Overrides) -> ServerConfig:
    d = ServerConfig()
    p = "server"
    durations = {
        "soft_deadline",
        "negative_ttl",
        "max_staleness",
        "asset_timeout",
        "shutdown_timeout",
        "client_timeout",
        "token_default_duration",
        "token_min_duration",
        "token_max_duration",
        "gc_interval",
        "auth_failure_window",
    }
    sizes = {"max_metadata_size", "max_asset_size", "max_upload_size", "memory_cache_size", "gc_max_size"}
    plain = {"listen", "data_dir", "offline", "public_url", "trust_forwarded", "hot_cache_entries", "auth"}
    plain |= {"admin_token_file", "audit_fetches", "audit_file", "tls_cert", "tls_key"}
    plain |= {"encryption_key_env", "encryption_key_file", "auth_failure_limit"}
    _only_keys(raw, p, durations | sizes | plain)
    listen = overrides.listen or _get(raw, "listen", p, str, f"{d.host}:{d.port}")
    host, port = parse_listen(
        listen, "--listen / ARTIFACT_PROXY_LISTEN" if overrides.listen else f"{p}.listen"
    )
    data_dir = overrides.data_dir or Path(_get(raw, "data_dir", p, str, str(d.data_dir)))
    offline = overrides.offline if overrides.offline is not None else _get(raw, "offline", p, bool, False)
    public_url = _get(raw, "public_url", p, str, "") or None
    if public_url is not None:
        parts = urlsplit(public_url)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ConfigError(f"{p}.public_url: expected an http(s) URL, got {public_url!r}")
        public_url = public_url.rstrip("/")
    entries = _get(raw, "hot_cache_entries", p, int, d.hot_cache_entries)
    if entries < 16:
        raise ConfigError(f"{p}.hot_cache_entries: must be at least 16")
    values: dict[str, Any] = {k: parse_duration(raw[k], f"{p}.{k}") for k in durations if k in raw}
    values |= {k: parse_size(raw[k], f"{p}.{k}") for k in sizes if k in raw}
    for key in ("admin_token_file", "audit_file", "tls_cert", "tls_key", "encryption_key_file"):
        path = getattr(overrides, key, None) or _get(raw, key, p, str, "")
        values[key] = Path(path) if path else None
    if (values["tls_cert"] is None) != (values["tls_key"] is None):
        raise ConfigError(f"{p}.tls_cert and {p}.tls_key: give both or neither")
    fetches = _get(raw, "audit_fetches", p, str, d.audit_fetches)
    if fetches not in {"all", "misses", "none"}:
        raise ConfigError(f"{p}.audit_fetches: one of all, misses, none; got {fetches!r}")
    low = values.get("token_min_duration", d.token_min_duration)
    high = values.get("token_max_duration", d.token_max_duration)
    default = values.get("token_default_duration", min(d.token_default_duration, high))
    if not 0 < low <= default <= high:
        raise ConfigError(f"{p}: token durations must satisfy 0 < min <= default <= max")
    values["token_default_duration"] = default
    if values.get("client_timeout", d.client_timeout) <= 0:  # 0 would turn the bound off
        raise ConfigError(f"{p}.client_timeout: must be more than 0")
    failure_limit = _get(raw, "auth_failure_limit", p, int, d.auth_failure_limit)
    if failure_limit < 0:
        raise ConfigError(f"{p}.auth_failure_limit: must be 0 (off) or more")
    values["auth_failure_limit"] = failure_limit
    return replace(
        d,
        host=host,
        port=port,
        data_dir=data_dir,
        offline=offline,
        public_url=public_url,
        trust_forwarded=_get(raw, "trust_forwarded", p, bool, False),
        hot_cache_entries=entries,
        auth=_get(raw, "auth", p, bool, True),
        encryption_key_env=_get(raw, "encryption_key_env", p, str, "") or None,
        audit_fetches=fetches,
        **values,
    )


def _parse_upstream(
    name: str, raw: Mapping[str, Any], server: ServerConfig, env: Mapping[str, str]
) -> UpstreamConfig:
    p = f"upstreams.{name}"
    if not UPSTREAM_NAME_RE.match(name):
        raise ConfigError(f"{p}: invalid connection name (letters, digits, '.', '_', '-')")
    durations = {
        "metadata_ttl",
        "connect_timeout",
        "read_timeout",
        "metadata_timeout",
        "breaker_cooldown",
    }
    ints = {"retries", "max_connections", "breaker_threshold"}
    _only_keys(
        raw, p, durations | ints | {"format", "url", "allow_hosts", "credentials", "optional", "ca_bundle"}
    )
    optional = _get(raw, "optional", p, bool, False)
    fmt = _get(raw, "format", p, str, None)
    if fmt is None:
        raise ConfigError(f"{p}.format: required (one of {', '.join(KNOWN_FORMATS)})")
    if fmt not in KNOWN_FORMATS:
        raise ConfigError(f"{p}.format: unknown format {fmt!r} (known: {', '.join(KNOWN_FORMATS)})")
    url = _get(raw, "url", p, str, None)
    if url is None:
        raise ConfigError(f"{p}.url: required")
    discover = {PIP_INDEX_URL: pip_index_url, NPM_REGISTRY: npm_registry_url}.get(url)
    if discover is not None:
        try:
            url = discover(env)
        except DiscoveryError as exc:
            if optional:
                raise _Skipped(f"{p}: left out: {exc}") from exc
            raise ConfigError(f"{p}.url: {exc}") from exc
    parts = urlsplit(url)
    url_credentials: CredentialsConfig | None = None
    if parts.username is not None or parts.password is not None:
        # Never kept in the URL: a URL is printed in logs, errors and the index. A URL found in
        # pip's setup (what `aws codeartifact login --tool pip` writes) keeps working: its
        # secret becomes a basic credential read from that same setup at run time, sent to
        # this origin only. Written into our own config, it is refused and not repeated.
        if discover is None or "credentials" in raw:
            raise ConfigError(
                f"{p}.url: the URL carries credentials (user:password@host); give the URL without "
                f"them and put the secret in [{p}.credentials] (password_env or password_file)"
            )
        url_credentials = CredentialsConfig(
            type="basic", username=unquote(parts.username or ""), secret_from_url=raw["url"]
        )
        netloc = parts.hostname or ""
        if ":" in netloc:
            netloc = f"[{netloc}]"
        if parts.port is not None:
            netloc += f":{parts.port}"
        parts = parts._replace(netloc=netloc)
        url = urlunsplit(parts)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ConfigError(f"{p}.url: expected an http(s) URL, got {url!r}")
    if _points_at_self(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), server):
        raise ConfigError(
            f"{p}.url: {url} is this proxy's own address; an upstream pointing at itself would loop "
            "(set PIP_INDEX_URL or the url key to the real index)"
        )
    if fmt == "nuget" and not parts.path.endswith(".json"):
        raise ConfigError(
            f"{p}.url: a NuGet connection names the feed's service index (…/index.json), got {url!r}"
        )
    if not url.endswith("/") and fmt != "nuget":  # a NuGet URL is its service index document
        url += "/"
    allow = _get(raw, "allow_hosts", p, list, [])
    if not all(isinstance(h, str) and h for h in allow):
        raise ConfigError(f"{p}.allow_hosts: expected a list of host names or patterns")
    values: dict[str, Any] = {k: parse_duration(raw[k], f"{p}.{k}") for k in durations if k in raw}
    for key in ints:
        if key in raw:
            number = _get(raw, key, p, int, 0)
            if number < (0 if key == "retries" else 1):
                raise ConfigError(f"{p}.{key}: must be {'>= 0' if key == 'retries' else '>= 1'}")
            values[key] = number
    bundle = _get(raw, "ca_bundle", p, str, "")
    if bundle:
        values["ca_bundle"] = Path(bundle)
    if "credentials" in raw:
        values["credentials"] = _parse_credentials(f"{p}.credentials", raw["credentials"], env)
    elif url_credentials is not None:
        values["credentials"] = url_credentials
    return UpstreamConfig(
        name=name, format=fmt, url=url, allow_hosts=tuple(h.lower() for h in allow), **values
    )


def _parse_credentials(p: str, raw: object, env: Mapping[str, str]) -> CredentialsConfig:
    """A connection's ``[credentials]``: secrets only by reference (variable, file, command)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a table")
    kind = _get(raw, "type", p, str, None)
    keys: dict[str, set[str]] = {
        "basic": {"username", "password_env", "password_file"},
        "bearer": {"token_env", "token_file"},
        "command": {"command", "username"},
        "codeartifact": {"domain", "domain_owner", "region", "duration", "endpoint_url", "username"},
    }
    if kind not in keys:
        raise ConfigError(f"{p}.type: one of {', '.join(keys)}; got {kind!r}")
    _only_keys(raw, p, keys[kind] | {"type"})
    for secret_key in ("password", "token", "secret"):
        if secret_key in raw:
            raise ConfigError(
                f"{p}.{secret_key}: secrets are never inline; use {secret_key}_env or {secret_key}_file"
            )
    values: dict[str, Any] = {"type": kind, "username": _get(raw, "username", p, str, "aws")}
    if kind in {"basic", "bearer"}:
        prefix = "password" if kind == "basic" else "token"
        var = _get(raw, f"{prefix}_env", p, str, None)
        file = _get(raw, f"{prefix}_file", p, str, None)
        if (var is None) == (file is None):
            raise ConfigError(f"{p}: give exactly one of {prefix}_env and {prefix}_file")
        if var is not None and not env.get(var):
            raise ConfigError(f"{p}.{prefix}_env: the environment variable {var} is not set")
        values["secret_env"] = var
        values["secret_file"] = Path(file) if file else None
    elif kind == "command":
        command = _get(raw, "command", p, list, None)
        if not command or not all(isinstance(c, str) and c for c in command):
            raise ConfigError(f"{p}.command: a non-empty list of strings (the program and its arguments)")
        values["command"] = tuple(command)
    else:
        for key in ("domain", "domain_owner", "region"):
            values[key] = _get(raw, key, p, str, "")
            if not values[key]:
                raise ConfigError(f"{p}.{key}: required for a CodeArtifact connection")
        duration = parse_duration(raw["duration"], f"{p}.duration") if "duration" in raw else 12 * 3600.0
        if not 900 <= duration <= 43200:
            raise ConfigError(f"{p}.duration: between 15m and 12h (CodeArtifact's bounds)")
        values["duration"] = duration
        values["endpoint_url"] = _get(raw, "endpoint_url", p, str, None)
    return CredentialsConfig(**values)


def _points_at_self(host: str, port: int, server: ServerConfig) -> bool:
    if port != server.port:
        return False
    local_names = {"localhost", server.host.lower(), "0.0.0.0", "::"}  # noqa: S104
    if host.lower() in local_names:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse_domain(index: int, raw: object, upstreams: Mapping[str, UpstreamConfig]) -> DomainConfig:
    p = f"domains[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a table")
    _only_keys(raw, p, {"name", "repositories"})
    name = _get(raw, "name", p, str, None)
    if name is None or not NAME_RE.match(name):
        raise ConfigError(f"{p}.name: expected a name matching [a-z][a-z0-9-]{{1,49}}, got {name!r}")
    repos_raw = _get(raw, "repositories", p, list, [])
    repos = tuple(_parse_repository(f"domains.{name}.repositories[{i}]", r) for i, r in enumerate(repos_raw))
    domain = DomainConfig(name=name, repositories=repos)
    validate_domain(domain, upstreams)
    return domain


def _parse_repository(p: str, raw: object) -> RepositoryConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a table")
    _only_keys(
        raw, p, {"name", "upstreams", "description", "min_release_age", "allow_redeploy", "anonymous_read"}
    )
    name = _get(raw, "name", p, str, None)
    if name is None or not NAME_RE.match(name):
        raise ConfigError(f"{p}.name: expected a name matching [a-z][a-z0-9-]{{1,49}}, got {name!r}")
    ups = _get(raw, "upstreams", p, list, [])
    if not all(isinstance(u, str) for u in ups):
        raise ConfigError(f"{p}.upstreams: expected a list of names")
    if len(set(ups)) != len(ups):
        raise ConfigError(f"{p}.upstreams: a name is listed twice")
    age = parse_duration(raw["min_release_age"], f"{p}.min_release_age") if "min_release_age" in raw else 0.0
    return RepositoryConfig(
        name=name,
        upstreams=tuple(ups),
        description=_get(raw, "description", p, str, ""),
        min_release_age=age,
        allow_redeploy=_get(raw, "allow_redeploy", p, bool, False),
        anonymous_read=_get(raw, "anonymous_read", p, bool, False),
    )
