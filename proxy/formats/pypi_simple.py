"""The simple repository API (PEP 503 HTML, PEP 691 JSON), parsed and rendered. Pure functions.

Kept per file: hashes (the URL fragment in HTML, ``hashes`` in JSON), ``requires-python``,
``yanked`` (PEP 592), ``size`` and ``upload-time`` (PEP 700), and the core-metadata declaration
(PEP 658/714, also under its old name ``dist-info-metadata``). A file that declares core metadata
gets a hidden companion entry ``{filename}.metadata`` so the pipeline can fetch it like any asset.
"""

from __future__ import annotations

import functools
import html
import json
import re
from collections.abc import Mapping, Sequence
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urldefrag, urljoin

from proxy.model import ListedFile, Listing

JSON_V1 = "application/vnd.pypi.simple.v1+json"
HTML_V1 = "application/vnd.pypi.simple.v1+html"
TEXT_HTML = "text/html"
# What the proxy asks upstreams for: JSON preferred (it carries size and upload-time).
UPSTREAM_ACCEPT = f"{JSON_V1}, {HTML_V1};q=0.2, {TEXT_HTML};q=0.01"

# ASCII only, to the very end: with Unicode IGNORECASE the Kelvin sign matches "k" (and folds
# to it with lower()), the long s matches "s"; and "$" would accept a trailing newline.
_SEPARATORS = re.compile(r"[-_.]+")
_NAME_RE = re.compile(r"^([A-Z0-9]|[A-Z0-9][A-Z0-9._-]*[A-Z0-9])\Z", re.IGNORECASE | re.ASCII)
_SDIST_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".zip", ".tar")

CoreMetadata = Mapping[str, str] | bool


def normalize(name: str) -> str | None:
    """PEP 503 normalized name, or None if ``name`` is not a valid project name."""
    if not _NAME_RE.match(name):
        return None
    return _SEPARATORS.sub("-", name).lower()


def version_from_filename(filename: str) -> str | None:
    """The version part of a wheel or sdist filename (best effort; None if unrecognised)."""
    if filename.endswith(".whl"):
        parts = filename[:-4].split("-")
        return parts[1] if len(parts) >= 5 else None
    for suffix in _SDIST_SUFFIXES:
        if filename.endswith(suffix):
            stem = filename[: -len(suffix)]
            return stem.rsplit("-", 1)[1] if "-" in stem else None
    return None


def _core_metadata(value: object) -> CoreMetadata | None:
    """Normalise the JSON or HTML form of a core-metadata declaration."""
    if value is None or value is False:
        return None
    if value is True:
        return True
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()} or True
    if isinstance(value, str):
        if value.lower() == "true":
            return True
        if "=" in value:
            algo, _, digest = value.partition("=")
            return {algo.strip().lower(): digest.strip().lower()}
    return None


def _entry(
    filename: str,
    url: str,
    source: str,
    hashes: Mapping[str, str],
    *,
    requires_python: str | None,
    yanked: bool | str,
    size: int | None,
    upload_time: str | None,
    core_metadata: CoreMetadata | None,
) -> list[ListedFile]:
    version = version_from_filename(filename)
    extra: dict[str, Any] = {"yanked": yanked}
    if requires_python:
        extra["requires_python"] = requires_python
    if upload_time:
        extra["upload_time"] = upload_time
    if core_metadata is not None:
        extra["core_metadata"] = core_metadata
    entries = [
        ListedFile(
            filename=filename,
            url=url,
            source=source,
            hashes=dict(hashes),
            version=version,
            size=size,
            extra=extra,
        )
    ]
    if core_metadata is not None:
        meta_hashes = dict(core_metadata) if isinstance(core_metadata, Mapping) else {}
        entries.append(
            ListedFile(
                filename=f"{filename}.metadata",
                url=f"{url}.metadata",
                source=source,
                hashes=meta_hashes,
                version=version,
                hidden=True,
            )
        )
    return entries


