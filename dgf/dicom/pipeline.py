"""De-identification of a batch, as two picklable steps so a process pool can spread the CPU work
of large uploads over the machine's cores.

Step 1 (:func:`analyze_items`) finds what each file needs pseudonyms for; the caller asks the
metaserver once for the whole batch; step 2 (:func:`deidentify_items`) parses each file again
(cheaper than shipping parse trees between processes) and produces the stored bytes, the XML
header and the encoded identity record.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

from dgf import errors, workers
from dgf.dicom import deid, identity
from dgf.dicom.profile import Options, Profile

_PROFILES: dict[Options, Profile] = {}


def _profile(options: Options) -> Profile:
    prof = _PROFILES.get(options)
    if prof is None:
        prof = _PROFILES[options] = Profile(options)
    return prof


@dataclass(frozen=True)
class Problem:
    """Why one file failed, as plain data (it crosses the worker pipe): the message, the exit
    status of its error class, and the error's summary fields (see :class:`errors.DgfError`)."""

    message: str
    code: int = errors.InvalidDicom.exit_code
    group: str = ""
    detail: str = ""
    hint: str = ""

    @classmethod
    def of(cls, exc: errors.DgfError) -> Problem:
        return cls(str(exc), exc.exit_code, exc.group, exc.detail, exc.hint)


@dataclass(frozen=True)
class Needs:
    name: str
    uids: frozenset[str] = frozenset()
    patient_key: str = ""
    error: Problem | None = None


@dataclass(frozen=True)
class Deidentified:
    name: str
    data: bytes = b""
    key: str = ""
    xml: bytes = b""
    identity: bytes = b""  # identity.encode(record)
    patient: str = ""
    study_uid: str = ""
    series_uid: str = ""
    sop_uid: str = ""
    warnings: tuple[str, ...] = ()
    error: Problem | None = None
    spooled: str = ""  # large outputs from a worker: a file on tmpfs holding ``data``
    size: int = 0
    #: Streamed objects (``data`` empty): new bytes and (start, end) spans of the file ``name``,
    #: and the hash list computed while streaming it.
    layout: tuple[bytes | tuple[int, int], ...] = ()
    blocks: bytes | None = None
    #: Output ranges holding only pixel values (see ``deid.Result.opaque``).
    opaque: tuple[tuple[int, int], ...] = ()

    def pieces(self, chunk: int) -> Iterator[bytes | memoryview]:
        """The object's bytes in pieces of at most ``chunk`` bytes, read from its source file
        when it is streamed."""
        if not self.layout:
            view = memoryview(self.data)
            for i in range(0, len(view), chunk):
                yield view[i:i + chunk]
            return
        fd = os.open(self.name, os.O_RDONLY)
        try:
            for s in self.layout:
                if isinstance(s, bytes):
                    yield s
                else:
                    yield from deid.pread_span(fd, s[0], s[1], chunk)
        finally:
            os.close(fd)


@dataclass(frozen=True)
class SealedStream(Deidentified):
    """A streamed object sealed for an untrusted site (``dgf.envelope``): ``key``, ``size`` and
    ``blocks`` are the sealed object's, and ``pieces`` seals the plaintext again as it streams."""

    envelope: Any = None

    def pieces(self, chunk: int) -> Iterator[bytes | memoryview]:
        yield from self.envelope.seal(super().pieces(chunk))


class _Kept(threading.local):
    """Plans from step 1 kept for step 2 in the same process (a worker sees the same files in
    both steps), so each file is parsed once; step 2 drops them.  Per thread: uploads run side by
    side in one process (the mount's writers, STOW-RS requests, the DICOM gateway), and one
    thread's step 1 must neither close another's plans (a memory-mapped file's descriptor,
    maybe in use) nor hand it a plan of the same name."""

    def __init__(self) -> None:
        self.plans: dict[str, deid.DeidPlan] = {}


_KEPT = _Kept()
SPOOL_MIN = 128 * 1024


def drop_plans() -> None:
    """Close the plans this thread's step 1 kept and step 2 did not use (a batch given up
    between the steps)."""
    plans = _KEPT.plans
    for plan in plans.values():
        plan.close()            # memory-mapped files hold a descriptor
    plans.clear()


def analyze_items(items: list[tuple[str, bytes | None]], options: Options) -> list[Needs]:
    """Step 1.  An item's data None means: read the file at ``name`` here (so a worker reads its
    files itself instead of receiving them through a pipe)."""
    out = []
    drop_plans()
    plans = _KEPT.plans
    for name, data in items:
        try:
            plan = deid.analyze_file(name, _profile(options)) if data is None else \
                deid.analyze(data, _profile(options))
        except errors.DgfError as exc:
            out.append(Needs(name, error=Problem.of(exc)))
            continue
        plans[name] = plan
        out.append(Needs(name, frozenset(plan.uids), plan.patient_key))
    return out


