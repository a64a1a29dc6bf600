"""Records that cross layers (server replies, client API, FUSE), as frozen dataclasses."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

ROLES = ("admin", "clinician", "researcher", "site")
#: The extended attribute holding a file's de-identified header as XML.
HEADER_XATTR = "user.dgf.dicom"

#: Roles that may receive patient identity (re-identified files, the identity record).  Admins
#: manage principals but see identity only if they also hold a clinician principal.
IDENTITY_ROLES = frozenset({"clinician"})
#: Roles that may change the namespace (upload, mkdir, rename, remove).
WRITER_ROLES = frozenset({"admin", "clinician"})


@dataclass(frozen=True)
class Stat:
    """POSIX-like attributes of one namespace entry."""

    path: str
    ino: int
    is_dir: bool
    mode: int
    size: int
    mtime: float
    ctime: float
    nlink: int
    object_key: str | None = None
    #: (site, state) of each replica of a file's object ("ok", or "quarantined" after a site
    #: found its copy corrupt); filled by ``stat``, empty in listings.
    replicas: tuple[tuple[str, str], ...] = ()
    #: Copies the file's directory keeps (``stat`` only): fewer healthy replicas than this is
    #: under-replicated (asynchronous replication catching up, or a copy lost to repair).
    copies_wanted: int = 0

    def to_wire(self) -> dict[str, Any]:
        # Spelled out, not dataclasses.asdict: a listing sends thousands, and asdict's recursive
        # deep copy was most of the metaserver's time for ls of 1000 entries.
        d = {"path": self.path, "ino": self.ino, "is_dir": self.is_dir, "mode": self.mode,
             "size": self.size, "mtime": self.mtime, "ctime": self.ctime, "nlink": self.nlink,
             "object_key": self.object_key}
        if self.replicas:
            d["replicas"] = [list(r) for r in self.replicas]
        if self.copies_wanted:
            d["copies_wanted"] = self.copies_wanted
        return d

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Stat:
        if "replicas" in d:
            d = {**d, "replicas": tuple((str(site), str(state)) for site, state in d["replicas"] or ())}
        return cls(**d)


@dataclass(frozen=True)
class Replica:
    site: str
    state: str  # "ok" or "lost"


@dataclass(frozen=True)
class ObjectInfo:
    """An immutable stored object: key is the SHA-256 of its bytes."""

    key: str
    size: int
    replicas: tuple[Replica, ...] = field(default_factory=tuple)

    def to_wire(self) -> dict[str, Any]:
        return {"key": self.key, "size": self.size,
                "replicas": [[r.site, r.state] for r in self.replicas]}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> ObjectInfo:
        return cls(d["key"], d["size"], tuple(Replica(s, st) for s, st in d["replicas"]))


@dataclass(frozen=True)
class Site:
    name: str
    host: str
    port: int
    host_key: str  # OpenSSH public key line of the site's SSH host key
    zone: str = ""  # a failure domain (a building, a rack); copies go to distinct zones
    untrusted: bool = False  # holds sealed objects only (dgf/envelope.py); set by an admin

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Site:
        return cls(str(d["name"]), str(d["host"]), int(d["port"]), str(d["host_key"]), str(d.get("zone") or ""),
                   bool(d.get("untrusted")))


@dataclass(frozen=True)
class Principal:
    name: str
    role: str
    public_key: str  # OpenSSH public key line
    fingerprint: str

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Principal:
        return cls(**d)


class ResolvedFile(NamedTuple):
    """One file of a ``down.resolve`` reply (on the wire: ``[path, key, size, sites]``)."""

    path: str
    key: str
    size: int
    sites: list[str]            # the sites holding a copy, in the order to read them

    @classmethod
    def all_of(cls, resolved: dict[str, Any]) -> list[ResolvedFile]:
        return [cls(str(p), str(k), int(n), list(s)) for p, k, n, s in resolved["files"]]


def outermost(paths: Iterable[str]) -> list[str]:
    """``paths`` once each, without those inside another of them: each file under them is under
    exactly one ("/" three thousand times is "/"; "/a" and "/a/b" are "/a")."""
    wanted = {p.rstrip("/") or "/" for p in paths}
    if "/" in wanted:
        return ["/"]
    return sorted(r for r in wanted
                  if not any("/".join(r.split("/")[:i]) in wanted for i in range(2, r.count("/") + 1)))
