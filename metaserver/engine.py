"""The metadata engine interface (``MetaEngine``) and the checks every backend shares.

Paths cross this interface as absolute POSIX strings; the base class normalises and validates them
once, backends implement ``_do_*`` steps.  Errors are :mod:`dgf.errors` classes carrying errno, so
the server and the FUSE layer translate them without knowing the backend.
"""

from __future__ import annotations

import dataclasses
import gc
import posixpath
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dgf import errors
from dgf.types import Principal, Site, Stat

if TYPE_CHECKING:
    import sqlalchemy as sa

    from metaserver.planner import Catalogue

    #: What the query planner hands the engine: a select of inode numbers (None: every indexed file).
    CandidateSelect = sa.Select[Any] | None

MAX_NAME = 255
MAX_PATH = 4096


def norm_path(path: str) -> str:
    """Validate and normalise an absolute namespace path ("/a/b")."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise errors.UsageError(f"namespace paths are absolute, got {path!r}.")
    if len(path) > MAX_PATH or "\0" in path:
        raise errors.UsageError("the path is too long or contains a NUL byte.")
    if path.isascii() and "//" not in path and "/." not in path and path[-1] != "/" \
            and max(map(len, path.split("/"))) <= MAX_NAME:
        return path            # normal already (a commit's every path, as clients send them)
    parts = [p for p in path.split("/") if p and p != "."]
    if ".." in parts:
        raise errors.UsageError(f"'..' is not allowed in namespace paths: {path!r}.")
    for p in parts:
        if len(p.encode()) > MAX_NAME:
            raise errors.UsageError(f"the name {p[:40]!r}... is longer than {MAX_NAME} bytes.")
    return "/" + "/".join(parts)


def split_path(path: str) -> tuple[str, str]:
    path = norm_path(path)
    if path == "/":
        raise errors.UsageError("the root directory cannot be created, renamed or removed.")
    return posixpath.split(path)


@dataclass(frozen=True)
class UploadFacts:
    """See :meth:`MetaEngine.upload_facts`."""

    sites: list[Site]
    settings: dict[str, str]
    overrides: dict[str, int]


class _CollectorPause:
    """No garbage-cycle collection while a commit builds and writes its rows.

    A commit of thousands of headers keeps hundreds of thousands of young objects alive (parsed
    index rows, statement parameters) until it ends; the collector, triggered by their number,
    traversed them again and again in full collections (a fifth of the loader's CPU).  They are
    freed by reference counting when the commit returns; a cycle made meanwhile, in any thread,
    waits for the next collection.  Nested and concurrent commits share one pause; the
    collector resumes when the last one ends (if it was running when the first began).  Commits
    that overlap without end (uploaders one after another) never let it resume: a commit that
    ends after ``LONGEST_S`` of one pause collects once, so cycles cannot pile up."""

    #: Seconds of one unbroken pause after which an ending commit collects (~0.1 s of work).
    LONGEST_S = 10.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._resume = False
        self._since = 0.0

    def __enter__(self) -> None:
        with self._lock:
            if not self._depth:
                self._resume = gc.isenabled()
                self._since = time.monotonic()
                gc.disable()
            self._depth += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._depth -= 1
            if not self._depth:
                if self._resume:
                    gc.enable()
                return
            overdue = self._resume and time.monotonic() - self._since >= self.LONGEST_S
            if overdue:
                self._since = time.monotonic()
        if overdue:
            gc.collect()               # outside the lock: finalizers run here


collector_paused = _CollectorPause()


#: Objects a step released (no file names them any more): object key -> {site holding it: the
#: generation of its replica there (None where it was recorded before generations)}.  The caller
#: has the sites delete that generation (ioserver ObjectStore.delete).
Released = dict[str, dict[str, int | None]]
#: How long after a site stored (or re-stamped) an object its receipt may be committed: an
#: upload commits within seconds or minutes of its puts, a repair or an adoption at once.
#: A release remembers the generations it deleted for twice this long (schema ``released_gens``).
RECEIPT_TTL_S = 3600.0


@dataclass(frozen=True)
class NewFile:
    """One uploaded file to publish: path, object, its site, xattrs and sealed identity."""

    path: str
    object_key: str
    size: int
    site: str
    xattrs: dict[str, bytes]
    patient: str | None = None
    identity: bytes | None = None  # sealed (encrypted) identity record
    mode: int = 0o644
    blocks: bytes = b""            # per-block digests (dgf/integrity.py), as the site signed them
    copies: tuple[str, ...] = ()   # further sites holding a durable copy (replication)
    original_size: int | None = None  # the identified original's size (with ``identity``)
    wanted: int = 0                # copies its directory keeps; more than it has: queued for repair
    stored_size: int = 0           # a sealed object's stored size (``size`` is its plaintext's)
    seal: str | None = None        # a sealed object's "SALT_HEX:STUDY" (dgf/envelope.py)
    linked: bool = False           # no bytes travelled: another name for an object already stored
    gens: tuple[tuple[str, int], ...] = ()  # (site, generation) its receipts signed for


class MetaEngine(ABC):
    """Namespace, objects and replicas, xattrs, query, identity storage, principals, sites, audit."""

    # -- namespace ------------------------------------------------------------------------

    def stat(self, path: str) -> Stat:
        return self._do_stat(norm_path(path))

    def readdir(self, path: str) -> list[Stat]:
        return self._do_readdir(norm_path(path))

    def mkdir(self, path: str, mode: int = 0o755, parents: bool = False) -> Stat:
        split_path(path)
        return self._do_mkdir(norm_path(path), mode & 0o7777, parents)

    def rename(self, src: str, dst: str) -> Released:
        """Atomic rename; returns the objects released (``Released``) when a file was replaced."""
        src, dst = norm_path(src), norm_path(dst)
        split_path(src), split_path(dst)
        if dst == src:
            self._do_stat(src)  # rename(2): a missing source is ENOENT even onto itself
            return {}
        return self._do_rename(src, dst)

    def unlink(self, path: str) -> Released:
        """Remove a file; return the objects released (``Released``)."""
        split_path(path)
        return self._do_unlink(norm_path(path))

    def rmdir(self, path: str) -> None:
        split_path(path)
        self._do_rmdir(norm_path(path))

    def rmtree(self, path: str) -> tuple[int, Released]:
        """Remove a directory and everything under it in one transaction; return the number of
        files removed and the released objects (see ``Released``)."""
        split_path(path)
        return self._do_rmtree(norm_path(path))

    def chmod(self, path: str, mode: int) -> None:
        self._do_chmod(norm_path(path), mode & 0o7777)

    def create_files(self, files: list[NewFile], replace: bool = False
                     ) -> tuple[list[Stat], Released]:
        """Publish a batch of uploaded files in one transaction (parents made as needed).

        Returns the new entries and the objects released by replaced files."""
        normed = []
        for f in files:
            path = norm_path(f.path)
            if path == "/":
                split_path(path)                # the root's own error
            normed.append(f if path == f.path else dataclasses.replace(f, path=path))
        with collector_paused:
            return self._do_create_files(normed, replace)

    # -- xattrs ---------------------------------------------------------------------------

    def getxattr(self, path: str, name: str) -> bytes:
        return self._do_getxattr(norm_path(path), name)

    def listxattr(self, path: str) -> list[str]:
        return self._do_listxattr(norm_path(path))

    def setxattr(self, path: str, name: str, value: bytes, owner: str | None = None,
                 quota: tuple[int, int] | None = None, guard: bool = False) -> None:
        """Set a ``user.*`` attribute; with ``owner``, charged to that principal within its
        ``quota`` of (attributes, bytes); with ``guard``, refused if another principal set it."""
        if not name.startswith("user.") or len(name) > 255:
            raise errors.UsageError(f"only 'user.*' extended attributes may be set, not {name[:64]!r}.")
        self._do_setxattr(norm_path(path), name, value, owner, quota, guard)

    def removexattr(self, path: str, name: str, by: str | None = None) -> None:
        """Remove an attribute; with ``by``, refused unless that principal set it."""
        self._do_removexattr(norm_path(path), name, by)

    # -- abstract steps -------------------------------------------------------------------

    @abstractmethod
    def _do_stat(self, path: str) -> Stat: ...

    @abstractmethod
    def _do_readdir(self, path: str) -> list[Stat]: ...

    @abstractmethod
    def _do_mkdir(self, path: str, mode: int, parents: bool) -> Stat: ...

    @abstractmethod
    def _do_rename(self, src: str, dst: str) -> Released: ...

    @abstractmethod
    def _do_unlink(self, path: str) -> Released: ...

    @abstractmethod
    def _do_rmdir(self, path: str) -> None: ...

    @abstractmethod
    def _do_rmtree(self, path: str) -> tuple[int, Released]: ...

    @abstractmethod
    def _do_chmod(self, path: str, mode: int) -> None: ...

    @abstractmethod
    def _do_create_files(self, files: list[NewFile], replace: bool
                          ) -> tuple[list[Stat], Released]: ...

    @abstractmethod
    def _do_getxattr(self, path: str, name: str) -> bytes: ...

    @abstractmethod
    def _do_listxattr(self, path: str) -> list[str]: ...

    @abstractmethod
    def _do_setxattr(self, path: str, name: str, value: bytes, owner: str | None = None,
                     quota: tuple[int, int] | None = None, guard: bool = False) -> None: ...

    @abstractmethod
    def _do_removexattr(self, path: str, name: str, by: str | None = None) -> None: ...

    # -- objects, query, identity, principals, sites, audit -------------------------------

    @abstractmethod
    def object_replicas(self, keys: list[str]) -> dict[str, list[str]]:
        """Object key -> sites holding a healthy replica."""

    @abstractmethod
    def object_blocks(self, keys: list[str]) -> dict[str, bytes]:
        """Object key -> hash list (dgf/integrity.py), for those objects that have one."""

    @abstractmethod
    def set_replica_state(self, site: str, keys: list[str], state: str) -> int:
        """Mark a site's replicas (``quarantined``: no reader is sent there); return how many."""

    @abstractmethod
    def replica_states(self, key: str) -> list[tuple[str, str]]:
        """(site, state) of every replica of one object."""

    @abstractmethod
    def replica_rows(self, keys: list[str]) -> dict[str, list[tuple[str, str]]]:
        """Object key -> (site, state) of each of its replicas, whatever their state."""

    @abstractmethod
    def replica_gens(self, keys: list[str]) -> dict[str, dict[str, int]]:
        """Object key -> {site: generation} of its replicas recorded with one."""

    @abstractmethod
    def add_replica(self, key: str, site: str, gen: int | None = None) -> bool:
        """Record a healthy copy of a known object at ``site``, of generation ``gen`` (as its
        receipt signed); False if the object is unknown."""

    @abstractmethod
    def rewrap_patient_keys(self, rewrap: Callable[[bytes, bytes], bytes], kek_id: str) -> int:
        """Re-wrap every patient data key and record the new key-encryption key, atomically."""

    @abstractmethod
    def add_grant(self, principal: str, query: str, xpath: str, until: float, by: str,
                  sign: Callable[[int], str]) -> int:
        """Record a cohort grant (signed by ``sign(id)``); its id."""

    @abstractmethod
    def grants(self, principal: str | None = None) -> list[dict[str, Any]]:
        """Every grant (or one principal's): id, principal, query, xpath, until, token..."""

    @abstractmethod
    def remove_grant(self, gid: int) -> None: ...

    @abstractmethod
    def object_header(self, key: str) -> bytes | None:
        """The XML header on record for an object (the one its storing site derived)."""

    @abstractmethod
    def repair_queue(self, limit: int) -> list[tuple[str, int, int, list[tuple[str, str]]]]:
        """The oldest objects queued for more copies: (key, size, copies wanted, replicas)."""

    @abstractmethod
    def repairs_done(self, keys: list[str]) -> None:
        """Take objects that have their copies off the repair queue."""

    @abstractmethod
    def drop_replica(self, key: str, site: str) -> bool:
        """Forget ``site``'s copy of an object (missing or corrupt there, or about to be deleted:
        an extra copy, a draining site's); True if it was known.  Its generation is remembered
        as deleted, so a receipt signed for those bytes records no copy and publishes no name."""

    @abstractmethod
    def note_orphans_deleted(self, site: str, keys: list[str], gens: dict[str, int]) -> set[str]:
        """Before fsck deletes orphans ``keys`` at ``site``: those the archive records there
        (then nothing is noted), else none, and each generation of ``gens`` (by key) is
        remembered as deleted, so a receipt signed for those bytes publishes nothing."""

    @abstractmethod
    def objects_at(self, site: str, after: str, limit: int) -> list[tuple[str, int, list[tuple[str, str]]]]:
        """(key, size, every replica's (site, state)) of the objects recorded at ``site``, in key
        order after ``after``, at most ``limit``."""

    @abstractmethod
    def backup_to(self, path: str) -> None:
        """Write a consistent copy of the whole database to ``path`` while it keeps serving."""

    @abstractmethod
    def remove_site(self, name: str) -> int:
        """Forget a site: its registration and every record of a copy there; return how many."""

    @abstractmethod
    def recorded_at(self, site: str, keys: list[str]) -> set[str]:
        """Those of ``keys`` the archive records a copy of at ``site`` (in any state)."""

    @abstractmethod
    def audited(self, principal: str, action: str = "", target: str = "", detail: str = "",
                released: str = "") -> Any:
        """A context in which this thread's next transaction also writes its audit entries."""

    @abstractmethod
    def saved_query_count(self, owner: str) -> int: ...

    @abstractmethod
    def walk_files(self, root: str) -> Iterator[tuple[str, str, int]]:
        """(path, object key, size) of every file at or under ``root``."""

    @abstractmethod
    def walk_files_many(self, roots: list[str]) -> Iterator[tuple[str, str, int]]:
        """``walk_files`` of each of ``roots`` in turn, in one pass where the roots are files."""

    @property
    @abstractmethod
    def dialect(self) -> str:
        """The SQL dialect the query planner writes for: "sqlite" or "postgresql"."""

    @abstractmethod
    def query_catalogue(self) -> Catalogue:
        """The catalogue of indexed element paths the planner resolves patterns against."""

    @abstractmethod
    def query_candidates(self, root: str, plan: CandidateSelect, with_xml: bool, deadline: float | None = None,
                         after: int = 0, batch: int = 2000) -> Iterator[tuple[int, str, tuple[str, str, str], bytes | None]]:
        """(ino, path, (patient, study, series), XML if asked) of indexed files under ``root`` in
        ``plan`` with an inode above ``after``, in inode order, read from the database ``batch``
        rows at a time."""

    @abstractmethod
    def query_estimate(self, select: sa.Select[Any], sample: int = 20_000) -> int:
        """Rows a candidate select returns among a sample of the indexed files."""

    @abstractmethod
    def query_count(self, plan: CandidateSelect) -> int:
        """How many indexed files ``plan`` selects archive-wide."""

    @abstractmethod
    def save_query(self, name: str, xpath: str, owner: str) -> None: ...

    @abstractmethod
    def saved_queries(self) -> dict[str, str]: ...

    @abstractmethod
    def remove_query(self, name: str) -> None: ...

    @abstractmethod
    def identity(self, object_key: str) -> tuple[str, bytes, bytes] | None:
        """(patient pseudonym, wrapped patient data key, sealed record) or None."""

    @abstractmethod
    def replication_overrides(self) -> dict[str, int]:
        """Directory path -> replication factor, for the directories that set one
        (``user.dgf.replicas``; the rest inherit from their nearest ancestor)."""

    @abstractmethod
    def identified_sizes(self, keys: list[str]) -> dict[str, int]:
        """Object key -> size of the identified original, for the keys that have one."""

    @abstractmethod
    def patient_key(self, patient: str) -> bytes | None:
        """The wrapped data key of a patient, if one exists."""

    @abstractmethod
    def add_patient_key(self, patient: str, wrapped: bytes) -> bytes:
        """Store a wrapped data key unless one exists; return the one that is stored."""

    @abstractmethod
    def patient_keys(self, names: list[str]) -> dict[str, bytes]:
        """The wrapped data keys of those of ``names`` that have one."""

    @abstractmethod
    def check_files(self, files: list[tuple[str, str, str]]) -> list[tuple[str, str]]:
        """What is already stored for ``(path, object key, SOP Instance UID)`` entries."""

    @abstractmethod
    def add_patient_keys(self, wrapped: dict[str, bytes]) -> None:
        """Store several wrapped data keys in one transaction; existing ones are kept."""

    @abstractmethod
    def erase_patient(self, patient: str) -> int:
        """Destroy a patient's data key (crypto-erasure) and identity records; return records removed."""

    @abstractmethod
    def add_principal(self, p: Principal) -> None: ...

    @abstractmethod
    def remove_principal(self, name: str) -> None: ...

    @abstractmethod
    def principals(self) -> list[Principal]: ...

    @abstractmethod
    def principal_by_fingerprint(self, fp: str) -> Principal | None: ...

    @abstractmethod
    def register_site(self, site: Site, pin: bool = False) -> None: ...

    @abstractmethod
    def sites(self) -> list[Site]: ...

    @abstractmethod
    def set_site_trust(self, name: str, untrusted: bool) -> None: ...

    @abstractmethod
    def object_seals(self, keys: list[str]) -> dict[str, str]: ...

    @abstractmethod
    def study_keys(self, studies: list[str]) -> dict[str, tuple[str, bytes]]: ...

    @abstractmethod
    def add_study_keys(self, rows: dict[str, tuple[str, bytes]]) -> None: ...

    def audit(self, principal: str, action: str, target: str, outcome: str, detail: str = "") -> None:
        self.audit_many([(principal, action, target, outcome, detail)])

    @abstractmethod
    def get_setting(self, name: str) -> str | None:
        """An archive-wide setting (e.g. the de-identification options), None if unset."""

    @abstractmethod
    def upload_facts(self, settings: tuple[str, ...]) -> UploadFacts:
        """What placing an upload reads afresh, in one transaction: the registered sites, the
        named settings that are set, and :meth:`replication_overrides`."""

    @abstractmethod
    def set_setting(self, name: str, value: str) -> None: ...

    @abstractmethod
    def audit_many(self, entries: list[tuple[str, str, str, str, str]]) -> None:
        """Append (principal, action, target, outcome, detail) entries in one transaction."""

    @abstractmethod
    def audit_log(self, limit: int = 100, after: int = 0) -> list[dict[str, Any]]: ...

    @abstractmethod
    def audit_verify(self) -> dict[str, Any]:
        """Check the audit hash chain: records, legacy (unchained) ones, the first broken id."""

    @abstractmethod
    def close(self) -> None: ...
