"""The files the benchmark serves: real wheels with random (incompressible) payloads.

Built with the test suite's wheel builder so the fake upstream can publish them with real
hashes and metadata. Building 1.3 GB of random data takes a while, so a manifest records what
was built and later runs reuse files whose size still matches.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

MIB = 2**20
SMALL_COUNT = 30
SMALL_PAYLOAD = int(1.6 * MIB)  # 30 of them make the ~50 MB "install a project" fetch


@dataclass(frozen=True)
class Dist:
    """One published wheel: its project, file on disk and size."""

    project: str
    path: Path
    size: int

    @property
    def filename(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class Dataset:
    """Everything the upstream publishes, grouped by the measurement that uses it."""

    small: tuple[Dist, ...]  # (e) and the simple-page measurements
    ten: Dist  # (b) 10 MiB wheel under wrk
    huge: Dist  # (c) single-connection download (1 GiB, 100 MiB with --quick)
    big: Dist  # (d) 20 concurrent streams (200 MiB, 50 MiB with --quick)

    def all(self) -> list[Dist]:
        return [*self.small, self.ten, self.huge, self.big]


def _spec(quick: bool) -> list[tuple[str, int]]:
    """(project, payload size) for every wheel; the size is in the big names so sizes never mix."""
    huge_mib, big_mib = (100, 50) if quick else (1024, 200)
    specs = [(f"bench-small-{i:02d}", SMALL_PAYLOAD) for i in range(SMALL_COUNT)]
    specs += [("bench-ten-10m", 10 * MIB), (f"bench-huge-{huge_mib}m", huge_mib * MIB)]
    specs.append((f"bench-big-{big_mib}m", big_mib * MIB))
    return specs


def _load_manifest(path: Path) -> dict[str, dict[str, object]]:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _reusable(entry: dict[str, object] | None, payload: int) -> Dist | None:
    """The recorded wheel if it was built with this payload and is still intact on disk."""
    if not entry or entry.get("payload") != payload:
        return None
    path = Path(str(entry["path"]))
    if not path.is_file() or path.stat().st_size != entry.get("size"):
        return None
    return Dist(str(entry["project"]), path, int(str(entry["size"])))


def build_dataset(root: Path, quick: bool) -> Dataset:
    """Build (or reuse) every wheel under ``root`` and return them.

    The builder is imported here because ``tests`` is importable only once the caller has put
    the repository root on ``sys.path`` (this file lives in ``bench/``, run as a script).
    """
    from tests.fakes.dists import build_wheel

    root.mkdir(parents=True, exist_ok=True)
    manifest_path = root / "manifest.json"
    manifest = _load_manifest(manifest_path)
    dists: list[Dist] = []
    for project, payload in _spec(quick):
        dist = _reusable(manifest.get(project), payload)
        if dist is None:
            print(f"  building {project} ({payload / MIB:.1f} MiB payload) ...", flush=True)
            path = build_wheel(root / project, project, "1.0", payload_size=payload)
            dist = Dist(project, path, path.stat().st_size)
            manifest[project] = {**asdict(dist), "path": str(path), "payload": payload}
            manifest_path.write_text(json.dumps(manifest, indent=1))
        dists.append(dist)
    small = tuple(dists[:SMALL_COUNT])
    ten, huge, big = dists[SMALL_COUNT:]
    return Dataset(small=small, ten=ten, huge=huge, big=big)
