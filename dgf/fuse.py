"""``dgf mount``: the archive as a POSIX directory (mfusepy on libfuse3), a thin layer over Client.

Reading: files are the de-identified DICOM objects, fetched in 4 MiB blocks (a whole object when
smaller) into a block cache in memory and on local disk, both size-bounded; objects are
immutable and named by their SHA-256, so cached blocks never go stale, and a whole-object block
is verified against its name.  Sequential reads prefetch the next blocks.  A replica that fails
is skipped for the next.  With ``--identified`` (clinicians only) a file opens as the exact
original, re-identified in memory; every such open is an audited identity release.

Freshness: attributes and listings are cached for ``ATTR_TTL`` seconds here and by the kernel,
so a rename, delete or upload made through another client shows up within 2 x ATTR_TTL (10 s).

Writing: a file copied in (or over an existing one, which it replaces whole; objects are never
edited in place) is spooled locally and, when closed, uploaded like ``dgf_up`` (de-
identified, placed at that path); a non-DICOM file fails the close with EINVAL, is logged by
name, and leaves nothing behind.

Queries: ``MOUNT/.find/<XPath>/`` lists matching files as symlinks to their paths (the XPath
percent-encoded, or a predicate such as ``Modality='CT'`` meaning ``/DicomHeader[...]``), and
``MOUNT/.queries/NAME/`` does the same for each saved query.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import logging
import os
import shutil
import stat as stat_mod
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote, unquote

import mfusepy

from dgf import errors
from dgf.blockcache import BlockCache
from dgf.integrity import BLOCK as DIGEST_BLOCK
from dgf.reader import ObjectRef
from dgf.types import WRITER_ROLES, ResolvedFile, Stat

if TYPE_CHECKING:
    from dgf.client import Client

log = logging.getLogger("dgf.fuse")

BLOCK = 4 * 1024 * 1024
ATTR_TTL = 5.0
MAX_CACHED_ENTRIES = 500_000
READAHEAD_BLOCKS = 4
PREFETCH_FILES = 64
FIND_DIR, QUERIES_DIR = ".find", ".queries"
VIRTUAL_XATTRS = ("user.dgf.site", "user.dgf.checksum")
IDENTITY_XATTR = "user.dgf.identity"

F = TypeVar("F", bound=Callable[..., Any])


def _errno_of(fn: F) -> F:
    """The one place where errors become errnos: DgfError carries its own, the rest are EIO."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except mfusepy.FuseOSError:
            raise
        except errors.DgfError as exc:
            raise mfusepy.FuseOSError(exc.errno) from exc
        except OSError as exc:
            raise mfusepy.FuseOSError(exc.errno or errno.EIO) from exc
        except Exception as exc:  # noqa: BLE001 - a crash in a callback must not take the mount down
            log.exception("%s failed with %s", fn.__name__, type(exc).__name__)
            raise mfusepy.FuseOSError(errno.EIO) from exc

    return wrapper  # type: ignore[return-value]


@dataclasses.dataclass
class _Reader(ObjectRef):
    """An open de-identified file: its resolved object and where sequential reading stands."""

    last_block: int = -1


class _OpenWrite:
    """A file being written into the mount: spooled locally, uploaded when closed."""

    def __init__(self, path: str, spool: Path, mode: int) -> None:
        self.path, self.mode = path, mode
        fd, name = tempfile.mkstemp(dir=spool, prefix=".up-")
        self.fd, self.spool = fd, Path(name)
        self.dirty = True
        self.created = time.time()


