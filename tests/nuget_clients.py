"""The real NuGet client (NuGet.exe 5.8 on Mono), run as a subprocess, isolated from this machine.

There is no .NET SDK to be had here, but NuGet.exe runs on Debian's Mono; ``scripts/install-nuget``
installs both (Mono from apt, NuGet.exe from the npm package ``nuget-exe`` into
``.venv/nuget-tools``). Where either is missing the NuGet tests skip with
:data:`NUGET_MISSING` as the reason.

Hermetic runs: every run gets ``-ConfigFile`` (so no user or machine NuGet.Config is read; the one
:func:`write_nuget_config` writes clears all sources but the one under test) and an environment
(:func:`nuget_env`) whose ``HOME``, global packages folder (``NUGET_PACKAGES``), HTTP cache
(``NUGET_HTTP_CACHE_PATH``) and plugin cache live in a directory of the test, so one run's cache
can never answer another's request and nothing of this machine's setup is used. HTTP proxy
variables are dropped: the feed is a local process.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from xml.sax.saxutils import quoteattr

from tests.clients import ClientRun

__all__ = [
    "MONO",
    "NUGET_EXE",
    "NUGET_MISSING",
    "mono",
    "nuget",
    "nuget_env",
    "nuget_exe",
    "nuget_missing_reason",
    "write_nuget_config",
]

REPO = Path(__file__).resolve().parent.parent
# scripts/install-nuget's npm prefix first; .venv/node-tools where someone installed it by hand.
NPM_PREFIXES = (REPO / ".venv" / "nuget-tools", REPO / ".venv" / "node-tools")
_PROXY_VARS = frozenset({"http_proxy", "https_proxy", "all_proxy", "no_proxy"})
# NuGet.exe 5.8 commands that reject -ConfigFile ("Unknown option"); they read the user config,
# so :func:`nuget` puts the test's config there instead.
NO_CONFIG_FILE_OPTION = frozenset({"search", "spec", "help", "?"})


def nuget_exe() -> Path | None:
    """NuGet.exe: ``$NUGET_EXE`` if set, else the one ``scripts/install-nuget`` put in
    ``.venv/nuget-tools/node_modules/nuget-exe/`` (the npm package names it ``nuget-X.Y.Z.exe``)."""
    if env := os.environ.get("NUGET_EXE"):
        path = Path(env)
        return path if path.is_file() else None
    for prefix in NPM_PREFIXES:
        found = sorted((prefix / "node_modules" / "nuget-exe").glob("nuget-*.exe"))
        if found:
            return found[-1]
    return None


def mono() -> str | None:
    """The ``mono`` runtime on PATH, if any."""
    return shutil.which("mono")


def nuget_missing_reason() -> str | None:
    """Why the NuGet client cannot run here, or None when it can."""
    missing = []
    if mono() is None:
        missing.append("mono (apt: mono-runtime and the libmono-*4.0-cil libraries)")
    if nuget_exe() is None:
        missing.append("NuGet.exe (npm: nuget-exe, or set NUGET_EXE)")
    if not missing:
        return None
    return f"NuGet client unavailable: no {' and no '.join(missing)}; run scripts/install-nuget"


# Looked up once, at import: the lookups stat files, which the event loop thread must not do.
NUGET_EXE: Path | None = nuget_exe()
MONO: str | None = mono()
NUGET_MISSING: str | None = nuget_missing_reason()


def nuget_env(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of an isolated NuGet.exe run whose state all lives under ``home``.

    ``HOME`` moves too: Mono keeps its key pairs (used to encrypt API keys) and NuGet its default
    config and caches under it. ``extra`` is applied last.
    """
    env = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARS and not k.startswith("NUGET_")}
    env.update(
        {
            "HOME": str(home / "home"),
            "XDG_CONFIG_HOME": str(home / "home" / ".config"),
            "XDG_DATA_HOME": str(home / "home" / ".local" / "share"),
            "NUGET_PACKAGES": str(home / "global-packages"),
            "NUGET_HTTP_CACHE_PATH": str(home / "http-cache"),
            "NUGET_PLUGINS_CACHE_PATH": str(home / "plugins-cache"),
            "NUGET_CERT_REVOCATION_MODE": "offline",
            "DOTNET_CLI_TELEMETRY_OPTOUT": "1",
            "NO_PROXY": "127.0.0.1,localhost",
        }
    )
    env.update(extra or {})
    return env


