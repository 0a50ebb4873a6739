"""The BlobStore contract (storage/blobs.py), run against the local, memory and S3 backends.

S3 is moto's standalone server on a loopback port (tests/s3_server.py); its tests skip with a
message where moto is not installed. moto checks neither signatures nor pre-signed URL expiry,
so the signing is checked against botocore's own signer (the AWS reference implementation) for
fixed times: what real S3 would verify is then byte-for-byte what botocore would have sent.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import os
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

from proxy.config import ConfigError, Overrides, StorageConfig, parse_config
from proxy.errors import StorageCorrupt, StorageUnavailable
from proxy.model import Digest
from proxy.storage import s3 as s3_module
from proxy.storage.blobs import BlobStore
from proxy.storage.crypto import Sealer, StaticKeys
from proxy.storage.local import LocalBlobStore
from proxy.storage.memory import MemoryBlobStore
from proxy.storage.s3 import S3BlobStore
from proxy.storage.staging import StagedBlob, StagingArea
from proxy.upstream.sigv4 import AwsCredentials, presign, sign
from tests.s3_server import FAKE_ENV, MotoServer, free_port, moto_server

PART = 5 * 2**20  # S3's smallest part: a blob above it is uploaded in parts


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    with moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as server:
        yield server


@dataclass
class Backend:
    name: str
    store: BlobStore
    area: StagingArea
    root: Path

    async def stage(self, payload: bytes) -> StagedBlob:
        async with self.area.create(max_size=2**30) as writer:
            await writer.write(payload)
            return await writer.finish()

    async def read(self, digest: Digest, offset: int = 0) -> bytes:
        return b"".join([chunk async for chunk in self.store.open(digest, offset)])


def _s3_config(endpoint: str, bucket: str, **keys: Any) -> StorageConfig:
    values: dict[str, Any] = {
        "backend": "s3",
        "bucket": bucket,
        "prefix": "prod/",
        "endpoint_url": endpoint,
        "multipart_threshold": PART,
        "local_cache": 2**30,
    }
    return StorageConfig(**(values | keys))


async def _bucket(store: S3BlobStore) -> None:
    """Create the store's bucket (moto starts empty)."""
    response = await store.client.request("PUT", "")
    response.release()


async def _s3_store(root: Path, endpoint: str, **keys: Any) -> S3BlobStore:
    bucket = f"b-{os.urandom(6).hex()}"
    store = S3BlobStore(root / "blobs", root / "tmp" / "s3", _s3_config(endpoint, bucket, **keys), FAKE_ENV)
    await asyncio.to_thread(store.prepare)
    await _bucket(store)
    return store


@pytest.fixture(params=["local", "memory", "s3"])
def backend_kind(request: pytest.FixtureRequest) -> tuple[str, str | None]:
    """The backend's name, and moto's endpoint for S3 (started outside the event loop)."""
    if request.param != "s3":
        return request.param, None
    server: MotoServer = request.getfixturevalue("moto")
    return "s3", server.endpoint


@pytest.fixture
async def backend(backend_kind: tuple[str, str | None], tmp_path: Path) -> AsyncIterator[Backend]:
    name, endpoint = backend_kind
    area = StagingArea(tmp_path / "tmp")
    await asyncio.to_thread(area.prepare)
    store: BlobStore
    if name == "local":
        local = LocalBlobStore(tmp_path / "blobs")
        await asyncio.to_thread(local.prepare)
        store = local
    elif name == "memory":
        store = MemoryBlobStore()
    else:
        assert endpoint is not None
        store = await _s3_store(tmp_path, endpoint)
    yield Backend(name, store, area, tmp_path)
    await store.close()


# -- the contract, every backend ---------------------------------------------------------


async def test_put_stat_open_round_trip(backend: Backend) -> None:
    payload = os.urandom(300_000)
    staged = await backend.stage(payload)
    info = await backend.store.put(staged)
    assert info.digest.hex == hashlib.sha256(payload).hexdigest() and info.size == len(payload)
    assert not await asyncio.to_thread(staged.path.exists), "put consumes the staged file"
    assert await backend.store.stat(info.digest) == info
    assert await backend.read(info.digest) == payload
    assert await backend.read(info.digest, 123_456) == payload[123_456:]
    assert await backend.read(info.digest, len(payload)) == b""


