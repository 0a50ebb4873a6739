"""NuGet v3 documents: the upstream's service index and registrations in, the proxy's out.

Upstream registrations are parsed into neutral listings: one entry per version, carrying the
catalog fields clients use (id, version, dependencies, listed, published, description…) but no
upstream URL except the ``.nupkg`` to fetch. Everything rendered points at the proxy: the
service index, registration index and leaves (every page inlined: NuGet clients read them
without another request), the flat container's version list, and search results.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import orjson

from proxy.formats import nuget_versions as nv
from proxy.model import ListedFile, Listing

PAGE_SIZE = 128
# Catalog fields passed through as they are (no URLs of the upstream among them).
_CATALOG_FIELDS = (
    "authors",
    "copyright",
    "description",
    "iconUrl",
    "language",
    "licenseExpression",
    "licenseUrl",
    "minClientVersion",
    "projectUrl",
    "readmeUrl",
    "releaseNotes",
    "requireLicenseAcceptance",
    "summary",
    "tags",
    "title",
    "deprecation",
    "vulnerabilities",
    "packageTypes",
    # Integrity fields, as the upstream wrote them (rewriting URLs never touches these).
    "packageHash",
    "packageHashAlgorithm",
    "packageSize",
)
UNLISTED_PUBLISHED = "1900-01-01T00:00:00+00:00"
COMMIT = {"commitId": "00000000-0000-0000-0000-000000000000", "commitTimeStamp": "1900-01-01T00:00:00+00:00"}


class NuGetDocumentError(ValueError):
    """An upstream document that is not what the v3 protocol says it is."""


def _load(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise NuGetDocumentError(f"not JSON: {exc}") from exc


def service_resources(body: bytes) -> dict[str, str]:
    """``@type`` → ``@id`` of a service index (the first of each type)."""
    doc = _load(body)
    resources = doc.get("resources") if isinstance(doc, dict) else None
    if not isinstance(resources, list):
        raise NuGetDocumentError("a service index needs a 'resources' list")
    found: dict[str, str] = {}
    for res in resources:
        if isinstance(res, dict) and isinstance(res.get("@id"), str):
            types = res.get("@type")
            for t in types if isinstance(types, list) else [types]:
                if isinstance(t, str):
                    found.setdefault(t, res["@id"])
    return found


def registration_base(resources: Mapping[str, str]) -> str:
    """The upstream's registration hive: SemVer 2 and gzip where it has one."""
    for kind in (
        "RegistrationsBaseUrl/3.6.0",
        "RegistrationsBaseUrl/Versioned",
        "RegistrationsBaseUrl/3.4.0",
    ):
        if kind in resources:
            return resources[kind].rstrip("/") + "/"
    if "RegistrationsBaseUrl" in resources:
        return resources["RegistrationsBaseUrl"].rstrip("/") + "/"
    raise NuGetDocumentError("the service index offers no RegistrationsBaseUrl")


def parse_registration(body: bytes, source: str) -> Listing:
    """A registration index: inlined pages parsed; linked ones listed in ``extra["pages"]``."""
    doc = _load(body)
    if not isinstance(doc, dict) or not isinstance(doc.get("items"), list):
        raise NuGetDocumentError("a registration index needs an 'items' list")
    files: list[ListedFile] = []
    linked: list[str] = []
    package = ""
    for page in doc["items"]:
        if not isinstance(page, dict):
            raise NuGetDocumentError("a registration page must be an object")
        if isinstance(page.get("items"), list):
            files += parse_page_items(page["items"], source)
        elif isinstance(page.get("@id"), str):
            linked.append(page["@id"])
        else:
            raise NuGetDocumentError("a registration page has neither items nor an @id")
    if files:
        package = nv.normalize_id(str(files[0].extra["catalog"]["id"]))
    return Listing(package=package, files=tuple(files), extra={"pages": linked})


