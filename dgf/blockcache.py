"""The mount's block cache: object blocks by (object key, block index), an LRU in memory over a
size-bounded directory on disk.  Objects are content-addressed, so a cached block never goes
stale; it is only evicted.

Blocks come in verified; on disk each carries its SHA-256, checked when it is read back, so a
block damaged there (a crash before it reached the disk, a bad sector) is fetched again rather
than served.  Blocks reach the disk from a writer thread of their own, so a read waits for
neither the write nor its checksum.  The disk is a cache: when it is full or failing, or the
writer is behind, blocks stay in memory and reads go on."""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
from collections import OrderedDict
from pathlib import Path

from dgf.limits import RefusalLog

MEMORY_CACHE = 512 * 1024 * 1024
DISK_CACHE = 4 * 1024 * 1024 * 1024
_SUM = hashlib.sha256().digest_size
#: Blocks waiting for the disk writer; more are kept in memory only.
WRITES_QUEUED = 16
_WARN = RefusalLog(logging.getLogger("dgf.fuse"))


class BlockCache:
    """Blocks by (object key, index): an LRU in memory over a size-bounded directory on disk."""

    def __init__(self, directory: Path, memory_bytes: int = MEMORY_CACHE, disk_bytes: int = DISK_CACHE) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.memory_bytes, self.disk_bytes = memory_bytes, disk_bytes
        self._mem: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._mem_size = 0
        self._disk_size = sum(p.stat().st_size for p in self.dir.glob("*/*") if p.is_file())
        self._lock = threading.Lock()
        self._writes: queue.Queue[tuple[str, int, bytes] | None] = queue.Queue(WRITES_QUEUED)
        self._writer: threading.Thread | None = None

    def _file(self, key: str, idx: int) -> Path:
        return self.dir / key[:2] / f"{key}.{idx}"

    def get(self, key: str, idx: int) -> bytes | None:
        with self._lock:
            data = self._mem.get((key, idx))
            if data is not None:
                self._mem.move_to_end((key, idx))
                return data
        path = self._file(key, idx)
        try:
            stored = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            _WARN("the block cache in %s cannot be read (%s); blocks are fetched again", self.dir, exc.strerror)
            return None
        data = stored[_SUM:]
        if hashlib.sha256(data).digest() != stored[:_SUM]:
            _WARN("the block cache in %s held damaged blocks; they are fetched again", self.dir)
            path.unlink(missing_ok=True)
            return None
        self._remember(key, idx, data)
        return data

    def put(self, key: str, idx: int, data: bytes) -> None:
        """Keep a verified block: in memory now, on disk soon (unless the writer is behind)."""
        self._remember(key, idx, data)
        with self._lock:
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_loop, name="dgf-block-writer", daemon=True)
                self._writer.start()
        try:
            self._writes.put_nowait((key, idx, data))
        except queue.Full:
            pass

    def close(self, wait_s: float = 10.0) -> None:
        """Write what is queued (for at most ``wait_s``), then stop the writer."""
        with self._lock:
            writer, self._writer = self._writer, None
        if writer is not None:
            try:
                self._writes.put(None, timeout=wait_s)
            except queue.Full:
                return                               # a writer stuck on its disk: left behind
            writer.join(wait_s)

    def _write_loop(self) -> None:
        while (item := self._writes.get()) is not None:
            try:
                self._write(*item)
            except OSError as exc:                   # eviction on a failing disk: the writer goes on
                _WARN("the block cache in %s cannot evict blocks (%s)", self.dir, exc.strerror)

    def _write(self, key: str, idx: int, data: bytes) -> None:
        path = self._file(key, idx)
        tmp = path.with_name(f".{path.name}.{threading.get_ident()}")
        try:
            path.parent.mkdir(exist_ok=True)
            tmp.write_bytes(hashlib.sha256(data).digest() + data)
            os.replace(tmp, path)
        except OSError as exc:
            # The disk is a cache: full or failing, the block stays in memory and the read goes on.
            _WARN("the block cache in %s cannot keep blocks (%s); they stay in memory only", self.dir, exc.strerror)
            tmp.unlink(missing_ok=True)
            return
        with self._lock:
            self._disk_size += _SUM + len(data)
            over = self._disk_size > self.disk_bytes
        if over:
            self._evict_disk()

    def _remember(self, key: str, idx: int, data: bytes) -> None:
        with self._lock:
            if (key, idx) in self._mem:
                return
            self._mem[(key, idx)] = data
            self._mem_size += len(data)
            while self._mem_size > self.memory_bytes and self._mem:
                _, old = self._mem.popitem(last=False)
                self._mem_size -= len(old)

    def _evict_disk(self) -> None:
        files = []
        for p in self.dir.glob("*/*"):
            try:
                st = p.stat()
            except OSError:                       # evicted meanwhile by another thread
                continue
            files.append((st.st_atime, st.st_size, p))
        files.sort()
        size = sum(s for _, s, _ in files)
        for _, s, p in files:
            if size <= self.disk_bytes * 0.9:
                break
            p.unlink(missing_ok=True)
            size -= s
        with self._lock:
            self._disk_size = size
