"""The simple repository API: names, filenames, PEP 503/691 parsing and rendering, negotiation."""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy.formats.pypi_simple import (
    HTML_V1,
    JSON_V1,
    TEXT_HTML,
    UPSTREAM_ACCEPT,
    negotiate,
    normalize,
    parse_html,
    parse_json,
    render_html,
    render_json,
    render_project_list,
    version_from_filename,
)
from proxy.model import ListedFile, Listing

DOC_URL = "https://mirror.example.invalid/simple/example-pkg/"
FILES_HOST = "https://files.example.invalid"
SHA_A = "a" * 64
SHA_B = "b" * 64
SHA_C = "c" * 64
SHA_M = "d" * 64
MD5 = "0123456789abcdef0123456789abcdef"

WHEEL_1 = "example_pkg-1.0-py3-none-any.whl"
SDIST_2 = "example_pkg-2.0.tar.gz"
WHEEL_2 = "example_pkg-2.0-py3-none-any.whl"
ZIP_09 = "example_pkg-0.9.zip"


def visible(listing: Listing) -> list[ListedFile]:
    return [f for f in listing.files if not f.hidden]


def by_name(listing: Listing) -> dict[str, ListedFile]:
    return {f.filename: f for f in listing.files}


# --- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "normal"),
    [
        ("friendly-bard", "friendly-bard"),
        ("Friendly-Bard", "friendly-bard"),
        ("FRIENDLY-BARD", "friendly-bard"),
        ("friendly.bard", "friendly-bard"),
        ("friendly_bard", "friendly-bard"),
        ("friendly--bard", "friendly-bard"),
        ("FrIeNdLy-._.-bArD", "friendly-bard"),
        ("a", "a"),
        ("Zope.Interface", "zope-interface"),
        ("pkg2", "pkg2"),
    ],
)
def test_normalize(name: str, normal: str) -> None:
    assert normalize(name) == normal


@pytest.mark.parametrize("name", ["", "-pkg", "pkg-", ".pkg", "pkg_", "two words", "pkg/../x", "péché", "a!"])
def test_normalize_invalid(name: str) -> None:
    assert normalize(name) is None


@pytest.mark.parametrize(
    ("filename", "version"),
    [
        ("example_pkg-1.0-py3-none-any.whl", "1.0"),
        ("numpy_like-2.1.3-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl", "2.1.3"),
        ("pkg-1.0-1build-py3-none-any.whl", "1.0"),
        ("example-pkg-2.0.tar.gz", "2.0"),
        ("example_pkg-2.0rc1.zip", "2.0rc1"),
        ("example_pkg-0.1.post1.tar.bz2", "0.1.post1"),
        ("pkg-3.0.tgz", "3.0"),
        ("pkg-3.0.tar", "3.0"),
        ("pkg-1.0.whl", None),
        ("nodash.tar.gz", None),
        ("example_pkg-1.0.exe", None),
        ("example_pkg-1.0-py3-none-any.whl.metadata", None),
        ("README", None),
    ],
)
def test_version_from_filename(filename: str, version: str | None) -> None:
    assert version_from_filename(filename) == version


# --- parsing ----------------------------------------------------------------------------------

JSON_DOC: dict[str, Any] = {
    "meta": {"api-version": "1.1", "_last-serial": 4242},
    "name": "example-pkg",
    "versions": ["0.9", "1.0", "2.0"],
    "files": [
        {
            "filename": WHEEL_1,
            "url": f"../../files/{WHEEL_1}",
            "hashes": {"sha256": SHA_A},
            "requires-python": ">=3.8",
            "yanked": False,
            "size": 1234,
            "upload-time": "2024-01-02T03:04:05.000000Z",
            "core-metadata": {"sha256": SHA_M},
            "dist-info-metadata": {"sha256": SHA_M},
        },
        {
            "filename": SDIST_2,
            "url": f"{FILES_HOST}/packages/{SDIST_2}#sha256={SHA_B}",
            "hashes": {"SHA256": SHA_B.upper(), "md5": MD5},
            "yanked": "broken build",
            "size": 99,
            "core-metadata": False,
        },
        {
            "filename": WHEEL_2,
            "url": f"/files/{WHEEL_2}",
            "hashes": {"sha256": SHA_C},
            "yanked": True,
            "dist-info-metadata": True,
        },
    ],
}