async def test_put_is_idempotent(backend: Backend) -> None:
    payload = b"same bytes twice" * 1000
    first = await backend.store.put(await backend.stage(payload))
    again = await backend.stage(payload)
    second = await backend.store.put(again)
    assert first == second
    assert not await asyncio.to_thread(again.path.exists)
    inventory = await backend.store.inventory()
    assert list(inventory) == [first.digest.hex]
    assert inventory[first.digest.hex][1] == len(payload)


async def test_inventory_pages_and_stored_size(backend: Backend) -> None:
    """gc's bounded walk: every blob once across the pages, with the size the store holds."""
    payloads = [os.urandom(1000 + i) for i in range(5)]
    infos = [await backend.store.put(await backend.stage(p)) for p in payloads]
    listed = [entry async for page in backend.store.inventory_pages() for entry in page]
    assert sorted(name for name, _, _ in listed) == sorted(i.digest.hex for i in infos)
    whole = await backend.store.inventory()
    assert {name: size for name, size, _ in listed} == {d: size for d, (_, size, _) in whole.items()}
    for info in infos:
        assert await backend.store.stored_size(info.digest) == whole[info.digest.hex][1] > 0
    await backend.store.delete(infos[0].digest)
    assert await backend.store.stored_size(infos[0].digest) == 0


async def test_local_path_semantics(backend: Backend) -> None:
    info = await backend.store.put(await backend.stage(b"on disk?"))
    path = backend.store.local_path(info.digest)
    if backend.name == "memory":
        assert path is None
        return
    assert path is not None and path.name == info.digest.hex
    assert await asyncio.to_thread(path.read_bytes) == b"on disk?"  # the sendfile source
    assert await backend.store.locate(info.digest) == "local"


async def test_missing_blob(backend: Backend) -> None:
    absent = Digest(hashlib.sha256(b"never stored").hexdigest())
    assert await backend.store.stat(absent) is None
    with pytest.raises(FileNotFoundError):
        await backend.read(absent)
    assert await backend.store.delete(absent) is False
    assert absent.hex not in await backend.store.inventory()


async def test_delete(backend: Backend) -> None:
    keep = await backend.store.put(await backend.stage(b"keep"))
    gone = await backend.store.put(await backend.stage(b"gone"))
    assert await backend.store.delete(gone.digest) is True
    assert await backend.store.stat(gone.digest) is None
    with pytest.raises(FileNotFoundError):
        await backend.read(gone.digest)
    assert set(await backend.store.inventory()) == {keep.digest.hex}
    assert await backend.read(keep.digest) == b"keep"


# -- S3 only ----------------------------------------------------------------------------


async def _forget_cache(store: S3BlobStore, digest: Digest) -> None:
    """As if this node never had the blob: only the bucket has it."""
    await asyncio.to_thread(store.local_path(digest).unlink)
    store._forget(digest.hex)


async def test_s3_layout_and_multipart(tmp_path: Path, moto: MotoServer) -> None:
    store = await _s3_store(tmp_path, moto.endpoint)
    area = StagingArea(tmp_path / "tmp")
    await asyncio.to_thread(area.prepare)
    try:
        payload = os.urandom(2 * PART + 12345)
        async with area.create(max_size=2**30) as writer:
            await writer.write(payload)
            staged = await writer.finish()
        info = await store.put(staged)
        key = f"prod/sha256/{info.digest.hex}"
        response = await store.client.request("HEAD", key)
        response.release()
        # A multipart object's ETag is "<md5 of the part md5s>-<parts>": three parts here.
        assert response.headers["ETag"].strip('"').endswith("-3")
        assert response.headers["x-amz-meta-plain-size"] == str(len(payload))
        listed = [k async for k, _, _ in store.client.list("prod/")]
        assert listed == [key]
        await _forget_cache(store, info.digest)
        assert await store.stat(info.digest) == info  # from the bucket
        # Streamed from the bucket from an offset (a Range GET), not through the cache
        tail = b"".join([c async for c in store.open(info.digest, PART + 7)])
        assert tail == payload[PART + 7 :]
        assert not await asyncio.to_thread(store.local_path(info.digest).exists)
    finally:
        await store.close()


