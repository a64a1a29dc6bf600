"""Downloads: one resolve (files, replicas, get capabilities and, for principals allowed to see
it, identity records), pipelined gets from the sites through the one object reader, every byte
verified, re-identification when asked, each file written to a temp name and renamed."""

from __future__ import annotations

import base64
import contextlib
import json
import mmap
import os
import posixpath
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from dgf import errors
from dgf.dicom import identity
from dgf.reader import ObjectRef
from dgf.reports import DownloadReport, Failure, Progress
from dgf.transport import GetResult, Stopped
from dgf.types import ResolvedFile, Site, outermost

if TYPE_CHECKING:
    from dgf.client import Client

#: Paths per down.resolve request (the server's limit list_items is 10,000 by default).
RESOLVE_PATHS = 5000


class AtomicWriter:
    """Writes downloaded files atomically: a temp name in the target's directory, then rename.

    Directories already made are remembered, and the file is written with raw system calls (a
    buffered file adds an fstat, an ioctl and an lseek), so a download of many small files
    costs four system calls per file: open, write, close, rename."""

    def __init__(self) -> None:
        self._dirs: set[str] = set()
        self._lock = threading.Lock()
        self._pid = os.getpid()          # a system call each time it is asked

    def write(self, target: str, data: bytes | None = None, src: Path | None = None) -> None:
        parent = os.path.dirname(target)
        if parent not in self._dirs:
            os.makedirs(parent, exist_ok=True)
            with self._lock:
                self._dirs.add(parent)
        if src is not None:
            os.replace(src, target)
            return
        tmp = f"{target}.{self._pid}.{threading.get_ident()}.part"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            try:
                view = memoryview(data or b"")
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class Downloads:
    """The download side of one client."""

    def __init__(self, client: Client) -> None:
        self.client = client


    def resolve(self, paths: list[str], identified: bool = False, xpath: str | None = None) -> dict[str, Any]:
        """Files under ``paths`` (with ``xpath``, those whose header matches it, found by the
        metaserver) with replicas, hash lists, capabilities (and identities when asked),
        gathered over as many requests and pages as the server's limits call for."""
        resolved: dict[str, Any] = {"files": [], "blocks": {}, "sites": [], "caps": {}}
        if identified:
            resolved["identities"] = {}
        caps: dict[str, list[str]] = {}
        # An XPath runs under one root per request; plain paths go RESOLVE_PATHS at a time.
        step = 1 if xpath is not None else RESOLVE_PATHS
        for i in range(0, max(1, len(paths)), step):
            offset: int | None = 0
            while offset is not None:
                ask: dict[str, Any] = {"xpath": xpath} if xpath is not None else {}
                _, body = self.client.meta.call("down.resolve", paths=paths[i:i + step],
                                                identified=identified, offset=offset, **ask)
                page = json.loads(body)
                resolved["files"].extend(page["files"])
                resolved["blocks"].update(page.get("blocks") or {})
                resolved.setdefault("seals", {}).update(page.get("seals") or {})
                resolved.setdefault("study_keys", {}).update(page.get("study_keys") or {})
                resolved["sites"].extend(page["sites"])
                for site, cap in page["caps"].items():
                    caps.setdefault(site, []).append(cap)
                if identified:
                    resolved["identities"].update(page.get("identities") or {})
                offset = page.get("next")
        # One capability per site and page, presented together (SiteLink splits them).
        resolved["caps"] = {site: " ".join(tokens) for site, tokens in caps.items()}
        self.client._learn_sites(Site.from_wire(s) for s in resolved["sites"])
        return resolved

    def download(self, paths: list[str], out_dir: str | os.PathLike[str], identified: bool = False,
                 xpath: str | None = None, progress: Progress | None = None,
                 on_total: Progress | None = None) -> DownloadReport:
        """Fetch files (directories recursively) into ``out_dir``, mirroring names like ``cp -r``;
        with ``xpath``, the files under ``paths`` whose header matches, at their full paths."""
        out = Path(out_dir)
        report = DownloadReport()
        base_dir = os.path.abspath(out)
        if xpath is not None:
            resolved = self.resolve(outermost(paths or ["/"]), identified, xpath)
            files = ResolvedFile.all_of(resolved)
            if not files:
                return report
            local = {f.path: base_dir + f.path for f in files}
        else:
            resolved = self.resolve(paths, identified)
            files = ResolvedFile.all_of(resolved)
            local = {}
            # Like cp -r: a requested path lands in out/ under its own name.
            cuts = []
            for p in paths:
                p = p.rstrip("/") or "/"
                parent = posixpath.dirname(p)
                cuts.append((p, 0 if parent == "/" else len(parent)))
            for f in files:
                cut = max((c for c in cuts if f.path == c[0] or f.path.startswith(c[0].rstrip("/") + "/")),
                          key=lambda c: len(c[0]))[1]
                local[f.path] = base_dir + f.path[cut:]
        writer = AtomicWriter()
        if on_total is not None:
            on_total(sum(f.size for f in files))

        def sink(paths: list[str], data: bytes | None, src: Path | None) -> None:
            for i, path in enumerate(paths):
                if src is not None and i == len(paths) - 1:
                    writer.write(local[path], src=src)
                elif src is not None:
                    writer.write(local[path], src.read_bytes())
                else:
                    writer.write(local[path], data)
            report.files.extend(Path(local[p]) for p in paths)

        # Large objects stream to a spool inside the output directory: the rename that
        # publishes each one stays on one file system.
        spool = Path(base_dir) / ".dgf-partial"
        try:
            self._fetch(resolved, sink, identified, report, progress, spool)
        finally:
            shutil.rmtree(spool, ignore_errors=True)
        return report

    def fetch(self, paths: list[str], on_file: Callable[[str, bytes], None], identified: bool = False,
              progress: Progress | None = None) -> DownloadReport:
        """Fetch files (directories recursively) and hand each one's verified bytes to
        ``on_file(path, data)`` instead of writing them; called from transfer threads."""

        def as_bytes(path: str, data: bytes | BinaryIO) -> None:
            if not isinstance(data, bytes):
                with data:
                    data = data.read()
            on_file(path, data)

        return self.fetch_streams(paths, as_bytes, identified, progress)

    def fetch_streams(self, paths: list[str], on_file: Callable[[str, bytes | BinaryIO], None],
                      identified: bool = False, progress: Progress | None = None,
                      stop: threading.Event | None = None) -> DownloadReport:
        """:meth:`fetch`, but an object past the streaming threshold comes as an open file
        (spooled, verified, already unlinked; ``on_file`` must close it) instead of bytes, so a
        2 GB instance costs the caller disk, not memory.  Once ``stop`` is set (the consumer
        went away) nothing more is asked of the sites, and what was delivered is reported."""
        report = DownloadReport()

        def sink(targets: list[str], data: bytes | None, src: Path | None) -> None:
            if data is not None or src is None:
                for t in targets:
                    on_file(t, data or b"")
                return
            try:
                handles = [open(src, "rb") for _ in targets]       # one position each
            finally:
                src.unlink(missing_ok=True)
            for t, handle in zip(targets, handles):
                on_file(t, handle)

        with contextlib.suppress(Stopped):
            self._fetch(self.resolve(paths, identified), sink, identified, report, progress, stop=stop)
        return report

    def _fetch(self, resolved: dict[str, Any], sink: Callable[[list[str], bytes | None, Path | None], None],
               identified: bool, report: DownloadReport, progress: Progress | None,
               spool: Path | None = None, stop: threading.Event | None = None) -> None:
        """Get every resolved object once through the object reader (replicas in turn, every
        byte verified), re-identify it if asked, and hand it to ``sink(paths, data,
        spooled_file)``; failures go to ``report``."""
        refs = ObjectRef.all_of(resolved)
        targets: dict[str, list[str]] = {}
        sizes: dict[str, int] = {}
        for r in refs:
            targets.setdefault(r.key, []).append(r.path)
            sizes[r.key] = r.size
        identities = resolved.get("identities", {})
        lock = threading.Lock()

        def deliver(res: GetResult) -> None:
            data, src = res.data, res.path
            try:
                if identified:
                    blob = identities.get(res.key)
                    if blob is None:
                        raise errors.NotFound("no identity is held for this file (erased or uploaded without).")
                    record = identity.decode(base64.b64decode(blob))
                    if data is None and src is not None:
                        restored = src.with_suffix(".original")
                        try:
                            identity.reidentify_file(str(src), record, str(restored))
                        finally:
                            src.unlink(missing_ok=True)
                        src = restored
                    else:
                        data = identity.restore(data or b"", record)
                sink(targets[res.key], data, src)
            except errors.DgfError as exc:
                with lock:
                    report.failed.extend(Failure.of(p, exc) for p in targets[res.key])
                return
            except OSError as exc:
                with lock:
                    report.failed.extend(Failure(p, f"cannot be written ({exc.strerror})", 1,
                                                 f"cannot be written ({exc.strerror})") for p in targets[res.key])
                return
            n = sizes[res.key] * len(targets[res.key])
            with lock:
                report.downloaded += len(targets[res.key])
                report.bytes += n
            if progress is not None:
                progress(n)

        left = self.client.reader.read_many(refs, deliver, spool or Path(tempfile.gettempdir()) / "dgf-spool", stop)
        for key, reason in left.items():
            report.failed.extend(Failure(p, reason) for p in targets[key])

    def read_file(self, path: str, identified: bool = False) -> bytes:
        """The whole content of one file (re-identified if asked and allowed), verified."""
        resolved = self.resolve([path], identified)
        refs = ObjectRef.all_of(resolved)
        if not refs:
            raise errors.NotFound(f"{path} does not exist.")
        data = self.client.reader.read(refs[0])
        if identified:
            blob = resolved.get("identities", {}).get(refs[0].key)
            if blob is None:
                raise errors.NotFound(f"no identity is held for {path}.")
            return identity.restore(data, identity.decode(base64.b64decode(blob)))
        return data

    def _identified_one(self, path: str, missing: type[errors.DgfError] = errors.NoAttribute
                        ) -> tuple[dict[str, Any], dict[str, Any]]:
        """``path`` resolved for identity (an audited release) and its identity record; a file
        without one is ``missing`` (an attribute that is not there, or a file to open that is
        not: as ``read_file`` says)."""
        resolved = self.resolve([path], identified=True)
        files = ResolvedFile.all_of(resolved)
        if not files:
            raise errors.NotFound(f"{path} does not exist.")
        blob = resolved.get("identities", {}).get(files[0].key)
        if blob is None:
            raise missing(f"no identity is held for {path}.")
        return resolved, identity.decode(base64.b64decode(blob))

    def _object(self, resolved: dict[str, Any], path: str, spool: Path) -> GetResult:
        """The one resolved object, verified: in memory, or past the streaming threshold a file
        in ``spool``."""
        got: list[GetResult] = []
        left = self.client.reader.read_many(ObjectRef.all_of(resolved)[:1], got.append, spool)
        if not got:
            raise errors.IntegrityError(f"{path} could not be read: {next(iter(left.values()), 'no replica answered')}")
        return got[0]

    def read_original(self, path: str, spool: Path) -> bytes | BinaryIO:
        """The exact original of one file (clinicians; the release is audited), verified: in
        memory, or for an object past the streaming threshold an open file rebuilt in a fresh
        directory under ``spool`` and unlinked at once (closing it frees the space), so a
        2 GB multi-frame costs the caller disk, not memory."""
        resolved, record = self._identified_one(path, errors.NotFound)
        spool.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix="dgf-original-", dir=spool)
        try:
            got = self._object(resolved, path, Path(tmp))
            if got.path is None:
                return identity.restore(got.data or b"", record)
            original = os.path.join(tmp, "original")
            identity.reidentify_file(str(got.path), record, original)
            return open(original, "rb")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def identity_summary(self, path: str) -> dict[str, Any]:
        """What de-identification removed from one file (clinicians; the release is audited).
        An object past the streaming threshold is rebuilt on disk and read through a map, so
        the summary of a 2 GB multi-frame costs no more memory than that of a small file."""
        resolved, record = self._identified_one(path)
        if record.get("derived_from"):
            raise errors.NoAttribute(f"{path} is derived data; it carries the identity of the object "
                                     f"it was computed from ({record['derived_from'][:12]}...).")
        with tempfile.TemporaryDirectory(prefix="dgf-identity-") as tmp:
            got = self._object(resolved, path, Path(tmp))
            if got.path is None:
                return identity.summary(record, identity.reidentify(got.data or b"", record))
            original = os.path.join(tmp, "original")
            digest = identity.reidentify_file(str(got.path), record, original, whole=True)
            os.unlink(got.path)
            with open(original, "rb") as fh:
                mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            try:
                return identity.summary(record, mapped, original_sha256=digest)
            finally:
                try:
                    mapped.close()
                except BufferError:
                    pass            # a view of the parse is still alive; the map goes with it