def parse_page(body: bytes, source: str) -> list[ListedFile]:
    doc = _load(body)
    if not isinstance(doc, dict) or not isinstance(doc.get("items"), list):
        raise NuGetDocumentError("a registration page needs an 'items' list")
    return parse_page_items(doc["items"], source)


def parse_page_items(items: Sequence[Any], source: str) -> list[ListedFile]:
    files = []
    for leaf in items:
        entry = leaf.get("catalogEntry") if isinstance(leaf, dict) else None
        if not isinstance(entry, dict):
            raise NuGetDocumentError("a registration leaf needs a catalogEntry object")
        package_id, raw_version = entry.get("id"), entry.get("version")
        content = leaf.get("packageContent") or entry.get("packageContent")
        if (
            not isinstance(package_id, str)
            or not isinstance(raw_version, str)
            or not isinstance(content, str)
        ):
            raise NuGetDocumentError("a catalogEntry needs id, version and packageContent")
        try:
            version = nv.normalize(raw_version)
        except ValueError as exc:
            raise NuGetDocumentError(str(exc)) from exc
        if not nv.valid_id(package_id):
            raise NuGetDocumentError(f"{package_id!r} is not a package id")
        hashes = {}
        if entry.get("packageHashAlgorithm", "SHA512").upper() == "SHA512" and isinstance(
            entry.get("packageHash"), str
        ):
            with contextlib.suppress(ValueError):  # a hash that cannot be read is not checked
                hashes["sha512"] = base64.b64decode(entry["packageHash"], validate=True).hex()
        catalog = {k: entry[k] for k in _CATALOG_FIELDS if k in entry}
        catalog["id"] = package_id
        catalog["version"] = version
        catalog["dependencyGroups"] = _groups(entry.get("dependencyGroups"))
        listed = entry.get("listed", True) is not False
        files.append(
            ListedFile(
                filename=nupkg_name(package_id, version),
                url=content,
                source=source,
                hashes=hashes,
                version=version,
                extra={"catalog": catalog, "listed": listed, "published": str(entry.get("published", ""))},
            )
        )
    return files


def _groups(raw: Any) -> list[dict[str, Any]]:
    groups = []
    for group in raw if isinstance(raw, list) else []:
        if not isinstance(group, dict):
            continue
        deps = []
        for dep in group.get("dependencies") or []:
            if isinstance(dep, dict) and isinstance(dep.get("id"), str) and nv.valid_id(dep["id"]):
                deps.append({"id": dep["id"], "range": str(dep.get("range") or "(, )")})
        out: dict[str, Any] = {"dependencies": deps}
        if isinstance(group.get("targetFramework"), str):
            out["targetFramework"] = group["targetFramework"]
        groups.append(out)
    return groups


def nupkg_name(package_id: str, version: str) -> str:
    return f"{package_id.lower()}.{nv.normalize(version).lower()}.nupkg"


def nuspec_name(package_id: str, version: str) -> str:
    return f"{package_id.lower()}.{nv.normalize(version).lower()}.nuspec"


# --- rendering ------------------------------------------------------------------------------------


class Urls:
    """Where the proxy serves one repository's feed."""

    def __init__(self, feed: str) -> None:
        self.feed = feed.rstrip("/")  # …/{domain}/nuget/{repo}

    @property
    def service_index(self) -> str:
        return f"{self.feed}/v3/index.json"

    @property
    def flat(self) -> str:
        return f"{self.feed}/v3-flatcontainer/"

    @property
    def registrations(self) -> str:
        return f"{self.feed}/v3/registration/"

    def registration(self, package_id: str) -> str:
        return f"{self.registrations}{package_id.lower()}/index.json"

    def leaf(self, package_id: str, version: str) -> str:
        return f"{self.registrations}{package_id.lower()}/{version.lower()}.json"

    def nupkg(self, package_id: str, version: str) -> str:
        lid, lver = package_id.lower(), version.lower()
        return f"{self.flat}{lid}/{lver}/{lid}.{lver}.nupkg"