def parse_json(body: bytes, url: str, source: str) -> Listing:
    """A PEP 691 project page."""
    data = json.loads(body)
    files: list[ListedFile] = []
    for f in data.get("files", []):
        file_url, _ = urldefrag(urljoin(url, str(f["url"])))
        hashes = {str(k).lower(): str(v).lower() for k, v in (f.get("hashes") or {}).items()}
        yanked = f.get("yanked", False)
        size = f.get("size")
        files += _entry(
            str(f["filename"]),
            file_url,
            source,
            hashes,
            requires_python=f.get("requires-python"),
            yanked=yanked if isinstance(yanked, str) and yanked else bool(yanked),
            size=int(size) if isinstance(size, int) else None,
            upload_time=f.get("upload-time"),
            core_metadata=_core_metadata(f.get("core-metadata", f.get("dist-info-metadata"))),
        )
    versions = tuple(str(v) for v in data.get("versions", [])) or _versions(files)
    serial = data.get("meta", {}).get("_last-serial")
    return Listing(
        package=str(data.get("name", "")),
        files=tuple(files),
        versions=versions,
        serial=serial if isinstance(serial, int) else None,
    )


class _AnchorParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.anchors: list[tuple[dict[str, str | None], str]] = []
        self._current: dict[str, str | None] | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._current = dict(attrs)
            self._text = []

    def handle_data(self, data: str) -> None:
        if self._current is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self._current is not None:
            self.anchors.append((self._current, "".join(self._text).strip()))
            self._current = None


def parse_html(body: bytes, url: str, source: str) -> Listing:
    """A PEP 503 project page; ValueError when the body is no HTML page at all.

    Refused: bytes that are not UTF-8 (gzip without ``Content-Encoding``, binary noise), text
    without markup, and a page that ends inside a tag (cut short). Read leniently, any of these
    would be an empty project, a 404 where the upstream had the files.
    """
    text = body.decode("utf-8")  # UnicodeDecodeError is a ValueError
    tail = text.rstrip()
    if "<" not in tail:
        raise ValueError("not an HTML page: no markup")
    if tail.rfind("<") > tail.rfind(">"):
        raise ValueError("the HTML page ends inside a tag (cut short?)")
    parser = _AnchorParser()
    parser.feed(text)
    parser.close()
    files: list[ListedFile] = []
    for attrs, text in parser.anchors:
        href = attrs.get("href")
        if not href:
            continue
        file_url, fragment = urldefrag(urljoin(url, href))
        filename = text or file_url.rsplit("/", 1)[-1]
        hashes: dict[str, str] = {}
        if "=" in fragment:
            algo, _, digest = fragment.partition("=")
            hashes[algo.lower()] = digest.lower()
        yanked: bool | str = False
        if "data-yanked" in attrs:
            yanked = attrs["data-yanked"] or True
        files += _entry(
            filename,
            file_url,
            source,
            hashes,
            requires_python=attrs.get("data-requires-python"),
            yanked=yanked,
            size=None,
            upload_time=None,
            core_metadata=_core_metadata(
                attrs.get("data-core-metadata", attrs.get("data-dist-info-metadata"))
            ),
        )
    return Listing(package="", files=tuple(files), versions=_versions(files))


def _versions(files: Sequence[ListedFile]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(f.version for f in files if f.version and not f.hidden))


# --- rendering --------------------------------------------------------------------------------


def _declared_metadata(entry: ListedFile, derived: Mapping[str, str]) -> CoreMetadata | None:
    declared: CoreMetadata | None = entry.extra.get("core_metadata")
    if declared is not None:
        return declared
    digest = derived.get(f"{entry.filename}.metadata")
    return {"sha256": digest} if digest else None


def render_json(
    name: str,
    listing: Listing,
    file_url: Mapping[str, str],
    sizes: Mapping[str, int],
    derived: Mapping[str, str],
) -> bytes:
    """PEP 691 JSON; api-version 1.1 (PEP 700) when every file's size is known."""
    visible = [f for f in listing.files if not f.hidden]
    out_files = []
    all_sized = True
    for f in visible:
        item: dict[str, Any] = {
            "filename": f.filename,
            "url": file_url[f.filename],
            "hashes": dict(f.hashes),
        }
        if f.extra.get("requires_python"):
            item["requires-python"] = f.extra["requires_python"]
        item["yanked"] = f.extra.get("yanked", False)
        size = f.size if f.size is not None else sizes.get(f.filename)
        if size is None:
            all_sized = False
        else:
            item["size"] = size
        if f.extra.get("upload_time"):
            item["upload-time"] = f.extra["upload_time"]
        meta = _declared_metadata(f, derived)
        item["core-metadata"] = dict(meta) if isinstance(meta, Mapping) else bool(meta)
        item["dist-info-metadata"] = item["core-metadata"]
        out_files.append(item)
    doc: dict[str, Any] = {
        "meta": {"api-version": "1.1" if all_sized else "1.0"},
        "name": name,
        "files": out_files,
    }
    if listing.serial is not None:
        doc["meta"]["_last-serial"] = listing.serial
    if all_sized:
        doc["versions"] = list(listing.versions)
    return json.dumps(doc, separators=(",", ":")).encode()


