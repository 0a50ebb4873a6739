"""``artifact-proxy login``: a token, written into each tool's own configuration.

Like ``aws codeartifact login``, and more: every writer merges with what the file already holds
(other indexes, registries, servers and sources stay), ``--extra`` adds the repository next to
the tool's main index instead of replacing it, and Maven and Gradle are covered. Each writer is
a pure function from the current text to the new text plus a list of what changed, so
``--dry-run`` prints exactly what would be written.
"""

from __future__ import annotations

import configparser
import io
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit
from xml.etree.ElementTree import Element, SubElement, indent, register_namespace, tostring

from proxy import xmlsafe as xml

NAME = "artifact-proxy"
USER = "aws"  # any user name works; this one matches what CodeArtifact's tooling writes
TOOLS = ("pip", "uv", "poetry", "twine", "npm", "pnpm", "yarn", "maven", "gradle", "nuget")


@dataclass(frozen=True, slots=True)
class Target:
    """Where the repository is and the token that opens it."""

    endpoint: str  # http(s)://host:port, no trailing slash
    domain: str
    repository: str
    token: str
    extra: bool = False
    scope: str | None = None  # npm: route only this @scope to the repository

    def base(self, fmt: str) -> str:
        return f"{self.endpoint}/{quote(self.domain)}/{fmt}/{quote(self.repository)}"

    def with_credentials(self, url: str) -> str:
        parts = urlsplit(url)
        return url.replace(f"{parts.scheme}://", f"{parts.scheme}://{USER}:{quote(self.token, safe='')}@", 1)


@dataclass(frozen=True, slots=True)
class Edit:
    path: Path
    text: str
    changes: list[str]


def default_path(tool: str) -> Path:
    """The file each tool reads for its user-level configuration."""
    home = Path.home()
    config = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config")
    if tool == "pip":
        return (
            Path(os.environ["PIP_CONFIG_FILE"])
            if os.environ.get("PIP_CONFIG_FILE")
            else config / "pip" / "pip.conf"
        )
    return {
        "uv": config / "uv" / "uv.toml",
        "poetry": config / "pypoetry" / "auth.toml",
        "twine": home / ".pypirc",
        "npm": home / ".npmrc",
        "pnpm": home / ".npmrc",
        "yarn": home / ".npmrc",
        "maven": home / ".m2" / "settings.xml",
        "gradle": home / ".gradle" / "init.d" / f"{NAME}.gradle",
        "nuget": home / ".nuget" / "NuGet" / "NuGet.Config",
    }[tool]


def writer(tool: str) -> Callable[[str, Target], tuple[str, list[str]]]:
    return {
        "pip": pip_conf,
        "uv": uv_toml,
        "poetry": poetry_auth,
        "twine": pypirc,
        "npm": npmrc,
        "pnpm": npmrc,
        "yarn": npmrc,
        "maven": maven_settings,
        "gradle": gradle_init,
        "nuget": nuget_config,
    }[tool]


def plan(tool: str, path: Path, current: str, target: Target) -> Edit:
    text, changes = writer(tool)(current, target)
    return Edit(path, text, changes)


# --- Python ------------------------------------------------------------------------------------


def pip_conf(current: str, t: Target) -> tuple[str, list[str]]:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(current)
    if not parser.has_section("global"):
        parser.add_section("global")
    url = t.with_credentials(t.base("pypi") + "/simple/")
    if t.extra:
        extras = [
            u for u in parser.get("global", "extra-index-url", fallback="").split() if not _same_repo(u, t)
        ]
        parser.set("global", "extra-index-url", "\n".join([*extras, url]))
        change = "[global] extra-index-url += the repository"
    else:
        parser.set("global", "index-url", url)
        change = "[global] index-url = the repository"
    return _ini(parser), [change]


def uv_toml(current: str, t: Target) -> tuple[str, list[str]]:
    tomllib.loads(current or "")  # refuse to rewrite a file that is not TOML
    kept = _drop_toml_block(current, "[[index]]", f'name = "{NAME}"')
    block = f'\n[[index]]\nname = "{NAME}"\nurl = "{t.with_credentials(t.base("pypi") + "/simple/")}"\n' + (
        "" if t.extra else "default = true\n"
    )
    return kept.rstrip("\n") + "\n" + block, [f"[[index]] {NAME}" + ("" if t.extra else " (default)")]


