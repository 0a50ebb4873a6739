"""Configuration: value parsers, document validation, overrides, pip discovery and check-config."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from proxy.cli import main
from proxy.config import (
    ConfigError,
    Overrides,
    load_config,
    parse_config,
    parse_duration,
    parse_listen,
    parse_size,
)
from proxy.upstream.discovery import PIP_INDEX_URL, pip_index_url

MIRROR = "http://mirror.invalid/simple/"
NPM_MIRROR = "http://npm-mirror.invalid/"
ENV = {"PIP_INDEX_URL": MIRROR, "npm_config_registry": NPM_MIRROR}


def document(
    *,
    server: dict[str, Any] | None = None,
    upstreams: dict[str, Any] | None = None,
    repositories: list[dict[str, Any]] | None = None,
    domains: list[dict[str, Any]] | None = None,
    **top: Any,
) -> dict[str, Any]:
    """A minimal valid document; each argument replaces its part."""
    raw: dict[str, Any] = {
        "server": {"listen": "127.0.0.1:8080", "data_dir": "/srv/proxy"} if server is None else server,
        "upstreams": {"mirror": {"format": "pypi", "url": MIRROR}} if upstreams is None else upstreams,
        "domains": domains
        if domains is not None
        else [
            {
                "name": "default",
                "repositories": repositories
                if repositories is not None
                else [{"name": "public", "upstreams": ["mirror"]}],
            }
        ],
    }
    raw.update(top)
    return raw


# --- value parsers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("250ms", 0.25),
        ("30s", 30.0),
        ("10m", 600.0),
        ("1.5h", 5400.0),
        ("7d", 7 * 86400.0),
        (" 10 m ", 600.0),
        ("45", 45.0),
        (12, 12.0),
        (0.5, 0.5),
        (0, 0.0),
    ],
)
def test_parse_duration_valid(value: object, seconds: float) -> None:
    assert parse_duration(value, "upstreams.x.metadata_ttl") == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["10x", "ten minutes", "", "-5s", "1m30s", True, None, [10]])
def test_parse_duration_invalid_names_key(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^upstreams\.x\.metadata_ttl: expected a duration"):
        parse_duration(value, "upstreams.x.metadata_ttl")


def test_parse_duration_negative_number() -> None:
    with pytest.raises(
        ConfigError, match=r"^server\.soft_deadline: a duration must be a finite, non-negative"
    ):
        parse_duration(-1, "server.soft_deadline")


def test_parse_duration_rejects_nan() -> None:
    with pytest.raises(ConfigError, match=r"server\.soft_deadline"):
        parse_duration(float("nan"), "server.soft_deadline")


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("512KiB", 512 * 1024),
        ("50MiB", 50 * 2**20),
        ("1GiB", 2**30),
        ("1GB", 10**9),
        ("2kb", 2000),
        ("1.5KiB", 1536),
        ("10 mib", 10 * 2**20),
        ("100B", 100),
        ("4096", 4096),
        (4096, 4096),
        (0, 0),
    ],
)
def test_parse_size_valid(value: object, size: int) -> None:
    assert parse_size(value, "server.max_asset_size") == size


@pytest.mark.parametrize("value", ["5XB", "lots", "", "-1MiB", 1.5, True, None])
def test_parse_size_invalid_names_key(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^server\.max_asset_size: expected a size"):
        parse_size(value, "server.max_asset_size")


def test_parse_size_negative_number() -> None:
    with pytest.raises(ConfigError, match=r"^server\.max_asset_size: a size cannot be negative"):
        parse_size(-1, "server.max_asset_size")


@pytest.mark.parametrize(
    ("value", "parts"),
    [
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("localhost:65535", ("localhost", 65535)),
        ("[::1]:9000", ("::1", 9000)),
        ("[::]:80", ("::", 80)),
    ],
)
def test_parse_listen_valid(value: str, parts: tuple[str, int]) -> None:
    assert parse_listen(value, "server.listen") == parts


@pytest.mark.parametrize(
    "value", ["8080", "localhost", "::1:8080", "host:port", ":8080", "a:b:1", 8080, None]
)
def test_parse_listen_invalid_names_key(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^server\.listen: expected 'host:port'"):
        parse_listen(value, "server.listen")


def test_parse_listen_port_out_of_range() -> None:
    with pytest.raises(ConfigError, match=r"^server\.listen: port 70000 is out of range"):
        parse_listen("127.0.0.1:70000", "server.listen")


# --- documents --------------------------------------------------------------------------------


def test_minimal_document() -> None:
    config = parse_config(document(), Overrides(), {})
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8080)
    assert config.server.data_dir == Path("/srv/proxy")
    assert config.server.offline is False
    mirror = config.upstreams["mirror"]
    assert (mirror.name, mirror.format, mirror.url) == ("mirror", "pypi", MIRROR)
    assert mirror.metadata_ttl == 600.0
    assert mirror.origin == ("http", "mirror.invalid", 80)
    domain = config.domain("default")
    assert domain is not None
    public = domain.repository("public")
    assert public is not None
    assert public.upstreams == ("mirror",)
    assert config.domain("other") is None
    assert domain.repository("other") is None


def test_document_values_are_parsed() -> None:
    raw = document(
        server={
            "listen": "[::1]:9000",
            "data_dir": "d",
            "offline": True,
            "public_url": "https://proxy.invalid/base/",
            "soft_deadline": "250ms",
            "max_asset_size": "1GiB",
            "hot_cache_entries": 64,
        },
        upstreams={
            "mirror": {
                "format": "pypi",
                "url": "https://mirror.invalid/simple",
                "metadata_ttl": "1h",
                "retries": 0,
                "allow_hosts": ["Files.Mirror.Invalid"],
            }
        },
        repositories=[
            {"name": "public", "upstreams": ["mirror"], "description": "cache"},
            {"name": "team", "upstreams": ["public"]},
        ],
    )
    config = parse_config(raw, Overrides(), {})
    server = config.server
    assert (server.host, server.port, server.offline) == ("::1", 9000, True)
    assert server.public_url == "https://proxy.invalid/base"
    assert server.soft_deadline == 0.25
    assert server.max_asset_size == 2**30
    assert server.hot_cache_entries == 64
    mirror = config.upstreams["mirror"]
    assert mirror.url == "https://mirror.invalid/simple/"  # a trailing slash is added
    assert mirror.metadata_ttl == 3600.0
    assert mirror.retries == 0
    assert mirror.allow_hosts == ("files.mirror.invalid",)
    domain = config.domain("default")
    assert domain is not None
    assert [r.name for r in domain.repositories] == ["public", "team"]
    assert domain.repositories[0].description == "cache"


def _invalid_cases() -> list[Any]:
    mirror = {"format": "pypi", "url": MIRROR}
    return [
        pytest.param(document(extra={}), ("extra", "unknown setting"), id="unknown-top-key"),
        pytest.param(
            document(server={"listen": "127.0.0.1:8080", "colour": "blue"}),
            ("server.colour", "unknown setting"),
            id="unknown-server-key",
        ),
        pytest.param(
            document(upstreams={"mirror": {**mirror, "timeout": "5s"}}),
            ("upstreams.mirror.timeout", "unknown setting"),
            id="unknown-upstream-key",
        ),
        pytest.param(
            document(repositories=[{"name": "public", "upstreams": ["mirror"], "mirrors": []}]),
            ("domains.default.repositories[0].mirrors", "unknown setting"),
            id="unknown-repository-key",
        ),
        pytest.param(
            document(domains=[{"name": "Default", "repositories": []}]),
            ("domains[0].name", "'Default'"),
            id="bad-domain-name",
        ),
        pytest.param(
            document(domains=[{"repositories": []}]),
            ("domains[0].name",),
            id="missing-domain-name",
        ),
        pytest.param(
            document(repositories=[{"name": "Public_Repo", "upstreams": ["mirror"]}]),
            ("domains.default.repositories[0].name", "'Public_Repo'"),
            id="bad-repository-name",
        ),
        pytest.param(
            document(upstreams={"bad name": mirror}, repositories=[]),
            ("upstreams.bad name", "invalid connection name"),
            id="bad-connection-name",
        ),
        pytest.param(
            document(repositories=[{"name": "public", "upstreams": ["nope"]}]),
            ("domains.default.public.upstreams", "'nope'"),
            id="unknown-upstream-name",
        ),
        pytest.param(
            document(repositories=[{"name": "public", "upstreams": ["public"]}]),
            ("domains.default.public.upstreams", "own upstream"),
            id="own-upstream",
        ),
        pytest.param(
            document(
                repositories=[
                    {"name": "public", "upstreams": ["mirror"]},
                    {"name": "team", "upstreams": ["shared", "public"]},
                    {"name": "shared", "upstreams": ["team"]},
                ]
            ),
            ("domains.default", "cycle", "team -> shared -> team"),
            id="cycle",
        ),
        pytest.param(
            document(upstreams={"mirror": {"format": "rubygems", "url": MIRROR}}),
            ("upstreams.mirror.format", "'rubygems'"),
            id="unknown-format",
        ),
        pytest.param(
            document(upstreams={"mirror": {"url": MIRROR}}),
            ("upstreams.mirror.format", "required"),
            id="missing-format",
        ),
        pytest.param(
            document(upstreams={"mirror": {"format": "pypi"}}),
            ("upstreams.mirror.url", "required"),
            id="missing-url",
        ),
        pytest.param(
            document(upstreams={"mirror": {"format": "pypi", "url": "ftp://mirror.invalid/simple/"}}),
            ("upstreams.mirror.url", "http(s) URL"),
            id="ftp-url",
        ),
        pytest.param(
            document(upstreams={"mirror": {"format": "pypi", "url": "file:///opt/simple/"}}),
            ("upstreams.mirror.url", "http(s) URL"),
            id="file-url",
        ),
        pytest.param(
            document(upstreams={"mirror": {"format": "pypi", "url": "http://localhost:8080/simple/"}}),
            ("upstreams.mirror.url", "own address"),
            id="url-is-self-localhost",
        ),
        pytest.param(
            document(upstreams={"mirror": {"format": "pypi", "url": "http://127.0.0.1:8080/simple/"}}),
            ("upstreams.mirror.url", "own address"),
            id="url-is-self-ip",
        ),
        pytest.param(
            document(
                server={"listen": "0.0.0.0:8080"},
                upstreams={"mirror": {"format": "pypi", "url": "http://[::1]:8080/simple/"}},
            ),
            ("upstreams.mirror.url", "own address"),
            id="url-is-self-v6-loopback",
        ),
        pytest.param(
            document(
                domains=[
                    {"name": "default", "repositories": []},
                    {"name": "default", "repositories": []},
                ]
            ),
            ("domains", "used twice"),
            id="duplicate-domain",
        ),
        pytest.param(
            document(
                repositories=[
                    {"name": "public", "upstreams": ["mirror"]},
                    {"name": "public", "upstreams": []},
                ]
            ),
            ("domains.default.repositories", "used twice"),
            id="duplicate-repository",
        ),
        pytest.param(
            document(repositories=[{"name": "public", "upstreams": ["mirror", "mirror"]}]),
            ("domains.default.repositories[0].upstreams", "listed twice"),
            id="duplicate-upstream-entry",
        ),
        pytest.param(
            document(upstreams={"mirror": {**mirror, "retries": -1}}),
            ("upstreams.mirror.retries", ">= 0"),
            id="negative-retries",
        ),
        pytest.param(
            document(upstreams={"mirror": {**mirror, "breaker_threshold": 0}}),
            ("upstreams.mirror.breaker_threshold", ">= 1"),
            id="zero-breaker-threshold",
        ),
        pytest.param(
            document(upstreams={"mirror": {**mirror, "metadata_ttl": "soon"}}),
            ("upstreams.mirror.metadata_ttl", "duration"),
            id="bad-duration",
        ),
        pytest.param(
            document(server={"listen": "127.0.0.1"}),
            ("server.listen", "host:port"),
            id="bad-listen",
        ),
        pytest.param(
            document(server={"offline": "yes"}),
            ("server.offline", "expected bool"),
            id="offline-not-bool",
        ),
        pytest.param(
            document(server={"hot_cache_entries": 4}),
            ("server.hot_cache_entries", "at least 16"),
            id="tiny-hot-cache",
        ),
        pytest.param(
            document(server={"public_url": "proxy.invalid"}),
            ("server.public_url", "http(s) URL"),
            id="bad-public-url",
        ),
        pytest.param(
            {**document(), "domains": {"name": "default"}}, ("domains", "array"), id="domains-not-array"
        ),
        pytest.param(document(upstreams={"mirror": "x"}), ("upstreams.mirror", "table"), id="upstream-str"),
    ]


@pytest.mark.parametrize(("raw", "fragments"), _invalid_cases())
def test_invalid_document_names_the_key(raw: dict[str, Any], fragments: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, Overrides(), {})
    message = str(info.value)
    assert message.startswith(fragments[0]), message
    for fragment in fragments[1:]:
        assert fragment in message


def test_same_host_other_port_is_not_self() -> None:
    raw = document(upstreams={"mirror": {"format": "pypi", "url": "http://localhost:8081/simple/"}})
    assert parse_config(raw, Overrides(), {}).upstreams["mirror"].url == "http://localhost:8081/simple/"


def test_repository_chain_without_cycle_is_accepted() -> None:
    raw = document(
        repositories=[
            {"name": "team", "upstreams": ["shared"]},
            {"name": "shared", "upstreams": ["public"]},
            {"name": "public", "upstreams": ["mirror"]},
            {"name": "other", "upstreams": ["shared", "public"]},
        ]
    )
    domain = parse_config(raw, Overrides(), {}).domain("default")
    assert domain is not None
    assert [r.name for r in domain.repositories] == ["team", "shared", "public", "other"]


# --- overrides --------------------------------------------------------------------------------


def test_overrides_beat_the_file() -> None:
    raw = document(server={"listen": "127.0.0.1:8080", "data_dir": "/srv/proxy", "offline": False})
    overrides = Overrides(listen="0.0.0.0:9000", data_dir=Path("elsewhere"), offline=True)
    server = parse_config(raw, overrides, {}).server
    assert (server.host, server.port) == ("0.0.0.0", 9000)
    assert server.data_dir == Path("elsewhere")
    assert server.offline is True


def test_offline_false_override_beats_file_true() -> None:
    raw = document(server={"offline": True})
    assert parse_config(raw, Overrides(offline=False), {}).server.offline is False
    assert parse_config(raw, Overrides(), {}).server.offline is True


def test_bad_listen_override_names_the_flag() -> None:
    with pytest.raises(ConfigError, match=r"^--listen / ARTIFACT_PROXY_LISTEN: "):
        parse_config(document(), Overrides(listen="nowhere"), {})


def test_self_check_uses_the_overridden_port() -> None:
    raw = document(upstreams={"mirror": {"format": "pypi", "url": "http://localhost:9000/simple/"}})
    assert parse_config(raw, Overrides(), {}).upstreams["mirror"].url == "http://localhost:9000/simple/"
    with pytest.raises(ConfigError, match=r"^upstreams\.mirror\.url: .*own address"):
        parse_config(raw, Overrides(listen="127.0.0.1:9000"), {})


def test_overrides_from_env() -> None:
    overrides = Overrides.from_env(
        {
            "ARTIFACT_PROXY_OFFLINE": "true",
            "ARTIFACT_PROXY_LISTEN": "0.0.0.0:9000",
            "ARTIFACT_PROXY_DATA_DIR": "env-data",
            "ARTIFACT_PROXY_CONFIG": "proxy.toml",
            "UNRELATED": "x",
        }
    )
    assert overrides == Overrides(
        config_file=Path("proxy.toml"), listen="0.0.0.0:9000", data_dir=Path("env-data"), offline=True
    )


def test_overrides_from_empty_env() -> None:
    assert Overrides.from_env({}) == Overrides()
    empty = {"ARTIFACT_PROXY_OFFLINE": "", "ARTIFACT_PROXY_LISTEN": "", "ARTIFACT_PROXY_DATA_DIR": ""}
    assert Overrides.from_env(empty) == Overrides()


@pytest.mark.parametrize(
    ("raw", "offline"),
    [("1", True), ("yes", True), ("On", True), (" TRUE ", True), ("0", False), ("no", False), ("off", False)],
)
def test_offline_env_values(raw: str, offline: bool) -> None:
    assert Overrides.from_env({"ARTIFACT_PROXY_OFFLINE": raw}).offline is offline


def test_offline_env_invalid_names_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"^ARTIFACT_PROXY_OFFLINE: .*'maybe'"):
        Overrides.from_env({"ARTIFACT_PROXY_OFFLINE": "maybe"})


def test_flags_over_env() -> None:
    env = Overrides(
        config_file=Path("env.toml"), listen="10.0.0.1:1000", data_dir=Path("env-data"), offline=True
    )
    flags = Overrides(listen="127.0.0.1:2000", offline=False)
    merged = flags.over(env)
    assert merged == Overrides(
        config_file=Path("env.toml"), listen="127.0.0.1:2000", data_dir=Path("env-data"), offline=False
    )
    assert Overrides().over(env) == env
    assert env.over(Overrides()) == env


# --- pip discovery ----------------------------------------------------------------------------


def test_pip_index_url_from_env_mapping() -> None:
    raw = document(upstreams={"mirror": {"format": "pypi", "url": PIP_INDEX_URL}})
    config = parse_config(raw, Overrides(), {"PIP_INDEX_URL": MIRROR})
    assert config.upstreams["mirror"].url == MIRROR


def test_pip_index_url_takes_the_first_of_several() -> None:
    assert pip_index_url({"PIP_INDEX_URL": "  http://a.invalid/simple/ http://b.invalid/simple/"}) == (
        "http://a.invalid/simple/"
    )


def test_pip_index_url_without_env_is_some_http_url() -> None:
    url = pip_index_url({})
    assert urlsplit(url).scheme in {"http", "https"}
    assert urlsplit(url).hostname


def test_pip_index_url_in_document_without_env() -> None:
    raw = document(upstreams={"mirror": {"format": "pypi", "url": PIP_INDEX_URL}})
    url = parse_config(raw, Overrides(), {}).upstreams["mirror"].url
    assert urlsplit(url).scheme in {"http", "https"}
    assert url.endswith("/")


def test_pip_index_url_pointing_at_self_is_refused() -> None:
    raw = document(upstreams={"mirror": {"format": "pypi", "url": PIP_INDEX_URL}})
    with pytest.raises(ConfigError, match=r"^upstreams\.mirror\.url: .*own address"):
        parse_config(raw, Overrides(), {"PIP_INDEX_URL": "http://localhost:8080/simple/"})


def test_embedded_default_config() -> None:
    config = load_config(Overrides(), dict(ENV))
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8080)
    assert config.server.data_dir == Path("data")
    assert [d.name for d in config.domains] == ["default"]
    domain = config.domain("default")
    assert domain is not None
    assert [r.name for r in domain.repositories] == ["public"]
    assert config.upstreams["pypi"].url == MIRROR
    assert config.upstreams["npm"].url == NPM_MIRROR
    public = domain.repository("public")
    assert public is not None
    assert public.upstreams == ("pypi", "npm", "maven-central", "nuget-org")
    assert config.upstreams["nuget-org"].url == "https://api.nuget.org/v3/index.json"
    assert config.upstreams["maven-central"].format == "maven"
    assert config.upstreams["maven-central"].url == "https://repo.maven.apache.org/maven2/"


def test_embedded_default_leaves_out_npm_where_npm_is_missing() -> None:
    env = {"PIP_INDEX_URL": MIRROR, "PATH": "/nonexistent"}
    config = load_config(Overrides(), env)
    assert list(config.upstreams) == ["pypi", "maven-central", "nuget-org"]
    public = config.domains[0].repository("public")
    assert public is not None and public.upstreams == ("pypi", "maven-central", "nuget-org")
    assert any("upstreams.npm: left out" in note for note in config.notes)


# --- files and the CLI ------------------------------------------------------------------------

VALID_TOML = f"""
[server]
listen = "127.0.0.1:8080"
data_dir = "file-data"