async def nuget(
    args: Sequence[str],
    *,
    cwd: Path,
    config_file: Path | None,
    env: Mapping[str, str] | None = None,
    timeout: float = 90.0,
) -> ClientRun:
    """``mono NuGet.exe ARGS -ConfigFile CONFIG -NonInteractive`` in ``cwd``; exit code and output.

    Commands that have no ``-ConfigFile`` option (``search``, ``spec``, ``help``) get the config
    copied to the user config of the run's own HOME instead (Mono: ``~/.config/NuGet/NuGet.Config``),
    which is the first file they read.

    The run's state (HOME, caches, global packages) lives in ``.nuget-state`` beside the config
    file (beside ``cwd`` without one), so runs sharing a config share caches and no others do.
    ``env`` adds or overrides variables. ``-ForceEnglishOutput`` keeps messages assertable.
    Raises :class:`TimeoutError` (after killing NuGet) when it runs longer than ``timeout``.
    """
    exe, runtime = NUGET_EXE, MONO
    if exe is None or runtime is None:
        raise RuntimeError(NUGET_MISSING)
    state = (config_file.parent if config_file is not None else cwd) / ".nuget-state"
    cmd = [runtime, str(exe), *args]
    if config_file is not None:
        if args and args[0].lower() in NO_CONFIG_FILE_OPTION:
            user_config = state / "home" / ".config" / "NuGet" / "NuGet.Config"
            text = await asyncio.to_thread(config_file.read_text, encoding="utf-8")
            await asyncio.to_thread(_write, user_config, text)
        else:
            cmd += ["-ConfigFile", str(config_file)]
    cmd += ["-NonInteractive", "-ForceEnglishOutput"]
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=nuget_env(state, env),
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return ClientRun(proc.returncode or 0, out.decode(errors="replace"))


def _config_xml(source_url: str, packages_folder: Path, credentials: tuple[str, str] | None) -> str:
    creds = ""
    if credentials is not None:
        user, password = credentials
        creds = (
            "  <packageSourceCredentials>\n    <feed>\n"
            f'      <add key="Username" value={quoteattr(user)} />\n'
            f'      <add key="ClearTextPassword" value={quoteattr(password)} />\n'
            "    </feed>\n  </packageSourceCredentials>\n"
        )
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        "<configuration>\n"
        "  <packageSources>\n"
        "    <clear />\n"
        f'    <add key="feed" value={quoteattr(source_url)} protocolVersion="3" />\n'
        "  </packageSources>\n"
        "  <disabledPackageSources>\n    <clear />\n  </disabledPackageSources>\n"
        "  <config>\n"
        f'    <add key="globalPackagesFolder" value={quoteattr(str(packages_folder))} />\n'
        f'    <add key="defaultPushSource" value={quoteattr(source_url)} />\n'
        "  </config>\n"
        f"{creds}"
        "</configuration>\n"
    )


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


async def write_nuget_config(
    path: Path,
    source_url: str,
    *,
    api_key: str | None = None,
    credentials: tuple[str, str] | None = None,
) -> Path:
    """Write a NuGet.Config at ``path`` whose only source (key ``feed``) is ``source_url``.

    ``<clear />`` comes first so no inherited source can answer; the source is also the default
    push source; the global packages folder is ``.nuget-state/global-packages`` beside the file,
    the same place :func:`nuget` points ``NUGET_PACKAGES`` at. ``credentials`` (user, password) go
    in as a clear-text ``packageSourceCredentials`` entry (HTTP basic auth for reads). NuGet only
    reads API keys encrypted (Mono's ProtectedData), so ``api_key`` is stored by running
    ``nuget setApiKey`` against the new file; push and delete then need no ``-ApiKey``.
    Runs its file I/O off the event loop thread.
    """
    packages = path.parent / ".nuget-state" / "global-packages"
    await asyncio.to_thread(_write, path, _config_xml(source_url, packages, credentials))
    if api_key is not None:
        run = await nuget(["setApiKey", api_key, "-Source", source_url], cwd=path.parent, config_file=path)
        if not run.ok:
            raise RuntimeError(f"nuget setApiKey failed ({run.returncode}):\n{run.output}")
    return path
