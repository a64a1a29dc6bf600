"""What the mount shows, apart from FUSE: the archive as a tree of cached attributes, listings,
query results and verified blocks.

:class:`ArchiveTree` is what ``dgf.fuse.DgfFS`` adapts to FUSE's operations; it reads through a
:class:`MountSource`, the narrow part of a client the mount needs (:class:`dgf.client.Client` is
one).  Nothing here knows about file handles or errnos.

Freshness: attributes and listings are cached for ``ATTR_TTL`` seconds here and by the kernel,
so a rename, delete or upload made through another client shows up within 2 x ATTR_TTL (10 s).

Reading: files are the de-identified DICOM objects, fetched in 4 MiB blocks (a whole object when
smaller) into a block cache in memory and on local disk, both size-bounded; objects are
immutable and named by their SHA-256, so cached blocks never go stale, and a whole-object block
is verified against its name.  Sequential reads prefetch the next blocks, and the first small
file read in a listed directory fetches the next ones in one batched request per site.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, Protocol
from urllib.parse import quote, unquote

from dgf import errors
from dgf.blockcache import BlockCache
from dgf.integrity import BLOCK as DIGEST_BLOCK
from dgf.reader import ObjectRef
from dgf.transport import GetResult
from dgf.types import ResolvedFile, Stat

log = logging.getLogger("dgf.fuse")

BLOCK = 4 * 1024 * 1024
ATTR_TTL = 5.0
MAX_CACHED_ENTRIES = 500_000
READAHEAD_BLOCKS = 4
PREFETCH_FILES = 64
FIND_DIR, QUERIES_DIR = ".find", ".queries"


class ObjectSource(Protocol):
    """Verified object reads (:class:`dgf.reader.ObjectReader`)."""

    def read(self, ref: ObjectRef, offset: int = 0, length: int = -1) -> bytes: ...

    def read_many(self, refs: Sequence[ObjectRef], deliver: Callable[[GetResult], None]) -> Any: ...


class MountSource(Protocol):
    """The archive as the mount uses it: the namespace, queries, objects and identity."""

    @property
    def reader(self) -> ObjectSource: ...

    def whoami(self) -> dict[str, str]: ...

    def stat(self, path: str) -> Stat: ...

    def ls(self, path: str = "/") -> list[Stat]: ...

    def identified_sizes(self, keys: list[str]) -> dict[str, int]: ...

    def saved_queries(self) -> dict[str, str]: ...

    def find_iter(self, xpath: str, *, on_warning: Callable[[str], None] | None = None
                  ) -> Iterator[dict[str, Any]]: ...

    def resolve(self, paths: list[str]) -> dict[str, Any]: ...

    def read_file(self, path: str, identified: bool = False) -> bytes: ...

    def read_original(self, path: str, spool: Path) -> bytes | BinaryIO: ...

    def identity_summary(self, path: str) -> dict[str, Any]: ...

    def upload_bytes(self, data: bytes, path: str) -> None: ...

    def mkdir(self, path: str, *, mode: int = 0o755) -> Stat: ...

    def rmdir(self, path: str) -> None: ...

    def rm(self, path: str) -> int: ...

    def mv(self, src: str, dst: str) -> None: ...

    def chmod(self, path: str, mode: int) -> None: ...

    def getxattr(self, path: str, name: str) -> bytes: ...

    def listxattr(self, path: str) -> list[str]: ...

    def setxattr(self, path: str, name: str, value: bytes) -> None: ...

    def removexattr(self, path: str, name: str) -> None: ...

    def close(self) -> None: ...


@dataclasses.dataclass
class Reader(ObjectRef):
    """An open de-identified file: its resolved object and where sequential reading stands."""

    last_block: int = -1


def query_xpath(kind: str, q: str) -> str:
    """The XPath a directory under ``.find/`` or ``.queries/`` stands for: a saved query's
    owner:name, or a percent-encoded XPath (a bare predicate means ``/DicomHeader[...]``)."""
    if kind == QUERIES_DIR:
        return "@" + q.replace(":", "/")
    xpath = unquote(q)
    return xpath if xpath.startswith(("/", "(")) else f"/DicomHeader[{xpath}]"


class ArchiveTree:
    """Cached attributes, listings, query results and blocks of the archive ``source`` shows
    (originals' sizes and bytes when ``identified``)."""

    def __init__(self, source: MountSource, cache_dir: Path, identified: bool = False) -> None:
        self.source = source
        self.identified = identified
        self._attrs: dict[str, tuple[float, Stat]] = {}
        self._dirs: dict[str, tuple[float, list[str]]] = {}
        self._finds: dict[str, tuple[float, list[str], frozenset[str]]] = {}
        self._resolved: dict[str, tuple[float, Reader]] = {}
        self._listed: dict[str, list[str]] = {}         # directory -> its files, listing order
        self._lock = threading.Lock()
        self._inflight: dict[tuple[str, int], Future[bytes]] = {}
        self.blocks = BlockCache(cache_dir / "blocks")
        self._pool = ThreadPoolExecutor(6, thread_name_prefix="dgf-readahead")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.blocks.close()
        self.source.close()

    # -- attributes and listings ---------------------------------------------------------

    def stat(self, path: str) -> Stat:
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
        st = self.source.stat(path)
        if self.identified:
            st = self._identified([st])[0]
        self._attrs[path] = (now, st)
        return st

    def opened_whole(self, path: str, size: int) -> None:
        """``path`` was just read whole: its size is ``size`` (an identified original)."""
        self._attrs[path] = (time.monotonic(), dataclasses.replace(self.stat(path), size=size))

    def _identified(self, entries: list[Stat]) -> list[Stat]:
        """An identified mount reads originals: stat gives their sizes, so ``tar`` and ``cp``
        see the size that ``read`` returns (files without identity keep the object's size)."""
        keys = sorted({st.object_key for st in entries if st.object_key and not st.is_dir})
        sizes = self.source.identified_sizes(keys) if keys else {}
        return [dataclasses.replace(st, size=sizes[st.object_key]) if st.object_key in sizes else st
                for st in entries]

    def forget(self, *paths: str, everything: bool = False) -> None:
        """Drop what is cached about ``paths`` and their directories (``everything``: all
        attributes, as after a rename that changes every path below it)."""
        for p in paths:
            self._attrs.pop(p, None)
            self._dirs.pop(p, None)
            self._dirs.pop(os.path.dirname(p) or "/", None)
        if everything:
            self._attrs.clear()

    def names(self, path: str) -> list[str]:
        """The entries of directory ``path``, from the cache while it is fresh."""
        hit = self._dirs.get(path)
        return hit[1] if hit is not None and time.monotonic() - hit[0] < ATTR_TTL else self._list(path)

    def _list(self, path: str) -> list[str]:
        """One round trip gives every entry's attributes; a stat of each then hits the cache."""
        now = time.monotonic()
        entries = self.source.ls(path)
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

    def saved_query_names(self) -> list[str]:
        # A query's owner/name shows as owner:name (a directory name has no '/').
        return sorted(n.replace("/", ":") for n in self.source.saved_queries())

    def query(self, kind: str, q: str) -> list[str]:
        """The files a ``.find/`` or ``.queries/`` directory lists, as percent-encoded paths."""
        return self._query(kind, q)[0]

    def query_lists(self, kind: str, q: str, name: str) -> bool:
        """Whether the ``.find/`` or ``.queries/`` directory lists ``name`` (a set lookup: a
        listing of many results stats each of them)."""
        return name in self._query(kind, q)[1]

    def _query(self, kind: str, q: str) -> tuple[list[str], frozenset[str]]:
        now = time.monotonic()
        cache_key = f"{kind}/{q}"
        hit = self._finds.get(cache_key)
        if hit is not None and now - hit[0] < ATTR_TTL:
            return hit[1], hit[2]
        where = f"{'/' + kind}/{q}"
        try:
            names = [quote(r["path"].lstrip("/"), safe="") for r in self.source.find_iter(
                query_xpath(kind, q), on_warning=lambda w: log.warning("%s: %s", where, w))]
        except errors.UsageError as exc:
            # ls shows only "Invalid argument": the log says what is wrong with the expression.
            log.warning("%s: %s", where, exc)
            raise
        listed = frozenset(names)
        self._finds[cache_key] = (now, names, listed)
        return names, listed

    def sites(self, path: str) -> list[str]:
        return ResolvedFile.all_of(self.source.resolve([path]))[0].sites

    # -- reading --------------------------------------------------------------------------

    def open(self, path: str) -> Reader:
        """A reader of ``path``'s de-identified object; opening a small file of a listed
        directory starts fetching the ones after it."""
        reader = self._resolve(path)
        if reader.size <= BLOCK and self.blocks.get(reader.key, 0) is None:
            self._prefetch_siblings(path)
        return reader

    def _prefetch_siblings(self, path: str) -> None:
        """Reading one small file of a listed directory: fetch the next small files of that
        directory in one batched request per site (readahead across files, for cat dir/*)."""
        files = self._listed.get(os.path.dirname(path) or "/")
        if not files or path not in files:
            return
        start = files.index(path)
        wanted: list[Reader] = []
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

    def _fetch_batch(self, readers: list[Reader], futures: dict[str, Future[bytes]]) -> None:
        """Whole small objects for the block cache, batched per site by the object reader."""

        def done(res: GetResult) -> None:
            fut = futures.get(res.key)
            if res.data is not None:
                self.blocks.put(res.key, 0, res.data)
                with self._lock:
                    self._inflight.pop((res.key, 0), None)
                if fut is not None and not fut.done():
                    fut.set_result(res.data)

        by_key = {r.key: r for r in readers}
        try:
            self.source.reader.read_many(readers, done)
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
            self._resolved[ref.path] = (now, Reader(ref.path, ref.key, ref.size, ref.sites, ref.caps,
                                                    ref.digests, ref.resolved, ref.env))

    def _resolve(self, path: str) -> Reader:
        """A fresh reader for ``path``.  The first file opened in a listed directory resolves
        every file of it in one request: whoever lists and then reads usually reads on (cat
        dir/*, cp -r)."""
        hit = self._resolved.get(path)
        if hit is None or time.monotonic() - hit[0] >= ATTR_TTL:
            listed = self._listed.get(os.path.dirname(path) or "/")
            wanted = listed if listed and path in listed and not self.identified else [path]
            self._remember_resolved(self.source.resolve(wanted))
            hit = self._resolved.get(path)
            if hit is None:
                raise errors.NotFound(f"{path} does not exist.")
        r = hit[1]
        return Reader(r.path, r.key, r.size, list(r.sites), r.caps, r.digests, r.resolved, r.env)  # its own position

    def read(self, r: Reader, size: int, offset: int) -> bytes:
        """``size`` bytes of ``r`` from ``offset``, verified; sequential reading reads ahead."""
        if offset >= r.size:
            return b""
        end = min(offset + size, r.size)
        first, last = offset // BLOCK, (end - 1) // BLOCK
        out = [self._block(r, i) for i in range(first, last + 1)]
        if first == r.last_block + 1 or first == r.last_block:
            for ahead in range(last + 1, min(last + 1 + READAHEAD_BLOCKS, (r.size - 1) // BLOCK + 1)):
                self._prefetch(r, ahead)
        r.last_block = last
        data = b"".join(out)
        start = offset - first * BLOCK
        return data[start:start + (end - offset)]

    def _block(self, r: Reader, idx: int) -> bytes:
        data = self.blocks.get(r.key, idx)
        if data is not None:
            return data
        return self._prefetch(r, idx).result()

    def _prefetch(self, r: Reader, idx: int) -> Future[bytes]:
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

    def _fetch(self, r: Reader, idx: int) -> bytes:
        """One block through the client's object reader (replicas in turn, verified)."""
        try:
            if r.stored > DIGEST_BLOCK and not r.digests:
                # Stored before objects had hash lists: only the whole object can be checked,
                # so it is read whole once and cached block by block.
                data = self.source.reader.read(r)
                for i in range(0, len(data), BLOCK):
                    self.blocks.put(r.key, i // BLOCK, data[i:i + BLOCK])
                return data[idx * BLOCK:(idx + 1) * BLOCK]
            offset = idx * BLOCK
            data = self.source.reader.read(r, offset, min(BLOCK, r.size - offset))
            self.blocks.put(r.key, idx, data)
            return data
        finally:
            with self._lock:
                self._inflight.pop((r.key, idx), None)
