"""Encryption at rest: blobs (and the temp files they start as) sealed with AES-256-GCM.

A sealed file is a 32-byte header, the plaintext in fixed-size chunks each sealed on its own (so
a reader can decrypt any range, and a download can be followed while it is written), and a
trailer that seals the plaintext size (so a file cut short is detected, not served)::

    header   "APXE" | version 1 | 0 0 0 | key id (16 ASCII bytes) | file nonce (8 bytes)
    chunk i  AES-GCM(key, nonce = file nonce ‖ i (4 bytes), aad = header ‖ "D") of ≤ CHUNK bytes
    trailer  AES-GCM(key, nonce = file nonce ‖ 0xFFFFFFFF, aad = header ‖ "T") of the size (8 bytes)

Blobs stay addressed by the SHA-256 of their plaintext. The key id names the key in the key
provider, so keys can rotate (``artifact-proxy rekey``) while old blobs stay readable. Files
without the magic are plaintext (written before encryption was turned on) and read as they are.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"APXE"
VALUE_MAGIC = b"APXC"  # a small value sealed whole (Sealer.seal_value)
HEADER = 32
CHUNK = 64 * 1024
TAG = 16
TRAILER = 8 + TAG
TRAILER_INDEX = 0xFFFFFFFF


class SealedFileError(Exception):
    """A sealed file that does not decrypt: wrong key, or tampered with or cut short."""


class KeyProvider(Protocol):
    """Where keys come from: an environment variable or a file here; a KMS could be another."""

    def current(self) -> tuple[str, bytes]:
        """(key id, 32-byte key) to seal new files with."""
        ...

    def key(self, key_id: str) -> bytes:
        """The key a file names; KeyError when it is unknown."""
        ...


def key_id_of(key: bytes) -> str:
    return hashlib.sha256(b"artifact-proxy key id\n" + key).hexdigest()[:16]


class StaticKeys:
    """Keys given as base64 text: the first seals, all of them open (old ones kept for rekey)."""

    def __init__(self, encoded: list[str], source: str) -> None:
        keys = []
        for item in encoded:
            try:
                key = base64.b64decode(item.strip(), validate=True)
            except ValueError as exc:
                raise ValueError(f"{source}: a key is not base64") from exc
            if len(key) != 32:
                raise ValueError(f"{source}: a key must be 32 bytes (AES-256), base64-encoded")
            keys.append(key)
        if not keys:
            raise ValueError(f"{source}: no key")
        self._keys = {key_id_of(k): k for k in keys}
        self._current = key_id_of(keys[0])

    def current(self) -> tuple[str, bytes]:
        return self._current, self._keys[self._current]

    def key(self, key_id: str) -> bytes:
        return self._keys[key_id]

    @classmethod
    def from_env(cls, env: Mapping[str, str], name: str) -> StaticKeys:
        return cls([k for k in env.get(name, "").replace("\n", ",").split(",") if k.strip()], name)

    @classmethod
    def from_file(cls, path: Path) -> StaticKeys:
        lines = path.read_text(encoding="utf-8").splitlines()
        return cls([line for line in lines if line.strip() and not line.startswith("#")], str(path))


class Sealer:
    """Seals new files with the current key; opens any file whose key the provider has."""

    def __init__(self, keys: KeyProvider) -> None:
        self.keys = keys

    def new_writer(self) -> ChunkWriter:
        key_id, key = self.keys.current()
        header = MAGIC + bytes([1, 0, 0, 0]) + key_id.encode().ljust(16)[:16] + secrets.token_bytes(8)
        return ChunkWriter(header, _aead(key))

    def seal_value(self, plain: bytes, purpose: bytes, context: bytes) -> bytes:
        """A small value sealed whole (not a file): AES-GCM under a key derived from the current
        one for ``purpose`` (so a value sealed for one use never opens as another, nor as a
        file), ``context`` bound in as associated data. Layout: magic, key id, nonce, sealed."""
        key_id, key = self.keys.current()
        nonce = secrets.token_bytes(12)
        sealed = _aead(_derived(key, purpose)).encrypt(nonce, plain, context)
        return VALUE_MAGIC + key_id.encode().ljust(16)[:16] + nonce + sealed

    def open_value(self, blob: bytes, purpose: bytes, context: bytes) -> bytes | None:
        """What :meth:`seal_value` sealed, or None: another layout, a key we lack, a different
        purpose or context, or tampered bytes."""
        from cryptography.exceptions import InvalidTag

        if blob[:4] != VALUE_MAGIC or len(blob) < 32 + 16:
            return None
        try:
            key = self.keys.key(blob[4:20].decode().strip())
            return _aead(_derived(key, purpose)).decrypt(blob[20:32], blob[32:], context)
        except (KeyError, UnicodeDecodeError, InvalidTag):
            return None

    def reader(self, fd: int) -> SealedReader:
        header = os.pread(fd, HEADER, 0)
        if len(header) != HEADER or header[:4] != MAGIC:
            raise SealedFileError("not a sealed file")
        key_id = header[8:24].decode().strip()
        try:
            key = self.keys.key(key_id)
        except KeyError:
            raise SealedFileError(f"the key {key_id} is not available") from None
        return SealedReader(fd, header, _aead(key))


def _derived(key: bytes, purpose: bytes) -> bytes:
    return hmac.new(key, purpose, hashlib.sha256).digest()


def _aead(key: bytes) -> AESGCM:
    # Imported on first use: the cryptography bindings cost each worker ~7 MB of memory, and
    # most proxies never encrypt at rest.
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key)


def is_sealed(fd: int) -> bool:
    return os.pread(fd, 4, 0) == MAGIC


def plain_size(file_size: int) -> int:
    """The plaintext size of a complete sealed file of ``file_size`` bytes."""
    body = file_size - HEADER - TRAILER
    if body < 0:
        raise SealedFileError("sealed file too short")
    chunks = -(-body // (CHUNK + TAG))
    return body - chunks * TAG


def _nonce(header: bytes, index: int) -> bytes:
    return header[24:32] + index.to_bytes(4, "big")


class ChunkWriter:
    """Turns a stream of plaintext into sealed chunks (blocking work: call from a thread)."""

    def __init__(self, header: bytes, aead: AESGCM) -> None:
        self.header = header
        self.aead = aead
        self._pending = bytearray()
        self._index = 0
        self.sealed_plain = 0  # plaintext bytes already sealed into complete chunks
        self._started = False

    def feed(self, data: bytes) -> bytes:
        """Ciphertext for every complete chunk now available (the header first)."""
        out = bytearray()
        if not self._started:
            out += self.header
            self._started = True
        self._pending += data
        while len(self._pending) >= CHUNK:
            out += self._seal(bytes(self._pending[:CHUNK]))
            del self._pending[:CHUNK]
        return bytes(out)

    def finish(self, total: int) -> bytes:
        """The last (partial) chunk and the trailer."""
        out = bytearray(self.feed(b""))
        if self._pending:
            out += self._seal(bytes(self._pending))
            self._pending.clear()
        trailer = self.aead.encrypt(
            _nonce(self.header, TRAILER_INDEX), total.to_bytes(8, "big"), self.header + b"T"
        )
        return bytes(out + trailer)

    def _seal(self, plain: bytes) -> bytes:
        sealed = self.aead.encrypt(_nonce(self.header, self._index), plain, self.header + b"D")
        self._index += 1
        self.sealed_plain += len(plain)
        return sealed


class SealedReader:
    """Random access to a sealed file's plaintext (blocking: call from a thread)."""

    def __init__(self, fd: int, header: bytes, aead: AESGCM) -> None:
        from cryptography.exceptions import InvalidTag  # see _aead

        self._fd = fd
        self._header = header
        self._aead = aead
        self._invalid: type[Exception] = InvalidTag

    def size(self) -> int:
        """The plaintext size of the complete file, checked against its sealed trailer."""
        file_size = os.fstat(self._fd).st_size
        size = plain_size(file_size)
        raw = os.pread(self._fd, TRAILER, file_size - TRAILER)
        try:
            sealed = self._aead.decrypt(_nonce(self._header, TRAILER_INDEX), raw, self._header + b"T")
        except self._invalid:
            raise SealedFileError(
                "the file's trailer does not decrypt (cut short or tampered with)"
            ) from None
        if int.from_bytes(sealed, "big") != size:
            raise SealedFileError("the file's size does not match its sealed size")
        return size

    def read(self, offset: int, length: int, total: int) -> bytes:
        """``length`` plaintext bytes from ``offset`` of a file of ``total`` plaintext bytes."""
        out = bytearray()
        end = min(offset + length, total)
        while offset < end:
            index, skip = divmod(offset, CHUNK)
            chunk_plain = min(CHUNK, total - index * CHUNK)
            raw = os.pread(self._fd, chunk_plain + TAG, HEADER + index * (CHUNK + TAG))
            try:
                plain = self._aead.decrypt(_nonce(self._header, index), raw, self._header + b"D")
            except self._invalid:
                raise SealedFileError(f"chunk {index} does not decrypt (tampered with?)") from None
            piece = plain[skip : skip + (end - offset)]
            out += piece
            offset += len(piece)
        return bytes(out)


class PlainFile(io.RawIOBase):
    """A seekable file-like view of a blob's plaintext, sealed or not (for zipfile, tarfile)."""

    def __init__(self, path: Path, sealer: Sealer | None) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        self._pos = 0
        self._reader: SealedReader | None = None
        if sealer is not None and is_sealed(self._fd):
            self._reader = sealer.reader(self._fd)
            self._size = self._reader.size()
        else:
            self._size = os.fstat(self._fd).st_size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        length = min(len(buffer), max(0, self._size - self._pos))
        if length == 0:
            return 0
        if self._reader is not None:
            data = self._reader.read(self._pos, length, self._size)
        else:
            data = os.pread(self._fd, length, self._pos)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


def open_plain(path: Path, sealer: Sealer | None) -> BinaryIO:
    """The plaintext of a stored file, whether it is sealed or not (blocking)."""
    return io.BufferedReader(PlainFile(path, sealer), buffer_size=CHUNK)
