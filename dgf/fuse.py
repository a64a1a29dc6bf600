"""``dgf mount``: the archive as a POSIX directory (mfusepy on libfuse3).

``DgfFS`` adapts FUSE's operations to :class:`dgf.mountsource.ArchiveTree` (cached attributes,
listings, queries and verified blocks, over a client) and turns errors into errnos; what it
adds is what only a file system has: file handles, files being written, and the virtual
``.find``/``.queries`` directories.  See :mod:`dgf.mountsource` for reading and freshness.

With ``--identified`` (clinicians only) a file opens as the exact original, re-identified in
memory, or for an object over 8 MiB into an unlinked file in the mount's spool (a 2 GB
multi-frame would otherwise cost 4 GB per open); every such open is an audited identity
release.

Writing: a file copied in (or over an existing one, which it replaces whole; objects are never
edited in place) is spooled locally and, when closed, uploaded like ``dgf_up`` (de-
identified, placed at that path); a non-DICOM file fails the close with EINVAL, is logged by
name, and leaves nothing behind.

Queries: ``MOUNT/.find/<XPath>/`` lists matching files as symlinks to their paths (the XPath
percent-encoded, or a predicate such as ``Modality='CT'`` meaning ``/DicomHeader[...]``), and
``MOUNT/.queries/NAME/`` does the same for each saved query.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import itertools
import json
import logging
import os
import shutil
import stat as stat_mod
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, TypeVar
from urllib.parse import unquote

import mfusepy

from dgf import errors
from dgf.mountsource import ATTR_TTL, BLOCK, FIND_DIR, QUERIES_DIR, ArchiveTree, MountSource, Reader
from dgf.types import WRITER_ROLES, Stat

log = logging.getLogger("dgf.fuse")

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


class _OpenWrite:
    """A file being written into the mount: spooled locally, uploaded when closed."""

    def __init__(self, path: str, spool: Path, mode: int) -> None:
        self.path, self.mode = path, mode
        fd, name = tempfile.mkstemp(dir=spool, prefix=".up-")
        self.fd, self.spool = fd, Path(name)
        self.dirty = True
        self.created = time.time()


class DgfFS(mfusepy.Operations):
    """FUSE's operations over an ArchiveTree (made in ``init``, in the mounted process)."""

    use_ns = True

    def __init__(self, source_factory: Callable[[], MountSource], cache_dir: Path, identified: bool = False,
                 read_only: bool = False) -> None:
        self.source_factory = source_factory
        self.cache_dir = cache_dir
        self.identified = identified
        self.read_only = read_only
        self._tree: ArchiveTree | None = None
        self.role = ""
        self._handles: dict[int, Reader | _OpenWrite | bytes | BinaryIO] = {}
        self._pending: dict[str, _OpenWrite] = {}
        self._next_fh = 1
        self._lock = threading.Lock()
        self.uid, self.gid = os.getuid(), os.getgid()

    @property
    def tree(self) -> ArchiveTree:
        """What the mount shows, made in ``init`` (in the mounted process)."""
        if self._tree is None:
            raise errors.TransportError("the mount is not connected yet.")
        return self._tree

    @property
    def source(self) -> MountSource:
        return self.tree.source

    # -- lifecycle ------------------------------------------------------------------------

    def init(self, path: str) -> None:
        """Runs in the mounted (possibly daemonized) process: connect here, not before the fork."""
        source = self.source_factory()
        try:
            self.role = source.whoami()["role"]
            self._tree = ArchiveTree(source, self.cache_dir, self.identified)
        except BaseException:
            source.close()
            raise
        self.spool = self.cache_dir / "spool"
        self.spool.mkdir(parents=True, exist_ok=True)
        # Originals rebuilt for an identified open are unlinked once open; a mount that died
        # while rebuilding one left it here (another mount of this cache may be rebuilding now).
        for left in (self.spool / "originals").glob("dgf-original-*"):
            with contextlib.suppress(OSError):
                if time.time() - left.stat().st_mtime > 3600:
                    shutil.rmtree(left, ignore_errors=True)

    def destroy(self, path: str) -> None:
        if self._tree is not None:
            self._tree.close()

    # -- attributes -----------------------------------------------------------------------

    def _attr(self, st: Stat) -> dict[str, Any]:
        mode = (stat_mod.S_IFDIR if st.is_dir else stat_mod.S_IFREG) | (st.mode & 0o7777)
        if self.read_only:
            mode &= ~0o222
        return {"st_mode": mode, "st_nlink": st.nlink, "st_size": st.size, "st_uid": self.uid,
                "st_gid": self.gid, "st_mtime": int(st.mtime * 1e9), "st_ctime": int(st.ctime * 1e9),
                "st_atime": int(st.mtime * 1e9), "st_ino": st.ino, "st_blocks": (st.size + 511) // 512,
                "st_blksize": BLOCK}

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
            if not self.tree.query_lists(kind, q, rest):
                raise errors.NotFound(f"{path} does not exist.")
            attr = self._dir_attr()
            attr["st_mode"] = stat_mod.S_IFLNK | 0o777
            return attr
        return self._attr(self.tree.stat(path))

    # Nothing is kept per open directory here; defined so that libfuse calls opendir and
    # releasedir at all: _Fuse gives each open directory a handle that names its listing.
    def opendir(self, path: str) -> int:
        return 0

    def releasedir(self, path: str, fh: int) -> int:
        return 0

    @_errno_of
    def readdir(self, path: str, fh: Any) -> list[str]:
        virtual = self._virtual(path)
        if virtual is not None:
            kind, q, _ = virtual
            if not q:
                # A query's owner/name shows as owner:name (a directory name has no '/').
                return [".", "..", *(self.tree.saved_query_names() if kind == QUERIES_DIR else [])]
            return [".", "..", *self.tree.query(kind, q)]
        names = self.tree.names(path)
        extra = [FIND_DIR, QUERIES_DIR] if path == "/" else []
        with self._lock:
            writing = list(self._pending)
        pending = [os.path.basename(p) for p in writing if (os.path.dirname(p) or "/") == path]
        return [".", "..", *extra, *names, *(p for p in pending if p not in names)]

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

    def _new_fh(self, handle: Reader | _OpenWrite | bytes | BinaryIO) -> int:
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
            original = self.source.read_original(path, self.spool / "originals")
            self.tree.opened_whole(path, len(original) if isinstance(original, bytes)
                                   else os.fstat(original.fileno()).st_size)
            return self._new_fh(original)
        return self._new_fh(self.tree.open(path))

    @_errno_of
    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        handle = self._handles[fh]
        if isinstance(handle, bytes):
            return handle[offset:offset + size]
        if isinstance(handle, _OpenWrite):
            return os.pread(handle.fd, size, offset)
        if isinstance(handle, Reader):
            return self.tree.read(handle, size, offset)
        return os.pread(handle.fileno(), size, offset)             # an original rebuilt on disk

    @_errno_of
    def release(self, path: str, fh: int) -> int:
        handle = self._handles.pop(fh, None)
        if isinstance(handle, _OpenWrite):
            try:
                self._upload(handle)
            finally:
                self._discard(handle)
        elif handle is not None and not isinstance(handle, (bytes, Reader)):
            handle.close()                                 # an original rebuilt on disk: its space
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
            writer = _OpenWrite(path, self.spool, self.tree.stat(path).mode & 0o7777)
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
            self.source.upload_bytes(data, w.path)
        except (errors.InvalidDicom, errors.PermissionDenied) as exc:
            log.error("refused %s: %s%s", w.path, exc, f" ({exc.hint})" if exc.hint else "")
            raise
        except errors.DgfError as exc:
            log.error("could not store %s: %s", w.path, exc)
            raise
        self._pending.pop(w.path, None)
        self.tree.forget(w.path)

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
        self.source.mkdir(path, mode=mode & 0o7777)
        self.tree.forget(path)
        return 0

    @_errno_of
    def rmdir(self, path: str) -> int:
        self._writable()
        self.source.rmdir(path)
        self.tree.forget(path)
        return 0

    @_errno_of
    def unlink(self, path: str) -> int:
        self._writable()
        self.source.rm(path)
        self.tree.forget(path)
        return 0

    @_errno_of
    def rename(self, old: str, new: str, flags: int = 0) -> int:
        self._writable()
        self.source.mv(old, new)
        self.tree.forget(old, new, everything=True)      # a moved directory changes every path below it
        return 0

    @_errno_of
    def chmod(self, path: str, mode: int, fh: Any = None) -> int:
        self._writable()
        self.source.chmod(path, mode & 0o7777)
        self.tree.forget(path)
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
            return json.dumps(self.source.identity_summary(path), ensure_ascii=False).encode()
        if name in VIRTUAL_XATTRS:
            st = self.tree.stat(path)
            if st.is_dir or not st.object_key:
                raise mfusepy.FuseOSError(errno.ENODATA)
            if name == "user.dgf.checksum":
                return f"sha256:{st.object_key}".encode()
            return ",".join(self.tree.sites(path)).encode()
        return bytes(self.source.getxattr(path, name))

    @_errno_of
    def listxattr(self, path: str) -> list[str]:
        if self._virtual(path) is not None:
            return []
        names = list(self.source.listxattr(path))
        if not self.tree.stat(path).is_dir:
            names += list(VIRTUAL_XATTRS) + ([IDENTITY_XATTR] if self.identified else [])
        return names

    @_errno_of
    def setxattr(self, path: str, name: str, value: bytes, options: int, position: int = 0) -> int:
        if name in VIRTUAL_XATTRS or name == IDENTITY_XATTR:
            raise mfusepy.FuseOSError(errno.EPERM)
        self.source.setxattr(path, name, bytes(value))
        return 0

    @_errno_of
    def removexattr(self, path: str, name: str) -> int:
        self.source.removexattr(path, name)
        return 0