def render_service_index(urls: Urls) -> bytes:
    resources: list[dict[str, str]] = []

    def add(url: str, kinds: Iterable[str], comment: str) -> None:
        resources.extend({"@id": url, "@type": kind, "comment": comment} for kind in kinds)

    add(urls.flat, ["PackageBaseAddress/3.0.0"], "Package contents (.nupkg, .nuspec) and version lists")
    registration_kinds = [
        "RegistrationsBaseUrl",
        "RegistrationsBaseUrl/3.0.0-beta",
        "RegistrationsBaseUrl/3.0.0-rc",
        "RegistrationsBaseUrl/3.4.0",
        "RegistrationsBaseUrl/3.6.0",
        "RegistrationsBaseUrl/Versioned",
    ]
    add(urls.registrations, registration_kinds, "Package metadata, SemVer 2.0 included, gzip when asked")
    add(f"{urls.feed}/api/v2/package", ["PackagePublish/2.0.0"], "Push and delete (unlist)")
    search = [
        "SearchQueryService",
        "SearchQueryService/3.0.0-beta",
        "SearchQueryService/3.0.0-rc",
        "SearchQueryService/3.5.0",
    ]
    add(f"{urls.feed}/v3/query", search, "Search: this repository's packages and the upstream's")
    auto = [
        "SearchAutocompleteService",
        "SearchAutocompleteService/3.0.0-beta",
        "SearchAutocompleteService/3.0.0-rc",
    ]
    add(f"{urls.feed}/v3/autocomplete", auto, "Autocomplete of package ids")
    return orjson.dumps(
        {
            "version": "3.0.0",
            "resources": resources,
            "@context": {"@vocab": "http://schema.nuget.org/services#"},
        }
    )


def leaf_entry(urls: Urls, entry: ListedFile) -> dict[str, Any]:
    """A registration leaf as it appears inlined in a page."""
    catalog = dict(entry.extra.get("catalog") or {})
    package_id = str(catalog.get("id") or "")
    version = entry.version or ""
    listed = bool(entry.extra.get("listed", True)) and not entry.hidden
    published = str(entry.extra.get("published") or "")
    catalog.update(
        {
            "@id": urls.leaf(package_id, version),
            "@type": "PackageDetails",
            "listed": listed,
            "published": published if listed or not published else UNLISTED_PUBLISHED,
            "packageContent": urls.nupkg(package_id, version),
            "dependencyGroups": [
                {
                    **{k: v for k, v in group.items() if k != "dependencies"},
                    "@type": "PackageDependencyGroup",
                    "dependencies": [
                        {
                            "@type": "PackageDependency",
                            "id": dep["id"],
                            "range": dep["range"],
                            "registration": urls.registration(dep["id"]),
                        }
                        for dep in group.get("dependencies") or []
                    ],
                }
                for group in catalog.get("dependencyGroups") or []
            ],
        }
    )
    return {
        "@id": urls.leaf(package_id, version),
        "@type": "Package",
        **COMMIT,
        "catalogEntry": catalog,
        "packageContent": urls.nupkg(package_id, version),
        "registration": urls.registration(package_id),
    }


def render_registration(urls: Urls, package: str, files: Sequence[ListedFile]) -> bytes:
    ordered = sorted(files, key=lambda f: nv.sort_key(f.version or ""))
    index_url = urls.registration(package)
    pages = []
    for start in range(0, len(ordered), PAGE_SIZE):
        chunk = ordered[start : start + PAGE_SIZE]
        lower, upper = (chunk[0].version or "").lower(), (chunk[-1].version or "").lower()
        pages.append(
            {
                "@id": f"{index_url}#page/{lower}/{upper}",
                "@type": "catalog:CatalogPage",
                **COMMIT,
                "count": len(chunk),
                "items": [leaf_entry(urls, f) for f in chunk],
                "parent": index_url,
                "lower": lower,
                "upper": upper,
            }
        )
    doc = {
        "@id": index_url,
        "@type": ["catalog:CatalogRoot", "PackageRegistration", "catalog:Permalink"],
        **COMMIT,
        "count": len(pages),
        "items": pages,
    }
    return orjson.dumps(doc)


