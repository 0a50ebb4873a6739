"""The real ``mvn`` (Apache Maven 3.8), run as a subprocess against a repository, isolated from this machine.

Nothing of the machine's Maven setup may leak into a test: each run gets its own user settings
(``-s``, written by :func:`write_settings`: one mirror of everything, optional credentials), an
empty global settings file (``-gs``) instead of ``$MAVEN_HOME/conf/settings.xml``, its own local
repository (``-Dmaven.repo.local``), no ``MAVEN_OPTS``/``MAVEN_ARGS``/``JAVA_TOOL_OPTIONS``, and
``MAVEN_SKIP_RC`` so ``/etc/mavenrc`` and ``~/.mavenrc`` are not sourced.

:func:`write_project` writes a tiny jar project whose plugins are all pinned to versions present in
this machine's ``~/.m2/repository`` (which :class:`tests.fakes.maven.FakeMavenRepo` serves), so
Maven never needs plugin-prefix or plugin-version resolution (group-level or plugin
``maven-metadata.xml``) for the lifecycle phases up to ``deploy``.

The test is JUnit 5 (Jupiter 5.10.2), not JUnit 4: surefire runs JUnit 4 tests through the
``surefire-junit4`` provider, which ``~/.m2`` does not hold, while ``surefire-junit-platform``
and the JUnit Platform launcher it needs are there. ``junit:junit:4.13.2`` is still available
as an ordinary dependency.

HTTP retries are off (``maven.wagon.http.retryHandler.count=0``): the repository is a local
process, so a retry could only hide a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import pytest

from tests.clients import ClientRun

__all__ = [
    "JUNIT_JUPITER",
    "M2_REPOSITORY",
    "MVN_MISSING",
    "PLUGINS",
    "Dependency",
    "MvnRun",
    "local_repository_ready",
    "mvn",
    "mvn_available",
    "mvn_env",
    "pom_xml",
    "requires_local_repository",
    "requires_mvn",
    "write_project",
    "write_settings",
]

Dependency = tuple[str, str, str, str]
"""``(groupId, artifactId, version, scope)`` of a project dependency."""

# Every plugin the default jar lifecycle binds up to deploy, plus clean, pinned to versions whose
# whole dependency tree is in ~/.m2/repository (Maven 3.8.7's own defaults are older ones).
PLUGINS: dict[str, str] = {
    "maven-clean-plugin": "3.3.2",
    "maven-resources-plugin": "3.3.1",
    "maven-compiler-plugin": "3.13.0",
    "maven-surefire-plugin": "3.2.5",
    "maven-jar-plugin": "3.4.1",
    "maven-install-plugin": "3.1.1",
    "maven-deploy-plugin": "3.1.1",
}
JUNIT_JUPITER = "5.10.2"
# Jar entries get this time, so two builds of one project make byte-identical jars.
OUTPUT_TIMESTAMP = "2024-01-01T00:00:00Z"

MVN_MISSING = "mvn not installed (Apache Maven and a JDK are needed for the Maven client tests)"
# The machine's local repository: what FakeMavenRepo serves by default.
M2_REPOSITORY = Path.home() / ".m2" / "repository"

_POM_HEAD = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    '<project xmlns="http://maven.apache.org/POM/4.0.0"'
    ' xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"\n'
    '         xsi:schemaLocation="http://maven.apache.org/POM/4.0.0'
    ' https://maven.apache.org/xsd/maven-4.0.0.xsd">\n'
    "  <modelVersion>4.0.0</modelVersion>\n"
)
_STRIPPED_ENV = frozenset({"MAVEN_OPTS", "MAVEN_ARGS", "MAVEN_CONFIG", "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS"})
_PROXY_VARS = frozenset({"http_proxy", "https_proxy", "all_proxy", "no_proxy"})


def mvn_available() -> bool:
    """Whether ``mvn`` and a ``java`` it can run are on this machine."""
    has_java = shutil.which("java") is not None or bool(os.environ.get("JAVA_HOME"))
    return shutil.which("mvn") is not None and has_java


requires_mvn = pytest.mark.skipif(not mvn_available(), reason=MVN_MISSING)
"""Mark a test that runs the real ``mvn``: it skips, saying why, where Maven is absent."""


def local_repository_ready(root: Path = M2_REPOSITORY) -> bool:
    """Whether ``root`` holds the jars :func:`write_project` builds with (plugins, JUnit).

    Only the top of each tree is checked; plugin dependencies are assumed to have come with them.
    Blocking (stats files): call it at import or from sync code.
    """
    jars = [("org.apache.maven.plugins", name, version) for name, version in PLUGINS.items()]
    jars += [("org.junit.jupiter", "junit-jupiter-engine", JUNIT_JUPITER), ("junit", "junit", "4.13.2")]
    return all(
        (root / group.replace(".", "/") / name / version / f"{name}-{version}.jar").is_file()
        for group, name, version in jars
    )


requires_local_repository = pytest.mark.skipif(
    not local_repository_ready(),
    reason=f"{M2_REPOSITORY} lacks the pinned Maven plugins or JUnit that the Maven tests build with",
)
"""Mark a test that needs ``~/.m2/repository`` populated (FakeMavenRepo serves it to ``mvn``)."""


# ------------------------------------------------------------------- files


def _x(value: str) -> str:
    return escape(value)


def write_settings(
    path: Path,
    mirror_url: str,
    *,
    server_id: str | None = None,
    username: str | None = None,
    password: str | None = None,
    snapshots: bool = True,
) -> Path:
    """Write a ``settings.xml`` sending every repository (``mirrorOf *``) to ``mirror_url``.

    With ``snapshots`` (the default) a profile redefines ``central`` with SNAPSHOTs enabled, as
    Nexus and Artifactory setups do: a mirror keeps the policy of the repository it replaces,
    and Maven's built-in ``central`` never asks for SNAPSHOTs.

    With ``username``, a ``<server>`` carries the credentials; its id defaults to ``proxy``, the
    mirror's id, so one entry authenticates both downloads through the mirror and deploys to
    repositories of the same id (what :func:`write_project` uses by default). Returns ``path``.
    """
    server = ""
    if username is not None or password is not None or server_id is not None:
        creds = ""
        if username is not None:
            creds += f"      <username>{_x(username)}</username>\n"
        if password is not None:
            creds += f"      <password>{_x(password)}</password>\n"
        server = (
            "  <servers>\n    <server>\n"
            f"      <id>{_x(server_id or 'proxy')}</id>\n{creds}"
            "    </server>\n  </servers>\n"
        )
    text = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<settings xmlns="http://maven.apache.org/SETTINGS/1.2.0"'
        ' xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"\n'
        '          xsi:schemaLocation="http://maven.apache.org/SETTINGS/1.2.0'
        ' https://maven.apache.org/xsd/settings-1.2.0.xsd">\n'
        "  <offline>false</offline>\n"
        "  <interactiveMode>false</interactiveMode>\n"
        f"{server}"
        "  <mirrors>\n    <mirror>\n"
        "      <id>proxy</id>\n"
        "      <mirrorOf>*</mirrorOf>\n"
        f"      <url>{_x(mirror_url)}</url>\n"
        "    </mirror>\n  </mirrors>\n"
        f"{_SNAPSHOT_PROFILE if snapshots else ''}"
        "</settings>\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


_REPOSITORY = (
    "        <{kind}>\n          <id>central</id>\n          <url>http://central</url>\n"
    "          <releases><enabled>true</enabled></releases>\n"
    "          <snapshots><enabled>true</enabled></snapshots>\n        </{kind}>\n"
)
_SNAPSHOT_PROFILE = (
    "  <profiles>\n    <profile>\n      <id>proxy</id>\n"
    "      <repositories>\n" + _REPOSITORY.format(kind="repository") + "      </repositories>\n"
    "      <pluginRepositories>\n"
    + _REPOSITORY.format(kind="pluginRepository")
    + "      </pluginRepositories>\n    </profile>\n  </profiles>\n"
    "  <activeProfiles>\n    <activeProfile>proxy</activeProfile>\n  </activeProfiles>\n"
)


def _dependencies_xml(dependencies: Sequence[Dependency], indent: str = "  ") -> str:
    if not dependencies:
        return ""
    out = [f"{indent}<dependencies>"]
    for group, artifact, version, scope in dependencies:
        out += [
            f"{indent}  <dependency>",
            f"{indent}    <groupId>{_x(group)}</groupId>",
            f"{indent}    <artifactId>{_x(artifact)}</artifactId>",
            f"{indent}    <version>{_x(version)}</version>",
            f"{indent}    <scope>{_x(scope)}</scope>",
            f"{indent}  </dependency>",
        ]
    out.append(f"{indent}</dependencies>")
    return "\n".join(out) + "\n"


def pom_xml(
    group: str,
    artifact: str,
    version: str,
    *,
    packaging: str = "jar",
    dependencies: Sequence[Dependency] = (),
    extra: str = "",
) -> bytes:
    """A minimal POM of these coordinates; ``extra`` is inserted verbatim before ``</project>``.

    Also what :meth:`tests.fakes.maven.FakeMavenRepo.add_version` publishes, so a fake artifact's
    dependencies are real, resolvable ones.
    """
    text = (
        _POM_HEAD + f"  <groupId>{_x(group)}</groupId>\n"
        f"  <artifactId>{_x(artifact)}</artifactId>\n"
        f"  <version>{_x(version)}</version>\n"
        f"  <packaging>{_x(packaging)}</packaging>\n"
        + _dependencies_xml(dependencies)
        + extra
        + "</project>\n"
    )
    return text.encode()


def _java_package(group: str, artifact: str) -> str:
    """A valid Java package name made from the coordinates."""
    parts = []
    for raw in [*group.split("."), artifact]:
        part = re.sub(r"\W", "_", raw.lower())
        parts.append(f"_{part}" if not part or part[0].isdigit() else part)
    return ".".join(parts)


def write_project(
    directory: Path,
    group: str,
    artifact: str,
    version: str,
    dependencies: Sequence[Dependency] = (),
    *,
    deploy_url: str | None = None,
    deploy_snapshot_url: str | None = None,
    with_test: bool = True,
    repository_id: str = "proxy",
) -> Path:
    """Write a one-class jar project into ``directory``; returns its ``pom.xml``.

    ``App.greeting()`` returns ``"hello from group:artifact:version"``; with ``with_test`` an
    ``AppTest`` (JUnit Jupiter) checks it, so ``package`` compiles, runs surefire and jars. All
    plugin versions are pinned (:data:`PLUGINS`), ``maven.compiler.release`` is 17 and the jar's
    entry times are fixed. ``deploy_url``/``deploy_snapshot_url`` become
    ``<distributionManagement>`` repositories with id ``repository_id`` (match it with
    :func:`write_settings`' ``server_id`` for credentials).
    """
    deps = list(dependencies)
    if with_test:
        deps += [
            ("org.junit.jupiter", "junit-jupiter-api", JUNIT_JUPITER, "test"),
            ("org.junit.jupiter", "junit-jupiter-engine", JUNIT_JUPITER, "test"),
        ]
    plugins = "".join(
        "        <plugin>\n"
        "          <groupId>org.apache.maven.plugins</groupId>\n"
        f"          <artifactId>{name}</artifactId>\n"
        f"          <version>{ver}</version>\n"
        "        </plugin>\n"
        for name, ver in PLUGINS.items()
    )
    distribution = ""
    if deploy_url is not None or deploy_snapshot_url is not None:
        distribution = "  <distributionManagement>\n"
        for tag, url in (("repository", deploy_url), ("snapshotRepository", deploy_snapshot_url)):
            if url is not None:
                distribution += (
                    f"    <{tag}>\n      <id>{_x(repository_id)}</id>\n"
                    f"      <url>{_x(url)}</url>\n    </{tag}>\n"
                )
        distribution += "  </distributionManagement>\n"
    extra = (
        "  <properties>\n"
        "    <maven.compiler.release>17</maven.compiler.release>\n"
        "    <project.build.sourceEncoding>UTF-8</project.build.sourceEncoding>\n"
        "    <project.reporting.outputEncoding>UTF-8</project.reporting.outputEncoding>\n"
        f"    <project.build.outputTimestamp>{OUTPUT_TIMESTAMP}</project.build.outputTimestamp>\n"
        "  </properties>\n"
        "  <build>\n    <pluginManagement>\n      <plugins>\n"
        f"{plugins}"
        "      </plugins>\n    </pluginManagement>\n  </build>\n"
        f"{distribution}"
    )
    directory.mkdir(parents=True, exist_ok=True)
    pom = directory / "pom.xml"
    pom.write_bytes(pom_xml(group, artifact, version, dependencies=deps, extra=extra))

    package = _java_package(group, artifact)
    pkg_dir = Path(*package.split("."))
    coords = f"{group}:{artifact}:{version}".replace("\\", "\\\\").replace('"', '\\"')
    main = directory / "src" / "main" / "java" / pkg_dir / "App.java"
    main.parent.mkdir(parents=True, exist_ok=True)
    main.write_text(
        f"package {package};\n\n"
        "/** The one class of a test project. */\n"
        "public final class App {\n"
        "    private App() {}\n\n"
        "    public static String greeting() {\n"
        f'        return "hello from {coords}";\n'
        "    }\n}\n",
        encoding="utf-8",
    )
    if with_test:
        test = directory / "src" / "test" / "java" / pkg_dir / "AppTest.java"
        test.parent.mkdir(parents=True, exist_ok=True)
        test.write_text(
            f"package {package};\n\n"
            "import static org.junit.jupiter.api.Assertions.assertEquals;\n\n"
            "import org.junit.jupiter.api.Test;\n\n"
            "class AppTest {\n"
            "    @Test\n"
            "    void greets() {\n"
            f'        assertEquals("hello from {coords}", App.greeting());\n'
            "    }\n}\n",
            encoding="utf-8",
        )
    return pom


# --------------------------------------------------------------------- runs


@dataclass(frozen=True)
class MvnRun(ClientRun):
    """One finished ``mvn`` run: exit code, combined output, the arguments and the time taken."""

    args: tuple[str, ...] = ()
    elapsed: float = 0.0

    def tail(self, lines: int = 60) -> str:
        """The last ``lines`` lines of the output (where Maven says what failed)."""
        return "\n".join(self.output.rstrip("\n").splitlines()[-lines:])

    def explain(self, lines: int = 60) -> str:
        """An assertion message: the command, its exit code and the tail of its output."""
        return (
            f"mvn {' '.join(self.args)} exited {self.returncode} after {self.elapsed:.1f}s; "
            f"last {lines} lines of output:\n{self.tail(lines)}"
        )

    def check(self) -> MvnRun:
        """Raise AssertionError with :meth:`explain` unless the run succeeded; returns self."""
        if not self.ok:
            raise AssertionError(self.explain())
        return self

    def downloads(self) -> list[str]:
        """URLs Maven reported as downloaded (``Downloaded from <id>: <url> (...)``)."""
        return re.findall(r"Downloaded from [^:]+: (\S+)", self.output)


def mvn_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of an isolated Maven run: the machine's, minus what configures Maven/Java."""
    env = {k: v for k, v in os.environ.items() if k not in _STRIPPED_ENV and k.lower() not in _PROXY_VARS}
    env["MAVEN_SKIP_RC"] = "1"
    # Short-lived JVMs: C1 only starts faster; the forked test JVM inherits nothing from this.
    env["MAVEN_OPTS"] = "-XX:+TieredCompilation -XX:TieredStopAtLevel=1"
    env["NO_COLOR"] = "1"
    env.update(extra or {})
    return env


def _write_global_settings(path: Path) -> None:
    if not path.exists():
        path.write_text("<settings/>\n", encoding="utf-8")


async def mvn(
    args: Sequence[str],
    *,
    cwd: Path,
    settings: Path,
    local_repo: Path,
    env: Mapping[str, str] | None = None,
    timeout: float = 300.0,
    strict_checksums: bool = False,
) -> MvnRun:
    """``mvn -B -s settings -gs <empty> -Dmaven.repo.local=local_repo ARGS`` in ``cwd``.

    Runs without blocking the event loop; output is stdout and stderr combined. On timeout the
    whole process group (Maven and any forked test JVM) is killed and TimeoutError raised.
    ``strict_checksums`` adds ``-C``: a checksum mismatch (or missing checksums) fails the
    build; Maven's default only warns. Use ``assert run.ok, run.explain()``.
    """
    global_settings = settings.with_name(settings.stem + ".global.xml")
    await asyncio.to_thread(_write_global_settings, global_settings)
    full = [
        "-B",
        "-s",
        str(settings),
        "-gs",
        str(global_settings),
        f"-Dmaven.repo.local={local_repo}",
        "-Dmaven.wagon.http.retryHandler.count=0",
        *(["-C"] if strict_checksums else []),
        *args,
    ]
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        "mvn",
        *full,
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=mvn_env(env),
        start_new_session=True,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except (TimeoutError, asyncio.CancelledError):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise
    return MvnRun(proc.returncode or 0, out.decode(errors="replace"), tuple(full), time.monotonic() - started)
