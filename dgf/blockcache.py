"""The mount's block cache: object blocks by (object key, block index), an LRU in memory over a
size-bounded directory on disk.  Objects are content-addressed, so a cached block never goes
stale; it is only evicted."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

MEMORY_CACHE = 512 * 1024 * 1024
DISK_CACHE = 4 * 1024 * 1024 * 1024


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

    def _file(self, key: str, idx: int) -> Path:
        return self.dir / key[:2] / f"{key}.{idx}"

    def get(self, key: str, idx: int) -> bytes | None:
        with self._lock:
            data = self._mem.get((key, idx))
            if data is not None:
                self._mem.move_to_end((key, idx))
                return data
        try:
            data = self._file(key, idx).read_bytes()
        except FileNotFoundError:
            return None
        self._remember(key, idx, data)
        return data

    def put(self, key: str, idx: int, data: bytes) -> None:
        self._remember(key, idx, data)
        path = self._file(key, idx)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{path.name}.{threading.get_ident()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        with self._lock:
            self._disk_size += len(data)
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
        files = sorted((p.stat().st_atime, p.stat().st_size, p) for p in self.dir.glob("*/*") if p.is_file())
        size = sum(s for _, s, _ in files)
        for _, s, p in files:
            if size <= self.disk_bytes * 0.9:
                break
            p.unlink(missing_ok=True)
            size -= s
        with self._lock:
            self._disk_size = size
