"""The S3 blob backend: blobs in a bucket, this node's hot blobs in a bounded disk cache.

Layout. A blob is the object ``{prefix}sha256/{hex}`` holding exactly the bytes the local backend
would keep in its file (sealed when encryption at rest is on), with its plaintext size in the
``x-amz-meta-plain-size`` metadata. The node's cache is the local backend's layout under
``data/blobs/`` (S3BlobStore *is* a LocalBlobStore for what it holds), so a cache hit is the same
integrity check and sendfile as on a single node.

Why our own client instead of aiobotocore: the proxy needs nine calls (PUT, HEAD, GET with Range,
DELETE, ListObjectsV2, the four multipart calls) and pre-signed GETs; upstream/sigv4.py already
signs, aiohttp already streams, and botocore would bring a large dependency tree whose
credential loading blocks the event loop. Path-style URLs against ``endpoint_url`` (MinIO, Ceph,
moto), virtual-hosted ones against AWS.

Writes. ``put`` uploads the verified staging file (one PUT, or a multipart upload in parts of
``multipart_threshold`` bytes, aborted on any failure) *before* renaming it into the cache: a
blob the index points at is in the bucket. An object already present is not uploaded again
(same digest, same bytes).

Reads. ``locate`` says where a blob is: on this node's disk, only in the bucket (``serve =
"redirect"``: the client gets a 302 to a pre-signed URL that carries a signature and the access
key id, never the secret key or any proxy credential), or nowhere. With ``serve = "stream"`` a
blob not on disk is downloaded into the cache once (concurrent requests wait for the same
download), its hash checked, then sent by sendfile like any hit.

The cache is bounded by ``local_cache`` bytes: least recently used whole files go first, never
one used in the last ``CACHE_GRACE`` seconds (a request between its check and its sendfile), so
the bound may be exceeded briefly. A reader that already opened a file keeps it (POSIX unlink).

Failures. Any object-store trouble (refused, timed out, 5xx, access denied) raises
``StorageUnavailable`` (503 with the reason, never the credentials); a download whose bytes do
not match their name raises ``StorageCorrupt`` (502) and nothing is cached. Blobs in the node's
cache are served while the bucket is down.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import logging
import os
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode
from xml.etree.ElementTree import Element

import aiohttp

from proxy import xmlsafe
from proxy.config import StorageConfig
from proxy.errors import StorageCorrupt, StorageUnavailable
from proxy.model import Digest
from proxy.storage.blobs import BlobInfo, Location
from proxy.storage.crypto import Sealer
from proxy.storage.local import READ_CHUNK, LocalBlobStore, _fsync_dir
from proxy.storage.staging import StagedBlob
from proxy.upstream.sigv4 import AwsCredentials, load_credentials, presign, sign

log = logging.getLogger("proxy.storage.s3")

CACHE_GRACE = 10.0
UNSIGNED = "UNSIGNED-PAYLOAD"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def _xml(body: bytes) -> Element:
    try:
        return xmlsafe.parse(body)
    except xmlsafe.XmlError:
        raise StorageUnavailable("the object store answered with malformed XML") from None


def _children(element: Element, tag: str) -> list[Element]:
    return [c for c in element if xmlsafe.local(c.tag) == tag]


class S3Client:
    """The nine S3 calls the blob store makes, signed with SigV4, over one aiohttp session."""

    def __init__(self, config: StorageConfig, env: Mapping[str, str]) -> None:
        self._config = config
        self._env = env  # read again when temporary credentials expire (os.environ is live)
        self._credentials: AwsCredentials | None = None
        self._session: aiohttp.ClientSession | None = None
        if config.endpoint_url:
            self._base = f"{config.endpoint_url}/{config.bucket}"
        else:
            self._base = f"https://{config.bucket}.s3.{config.region}.amazonaws.com"
        self.where = config.endpoint_url or f"s3://{config.bucket}"  # for messages: no secrets

    def url(self, key: str, query: Mapping[str, str] | None = None) -> str:
        url = f"{self._base}/{quote(key, safe='/-_.~')}"
        return f"{url}?{urlencode(sorted((query or {}).items()), quote_via=quote)}" if query else url

    async def _creds(self) -> AwsCredentials:
        if self._credentials is None:
            try:
                self._credentials = await asyncio.to_thread(load_credentials, self._env)
            except LookupError as exc:
                raise StorageUnavailable(f"object store {self.where}: {exc}") from None
        return self._credentials

    def _session_now(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=self._config.timeout)
            self._session = aiohttp.ClientSession(timeout=timeout, auto_decompress=False)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(
        self,
        method: str,
        key: str,
        *,
        query: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        signed: Mapping[str, str] | None = None,
        data: Any = None,
        payload_hash: str = EMPTY_SHA256,
        ok: tuple[int, ...] = (200,),
    ) -> aiohttp.ClientResponse:
        """A signed request whose status is in ``ok`` (the caller reads and releases it).

        ``signed`` headers are sent and signed (S3 refuses unsigned ``x-amz-*`` headers).
        """
        url = self.url(key, query)
        signed = sign(
            method,
            url,
            region=self._config.region,
            service="s3",
            credentials=await self._creds(),
            payload_hash=payload_hash,
            extra=signed,
        )
        try:
            response = await self._session_now().request(
                method, url, headers={**(headers or {}), **signed}, data=data, allow_redirects=False
            )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            reason = type(exc).__name__
            raise StorageUnavailable(f"object store {self.where} unreachable ({reason})") from None
        if response.status in ok:
            return response
        body = await response.read() if method != "HEAD" else b""
        response.release()
        code = ""
        if body:
            try:
                code = xmlsafe.text(xmlsafe.parse(body), "Code")
            except xmlsafe.XmlError:
                code = ""
        if response.status in {400, 403} and code in {"ExpiredToken", "InvalidToken", "InvalidAccessKeyId"}:
            self._credentials = None  # rotated temporary credentials: read the environment again
        raise StorageUnavailable(
            f"object store {self.where} answered {response.status} {code}".rstrip() + f" to {method} {key}",
            detail={"status": response.status, "code": code},
        )

    async def head(self, key: str) -> tuple[int, dict[str, str]] | None:
        """(length, metadata) of an object, or None when there is none."""
        response = await self.request("HEAD", key, ok=(200, 404))
        response.release()
        if response.status == 404:
            return None
        meta = {k.lower()[11:]: v for k, v in response.headers.items() if k.lower().startswith("x-amz-meta-")}
        return int(response.headers.get("Content-Length", "0")), meta

    async def put_file(self, key: str, path: Path, meta: Mapping[str, str], part_size: int) -> None:
        size = await asyncio.to_thread(lambda: path.stat().st_size)
        headers = {f"x-amz-meta-{k}": v for k, v in meta.items()}
        if size <= part_size:
            response = await self.request(
                "PUT",
                key,
                headers={"Content-Length": str(size)},
                signed=headers,
                data=_file_body(path, 0, size),
                payload_hash=UNSIGNED,
            )
            response.release()
            return
        response = await self.request("POST", key, query={"uploads": ""}, signed=headers)
        upload_id = xmlsafe.text(_xml(await response.read()), "UploadId")
        parts: list[tuple[int, str]] = []
        try:
            for number, offset in enumerate(range(0, size, part_size), 1):
                length = min(part_size, size - offset)
                response = await self.request(
                    "PUT",
                    key,
                    query={"partNumber": str(number), "uploadId": upload_id},
                    headers={"Content-Length": str(length)},
                    data=_file_body(path, offset, length),
                    payload_hash=UNSIGNED,
                )
                parts.append((number, response.headers.get("ETag", "")))
                response.release()
            xml = "".join(f"<Part><PartNumber>{n}</PartNumber><ETag>{e}</ETag></Part>" for n, e in parts)
            body = f"<CompleteMultipartUpload>{xml}</CompleteMultipartUpload>".encode()
            response = await self.request(
                "POST",
                key,
                query={"uploadId": upload_id},
                data=body,
                payload_hash=hashlib.sha256(body).hexdigest(),
            )
            answer = await response.read()
            if b"<Error>" in answer:  # S3 may fail a completion inside a 200
                raise StorageUnavailable(f"object store {self.where} failed to complete {key}")
        except BaseException:
            try:
                aborted = await self.request("DELETE", key, query={"uploadId": upload_id}, ok=(204, 200, 404))
                aborted.release()
            except StorageUnavailable:
                log.warning("could not abort multipart upload of %s", key)
            raise

    async def get(self, key: str, offset: int = 0) -> aiohttp.ClientResponse | None:
        """The object from ``offset`` on (the caller reads and releases it), or None."""
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        response = await self.request("GET", key, headers=headers, ok=(200, 206, 404, 416))
        if response.status == 404:
            response.release()
            return None
        return response

    async def delete(self, key: str) -> None:
        response = await self.request("DELETE", key, ok=(200, 204, 404))
        response.release()

    async def list(self, prefix: str) -> AsyncIterator[tuple[str, int, float]]:
        """(key, size, last-modified epoch) of every object under ``prefix``."""
        token: str | None = None
        while True:
            query = {"list-type": "2", "prefix": prefix}
            if token:
                query["continuation-token"] = token
            response = await self.request("GET", "", query=query)
            root = _xml(await response.read())
            for item in _children(root, "Contents"):
                stamp = xmlsafe.text(item, "LastModified").replace("Z", "+00:00")
                modified = datetime.datetime.fromisoformat(stamp)
                yield xmlsafe.text(item, "Key"), int(xmlsafe.text(item, "Size") or 0), modified.timestamp()
            if xmlsafe.text(root, "IsTruncated") != "true":
                return
            token = xmlsafe.text(root, "NextContinuationToken")

    def presign(self, key: str, expires: int) -> str | None:
        """A pre-signed GET URL, or None before credentials were loaded (never blocks)."""
        if self._credentials is None:
            return None
        creds, region = self._credentials, self._config.region
        return presign(self.url(key), region=region, service="s3", credentials=creds, expires=expires)


async def _file_body(path: Path, offset: int, length: int) -> AsyncIterator[bytes]:
    """``length`` bytes of a file from ``offset``. The file is closed before the last chunk is
    handed over: aiohttp stops at Content-Length and never asks for the end of the iteration."""
    f = await asyncio.to_thread(path.open, "rb")
    try:
        await asyncio.to_thread(f.seek, offset)
        while length > 0:
            chunk = await asyncio.to_thread(f.read, min(READ_CHUNK, length))
            if not chunk:
                raise OSError(f"{path.name} ended early")
            length -= len(chunk)
            if length == 0:
                await asyncio.to_thread(f.close)
            yield chunk
    finally:
        await asyncio.to_thread(f.close)


class S3BlobStore(LocalBlobStore):
    """See the module docstring."""

    def __init__(
        self,
        cache_root: Path,
        tmp: Path,
        config: StorageConfig,
        env: Mapping[str, str],
        sealer: Sealer | None = None,
    ) -> None:
        super().__init__(cache_root, sealer)
        self.config = config
        self.client = S3Client(config, env)
        self._tmp = tmp
        self._prefix = f"{config.prefix}sha256/"
        self._cached: OrderedDict[str, tuple[int, float]] = OrderedDict()  # hex → (bytes, last use)
        self._cache_total = 0
        self._filling: dict[str, asyncio.Future[None]] = {}

    @property
    def redirects(self) -> bool:
        """Whether clients are sent to the bucket for blobs not cached here (never sealed ones:
        only this node can unseal them)."""
        return self.config.serve == "redirect" and self.sealer is None

    def key(self, digest: Digest | str) -> str:
        return self._prefix + (digest if isinstance(digest, str) else digest.hex)

    # -- the cache -------------------------------------------------------------------------

    def prepare(self) -> None:
        """Create the cache and staging directories and learn what the cache holds (blocking)."""
        super().prepare()
        self._tmp.mkdir(parents=True, exist_ok=True)
        found = []
        for path in self.root.glob("*/*"):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            found.append((st.st_atime, path.name, st.st_size))
        self._cached.clear()
        for _, name, size in sorted(found):
            self._cached[name] = (size, 0.0)
        self._cache_total = sum(size for size, _ in self._cached.values())

    @property
    def cache_bytes(self) -> int:
        """Bytes this process knows to be in the cache."""
        return self._cache_total

    def _remember(self, hex_digest: str, size: int) -> None:
        self._forget(hex_digest)
        self._cached[hex_digest] = (size, time.monotonic())
        self._cache_total += size

    def _forget(self, hex_digest: str) -> None:
        known = self._cached.pop(hex_digest, None)
        if known is not None:
            self._cache_total -= known[0]

    async def _evict(self) -> None:
        """Drop least recently used files until the cache fits ``local_cache`` (see docstring)."""
        budget = self.config.local_cache
        total = self.cache_bytes
        if total <= budget:
            return
        now = time.monotonic()
        doomed = []
        for hex_digest, (size, used) in list(self._cached.items()):
            if total <= budget:
                break
            if now - used < CACHE_GRACE:
                continue
            doomed.append(hex_digest)
            self._forget(hex_digest)
            total -= size
        for hex_digest in doomed:
            path = self.local_path(Digest(hex_digest))
            await asyncio.to_thread(path.unlink, missing_ok=True)

    def _on_disk(self, digest: Digest) -> int | None:
        try:
            return self.local_path(digest).stat().st_size
        except FileNotFoundError:
            return None

    async def locate(self, digest: Digest, *, fetch: bool = True) -> Location:
        """Where the blob is; with ``fetch`` (or ``serve = "stream"``) a bucket-only blob is
        brought into the cache first."""
        size = await asyncio.to_thread(self._on_disk, digest)
        if size is not None:
            self._remember(digest.hex, size)
            return "local"
        self._forget(digest.hex)
        if not fetch and self.redirects:
            return "remote" if await self.client.head(self.key(digest)) is not None else "missing"
        return "local" if await self._fill(digest) else "missing"

    async def _fill(self, digest: Digest) -> bool:
        """Download the object into the cache, once however many wait; False when there is none."""
        running = self._filling.get(digest.hex)
        if running is None:
            running = asyncio.get_running_loop().create_future()
            self._filling[digest.hex] = running
            try:
                await self._download(digest)
            except BaseException as exc:
                running.set_exception(exc)
                running.exception()
                raise
            else:
                running.set_result(None)
            finally:
                self._filling.pop(digest.hex, None)
        else:
            await asyncio.shield(running)
        return digest.hex in self._cached

    async def _download(self, digest: Digest) -> None:
        response = await self.client.get(self.key(digest))
        if response is None:
            return
        part = self._tmp / f"s3-{digest.hex}-{os.getpid()}.part"
        await asyncio.to_thread(self._tmp.mkdir, parents=True, exist_ok=True)
        f = await asyncio.to_thread(part.open, "wb")
        try:
            try:
                async for chunk in response.content.iter_chunked(READ_CHUNK):
                    await asyncio.to_thread(f.write, chunk)
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise StorageUnavailable(
                    f"object store {self.client.where}: download cut short ({type(exc).__name__})"
                ) from None
            finally:
                response.release()
            await asyncio.to_thread(f.flush)
            await asyncio.to_thread(os.fsync, f.fileno())
            await asyncio.to_thread(f.close)
            actual = await asyncio.to_thread(self._plain_hash, part)
            if actual != digest.hex:
                raise StorageCorrupt(
                    f"the object store's copy of {digest.hex} does not hold the bytes its name says",
                    detail={"digest": digest.hex},
                )
            size = await asyncio.to_thread(self._commit, part, digest)
            self._remember(digest.hex, size)
        finally:
            await asyncio.to_thread(f.close)
            await asyncio.to_thread(part.unlink, missing_ok=True)
        await self._evict()

    def _plain_hash(self, path: Path) -> str | None:
        try:
            found = self.plain_sha256(path)
        except Exception:  # noqa: BLE001 - a sealed object that does not open is corrupt
            return None
        return None if found is None else found[0]

    def _commit(self, part: Path, digest: Digest) -> int:
        target = self.local_path(digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(part, target)
        _fsync_dir(target.parent)
        return target.stat().st_size

    # -- the BlobStore contract ------------------------------------------------------------

    async def stat(self, digest: Digest) -> BlobInfo | None:
        info = await super().stat(digest)
        if info is not None:
            return info
        found = await self.client.head(self.key(digest))
        if found is None:
            return None
        length, meta = found
        return BlobInfo(digest, int(meta.get("plain-size", length)))

    async def put(self, staged: StagedBlob) -> BlobInfo:
        """Upload (unless the bucket has it), then keep the file in this node's cache."""
        key = self.key(staged.digest)
        try:
            if await self.client.head(key) is None:
                await self.client.put_file(
                    key, staged.path, {"plain-size": str(staged.size)}, self.config.multipart_threshold
                )
        except BaseException:  # not committed: the staged file goes (readers keep their fds)
            await asyncio.to_thread(staged.path.unlink, missing_ok=True)
            raise
        info = await super().put(staged)
        size = await asyncio.to_thread(self._on_disk, staged.digest)
        if size is not None:
            self._remember(staged.digest.hex, size)
        await self._evict()
        return info

    async def open(self, digest: Digest, offset: int = 0) -> AsyncIterator[bytes]:
        """From the cache when there; else straight from the bucket (sealed blobs via the cache)."""
        if self.sealer is not None or await asyncio.to_thread(self._on_disk, digest) is not None:
            if await self.locate(digest) == "missing":
                raise FileNotFoundError(digest.hex)
            async for chunk in super().open(digest, offset):
                yield chunk
            return
        response = await self.client.get(self.key(digest), offset)
        if response is None:
            raise FileNotFoundError(digest.hex)
        try:
            if response.status == 416:
                return
            async for chunk in response.content.iter_chunked(READ_CHUNK):
                yield chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise StorageUnavailable(
                f"object store {self.client.where}: download cut short ({type(exc).__name__})"
            ) from None
        finally:
            response.release()

    async def read_bytes(self, digest: Digest) -> bytes:
        if await self.locate(digest) == "missing":
            raise FileNotFoundError(digest.hex)
        return await super().read_bytes(digest)

    async def delete(self, digest: Digest) -> bool:
        existed = await self.client.head(self.key(digest)) is not None
        await self.client.delete(self.key(digest))
        self._forget(digest.hex)
        return await super().delete(digest) or existed

    def presigned_url(self, digest: Digest) -> str | None:
        """With ``serve = "redirect"``, where a client fetches a blob this node has not cached."""
        if not self.redirects or digest.hex in self._cached:
            return None
        return self.client.presign(self.key(digest), int(self.config.redirect_expiry))

    async def inventory(self) -> dict[str, tuple[Path | None, int, float]]:
        """Every blob in the bucket: hex → (cache path or None, bytes, last-modified)."""
        cached = await super().inventory()
        found: dict[str, tuple[Path | None, int, float]] = {}
        async for key, size, modified in self.client.list(self._prefix):
            name = key[len(self._prefix) :]
            if re.fullmatch(r"[0-9a-f]{64}", name):
                found[name] = (cached[name][0] if name in cached else None, size, modified)
        return found

    async def inventory_pages(self) -> AsyncIterator[list[tuple[str, int, float]]]:
        """The bucket's blobs, a page of the listing at a time: (hex, bytes, last-modified)."""
        page: list[tuple[str, int, float]] = []
        async for key, size, modified in self.client.list(self._prefix):
            name = key[len(self._prefix) :]
            if re.fullmatch(r"[0-9a-f]{64}", name):
                page.append((name, size, modified))
            if len(page) >= 1000:
                yield page
                page = []
        if page:
            yield page

    async def stored_size(self, digest: Digest) -> int:
        info = await self.stat(digest)
        return info.size if info is not None else 0

    async def close(self) -> None:
        await self.client.close()
