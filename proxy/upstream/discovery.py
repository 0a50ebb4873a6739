"""Finding a registry URL from the machine's own client setup.

The embedded default config names no registry host: its PyPI upstream is whatever pip on this
machine is set up to use. That keeps the repository free of host names and makes a sidecar follow
an existing corporate mirror without any extra configuration.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
from collections.abc import Mapping
from typing import Any

PIP_INDEX_URL = "pip:index-url"
NPM_REGISTRY = "npm:registry"


class DiscoveryError(RuntimeError):
    """The client setup could not be read; the message says what to configure instead."""


def pip_index_url(env: Mapping[str, str]) -> str:
    """The index pip would use: ``PIP_INDEX_URL``, pip's configured ``index-url``, pip's default.

    pip keeps both its configuration loader and its built-in default behind ``pip._internal``;
    they are read once at startup, and any failure is reported as a configuration error.
    """
    from_env = env.get("PIP_INDEX_URL", "").split()
    if from_env:
        return from_env[0]
    try:
        configuration: Any = importlib.import_module("pip._internal.configuration")
        models: Any = importlib.import_module("pip._internal.models.index")
    except ImportError as exc:
        raise DiscoveryError(
            "pip is not importable here, so its index cannot be discovered; set the url explicitly"
        ) from exc
    try:
        conf = configuration.Configuration(isolated=False)
        conf.load()
        values = dict(conf.items())
    except Exception as exc:
        raise DiscoveryError(f"pip's configuration could not be read: {exc}") from exc
    for key in (":env:.index-url", "install.index-url", "global.index-url"):
        value = str(values.get(key, "")).split()
        if value:
            return value[0]
    return str(models.PyPI.simple_url)


def npm_registry_url(env: Mapping[str, str]) -> str:
    """The registry npm would use: ``npm_config_registry``, else ``npm config get registry``.

    The second asks npm itself, which prints its configured registry or its built-in default.
    """
    for key in ("npm_config_registry", "NPM_CONFIG_REGISTRY"):
        if env.get(key, "").strip():
            return env[key].strip()
    npm = shutil.which("npm", path=env.get("PATH"))
    if npm is None:
        raise DiscoveryError("npm is not installed here, so its registry cannot be discovered")
    try:
        done = subprocess.run(
            [npm, "config", "get", "registry"],
            capture_output=True,
            text=True,
            timeout=20,
            env=dict(env),
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DiscoveryError(f"`npm config get registry` failed: {exc}") from exc
    url = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    if done.returncode != 0 or not url.startswith(("http://", "https://")):
        raise DiscoveryError(f"`npm config get registry` gave no URL (exit {done.returncode})")
    return url
