"""Sending an asset: sendfile for cache hits, a tail of the staging file for downloads.

Cache hits go through aiohttp's FileResponse (sendfile, HEAD and Range) with the digest as the
ETag, answered for ``If-None-Match`` here because FileResponse would use mtime and size. A miss
streams as the bytes arrive; if the download then fails its check, the connection is aborted, so
the client sees a broken transfer, never a complete-looking wrong file.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import socket
from concurrent.futures import Executor
from typing import IO, Any

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter

from proxy.model import CacheStatus, Digest
from proxy.pipeline.resolve import AssetHandle
from proxy.storage.local import LocalBlobStore

log = logging.getLogger("proxy.assets")

IMMUTABLE = "public, max-age=31536000, immutable"
SENDFILE_MIN = 64 * 1024  # below this one read and write is as cheap
SENDFILE_CHUNK = 16 * 2**20
SENDFILE_IDLE_MS = 60_000
BYTES_HINT = web.ResponseKey("bytes_hint", int)


class BlobFileResponse(web.FileResponse):
    """A FileResponse whose ETag is the content digest and whose body goes out by ``sendfile``.

    aiohttp delegates to ``loop.sendfile``, which uvloop does not implement, so it falls back to
    reading chunks through a thread and writing them through the transport (less than half of
    nginx's speed). Here the headers are flushed, and a worker thread then feeds the socket with
    ``os.sendfile``, waiting for writability with ``poll``: zero copies, no event-loop work.
    """

    def __init__(self, path: str, etag: str, executor: Executor | None) -> None:
        super().__init__(path)
        self._digest_etag = etag
        self._executor = executor

    async def _sendfile(
        self, request: web.BaseRequest, fobj: IO[Any], offset: int, count: int
    ) -> AbstractStreamWriter:
        transport = request.transport
        sock = _plain_socket(transport)
        if self._executor is None or sock is None or count < SENDFILE_MIN or self.compression:
            return await super()._sendfile(request, fobj, offset, count)
        writer = await web.StreamResponse.prepare(self, request)
        assert writer is not None and transport is not None
        await _flush_headers(writer, transport)
        cork = _cork(sock, True)
        try:
            await _sendfile_span(self._executor, sock, fobj.fileno(), offset, count)
        finally:
            if cork and not transport.is_closing():
                _cork(sock, False)
        if hasattr(writer, "buffer_size"):  # the access log's byte count (bypassed by sendfile)
            writer.buffer_size += count
        await web.StreamResponse.write_eof(self)
        return writer

    @property  # type: ignore[override]
    def etag(self) -> object:
        return super().etag

    @etag.setter
    def etag(self, value: object) -> None:
        web.FileResponse.etag.fset(self, self._digest_etag)  # type: ignore[attr-defined]


def _plain_socket(transport: asyncio.BaseTransport | None) -> socket.socket | None:
    """The client's socket, if bytes written to it reach the client as they are: not under TLS
    (``sendfile`` would put plaintext into the encrypted stream)."""
    if transport is None or transport.get_extra_info("sslcontext") is not None:
        return None
    if transport.get_extra_info("ssl_object") is not None:
        return None
    sock: socket.socket | None = transport.get_extra_info("socket")
    return sock


async def _flush_headers(writer: AbstractStreamWriter, transport: asyncio.Transport) -> None:
    """Put the response head on the wire: the body that follows bypasses the transport."""
    send_headers = getattr(writer, "send_headers", None)
    if send_headers is not None:
        send_headers()
    await writer.drain()
    for _ in range(1000):
        if transport.get_write_buffer_size() == 0:
            break
        await asyncio.sleep(0.001)


def _cork(sock: socket.socket, on: bool) -> bool:
    """TCP_CORK on or off (full segments while a file streams: nginx's tcp_nopush)."""
    cork = getattr(socket, "TCP_CORK", None)
    if cork is None:
        return False
    sock.setsockopt(socket.IPPROTO_TCP, cork, 1 if on else 0)
    return True


async def _sendfile_span(executor: Executor, sock: socket.socket, fd: int, offset: int, count: int) -> None:
    """``count`` bytes of file ``fd`` from ``offset`` into the client's socket, from a thread.

    The thread gets descriptors of its own, and closes them itself when it ends: if the client
    hangs up, the loop closes its descriptor (and a cancelled await would not wait for the
    thread), so a number shared with the loop could be reused by another connection or file
    before the thread's next sendfile. The same for the file, which its owner may close.
    """
    sock_fd = os.dup(sock.fileno())
    try:
        file_fd = os.dup(fd)
    except OSError:
        os.close(sock_fd)
        raise
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(executor, _sendfile_blocking, sock_fd, file_fd, offset, count)


def _sendfile_blocking(sock_fd: int, file_fd: int, offset: int, count: int) -> None:
    """Copy ``count`` bytes from a file to a non-blocking socket, in a worker thread.

    Both descriptors are the thread's own duplicates, closed here whatever happens.
    """
    try:
        poller = select.poll()
        poller.register(sock_fd, select.POLLOUT)
        while count > 0:
            try:
                sent = os.sendfile(sock_fd, file_fd, offset, min(count, SENDFILE_CHUNK))
            except BlockingIOError:
                if not poller.poll(SENDFILE_IDLE_MS):
                    raise TimeoutError("client stopped reading") from None
                continue
            if sent == 0:
                raise ConnectionResetError("file ended early or peer closed")
            offset += sent
            count -= sent
    finally:
        os.close(sock_fd)
        os.close(file_fd)


class PlainBlobResponse(web.StreamResponse):
    """A blob sealed at rest, decrypted chunk by chunk as it is sent; HEAD and one Range too.

    sendfile cannot decrypt, so encrypted blobs pay for a read, a decryption and a write per
    chunk; the plaintext exists only in memory, one chunk at a time.
    """

    def __init__(self, blobs: LocalBlobStore, digest: Digest) -> None:
        super().__init__()
        self._blobs = blobs
        self._digest = digest

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        f = await asyncio.to_thread(self._blobs.open_plain, self._digest)
        try:
            size = await asyncio.to_thread(f.seek, 0, os.SEEK_END)
            start, end = 0, size
            self.headers[hdrs.ACCEPT_RANGES] = "bytes"
            wanted = _single_range(request.headers.get(hdrs.RANGE), size)
            if wanted == "unsatisfiable":
                self.set_status(416)
                self.headers[hdrs.CONTENT_RANGE] = f"bytes */{size}"
                self.content_length = 0
                return await super().prepare(request)
            if isinstance(wanted, tuple):
                start, end = wanted
                self.set_status(206)
                self.headers[hdrs.CONTENT_RANGE] = f"bytes {start}-{end - 1}/{size}"
            self.content_length = end - start
            writer = await super().prepare(request)
            if request.method == hdrs.METH_HEAD:
                return writer
            await asyncio.to_thread(f.seek, start)
            remaining = end - start
            while remaining > 0:
                chunk = await asyncio.to_thread(f.read, min(remaining, 1024 * 1024))
                if not chunk:
                    raise ConnectionResetError("blob ended early")
                await self.write(chunk)
                remaining -= len(chunk)
            return writer
        finally:
            await asyncio.to_thread(f.close)


def _single_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """(start, end) of a single ``bytes=`` range, "unsatisfiable", or None to send everything."""
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    first, _, last = header[6:].strip().partition("-")
    try:
        if not first:
            length = int(last)
            return (max(0, size - length), size) if length > 0 else "unsatisfiable"
        start = int(first)
        end = min(int(last) + 1, size) if last else size
    except ValueError:
        return None
    if start >= size or end <= start:
        return "unsatisfiable"
    return start, end


def _etag_matches(request: web.Request, etag: str) -> bool:
    header = request.headers.get(hdrs.IF_NONE_MATCH)
    if not header:
        return False
    wanted = {t.strip().removeprefix("W/").strip('"') for t in header.split(",")}
    return "*" in wanted or etag in wanted


def _common_headers(response: web.StreamResponse, status: CacheStatus, content_type: str) -> None:
    response.headers["X-Cache"] = status.value
    # The registry's type, never a browser's guess: an artifact that looks like HTML stays a file.
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers[hdrs.CACHE_CONTROL] = IMMUTABLE
    response.content_type = content_type.split(";")[0]
    if "charset=" in content_type:
        response.charset = content_type.split("charset=", 1)[1].strip()


class AssetSender:
    """Builds asset responses from the blob store, sending large hits from a thread pool."""

    def __init__(self, blobs: LocalBlobStore, executor: Executor | None) -> None:
        self._blobs = blobs
        self._executor = executor

    def blob(
        self,
        request: web.Request,
        digest: Digest,
        content_type: str,
        status: CacheStatus,
        size: int | None = None,
    ) -> web.StreamResponse:
        """A committed blob by sendfile, or 304 when the client already has these bytes."""
        etag = digest.hex
        if _etag_matches(request, etag):
            not_modified = web.Response(status=304)
            not_modified.headers["X-Cache"] = status.value
            not_modified.headers[hdrs.ETAG] = f'"{etag}"'
            return not_modified
        response: web.StreamResponse
        elsewhere = self._blobs.presigned_url(digest)
        if elsewhere is not None:  # in an object store, not on this node: the client fetches it there
            response = web.Response(status=302)
            response.headers[hdrs.LOCATION] = elsewhere
            response.headers["X-Cache"] = status.value
            response.headers[hdrs.CACHE_CONTROL] = "no-store"  # the URL expires; the blob does not
            response.headers["X-Content-SHA256"] = etag
            return response
        if self._blobs.sealer is not None:  # encrypted at rest: decrypted as it is sent
            response = PlainBlobResponse(self._blobs, digest)
        else:
            response = BlobFileResponse(str(self._blobs.local_path(digest)), etag, self._executor)
        response.headers[hdrs.ETAG] = f'"{etag}"'
        _common_headers(response, status, content_type)
        response.headers["X-Content-SHA256"] = etag
        if size is not None:
            response[BYTES_HINT] = size  # for metrics: a file response's length is set as it is sent
        return response

    async def asset(self, request: web.Request, handle: AssetHandle) -> web.StreamResponse:
        """Answer with the asset ``handle`` points at (see the module docstring)."""
        if handle.record is not None:
            record = handle.record
            return self.blob(request, record.digest, record.content_type, handle.status, record.size)
        flight = handle.flight
        assert flight is not None
        try:
            await flight.started()  # a failure before the first byte is an ordinary error response
            # Not attached: another worker process committed it, so it is sent like a hit.
            # An empty body is complete with its headers, before any check: wait for the check.
            if (
                request.method == hdrs.METH_HEAD
                or handle.entry is None
                or not flight.attached
                or flight.expected_size == 0
            ):
                info = await flight.result()
                return self.blob(request, info.digest, flight.content_type, CacheStatus.MISS)
            return await self._stream(request, handle)
        finally:
            flight.release()

    async def _stream(self, request: web.Request, handle: AssetHandle) -> web.StreamResponse:
        flight = handle.flight
        assert flight is not None and handle.entry is not None
        response = web.StreamResponse()
        _common_headers(response, CacheStatus.MISS, flight.content_type)
        if flight.expected_size is not None:
            response.content_length = flight.expected_size
        if handle.entry.sha256:
            response.headers[hdrs.ETAG] = f'"{handle.entry.sha256}"'
        transport = request.transport
        sock = _plain_socket(transport)
        fd = flight.plain_fd
        writer = await response.prepare(request)
        try:
            if self._executor is not None and sock is not None and fd is not None and flight.expected_size:
                # Straight from the staging file to the socket: a hundred clients of one cold
                # download hold no copies of it (peak RSS stays flat, whatever the file's size).
                assert writer is not None and transport is not None
                await _flush_headers(writer, transport)
                cork = _cork(sock, True)
                try:
                    async for offset, count in flight.spans():
                        await _sendfile_span(self._executor, sock, fd, offset, count)
                finally:
                    if cork and not transport.is_closing():
                        _cork(sock, False)
                if hasattr(writer, "buffer_size"):  # the access log's byte count
                    writer.buffer_size += flight.expected_size
                await response.write_eof()
                return response
            async for chunk in flight.stream():
                await response.write(chunk)
        except ConnectionError as exc:
            log.info("client went away during %s: %s", request.path, exc)
            if request.transport is not None:
                request.transport.abort()
        except Exception as exc:  # noqa: BLE001 - the body has started: abort, never complete it
            log.warning("aborting %s mid-body: %s", request.path, exc)
            if request.transport is not None:
                request.transport.abort()
        return response
