"""Maven paths and maven-metadata.xml: parsing, ordering, rendering, and refusing bad XML."""

from __future__ import annotations

import pytest

from proxy.errors import BadRequest
from proxy.formats import maven_metadata as meta
from proxy.formats.maven_paths import parse_path

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>
<metadata><groupId>&lol2;</groupId></metadata>"""


def test_paths_name_the_artifact_version_and_checksum() -> None:
    p = parse_path("org/example/lib-core/1.2.0/lib-core-1.2.0-sources.jar.sha1")
    assert (p.kind, p.package, p.version, p.filename, p.checksum) == (
        "file",
        "org.example:lib-core",
        "1.2.0",
        "lib-core-1.2.0-sources.jar",
        "sha1",
    )
    assert p.asset_name == "1.2.0/lib-core-1.2.0-sources.jar"
    m = parse_path("org/example/lib-core/maven-metadata.xml.md5")
    assert (m.kind, m.package, m.checksum) == ("artifact-metadata", "org.example:lib-core", "md5")
    s = parse_path("org/example/lib-core/1.0-SNAPSHOT/maven-metadata.xml")
    assert (s.kind, s.version) == ("version-metadata", "1.0-SNAPSHOT")
    assert parse_path("org/example/").kind == "directory"
    assert parse_path("").segments == ()


@pytest.mark.parametrize(
    "path",
    [
        "org/example/lib/1.0/other-1.0.jar",
        "lib/1.0/lib-1.0.jar",
        "maven-metadata.xml",
        "org/%00/x",
        "org/ex ample/",
    ],
)
def test_bad_paths_are_400(path: str) -> None:
    with pytest.raises(BadRequest):
        parse_path(path)


def test_versions_sort_as_maven_does() -> None:
    shuffled = [
        "1.10",
        "1.2",
        "1.0-SNAPSHOT",
        "1.0",
        "1.0-rc1",
        "1.0-alpha-2",
        "1.0-beta",
        "1.0.1",
        "1.0-sp1",
    ]
    assert meta.sort_versions(shuffled) == [
        "1.0-alpha-2",
        "1.0-beta",
        "1.0-rc1",
        "1.0-SNAPSHOT",
        "1.0",
        "1.0-sp1",
        "1.0.1",
        "1.2",
        "1.10",
    ]


def test_artifact_metadata_round_trips_with_latest_and_release_recomputed() -> None:
    body = meta.render_artifact("org.example", "lib", ["1.0", "2.0-SNAPSHOT", "1.1"], "20240101000000")
    parsed = meta.parse(body)
    assert parsed.versions == ["1.0", "1.1", "2.0-SNAPSHOT"]
    assert b"<latest>2.0-SNAPSHOT</latest>" in body and b"<release>1.1</release>" in body
    assert parsed.last_updated == "20240101000000"


def test_snapshot_metadata_comes_from_the_newest_timestamped_files() -> None:
    files = [
        "lib-1.0-20240101.100000-1.jar",
        "lib-1.0-20240101.100000-1.pom",
        "lib-1.0-20240102.100000-2.jar",
        "lib-1.0-20240102.100000-2.pom",
        "lib-1.0-20240102.100000-2-sources.jar",
        "lib-1.0-20240102.100000-2.jar.sha1",
    ]
    parsed = meta.snapshot_from_files("lib", "1.0-SNAPSHOT", files)
    assert parsed is not None
    assert (parsed.snapshot_timestamp, parsed.snapshot_build) == ("20240102.100000", 2)
    current = {(f.classifier, f.extension): f.value for f in parsed.snapshot_files}
    assert current == {
        ("", "jar"): "1.0-20240102.100000-2",
        ("", "pom"): "1.0-20240102.100000-2",
        ("sources", "jar"): "1.0-20240102.100000-2",
    }
    again = meta.parse(meta.render_snapshot("org.example", "lib", "1.0-SNAPSHOT", parsed))
    assert again.snapshot_build == 2 and len(again.snapshot_files) == 3


@pytest.mark.parametrize(
    "body",
    [
        BILLION_LAUGHS,
        b"<metadata><versioning>",
        b"<project/>",
        b"<metadata><versioning><versions><version>../x</version></versions></versioning></metadata>",
    ],
)
def test_malformed_or_hostile_metadata_is_refused(body: bytes) -> None:
    with pytest.raises(meta.MetadataError):
        meta.parse(body)