def poetry_auth(current: str, t: Target) -> tuple[str, list[str]]:
    tomllib.loads(current or "")
    kept = _drop_toml_block(current, f'[http-basic."{NAME}"]', "")
    kept = _drop_toml_block(kept, f"[http-basic.{NAME}]", "")
    block = f'\n[http-basic.{NAME}]\nusername = "{USER}"\npassword = "{t.token}"\n'
    note = (
        f"[http-basic.{NAME}]; add a source named {NAME} with url {t.base('pypi')}/simple/ to pyproject.toml"
    )
    return kept.rstrip("\n") + "\n" + block, [note]


def pypirc(current: str, t: Target) -> tuple[str, list[str]]:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(current)
    if not parser.has_section("distutils"):
        parser.add_section("distutils")
    servers = parser.get("distutils", "index-servers", fallback="").split()
    if NAME not in servers:
        servers.append(NAME)
    parser.set("distutils", "index-servers", "\n".join(servers))
    if not parser.has_section(NAME):
        parser.add_section(NAME)
    parser.set(NAME, "repository", t.base("pypi") + "/")
    parser.set(NAME, "username", USER)
    parser.set(NAME, "password", t.token)
    return _ini(parser), [f"[{NAME}] repository, username, password (twine upload -r {NAME})"]


# --- npm, pnpm, yarn ----------------------------------------------------------------------------


def npmrc(current: str, t: Target) -> tuple[str, list[str]]:
    registry = t.base("npm") + "/"
    auth_key = registry.split(":", 1)[1] + ":_authToken"  # //host/path/:_authToken
    if t.scope:
        key = f"{t.scope}:registry"
    elif t.extra:
        raise ValueError("npm has one registry per scope: give --scope @name with --extra")
    else:
        key = "registry"
    lines = [line for line in current.splitlines() if line.split("=", 1)[0].strip() not in {key, auth_key}]
    lines += [f"{key}={registry}", f"{auth_key}={t.token}"]
    return "\n".join(lines) + "\n", [f"{key}={registry}", f"{auth_key}=(token)"]


# --- Maven and Gradle ---------------------------------------------------------------------------

MAVEN_NS = "http://maven.apache.org/SETTINGS/1.2.0"


def maven_settings(current: str, t: Target) -> tuple[str, list[str]]:
    root = xml.parse(current.encode()) if current.strip() else Element(f"{{{MAVEN_NS}}}settings")
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    if ns:
        register_namespace("", ns[1:-1])
    url = t.base("maven") + "/"
    changes = []

    def child(parent: Element, name: str) -> Element:
        found = parent.find(f"{ns}{name}")
        return found if found is not None else SubElement(parent, f"{ns}{name}")

    def replace_by_id(parent: Element, tag: str, fields: dict[str, str]) -> Element:
        for old in parent.findall(f"{ns}{tag}"):
            if old.findtext(f"{ns}id") == NAME:
                parent.remove(old)
        new = SubElement(parent, f"{ns}{tag}")
        for key, value in fields.items():
            SubElement(new, f"{ns}{key}").text = value
        return new

    replace_by_id(child(root, "servers"), "server", {"id": NAME, "username": USER, "password": t.token})
    changes.append(f"<server> {NAME} with the token")
    if t.extra:
        profiles = child(root, "profiles")
        profile = replace_by_id(profiles, "profile", {"id": NAME})
        for group, tag in (("repositories", "repository"), ("pluginRepositories", "pluginRepository")):
            holder = SubElement(profile, f"{ns}{group}")
            repo = SubElement(holder, f"{ns}{tag}")
            SubElement(repo, f"{ns}id").text = NAME
            SubElement(repo, f"{ns}url").text = url
            snapshots = SubElement(repo, f"{ns}snapshots")
            SubElement(snapshots, f"{ns}enabled").text = "true"
        changes.append(f"<profile> {NAME} adding the repository (active)")
    else:
        replace_by_id(child(root, "mirrors"), "mirror", {"id": NAME, "mirrorOf": "*", "url": url})
        changes.append(f"<mirror> {NAME} for every repository")
        profiles = child(root, "profiles")
        profile = replace_by_id(profiles, "profile", {"id": NAME})
        # A mirror keeps the policy of what it replaces: let central's mirror serve SNAPSHOTs too.
        for group, tag in (("repositories", "repository"), ("pluginRepositories", "pluginRepository")):
            holder = SubElement(profile, f"{ns}{group}")
            repo = SubElement(holder, f"{ns}{tag}")
            SubElement(repo, f"{ns}id").text = "central"
            SubElement(repo, f"{ns}url").text = "http://central"
            snapshots = SubElement(repo, f"{ns}snapshots")
            SubElement(snapshots, f"{ns}enabled").text = "true"
    active = child(root, "activeProfiles")
    if NAME not in [a.text for a in active.findall(f"{ns}activeProfile")]:
        SubElement(active, f"{ns}activeProfile").text = NAME
    indent(root)
    body = tostring(root, encoding="unicode")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + body + "\n", changes


