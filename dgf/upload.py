"""Uploads: de-identify, store on the sites, publish (``Client.upload`` and ``dgf_up``).

Per batch: read and analyze every file (local CPU), ask the metaserver once for the batch's
pseudonyms and put capabilities, de-identify and build the XML headers, stream the objects to
their sites (pipelined, sites in parallel), then publish everything in one commit carrying the
sites' receipts.  Nothing becomes visible before its object is durable and its metadata
committed; re-running an interrupted upload produces the same pseudonymous paths and object keys,
so it completes without duplicates.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import posixpath
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dgf import crypto, errors, placement
from dgf.dicom.profile import Options
from dgf.integrity import block_digests
from dgf.reports import Failure, Meter, Progress, UploadReport
from dgf.transport import UNREACHABLE_S, PutItem, run_parallel
from dgf.types import Site

if TYPE_CHECKING:
    from dgf.client import Client
    from dgf.dicom import pipeline

log = logging.getLogger("dgf.upload")

BATCH = 200
#: A batch's commit is split so that no commit frame exceeds this many bytes (the server's
#: limit commit_bytes is 64 MiB by default).
COMMIT_BYTES = 32 * 1024 * 1024
#: Paths per up.check request (the server's limit list_items is 10,000 by default).
RESOLVE_PATHS = 5000
#: Uploads of at least this many files de-identify in worker processes, one per core but the
#: one this process needs for SSH, hashing and the sites' replies.  A pool pays only with a core
#: to spare: on 2 cores shared with a local federation, 2 workers cost 6.9 ms of CPU per small
#: file against 4.9 in-process (each worker's start alone is 0.3 s of imports), and were slower
#: (215 vs 280 files/s; 0.5 MB CT files 68-90 vs 75-93 files/s).
POOL_MIN_FILES = 400
POOL_WORKERS = max(1, min(4, (os.cpu_count() or 1) - 1))
#: Batches being sent to the sites at once (when each also committed itself, 1000 small
#: files on this 2-core machine: 339 files/s with one, 417 with two, 398 with three).
STORE_STAGES = 2
#: Batches sent to the sites and waiting for their commit.  Commits run one at a time, in
#: order, in a thread of their own, so the next batches' transfers and de-identification
#: overlap them; a store thread no longer waits for its commit.  1000 small files on this
#: 2-core machine, alternated: 461-488 files/s against 417-434 with a commit in each store
#: thread (two commits at once only contended at the metaserver), and less CPU per file.
COMMITS_QUEUED = 2


@dataclass
class _Prepared:
    source: str
    result: pipeline.Deidentified
    path: str
    site: str
    receipt: str = ""
    #: The XML header the site holding the first copy derived from the bytes it checked: the
    #: one the metaserver publishes (its SHA-256 is in that site's receipt).
    header: bytes = b""
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



#: A file to publish: its commit entry (JSON) and its XML header, which travels as bytes after
#: the batch's JSON (``up.commit``'s ``xml_sizes``): as a JSON string, each of its quotes cost an
#: escape to write and to read, about 0.1 ms per small file at the metaserver.
_Entry = tuple[_Prepared, bytes, bytes]


class _InOrder:
    """Hands the batches' commits to the one committer thread in the order the batches were
    read: a store that finished sending before an earlier one waits until that one has queued
    its commit (or failed).  Tickets are issued by the reading thread, one per batch."""

    def __init__(self, committer: ThreadPoolExecutor) -> None:
        self._committer = committer
        self._turn = threading.Condition()
        self._next = 0             # the ticket whose commit is queued next
        self._issued = 0

    def ticket(self) -> int:
        self._issued += 1
        return self._issued - 1

    def queue(self, ticket: int, publish: Callable[[], None] | None) -> Future[None] | None:
        with self._turn:
            self._turn.wait_for(lambda: self._next == ticket)
            self._next += 1
            self._turn.notify_all()
            return None if publish is None else self._committer.submit(publish)


def _commit_parts(entries: list[_Entry]) -> Iterator[list[_Entry]]:
    """Encoded commit entries grouped so that no commit exceeds COMMIT_BYTES."""
    part: list[_Entry] = []
    size = 0
    for entry in entries:
        grown = len(entry[1]) + len(entry[2]) + 1
        if part and size + grown > COMMIT_BYTES:
            yield part
            part, size = [], 0
        part.append(entry)
        size += grown
    if part:
        yield part


def _header_patient(xml: bytes) -> str:
    """The Patient ID an XML header names (a derived file keeps its source's pseudonym)."""
    from lxml import etree

    found = etree.fromstring(xml).find("PatientID")
    return (found.text or "") if found is not None else ""


class Uploads:
    """The upload pipeline of one client (its metaserver link, site links and reader)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self._tally = threading.Lock()      # report counters, updated by concurrent store stages

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
        meter = Meter(progress, sizes)
        if not files:
            return report
        if len(files) <= min(batch, POOL_MIN_FILES - 1):
            # One batch (a STOW-RS request, a file or two): nothing to overlap, so no stage
            # threads to start and stop: a sixth of a one-file upload's client CPU (bench/RESULTS.md).
            prepared, caps = self._prepare([(str(f), None) for f in files], to, site, report, spread=spread)
            self._store(prepared, caps, report, replace, meter, [str(f) for f in files])
            return report
        # De-identification is CPU work: large uploads spread it over worker processes (started
        # fresh, not forked, since this process runs SSH threads).  And the stages overlap: while
        # earlier batches are committed, one at a time and in order (COMMITS_QUEUED waiting),
        # batches N-1 and N are streamed to the sites (STORE_STAGES at once) and batch N+1 is
        # read and de-identified.
        from dgf.dicom import pipeline  # de-identification: pydicom's dictionary, loaded for uploads only

        workers = None
        if len(files) >= POOL_MIN_FILES and POOL_WORKERS > 1:
            workers = pipeline.Workers(POOL_WORKERS)
        try:
            # The committer closes last: stores still running when an error ends the loop may
            # queue their commits (what reached the sites is published, not stranded).
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dgf-commit") as committer, \
                    ThreadPoolExecutor(max_workers=STORE_STAGES, thread_name_prefix="dgf-store") as store:
                order = _InOrder(committer)
                pendings: list[Future[Future[None] | None]] = []
                commits: list[Future[None]] = []
                for i in range(0, len(files), batch):
                    chunk = files[i:i + batch]
                    # Files are read where they are de-identified (a worker, or here).
                    items: list[tuple[str, bytes | None]] = [(str(f), None) for f in chunk]
                    prepared, caps = self._prepare(items, to, site, report, pool=workers, spread=spread)
                    while len(pendings) >= STORE_STAGES:
                        c = pendings.pop(0).result()
                        if c is not None:
                            commits.append(c)
                    while len(commits) >= COMMITS_QUEUED:
                        commits.pop(0).result()
                    pendings.append(store.submit(self._send, order, order.ticket(), prepared, caps, report,
                                                 replace, meter, [str(f) for f in chunk]))
                for done in pendings:
                    c = done.result()
                    if c is not None:
                        commits.append(c)
                for c in commits:
                    c.result()
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
            elif p.is_file():
                yield p
            elif p.exists():
                # A pipe or a device: opening one waits for a writer, reading /dev/zero never ends.
                report.failed.append(Failure(str(p), "is not a regular file (a pipe, a device or a socket); "
                                                     "save it to a file and upload that", errors.UsageError.exit_code))
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
                 spread: bool = False, again: bool = False) -> tuple[list[_Prepared], dict[str, str]]:
        """:meth:`_prepare_batch`; the plans its first step kept in this thread are closed
        even when the batch ends between the steps (a refused ``up.prepare``, a lost link), so a
        long-lived uploader's thread keeps no descriptor of a file it gave up."""
        try:
            return self._prepare_batch(items, to, site, report, fixed_path, pool, options, spread, again)
        finally:
            from dgf.dicom import pipeline

            pipeline.drop_plans()

    def _prepare_batch(self, items: list[tuple[str, bytes | None]], to: str | None, site: str | None,
                       report: UploadReport, fixed_path: bool, pool: pipeline.Workers | None,
                       options: Options | None, spread: bool,
                       again: bool) -> tuple[list[_Prepared], dict[str, str]]:
        """Analyze, fetch the batch's pseudonyms in one round trip, de-identify, build XML.

        Files go to ``site``, or to a site chosen by their series (``spread``: by instance, so
        one series lands on every site).  A batch analysed with other options than those its
        ``up.prepare`` names as the archive's (changed by an admin since this client learnt
        them) is analysed again with those, once."""
        given = options is not None
        options = options or self.client.upload_options()
        needs = [n for part in self._map(pool, "analyze", items, options) for n in part]
        ok = [n for n in needs if n.error is None]
        if not ok:
            report.failed.extend(Failure.of(n.name, n.error) for n in needs if n.error is not None)
            return [], {}
        uids = sorted(set().union(*(n.uids for n in ok)))
        patients = sorted({n.patient_key for n in ok})
        prep, _ = self.client.meta.call("up.prepare", uids=uids, patients=patients)
        names = prep.get("options")
        if names is None and not self.client.options_confirmed:
            names = self.client.meta.call("deid.options")[0]["options"]   # a metaserver before 2026-12-05
        if isinstance(names, list) and not self.client.archive_options_are([str(n) for n in names]) \
                and not given and not again:
            return self._prepare(items, to, site, report, fixed_path, pool, None, spread, again=True)
        report.failed.extend(Failure.of(n.name, n.error) for n in needs if n.error is not None)
        known = [Site.from_wire(s) for s in prep["sites"]]
        sites = sorted(s.name for s in known)
        zones = {s.name: s.zone for s in known}
        self.client._learn_sites(known)
        if site is not None and site not in sites:
            raise errors.UsageError(f"site {site!r} is not registered; known sites: {', '.join(sites)}.")
        replication = prep.get("replication") or {"default": 1, "overrides": {}}
        background = replication.get("mode") == "async"
        now = time.monotonic()
        # Sites that just failed to answer are passed over while enough others are left.
        live = [s for s in sites if now - self.client._unreachable.get(s, (-UNREACHABLE_S, None))[0] >= UNREACHABLE_S]
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
        reply, _ = self.client.meta.call("up.keys", studies={
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

    def _send(self, order: _InOrder, ticket: int, prepared: list[_Prepared], caps: dict[str, str],
              report: UploadReport, replace: bool, meter: Meter, sources: list[str]) -> Future[None] | None:
        """:meth:`_store` a batch, its commit queued in batch order (the future of the commit)."""
        publish: Callable[[], None] | None = None
        try:
            publish = self._store(prepared, caps, report, replace, meter, sources, defer=True)
        finally:
            queued = order.queue(ticket, publish)        # a failed batch still gives up its turn
        return queued

    def _store(self, prepared: list[_Prepared], caps: dict[str, str], report: UploadReport,
               replace: bool, meter: Meter | None = None, sources: list[str] | None = None,
               check: bool = True, defer: bool = False, resend: bool = True) -> Callable[[], None] | None:
        """Stream a prepared batch to its sites, then publish what arrived in one commit: here,
        or with ``defer`` returned as a callable to run later, the bytes let go.

        With ``check``, the archive is asked first what it holds: files already stored are
        skipped, conflicts fail per file, and an instance is stored once (a file whose SOP
        Instance UID is stored at another path is not stored again; the report says where).
        With ``resend``, files whose commit is refused because the stored object they were to
        name left the archive meanwhile are sent again, once (:meth:`_again`)."""
        seen: dict[str, _Prepared] = {}
        unique: list[_Prepared] = []
        twins: list[tuple[_Prepared, _Prepared]] = []   # (a copy of a file of this batch, that file)
        for p in prepared:
            first = seen.setdefault(p.path, p)
            if first is p:
                unique.append(p)
            elif first.result.key != p.result.key:
                report.failed.append(Failure(p.source, f"has the same SOP Instance UID as {first.source} "
                                                       "but other content; it was not uploaded",
                                             errors.AlreadyExists.exit_code,
                                             "same SOP Instance UID as another file of the upload"))
            else:
                twins.append((p, first))
        prepared = self._checked(unique, report, replace) if check else unique
        tokens: dict[str, str] = {}      # the batches' signed receipts (transport.put_many)
        self._put([p for p in prepared if not p.linked], caps, report, meter, tokens)
        done = [p for p in prepared if p.durable or p.linked]
        entries = [(p, json.dumps({
            "path": p.path, "key": p.result.key, "size": p.size, "site": p.site,
            "receipt": p.receipt, "patient": p.result.patient,
            "copies": [] if p.linked else [{"site": c, "receipt": p.copy_receipts[c]} for c in p.copies],
            # Derived data (computed from de-identified data) has no identity to keep.
            "identity": None if p.derived else base64.b64encode(p.result.identity).decode(),
            "derived_from": p.derived_from,
            "blocks": base64.b64encode(block_digests(p.result.data) if p.result.blocks is None
                                       else p.result.blocks).decode(),
            "xattrs": p.xattrs,
            **({"seal": p.seal} if p.seal is not None and not p.linked else {}),
        }).encode(), p.header or p.result.xml) for p in done]
        def publish() -> None:
            for part in _commit_parts(entries):
                try:
                    self._commit(part, replace, report, tokens)
                except errors.AlreadyExists:
                    # Another writer got there between the check and the commit: commit the rest.
                    ok = {p.path for p in self._checked([p for p, _, _ in part], report, replace)}
                    rest = [e for e in part if e[0].path in ok]
                    if rest:
                        self._commit(rest, replace, report, tokens)
                except (errors.NotFound, errors.PermissionDenied):
                    # Files to be more names of stored objects whose last names were removed
                    # meanwhile (their bytes are being deleted): the commit published nothing.
                    # The others go as they are, those files again from their sources.
                    links = [e[0] for e in part if e[0].linked and not e[0].derived]
                    gone = {id(p) for p in self._gone(links)} if resend else set()
                    if not gone:
                        raise
                    rest = [e for e in part if id(e[0]) not in gone]
                    if rest:
                        self._commit(rest, replace, report, tokens)
                    self._again([e[0] for e in part if id(e[0]) in gone], replace, report)
            self._settle_twins(twins, report)
            if meter is not None:
                meter.finish(sources or ())
        if defer:
            # The bytes are on the sites: a queued commit needs the entries, not the data.
            for p in done:
                p.result = dataclasses.replace(p.result, data=b"")
            return publish
        publish()
        return None

    def _gone(self, links: list[_Prepared]) -> list[_Prepared]:
        """Of files that were to be more names of stored objects, those whose object the
        archive no longer holds."""
        return [p for p, state, _ in self._states(links) if state == "new"]

    def _again(self, files: list[_Prepared], replace: bool, report: UploadReport) -> None:
        """Upload ``files`` once more from their sources, to the paths they were given: their
        commit was refused because the object they were to name had left the archive."""
        by_path = {p.path: p for p in files}
        items: list[tuple[str, bytes | None]] = []
        for p in files:
            try:
                items.append((p.path, Path(p.source).read_bytes()))
            except OSError as exc:
                report.failed.append(Failure(p.source, f"could not be read again to store it ({exc.strerror}); "
                                                       "the stored copy it was to share was removed meanwhile",
                                             errors.InvalidDicom.exit_code, "unreadable"))
        again = UploadReport()
        pinned = files[0].site if files[0].pinned else None
        log.info("%d file(s) of the upload named a stored object removed meanwhile; sending them again", len(files))
        prepared, caps = self._prepare(items, None, pinned, again, fixed_path=True)
        for q in prepared:
            q.source = by_path[q.path].source
        if prepared:
            self._store(prepared, caps, again, replace, resend=False)
        with self._tally:
            report.already += again.already - len(files)    # counted when they were to be names
            report.uploaded += again.uploaded
            report.bytes += again.bytes
        report.paths.extend(again.paths)
        report.stored.update(again.stored)
        report.warnings.extend(again.warnings)
        report.failed.extend(dataclasses.replace(f, item=by_path[f.item].source) if f.item in by_path else f
                             for f in again.failed)

    def _settle_twins(self, twins: list[tuple[_Prepared, _Prepared]], report: UploadReport) -> None:
        """A file that is a copy of another of its batch (the same instance, twice in a folder
        or a STOW-RS request) was not sent: it ends as that file did, stored (counted as
        already stored) or failed for the same reason, never unaccounted for."""
        if not twins:
            return
        failed = {f.item: f for f in report.failed}
        for copy, first in twins:
            if first.source in report.stored:
                report.stored[copy.source] = report.stored[first.source]
                with self._tally:
                    report.already += 1
            else:
                why = failed.get(first.source)
                report.failed.append(dataclasses.replace(why, item=copy.source) if why is not None else Failure(
                    copy.source, f"is a copy of {first.source}, which was not stored", errors.ServerError.exit_code))

    def _commit(self, part: list[_Entry], replace: bool, report: UploadReport,
                tokens: dict[str, str]) -> None:
        # Each batch receipt the part's files name (REF#i) travels once.
        refs = {r.partition("#")[0] for p, _, _ in part for r in (p.receipt, *p.copy_receipts.values()) if "#" in r}
        body = b'{"files":[' + b",".join(e for _, e, _ in part) + b'],"receipts":' + \
            json.dumps({ref: tokens[ref] for ref in refs}).encode() + b"}" + b"".join(x for _, _, x in part)
        reply, payload = self.client.meta.call("up.commit", body, replace=replace,
                                                xml_sizes=[len(x) for _, _, x in part])
        self.client._free(reply, payload)
        with self._tally:
            report.uploaded += len(part)
            report.bytes += sum(p.size for p, _, _ in part)
        report.paths.extend(p.path for p, _, _ in part)
        report.stored.update((p.source, p.placed) for p, _, _ in part)

    def _states(self, files: list[_Prepared]) -> Iterator[tuple[_Prepared, str, str]]:
        """What the archive holds for each file: ``(file, state, where)`` as ``up.check`` says."""
        for i in range(0, len(files), RESOLVE_PATHS):
            part = files[i:i + RESOLVE_PATHS]
            reply, _ = self.client.meta.call("up.check", paths=[p.path for p in part],
                                             keys=[p.result.key for p in part],
                                             uids=[p.result.sop_uid for p in part])
            for p, (state, where) in zip(part, reply["states"]):
                yield p, state, where

    def _checked(self, prepared: list[_Prepared], report: UploadReport, replace: bool) -> list[_Prepared]:
        """The files still to send, after asking the archive what it already holds."""
        todo: list[_Prepared] = []
        for p, state, where in self._states(prepared):
            if state == "new" or state == "conflict" and replace or \
                    state == "link" and p.pinned and where != p.site:
                todo.append(p)
            elif state == "stored":
                with self._tally:
                    report.already += 1
                report.stored[p.source] = p.placed
            elif state == "link":
                # Stored once: this path becomes one more name of the stored object.
                p.site, p.linked = where, True
                with self._tally:
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
             meter: Meter | None = None, tokens: dict[str, str] | None = None) -> None:
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
                copy.file.receipt, copy.file.header = receipt, item.header
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
                    PutItem(p.result.key, p.result.data, copy, size=p.result.size, stream=stream,
                            want_header=copy.site == p.site and p.seal is None))
            stranded: list[tuple[_Copy, errors.DgfError]] = []

            def task(site: str, items: list[PutItem]) -> Callable[[], None]:
                def run() -> None:
                    try:
                        self.client.site_link(site).put_many(items, caps[site], done, tokens)
                    except errors.DgfError as exc:
                        self.client._drop_link(site, exc)
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
            spare = [s for s in caps if s not in taken and s in self.client._site_info
                     and (p.seal is not None or not self.client._site_info[s].untrusted)   # plaintext: trusted only
                     and now - self.client._unreachable.get(s, (-UNREACHABLE_S, None))[0] >= UNREACHABLE_S]
            if not spare or (p.pinned and copy.site == p.site):
                failed(p, f"upload to site {copy.site} failed: {exc}", exc.exit_code, f"site {copy.site} failed: {exc}")
                continue
            zones = {name: site.zone for name, site in self.client._site_info.items()}
            new = placement.choose(p.result.key, spare, 1, zones=zones, avoid=sorted(taken - {copy.site}))[0]
            log.warning("site %s failed (%s); its copy of %s goes to site %s", copy.site, exc.message, p.source, new)
            if copy.site == p.site:
                p.site = new
            else:
                p.copies[p.copies.index(copy.site)] = new
            moved.append(_Copy(p, new))
        if moved:
            send(moved, last=True)

