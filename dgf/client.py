"""``Client``: the Python API that does the work; the CLI and the FUSE layer are thin shells.

Upload, per batch: read and analyze every file (local CPU), ask the metaserver once for the
batch's pseudonyms and put capabilities, de-identify and build the XML headers, stream the objects
to their sites (pipelined, sites in parallel), then publish everything in one commit carrying the
sites' receipts.  Nothing becomes visible before its object is durable and its metadata committed;
re-running an interrupted upload produces the same pseudonymous paths and object keys, so it
completes without duplicates.

Download: one resolve (files, replicas, get capabilities and, for principals allowed to see it,
identity records), pipelined gets from the sites, checksum verified, re-identification when
asked, each file written to a temp name and renamed.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import posixpath
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dgf import crypto, errors, placement
from dgf.config import ClientConfig
from dgf.dicom import identity
from dgf.dicom.profile import Options
from dgf.integrity import block_digests
from dgf.reader import ObjectReader, ObjectRef
from dgf.transport import GetResult, MetaLink, PutItem, SiteLink, run_parallel
from dgf.types import Site, Stat

if TYPE_CHECKING:
    from dgf.dicom import pipeline

log = logging.getLogger("dgf.client")

HEADER_XATTR = "user.dgf.dicom"
BATCH = 200
#: The metaserver's longest query (seconds); the client waits that long for a query's reply.
QUERY_LIMIT_S = 300.0
#: A batch's commit is split so that no commit frame exceeds this many bytes (the server's
#: limit commit_bytes is 64 MiB by default).
COMMIT_BYTES = 32 * 1024 * 1024
#: Seconds a site may compute one partial reconstruction before it is named as hung.
RECON_WAIT_S = 3600.0
#: Seconds a site that could not be reached is reported as such without trying again (a hung
#: site costs one handshake deadline, not one per block a reader asks for).
UNREACHABLE_S = 5.0
#: Paths per down.resolve request (the server's limit list_items is 10,000 by default).
RESOLVE_PATHS = 5000
#: Uploads of at least this many files de-identify in worker processes, one per core.
POOL_MIN_FILES = 400
POOL_WORKERS = max(1, min(4, os.cpu_count() or 1))
Progress = Callable[[int], None]


class _Meter:
    """Progress in source bytes, safe from any thread: each file counts once in full, whether
    its bytes were sent in pieces, it was skipped, or it failed (so a bar never goes back or
    past its total)."""

    def __init__(self, progress: Progress | None, sizes: dict[str, int] | None = None) -> None:
        self._progress = progress
        self._sizes = sizes or {}
        self._done: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, source: str, n: int) -> None:
        if self._progress is None:
            return
        with self._lock:
            done = self._done.get(source, 0)
            n = min(n, self._sizes.get(source, 0) - done)
            if n <= 0:
                return
            self._done[source] = done + n
            self._progress(n)

    def finish(self, sources: Iterable[str]) -> None:
        for source in sources:
            self.add(source, self._sizes.get(source, 0))

    def metered(self, source: str, pieces: Callable[[int], Iterator[bytes | memoryview]]
                ) -> Callable[[int], Iterator[bytes | memoryview]]:
        def stream(chunk: int) -> Iterator[bytes | memoryview]:
            for piece in pieces(chunk):
                yield piece
                self.add(source, len(piece))
        return stream


@dataclass
class Failure:
    item: str
    reason: str
    #: The exit status this failure calls for (that of its error class), and its summary
    #: fields: the kind of failure, what varies between files, and what to do.
    code: int = errors.InvalidDicom.exit_code
    group: str = ""
    detail: str = ""
    hint: str = ""

    @classmethod
    def of(cls, item: str, problem: pipeline.Problem | errors.DgfError) -> Failure:
        if isinstance(problem, errors.DgfError):
            from dgf.dicom import pipeline

            problem = pipeline.Problem.of(problem)
        return cls(item, problem.message, problem.code, problem.group, problem.detail, problem.hint)


@dataclass
class UploadReport:
    uploaded: int = 0
    bytes: int = 0
    #: Files whose object the archive already held (verified replica), at their path or, for
    #: the same instance, at another path: nothing was sent for them.
    already: int = 0
    paths: list[str] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)
    warnings: list[Failure] = field(default_factory=list)
    #: Each source in the archive (sent now or held already): its path and its de-identified
    #: study, series and SOP instance UIDs.
    stored: dict[str, tuple[str, str, str, str]] = field(default_factory=dict)


@dataclass
class DownloadReport:
    downloaded: int = 0
    bytes: int = 0
    files: list[Path] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)


@dataclass
class _Prepared:
    source: str
    result: pipeline.Deidentified
    path: str
    site: str
    receipt: str = ""
    linked: bool = False  # published as another name of an object already stored
    pinned: bool = False  # the uploader named the site: a copy elsewhere does not count
    derived: bool = False
    derived_from: str | None = None  # the object a derived file inherits its identity from
    xattrs: dict[str, str] = field(default_factory=dict)
    copies: list[str] = field(default_factory=list)            # further sites (replication)
    copy_receipts: dict[str, str] = field(default_factory=dict)
    #: Placed on an untrusted site: sealed under its study's key (dgf/envelope.py).  ``seal``
    #: is what the metaserver is shown, ``plain_size`` the plaintext's size.
    sealing: bool = False
    seal: dict[str, Any] | None = None
    plain_size: int = 0

    @property
    def placed(self) -> tuple[str, str, str, str]:
        r = self.result
        return self.path, r.study_uid, r.series_uid, r.sop_uid

    @property
    def size(self) -> int:
        """The file's size as readers see it (the plaintext's, for a sealed object)."""
        return self.plain_size if self.seal is not None else self.result.size

    @property
    def durable(self) -> bool:
        """Every copy stored (the object may be published)."""
        return bool(self.receipt) and all(s in self.copy_receipts for s in self.copies)


@dataclass
class _Copy:
    """One copy of a prepared file on its way to one site."""

    file: _Prepared
    site: str


class _Writer:
    """Writes downloaded files atomically: a temp name in the target's directory, then rename.

    Directories already made are remembered, so a download of many small files costs about
    three system calls per file."""

    def __init__(self) -> None:
        self._dirs: set[str] = set()
        self._lock = threading.Lock()

    def write(self, target: str, data: bytes | None = None, src: Path | None = None) -> None:
        parent = os.path.dirname(target)
        if parent not in self._dirs:
            os.makedirs(parent, exist_ok=True)
            with self._lock:
                self._dirs.add(parent)
        if src is not None:
            os.replace(src, target)
            return
        tmp = f"{target}.{os.getpid()}.{threading.get_ident()}.part"
        try:
            with open(tmp, "xb") as fh:
                fh.write(data or b"")
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _commit_parts(entries: list[tuple[_Prepared, bytes]]) -> Iterator[list[tuple[_Prepared, bytes]]]:
    """Encoded commit entries grouped so that no commit exceeds COMMIT_BYTES."""
    part: list[tuple[_Prepared, bytes]] = []
    size = 0
    for entry in entries:
        if part and size + len(entry[1]) > COMMIT_BYTES:
            yield part
            part, size = [], 0
        part.append(entry)
        size += len(entry[1]) + 1
    if part:
        yield part


def _header_patient(xml: bytes) -> str:
    """The Patient ID an XML header names (a derived file keeps its source's pseudonym)."""
    from lxml import etree

    found = etree.fromstring(xml).find("PatientID")
    return (found.text or "") if found is not None else ""


@dataclass
class ReconResult:
    volume: Any  # numpy float32 [z, y, x]
    geometry: Any
    paths: list[str]
    seconds: float
    sites: list[str]


class Client:
    """A connection to one dgf federation as one principal.

    Parameters
    ----------
    config
        A :class:`ClientConfig`, a config file path, or None for ``$DGF_CONFIG``.
    options
        De-identification options for uploads (defaults: :class:`Options`).
    """

    def __init__(self, config: ClientConfig | str | os.PathLike[str] | None = None,
                 options: Options | None = None) -> None:
        self.config = config if isinstance(config, ClientConfig) else ClientConfig.load(config)
        #: What the caller asked for; the archive's policy decides (see upload_options).
        self.requested = options
        self._archive_options: Options | None = None
        self._key = crypto.load_paramiko_key(self.config.key)
        self.meta = MetaLink(self.config.metaserver, self._key, self.config.metaserver_host_key,
                             read_timeout=self.config.timeout)
        self._links: dict[str, SiteLink] = {}
        #: Every object read (download, read_file, the mount) goes through this one reader.
        self.reader = ObjectReader(self)
        self._site_info: dict[str, Site] = {}
        self._unreachable: dict[str, tuple[float, errors.TransportError]] = {}
        self._lock = threading.Lock()

    def upload_options(self) -> Options:
        """The archive's de-identification options (set by an admin, fetched once), with this
        client's per-upload burned-in acknowledgement.  Asking for other options is refused:
        they are the archive's policy, not each uploader's."""
        if self._archive_options is None:
            names = list(self.meta.call("deid.options")[0]["options"])
            wanted = self.requested
            archive = Options.archive(names, allow_burned_in=bool(wanted and wanted.allow_burned_in),
                                      allow_truncated=bool(wanted and wanted.allow_truncated))
            if wanted is not None and wanted.enabled() != archive.enabled() and wanted != Options(
                    allow_burned_in=wanted.allow_burned_in, allow_truncated=wanted.allow_truncated):
                raise errors.UsageError(
                    f"de-identification options are set per archive ({', '.join(names) or 'basic profile only'}); "
                    "an admin changes them with 'dgf admin deid set'.")
            self._archive_options = archive
        return self._archive_options

    def close(self) -> None:
        self.reader.close()
        for link in self._links.values():
            link.close()
        self.meta.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sites ----------------------------------------------------------------------------

    def whoami(self) -> dict[str, str]:
        return self.meta.call("whoami")[0]

    def check_principal(self) -> str | None:
        """A sentence when the config's ``principal`` is not the name its key is enrolled
        under (the key decides who acts; a config saying otherwise misleads its reader)."""
        me = self.whoami()
        if me.get("name") == self.config.principal:
            return None
        return (f"config file {self.config.path} names principal {self.config.principal!r}, but its key "
                f"{self.config.key} is enrolled as {me.get('name')!r} (role {me.get('role')}); "
                f"acting as {me.get('name')!r}.")

    def sites(self) -> list[Site]:
        sites = [Site.from_wire(s) for s in self.meta.call("site.list")[0]["sites"]]
        self._learn_sites(sites)
        return sites

    def _learn_sites(self, sites: Iterable[Site]) -> None:
        with self._lock:
            for s in sites:
                old = self._site_info.get(s.name)
                if old is not None and old != s and s.name in self._links:
                    self._links.pop(s.name).close()  # the site moved or restarted elsewhere
                self._site_info[s.name] = s

    def site_link(self, name: str) -> SiteLink:
        with self._lock:
            link = self._links.get(name)
            if link is not None and link.conn.transport.is_active():
                return link
            site = self._site_info.get(name)
        if site is None:
            self.sites()
            site = self._site_info.get(name)
            if site is None:
                raise errors.NotFound(f"site {name!r} is not registered at the metaserver.")
        failed = self._unreachable.get(name)
        if failed is not None and time.monotonic() - failed[0] < UNREACHABLE_S:
            raise failed[1]                  # a site that just failed to answer fails fast
        try:
            link = SiteLink(site, self._key, read_timeout=self.config.timeout)
        except errors.TransportError as exc:
            self._unreachable[name] = (time.monotonic(), exc)
            raise
        self._unreachable.pop(name, None)
        with self._lock:
            self._links[name] = link
        return link

    def _drop_link(self, name: str, why: errors.DgfError | None = None) -> None:
        """Forget the link to a site after a failure; a transport failure (the site died or
        hangs) also marks the site unreachable for a while, so copies are placed elsewhere."""
        with self._lock:
            link = self._links.pop(name, None)
            if isinstance(why, errors.TransportError):
                self._unreachable[name] = (time.monotonic(), why)
        if link is not None:
            link.close()

    # -- namespace ------------------------------------------------------------------------

    def stat(self, path: str) -> Stat:
        return Stat.from_wire(self.meta.call("ns.stat", path=path)[0])

    def ls(self, path: str = "/") -> list[Stat]:
        return [Stat.from_wire(d) for d in json.loads(self.meta.call("ns.readdir", path=path)[1])]

    def identified_sizes(self, keys: list[str]) -> dict[str, int]:
        """Object key -> size of its identified original (principals who may see identity)."""
        out: dict[str, int] = {}
        for i in range(0, len(keys), 5000):
            out.update(self.meta.call("identity.sizes", keys=keys[i:i + 5000])[0]["sizes"])
        return out

    def mkdir(self, path: str, parents: bool = False, mode: int = 0o755) -> Stat:
        return Stat.from_wire(self.meta.call("ns.mkdir", path=path, parents=parents, mode=mode)[0])

    def mv(self, src: str, dst: str) -> None:
        result, _ = self.meta.call("ns.rename", src=src, dst=dst)
        self._free(result.get("release") or {})

    def rm(self, path: str, recursive: bool = False) -> int:
        """Remove a file (or, with ``recursive``, a tree); return the number of files removed."""
        st = self.stat(path)
        if not st.is_dir:
            result, _ = self.meta.call("ns.unlink", path=path)
            self._free(result.get("release") or {})
            return 1
        if not recursive:
            raise errors.IsADirectory(f"{path} is a directory; use -r to remove it and its contents.")
        result, _ = self.meta.call("ns.rmtree", path=path)       # one transaction on the server
        self._free(result.get("release") or {})
        return int(result["files"])

    def rmdir(self, path: str) -> None:
        self.meta.call("ns.rmdir", path=path)

    def chmod(self, path: str, mode: int) -> None:
        self.meta.call("ns.chmod", path=path, mode=mode)

    def _free(self, release: dict[str, Any]) -> None:
        """Delete released objects at their sites; failures only leave garbage, never data loss."""
        for site, grant in release.items():
            try:
                link = self.site_link(site)
                for key in grant["keys"]:
                    link.call("delete", grant["cap"], key=key)
            except errors.DgfError as exc:
                log.warning("could not free released objects at site %s: %s", site, exc)

    # -- xattrs ---------------------------------------------------------------------------

    def getxattr(self, path: str, name: str) -> bytes:
        return self.meta.call("xattr.get", path=path, name=name)[1]

    def listxattr(self, path: str) -> list[str]:
        return list(self.meta.call("xattr.list", path=path)[0]["names"])

    def setxattr(self, path: str, name: str, value: bytes) -> None:
        self.meta.call("xattr.set", value, path=path, name=name)

    def removexattr(self, path: str, name: str) -> None:
        self.meta.call("xattr.remove", path=path, name=name)

    # -- query ----------------------------------------------------------------------------

    def find(self, xpath: str, root: str = "/", show: Iterable[str] = (), limit: int = 0,
             timeout: float = 0.0, level: str = "instance",
             on_warning: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
        """Files under ``root`` whose XML header matches ``xpath`` (XPath 1.0, or @NAME)."""
        return list(self.find_iter(xpath, root, show, limit, timeout, level, on_warning))

    def find_iter(self, xpath: str, root: str = "/", show: Iterable[str] = (), limit: int = 0,
                  timeout: float = 0.0, level: str = "instance",
                  on_warning: Callable[[str], None] | None = None) -> Iterator[dict[str, Any]]:
        """Stream the matches page by page (results larger than memory never gather anywhere).

        Each row: ``path`` (or, with ``level``, the group's UID, ``files`` and ``path``),
        ``values`` (text, multi-values joined by backslashes) and ``vr`` (each present value's
        VR).  What the server noticed about the expression (a name that is no DICOM keyword, an
        ISO date read as a DICOM date) goes to ``on_warning``, else to this module's log."""
        result, body = self.meta.call("find", wait_s=self._query_wait(timeout), xpath=xpath, root=root,
                                      show=list(show), limit=limit, timeout=timeout, level=level)
        for w in result.get("warnings") or []:
            (on_warning or log.warning)(str(w))
        cursor = result.get("cursor")
        try:
            while True:
                for line in body.splitlines():
                    if line:
                        yield json.loads(line)
                if not cursor:
                    return
                result, body = self.meta.call("find.next", wait_s=self._query_wait(timeout), cursor=cursor)
                cursor = result.get("cursor")
        finally:
            if cursor:                       # stopped early: free the server's cursor
                try:
                    self.meta.call("find.close", cursor=cursor)
                except errors.DgfError:
                    pass

    def find_count(self, xpath: str, root: str = "/", timeout: float = 0.0, level: str = "instance",
                   on_warning: Callable[[str], None] | None = None) -> int:
        """How many files match (or, with ``level``, how many patients, studies or series)."""
        result, _ = self.meta.call("find", wait_s=self._query_wait(timeout), xpath=xpath, root=root,
                                   timeout=timeout, count=True, level=level)
        for w in result.get("warnings") or []:
            (on_warning or log.warning)(str(w))
        return int(result["count"])

    def _query_wait(self, timeout: float) -> float:
        """How long to wait for a query's reply: its own time limit (the server's is 300 s), plus
        the usual read deadline; a query is the one verb that may compute that long."""
        return (timeout if timeout > 0 else QUERY_LIMIT_S) + self.config.timeout

    def explain(self, xpath: str, root: str = "/") -> dict[str, Any]:
        """How the metadata server would answer ``xpath``: which predicates use the index."""
        result, _ = self.meta.call("find", xpath=xpath, root=root, explain=True)
        return {**result["explain"], "warnings": list(result.get("warnings") or [])}

    def save_query(self, name: str, xpath: str) -> str:
        """Save ``xpath`` as this principal's query ``name``; returns the full name
        (``principal/name``, or a shared bare name when an admin saves it)."""
        return str(self.meta.call("query.save", name=name, xpath=xpath)[0].get("name", name))

    def saved_queries(self) -> dict[str, str]:
        result, _ = self.meta.call("query.list")
        return dict(result["queries"])

    def remove_query(self, name: str) -> str:
        return str(self.meta.call("query.remove", name=name)[0].get("name", name))

    # -- upload ---------------------------------------------------------------------------

    def upload(self, paths: Iterable[str | os.PathLike[str]], to: str | None = None,
               site: str | None = None, recursive: bool = False, progress: Progress | None = None,
               batch: int = BATCH, replace: bool = False, spread: bool = False,
               on_total: Progress | None = None) -> UploadReport:
        """De-identify and upload files (directories with ``recursive``).

        Files that cannot be read or are not valid DICOM are reported in the result's ``failed``
        list with the reason, and the others still go in.  ``on_total`` learns the number of
        bytes once the files are listed, ``progress`` the bytes done as they are sent, skipped
        or refused.
        """
        report = UploadReport()
        files = list(self._expand(paths, recursive, report))
        sizes = {}
        for f in files:
            try:
                sizes[str(f)] = f.stat().st_size
            except OSError:
                sizes[str(f)] = 0
        if on_total is not None:
            on_total(sum(sizes.values()))
        meter = _Meter(progress, sizes)
        # De-identification is CPU work: large uploads spread it over worker processes (started
        # fresh, not forked, since this process runs SSH threads).  And two stages overlap: while
        # batch N is streamed to the sites and committed, batch N+1 is read and de-identified.
        from dgf.dicom import pipeline  # de-identification: pydicom's dictionary, loaded for uploads only

        workers = None
        if len(files) >= POOL_MIN_FILES and POOL_WORKERS > 1:
            workers = pipeline.Workers(POOL_WORKERS)
        try:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dgf-store") as store:
                pending: Future[None] | None = None
                for i in range(0, len(files), batch):
                    chunk = files[i:i + batch]
                    # Files are read where they are de-identified (a worker, or here).
                    items: list[tuple[str, bytes | None]] = [(str(f), None) for f in chunk]
                    prepared, caps = self._prepare(items, to, site, report, pool=workers, spread=spread)
                    if pending is not None:
                        pending.result()
                    pending = store.submit(self._store, prepared, caps, report, replace, meter,
                                           [str(f) for f in chunk])
                if pending is not None:
                    pending.result()
        finally:
            if workers is not None:
                workers.close()
        return report

    @staticmethod
    def _expand(paths: Iterable[str | os.PathLike[str]], recursive: bool,
                report: UploadReport) -> Iterator[Path]:
        for p in map(Path, paths):
            if p.is_dir():
                if not recursive:
                    report.failed.append(Failure(str(p), "is a directory; use -r to upload its files",
                                                 errors.UsageError.exit_code))
                    continue
                for root, dirs, names in os.walk(p):
                    dirs.sort()
                    for name in sorted(names):
                        if not name.startswith("."):
                            yield Path(root) / name
            elif p.exists():
                yield p
            else:
                report.failed.append(Failure(str(p), "no such file", errors.NotFound.exit_code))

    def upload_bytes(self, data: bytes, path: str, site: str | None = None, replace: bool = True) -> None:
        """De-identify one file's bytes and publish it at ``path`` (the FUSE write path)."""
        report = UploadReport()
        prepared, caps = self._prepare([(path, data)], None, site, report, fixed_path=True)
        self._store(prepared, caps, report, replace, check=False)
        if report.failed:
            failure = report.failed[0]
            # The kind survives: a policy refusal is EPERM at the mount, a site failure EIO.
            kind = {errors.PolicyRefused.exit_code: errors.PolicyRefused,
                    errors.TransportError.exit_code: errors.TransportError,
                    errors.ServerError.exit_code: errors.ServerError}.get(failure.code, errors.InvalidDicom)
            raise kind(failure.reason, group=failure.group, detail=failure.detail, hint=failure.hint)

    def _prepare(self, items: list[tuple[str, bytes | None]], to: str | None, site: str | None,
                 report: UploadReport, fixed_path: bool = False,
                 pool: pipeline.Workers | None = None, options: Options | None = None,
                 spread: bool = False) -> tuple[list[_Prepared], dict[str, str]]:
        """Analyze, fetch the batch's pseudonyms in one round trip, de-identify, build XML.

        Files go to ``site``, or to a site chosen by their series (``spread``: by instance, so
        one series lands on every site)."""
        options = options or self.upload_options()
        needs = [n for part in self._map(pool, "analyze", items, options) for n in part]
        ok = [n for n in needs if n.error is None]
        report.failed.extend(Failure.of(n.name, n.error) for n in needs if n.error is not None)
        if not ok:
            return [], {}
        uids = sorted(set().union(*(n.uids for n in ok)))
        patients = sorted({n.patient_key for n in ok})
        prep, _ = self.meta.call("up.prepare", uids=uids, patients=patients)
        known = [Site.from_wire(s) for s in prep["sites"]]
        sites = sorted(s.name for s in known)
        zones = {s.name: s.zone for s in known}
        self._learn_sites(known)
        if site is not None and site not in sites:
            raise errors.UsageError(f"site {site!r} is not registered; known sites: {', '.join(sites)}.")
        replication = prep.get("replication") or {"default": 1, "overrides": {}}
        background = replication.get("mode") == "async"
        now = time.monotonic()
        # Sites that just failed to answer are passed over while enough others are left.
        live = [s for s in sites if now - self._unreachable.get(s, (-UNREACHABLE_S, None))[0] >= UNREACHABLE_S]
        untrusted = {st.name: st.untrusted for st in known}
        good = {n.name for n in ok}
        todo = [(name, data) for name, data in items if name in good]
        pseudo_patients = {k: (v[0], v[1]) for k, v in prep["patients"].items()}
        prepared: list[_Prepared] = []
        spool = pool.spool if pool is not None else ""
        for part in self._map(pool, "deidentify", todo, options, prep["uids"], pseudo_patients, spool):
            for d in part:
                if d.error is not None:
                    report.failed.append(Failure.of(d.name, d.error))
                    continue
                if d.spooled:
                    with open(d.spooled, "rb") as fh:
                        d = dataclasses.replace(d, data=fh.read(), spooled="")
                    os.unlink(fh.name)
                report.warnings.extend(Failure(d.name, w) for w in d.warnings)
                target = d.name if fixed_path else self._placement(d, to)
                basis = (d.sop_uid if spread else d.series_uid) or d.key
                n = placement.factor(target, replication["default"], replication["overrides"])
                if n > len(sites):
                    report.failed.append(Failure(
                        d.name, f"{posixpath.dirname(target)} keeps {n} copies but only {len(sites)} "
                                f"site(s) are registered", errors.ServerError.exit_code,
                        "more copies wanted than there are sites", hint="add a site, or lower "
                        "'dgf admin replicas set' for that directory"))
                    continue
                if background:
                    n = 1        # one durable copy publishes the file; the sites make the others
                chosen = placement.choose(basis, live if len(live) >= n and (site is None or site in live)
                                          else sites, n, first=site, zones=zones)
                prepared.append(_Prepared(d.name, d, target, chosen[0], derived=options.derived,
                                          pinned=site is not None, copies=chosen[1:],
                                          sealing=any(untrusted.get(s, False) for s in chosen)))
        return self._sealed(prepared, report), prep["caps"]

    def _sealed(self, prepared: list[_Prepared], report: UploadReport) -> list[_Prepared]:
        """Seal the files placed on an untrusted site under their studies' data keys (one
        request for the batch's keys): such a site never sees a plaintext byte nor a key.  The
        metaserver is shown the plaintext of every hash-list block but those inside pixel data,
        and checks and derives the header from it (see ``envelope``)."""
        todo = [p for p in prepared if p.sealing]
        if not todo:
            return prepared
        from dgf import envelope
        from dgf.dicom import pipeline

        for p in todo:
            if not p.result.study_uid:
                report.failed.append(Failure(p.source, "has no Study Instance UID, so it cannot be sealed for "
                                             "an untrusted site", errors.PolicyRefused.exit_code,
                                             "no Study Instance UID to seal under"))
        todo = [p for p in todo if p.result.study_uid]
        prepared = [p for p in prepared if not p.sealing or p in todo]
        if not todo:
            return prepared
        # The key belongs to the patient the header names (a derived file keeps its source's).
        reply, _ = self.meta.call("up.keys", studies={
            p.result.study_uid: _header_patient(p.result.xml) if p.derived else p.result.patient for p in todo})
        keys = {study: base64.b64decode(k) for study, k in reply["keys"].items()}
        for p in todo:
            r = p.result
            env = envelope.Envelope.for_plaintext(keys[r.study_uid], r.key, r.size)
            holes = env.holes(r.opaque)
            if r.layout:
                key, digests, shown = envelope.survey(env, r.pieces(envelope.PER_BLOCK * envelope.PLAIN), holes)
                fields = {f.name: getattr(r, f.name) for f in dataclasses.fields(r)}
                sealed: pipeline.Deidentified = pipeline.SealedStream(
                    **{**fields, "key": key, "size": env.sealed_size, "blocks": digests}, envelope=env)
            else:
                data = env.seal_bytes(r.data)
                view = memoryview(r.data)
                spans = [env.block_plain(k) for k in range(env.blocks()) if k not in holes] \
                    if env.blocks() else [(0, r.size)]
                shown = b"".join(view[lo:hi] for lo, hi in spans)
                sealed = dataclasses.replace(r, data=data, key=crypto.sha256_hex(data), size=len(data),
                                             blocks=block_digests(data))
            p.seal = {"study": r.study_uid, "salt": env.salt.hex(), "holes": holes,
                      "shown": base64.b64encode(shown).decode()}
            p.plain_size, p.result = r.size, sealed
        return prepared

    @staticmethod
    def _map(pool: pipeline.Workers | None, step: str, items: list[tuple[str, bytes | None]],
             *args: Any) -> list[list[Any]]:
        """Run a pipeline step over ``items``, in the worker processes when there are some."""
        from dgf.dicom import pipeline

        if pool is None or len(items) < 2:
            return [pipeline.STEPS[step](items, *args)]
        return pool.map(step, items, *args)

    def _store(self, prepared: list[_Prepared], caps: dict[str, str], report: UploadReport,
               replace: bool, meter: _Meter | None = None, sources: list[str] | None = None,
               check: bool = True) -> None:
        """Stream a prepared batch to its sites, then publish what arrived in one commit.

        With ``check``, the archive is asked first what it holds: files already stored are
        skipped, conflicts fail per file, and an instance is stored once (a file whose SOP
        Instance UID is stored at another path is not stored again; the report says where)."""
        seen: dict[str, _Prepared] = {}
        unique: list[_Prepared] = []
        for p in prepared:
            first = seen.setdefault(p.path, p)
            if first is p:
                unique.append(p)
            elif first.result.key != p.result.key:
                report.failed.append(Failure(p.source, f"has the same SOP Instance UID as {first.source} "
                                                       "but other content; it was not uploaded",
                                             errors.AlreadyExists.exit_code,
                                             "same SOP Instance UID as another file of the upload"))
        prepared = self._checked(unique, report, replace) if check else unique
        self._put([p for p in prepared if not p.linked], caps, report, meter)
        done = [p for p in prepared if p.durable or p.linked]
        entries = [(p, json.dumps({
            "path": p.path, "key": p.result.key, "size": p.size, "site": p.site,
            "receipt": p.receipt, "xml": p.result.xml.decode(), "patient": p.result.patient,
            "copies": [] if p.linked else [{"site": c, "receipt": p.copy_receipts[c]} for c in p.copies],
            # Derived data (computed from de-identified data) has no identity to keep.
            "identity": None if p.derived else base64.b64encode(p.result.identity).decode(),
            "derived_from": p.derived_from,
            "blocks": base64.b64encode(block_digests(p.result.data) if p.result.blocks is None
                                       else p.result.blocks).decode(),
            "xattrs": p.xattrs,
            **({"seal": p.seal} if p.seal is not None and not p.linked else {}),
        }).encode()) for p in done]
        for part in _commit_parts(entries):
            try:
                self._commit(part, replace, report)
            except errors.AlreadyExists:
                # Another writer got there between the check and the commit: commit the rest.
                ok = {p.path for p in self._checked([p for p, _ in part], report, replace)}
                rest = [e for e in part if e[0].path in ok]
                if rest:
                    self._commit(rest, replace, report)
        if meter is not None:
            meter.finish(sources or ())

    def _commit(self, part: list[tuple[_Prepared, bytes]], replace: bool, report: UploadReport) -> None:
        body = b'{"files":[' + b",".join(e for _, e in part) + b"]}"
        reply, _ = self.meta.call("up.commit", body, replace=replace)
        self._free(reply.get("release") or {})
        report.uploaded += len(part)
        report.bytes += sum(p.size for p, _ in part)
        report.paths.extend(p.path for p, _ in part)
        report.stored.update((p.source, p.placed) for p, _ in part)

    def _checked(self, prepared: list[_Prepared], report: UploadReport, replace: bool) -> list[_Prepared]:
        """The files still to send, after asking the archive what it already holds."""
        todo: list[_Prepared] = []
        for i in range(0, len(prepared), RESOLVE_PATHS):
            part = prepared[i:i + RESOLVE_PATHS]
            reply, _ = self.meta.call("up.check", paths=[p.path for p in part],
                                      keys=[p.result.key for p in part],
                                      uids=[p.result.sop_uid for p in part])
            for p, (state, where) in zip(part, reply["states"]):
                if state == "new" or state == "conflict" and replace or \
                        state == "link" and p.pinned and where != p.site:
                    todo.append(p)
                elif state == "stored":
                    report.already += 1
                    report.stored[p.source] = p.placed
                elif state == "link":
                    # Stored once: this path becomes one more name of the stored object.
                    p.site, p.linked = where, True
                    report.already += 1
                    todo.append(p)
                elif state == "conflict":
                    report.failed.append(Failure(
                        p.source, f"{where}; use --replace to overwrite it", errors.AlreadyExists.exit_code,
                        "already in the archive with other content", hint="use --replace to overwrite them"))
                else:
                    report.failed.append(Failure(
                        p.source, f"another version of this instance (same SOP Instance UID) is stored at "
                                  f"{where}; remove it first", errors.AlreadyExists.exit_code,
                        "another version of the instance is stored elsewhere",
                        hint="remove the stored version first"))
        return todo

    @staticmethod
    def _placement(result: pipeline.Deidentified, to: str | None) -> str:
        sop = result.sop_uid or result.key[:40]
        if to is not None:
            return posixpath.join(to if to.startswith("/") else "/" + to, f"{sop}.dcm")
        return f"/{result.patient}/{result.study_uid or 'NoStudyUID'}/" \
               f"{result.series_uid or 'NoSeriesUID'}/{sop}.dcm"

    def _put(self, prepared: list[_Prepared], caps: dict[str, str], report: UploadReport,
             meter: _Meter | None = None) -> None:
        """Send every copy of each file to its site (all sites at once); a file is durable once
        every copy has its receipt, and a file with a failed copy is reported, not published.

        A copy whose site failed in transport (down, unreachable, hung) is sent once more to a
        site the file has no copy on, where one is left (the way an HDFS write pipeline replaces
        a failed datanode); a site the uploader named is not replaced."""
        lock = threading.Lock()

        def failed(p: _Prepared, reason: str, code: int, group: str) -> None:
            with lock:
                if not any(f.item == p.source for f in report.failed):
                    report.failed.append(Failure(p.source, reason, code, group))

        def received(copy: _Copy) -> bool:
            p = copy.file
            return bool(p.receipt) if copy.site == p.site else copy.site in p.copy_receipts

        def done(item: PutItem, receipt: str | None, error: str | None) -> None:
            copy: _Copy = item.tag
            if meter is not None and copy.site == copy.file.site:
                meter.finish([copy.file.source])
            if receipt is None:
                failed(copy.file, f"site {copy.site} refused the object: {error}", errors.ServerError.exit_code,
                       f"refused by site {copy.site}")
            elif copy.site == copy.file.site:
                copy.file.receipt = receipt
            else:
                with lock:
                    copy.file.copy_receipts[copy.site] = receipt

        def send(copies: list[_Copy], last: bool) -> list[tuple[_Copy, errors.DgfError]]:
            by_site: dict[str, list[PutItem]] = {}
            for copy in copies:
                p, stream = copy.file, None
                if p.result.layout:
                    # Progress counts the first copy's bytes: what the user's files weigh.
                    stream = meter.metered(p.source, p.result.pieces) \
                        if meter is not None and copy.site == p.site and not last else p.result.pieces
                by_site.setdefault(copy.site, []).append(
                    PutItem(p.result.key, p.result.data, copy, size=p.result.size, stream=stream))
            stranded: list[tuple[_Copy, errors.DgfError]] = []

            def task(site: str, items: list[PutItem]) -> Callable[[], None]:
                def run() -> None:
                    try:
                        self.site_link(site).put_many(items, caps[site], done)
                    except errors.DgfError as exc:
                        self._drop_link(site, exc)
                        for it in items:
                            copy: _Copy = it.tag
                            if received(copy):
                                continue
                            if not last and isinstance(exc, errors.TransportError):
                                with lock:
                                    stranded.append((copy, exc))
                            else:
                                failed(copy.file, f"upload to site {site} failed: {exc}", exc.exit_code,
                                       f"site {site} failed: {exc}")
                return run

            run_parallel(task(s, items) for s, items in by_site.items())
            return stranded

        stranded = send([_Copy(p, where) for p in prepared for where in (p.site, *p.copies)], last=False)
        moved: list[_Copy] = []
        now = time.monotonic()
        for copy, exc in stranded:
            p = copy.file
            taken = {p.site, *p.copies}
            spare = [s for s in caps if s not in taken and s in self._site_info
                     and (p.seal is not None or not self._site_info[s].untrusted)   # plaintext: trusted only
                     and now - self._unreachable.get(s, (-UNREACHABLE_S, None))[0] >= UNREACHABLE_S]
            if not spare or (p.pinned and copy.site == p.site):
                failed(p, f"upload to site {copy.site} failed: {exc}", exc.exit_code, f"site {copy.site} failed: {exc}")
                continue
            zones = {name: site.zone for name, site in self._site_info.items()}
            new = placement.choose(p.result.key, spare, 1, zones=zones, avoid=sorted(taken - {copy.site}))[0]
            log.warning("site %s failed (%s); its copy of %s goes to site %s", copy.site, exc.message, p.source, new)
            if copy.site == p.site:
                p.site = new
            else:
                p.copies[p.copies.index(copy.site)] = new
            moved.append(_Copy(p, new))
        if moved:
            send(moved, last=True)

    # -- download -------------------------------------------------------------------------

    def resolve(self, paths: list[str], identified: bool = False) -> dict[str, Any]:
        """Files under ``paths`` with replicas, hash lists, capabilities (and identities when
        asked), gathered over as many requests and pages as the server's limits call for."""
        resolved: dict[str, Any] = {"files": [], "blocks": {}, "sites": [], "caps": {}}
        if identified:
            resolved["identities"] = {}
        caps: dict[str, list[str]] = {}
        for i in range(0, max(1, len(paths)), RESOLVE_PATHS):
            offset: int | None = 0
            while offset is not None:
                _, body = self.meta.call("down.resolve", paths=paths[i:i + RESOLVE_PATHS],
                                         identified=identified, offset=offset)
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
        self._learn_sites(Site.from_wire(s) for s in resolved["sites"])
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
            roots = paths or ["/"]
            wanted = [m["path"] for r in roots for m in self.find(xpath, r)]
            if not wanted:
                return report
            resolved = self.resolve(wanted, identified)
            local = {f[0]: base_dir + f[0] for f in resolved["files"]}
        else:
            resolved = self.resolve(paths, identified)
            local = {}
            # Like cp -r: a requested path lands in out/ under its own name.
            cuts = []
            for p in paths:
                p = p.rstrip("/") or "/"
                parent = posixpath.dirname(p)
                cuts.append((p, 0 if parent == "/" else len(parent)))
            for f in resolved["files"]:
                cut = max((c for c in cuts if f[0] == c[0] or f[0].startswith(c[0].rstrip("/") + "/")),
                          key=lambda c: len(c[0]))[1]
                local[f[0]] = base_dir + f[0][cut:]
        writer = _Writer()
        if on_total is not None:
            on_total(sum(f[2] for f in resolved["files"]))

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
        report = DownloadReport()

        def sink(targets: list[str], data: bytes | None, src: Path | None) -> None:
            if data is None and src is not None:
                data = src.read_bytes()
                src.unlink(missing_ok=True)
            for t in targets:
                on_file(t, data or b"")

        self._fetch(self.resolve(paths, identified), sink, identified, report, progress)
        return report

    def _fetch(self, resolved: dict[str, Any], sink: Callable[[list[str], bytes | None, Path | None], None],
               identified: bool, report: DownloadReport, progress: Progress | None,
               spool: Path | None = None) -> None:
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

        left = self.reader.read_many(refs, deliver, spool or Path(tempfile.gettempdir()) / "dgf-spool")
        for key, reason in left.items():
            report.failed.extend(Failure(p, reason) for p in targets[key])

    def read_file(self, path: str, identified: bool = False) -> bytes:
        """The whole content of one file (re-identified if asked and allowed), verified."""
        resolved = self.resolve([path], identified)
        refs = ObjectRef.all_of(resolved)
        if not refs:
            raise errors.NotFound(f"{path} does not exist.")
        data = self.reader.read(refs[0])
        if identified:
            blob = resolved.get("identities", {}).get(refs[0].key)
            if blob is None:
                raise errors.NotFound(f"no identity is held for {path}.")
            return identity.restore(data, identity.decode(base64.b64decode(blob)))
        return data

    def identity_summary(self, path: str) -> dict[str, Any]:
        """What de-identification removed from one file (clinicians; the release is audited)."""
        resolved = self.resolve([path], identified=True)
        if not resolved["files"]:
            raise errors.NotFound(f"{path} does not exist.")
        _, key, _, sites = resolved["files"][0]
        blob = resolved["identities"].get(key)
        if blob is None:
            raise errors.NoAttribute(f"no identity is held for {path}.")
        record = identity.decode(base64.b64decode(blob))
        if record.get("derived_from"):
            raise errors.NoAttribute(f"{path} is derived data; it carries the identity of the object "
                                     f"it was computed from ({record['derived_from'][:12]}...).")
        data = self.read_file(path)
        return identity.summary(record, identity.reidentify(data, record))

    # -- reconstruction near the data -----------------------------------------------------

    def recon_import(self, projections: Any, geometry: Any, to: str,
                     patient: dict[str, str] | None = None, progress: Progress | None = None) -> UploadReport:
        """Store a projection stack (n, nv, nu) with its geometry as a DICOM projection series
        under ``to``, de-identified like any upload and spread over the sites by instance."""
        from dgf.dicom.projections import projection_series

        files = projection_series(projections, geometry, patient)
        report = UploadReport()
        for i in range(0, len(files), BATCH):
            items: list[tuple[str, bytes | None]] = [(f"projection {j + 1}", files[j])
                                                     for j in range(i, min(len(files), i + BATCH))]
            prepared, caps = self._prepare(items, to, None, report, spread=True)
            self._store(prepared, caps, report, False, _Meter(progress, {n: 1 for n, _ in items}),
                        [n for n, _ in items], check=False)
        return report

    def recon(self, series: str, out: str, shape: tuple[int, int, int] | None = None,
              window: str = "hann", progress: Callable[[str], None] | None = None,
              replace: bool = False) -> ReconResult:
        """FDK of the projection series under ``series``, map-reduce over the sites that hold it.

        Each site filters and back-projects its own projections (verb ``recon.partial``) and
        returns a partial volume; only those travel.  A site that fails has its share redone
        from another replica, or the reconstruction stops with a message naming it.  The sum is
        stored under ``out`` as a CT series with its provenance (``user.dgf.provenance`` and the
        series' DGF RECON block).  An ``out`` that holds files is refused unless ``replace``;
        then the old files are removed once the new series is stored.  The slices inherit the
        identity of the projections (an identified download puts the patient back)."""
        import numpy as np
        from lxml import etree

        from dgf.conebeam import Geometry
        from dgf.dicom.projections import CREATOR, volume_series

        t0 = time.perf_counter()
        try:
            old = self.stat(out)
        except errors.NotFound:
            old = None
        if old is not None and not old.is_dir:
            raise errors.AlreadyExists(f"--out {out} is a file; name a directory for the reconstruction.")
        old_files = [st.path for st in self.ls(out) if not st.is_dir] if old is not None else []
        if old_files and not replace:
            raise errors.AlreadyExists(f"{out} already holds {len(old_files)} file(s) (an earlier "
                                       "reconstruction?); choose another --out, or pass --replace.")
        rows = self.find("/DicomHeader[PositionerPrimaryAngle]", series,
                         show=["PositionerPrimaryAngle", "InstanceNumber", "PatientID", "StudyInstanceUID",
                               "FrameOfReferenceUID", "SeriesInstanceUID", "SpecificCharacterSet"])
        if not rows:
            raise errors.NotFound(f"no projection instances under {series}; import them with 'dgf recon import'.")
        rows.sort(key=lambda r: int(r["values"]["InstanceNumber"] or 0))
        header = etree.fromstring(self.getxattr(rows[0]["path"], HEADER_XATTR))
        block = [e.text for e in header.iter("PrivateElement")
                 if e.get("creator") == CREATOR and e.get("tag", "").endswith("10")]
        if not block:
            raise errors.InvalidDicom(f"{rows[0]['path']} has no {CREATOR} geometry block.")
        shared = json.loads(block[0] or "{}")["geometry"]
        shared["angles_deg"] = [float(r["values"]["PositionerPrimaryAngle"]) for r in rows]
        if shape is not None:
            fov = [n * d for n, d in zip(shared["volume_shape"], shared["voxel_size"])]
            shared["volume_shape"] = list(shape)
            shared["voxel_size"] = [f / n for f, n in zip(fov, shape)]
            shared["volume_origin"] = None
        g = Geometry.from_dict(shared)
        resolved = self.resolve([r["path"] for r in rows])
        refs = {ref.path: ref for ref in ObjectRef.all_of(resolved)}
        # A sealed projection is reconstructed on a trusted site only, which is sent its key.
        where = {path: (ref.key, [s for s in ref.sites if ref.env is None or not self._site_info[s].untrusted])
                 for path, ref in refs.items()}
        seals = {ref.key: [base64.b64encode(ref.env.key).decode(), ref.env.salt.hex(), ref.env.size]
                 for ref in refs.values() if ref.env is not None}
        stuck = [path for path, (_, sites) in where.items() if not sites]
        if stuck:
            raise errors.UsageError(f"{stuck[0]} (and {len(stuck) - 1} more) is held only on untrusted sites, which "
                                    "cannot reconstruct; give its directory a copy on a trusted site ('dgf admin "
                                    "replicas set', then 'dgf fsck --repair').")
        jobs: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            jobs.setdefault(where[r["path"]][1][0], []).append(i)
        nx, ny, nz = g.volume_shape
        volume = np.zeros((nz, ny, nx), dtype=np.float32)
        lock = threading.Lock()
        failed: dict[str, tuple[list[int], str]] = {}
        worked: set[str] = set()                 # the sites whose partial volumes were summed

        def run(site: str, indices: list[int]) -> Callable[[], None]:
            def go() -> None:
                keys = [where[rows[i]["path"]][0] for i in indices]
                try:
                    if progress:
                        progress(f"site {site}: back-projecting {len(keys)} projections")
                    sealed = {k: seals[k] for k in keys if k in seals}
                    result, payload = self.site_link(site).call(
                        "recon.partial", resolved["caps"][site], wait_s=RECON_WAIT_S, keys=keys,
                        indices=indices, geometry=json.loads(g.to_json()), window=window,
                        **({"seals": sealed} if sealed else {}))
                    if list(result.get("shape") or []) != [nz, ny, nx] or len(payload) != nx * ny * nz * 4:
                        raise errors.ServerError(f"site {site} returned a partial volume of the wrong shape.")
                    part = np.frombuffer(payload, dtype=np.float32).reshape(nz, ny, nx)
                except errors.DgfError as exc:
                    self._drop_link(site, exc)
                    with lock:
                        failed[site] = (indices, str(exc))
                    return
                with lock:
                    np.add(volume, part, out=volume)
                    worked.add(site)
                if progress:
                    progress(f"site {site}: done")
            return go

        pending = jobs
        for attempt in range(1, 3):
            failed.clear()
            run_parallel(run(s, idx) for s, idx in pending.items())
            if not failed:
                break
            retry: dict[str, list[int]] = {}
            for site, (indices, why) in failed.items():
                for i in indices:
                    others = [s for s in where[rows[i]["path"]][1] if s != site]
                    if len(others) < attempt:
                        raise errors.TransportError(
                            f"site {site} failed during reconstruction ({why}); {len(indices)} of its "
                            "projections have no other replica, so the result would be incomplete.")
                    retry.setdefault(others[attempt - 1], []).append(i)
            pending = retry
        if failed:
            # The retry failed too: a sum without those projections is not a reconstruction.
            site, (indices, why) = sorted(failed.items())[0]
            raise errors.TransportError(
                f"site {site} failed during reconstruction ({why}) and no replica could stand in for "
                f"its {len(indices)} projections; nothing was stored.")
        values = rows[0]["values"]
        provenance = {"source_series": series, "source_series_uid": values.get("SeriesInstanceUID", ""),
                      "algorithm": "FDK (dgf, numpy)", "filter": window, "projections": len(rows),
                      "sites": sorted(worked), "geometry": json.loads(g.to_json())}
        files = volume_series(volume, g, provenance, {
            "PatientID": values.get("PatientID", ""), "PatientName": values.get("PatientID", ""),
            "StudyInstanceUID": values.get("StudyInstanceUID", ""),
            "FrameOfReferenceUID": values.get("FrameOfReferenceUID", ""),
            "SpecificCharacterSet": values.get("SpecificCharacterSet") or ""})
        report = UploadReport()
        items: list[tuple[str, bytes | None]] = [(f"slice {j + 1}", f) for j, f in enumerate(files)]
        prepared, caps = self._prepare(items, out, None, report,
                                       options=dataclasses.replace(self.upload_options(), derived=True))
        source_key = where[rows[0]["path"]][0]
        for p in prepared:
            p.xattrs = {"user.dgf.provenance": json.dumps(provenance)}
            p.derived_from = source_key
        self._store(prepared, caps, report, False)
        if report.failed:
            raise errors.DgfError(f"the reconstruction could not be stored: {report.failed[0].reason}")
        for path in sorted(set(old_files) - set(report.paths)):
            self.rm(path)
        return ReconResult(volume, g, report.paths, time.perf_counter() - t0, sorted(worked))

    # -- administration -------------------------------------------------------------------

    def principal_add(self, name: str, role: str, public_key: str) -> dict[str, Any]:
        return self.meta.call("admin.principal.add", name=name, role=role, public_key=public_key)[0]

    def principal_remove(self, name: str) -> None:
        self.meta.call("admin.principal.remove", name=name)

    def principals(self) -> list[dict[str, Any]]:
        return list(self.meta.call("admin.principal.list")[0]["principals"])

    def audit_log(self, limit: int = 100, after: int = 0) -> list[dict[str, Any]]:
        """The newest ``limit`` audit records, or the oldest ``limit`` after record id ``after``."""
        if after:
            return list(self.meta.call("admin.audit", limit=limit, after=after)[0]["entries"])
        return list(self.meta.call("admin.audit", limit=limit)[0]["entries"])

    def audit_verify(self) -> dict[str, Any]:
        return dict(self.meta.call("admin.audit.verify")[0])