def render_html(
    name: str, listing: Listing, file_url: Mapping[str, str], derived: Mapping[str, str]
) -> bytes:
    """PEP 503 HTML with the PEP 592/658/714 data attributes."""
    esc = html.escape
    lines = [
        "<!DOCTYPE html>",
        "<html>",
        "<head>",
        '<meta name="pypi:repository-version" content="1.1">',
        f"<title>Links for {esc(name)}</title>",
        "</head>",
        "<body>",
        f"<h1>Links for {esc(name)}</h1>",
    ]
    for f in listing.files:
        if f.hidden:
            continue
        href = file_url[f.filename]
        if f.sha256:
            href += f"#sha256={f.sha256}"
        elif f.hashes:
            algo, digest = next(iter(f.hashes.items()))
            href += f"#{algo}={digest}"
        attrs = [f'href="{esc(href)}"']
        if f.extra.get("requires_python"):
            attrs.append(f'data-requires-python="{esc(f.extra["requires_python"])}"')
        yanked = f.extra.get("yanked", False)
        if yanked:
            attrs.append(f'data-yanked="{esc(yanked if isinstance(yanked, str) else "")}"')
        meta = _declared_metadata(f, derived)
        if meta is not None:
            value = "true" if meta is True else "{}={}".format(*next(iter(dict(meta).items())))  # type: ignore[arg-type]
            attrs.append(f'data-dist-info-metadata="{esc(value)}"')
            attrs.append(f'data-core-metadata="{esc(value)}"')
        lines.append(f"<a {' '.join(attrs)}>{esc(f.filename)}</a><br/>")
    lines += ["</body>", "</html>", ""]
    return "\n".join(lines).encode()


def render_project_list(names: Sequence[str], as_json: bool) -> bytes:
    """The ``/simple/`` root: the projects this repository has stored (see the README)."""
    if as_json:
        return json.dumps(
            {"meta": {"api-version": "1.0"}, "projects": [{"name": n} for n in names]},
            separators=(",", ":"),
        ).encode()
    body = "\n".join(f'<a href="{html.escape(n)}/">{html.escape(n)}</a><br/>' for n in names)
    return (
        '<!DOCTYPE html>\n<html>\n<head>\n<meta name="pypi:repository-version" content="1.0">\n'
        f"<title>Simple index</title>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    ).encode()


@functools.lru_cache(maxsize=128)
def negotiate(accept: str | None, format_param: str | None) -> str | None:
    """Pick ``JSON_V1``, ``HTML_V1`` or ``TEXT_HTML`` for a request (None: nothing acceptable).

    ``?format=`` (as PyPI offers) wins over ``Accept``; a missing ``Accept`` means HTML.
    Remembered per header value: installers send the same few ``Accept`` lines on every
    request, and parsing one costs more than the rest of a page hit's routing.
    """
    supported = {
        JSON_V1: JSON_V1,
        "application/vnd.pypi.simple.latest+json": JSON_V1,
        HTML_V1: HTML_V1,
        "application/vnd.pypi.simple.latest+html": HTML_V1,
        TEXT_HTML: TEXT_HTML,
        "text/*": TEXT_HTML,
        "*/*": TEXT_HTML,
    }
    if format_param:
        return supported.get(format_param.strip().lower())
    if not accept:
        return TEXT_HTML
    best: tuple[float, int, str] | None = None
    refused = {
        supported[m.split(";")[0].strip().lower()]
        for m in accept.split(",")
        if m.split(";")[0].strip().lower() in supported
        and m.split(";")[0].strip() not in {"*/*", "text/*"}
        and re.search(r";\s*q\s*=\s*0(\.0*)?\s*(;|$)", m)
    }
    for position, part in enumerate(accept.split(",")):
        media, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        chosen = supported.get(media.lower())
        if chosen is None or q <= 0:
            continue
        if media in {"*/*", "text/*"} and chosen in refused:
            # A wildcard never brings back a type the client refused by name (RFC 9110 12.5.1).
            chosen = next((c for c in (TEXT_HTML, HTML_V1, JSON_V1) if c not in refused), "")
            if not chosen:
                continue
        rank = (q, -position, chosen)
        if best is None or rank[:2] > best[:2]:
            best = rank
    return best[2] if best else None
