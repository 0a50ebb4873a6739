"""Staging temp files and the local blob store: verify, commit by rename, clean up on failure."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from pathlib import Path

import pytest

from proxy.model import Digest
from proxy.storage.local import READ_CHUNK, LocalBlobStore
from proxy.storage.staging import (
    FLUSH_BYTES,
    TEMP_SUFFIX,
    BlobCorrupt,
    BlobTooLarge,
    BlobTruncated,
    StagedBlob,
    StagingArea,
    StagingError,
)

LIMIT = 64 * 2**20


@dataclass
class Store:
    tmp: Path
    blobs: Path
    area: StagingArea
    store: LocalBlobStore


def _prepare(area: StagingArea, store: LocalBlobStore) -> int:
    store.prepare()
    return area.prepare()


def list_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


async def files_in(root: Path) -> list[Path]:
    return await asyncio.to_thread(list_files, root)


async def read(path: Path) -> bytes:
    return await asyncio.to_thread(path.read_bytes)


async def exists(path: Path) -> bool:
    return await asyncio.to_thread(path.exists)


@pytest.fixture
async def data(tmp_path: Path) -> Store:
    area = StagingArea(tmp_path / "tmp")
    store = LocalBlobStore(tmp_path / "blobs")
    await asyncio.to_thread(_prepare, area, store)
    return Store(tmp=tmp_path / "tmp", blobs=tmp_path / "blobs", area=area, store=store)


async def stage(area: StagingArea, payload: bytes, expect: dict[str, str] | None = None) -> StagedBlob:
    async with area.create(expect, max_size=LIMIT) as writer:
        await writer.write(payload)
        return await writer.finish()


async def test_finish_hashes_and_put_renames(data: Store) -> None:
    chunks = [b"alpha " * 1000, b"", b"beta" * 50_000, b"gamma"]
    payload = b"".join(chunks)
    sha = hashlib.sha256(payload).hexdigest()
    async with data.area.create({"sha256": sha.upper()}, expect_size=len(payload), max_size=LIMIT) as writer:
        assert writer.path.parent == data.tmp
        assert writer.path.name.endswith(TEMP_SUFFIX)
        for chunk in chunks:
            await writer.write(chunk)
        assert writer.size == len(payload)
        staged = await writer.finish()
    assert staged.digest == Digest(sha)
    assert staged.size == len(payload)
    assert staged.hashes == {"sha256": sha}
    assert staged.path == writer.path
    assert await files_in(data.tmp) == [staged.path]  # still staged after leaving the block
    assert await read(staged.path) == payload
    assert await files_in(data.blobs) == []
    assert await data.store.stat(staged.digest) is None

    info = await data.store.put(staged)
    assert (info.digest, info.size) == (staged.digest, len(payload))
    target = data.blobs / "sha256" / sha[:2] / sha
    assert data.store.local_path(staged.digest) == target
    assert await files_in(data.blobs) == [target]
    assert await files_in(data.tmp) == []
    assert await read(target) == payload
    stat = await data.store.stat(staged.digest)
    assert stat is not None
    assert stat.size == len(payload)


async def test_declared_sha256_mismatch(data: Store) -> None:
    with pytest.raises(BlobCorrupt, match="sha256 mismatch"):
        async with data.area.create({"sha256": "0" * 64}, max_size=LIMIT) as writer:
            await writer.write(b"not what was promised")
            await writer.finish()
    assert not await exists(writer.path)
    assert await files_in(data.tmp) == []
    assert await files_in(data.blobs) == []


async def test_declared_md5_is_checked_too(data: Store) -> None:
    payload = b"some bytes"
    sha = hashlib.sha256(payload).hexdigest()
    md5 = hashlib.md5(payload).hexdigest()  # the registry's declared hash
    with pytest.raises(BlobCorrupt, match="md5 mismatch"):
        await stage(data.area, payload, expect={"sha256": sha, "md5": "f" * 32})
    assert await files_in(data.tmp) == []

    staged = await stage(data.area, payload, expect={"sha256": sha, "md5": md5, "blake3": "ignored"})
    assert staged.hashes == {"sha256": sha, "md5": md5}


async def test_md5_alone_is_checked(data: Store) -> None:
    with pytest.raises(BlobCorrupt, match="md5"):
        await stage(data.area, b"payload", expect={"md5": "0" * 32})
    assert await files_in(data.tmp) == []


@pytest.mark.parametrize("declared", [9, 11])
async def test_expect_size_mismatch(data: Store, declared: int) -> None:
    with pytest.raises(BlobTruncated, match=f"got 10 bytes, expected {declared}"):
        async with data.area.create(expect_size=declared, max_size=LIMIT) as writer:
            await writer.write(b"0123456789")
            await writer.finish()
    assert await files_in(data.tmp) == []
    assert issubclass(BlobTruncated, StagingError)


async def test_exceeding_max_size(data: Store) -> None:
    with pytest.raises(BlobTooLarge):
        async with data.area.create(max_size=10) as writer:
            await writer.write(b"01234")
            await writer.write(b"56789")  # exactly the limit is fine
            assert writer.size == 10
            await writer.write(b"!")
    assert not await exists(writer.path)
    assert await files_in(data.tmp) == []


async def test_leaving_without_finish_removes_the_temp_file(data: Store) -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        async with data.area.create(max_size=LIMIT) as writer:
            await writer.write(b"x" * (FLUSH_BYTES + 10))
            assert await exists(writer.path)
            raise Boom
    assert not await exists(writer.path)
    assert writer.progress.closed

    async with data.area.create(max_size=LIMIT) as quiet:
        await quiet.write(b"abandoned")
    assert await files_in(data.tmp) == []


async def test_abort_is_safe_twice(data: Store) -> None:
    async with data.area.create(max_size=LIMIT) as writer:
        await writer.write(b"x")
        await writer.abort()
        await writer.abort()
    assert await files_in(data.tmp) == []


async def test_same_content_is_stored_once(data: Store) -> None:
    payload = b"identical bytes" * 100
    first = await stage(data.area, payload)
    second = await stage(data.area, payload)
    assert first.path != second.path
    assert first.digest == second.digest
    assert len(await files_in(data.tmp)) == 2

    info1 = await data.store.put(first)
    info2 = await data.store.put(second)
    assert info1 == info2
    assert info2.size == len(payload)
    assert await files_in(data.blobs) == [data.store.local_path(first.digest)]
    assert await files_in(data.tmp) == []


async def test_empty_blob(data: Store) -> None:
    staged = await stage(data.area, b"", expect={"sha256": hashlib.sha256(b"").hexdigest()})
    assert staged.size == 0
    await data.store.put(staged)
    assert [chunk async for chunk in data.store.open(staged.digest)] == []


def test_prepare_removes_leftovers(tmp_path: Path) -> None:
    root = tmp_path / "tmp"
    area = StagingArea(root)
    assert area.prepare() == 0
    assert root.is_dir()
    for name in ("a.part", "b.part", "c.part"):
        (root / name).write_bytes(b"crash leftover")
    (root / "sub").mkdir()
    assert area.prepare() == 3
    assert sorted(p.name for p in root.iterdir()) == ["sub"]
    assert area.prepare() == 0


async def test_progress_wakes_a_waiting_reader(data: Store) -> None:
    async with data.area.create(max_size=LIMIT) as writer:
        progress = writer.progress
        reader = asyncio.create_task(progress.wait_beyond(0))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert not reader.done()
        await writer.write(b"y" * (FLUSH_BYTES + 1))
        await asyncio.wait_for(reader, timeout=2)
        assert progress.written == FLUSH_BYTES + 1
        assert not progress.closed

        tail = asyncio.create_task(progress.wait_beyond(10 * FLUSH_BYTES))
        await asyncio.sleep(0)
        assert not tail.done()
        await writer.write(b"z" * FLUSH_BYTES)
        await asyncio.sleep(0)
        assert progress.written == 2 * FLUSH_BYTES + 1
        assert not tail.done()  # woken, but not far enough yet: still waiting
        staged = await writer.finish()
        await asyncio.wait_for(tail, timeout=2)  # the writer is done
    assert progress.closed
    assert staged.size == 2 * FLUSH_BYTES + 1


async def test_wait_beyond_returns_at_once_when_already_written(data: Store) -> None:
    async with data.area.create(max_size=LIMIT) as writer:
        await writer.write(b"q" * FLUSH_BYTES)
        await asyncio.wait_for(writer.progress.wait_beyond(FLUSH_BYTES - 1), timeout=1)
        await writer.finish()


async def test_open_streams_from_offset(data: Store) -> None:
    payload = bytes(range(256)) * (READ_CHUNK // 256 * 2 + 3)  # a bit over two read chunks
    staged = await stage(data.area, payload)
    await data.store.put(staged)

    chunks = [chunk async for chunk in data.store.open(staged.digest)]
    assert len(chunks) == 3
    assert b"".join(chunks) == payload

    offset = READ_CHUNK + 17
    assert b"".join([c async for c in data.store.open(staged.digest, offset)]) == payload[offset:]
    assert [c async for c in data.store.open(staged.digest, len(payload))] == []
    assert await data.store.read_bytes(staged.digest) == payload


async def test_delete(data: Store) -> None:
    staged = await stage(data.area, b"to be deleted")
    await data.store.put(staged)
    assert await data.store.delete(staged.digest) is True
    assert await data.store.stat(staged.digest) is None
    assert await data.store.delete(staged.digest) is False