[upstreams.mirror]
format = "pypi"
url = "{MIRROR}"
metadata_ttl = "5m"

[[domains]]
name = "default"

[[domains.repositories]]
name = "public"
upstreams = ["mirror"]
"""


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "ARTIFACT_PROXY_CONFIG",
        "ARTIFACT_PROXY_LISTEN",
        "ARTIFACT_PROXY_DATA_DIR",
        "ARTIFACT_PROXY_OFFLINE",
        "PIP_INDEX_URL",
    ):
        monkeypatch.delenv(name, raising=False)


def test_load_config_from_file(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(VALID_TOML, encoding="utf-8")
    config = load_config(Overrides(config_file=path), {})
    assert config.server.data_dir == Path("file-data")
    assert config.upstreams["mirror"].metadata_ttl == 300.0


def test_load_config_missing_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match=r"absent\.toml"):
        load_config(Overrides(config_file=path), {})


def test_load_config_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[server\nlisten = 1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"broken\.toml: invalid TOML"):
        load_config(Overrides(config_file=path), {})


@pytest.mark.usefixtures("clean_env")
def test_cli_check_config_valid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(VALID_TOML, encoding="utf-8")
    assert main(["check-config", "--config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert "listen 127.0.0.1:8080, data in file-data" in out
    assert f"upstream mirror: pypi {MIRROR}" in out
    assert "repository default/public <- mirror" in out


@pytest.mark.usefixtures("clean_env")
def test_cli_env_and_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(VALID_TOML, encoding="utf-8")
    monkeypatch.setenv("ARTIFACT_PROXY_CONFIG", str(path))
    monkeypatch.setenv("ARTIFACT_PROXY_LISTEN", "127.0.0.1:9999")
    monkeypatch.setenv("ARTIFACT_PROXY_DATA_DIR", "env-data")
    assert main(["check-config", "--data-dir", "flag-data"]) == 0
    out = capsys.readouterr().out
    assert "listen 127.0.0.1:9999, data in flag-data" in out


@pytest.mark.usefixtures("clean_env")
def test_cli_check_config_invalid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(VALID_TOML.replace('metadata_ttl = "5m"', 'metadata_ttl = "5 minutes"'), encoding="utf-8")
    assert main(["check-config", "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "configuration error" in err
    assert "upstreams.mirror.metadata_ttl" in err


@pytest.mark.usefixtures("clean_env")
def test_cli_check_config_unknown_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(VALID_TOML.replace("[server]", "[server]\nlistne = 1"), encoding="utf-8")
    assert main(["check-config", "--config", str(path)]) == 2
    assert "server.listne: unknown setting" in capsys.readouterr().err