def gradle_init(current: str, t: Target) -> tuple[str, list[str]]:
    url = t.base("maven") + "/"
    repo = (
        f'maven {{ name = "{NAME}"; url = uri("{url}"); '
        f'credentials {{ username = "{USER}"; password = "{t.token}" }} }}'
    )
    text = (
        f"// Written by artifact-proxy login: the {t.domain}/{t.repository} repository for every build.\n"
        "beforeSettings { settings ->\n"
        f"    settings.pluginManagement.repositories {{ {repo} }}\n"
        "}\n"
        "allprojects {\n"
        f"    repositories {{ {repo} }}\n"
        "}\n"
    )
    return text, [f"init script adding {url} to plugin and project repositories"]


# --- NuGet --------------------------------------------------------------------------------------


def nuget_config(current: str, t: Target) -> tuple[str, list[str]]:
    root = xml.parse(current.encode()) if current.strip() else Element("configuration")
    changes = []

    def child(parent: Element, name: str) -> Element:
        found = parent.find(name)
        return found if found is not None else SubElement(parent, name)

    sources = child(root, "packageSources")
    for add in sources.findall("add"):
        if add.get("key") == NAME or not t.extra:
            sources.remove(add)
            if add.get("key") != NAME:
                changes.append(f"removed source {add.get('key')} (use --extra to keep it)")
    for clear in sources.findall("clear"):
        sources.remove(clear)
    if not t.extra:
        sources.insert(0, Element("clear"))
    SubElement(sources, "add", key=NAME, value=t.base("nuget") + "/v3/index.json", protocolVersion="3")
    changes.append(f"source {NAME}")
    credentials = child(root, "packageSourceCredentials")
    for old in credentials.findall(NAME):
        credentials.remove(old)
    entry = SubElement(credentials, NAME)
    SubElement(entry, "add", key="Username", value=USER)
    SubElement(entry, "add", key="ClearTextPassword", value=t.token)
    changes.append(f"credentials for {NAME} (push with -ApiKey and the same token)")
    indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + tostring(root, encoding="unicode") + "\n", changes


# --- helpers ------------------------------------------------------------------------------------


def _ini(parser: configparser.ConfigParser) -> str:
    out = io.StringIO()
    parser.write(out)
    return out.getvalue()


def _same_repo(url: str, t: Target) -> bool:
    return url.rstrip("/").endswith(f"/{t.domain}/pypi/{t.repository}/simple")


def _drop_toml_block(text: str, header: str, marker: str) -> str:
    """The TOML text without the table ``header`` that contains ``marker`` (ours, from before)."""
    out: list[str] = []
    block: list[str] = []
    in_block = False
    for line in text.splitlines():
        if line.strip().startswith("["):
            if in_block and marker not in "\n".join(block):
                out += block
            block, in_block = [], line.strip() == header
            if in_block:
                block.append(line)
                continue
        if in_block:
            block.append(line)
        else:
            out.append(line)
    if in_block and marker not in "\n".join(block):
        out += block
    return "\n".join(out) + ("\n" if out else "")


def masked(text: str, token: str) -> str:
    """What --dry-run prints: the new text with the token masked."""
    return re.sub(re.escape(token), "<token>", text)