def test_parse_json() -> None:
    listing = parse_json(json.dumps(JSON_DOC).encode(), DOC_URL, "upstream-a")
    assert listing.package == "example-pkg"
    assert listing.serial == 4242
    assert listing.versions == ("0.9", "1.0", "2.0")
    files = by_name(listing)
    assert [f.filename for f in visible(listing)] == [WHEEL_1, SDIST_2, WHEEL_2]

    w1 = files[WHEEL_1]
    assert w1.url == f"https://mirror.example.invalid/files/{WHEEL_1}"
    assert w1.source == "upstream-a"
    assert w1.hashes == {"sha256": SHA_A}
    assert w1.sha256 == SHA_A
    assert w1.version == "1.0"
    assert w1.size == 1234
    assert w1.extra == {
        "yanked": False,
        "requires_python": ">=3.8",
        "upload_time": "2024-01-02T03:04:05.000000Z",
        "core_metadata": {"sha256": SHA_M},
    }

    s2 = files[SDIST_2]
    assert s2.url == f"{FILES_HOST}/packages/{SDIST_2}"  # fragment stripped
    assert s2.hashes == {"sha256": SHA_B, "md5": MD5}  # lower-cased
    assert s2.size == 99
    assert s2.extra["yanked"] == "broken build"
    assert "core_metadata" not in s2.extra
    assert "requires_python" not in s2.extra

    w2 = files[WHEEL_2]
    assert w2.url == f"https://mirror.example.invalid/files/{WHEEL_2}"
    assert w2.size is None
    assert w2.extra["yanked"] is True
    assert w2.extra["core_metadata"] is True  # legacy dist-info-metadata


def test_parse_json_metadata_companions() -> None:
    listing = parse_json(json.dumps(JSON_DOC).encode(), DOC_URL, "upstream-a")
    hidden = {f.filename: f for f in listing.files if f.hidden}
    assert set(hidden) == {f"{WHEEL_1}.metadata", f"{WHEEL_2}.metadata"}
    meta1 = hidden[f"{WHEEL_1}.metadata"]
    assert meta1.url == f"https://mirror.example.invalid/files/{WHEEL_1}.metadata"
    assert meta1.hashes == {"sha256": SHA_M}
    assert meta1.version == "1.0"
    assert meta1.source == "upstream-a"
    assert hidden[f"{WHEEL_2}.metadata"].hashes == {}
    # each companion directly follows its file
    names = [f.filename for f in listing.files]
    assert names.index(f"{WHEEL_1}.metadata") == names.index(WHEEL_1) + 1


def test_parse_json_without_versions_derives_them() -> None:
    doc = {k: v for k, v in JSON_DOC.items() if k != "versions"}
    doc["meta"] = {"api-version": "1.0"}
    listing = parse_json(json.dumps(doc).encode(), DOC_URL, "s")
    assert listing.versions == ("1.0", "2.0")
    assert listing.serial is None


def test_parse_json_core_metadata_precedence() -> None:
    doc = {
        "name": "p",
        "files": [
            {"filename": "p-1.0.tar.gz", "url": "p-1.0.tar.gz", "hashes": {}, "core-metadata": True},
            {"filename": "p-1.1.tar.gz", "url": "p-1.1.tar.gz", "hashes": {}, "core-metadata": {}},
            {
                "filename": "p-1.2.tar.gz",
                "url": "p-1.2.tar.gz",
                "hashes": {},
                "core-metadata": {"sha256": SHA_M},
                "dist-info-metadata": True,
            },
            {"filename": "p-1.3.tar.gz", "url": "p-1.3.tar.gz", "hashes": {}},
        ],
    }
    files = by_name(parse_json(json.dumps(doc).encode(), DOC_URL, "s"))
    assert files["p-1.0.tar.gz"].extra["core_metadata"] is True
    assert files["p-1.1.tar.gz"].extra["core_metadata"] is True  # an empty dict still declares it
    assert files["p-1.2.tar.gz"].extra["core_metadata"] == {"sha256": SHA_M}
    assert "core_metadata" not in files["p-1.3.tar.gz"].extra
    assert "p-1.3.tar.gz.metadata" not in files
    assert files["p-1.0.tar.gz"].url == DOC_URL + "p-1.0.tar.gz"


HTML_DOC = f"""<!DOCTYPE html>
<html>
  <head>
    <meta name="pypi:repository-version" content="1.1">
    <title>Links for example-pkg</title>
  </head>
  <body>
    <h1>Links for example-pkg</h1>
    <a href="../../files/{WHEEL_1}#sha256={SHA_A.upper()}" data-requires-python="&gt;=3.8"
       data-core-metadata="sha256={SHA_M}" data-dist-info-metadata="sha256={SHA_M}">{WHEEL_1}</a><br/>
    <a href="{FILES_HOST}/packages/{SDIST_2}#sha256={SHA_B}"
       data-requires-python="&lt;4,&gt;=3.9"
       data-yanked="broken &quot;build&quot; &amp; more">{SDIST_2}</a><br/>
    <a href="/files/{WHEEL_2}#md5={MD5}" data-yanked data-dist-info-metadata="true">{WHEEL_2}</a><br/>
    <a href="/files/{ZIP_09}" data-yanked="">{ZIP_09}</a><br/>
    <a href="../../files/nameless-1.0.tar.gz#sha256={SHA_C}"></a>
    <a name="no-href">not a file</a>
  </body>
</html>
"""