async def test_s3_cache_fill_once_and_verified(tmp_path: Path, moto: MotoServer) -> None:
    store = await _s3_store(tmp_path, moto.endpoint)
    area = StagingArea(tmp_path / "tmp")
    await asyncio.to_thread(area.prepare)
    try:
        payload = os.urandom(1_000_000)
        async with area.create(max_size=2**30) as writer:
            await writer.write(payload)
            info = await store.put(await writer.finish())
        await _forget_cache(store, info.digest)
        gets = 0
        real_get = store.client.get

        async def counting_get(key: str, offset: int = 0) -> aiohttp.ClientResponse | None:
            nonlocal gets
            gets += 1
            return await real_get(key, offset)

        with mock.patch.object(store.client, "get", counting_get):
            where = await asyncio.gather(*(store.locate(info.digest) for _ in range(8)))
        assert where == ["local"] * 8
        assert gets == 1, "eight concurrent misses of one blob are one download"
        assert await asyncio.to_thread(store.local_path(info.digest).read_bytes) == payload
        # The bucket's copy replaced by other bytes: refused, nothing cached, a domain error.
        await _forget_cache(store, info.digest)
        response = await store.client.request(
            "PUT",
            store.key(info.digest),
            data=b"not the blob",
            payload_hash=hashlib.sha256(b"not the blob").hexdigest(),
        )
        response.release()
        with pytest.raises(StorageCorrupt):
            await store.locate(info.digest)
        assert not await asyncio.to_thread(store.local_path(info.digest).exists)
        assert await asyncio.to_thread(lambda: list((tmp_path / "tmp" / "s3").iterdir())) == []
    finally:
        await store.close()


