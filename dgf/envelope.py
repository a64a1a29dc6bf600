"""Sealed objects: what an untrusted site stores (AES-256-GCM in independently authenticated chunks).

A site enrolled as untrusted (a cloud bucket, a partner hospital) never sees a de-identified
byte nor a key.  The uploading client seals each object placed there under its study's data key
(made and wrapped by the metaserver, see ``metaserver.vault``), and readers unseal it with the
key the metaserver releases beside their capabilities.  The layout keeps ranged reads cheap::

    chunk 0 | chunk 1 | ... | chunk n-1 | trailer (32 bytes)

- chunk ``i`` is AES-GCM of plaintext bytes ``[i*PLAIN, (i+1)*PLAIN)`` (the last one shorter),
  its 16-byte tag appended, under the nonce ``salt || i`` and with the trailer and ``i`` as
  associated data: a chunk cannot be moved, a size cannot be changed, an object cannot be cut
  short without its tags failing;
- ``PLAIN`` is 65,520 bytes, so every chunk but the last is 64 KiB of ciphertext and sixteen
  of them fill one block of the object's hash list (``dgf.integrity``): a read of a range
  fetches and checks whole blocks and decrypts just their chunks;
- the trailer is ``MAGIC``, the salt, the plaintext size and ``PLAIN``;
- the salt is derived from the key and the plaintext's SHA-256, so one plaintext under one key
  always seals to the same bytes (a re-run finds its objects stored) and distinct plaintexts get
  distinct nonces (a collision needs about 2^32 objects in one study).

The object's key, as for any object, is the SHA-256 of the stored (sealed) bytes, so sites
check, scrub and copy sealed objects as they do any other.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dgf import errors
from dgf.integrity import BLOCK, DIGEST

MAGIC = b"DGFENC01"
TAG = 16
#: Ciphertext bytes of one full chunk: sixteen fill one hash-list block.
CHUNK = 64 * 1024
PLAIN = CHUNK - TAG
PER_BLOCK = BLOCK // CHUNK
TRAILER = 32
_TRAILER = struct.Struct(">8s8sQI4x")


def chunks_for(size: int) -> int:
    return max(1, -(-size // PLAIN))


def sealed_size(size: int) -> int:
    """The stored size of a ``size``-byte plaintext."""
    return size + chunks_for(size) * TAG + TRAILER


def salt_for(key: bytes, plain_sha256: str) -> bytes:
    return hmac.new(key, b"dgf-salt\0" + bytes.fromhex(plain_sha256), hashlib.sha256).digest()[:8]


def trailer_of(data: bytes | memoryview) -> tuple[bytes, int] | None:
    """(salt, plaintext size) when ``data`` is a sealed object's bytes, else None."""
    if len(data) < TRAILER + TAG:
        return None
    magic, salt, size, plain = _TRAILER.unpack(bytes(data[-TRAILER:]))
    if magic != MAGIC or plain != PLAIN or sealed_size(size) != len(data):
        return None
    return salt, size