def test_parse_html() -> None:
    listing = parse_html(HTML_DOC.encode(), DOC_URL, "upstream-b")
    files = by_name(listing)
    assert [f.filename for f in visible(listing)] == [
        WHEEL_1,
        SDIST_2,
        WHEEL_2,
        ZIP_09,
        "nameless-1.0.tar.gz",
    ]
    assert listing.versions == ("1.0", "2.0", "0.9")

    w1 = files[WHEEL_1]
    assert w1.url == f"https://mirror.example.invalid/files/{WHEEL_1}"
    assert w1.source == "upstream-b"
    assert w1.hashes == {"sha256": SHA_A}
    assert w1.size is None
    assert w1.extra == {"yanked": False, "requires_python": ">=3.8", "core_metadata": {"sha256": SHA_M}}
    assert files[f"{WHEEL_1}.metadata"].hashes == {"sha256": SHA_M}
    assert files[f"{WHEEL_1}.metadata"].hidden

    s2 = files[SDIST_2]
    assert s2.url == f"{FILES_HOST}/packages/{SDIST_2}"
    assert s2.hashes == {"sha256": SHA_B}
    assert s2.extra["requires_python"] == "<4,>=3.9"
    assert s2.extra["yanked"] == 'broken "build" & more'
    assert f"{SDIST_2}.metadata" not in files

    w2 = files[WHEEL_2]
    assert w2.url == f"https://mirror.example.invalid/files/{WHEEL_2}"
    assert w2.hashes == {"md5": MD5}
    assert w2.sha256 is None
    assert w2.extra["yanked"] is True
    assert w2.extra["core_metadata"] is True
    assert files[f"{WHEEL_2}.metadata"].hashes == {}

    z = files[ZIP_09]
    assert z.hashes == {}
    assert z.extra["yanked"] is True  # an empty data-yanked still yanks

    nameless = files["nameless-1.0.tar.gz"]  # no link text: the name comes from the URL
    assert nameless.url == "https://mirror.example.invalid/files/nameless-1.0.tar.gz"
    assert nameless.hashes == {"sha256": SHA_C}


def test_parse_html_core_metadata_wins_over_dist_info_metadata() -> None:
    body = (
        f'<a href="p-1.0.tar.gz" data-core-metadata="sha256={SHA_M}" data-dist-info-metadata="true">'
        "p-1.0.tar.gz</a>"
    ).encode()
    files = by_name(parse_html(body, DOC_URL, "s"))
    assert files["p-1.0.tar.gz"].extra["core_metadata"] == {"sha256": SHA_M}
    assert files["p-1.0.tar.gz.metadata"].hashes == {"sha256": SHA_M}


def test_parse_html_empty_page() -> None:
    listing = parse_html(b"<!DOCTYPE html><html><body><h1>Links for x</h1></body></html>", DOC_URL, "s")
    assert listing.files == ()
    assert listing.versions == ()


# --- rendering --------------------------------------------------------------------------------


def proxied_urls(listing: Listing) -> dict[str, str]:
    return {
        f.filename: f"http://proxy.invalid/default/pypi/public/files/example-pkg/{f.filename}"
        for f in listing.files
    }


def comparable(listing: Listing) -> list[tuple[Any, ...]]:
    return [
        (
            f.filename,
            dict(f.hashes),
            f.extra.get("requires_python"),
            f.extra.get("yanked"),
            f.extra.get("core_metadata"),
            f.hidden,
        )
        for f in listing.files
    ]