class DgfFS(mfusepy.Operations):
    use_ns = True

    def __init__(self, client_factory: Callable[[], Client], cache_dir: Path, identified: bool = False,
                 read_only: bool = False) -> None:
        self.client_factory = client_factory
        self.cache_dir = cache_dir
        self.identified = identified
        self.read_only = read_only
        self._client: Client | None = None
        self.role = ""
        self._attrs: dict[str, tuple[float, Stat]] = {}
        self._dirs: dict[str, tuple[float, list[str]]] = {}
        self._finds: dict[str, tuple[float, list[str]]] = {}
        self._resolved: dict[str, tuple[float, _Reader]] = {}
        self._listed: dict[str, list[str]] = {}         # directory -> its files, listing order
        self._handles: dict[int, _Reader | _OpenWrite | bytes] = {}
        self._pending: dict[str, _OpenWrite] = {}
        self._next_fh = 1
        self._lock = threading.Lock()
        self._inflight: dict[tuple[str, int], Future[bytes]] = {}
        self.blocks: BlockCache | None = None
        self._pool: ThreadPoolExecutor | None = None
        self.uid, self.gid = os.getuid(), os.getgid()

    @property
    def client(self) -> Client:
        """The connection, made in ``init`` (in the mounted process)."""
        if self._client is None:
            raise errors.TransportError("the mount is not connected yet.")
        return self._client

    # -- lifecycle ------------------------------------------------------------------------

    def init(self, path: str) -> None:
        """Runs in the mounted (possibly daemonized) process: connect here, not before the fork."""
        self._client = self.client_factory()
        self.role = self.client.whoami()["role"]
        self.blocks = BlockCache(self.cache_dir / "blocks")
        self.spool = self.cache_dir / "spool"
        self.spool.mkdir(parents=True, exist_ok=True)
        self._pool = ThreadPoolExecutor(6, thread_name_prefix="dgf-readahead")

    def destroy(self, path: str) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self._client is not None:
            self._client.close()

    # -- attributes -----------------------------------------------------------------------

    def _attr(self, st: Stat) -> dict[str, Any]:
        mode = (stat_mod.S_IFDIR if st.is_dir else stat_mod.S_IFREG) | (st.mode & 0o7777)
        if self.read_only:
            mode &= ~0o222
        return {"st_mode": mode, "st_nlink": st.nlink, "st_size": st.size, "st_uid": self.uid,
                "st_gid": self.gid, "st_mtime": int(st.mtime * 1e9), "st_ctime": int(st.ctime * 1e9),
                "st_atime": int(st.mtime * 1e9), "st_ino": st.ino, "st_blocks": (st.size + 511) // 512,
                "st_blksize": BLOCK}

    def _stat(self, path: str) -> Stat:
        now = time.monotonic()
        hit = self._attrs.get(path)
        if hit is not None and now - hit[0] < ATTR_TTL:
            return hit[1]
        parent = os.path.dirname(path) or "/"
        if parent in self._dirs and path != "/":
            # A listed directory's entries expire together: one listing refreshes them all
            # (ls -l of 100,000 entries was one stat round trip per entry).
            self._list(parent)
            hit = self._attrs.get(path)
            if hit is not None:
                return hit[1]
            raise errors.NotFound(f"{path} does not exist.")
        st = self.client.stat(path)
        if self.identified:
            st = self._identified([st])[0]
        self._attrs[path] = (now, st)
        return st

    def _identified(self, entries: list[Stat]) -> list[Stat]:
        """An identified mount reads originals: stat gives their sizes, so ``tar`` and ``cp``
        see the size that ``read`` returns (files without identity keep the object's size)."""
        keys = sorted({st.object_key for st in entries if st.object_key and not st.is_dir})
        sizes = self.client.identified_sizes(keys) if keys else {}
        return [dataclasses.replace(st, size=sizes[st.object_key]) if st.object_key in sizes else st
                for st in entries]

    def _forget(self, *paths: str) -> None:
        for p in paths:
            self._attrs.pop(p, None)
            self._dirs.pop(p, None)
            self._dirs.pop(os.path.dirname(p) or "/", None)

    def _virtual(self, path: str) -> tuple[str, str, str] | None:
        """(kind, query, rest) for paths under .find/ and .queries/, else None."""
        parts = path.strip("/").split("/", 2)
        if not parts or parts[0] not in (FIND_DIR, QUERIES_DIR):
            return None
        return parts[0], parts[1] if len(parts) > 1 else "", parts[2] if len(parts) > 2 else ""

    def _dir_attr(self) -> dict[str, Any]:
        now = int(time.time() * 1e9)
        return {"st_mode": stat_mod.S_IFDIR | 0o555, "st_nlink": 2, "st_size": 0, "st_uid": self.uid,
                "st_gid": self.gid, "st_mtime": now, "st_ctime": now, "st_atime": now}

    @_errno_of
    def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
        writer = self._pending.get(path)
        if writer is not None:
            size = os.fstat(writer.fd).st_size
            t = int(writer.created * 1e9)
            return {"st_mode": stat_mod.S_IFREG | writer.mode, "st_nlink": 1, "st_size": size,
                    "st_uid": self.uid, "st_gid": self.gid, "st_mtime": t, "st_ctime": t, "st_atime": t}
        virtual = self._virtual(path)
        if virtual is not None:
            kind, q, rest = virtual
            if not rest:
                return self._dir_attr()
            if rest not in self._query_entries(kind, q):
                raise errors.NotFound(f"{path} does not exist.")
            attr = self._dir_attr()
            attr["st_mode"] = stat_mod.S_IFLNK | 0o777
            return attr
        return self._attr(self._stat(path))

    @_errno_of
    def readdir(self, path: str, fh: Any) -> list[str]:
        virtual = self._virtual(path)
        if virtual is not None:
            kind, q, _ = virtual
            if not q:
                # A query's owner/name shows as owner:name (a directory name has no '/').
                return [".", ".."] + (sorted(n.replace("/", ":") for n in self.client.saved_queries())
                                      if kind == QUERIES_DIR else [])
            return [".", "..", *self._query_entries(kind, q)]
        hit = self._dirs.get(path)
        names = hit[1] if hit is not None and time.monotonic() - hit[0] < ATTR_TTL else self._list(path)
        extra = [FIND_DIR, QUERIES_DIR] if path == "/" else []
        with self._lock:
            writing = list(self._pending)
        pending = [os.path.basename(p) for p in writing if (os.path.dirname(p) or "/") == path]
        return [".", "..", *extra, *names, *(p for p in pending if p not in names)]

    def _list(self, path: str) -> list[str]:
        """One round trip gives every entry's attributes; getattr on each then hits the cache."""
        now = time.monotonic()
        entries = self.client.ls(path)
        if self.identified:
            entries = self._identified(entries)
        if len(self._attrs) > MAX_CACHED_ENTRIES:
            self._attrs.clear()
        for st in entries:
            self._attrs[st.path] = (now, st)
        names = [os.path.basename(st.path) for st in entries]
        self._dirs[path] = (now, names)
        files = [st.path for st in entries if not st.is_dir]
        if files:
            self._listed[path] = files
        return names

    def _query_entries(self, kind: str, q: str) -> list[str]:
        now = time.monotonic()
        cache_key = f"{kind}/{q}"
        hit = self._finds.get(cache_key)
        if hit is not None and now - hit[0] < ATTR_TTL:
            return hit[1]
        if kind == QUERIES_DIR:
            xpath = "@" + q.replace(":", "/")
        else:
            xpath = unquote(q)
            if not xpath.startswith(("/", "(")):
                xpath = f"/DicomHeader[{xpath}]"
        where = f"{'/' + kind}/{q}"
        try:
            names = [quote(r["path"].lstrip("/"), safe="")
                     for r in self.client.find_iter(xpath, on_warning=lambda w: log.warning("%s: %s", where, w))]
        except errors.UsageError as exc:
            # ls shows only "Invalid argument": the log says what is wrong with the expression.
            log.warning("%s: %s", where, exc)
            raise
        self._finds[cache_key] = (now, names)
        return names

    @_errno_of
    def readlink(self, path: str) -> str:
        virtual = self._virtual(path)
        if virtual is None or not virtual[2]:
            raise mfusepy.FuseOSError(errno.EINVAL)
        return "../../" + unquote(virtual[2])

    def statfs(self, path: str) -> dict[str, int]:
        return {"f_bsize": BLOCK, "f_frsize": BLOCK, "f_blocks": 1 << 20, "f_bfree": 1 << 19,
                "f_bavail": 1 << 19, "f_files": 1 << 30, "f_ffree": 1 << 29, "f_namemax": 255}

    # -- reading --------------------------------------------------------------------------

    def _new_fh(self, handle: _Reader | _OpenWrite | bytes) -> int:
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            self._handles[fh] = handle
        return fh

    @_errno_of
    def open(self, path: str, flags: int) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR):
            return self._new_fh(self._rewrite(path, truncate=bool(flags & os.O_TRUNC)))
        if self._virtual(path) is not None:
            raise mfusepy.FuseOSError(errno.EISDIR)
        if self.identified:
            data = self.client.read_file(path, identified=True)
            self._attrs[path] = (time.monotonic(), dataclasses.replace(self._stat(path), size=len(data)))
            return self._new_fh(data)
        reader = self._resolve(path)
        if reader.size <= BLOCK and self.blocks is not None and self.blocks.get(reader.key, 0) is None:
            self._prefetch_siblings(path)
        return self._new_fh(reader)

    def _prefetch_siblings(self, path: str) -> None:
        """Reading one small file of a listed directory: fetch the next small files of that
        directory in one batched request per site (readahead across files, for cat dir/*)."""
        assert self._pool is not None and self.blocks is not None
        files = self._listed.get(os.path.dirname(path) or "/")
        if not files or path not in files:
            return
        start = files.index(path)
        wanted: list[_Reader] = []
        for p in files[start + 1:start + 1 + PREFETCH_FILES]:
            hit = self._resolved.get(p)
            if hit is None:
                continue
            r = hit[1]
            if r.size <= BLOCK and r.sites and (r.key, 0) not in self._inflight and self.blocks.get(r.key, 0) is None:
                wanted.append(r)
        if not wanted:
            return
        futures: dict[str, Future[bytes]] = {}
        with self._lock:
            for r in wanted:
                futures[r.key] = self._inflight.setdefault((r.key, 0), Future())
        self._pool.submit(self._fetch_batch, wanted, futures)

    def _fetch_batch(self, readers: list[_Reader], futures: dict[str, Future[bytes]]) -> None:
        """Whole small objects for the block cache, batched per site by the object reader."""
        assert self.blocks is not None

        def done(res: Any) -> None:
            fut = futures.get(res.key)
            if res.data is not None:
                self.blocks.put(res.key, 0, res.data)      # type: ignore[union-attr]
                with self._lock:
                    self._inflight.pop((res.key, 0), None)
                if fut is not None and not fut.done():
                    fut.set_result(res.data)

        by_key = {r.key: r for r in readers}
        try:
            self.client.reader.read_many(readers, done)
        except Exception as exc:  # noqa: BLE001 - a failed prefetch only means reads fetch alone
            log.info("prefetch failed (%s)", type(exc).__name__)
        finally:
            with self._lock:
                for key, fut in futures.items():
                    if self._inflight.get((key, 0)) is fut:
                        del self._inflight[(key, 0)]
            for key, fut in futures.items():
                if fut.done():
                    continue
                # Every future is completed, one way or the other: a reader may be waiting on it.
                try:
                    fut.set_result(self._fetch(by_key[key], 0))
                except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the block
                    fut.set_exception(exc)

    def _remember_resolved(self, resolved: dict[str, Any]) -> None:
        now = time.monotonic()
        if len(self._resolved) > MAX_CACHED_ENTRIES:      # entries expire anyway; bound memory
            self._resolved.clear()
        for ref in ObjectRef.all_of(resolved):
            self._resolved[ref.path] = (now, _Reader(ref.path, ref.key, ref.size, ref.sites, ref.caps,
                                                     ref.digests, ref.resolved, ref.env))

    def _resolve(self, path: str) -> _Reader:
        """A fresh reader for ``path``.  The first file opened in a listed directory resolves
        every file of it in one request: whoever lists and then reads usually reads on (cat
        dir/*, cp -r)."""
        hit = self._resolved.get(path)
        if hit is None or time.monotonic() - hit[0] >= ATTR_TTL:
            listed = self._listed.get(os.path.dirname(path) or "/")
            wanted = listed if listed and path in listed and not self.identified else [path]
            self._remember_resolved(self.client.resolve(wanted))
            hit = self._resolved.get(path)
            if hit is None:
                raise errors.NotFound(f"{path} does not exist.")
        r = hit[1]
        return _Reader(r.path, r.key, r.size, list(r.sites), r.caps, r.digests, r.resolved, r.env)  # its own position

    @_errno_of
    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        handle = self._handles[fh]
        if isinstance(handle, bytes):
            return handle[offset:offset + size]
        if isinstance(handle, _OpenWrite):
            return os.pread(handle.fd, size, offset)
        if offset >= handle.size:
            return b""
        end = min(offset + size, handle.size)
        first, last = offset // BLOCK, (end - 1) // BLOCK
        out = [self._block(handle, i) for i in range(first, last + 1)]
        if first == handle.last_block + 1 or first == handle.last_block:
            for ahead in range(last + 1, min(last + 1 + READAHEAD_BLOCKS, (handle.size - 1) // BLOCK + 1)):
                self._prefetch(handle, ahead)
        handle.last_block = last
        data = b"".join(out)
        start = offset - first * BLOCK
        return data[start:start + (end - offset)]

    def _block(self, r: _Reader, idx: int) -> bytes:
        assert self.blocks is not None
        data = self.blocks.get(r.key, idx)
        if data is not None:
            return data
        return self._prefetch(r, idx).result()

    def _prefetch(self, r: _Reader, idx: int) -> Future[bytes]:
        assert self._pool is not None and self.blocks is not None
        with self._lock:
            fut = self._inflight.get((r.key, idx))
            if fut is None:
                cached = self.blocks.get(r.key, idx)   # fetched since the caller looked
                if cached is not None:
                    done: Future[bytes] = Future()
                    done.set_result(cached)
                    return done
                fut = self._pool.submit(self._fetch, r, idx)
                self._inflight[(r.key, idx)] = fut
        return fut

    def _fetch(self, r: _Reader, idx: int) -> bytes:
        """One block through the client's object reader (replicas in turn, verified)."""
        assert self.blocks is not None
        try:
            if r.stored > DIGEST_BLOCK and not r.digests:
                # Stored before objects had hash lists: only the whole object can be checked,
                # so it is read whole once and cached block by block.
                data = self.client.reader.read(r)
                for i in range(0, len(data), BLOCK):
                    self.blocks.put(r.key, i // BLOCK, data[i:i + BLOCK])
                return data[idx * BLOCK:(idx + 1) * BLOCK]
            offset = idx * BLOCK
            data = self.client.reader.read(r, offset, min(BLOCK, r.size - offset))
            self.blocks.put(r.key, idx, data)
            return data
        finally:
            with self._lock:
                self._inflight.pop((r.key, idx), None)

    @_errno_of
    def release(self, path: str, fh: int) -> int:
        handle = self._handles.pop(fh, None)
        if isinstance(handle, _OpenWrite):
            try:
                self._upload(handle)
            finally:
                self._discard(handle)
        return 0

    # -- writing --------------------------------------------------------------------------

    def _writable(self) -> None:
        if self.read_only:
            raise mfusepy.FuseOSError(errno.EROFS)
        if self.role not in WRITER_ROLES:
            raise errors.PermissionDenied(f"role {self.role!r} may not change the archive.")

    @_errno_of
    def create(self, path: str, mode: int, fi: Any = None) -> int:
        self._writable()
        if self._virtual(path) is not None:
            raise mfusepy.FuseOSError(errno.EPERM)
        writer = _OpenWrite(path, self.spool, mode & 0o7777 or 0o644)
        self._pending[path] = writer
        return self._new_fh(writer)

    @_errno_of
    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        handle = self._handles.get(fh)
        if not isinstance(handle, _OpenWrite):
            raise mfusepy.FuseOSError(errno.EBADF)
        handle.dirty = True
        return os.pwrite(handle.fd, data, offset)

    def _rewrite(self, path: str, truncate: bool) -> _OpenWrite:
        """Writing over an existing file replaces it whole (objects are immutable): allowed when
        the file is truncated first (cp, shell redirection), refused for in-place edits."""
        self._writable()
        writer = self._pending.get(path)
        if writer is None:
            if not truncate:
                raise errors.PermissionDenied(f"{path} cannot be changed in place; write it whole.")
            writer = _OpenWrite(path, self.spool, self._stat(path).mode & 0o7777)
            self._pending[path] = writer
        return writer

    @_errno_of
    def truncate(self, path: str, length: int, fh: Any = None) -> int:
        writer = self._pending.get(path) or self._rewrite(path, truncate=length == 0)
        os.ftruncate(writer.fd, length)
        return 0

    @_errno_of
    def flush(self, path: str, fh: int) -> int:
        handle = self._handles.get(fh)
        # close() of every duplicate descriptor flushes; a shell's redirection closes one before
        # anything is written, so an empty file waits for the next flush or the release.
        if isinstance(handle, _OpenWrite) and handle.dirty and os.fstat(handle.fd).st_size > 0:
            try:
                self._upload(handle)
            except Exception:
                self._discard(handle)
                raise
        return 0

    def _upload(self, w: _OpenWrite) -> None:
        if not w.dirty:
            return
        w.dirty = False
        with open(w.fd, "rb", closefd=False) as f:
            data = f.read()
        try:
            self.client.upload_bytes(data, w.path)
        except (errors.InvalidDicom, errors.PermissionDenied) as exc:
            log.error("refused %s: %s%s", w.path, exc, f" ({exc.hint})" if exc.hint else "")
            raise
        except errors.DgfError as exc:
            log.error("could not store %s: %s", w.path, exc)
            raise
        self._pending.pop(w.path, None)
        self._forget(w.path)

    def _discard(self, w: _OpenWrite) -> None:
        if self._pending.get(w.path) is w:
            del self._pending[w.path]
        try:
            os.close(w.fd)
        except OSError:
            pass
        w.spool.unlink(missing_ok=True)

    @_errno_of
    def mkdir(self, path: str, mode: int) -> int:
        self._writable()
        self.client.mkdir(path, mode=mode & 0o7777)
        self._forget(path)
        return 0

    @_errno_of
    def rmdir(self, path: str) -> int:
        self._writable()
        self.client.rmdir(path)
        self._forget(path)
        return 0

    @_errno_of
    def unlink(self, path: str) -> int:
        self._writable()
        self.client.rm(path)
        self._forget(path)
        return 0

    @_errno_of
    def rename(self, old: str, new: str, flags: int = 0) -> int:
        self._writable()
        self.client.mv(old, new)
        self._forget(old, new)
        self._attrs.clear()                      # a moved directory changes every path below it
        return 0

    @_errno_of
    def chmod(self, path: str, mode: int, fh: Any = None) -> int:
        self._writable()
        self.client.chmod(path, mode & 0o7777)
        self._forget(path)
        return 0

    @_errno_of
    def utimens(self, path: str, times: Any = None, fh: Any = None) -> int:
        return 0                                 # times are the archive's (cp -p and touch succeed)

    # -- extended attributes --------------------------------------------------------------

    @_errno_of
    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        if not name.startswith("user."):
            # Security labels and POSIX ACLs are not supported (only user.* exists). ENOTSUP,
            # not ENODATA: ls -l then stops asking every file of the mount for them (coreutils
            # remembers a device that does not support them), which halves its FUSE calls.
            raise mfusepy.FuseOSError(errno.ENOTSUP)
        if self._virtual(path) is not None:
            raise mfusepy.FuseOSError(errno.ENODATA)
        if name == IDENTITY_XATTR:
            if not self.identified:
                raise mfusepy.FuseOSError(errno.ENODATA)
            return json.dumps(self.client.identity_summary(path), ensure_ascii=False).encode()
        if name in VIRTUAL_XATTRS:
            st = self._stat(path)
            if st.is_dir or not st.object_key:
                raise mfusepy.FuseOSError(errno.ENODATA)
            if name == "user.dgf.checksum":
                return f"sha256:{st.object_key}".encode()
            return ",".join(ResolvedFile.all_of(self.client.resolve([path]))[0].sites).encode()
        return bytes(self.client.getxattr(path, name))

    @_errno_of
    def listxattr(self, path: str) -> list[str]:
        if self._virtual(path) is not None:
            return []
        names = list(self.client.listxattr(path))
        if not self._stat(path).is_dir:
            names += list(VIRTUAL_XATTRS) + ([IDENTITY_XATTR] if self.identified else [])
        return names

    @_errno_of
    def setxattr(self, path: str, name: str, value: bytes, options: int, position: int = 0) -> int:
        if name in VIRTUAL_XATTRS or name == IDENTITY_XATTR:
            raise mfusepy.FuseOSError(errno.EPERM)
        self.client.setxattr(path, name, bytes(value))
        return 0

    @_errno_of
    def removexattr(self, path: str, name: str) -> int:
        self.client.removexattr(path, name)
        return 0


def mount(mountpoint: str, config: str | None, identified: bool, foreground: bool, read_only: bool) -> None:
    """Check the configuration and the principal here, then mount (and daemonize unless asked not to)."""
    from dgf.client import Client
    from dgf.config import ClientConfig

    cfg = ClientConfig.load(config)
    with Client(cfg) as probe:
        role = probe.whoami()["role"]
    if identified and role != "clinician":
        raise errors.PermissionDenied(f"role {role!r} may not mount with --identified; "
                                      "only clinicians see patient identity.")
    target = Path(mountpoint)
    if not target.is_dir():
        raise errors.NotADirectory(f"{mountpoint} is not a directory; create it first.")
    if os.path.ismount(target):
        raise errors.AlreadyExists(f"{mountpoint} is already a mount point; 'dgf umount {mountpoint}' first.")
    if shutil.which("fusermount3") is None and os.geteuid() != 0:
        raise errors.UsageError("FUSE is not installed; install the Debian package fuse3.")
    cache = Path(cfg.cache_dir) / "mount"
    cache.mkdir(parents=True, exist_ok=True)
    # Refused writes and failed reads are logged by path (de-identified paths, never identity).
    handler: logging.Handler = logging.StreamHandler() if foreground else logging.FileHandler(cache / "mount.log")
    handler.setFormatter(logging.Formatter("%(asctime)s dgf mount %(levelname)s %(message)s"))
    for name in ("dgf.fuse", "dgf.reader"):       # the mount's own lines, and its reads' failovers
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)
    if not foreground:
        print(f"mounted {mountpoint}; log: {cache / 'mount.log'}")
    ops = DgfFS(lambda: Client(cfg), cache, identified, read_only)
    options: dict[str, Any] = {"fsname": "dgf", "subtype": "dgf", "attr_timeout": ATTR_TTL,
                               "entry_timeout": ATTR_TTL, "negative_timeout": 1.0, "auto_cache": True,
                               "default_permissions": True}
    if read_only:
        options["ro"] = True
    if identified:
        # Originals are read whole at open; reads must reach us unclipped by any size the kernel
        # cached before (stat gives the original's size, but a file replaced meanwhile differs).
        options["direct_io"] = True
    try:
        mfusepy.FUSE(ops, str(target), foreground=foreground, **options)
    except RuntimeError as exc:
        raise errors.UsageError(f"cannot mount {mountpoint} ({exc}); is it already mounted, and is "
                                "/dev/fuse usable here?") from exc


def umount(mountpoint: str, lazy: bool = False) -> None:
    import subprocess

    if not os.path.ismount(mountpoint):
        raise errors.UsageError(f"{mountpoint} is not mounted.")
    tool = ["fusermount3", "-u"] if shutil.which("fusermount3") else ["umount"]
    cmd = [*tool, *(["-z"] if lazy else []), mountpoint]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        why = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "unknown reason"
        if "busy" in why.lower():
            raise errors.UsageError(f"{mountpoint} is busy (files are open on it); close them, "
                                    "or unmount with --lazy.")
        raise errors.UsageError(f"cannot unmount {mountpoint}: {why}.")