@dataclass(frozen=True)
class Envelope:
    """How one sealed object is read: its study's data key, its salt and plaintext size."""

    key: bytes
    salt: bytes
    size: int

    @classmethod
    def for_plaintext(cls, key: bytes, plain_sha256: str, size: int) -> Envelope:
        return cls(key, salt_for(key, plain_sha256), size)

    @property
    def trailer(self) -> bytes:
        return _TRAILER.pack(MAGIC, self.salt, self.size, PLAIN)

    @property
    def sealed_size(self) -> int:
        return sealed_size(self.size)

    @property
    def chunks(self) -> int:
        return chunks_for(self.size)

    def _nonce_aad(self, i: int) -> tuple[bytes, bytes]:
        return self.salt + struct.pack(">I", i), self.trailer + struct.pack(">Q", i)

    def seal(self, pieces: Iterable[bytes | memoryview]) -> Iterator[bytes]:
        """The sealed object from the plaintext in pieces of any size, a hash-list block (sixteen
        chunks) at a time, so that whoever hashes it can hash in parallel."""
        aead = AESGCM(self.key)
        i = sent = 0
        pending = bytearray()
        group: list[bytes] = []

        def chunk(data: bytes | memoryview) -> bytes | None:
            nonlocal i, sent
            nonce, aad = self._nonce_aad(i)
            group.append(aead.encrypt(nonce, bytes(data), aad))
            i += 1
            sent += len(data)
            if len(group) == PER_BLOCK:
                out = b"".join(group)
                group.clear()
                return out
            return None

        for piece in pieces:
            view = memoryview(piece).cast("B")
            while len(view):
                if not pending and len(view) >= PLAIN and sent + PLAIN < self.size:
                    block = chunk(view[:PLAIN])           # whole chunks straight from the piece
                    view = view[PLAIN:]
                else:
                    take = PLAIN - len(pending)
                    pending += view[:take]
                    view = view[take:]
                    if len(pending) < PLAIN or sent + PLAIN >= self.size:
                        if len(pending) == PLAIN and len(view):
                            break                          # more than the size said: caught below
                        continue
                    block = chunk(memoryview(pending))
                    pending = bytearray()
                if block is not None:
                    yield block
            if len(pending) == PLAIN and len(view):
                raise errors.IntegrityError(f"sealing was given more than the {self.size} bytes of plaintext declared.")
        if sent + len(pending) != self.size:
            raise errors.IntegrityError(f"sealing expected {self.size} bytes of plaintext, got {sent + len(pending)}.")
        nonce, aad = self._nonce_aad(i)
        group.append(aead.encrypt(nonce, bytes(pending), aad))
        group.append(self.trailer)
        yield b"".join(group)

    def seal_bytes(self, data: bytes | memoryview) -> bytes:
        view = memoryview(data)
        return b"".join(self.seal(view[i:i + PLAIN] for i in range(0, len(view), PLAIN)))

    def cipher_range(self, offset: int, length: int) -> tuple[int, int, int]:
        """(first chunk, ciphertext start, ciphertext end) holding plaintext ``[offset,
        offset+length)``, widened to whole hash-list blocks (what a verified read fetches)."""
        first = offset // PLAIN
        last = min(self.chunks, -(-(offset + length) // PLAIN)) if length > 0 else first + 1
        start = (first // PER_BLOCK) * BLOCK
        end = min(self.sealed_size, -(-(last * CHUNK) // BLOCK) * BLOCK)
        return first, start, end

    def open_range(self, sealed: bytes | memoryview, start: int, offset: int, length: int) -> bytes:
        """Plaintext ``[offset, offset+length)`` from sealed bytes read at ``start`` (a chunk
        boundary) that cover it; every chunk used is authenticated."""
        aead = AESGCM(self.key)
        view = memoryview(sealed)
        end = min(offset + length, self.size)
        out = []
        i = offset // PLAIN
        while True:
            c0 = i * CHUNK - start
            n = min(PLAIN, self.size - i * PLAIN)
            nonce, aad = self._nonce_aad(i)
            try:
                plain = aead.decrypt(nonce, bytes(view[c0:c0 + n + TAG]), aad)
            except InvalidTag as exc:
                raise errors.IntegrityError(f"chunk {i} of a sealed object failed to authenticate "
                                            "(tampered, or not sealed under this study's key).") from exc
            lo = max(offset - i * PLAIN, 0)
            hi = min(end - i * PLAIN, n)
            out.append(plain[lo:hi])
            i += 1
            if i * PLAIN >= end or i >= self.chunks:
                break
        return b"".join(out)

    def open(self, sealed: bytes | memoryview) -> bytes:
        if len(sealed) != self.sealed_size:
            raise errors.IntegrityError(f"a sealed object of {len(sealed)} bytes cannot hold {self.size} bytes.")
        return self.open_range(sealed, 0, 0, self.size) if self.size else b""

    # -- what the metaserver is shown of a sealed object (see metaserver: up.commit) ----------

    def blocks(self) -> int:
        """Hash-list blocks of the sealed object (0: it has no hash list, its key checks it)."""
        n = self.sealed_size
        return 0 if n <= BLOCK else -(-n // BLOCK)

    def block_plain(self, k: int) -> tuple[int, int]:
        """The plaintext range sealed in hash-list block ``k``."""
        return min(k * PER_BLOCK * PLAIN, self.size), min((k + 1) * PER_BLOCK * PLAIN, self.size)

    def holes(self, opaque: Iterable[tuple[int, int]]) -> list[int]:
        """Hash-list blocks whose plaintext lies inside one ``opaque`` range (pixel values): the
        metaserver is not shown them.  The block with the trailer is always shown."""
        ranges = sorted(opaque)
        out = []
        for k in range(max(0, self.blocks() - 1)):
            lo, hi = self.block_plain(k)
            if any(a <= lo and hi <= b for a, b in ranges):
                out.append(k)
        return out

    def check_shown(self, shown: bytes, holes: list[int], object_key: str, digests: bytes) -> list[tuple[int, int]]:
        """Check that ``shown`` (the plaintext of every block not in ``holes``, in order) is what
        the sealed object ``object_key`` (hash list ``digests``) holds, by sealing it again;
        return the plaintext ranges of the holes.  Raises IntegrityError naming the mismatch."""
        n = self.blocks()
        if n == 0:
            if holes or len(shown) != self.size or \
                    hashlib.sha256(self.seal_bytes(shown)).hexdigest() != object_key:
                raise errors.IntegrityError("the plaintext shown is not what the sealed object holds.")
            return []
        if len(digests) != n * DIGEST or any(not 0 <= k < n - 1 for k in holes) or len(set(holes)) != len(holes):
            raise errors.IntegrityError("the holes or hash list of a sealed object do not fit its size.")
        missing = set(holes)
        view = memoryview(shown)
        at = 0
        gaps = []
        for k in range(n):
            lo, hi = self.block_plain(k)
            if k in missing:
                gaps.append((lo, hi))
                continue
            part = view[at:at + hi - lo]
            at += hi - lo
            if len(part) != hi - lo or hashlib.sha256(self._seal_block(k, part)).digest() != \
                    digests[k * DIGEST:(k + 1) * DIGEST]:
                raise errors.IntegrityError(f"block {k} of the plaintext shown is not what the sealed object holds.")
        if at != len(shown):
            raise errors.IntegrityError("more plaintext was shown than the sealed object holds.")
        return gaps

    def _seal_block(self, k: int, plain: memoryview) -> bytes:
        """The sealed bytes of hash-list block ``k`` from its plaintext (the trailer, or the part
        of it, that falls in the block included)."""
        aead = AESGCM(self.key)
        out = []
        first = k * PER_BLOCK
        for j in range(0, len(plain), PLAIN):
            nonce, aad = self._nonce_aad(first + j // PLAIN)
            out.append(aead.encrypt(nonce, bytes(plain[j:j + PLAIN]), aad))
        start, end = k * BLOCK, min((k + 1) * BLOCK, self.sealed_size)
        tail = self.sealed_size - TRAILER
        if tail < end:
            out.append(self.trailer[max(0, start - tail):end - tail])
        return b"".join(out)


def survey(env: Envelope, pieces: Iterable[bytes | memoryview], holes: list[int]) -> tuple[str, bytes, bytes]:
    """Seal a streamed plaintext once without keeping it: (the sealed object's key, its hash
    list, the plaintext of every hash-list block not in ``holes``, which the metaserver is shown)."""
    from dgf.integrity import Hasher

    hasher = Hasher()
    shown = bytearray()
    skip = [env.block_plain(k) for k in sorted(holes)]
    pos = 0

    def tee() -> Iterator[bytes | memoryview]:
        nonlocal pos
        for piece in pieces:
            lo, hi = pos, pos + len(piece)
            cut = lo
            for a, b in skip:
                if b <= cut or a >= hi:
                    continue
                if a > cut:
                    shown.extend(piece[cut - lo:a - lo])
                cut = max(cut, min(b, hi))
            if cut < hi:
                shown.extend(piece[cut - lo:])
            pos = hi
            yield piece

    for sealed in env.seal(tee()):
        hasher.update(sealed)
    return hasher.whole.hexdigest(), hasher.digests(), bytes(shown)


def open_file(env: Envelope, src: str, dst: str) -> None:
    """Unseal the sealed object in file ``src`` into file ``dst``, a hash-list block at a time."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        for start in range(0, max(env.size, 1), PER_BLOCK * PLAIN):   # an empty object: its one empty chunk
            n = min(PER_BLOCK * PLAIN, env.size - start)
            fout.write(env.open_range(fin.read(BLOCK), (start // PLAIN) * CHUNK, start, n))