def test_render_json_round_trip() -> None:
    listing = parse_json(json.dumps(JSON_DOC).encode(), DOC_URL, "s")
    urls = proxied_urls(listing)
    body = render_json("example-pkg", listing, urls, {WHEEL_2: 777}, {})
    doc = json.loads(body)
    assert doc["meta"] == {"api-version": "1.1", "_last-serial": 4242}
    assert doc["name"] == "example-pkg"
    assert doc["versions"] == ["0.9", "1.0", "2.0"]
    assert [f["filename"] for f in doc["files"]] == [WHEEL_1, SDIST_2, WHEEL_2]  # no hidden entries
    assert [f["size"] for f in doc["files"]] == [1234, 99, 777]
    assert doc["files"][0]["url"] == urls[WHEEL_1]
    assert doc["files"][0]["upload-time"] == "2024-01-02T03:04:05.000000Z"
    assert doc["files"][0]["core-metadata"] == doc["files"][0]["dist-info-metadata"] == {"sha256": SHA_M}
    assert doc["files"][1]["core-metadata"] is False

    again = parse_json(body, "http://proxy.invalid/default/pypi/public/simple/example-pkg/", "s")
    assert comparable(again) == comparable(listing)
    assert [f.size for f in visible(again)] == [1234, 99, 777]
    assert again.versions == listing.versions
    assert [f.url for f in visible(again)] == [urls[f.filename] for f in visible(listing)]


def test_render_json_without_all_sizes_is_api_1_0() -> None:
    listing = parse_json(json.dumps(JSON_DOC).encode(), DOC_URL, "s")
    doc = json.loads(render_json("example-pkg", listing, proxied_urls(listing), {}, {}))
    assert doc["meta"]["api-version"] == "1.0"
    assert "versions" not in doc
    assert "size" not in doc["files"][2]
    assert doc["files"][0]["size"] == 1234


def test_render_json_derived_metadata() -> None:
    listing = Listing(
        package="p",
        files=(ListedFile(filename="p-1.0.tar.gz", url="x", source="s", hashes={"sha256": SHA_A}, size=5),),
        versions=("1.0",),
    )
    derived = {"p-1.0.tar.gz.metadata": SHA_M}
    doc = json.loads(render_json("p", listing, {"p-1.0.tar.gz": "/f/p-1.0.tar.gz"}, {}, derived))
    [entry] = doc["files"]
    assert entry["core-metadata"] == {"sha256": SHA_M}
    assert entry["yanked"] is False
    assert "requires-python" not in entry
    assert "upload-time" not in entry
    assert "_last-serial" not in doc["meta"]
    html = render_html("p", listing, {"p-1.0.tar.gz": "/f/p-1.0.tar.gz"}, derived).decode()
    assert f'data-core-metadata="sha256={SHA_M}"' in html


def test_render_html_round_trip() -> None:
    listing = parse_html(HTML_DOC.encode(), DOC_URL, "s")
    urls = proxied_urls(listing)
    body = render_html("example-pkg", listing, urls, {})
    text = body.decode()
    assert text.startswith("<!DOCTYPE html>")
    assert "<title>Links for example-pkg</title>" in text
    assert '<meta name="pypi:repository-version" content="1.1">' in text
    assert ".metadata<" not in text  # hidden companions are not rendered

    again = parse_html(body, "http://proxy.invalid/default/pypi/public/simple/example-pkg/", "s")
    assert comparable(again) == comparable(listing)
    assert again.versions == listing.versions
    assert [f.url for f in visible(again)] == [urls[f.filename] for f in visible(listing)]


def test_render_html_from_json_listing() -> None:
    listing = parse_json(json.dumps(JSON_DOC).encode(), DOC_URL, "s")
    text = render_html("example-pkg", listing, proxied_urls(listing), {}).decode()
    again = by_name(parse_html(text.encode(), DOC_URL, "s"))
    assert again[SDIST_2].hashes == {"sha256": SHA_B}  # sha256 preferred over md5 in the fragment
    assert again[WHEEL_1].extra["core_metadata"] == {"sha256": SHA_M}
    assert again[WHEEL_1].extra["requires_python"] == ">=3.8"
    assert again[WHEEL_2].extra["core_metadata"] is True
    assert again[SDIST_2].extra["yanked"] == "broken build"
    assert again[WHEEL_2].extra["yanked"] is True