#: libfuse3's readdir flag (the kernel asks for READDIRPLUS) and the filler's flag answering it.
READDIR_PLUS = 1
FILL_DIR_PLUS = 2
#: Open listings the mount keeps the names of at most: each is freed when its directory is
#: closed, and holds a list as long as its directory (8 bytes an entry).  A listing pushed out
#: (more directories open and being read at once) goes on in a new listing of its directory.
LISTINGS_KEPT = 256
#: And names in all of them at most (~32 MB of references): 256 open listings of a directory of
#: a million entries would hold 2 GB.
LISTED_NAMES_KEPT = 4_000_000
#: Directories whose last listing's time the mount keeps (_Fuse._handed); one pushed out is
#: listed with attributes again.
HANDED_KEPT = 4096


class _Fuse(mfusepy.FUSE):
    """mfusepy's FUSE, answering the kernel's READDIRPLUS with every entry's attributes (mfusepy
    3.1 answers it as a plain READDIR).  A listing then costs one callback into Python, where the
    entries' attributes are already cached (one round trip listed them), instead of one LOOKUP
    per entry: the first ``ls -l`` of 1000 files 132 -> 53 ms, after the attributes expire
    115 -> 44 ms (bench/listing.py).  Entries go to libfuse in its offset mode (each with the
    offset of the next): in the mode mfusepy uses, libfuse drops the attributes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Each open listing's names as read at offset 0, for the calls that continue it: the
        # kernel asks for a buffer of entries at a time (READDIRPLUS first, often plain READDIR
        # after), and an offset must mean the same entry in each.  Keyed by the handle opendir
        # gave the open directory, freed by releasedir, so two processes listing one directory
        # while it changes each see one consistent snapshot, each entry once.
        self._listings: collections.OrderedDict[int, tuple[list[str], bool, float]] = collections.OrderedDict()
        self._handles = itertools.count(1)
        # When each directory's entries last went to the kernel with their attributes: for the
        # next ATTR_TTL / 2 the kernel still holds them (it keeps them ATTR_TTL from receipt),
        # so a listing again (``ls -l`` twice) hands names only, as mfusepy does, and costs the
        # mount no attribute structs: 1000 entries ~20 -> ~9 ms.  An entry the kernel no longer
        # holds (a new name, or one dropped meanwhile) it looks up itself: slower, never wrong.
        self._handed: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._listings_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def opendir(self, path: bytes, fip: Any) -> int:
        # DgfFS keeps nothing per open directory: the handle names this listing's snapshot.
        status = int(super().opendir(path, fip))
        fip.contents.fh = next(self._handles)
        return status

    def releasedir(self, path: bytes | None, fip: Any) -> int:
        with self._listings_lock:
            self._listings.pop(fip.contents.fh, None)
        return int(super().releasedir(path, fip))

    def readdir_fuse_3(self, path: bytes | None, buf: Any, filler: Any, offset: int, fip: Any, flags: int) -> int:
        if path is None:
            return int(super().readdir_fuse_3(path, buf, filler, offset, fip, flags))
        where = path.decode(self.encoding, self.errors)
        ops = self.operations
        listing = fip.contents.fh
        with self._listings_lock:
            kept = self._listings.get(listing) if offset else None
            handed = self._handed.get(where)
        if kept is None:
            now = time.monotonic()
            kept = ops.readdir(where, listing), handed is None or now - handed >= ATTR_TTL / 2, now
            with self._listings_lock:
                self._listings[listing] = kept
                self._listings.move_to_end(listing)
                total = sum(len(names) for names, _, _ in self._listings.values())
                while len(self._listings) > 1 and (len(self._listings) > LISTINGS_KEPT or total > LISTED_NAMES_KEPT):
                    total -= len(self._listings.popitem(last=False)[1][0])
        names, with_attrs, started = kept
        with_attrs = with_attrs and bool(flags & READDIR_PLUS)
        prefix = where.rstrip("/") + "/"
        for i in range(offset, len(names)):
            name, st, plus = names[i], None, 0
            if with_attrs and name not in (".", ".."):
                # An entry gone meanwhile is listed by name only; the kernel looks it up.
                with contextlib.suppress(mfusepy.FuseOSError):
                    st = mfusepy.c_stat()
                    mfusepy.set_st_attrs(st, ops.getattr(prefix + name), use_ns=ops.use_ns)
                    plus = FILL_DIR_PLUS
            # The offset given with an entry is where the next call starts: the one after it.
            if filler(buf, name.encode(self.encoding, self.errors), st if plus else None, i + 1, plus) != 0:
                return 0
        # Read to the end: the snapshot stays until releasedir, for the call at the end offset
        # that finds nothing more (a new listing there would give any names added meanwhile).
        if with_attrs and not offset:
            with self._listings_lock:
                self._handed[where] = started
                self._handed.move_to_end(where)
                while len(self._handed) > HANDED_KEPT:
                    self._handed.popitem(last=False)
        return 0


def _fuse_class() -> type[mfusepy.FUSE]:
    """:class:`_Fuse` where this mfusepy's readdir, opendir and releasedir are the ones it
    overrides (3.1's), else mfusepy's own FUSE: listings then cost a LOOKUP per entry again,
    but the mount works."""
    import inspect

    overridden = {"readdir_fuse_3": ["self", "path", "buf", "filler", "offset", "fip", "flags"],
                  "opendir": ["self", "path", "fip"], "releasedir": ["self", "path", "fip"]}
    if hasattr(mfusepy, "set_st_attrs") and hasattr(mfusepy, "c_stat") and all(
            callable(getattr(mfusepy.FUSE, name, None))
            and list(inspect.signature(getattr(mfusepy.FUSE, name)).parameters) == params
            for name, params in overridden.items()):
        return _Fuse
    log.warning("this mfusepy's readdir is not 3.1's: listings are answered without attributes")
    plain: type[mfusepy.FUSE] = mfusepy.FUSE
    return plain


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
    if not foreground:
        _only_this_thread()
    try:
        _fuse_class()(ops, str(target), foreground=foreground, **options)
    except RuntimeError as exc:
        raise errors.UsageError(f"cannot mount {mountpoint} ({exc}); is it already mounted, and is "
                                "/dev/fuse usable here?") from exc


def _only_this_thread(wait_s: float = 10.0) -> None:
    """Wait until no other Python thread runs, before libfuse daemonizes.

    libfuse forks in C, inside a call that has let go of the GIL.  A thread still alive then
    (the probe client's SSH transport, finishing its close) may hold the GIL at that instant;
    the daemon inherits a GIL held by a thread it does not have, and its first callback (FUSE's
    INIT) waits for it forever, and so does every process that touches the mount."""
    deadline = time.monotonic() + wait_s
    for t in threading.enumerate():
        if t is not threading.current_thread():
            t.join(max(0.0, deadline - time.monotonic()))
    left = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
    if left:
        raise errors.ServerError(f"cannot start the mount safely: thread(s) {', '.join(left)} did not end "
                                 f"within {wait_s:.0f} s; retry, or mount with --foreground.")


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
