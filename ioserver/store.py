"""Object stores: immutable objects named by the SHA-256 of their bytes.

:class:`ObjectStore` does the shared checks (key syntax, ranges, checksum on write) once; a backend
implements the small ``_do_*`` steps.  No path from a client ever reaches the filesystem: a key is
validated as 64 lowercase hex digits before it becomes a file name under the store root.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import logging
import mmap
import os
import re
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Iterator
from pathlib import Path

from dgf import errors
from dgf.integrity import Hasher

log = logging.getLogger(__name__)

_KEY = re.compile(r"[0-9a-f]{64}")
READ_CHUNK = 256 * 1024
#: A stamp and a conditional delete of one object run one at a time (locks by key, striped).
_STRIPES = [threading.Lock() for _ in range(64)]


def _stripe(key: str) -> threading.Lock:
    return _STRIPES[int(key[:2], 16) % len(_STRIPES)]


def _load_syncfs() -> Callable[[int], int] | None:
    """syncfs(2) from libc: flushes one filesystem, the group-commit primitive (Linux)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.syncfs
    except (OSError, AttributeError):
        return None


_syncfs = _load_syncfs()


def _write_file(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def _sync(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        if _syncfs is None or _syncfs(fd) != 0:
            raise errors.ServerError(f"syncing {directory} to disk failed; nothing was acknowledged.")
    finally:
        os.close(fd)


def check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise errors.UsageError("an object key must be 64 lowercase hex digits (a SHA-256).")
    return key


class ObjectStore(ABC):
    """Content-addressed object store; put is idempotent, get supports ranges.

    ``on_quarantine(key)`` is called whenever an object is found corrupt and moved aside, so
    the server can report it (the metadata then stops offering that replica)."""

    on_quarantine: Callable[[str], None] | None = None

    def put(self, key: str, chunks: Iterable[bytes], size: int) -> tuple[bool, bytes, int]:
        """Store ``size`` bytes whose SHA-256 must equal ``key``; return (created, hash list,
        generation).

        The bytes are always consumed and checked, so a client cannot plant a wrong object under
        an existing key, and a failed or short write leaves nothing visible.  A copy already
        stored under the key is verified: a corrupt one is quarantined and replaced.

        The generation is this store's stamp of this put (:meth:`stamp`), made before a copy
        already stored is trusted: a delete of an earlier generation (:meth:`delete`), sent for
        an object released meanwhile, then keeps it.
        """
        check_key(key)
        if size < 0:
            raise errors.UsageError("object size must not be negative.")
        return self._do_put(key, chunks, size)

    def put_many(self, items: list[tuple[str, bytes]]) -> list[errors.DgfError | int]:
        """Store several whole objects; per item, in order, its generation (as :meth:`put`) or
        the error that refused it.

        Backends may make the batch durable together (group commit); a generation means that
        object is durable when this returns."""
        out: list[errors.DgfError | int] = []
        for key, data in items:
            try:
                out.append(self.put(key, [data], len(data))[2])
            except errors.DgfError as exc:
                out.append(exc)
        return out

    def stamp(self, key: str) -> int | None:
        """Give the object stored under ``key`` a new generation and return it (None if none is
        stored).  Generations of one object only grow: its modification time in nanoseconds,
        moved past the last one where the clock has not."""
        with _stripe(key):
            return self._do_stamp(key)

    def _reported(self, key: str) -> None:
        if self.on_quarantine is not None:
            self.on_quarantine(key)

    def get(self, key: str, offset: int = 0, length: int = -1) -> tuple[int, Iterator[bytes]]:
        """Return (number of bytes, chunk iterator) for the range starting at ``offset``."""
        check_key(key)
        size = self.stat(key)
        if offset < 0 or offset > size:
            raise errors.UsageError(f"offset {offset} is outside the object ({size} bytes).")
        n = size - offset if length < 0 else min(length, size - offset)
        return n, self._do_read(key, offset, n, verify=(offset == 0 and n == size))

    def stat(self, key: str) -> int:
        check_key(key)
        size = self._do_stat(key)
        if size is None:
            raise errors.NotFound(f"object {key[:16]}... is not stored at this site.")
        return size

    def held(self, key: str) -> bool:
        return self._do_stat(check_key(key)) is not None

    def delete(self, key: str, gens: int | Collection[int] | None = None) -> bool:
        """Remove the object; with ``gens``, only if it is still (one of) that generation.  An
        object released by the metaserver may have been stored again since, by an upload whose
        commit is on its way: the delete sent for the release then keeps it (says False)."""
        check_key(key)
        if isinstance(gens, int):
            gens = (gens,)
        with _stripe(key):
            if gens is not None:
                now = self._do_generation(key)
                if now is not None and now not in gens:
                    log.info("object %s kept: stored again since the generation a delete named", key[:16])
                    return False
            return self._do_delete(key)

    @contextlib.contextmanager
    def mapped(self, key: str) -> Iterator[bytes | memoryview]:
        """The whole stored object, for parsing (a store may map it instead of reading it)."""
        n, chunks = self.get(key)
        yield b"".join(chunks)

    def verify(self, key: str) -> bool:
        """Re-hash a stored object; False means it is corrupt (and has been quarantined)."""
        n, chunks = self.get(key)
        h = hashlib.sha256()
        for c in chunks:
            h.update(c)
        return h.hexdigest() == key

    def scrub(self) -> list[str]:
        """Verify every object; return the keys found corrupt."""
        bad = []
        for key in self.keys():
            try:
                ok = self.verify(key)
            except errors.IntegrityError:
                ok = False
            if not ok:
                bad.append(key)
        return bad

    @abstractmethod
    def keys(self) -> Iterator[str]: ...

    @abstractmethod
    def _do_put(self, key: str, chunks: Iterable[bytes], size: int) -> tuple[bool, bytes, int]: ...

    @abstractmethod
    def _do_read(self, key: str, offset: int, n: int, verify: bool) -> Iterator[bytes]: ...

    @abstractmethod
    def listing(self, after: str, limit: int) -> list[tuple[str, int, float, int]]:
        """(key, size, mtime, generation) of up to ``limit`` stored objects with keys after
        ``after``, in key order."""

    @abstractmethod
    def _do_stat(self, key: str) -> int | None: ...

    @abstractmethod
    def _do_delete(self, key: str) -> bool: ...

    @abstractmethod
    def _do_generation(self, key: str) -> int | None: ...

    @abstractmethod
    def _do_stamp(self, key: str) -> int | None: ...

    def _placed_stamp(self, key: str) -> int:
        """The generation of an object this put has just placed."""
        gen = self.stamp(key)
        if gen is None:
            raise errors.ServerError(f"object {key[:16]}... vanished as it was stored; send it again.")
        return gen


#: The store's layout, in a file of that name at its root: objects in 256 directories named by
#: the key's first byte.  A store without the file keeps the two levels it was made with.
LAYOUT_FILE = "layout"
FLAT = "objects/xx/KEY\n"


def levels_of(root: Path) -> int:
    """Directory levels under ``root/objects``: 1 (``ab/KEY``) for a store made with the layout
    file, 2 (``ab/cd/KEY``) for one made before it."""
    try:
        return 1 if (Path(root) / LAYOUT_FILE).read_text() == FLAT else 2
    except FileNotFoundError:
        return 2


def _placed(objects: str, key: str, levels: int) -> str:
    """The layout rule: where under ``objects`` object ``key`` lies.  A string: the store
    computes it for every object it writes, reads or stats, where a ``Path`` cost several
    microseconds to build and hash."""
    return f"{objects}/{key[:2]}/{key}" if levels == 1 else f"{objects}/{key[:2]}/{key[2:4]}/{key}"


def object_path(root: Path, key: str) -> Path:
    """Where the store at ``root`` keeps object ``key``."""
    return Path(_placed(str(Path(root) / "objects"), key, levels_of(root)))


class LocalObjectStore(ObjectStore):
    """Objects as files ``root/objects/ab/<key>``; writes go temp -> fsync -> rename.

    One level of 256 directories: a new object creates no directory once they exist (with the
    two levels of stores made before, ``ab/cd/``, nearly every one of a young store's first
    hundred thousand objects created a directory too, an inode's worth of kernel time each).
    ext4 indexes large directories, so 40,000 objects per directory at 10 million is fine."""

    def __init__(self, root: Path, fsync: bool = True) -> None:
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.tmp = self.root / "tmp"
        self.quarantine = self.root / "quarantine"
        self.fsync = fsync
        fresh = not self.objects.exists() or not any(self.objects.iterdir())
        for d in (self.objects, self.tmp, self.quarantine):
            d.mkdir(parents=True, exist_ok=True)
        if fresh and levels_of(self.root) == 2:
            marker = self.root / (LAYOUT_FILE + ".tmp")
            marker.write_text(FLAT)
            os.replace(marker, self.root / LAYOUT_FILE)
        self.levels = levels_of(self.root)
        # Temp files left by a crash are never visible objects; clear them at start.
        for stale in self.tmp.iterdir():
            stale.unlink(missing_ok=True)
        self._objects, self._tmp = str(self.objects), str(self.tmp)
        self._dirs_made: set[str] = set()

    def _file(self, key: str) -> str:
        return _placed(self._objects, key, self.levels)

    def _path(self, key: str) -> Path:
        return Path(self._file(key))

    def _made(self, final: str) -> None:
        """Make the directory ``final`` goes in, once per process."""
        parent = os.path.dirname(final)
        if parent not in self._dirs_made:
            os.makedirs(parent, exist_ok=True)
            self._dirs_made.add(parent)

    @contextlib.contextmanager
    def mapped(self, key: str) -> Iterator[bytes | memoryview]:
        """The stored object memory-mapped: a large object's header is parsed without reading
        its pixel data."""
        check_key(key)
        try:
            fh = open(self._file(key), "rb")
        except FileNotFoundError as exc:
            raise errors.NotFound(f"object {key[:16]}... is not stored at this site.") from exc
        with fh:
            if os.fstat(fh.fileno()).st_size == 0:
                yield b""
                return
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                yield mm  # type: ignore[misc]

    def keys(self) -> Iterator[str]:
        for _, _, files in os.walk(self.objects):
            for name in files:
                if _KEY.fullmatch(name):
                    yield name

    def listing(self, after: str, limit: int) -> list[tuple[str, int, float, int]]:
        """(key, size, mtime, generation) of up to ``limit`` stored objects with keys after
        ``after``, in key order (the directory levels are the key's first bytes, so a walk in
        name order is key order)."""
        out: list[tuple[str, int, float, int]] = []
        for top in sorted(os.listdir(self.objects)):
            if top < after[:2]:
                continue
            dirs = [self.objects / top] if self.levels == 1 else \
                [self.objects / top / mid for mid in sorted(os.listdir(self.objects / top)) if top + mid >= after[:4]]
            for d in dirs:
                for name in sorted(os.listdir(d)):
                    if name <= after or not _KEY.fullmatch(name):
                        continue
                    try:
                        st = os.stat(d / name)
                    except FileNotFoundError:
                        continue
                    out.append((name, st.st_size, st.st_mtime, st.st_mtime_ns))
                    if len(out) >= limit:
                        return out
        return out

    def _do_stat(self, key: str) -> int | None:
        try:
            return os.stat(self._file(key)).st_size
        except FileNotFoundError:
            return None

    def _intact(self, key: str, size: int) -> bool:
        """Whether a copy is stored under ``key`` and is sound; a corrupt one is quarantined
        (a re-upload then replaces it instead of signing a receipt for bad bytes)."""
        stored = self._do_stat(key)
        if stored is None:
            return False
        if stored == size:
            h = hashlib.sha256()
            try:
                with open(self._file(key), "rb") as fh:
                    while data := fh.read(READ_CHUNK):
                        h.update(data)
            except FileNotFoundError:
                return False
            if h.hexdigest() == key:
                return True
        self._quarantine(key)
        return False

    def _do_put(self, key: str, chunks: Iterable[bytes], size: int) -> tuple[bool, bytes, int]:
        final = self._file(key)
        tmp = self.tmp / f"{key}.{uuid.uuid4().hex}"
        h = Hasher()
        got = 0
        try:
            with open(tmp, "wb") as fh:
                for chunk in chunks:
                    got += len(chunk)
                    if got > size:
                        raise errors.IntegrityError(f"object {key[:16]}... sent more than its declared {size} bytes.")
                    h.update(chunk)
                    try:
                        fh.write(chunk)
                    except OSError as exc:
                        raise self._write_error(exc, key, size) from exc
                if got != size:
                    raise errors.IntegrityError(f"object {key[:16]}... arrived with {got} of {size} bytes.")
                if h.whole.hexdigest() != key:
                    raise errors.IntegrityError(f"object {key[:16]}... does not match its SHA-256; upload refused.")
                # Stamped before it is trusted: a delete of the older generation keeps it.
                gen = self.stamp(key)
                if gen is not None and self._intact(key, size):
                    return False, h.digests(), gen
                fh.flush()
                if self.fsync:
                    os.fsync(fh.fileno())
            self._made(final)
            os.replace(tmp, final)
            if self.fsync:
                dfd = os.open(os.path.dirname(final), os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            return True, h.digests(), self._placed_stamp(key)
        except OSError as exc:
            raise self._write_error(exc, key, size) from exc
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def _write_error(exc: OSError, key: str, size: int) -> errors.DgfError:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return errors.StorageFull(f"the site's disk is full: no room for object {key[:16]}... ({size} bytes); "
                                      "nothing of it was kept.")
        return errors.ServerError(f"the site could not write object {key[:16]}... ({exc.strerror}); "
                                  "nothing of it was kept.")

    def put_many(self, items: list[tuple[str, bytes]]) -> list[errors.DgfError | int]:
        """Group commit: write the batch to temp files, one filesystem sync, rename them all into
        place, one more sync for the directory entries.  Two syncs per batch instead of two
        fsyncs per object; nothing is visible under its key before its bytes are durable."""
        if not self.fsync or _syncfs is None:
            return super().put_many(items)
        out: list[errors.DgfError | int] = []
        staged: list[tuple[int, str, str]] = []        # (index in out, temp file, its place)
        placed = 0
        # One random part per batch keeps temp names unique; per object it was a getrandom().
        # Raw os calls: a buffered file costs an ioctl, an lseek and an fstat more per object,
        # and an object is a file creation, which on some disks is the dearest thing done here.
        batch = uuid.uuid4().hex
        try:
            for n, (key, data) in enumerate(items):
                try:
                    check_key(key)
                    if hashlib.sha256(data).hexdigest() != key:
                        raise errors.IntegrityError(f"object {key[:16]}... does not match its SHA-256; upload refused.")
                except errors.DgfError as exc:
                    out.append(exc)
                    continue
                final = self._file(key)
                gen = self.stamp(key)                   # before it is trusted, as in _do_put
                if gen is not None and self._intact(key, len(data)):
                    out.append(gen)
                    continue
                out.append(0)                           # its generation once it is placed
                tmp = f"{self._tmp}/{key}.{batch}.{n}"
                try:
                    _write_file(tmp, data)
                except OSError as exc:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    out[-1] = self._write_error(exc, key, len(data))
                    continue
                staged.append((n, tmp, final))
            if staged:
                try:
                    _sync(self.tmp)
                    for _, tmp, final in staged:
                        self._made(final)
                        os.replace(tmp, final)
                        placed += 1
                    _sync(self.objects)
                except OSError as exc:
                    raise self._write_error(exc, items[staged[0][0]][0], 0) from exc
                for n, _, _ in staged:
                    try:
                        out[n] = self._placed_stamp(items[n][0])
                    except errors.DgfError as exc:
                        out[n] = exc
        finally:
            for _, tmp, _ in staged[placed:]:         # what a failure left behind
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        return out

    def _do_read(self, key: str, offset: int, n: int, verify: bool) -> Iterator[bytes]:
        path = self._file(key)
        try:
            fh = open(path, "rb")
        except FileNotFoundError as exc:
            # Deleted (drained, freed) since its size was read: a named miss, never an OSError
            # that would break a get.batch frame others are still reading.
            raise errors.NotFound(f"object {key[:16]}... is not stored at this site.") from exc

        def chunks() -> Iterator[bytes]:
            h = hashlib.sha256() if verify else None
            left = n
            with fh:
                fh.seek(offset)
                while left:
                    data = fh.read(min(READ_CHUNK, left))
                    if not data:
                        raise errors.IntegrityError(f"object {key[:16]}... is shorter than its recorded size.")
                    left -= len(data)
                    if h is not None:
                        h.update(data)
                    yield data
            if h is not None and h.hexdigest() != key:
                self._quarantine(key)
                raise errors.IntegrityError(f"object {key[:16]}... failed its checksum and was quarantined.")

        return chunks()

    def _quarantine(self, key: str) -> None:
        log.error("object %s failed its checksum; moved to quarantine", key)
        try:
            os.replace(self._file(key), self.quarantine / key)
        except FileNotFoundError:
            return
        self._reported(key)

    def _do_delete(self, key: str) -> bool:
        try:
            os.unlink(self._file(key))
            return True
        except FileNotFoundError:
            return False

    def _do_generation(self, key: str) -> int | None:
        try:
            return os.stat(self._file(key)).st_mtime_ns
        except FileNotFoundError:
            return None

    def _do_stamp(self, key: str) -> int | None:
        path = self._file(key)
        try:
            gen = max(time.time_ns(), os.stat(path).st_mtime_ns + 1)
            os.utime(path, ns=(gen, gen))
        except FileNotFoundError:
            return None
        # Not read back: on a filesystem keeping coarser times than nanoseconds (ext4, XFS,
        # btrfs and tmpfs keep them) the stored time differs from every generation handed
        # out, so a delete naming one keeps the object, for fsck to remove as an orphan.
        return gen