def test_render_html_escapes_attributes() -> None:
    reason = 'has a "quote" & <tag>'
    listing = Listing(
        package="p",
        files=(
            ListedFile(
                filename="p-1.0.tar.gz",
                url="x",
                source="s",
                hashes={"sha256": SHA_A},
                extra={"requires_python": "<3.12,>=3.8", "yanked": reason},
            ),
            ListedFile(filename="p-1.1.tar.gz", url="y", source="s", extra={"yanked": False}),
        ),
    )
    urls = {"p-1.0.tar.gz": "/files/p-1.0.tar.gz?a=1&b=2", "p-1.1.tar.gz": "/files/p-1.1.tar.gz"}
    body = render_html("p<&>", listing, urls, {})
    text = body.decode()
    assert 'data-requires-python="&lt;3.12,&gt;=3.8"' in text
    assert 'data-yanked="has a &quot;quote&quot; &amp; &lt;tag&gt;"' in text
    assert 'href="/files/p-1.0.tar.gz?a=1&amp;b=2#sha256=' in text
    assert "<title>Links for p&lt;&amp;&gt;</title>" in text
    assert text.count("<a ") == 2

    files = by_name(parse_html(body, "http://proxy.invalid/simple/p/", "s"))
    assert set(files) == {"p-1.0.tar.gz", "p-1.1.tar.gz"}
    first = files["p-1.0.tar.gz"]
    assert first.extra["requires_python"] == "<3.12,>=3.8"
    assert first.extra["yanked"] == reason
    assert first.url == "http://proxy.invalid/files/p-1.0.tar.gz?a=1&b=2"
    assert first.hashes == {"sha256": SHA_A}
    second = files["p-1.1.tar.gz"]
    assert second.extra == {"yanked": False}
    assert "data-yanked" not in text.split("p-1.1.tar.gz")[0].rsplit("<a ", 1)[1]


def test_render_project_list_json() -> None:
    doc = json.loads(render_project_list(["alpha", "beta-two"], as_json=True))
    assert doc == {"meta": {"api-version": "1.0"}, "projects": [{"name": "alpha"}, {"name": "beta-two"}]}
    assert json.loads(render_project_list([], as_json=True))["projects"] == []


def test_render_project_list_html() -> None:
    body = render_project_list(["alpha", "beta-two", "a&b"], as_json=False)
    text = body.decode()
    assert text.startswith("<!DOCTYPE html>")
    assert '<a href="alpha/">alpha</a>' in text
    assert '<a href="a&amp;b/">a&amp;b</a>' in text
    links = parse_html(body, "http://proxy.invalid/default/pypi/public/simple/", "s").files
    assert [(f.filename, f.url) for f in links] == [
        ("alpha", "http://proxy.invalid/default/pypi/public/simple/alpha/"),
        ("beta-two", "http://proxy.invalid/default/pypi/public/simple/beta-two/"),
        ("a&b", "http://proxy.invalid/default/pypi/public/simple/a&b/"),
    ]


# --- negotiation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "chosen"),
    [
        (UPSTREAM_ACCEPT, JSON_V1),
        (f"{JSON_V1}, {HTML_V1};q=0.2, {TEXT_HTML};q=0.01", JSON_V1),
        (f"{TEXT_HTML};q=0.01, {HTML_V1};q=0.2, {JSON_V1}", JSON_V1),
        (f"{JSON_V1};q=0.1, {HTML_V1};q=0.9", HTML_V1),
        ("text/html", TEXT_HTML),
        ("application/vnd.pypi.simple.latest+json", JSON_V1),
        ("application/vnd.pypi.simple.latest+html", HTML_V1),
        (HTML_V1, HTML_V1),
        (None, TEXT_HTML),
        ("", TEXT_HTML),
        ("application/xml", None),
        ("application/json", None),
        ("*/*", TEXT_HTML),
        ("text/*", TEXT_HTML),
        (f"application/xml, {JSON_V1};q=0.5", JSON_V1),
        (f"{JSON_V1};q=0", None),
        (f"{JSON_V1};q=0, text/html", TEXT_HTML),
        (f"{JSON_V1};q=0.0, */*;q=0.1", TEXT_HTML),
        (f"{JSON_V1};q=bogus", None),
        (f"{JSON_V1}; charset=utf-8", JSON_V1),
        ("APPLICATION/VND.PYPI.SIMPLE.V1+JSON", JSON_V1),
        (f"text/html, {JSON_V1}", TEXT_HTML),  # equal q: the first listed wins
    ],
)
def test_negotiate_accept(accept: str | None, chosen: str | None) -> None:
    assert negotiate(accept, None) == chosen


@pytest.mark.parametrize(
    ("accept", "format_param", "chosen"),
    [
        ("text/html", JSON_V1, JSON_V1),
        (JSON_V1, "text/html", TEXT_HTML),
        (JSON_V1, HTML_V1, HTML_V1),
        (None, " Application/VND.pypi.simple.v1+json ", JSON_V1),
        (JSON_V1, "application/xml", None),
        (JSON_V1, "", JSON_V1),  # an empty parameter is no parameter
    ],
)
def test_negotiate_format_param_wins(accept: str | None, format_param: str, chosen: str | None) -> None:
    assert negotiate(accept, format_param) == chosen


def test_negotiate_q0_type_is_not_reached_through_wildcard() -> None:
    assert negotiate("text/html;q=0, */*;q=0.1", None) in {JSON_V1, HTML_V1}