async def test_s3_local_cache_is_bounded_lru(
    tmp_path: Path, moto: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(s3_module, "CACHE_GRACE", 0.0)
    store = await _s3_store(tmp_path, moto.endpoint, local_cache=250_000)
    area = StagingArea(tmp_path / "tmp")
    await asyncio.to_thread(area.prepare)
    try:
        infos = []
        for n in range(3):
            async with area.create(max_size=2**30) as writer:
                await writer.write(bytes([n]) * 100_000)
                infos.append(await store.put(await writer.finish()))
            if n == 1:
                assert await store.locate(infos[0].digest) == "local"  # touch the first: now the newest
        on_disk = {p.name for p in await asyncio.to_thread(lambda: list(store.root.glob("*/*")))}
        # 300 kB into 250 kB: the least recently used one (the second) went, whole
        assert on_disk == {infos[0].digest.hex, infos[2].digest.hex}
        assert store.cache_bytes <= 250_000
        assert await store.stat(infos[1].digest) == infos[1]  # still in the bucket
        assert await store.locate(infos[1].digest) == "local"  # and back in the cache on demand
        assert len(await asyncio.to_thread(lambda: list(store.root.glob("*/*")))) == 2
    finally:
        await store.close()


async def test_s3_presigned_redirect_url(tmp_path: Path, moto: MotoServer) -> None:
    store = await _s3_store(tmp_path, moto.endpoint, serve="redirect", redirect_expiry=120.0)
    area = StagingArea(tmp_path / "tmp")
    await asyncio.to_thread(area.prepare)
    try:
        async with area.create(max_size=2**30) as writer:
            await writer.write(b"fetch me from the bucket")
            info = await store.put(await writer.finish())
        assert store.presigned_url(info.digest) is None, "a blob on this node's disk is sent by it"
        await _forget_cache(store, info.digest)
        assert await store.locate(info.digest, fetch=False) == "remote"
        url = store.presigned_url(info.digest)
        assert url is not None and url.startswith(moto.endpoint)
        query = parse_qs(urlsplit(url).query)
        assert query["X-Amz-Expires"] == ["120"]
        assert FAKE_ENV["AWS_SECRET_ACCESS_KEY"] not in url
        async with aiohttp.ClientSession() as plain, plain.get(url) as response:  # no credentials
            assert response.status == 200
            assert await response.read() == b"fetch me from the bucket"
        assert not await asyncio.to_thread(store.local_path(info.digest).exists)
    finally:
        await store.close()


async def test_s3_store_down_is_a_domain_error(tmp_path: Path, moto: MotoServer) -> None:
    store = await _s3_store(tmp_path, moto.endpoint)
    area = StagingArea(tmp_path / "tmp")
    await asyncio.to_thread(area.prepare)
    async with area.create(max_size=2**30) as writer:
        await writer.write(b"cached here")
        cached = await store.put(await writer.finish())
    await store.close()
    # The same node, its object store gone (nothing listens on that port)
    dead = S3BlobStore(
        tmp_path / "blobs",
        tmp_path / "tmp" / "s3",
        _s3_config(f"http://127.0.0.1:{free_port()}", "gone"),
        FAKE_ENV,
    )
    await asyncio.to_thread(dead.prepare)
    try:
        assert await dead.locate(cached.digest) == "local"  # this node's cache still serves
        assert b"".join([c async for c in dead.open(cached.digest)]) == b"cached here"
        absent = Digest(hashlib.sha256(b"absent").hexdigest())
        with pytest.raises(StorageUnavailable) as down:
            await dead.stat(absent)
        assert (
            "unreachable" in down.value.message
            and FAKE_ENV["AWS_SECRET_ACCESS_KEY"] not in down.value.message
        )
        with pytest.raises(StorageUnavailable):
            await dead.locate(absent)
        async with area.create(max_size=2**30) as writer:
            await writer.write(b"not uploaded")
            staged = await writer.finish()
        with pytest.raises(StorageUnavailable):
            await dead.put(staged)
        assert not await asyncio.to_thread(staged.path.exists), "the staged file is not left behind"
        assert not await asyncio.to_thread(dead.local_path(staged.digest).exists), "not committed"
    finally:
        await dead.close()


async def test_s3_error_answers_are_domain_errors(tmp_path: Path, moto: MotoServer) -> None:
    store = S3BlobStore(
        tmp_path / "blobs",
        tmp_path / "tmp" / "s3",
        _s3_config(moto.endpoint, "no-such-bucket-here"),
        FAKE_ENV,
    )
    area = StagingArea(tmp_path / "tmp")
    await asyncio.to_thread(area.prepare)
    await asyncio.to_thread(store.prepare)
    try:
        async with area.create(max_size=2**30) as writer:
            await writer.write(b"nowhere to go")
            staged = await writer.finish()
        with pytest.raises(StorageUnavailable) as refused:
            await store.put(staged)
        assert refused.value.status == 503 and refused.value.detail["code"] == "NoSuchBucket"
        assert not await asyncio.to_thread(store.local_path(staged.digest).exists)
    finally:
        await store.close()


async def test_s3_sealed_blobs_stay_sealed_in_the_bucket(tmp_path: Path, moto: MotoServer) -> None:
    sealer = Sealer(StaticKeys([base64.b64encode(os.urandom(32)).decode()], "test"))
    bucket = f"b-{os.urandom(6).hex()}"
    config = _s3_config(moto.endpoint, bucket, serve="redirect")
    store = S3BlobStore(tmp_path / "blobs", tmp_path / "tmp" / "s3", config, FAKE_ENV, sealer)
    await asyncio.to_thread(store.prepare)
    await _bucket(store)
    area = StagingArea(tmp_path / "tmp", sealer)
    await asyncio.to_thread(area.prepare)
    try:
        payload = b"secret wheel bytes " * 5000
        async with area.create(max_size=2**30) as writer:
            await writer.write(payload)
            info = await store.put(await writer.finish())
        response = await store.client.request("GET", store.key(info.digest))
        stored = await response.read()
        response.release()
        assert b"secret wheel bytes" not in stored and stored[:4] == b"APXE"  # the bucket sees sealed bytes
        await _forget_cache(store, info.digest)
        assert await store.stat(info.digest) == info  # the plaintext size, from the metadata
        assert store.presigned_url(info.digest) is None, "sealed bytes are never handed to a client"
        # so even a hit's check (fetch=False) brings it here, unsealed only to check its hash
        assert await store.locate(info.digest, fetch=False) == "local"
        assert b"".join([c async for c in store.open(info.digest, 7)]) == payload[7:]
    finally:
        await store.close()


# -- signing, against botocore ------------------------------------------------------------

MOMENT = datetime.datetime(2026, 11, 26, 0, 30, 0, tzinfo=datetime.UTC)
CREDS = AwsCredentials("AKIAEXAMPLEKEY000001", "example/secret+key=0001", "session-token-1")


def test_header_signature_matches_botocore() -> None:
    botocore_auth = pytest.importorskip("botocore.auth")
    from botocore.awsrequest import AWSRequest  # type: ignore[import-untyped,unused-ignore]
    from botocore.credentials import Credentials  # type: ignore[import-untyped,unused-ignore]

    url = "http://127.0.0.1:9000/artifacts/prod/sha256/" + "ab" * 32
    ours = sign(
        "PUT",
        url,
        region="eu-west-1",
        service="s3",
        credentials=CREDS,
        payload_hash=hashlib.sha256(b"").hexdigest(),
        extra={"x-amz-meta-plain-size": "42"},
        now=MOMENT,
    )
    request = AWSRequest(method="PUT", url=url, data=b"", headers={"x-amz-meta-plain-size": "42"})
    signer = botocore_auth.S3SigV4Auth(
        Credentials(CREDS.access_key, CREDS.secret_key, CREDS.session_token), "s3", "eu-west-1"
    )
    with mock.patch.object(botocore_auth, "get_current_datetime", lambda: MOMENT.replace(tzinfo=None)):
        signer.add_auth(request)
    assert ours["Authorization"] == request.headers["Authorization"]


def test_presigned_url_matches_botocore_and_expires() -> None:
    botocore_auth = pytest.importorskip("botocore.auth")
    from botocore.awsrequest import AWSRequest  # type: ignore[import-untyped,unused-ignore]
    from botocore.credentials import Credentials  # type: ignore[import-untyped,unused-ignore]

    url = "http://127.0.0.1:9000/artifacts/prod/sha256/" + "cd" * 32
    ours = presign(url, region="us-east-1", service="s3", credentials=CREDS, expires=300, now=MOMENT)
    request = AWSRequest(method="GET", url=url)
    signer = botocore_auth.S3SigV4QueryAuth(
        Credentials(CREDS.access_key, CREDS.secret_key, CREDS.session_token), "s3", "us-east-1", expires=300
    )
    with mock.patch.object(botocore_auth, "get_current_datetime", lambda: MOMENT.replace(tzinfo=None)):
        signer.add_auth(request)
    theirs = parse_qs(urlsplit(request.url).query)
    mine = parse_qs(urlsplit(ours).query)
    assert mine == theirs  # same signature over the same expiry: S3 refuses it after 300 s
    assert mine["X-Amz-Expires"] == ["300"] and mine["X-Amz-Date"] == ["20261126T003000Z"]
    assert CREDS.secret_key not in ours


# -- configuration -----------------------------------------------------------------------


def test_storage_config_keys() -> None:
    raw = {
        "storage": {
            "backend": "s3",
            "bucket": "artifacts",
            "prefix": "prod/",
            "endpoint_url": "http://127.0.0.1:9000/",
            "region": "eu-central-1",
            "local_cache": "20GiB",
            "serve": "redirect",
        }
    }
    storage = parse_config(raw, Overrides(), {}).storage
    assert storage == StorageConfig(
        backend="s3",
        bucket="artifacts",
        prefix="prod/",
        endpoint_url="http://127.0.0.1:9000",
        region="eu-central-1",
        local_cache=20 * 2**30,
        serve="redirect",
    )
    assert parse_config({}, Overrides(), {}).storage.backend == "local"
    bad = [
        ({"backend": "ftp"}, "unknown backend"),
        ({"backend": "s3"}, "bucket"),
        ({"backend": "s3", "bucket": "ok-bucket", "aws_secret_access_key": "x"}, "unknown setting"),
        (
            {"backend": "s3", "bucket": "ok-bucket", "endpoint_url": "http://k:s@127.0.0.1:9000"},
            "credentials",
        ),
        ({"serve": "teleport"}, "serve"),
        ({"multipart_threshold": "1MiB"}, "5MiB"),
    ]
    for table, message in bad:
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_config({"storage": table}, Overrides(), {})