def render_leaf(urls: Urls, entry: ListedFile) -> bytes:
    leaf = leaf_entry(urls, entry)
    catalog = leaf["catalogEntry"]
    return orjson.dumps(
        {
            "@id": leaf["@id"],
            "@type": ["Package", "http://schema.nuget.org/catalog#Permalink"],
            "catalogEntry": catalog["@id"],
            "listed": catalog["listed"],
            "packageContent": leaf["packageContent"],
            "published": catalog["published"],
            "registration": leaf["registration"],
        }
    )


def render_versions(files: Sequence[ListedFile]) -> bytes:
    versions = nv.sort_versions({(f.version or "").lower() for f in files if f.version})
    return orjson.dumps({"versions": versions})


def search_item(urls: Urls, files: Sequence[ListedFile], prerelease: bool) -> dict[str, Any] | None:
    """One search hit from a package's listed versions (None when none qualifies)."""
    shown = [
        f
        for f in files
        if f.version
        and not f.hidden
        and f.extra.get("listed", True)
        and (prerelease or not nv.is_prerelease(f.version))
    ]
    if not shown:
        return None
    ordered = sorted(shown, key=lambda f: nv.sort_key(f.version or ""))
    latest = ordered[-1]
    catalog = latest.extra.get("catalog") or {}
    package_id = str(catalog.get("id") or "")
    authors = catalog.get("authors") or ""
    return {
        "@id": urls.registration(package_id),
        "@type": "Package",
        "registration": urls.registration(package_id),
        "id": package_id,
        "version": latest.version,
        "description": catalog.get("description", ""),
        "summary": catalog.get("summary", ""),
        "title": catalog.get("title", package_id),
        "authors": authors
        if isinstance(authors, list)
        else [a.strip() for a in str(authors).split(",") if a.strip()],
        "tags": catalog.get("tags") or [],
        "totalDownloads": 0,
        "verified": False,
        "packageTypes": [{"name": "Dependency"}],
        "versions": [
            {"version": f.version, "downloads": 0, "@id": urls.leaf(package_id, f.version or "")}
            for f in ordered
        ],
    }


def rewrite_search_hit(urls: Urls, hit: Mapping[str, Any]) -> dict[str, Any] | None:
    """An upstream search hit with its URLs pointing at the proxy (None when malformed)."""
    package_id = hit.get("id")
    if not isinstance(package_id, str) or not nv.valid_id(package_id):
        return None
    out = {k: v for k, v in hit.items() if k not in {"@id", "registration", "versions", "iconUrl"}}
    out["@id"] = out["registration"] = urls.registration(package_id)
    if isinstance(hit.get("iconUrl"), str):
        out["iconUrl"] = hit["iconUrl"]
    versions = []
    for v in hit.get("versions") or []:
        if isinstance(v, dict) and isinstance(v.get("version"), str):
            versions.append(
                {
                    "version": v["version"],
                    "downloads": v.get("downloads", 0),
                    "@id": urls.leaf(package_id, v["version"]),
                }
            )
    out["versions"] = versions
    return out


def search_response(hits: Sequence[Mapping[str, Any]], total: int) -> bytes:
    return orjson.dumps(
        {"totalHits": total, "data": list(hits), "@context": {"@vocab": "http://schema.nuget.org/schema#"}}
    )


def matches(query: str) -> Callable[[str], bool]:
    """NuGet search, roughly: every term must appear in the id (case-insensitive)."""
    terms = [t.lower() for t in query.replace("id:", "").split() if t]
    return lambda package_id: all(t in package_id.lower() for t in terms)
