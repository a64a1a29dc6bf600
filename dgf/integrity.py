"""Per-block digests: every byte a client returns is checked, ranged reads included.

An object's key is the SHA-256 of its bytes, which checks a whole read.  Objects larger than
:data:`BLOCK` also carry a hash list, the SHA-256 of each fixed block concatenated, kept in the
object's metadata; a ranged read checks just the blocks it covers.  The site that stores an
object signs the digest of that list in its receipt, so the metadata server keeps a list only
when a site computed the same one from the bytes it holds.
"""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor

from dgf import errors

#: Digest block: 1 MiB (the mount reads 4 MiB blocks, four digests each).
BLOCK = 1024 * 1024
DIGEST = 32


def block_digests(data: bytes | memoryview) -> bytes:
    """The hash list of ``data``: empty for an object of at most one block (its key checks it)."""
    if len(data) <= BLOCK:
        return b""
    view = memoryview(data)
    return b"".join(hashlib.sha256(view[i:i + BLOCK]).digest() for i in range(0, len(view), BLOCK))


def list_digest(digests: bytes) -> str:
    """What a site's receipt signs for a hash list ("" when there is none)."""
    return hashlib.sha256(digests).hexdigest() if digests else ""


#: Chunks at least this large are hashed two ways at once: the whole-object digest on a helper
#: thread, the block digests on the caller's (hashlib releases the GIL), so a large object costs
#: the wall time of one SHA-256 pass, not two.
PARALLEL_MIN = 1 << 20
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def helper() -> ThreadPoolExecutor:
    """Threads for hashing beside the caller (shared by every hasher of the process)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="dgf-hash")
        return _pool


class Hasher:
    """Whole-object SHA-256 and hash list of bytes that arrive in chunks of any size."""

    def __init__(self) -> None:
        self.whole = hashlib.sha256()
        self._block = hashlib.sha256()
        self._in_block = 0
        self._digests: list[bytes] = []
        self.size = 0

    def update(self, chunk: bytes | memoryview) -> None:
        if len(chunk) >= PARALLEL_MIN:
            whole = helper().submit(self.whole.update, chunk)
            try:
                self._blocks(chunk)
            finally:
                whole.result()
        else:
            self.whole.update(chunk)
            self._blocks(chunk)

    def _blocks(self, chunk: bytes | memoryview) -> None:
        self.size += len(chunk)
        view = memoryview(chunk)
        while len(view):
            take = min(BLOCK - self._in_block, len(view))
            self._block.update(view[:take])
            self._in_block += take
            view = view[take:]
            if self._in_block == BLOCK:
                self._digests.append(self._block.digest())
                self._block, self._in_block = hashlib.sha256(), 0

    def digests(self) -> bytes:
        if self.size <= BLOCK:
            return b""
        tail = [self._block.digest()] if self._in_block else []
        return b"".join(self._digests + tail)


def check_range(key: str, size: int, digests: bytes, offset: int, data: bytes, where: str) -> None:
    """Raise :class:`IntegrityError` unless ``data`` (read at ``offset``) matches the object.

    ``offset`` must start a block and ``data`` must end at a block boundary or at the object's
    end, so every block it touches is checked whole."""
    if size <= BLOCK or not digests:
        if offset != 0 or len(data) != size or hashlib.sha256(data).hexdigest() != key:
            raise errors.IntegrityError(f"object {key[:16]}... from {where} failed its checksum.")
        return
    if offset % BLOCK or (offset + len(data) != size and len(data) % BLOCK):
        raise errors.UsageError(f"a verified read must cover whole {BLOCK}-byte blocks.")
    if len(digests) != DIGEST * ((size + BLOCK - 1) // BLOCK):
        raise errors.IntegrityError(f"the hash list of object {key[:16]}... does not fit its size.")
    view = memoryview(data)
    first = offset // BLOCK
    for i in range(0, len(view), BLOCK):
        n = first + i // BLOCK
        if hashlib.sha256(view[i:i + BLOCK]).digest() != digests[n * DIGEST:(n + 1) * DIGEST]:
            raise errors.IntegrityError(
                f"block {n} of object {key[:16]}... from {where} failed its checksum.")