def _header(plan: deid.DeidPlan, result: deid.Result) -> bytes:
    """The XML header of a de-identified object (a streamed one: from its skeleton)."""
    from dgf.dicom.xmlheader import header_xml  # pydicom and its charsets: for derived data only

    if result.layout is None:
        return header_xml(result.data)
    sk = deid.skeleton(plan, result)
    try:
        return header_xml(sk)  # type: ignore[arg-type]
    finally:
        sk.close()


def deidentify_items(items: list[tuple[str, bytes | None]], options: Options, uids: dict[str, str],
                     patients: dict[str, tuple[str, int]], spool: str = "") -> list[Deidentified]:
    """Step 2.  With ``spool`` (a directory on tmpfs), outputs above SPOOL_MIN bytes are written
    there and returned by name, which costs two copies instead of four through a pipe."""
    prof = _profile(options)
    out = []
    plans = _KEPT.plans
    for name, data in items:
        plan = plans.pop(name, None)
        try:
            if plan is None:
                plan = deid.analyze(data, prof) if data else deid.analyze_file(name, prof)
            patient, offset = patients[plan.patient_key]
            result = deid.apply(plan, deid.Pseudonyms(uids, patient, offset), prof)
            # The header published is the one the storing site derives from the bytes it
            # checks (ioserver put); only derived data, whose patient the header names, needs
            # it here.
            xml = _header(plan, result) if options.derived else b""
        except errors.DgfError as exc:
            out.append(Deidentified(name, error=Problem.of(exc)))
            continue
        finally:
            if plan is not None:
                plan.close()
        data, spooled = result.data, ""
        if spool and len(data) >= SPOOL_MIN:
            spooled = os.path.join(spool, result.key)
            with open(spooled, "wb") as fh:
                fh.write(data)
            data = b""
        out.append(Deidentified(name, data, result.key, xml, identity.encode(result.identity),
                                result.patient, result.study_uid, result.series_uid, result.sop_uid,
                                tuple(result.warnings), spooled=spooled, size=result.size,
                                layout=tuple(result.layout or ()),
                                blocks=result.blocks if result.layout is not None else None,
                                opaque=tuple(result.opaque)))
    drop_plans()
    return out


# --------------------------------------------------------------------------------------------
# Worker processes (dgf/workers.py): our own rather than multiprocessing, whose spawn mode
# re-imports the caller's main module (a script without a main guard would run twice) and whose
# fork mode would copy the SSH threads' locks.

STEPS: dict[str, Any] = {"analyze": analyze_items, "deidentify": deidentify_items}


class Workers:
    """A few de-identification worker processes; :meth:`map` splits a step's items over them."""

    def __init__(self, n: int) -> None:
        # Large outputs come back through files on tmpfs when there is one.
        shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        self.spool = tempfile.mkdtemp(prefix="dgf-spool-", dir=shm) if shm else ""
        self._workers = [workers.Worker("dgf.dicom.pipeline:serve") for _ in range(n)]

    def map(self, step: str, items: list[tuple[str, bytes | None]], *args: object) -> list[list[Any]]:
        n = len(self._workers)
        # A file goes to the same worker in both steps (by a stable hash of its name), so the
        # worker can reuse the parse from step 1.
        parts: list[list[tuple[str, bytes | None]]] = [[] for _ in range(n)]
        for name, data in items:
            # Step 2 needs no bytes: the worker kept its parse from step 1.
            parts[zlib.crc32(name.encode("utf-8", "surrogateescape")) % n].append(
                (name, b"" if step == "deidentify" else data))
        busy = []
        for worker, part in zip(self._workers, parts):
            if part:
                worker.send((step, part, args))
                busy.append(worker)
        out: list[list[Any]] = []
        for worker in busy:
            try:
                result = worker.recv()
            except EOFError as exc:
                raise errors.DgfError("a de-identification worker process died; see its error above.") from exc
            if isinstance(result, BaseException):
                raise result
            out.append(cast(list[Any], result))
        return out

    def close(self) -> None:
        for worker in self._workers:
            worker.close()
        if self.spool:
            shutil.rmtree(self.spool, ignore_errors=True)


def _step(request: object) -> object:
    step, items, args = cast(tuple[str, list[tuple[str, bytes | None]], tuple[Any, ...]], request)
    return STEPS[step](items, *args)


def serve() -> None:
    """A de-identification worker's loop (``Workers`` starts it)."""
    workers.serve(_step, lambda exc: errors.DgfError(f"de-identification worker failed ({type(exc).__name__})."))
