"""The ``dgf-meta`` service and the ``dgf-metaserver`` process.

Every verb is checked against :data:`POLICY` (role -> allowed) before it runs; identity releases,
refusals, grants and deletes are written to the append-only audit table.
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lxml import etree

from dgf import crypto, envelope, errors, placement, ssh, wire
from dgf.config import MetaserverConfig
from dgf.dicom import identity
from dgf.dicom.profile import OPTIONS, Options
from dgf.integrity import BLOCK, DIGEST, list_digest
from dgf.limits import DEFAULT as DEFAULT_LIMITS
from dgf.limits import Limits
from dgf.sshlib import paramiko
from dgf.types import IDENTITY_ROLES, ROLES, WRITER_ROLES, Principal, ResolvedFile, Site, outermost
from metaserver import query
from metaserver.engine import RECEIPT_TTL_S, MetaEngine, NewFile, Released, norm_path
from metaserver.sql import REPLICAS_XATTR, SqlEngine
from metaserver.vault import Vault
from metaserver.vaultkey import PASSPHRASE_ENV, VaultSource, open_keys

log = logging.getLogger("dgf.metaserver")

SUBSYSTEM = "dgf-meta"
USERS = frozenset({"admin", "clinician", "researcher"})
WRITERS = WRITER_ROLES
UPLOADERS = IDENTITY_ROLES

#: Which roles may call which verb.  Researchers read de-identified data and annotate with their
#: own user.* attributes; writers change the namespace; sites only register and learn keys.
POLICY: dict[str, frozenset[str]] = {
    "whoami": frozenset(ROLES),
    "site.register": frozenset({"site"}), "site.work": frozenset({"site"}),
    "site.replica.add": frozenset({"site"}), "admin.replicas.mode": frozenset({"admin"}),
    "site.keys": frozenset({"site"}),
    "site.report": frozenset({"site"}),
    "site.list": USERS,
    "ns.stat": USERS, "ns.readdir": USERS,
    "ns.mkdir": WRITERS, "ns.rename": WRITERS, "ns.unlink": WRITERS, "ns.rmdir": WRITERS, "ns.rmtree": WRITERS,
    "ns.chmod": WRITERS,
    "xattr.get": USERS, "xattr.get_many": USERS, "xattr.list": USERS, "xattr.set": USERS, "xattr.remove": USERS,
    "find": USERS, "find.next": USERS, "find.close": USERS,
    "query.save": USERS, "query.list": USERS, "query.remove": USERS,
    # Uploads learn pseudonyms and date shifts (they link a patient to their de-identified data):
    # only roles that may see identity upload.
    "up.prepare": UPLOADERS, "up.check": UPLOADERS, "up.commit": UPLOADERS, "up.keys": UPLOADERS,
    "admin.site.trust": frozenset({"admin"}),
    "down.resolve": USERS, "identity.sizes": IDENTITY_ROLES,
    "admin.principal.add": frozenset({"admin"}), "admin.principal.remove": frozenset({"admin"}),
    "admin.principal.list": frozenset({"admin"}), "admin.audit": frozenset({"admin"}),
    "admin.audit.verify": frozenset({"admin"}), "admin.erase": frozenset({"admin"}),
    "admin.vault.rotate": frozenset({"admin"}), "admin.access": frozenset({"admin"}),
    "admin.grant.add": frozenset({"admin"}), "admin.grant.list": frozenset({"admin"}),
    "admin.grant.remove": frozenset({"admin"}), "grants.mine": USERS,
    "deid.options": USERS | {"site"}, "admin.deid.set": frozenset({"admin"}),
    "replicas.get": USERS, "admin.replicas.set": frozenset({"admin"}),
    "admin.fsck.objects": frozenset({"admin"}), "admin.fsck.caps": frozenset({"admin"}),
    "admin.fsck.recorded": frozenset({"admin"}), "admin.fsck.copy": frozenset({"admin"}),
    "admin.fsck.delete": frozenset({"admin"}), "admin.fsck.adopt": frozenset({"admin"}),
    "admin.replica.add": frozenset({"admin"}), "admin.replica.drop": frozenset({"admin"}),
    "admin.site.drain": frozenset({"admin"}), "admin.site.objects": frozenset({"admin"}),
    "admin.site.remove": frozenset({"admin"}), "admin.site.add": frozenset({"admin"}), "admin.backup": frozenset({"admin"}),
}

#: xattrs the system writes; users may read them but never set or remove them.
RESERVED_XATTR_PREFIX = "user.dgf."


#: Objects one delete capability names (a token of ~120 KB; a site reads frames of 1 MiB).
DELETE_CAP_KEYS = 1000
#: Released objects a reply carries in its header; more travel in its payload.
RELEASE_IN_HEADER = 1000

#: Query results travel in pages of at most PAGE_ROWS rows or PAGE_SECONDS of scanning.
PAGE_ROWS = 5000
PAGE_SECONDS = 0.5
#: The longest any query may run, whatever the client asks (--timeout can only lower it).
QUERY_TIME_LIMIT_S = 300.0
QUERY_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
#: Seconds a cached list of enrolled principals is trusted (removal takes effect within this).
PRINCIPALS_TTL_S = 2.0
#: Seconds a researcher's granted file set is reused: revocation and expiry take effect within it.
GRANT_TTL_S = 2.0
#: Seconds archive-wide settings read on hot paths are reused (the access mode, copy numbers).
SETTINGS_TTL_S = 2.0
#: A site that has not asked for copies to make (site.work) for this many of its intervals
#: (repair_interval_s, 5 s) is taken as down by background replication, which places copies on
#: the others.
SITE_ALIVE_INTERVALS = 6
#: Queued repairs looked at per site.work request (the oldest first).
REPAIR_SCAN = 2000
#: The principal an authentication gets while the database cannot say who a key belongs to:
#: every verb it calls is answered "busy", never a misleading "refused our key".
BUSY = Principal("(busy)", "busy", "", "")


def _generation(claims: dict[str, Any], what: str) -> int | None:
    """The generation a site's receipt signed for its copy (None from a site older than them),
    refused when older than RECEIPT_TTL_S: a generation is the site's clock when it stored the
    copy, and a receipt kept for later could name bytes deleted since (a release)."""
    gen = claims.get("g")
    if type(gen) is not int:
        return None
    age = time.time() - gen / 1e9
    if age > RECEIPT_TTL_S + crypto.CLOCK_LEEWAY_S:
        raise errors.PermissionDenied(
            f"the receipt of site {claims.get('site')} for {what} was signed {age / 3600:.1f} h ago; a receipt "
            f"is good for {RECEIPT_TTL_S / 3600:.0f} h after the site stored the bytes: upload again.")
    return gen


def _lost_and_found(key: str, xml: bytes) -> str:
    """Where an adopted object goes: /lost+found/PATIENT/STUDY/SERIES/SOP.dcm, from its
    (de-identified, pseudonymised) header; a value that is absent or not a plain name is
    replaced by the object's key."""
    try:
        root = etree.fromstring(xml, parser=etree.XMLParser(resolve_entities=False, no_network=True))
    except etree.XMLSyntaxError as exc:
        raise errors.InvalidDicom(f"the header of object {key[:16]}... is not XML ({exc}).") from exc
    parts = []
    for keyword in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        value = (root.findtext(keyword) or "").strip()
        parts.append(value if re.fullmatch(r"[A-Za-z0-9._-]{1,64}", value) else key[:16])
    return "/lost+found/" + "/".join(parts[:3]) + f"/{parts[3]}.dcm"


def _read_order(key: str, sites: list[str]) -> list[str]:
    """The order readers try an object's replicas in: by a hash of object and site, so the
    reads of many objects spread over every site that holds copies."""
    return sorted(sites, key=lambda site: hashlib.sha256(f"{key}/{site}".encode()).digest())


#: The settings an upload is placed by (MetaService._placing).
UPLOAD_SETTINGS = ("sites.draining", "replication.mode", "deid.options")


def _draining_of(stored: str | None) -> set[str]:
    return set(json.loads(stored or "[]"))


def _mode_of(stored: str | None) -> str:
    return stored or "sync"


def _deid_names_of(stored: str | None) -> list[str]:
    return list(json.loads(stored)) if stored is not None else Options().enabled()


@dataclass(frozen=True)
class _Placing:
    """What an upload is placed by: the registered sites, those draining, the directories'
    numbers of copies, whether copies beyond the first are made in the background, and the
    archive's de-identification options."""

    known: list[Site]
    draining: set[str]
    overrides: dict[str, int]
    background: bool
    deid: list[str]

    @property
    def takers(self) -> list[Site]:
        """The sites that take new copies."""
        return [st for st in self.known if st.name not in self.draining]


@dataclass
class _Cursor:
    """An open query between pages: no database connection and no worker is held.

    Instance-level scans resume after the last inode examined (keyset pagination); grouped
    results (--level) are complete after the first page and kept as their remaining lines."""

    owner: str
    used: float
    query: query.Query | None = None
    root: str = "/"
    show: list[str] = dataclasses.field(default_factory=list)
    after: int = 0
    left: int | None = None            # rows still allowed by --limit (None: no limit)
    budget: float = QUERY_TIME_LIMIT_S  # seconds of scanning the query may still spend
    lines: list[bytes] | None = None
    allowed: Callable[[str], bool] | None = None   # a researcher's cohort grants (grant-only)
    rows: int = 0                      # rows of the next page (0: PAGE_ROWS); doubles each page
    paged: bool = False                # asked for small pages: rows name their inodes


class Principals:
    """Enrolled principals by key fingerprint, re-read from the database at most every
    PRINCIPALS_TTL_S seconds: authentication does not take a pooled connection each time, and a
    principal an admin removes loses its open sessions within that time."""

    def __init__(self, engine: MetaEngine, ttl: float = PRINCIPALS_TTL_S) -> None:
        self._engine = engine
        self._ttl = ttl
        self._by_fp: dict[str, Principal] | None = None
        self._sites: list[Principal] = []         # the role "site" among them, picked once a read
        self._read = 0.0
        self._lock = threading.Lock()

    def _current(self) -> dict[str, Principal] | None:
        with self._lock:
            if self._by_fp is None or time.monotonic() - self._read > self._ttl:
                try:
                    self._by_fp = {q.fingerprint: q for q in self._engine.principals()}
                    self._sites = [q for q in self._by_fp.values() if q.role == "site"]
                    self._read = time.monotonic()
                except errors.Busy:
                    log.warning("the principal list could not be refreshed: the database is busy")
            return self._by_fp

    def sites(self) -> list[Principal] | None:
        """The enrolled sites as last read (None: never read, the database busy): what a commit
        checks its receipts against, without going through every principal."""
        return None if self._current() is None else self._sites

    def lookup(self, fingerprint: str) -> Principal | None:
        known = self._current()
        if known is None:
            return BUSY
        found = known.get(fingerprint)
        if found is None and time.monotonic() - self._read > self._ttl:
            return BUSY                        # could not re-read: do not call the key unknown
        return found

    def forget(self) -> None:
        with self._lock:
            self._by_fp = None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass
class _Scope:
    """What a researcher may see in a grant-only archive: the files its unexpired grants'
    queries match, and the directories above them."""

    files: set[str]
    dirs: set[str]
    made: float
    until: float = 0.0          # when the first of the grants it was made from ends

    def allows(self, path: str) -> bool:
        return path in self.files

    def shows(self, path: str, is_dir: bool) -> bool:
        return path in self.dirs if is_dir else path in self.files


#: Each commit entry's fields: their types (absent counts as None where None is allowed).
_ENTRY_FIELDS: dict[str, tuple[type, ...]] = {
    "path": (str,), "key": (str,), "size": (int,), "site": (str,),
    "receipt": (str, type(None)), "patient": (str, type(None)), "identity": (str, type(None)),
    "derived_from": (str, type(None)), "blocks": (str, type(None)), "copies": (list, type(None)),
    "xattrs": (dict, type(None)), "seal": (dict, type(None)), "xml": (str, type(None)),
}
#: The one attribute a commit may set beside the header: a reconstruction's provenance.
_COMMIT_XATTRS = frozenset({"user.dgf.provenance"})
_HEX_KEY = re.compile(r"[0-9a-f]{64}")


def _check_entry(n: int, f: dict[str, Any], limits: Limits) -> None:
    """Refuse commit entry ``n`` by name unless each field has its type (its path is
    normalised in place), before anything of the commit is used.  A commit may set no attribute
    but a derived file's provenance: the header is the one its site derived, and user.*
    attributes are set through xattr.set, which knows their owner and quota."""
    for name, types in _ENTRY_FIELDS.items():
        value = f.get(name)
        if not isinstance(value, types) or isinstance(value, bool):
            want = " or ".join("null" if t is type(None) else {"str": "a string", "int": "an integer",
                               "list": "a list", "dict": "an object"}[t.__name__] for t in types)
            raise errors.UsageError(f"entry {n} of the commit: its {name!r} is not {want}.")
    where = f"entry {n} of the commit ({str(f['path'])[:200]!r})"
    path = norm_path(f["path"])
    if path == "/":
        raise errors.UsageError(f"{where} names the root directory, which is not a file.")
    f["path"] = path
    if not _HEX_KEY.fullmatch(f["key"]) or f["size"] < 0:
        raise errors.UsageError(f"{where} needs an object key of 64 hex digits and a size of 0 or more.")
    for c in f.get("copies") or []:
        if not isinstance(c, dict) or not isinstance(c.get("site"), str) or not isinstance(c.get("receipt"), str):
            raise errors.UsageError(f"{where} lists a copy that is not a site and a receipt.")
    if f.get("identity") is not None and f.get("patient") is None:
        raise errors.UsageError(f"{where} carries an identity record but no patient.")
    for name, value in (f.get("xattrs") or {}).items():
        if name not in _COMMIT_XATTRS or not f.get("derived_from"):
            raise errors.PermissionDenied(
                f"{where} sets the attribute {str(name)[:64]!r}; a commit sets none but a derived file's "
                "provenance (others go through xattr.set once the file exists); nothing was published.")
        if not isinstance(value, str) or len(value.encode("utf-8", "surrogatepass")) > limits.xattr_value:
            raise errors.UsageError(f"{where}: its provenance is not a string of at most "
                                    f"{limits.xattr_value} bytes.")


def _base64(f: dict[str, Any], name: str) -> bytes:
    """Field ``name`` of a (checked) commit entry, decoded; decoded once, where it is used."""
    try:
        return base64.b64decode(f.get(name) or "", validate=True)
    except ValueError as exc:
        raise errors.UsageError(f"{f['path']} in the commit: its {name!r} is not base64.") from exc


class _Receipts:
    """A commit's receipts, verified: a site's own token for one object, or ``REF#i``, entry
    ``i`` of the batch receipt the commit carries as ``receipts[REF]`` (ioserver
    ``_batch_receipt``), whose signature is checked once however many files name it."""

    def __init__(self, site_keys: dict[str, Any], batches: dict[str, str]) -> None:
        self._keys, self._batches = site_keys, batches
        self._verified: dict[tuple[str, str], tuple[list[Any], list[Any]]] = {}

    def __call__(self, site: str, receipt: object) -> dict[str, Any]:
        if not isinstance(receipt, str):
            raise errors.PermissionDenied("a receipt in the commit is not a string.")
        ref, sep, index = receipt.partition("#")
        if not sep:
            return crypto.verify_token(self._keys[site], receipt)
        verified = self._verified.get((site, ref))
        if verified is None:
            if ref not in self._batches:
                raise errors.PermissionDenied(f"receipt {receipt[:40]!r} names a batch receipt the commit does not carry.")
            claims = crypto.verify_token(self._keys[site], self._batches[ref])
            objs, gens = claims.get("objs"), claims.get("gens")
            if (claims.get("t"), claims.get("site")) != ("receipts", site) or not isinstance(objs, list):
                raise errors.PermissionDenied(f"batch receipt {ref!r} is not site {site}'s.")
            # A site older than generations (2026-12-03) signs none.
            verified = self._verified[site, ref] = (objs, gens if isinstance(gens, list) else [])
        objs, gens = verified
        i = int(index) if index.isascii() and index.isdigit() else len(objs)
        entry = objs[i] if i < len(objs) else None
        if not isinstance(entry, list) or len(entry) != 4:
            raise errors.PermissionDenied(f"receipt {receipt[:40]!r} names no object of its batch.")
        key, size, blocks, header = entry
        gen = gens[i] if i < len(gens) else None
        # The claims a single receipt carries (ioserver _receipt), absent where empty.
        return {"t": "receipt", "site": site, "key": key, "size": size, **({"g": gen} if gen is not None else {}),
                **({"bl": blocks} if blocks else {}), **({"xh": header} if header else {})}


class MetaService(wire.Service):
    def __init__(self, engine: MetaEngine, vault: Vault, signing_key: Any,
                 limits: Limits = DEFAULT_LIMITS, principals: Principals | None = None) -> None:
        super().__init__()
        self.engine = engine
        self.vault = vault
        self._signing_key = signing_key
        self.limits = limits
        self.principals = principals
        self.dialect = engine.dialect
        self.query_time_limit = QUERY_TIME_LIMIT_S
        self._cursors: dict[str, _Cursor] = {}
        self._cursor_lock = threading.Lock()
        self._issued: dict[str, collections.deque[tuple[float, int]]] = {}    # principal -> (time, n)
        self.vault_source: VaultSource | None = None
        self._scopes: dict[str, _Scope] = {}
        self._settings: dict[str, tuple[float, Any]] = {}
        self._asking: dict[str, float] = {}        # site -> when it last asked for copies to make
        self._site_key_objects: dict[str, Any] = {}  # a site's public key line -> the key (_site_keys)
        self._started = time.monotonic()
        threading.Thread(target=self._expire_loop, daemon=True, name="dgf-cursors").start()

    def dispatch(self, ctx: Principal, header: dict[str, Any], payload: wire.Payload) -> wire.Reply:
        verb_name = header.get("v")
        if ctx is BUSY:
            raise errors.Busy("the metadata server is busy and could not look up this key; retry in a moment.")
        if self.principals is not None and self.principals.lookup(ctx.fingerprint) is None:
            raise errors.PermissionDenied(f"principal {ctx.name!r} is no longer enrolled.")
        allowed = POLICY.get(verb_name) if isinstance(verb_name, str) else None
        # Deny by default: a verb missing from POLICY is refused to everyone.
        if allowed is None or ctx.role not in allowed:
            raise errors.PermissionDenied(f"role {ctx.role!r} may not call {str(verb_name)[:64]!r}.")
        return super().dispatch(ctx, header, payload)

    def _cap(self, p: Principal, op: str, site: str, keys: list[str] | None, at: Site | None = None,
             gens: dict[str, int] | None = None) -> str:
        """A capability for ``p``; ``at``: the site it is for, named with its address, when it goes
        to another site (which connects only where the metaserver says); ``gens``: a delete's
        generations (crypto.issue_capability)."""
        scope = self._scope(p)
        where = [at.host, at.port, at.host_key] if at is not None else None
        if scope is None:
            return crypto.issue_capability(self._signing_key, p.fingerprint, op, site, keys, at=where, gens=gens)
        # Access from cohort grants: the capability ends with the first grant that ends, and
        # sites refuse it once a revocation moves the grant epoch on.
        ttl = max(1.0, min(600.0, scope.until - time.time()))
        return crypto.issue_capability(self._signing_key, p.fingerprint, op, site, keys, ttl, self._grant_epoch(),
                                       at=where, gens=gens)

    def _grant_epoch(self) -> int:
        return int(self.engine.get_setting("grants.epoch") or 0)

    def _bump_grant_epoch(self) -> None:
        """Every capability issued under the grants so far stops working at the sites within
        seconds (they learn the epoch with the enrolled keys)."""
        self.engine.set_setting("grants.epoch", str(self._grant_epoch() + 1))

    # -- cohort grants ------------------------------------------------------------------

    def _cached(self, name: str, make: Callable[[], Any]) -> Any:
        """``make()``, reused for SETTINGS_TTL_S: archive-wide settings read on hot paths (every
        stat, every researcher's request) change rarely, and a change shows within seconds."""
        now = time.monotonic()
        with self._cursor_lock:
            hit = self._settings.get(name)
        if hit is not None and now - hit[0] < SETTINGS_TTL_S:
            return hit[1]
        value = make()
        with self._cursor_lock:
            self._settings[name] = (now, value)
        return value

    def _replication_cached(self) -> tuple[int, dict[str, int]]:
        """(default copies, per-directory numbers) for showing a file's wanted copies; uploads
        read them fresh."""
        def make() -> tuple[int, dict[str, int]]:
            draining = self._draining()
            takers = [st for st in self.engine.sites() if st.name not in draining]
            return placement.default_factor(len(takers)), self.engine.replication_overrides()
        return self._cached("replication", make)  # type: ignore[no-any-return]

    def _scope(self, p: Principal) -> _Scope | None:
        """None when ``p`` sees the whole archive (an open archive, or not a researcher)."""
        if p.role != "researcher" or self._cached(
                "access.mode", lambda: self.engine.get_setting("access.mode") or "open") != "grants":
            return None
        now = time.monotonic()
        with self._cursor_lock:
            cached = self._scopes.get(p.name)
        if cached is not None and now - cached.made < GRANT_TTL_S:
            return cached
        files: set[str] = set()
        public = self._signing_key.public_key()
        until = time.time() + 600.0
        for g in self.engine.grants(p.name):
            if g["until"] <= time.time():
                continue
            try:
                claims = crypto.verify_token(public, g["token"])
            except errors.DgfError:
                log.error("grant %s of %s has a bad signature; ignored", g["id"], p.name)
                continue
            if (claims.get("id"), claims.get("p"), claims.get("x"), claims.get("u")) != \
                    (g["id"], g["principal"], g["xpath"], g["until"]):
                log.error("grant %s of %s does not match its signature; ignored", g["id"], p.name)
                continue
            q = query.prepare(g["xpath"], self.engine.query_catalogue(), self.dialect, self.engine.query_estimate,
                              self.limits, review=False)
            files.update(r["path"] for r in query.run(self.engine, q, "/", [], 0, time.monotonic() + self.query_time_limit))
            until = min(until, float(g["until"]))
        dirs = {"/"}
        for f in files:
            parts = f.split("/")[1:-1]
            for i in range(1, len(parts) + 1):
                dirs.add("/" + "/".join(parts[:i]))
        scope = _Scope(files, dirs, now, until)
        with self._cursor_lock:
            self._scopes[p.name] = scope
        return scope

    def _hidden(self, p: Principal, path: str, is_dir: bool | None = None) -> None:
        """Raise NotFound for a path outside ``p``'s grants (a grant-only archive does not even
        say that it exists)."""
        scope = self._scope(p)
        if scope is None:
            return
        path = "/" + path.strip("/") if path.strip("/") else "/"
        visible = (path in scope.files or path in scope.dirs) if is_dir is None else scope.shows(path, is_dir)
        if not visible:
            raise errors.NotFound(f"{path} does not exist.")

    @wire.verb("admin.access", optional=("mode",), mode=str)
    def access(self, p: Principal, mode: str = "") -> wire.Reply:
        """``open`` (every researcher sees the whole de-identified archive; the default) or
        ``grants`` (a researcher sees only the files of its unexpired cohort grants)."""
        if mode:
            if mode not in ("open", "grants"):
                raise errors.UsageError(f"access is 'open' or 'grants', not {mode[:32]!r}.")
            with self.engine.audited(p.name, "access.mode", mode):
                self.engine.set_setting("access.mode", mode)
            self._bump_grant_epoch()
            with self._cursor_lock:
                self._scopes.clear()
                self._settings.pop("access.mode", None)
        return wire.Reply({"mode": self.engine.get_setting("access.mode") or "open"})

    @wire.verb("admin.grant.add", principal=str, saved=str, until=(int, float))
    def grant_add(self, p: Principal, principal: str, saved: str, until: float) -> wire.Reply:
        """Grant ``principal`` the files saved query ``saved`` matches until ``until`` (epoch
        seconds).  The query's XPath is copied into the grant: editing the query later does not
        widen it.  Signed by this metaserver; audited."""
        target = {q.name: q for q in self.engine.principals()}.get(principal)
        if target is None or target.role != "researcher":
            raise errors.UsageError(f"grants are for researchers; {principal!r} is "
                                    f"{'not enrolled' if target is None else 'a ' + target.role}.")
        if until <= time.time():
            raise errors.UsageError("the grant's end date is in the past.")
        name = saved[1:] if saved.startswith("@") else saved
        xpath = self.engine.saved_queries().get(name)
        if xpath is None:
            raise errors.NotFound(f"no saved query named {name[:65]!r}; grants name a saved query (@NAME).")
        query.compile_xpath(xpath, self.limits)

        def sign(gid: int) -> str:
            return crypto.sign_token(self._signing_key, {"t": "grant", "id": gid, "p": principal, "x": xpath,
                                                         "u": float(until)})
        with self.engine.audited(p.name, "grant.add", principal, f"@{name} until {time.strftime('%Y-%m-%d', time.gmtime(until))}"):
            gid = self.engine.add_grant(principal, name, xpath, float(until), p.name, sign)
        with self._cursor_lock:
            self._scopes.pop(principal, None)
        return wire.Reply({"id": gid})

    @wire.verb("admin.grant.list", optional=("principal",), principal=str)
    def grant_list(self, p: Principal, principal: str = "") -> wire.Reply:
        rows = self.engine.grants(principal or None)
        return wire.Reply({"grants": [{k: g[k] for k in ("id", "principal", "query", "xpath", "until", "granted_by")}
                                      for g in rows]})

    @wire.verb("grants.mine")
    def grants_mine(self, p: Principal) -> wire.Reply:
        """A principal's own grants, and whether the archive runs grant-only."""
        rows = self.engine.grants(p.name)
        return wire.Reply({"mode": self.engine.get_setting("access.mode") or "open",
                           "grants": [{k: g[k] for k in ("id", "query", "xpath", "until")} for g in rows]})

    @wire.verb("admin.grant.remove", id=int)
    def grant_remove(self, p: Principal, id: int) -> wire.Reply:
        with self.engine.audited(p.name, "grant.remove", str(id)):
            self.engine.remove_grant(id)
        self._bump_grant_epoch()
        with self._cursor_lock:
            self._scopes.clear()
        return wire.Reply({})

    # -- identity and sites ---------------------------------------------------------------

    @wire.verb("whoami")
    def whoami(self, p: Principal) -> wire.Reply:
        return wire.Reply({"name": p.name, "role": p.role})

    @wire.verb("site.register", optional=("zone",), site=str, host=str, port=int, host_key=str, zone=str)
    def site_register(self, p: Principal, site: str, host: str, port: int, host_key: str,
                      zone: str = "") -> wire.Reply:
        if site != p.name:
            raise errors.PermissionDenied(f"principal {p.name!r} may only register site {p.name!r}.")
        crypto.fingerprint(host_key)
        self.engine.register_site(Site(site, host, port, host_key, zone[:64]))
        log.info("site %s registered at %s:%d", site, host, port)
        return wire.Reply({})

    @wire.verb("admin.site.add", optional=("zone", "public_key"), site=str, host=str, port=int, host_key=str,
               public_key=str, zone=str)
    def site_add(self, p: Principal, site: str, host: str, port: int, host_key: str, public_key: str = "",
                 zone: str = "") -> wire.Reply:
        """Add a site at the address an admin gives, its host key pinned (the admin saw it on
        first contact and confirmed it), and enrol the site's own key (``public_key``) unless
        it is enrolled already.  The site's registrations may then change its zone only."""
        crypto.fingerprint(host_key)
        if not 0 < port < 65536:
            raise errors.UsageError(f"port must be 1-65535, got {port}.")
        enrolled = {q.name: q for q in self.engine.principals()}
        if public_key:
            q = make_principal(site, "site", public_key)
            if site in enrolled and (enrolled[site].fingerprint != q.fingerprint or enrolled[site].role != "site"):
                raise errors.AlreadyExists(f"principal {site!r} is enrolled already with another key or "
                                           f"role; remove it first ('dgf admin principal remove {site}').")
            if site not in enrolled:
                with self.engine.audited(p.name, "grant", site, "role site"):
                    self.engine.add_principal(q)
        elif enrolled.get(site) is None or enrolled[site].role != "site":
            raise errors.UsageError(f"site {site!r} has no enrolled key; pass the site's public key "
                                    "(--key FILE, the key.pub that 'dgf-ioserver init' wrote).")
        with self.engine.audited(p.name, "site.add", site, f"{host}:{port} {crypto.fingerprint(host_key)}"):
            self.engine.register_site(Site(site, host, port, " ".join(host_key.split()[:2]), zone[:64]), pin=True)
        log.info("site %s added at %s:%d by %s, host key %s pinned", site, host, port, p.name,
                 crypto.fingerprint(host_key))
        return wire.Reply({"fingerprint": crypto.fingerprint(host_key)})

    @wire.verb("site.keys")
    def site_keys(self, p: Principal) -> wire.Reply:
        return wire.Reply({"principals": [
            {"name": q.name, "role": q.role, "fingerprint": q.fingerprint} for q in self.engine.principals()],
            "grant_epoch": self._grant_epoch(),
            # An untrusted site refuses to store anything that is not sealed.
            "untrusted": any(st.untrusted for st in self.engine.sites() if st.name == p.name)})

    @wire.verb("admin.site.trust", site=str, untrusted=bool)
    def site_trust(self, p: Principal, site: str, untrusted: bool) -> wire.Reply:
        """Mark a site untrusted (from then on it is given sealed objects only, and never a key)
        or trusted again; a site holding unsealed objects must be drained first.  Audited."""
        with self.engine.audited(p.name, "site.trust", site, "untrusted" if untrusted else "trusted"):
            self.engine.set_site_trust(site, untrusted)
        return wire.Reply({"site": site, "untrusted": untrusted})

    @wire.verb("site.report", keys=list, state=str)
    def site_report(self, p: Principal, keys: list[str], state: str) -> wire.Reply:
        """A site found its copies of ``keys`` corrupt and moved them aside: readers stop being
        sent there (the state shows in ``dgf stat``; a re-upload or a repair heals it)."""
        if state != "quarantined":
            raise errors.UsageError(f"a site may report replicas as 'quarantined', not {state[:32]!r}.")
        keys = [k for k in keys if isinstance(k, str)]
        with self.engine.audited(p.name, "replica.quarantined", f"{len(keys)} objects", ",".join(keys)[:2000]):
            n = self.engine.set_replica_state(p.name, keys, state)
        log.warning("site %s quarantined %d replicas", p.name, n)
        return wire.Reply({"marked": n})

    @wire.verb("site.list")
    def site_list(self, p: Principal) -> wire.Reply:
        return wire.Reply({"sites": [s.to_wire() for s in self.engine.sites()], "draining": sorted(self._draining())})

    def _site_keys(self, named: set[str]) -> dict[str, Any]:
        """Each site's public key, for the receipts of a commit naming the sites ``named``: from
        the principals as the server keeps them for sign-in (a removed site's receipts are
        refused within PRINCIPALS_TTL_S, when its sessions end too), not every principal read
        per commit; read afresh when a site named is not among them (enrolled just now)."""
        sites = self.principals.sites() if self.principals is not None else None
        if sites is None or not named <= {q.name for q in sites}:
            sites = [q for q in self.engine.principals() if q.role == "site"]
        with self._cursor_lock:
            for q in sites:
                if q.public_key not in self._site_key_objects:
                    self._site_key_objects[q.public_key] = crypto.load_public(q.public_key)
            return {q.name: self._site_key_objects[q.public_key] for q in sites}

    def _draining(self) -> set[str]:
        """Sites an admin is moving everything off: they serve reads but take no new copies."""
        return _draining_of(self.engine.get_setting("sites.draining"))

    def _placing(self) -> _Placing:
        """What an upload is placed by, read afresh (an admin's change holds for the next
        upload) in one transaction: both ``up.prepare`` and ``up.commit`` need it, and a
        one-file upload (a copy into the mount, a STOW-RS instance) paid nine reads for it."""
        facts = self.engine.upload_facts(UPLOAD_SETTINGS)
        values = facts.settings
        return _Placing(facts.sites, _draining_of(values.get("sites.draining")), facts.overrides,
                        _mode_of(values.get("replication.mode")) == "async", _deid_names_of(values.get("deid.options")))

    @wire.verb("admin.site.drain", site=str, on=bool)
    def site_drain(self, p: Principal, site: str, on: bool) -> wire.Reply:
        """Mark a site draining (no new copies go there; reads go on), or take the mark back."""
        if site not in {st.name for st in self.engine.sites()}:
            raise errors.NotFound(f"no site named {site!r} is registered.")
        draining = self._draining()
        draining = draining | {site} if on else draining - {site}
        self.engine.set_setting("sites.draining", json.dumps(sorted(draining)))
        self.engine.audit(p.name, "site.drain" if on else "site.undrain", site, "ok")
        return wire.Reply({"draining": sorted(draining)})

    @wire.verb("admin.site.objects", optional=("after",), site=str, after=str)
    def site_objects(self, p: Principal, site: str, after: str = "") -> wire.Reply:
        """The objects recorded at ``site``, a page at a time, with every copy's site and state."""
        rows = self.engine.objects_at(site, after, min(self.limits.list_items, 2000))
        sealed = self.engine.object_seals([k for k, _, _ in rows])
        return wire.Reply({"objects": [[k, n, [list(c) for c in copies], k in sealed] for k, n, copies in rows],
                           "sites": [st.to_wire() for st in self.engine.sites()],
                           "draining": sorted(self._draining())})

    @wire.verb("admin.site.remove", site=str)
    def site_remove(self, p: Principal, site: str) -> wire.Reply:
        """Forget a site and its principal.  Refused while any object's only sound copy is there
        (drain it first); other objects lose a copy, which ``dgf fsck --repair`` makes again."""
        after, last, held = "", 0, 0
        while True:
            rows = self.engine.objects_at(site, after, 2000)
            if not rows:
                break
            for _, _, copies in rows:
                held += 1
                if not any(s != site and state == "ok" for s, state in copies):
                    last += 1
            after = rows[-1][0]
        if last:
            raise errors.PermissionDenied(f"site {site} holds the only sound copy of {last} object(s); "
                                          f"drain it first ('dgf admin site drain {site}').")
        with self.engine.audited(p.name, "site.remove", site, f"{held} copies forgotten"):
            forgotten = self.engine.remove_site(site)
        try:
            self.engine.remove_principal(site)
        except errors.NotFound:
            pass
        draining = self._draining() - {site}
        self.engine.set_setting("sites.draining", json.dumps(sorted(draining)))
        return wire.Reply({"forgotten": forgotten})

    # -- namespace ------------------------------------------------------------------------

    @wire.verb("ns.stat", path=str)
    def ns_stat(self, p: Principal, path: str) -> wire.Reply:
        st = self.engine.stat(path)
        self._hidden(p, st.path, st.is_dir)
        reply = st.to_wire()
        if st.object_key:
            reply["replicas"] = [list(r) for r in self.engine.replica_states(st.object_key)]
            default, overrides = self._replication_cached()
            reply["copies_wanted"] = placement.factor(st.path, default, overrides)
        return wire.Reply(reply)

    @wire.verb("ns.readdir", path=str)
    def ns_readdir(self, p: Principal, path: str) -> wire.Reply:
        scope = self._scope(p)
        if scope is not None:
            self._hidden(p, path, True)
        entries = [s.to_wire() for s in self.engine.readdir(path) if scope is None or scope.shows(s.path, s.is_dir)]
        return wire.Reply({}, payload=json.dumps(entries).encode())

    @wire.verb("ns.mkdir", optional=("parents", "mode"), path=str, parents=bool, mode=int)
    def ns_mkdir(self, p: Principal, path: str, parents: bool = False, mode: int = 0o755) -> wire.Reply:
        return wire.Reply(self.engine.mkdir(path, mode, parents).to_wire())

    def _released(self, p: Principal, released: Released) -> dict[str, Any]:
        """Delete capabilities for objects no file references, so the client frees site space
        (their release was audited in the transaction that freed them).  Each names the
        generation released at its site: bytes an upload stored there since are kept.  A site's
        capability is several, space-separated, of DELETE_CAP_KEYS objects at most: the client
        presents each in a request frame of its own, which a site bounds (frame_header)."""
        by_site: dict[str, dict[str, int | None]] = {}
        for key, sites in released.items():
            for site, gen in sites.items():
                by_site.setdefault(site, {})[key] = gen
        out: dict[str, Any] = {}
        for site, gens in by_site.items():
            keys = sorted(gens)
            out[site] = {"keys": keys, "cap": " ".join(
                self._cap(p, "delete", site, part, gens={k: g for k in part if (g := gens[k]) is not None})
                for part in (keys[i:i + DELETE_CAP_KEYS] for i in range(0, len(keys), DELETE_CAP_KEYS)))}
        return out

    def _release_reply(self, p: Principal, released: Released, fields: dict[str, Any]) -> wire.Reply:
        """``fields`` and the release: in the reply's header where it is small (clients before
        2026-12-03 read it there), in its payload where it is not (an ``rm -r`` of tens of
        thousands of files exceeded the largest header a client reads, after its commit)."""
        release = self._released(p, released)
        if len(released) <= RELEASE_IN_HEADER:
            return wire.Reply({**fields, "release": release})
        return wire.Reply(fields, payload=json.dumps({"release": release}).encode())

    @wire.verb("ns.rename", src=str, dst=str)
    def ns_rename(self, p: Principal, src: str, dst: str) -> wire.Reply:
        with self.engine.audited(p.name, released="replaced by rename"):
            released = self.engine.rename(src, dst)
        return self._release_reply(p, released, {})

    @wire.verb("ns.unlink", path=str)
    def ns_unlink(self, p: Principal, path: str) -> wire.Reply:
        with self.engine.audited(p.name, "delete", path, released="unlinked"):
            released = self.engine.unlink(path)
        return self._release_reply(p, released, {})

    @wire.verb("ns.rmtree", path=str)
    def ns_rmtree(self, p: Principal, path: str) -> wire.Reply:
        """Remove a directory and everything under it in one transaction (``rm -r``): one
        request, not one per file; audited with the number of files and each object released."""
        if norm_path(path) == "/":
            raise errors.UsageError("refusing to remove the archive's root; remove what is under it.")
        with self.engine.audited(p.name, "rmtree", path, released="removed with its directory"):
            files, released = self.engine.rmtree(path)
        return self._release_reply(p, released, {"files": files})

    @wire.verb("ns.rmdir", path=str)
    def ns_rmdir(self, p: Principal, path: str) -> wire.Reply:
        with self.engine.audited(p.name, "rmdir", path):
            self.engine.rmdir(path)
        return wire.Reply({})

    @wire.verb("ns.chmod", path=str, mode=int)
    def ns_chmod(self, p: Principal, path: str, mode: int) -> wire.Reply:
        self.engine.chmod(path, mode)
        return wire.Reply({})

    # -- xattrs ---------------------------------------------------------------------------

    @wire.verb("xattr.get", path=str, name=str)
    def xattr_get(self, p: Principal, path: str, name: str) -> wire.Reply:
        self._hidden(p, path)
        return wire.Reply({}, payload=self.engine.getxattr(path, name))

    @wire.verb("xattr.get_many", paths=list, name=str)
    def xattr_get_many(self, p: Principal, paths: list[str], name: str) -> wire.Reply:
        """Attribute ``name`` of each of ``paths``, in order, as one payload cut by ``sizes``
        (a viewer reads a series' headers at once, not one round trip each).  At most
        xattrs_reply_bytes of values, one at least: ``sizes`` is shorter than ``paths`` when
        the caller is to ask again for the rest.  A path that does not exist or is hidden fails
        the request, as ``xattr.get`` does."""
        values: list[bytes] = []
        total = 0
        for path in paths:
            if not isinstance(path, str):
                raise errors.UsageError("xattr.get_many: paths must be strings.")
            self._hidden(p, path)
            value = self.engine.getxattr(path, name)
            if values and total + len(value) > self.limits.xattrs_reply_bytes:
                break
            values.append(value)
            total += len(value)
        return wire.Reply({"sizes": [len(v) for v in values]}, payload=b"".join(values))

    @wire.verb("xattr.list", path=str)
    def xattr_list(self, p: Principal, path: str) -> wire.Reply:
        self._hidden(p, path)
        return wire.Reply({"names": self.engine.listxattr(path)})

    @wire.verb("xattr.set", payload=True, path=str, name=str)
    def xattr_set(self, p: Principal, payload: wire.Payload, path: str, name: str) -> wire.Reply:
        self._hidden(p, path)
        if name.startswith(RESERVED_XATTR_PREFIX):
            raise errors.PermissionDenied(f"{name!r} is maintained by dgf and cannot be set by hand.")
        if payload.size > self.limits.xattr_value:
            raise self.limits.refuse("xattr_value", f"an extended attribute value of {payload.size} bytes")
        # user.* attributes belong to who set them: others read them, only they (or an admin)
        # change them; every change is audited.
        with self.engine.audited(p.name, "xattr.set", path, name):
            self.engine.setxattr(path, name, payload.read(), owner=p.name, quota=(
                self.limits.xattrs_per_principal, self.limits.xattr_bytes_per_principal),
                guard=p.role != "admin")
        return wire.Reply({})

    @wire.verb("xattr.remove", path=str, name=str)
    def xattr_remove(self, p: Principal, path: str, name: str) -> wire.Reply:
        self._hidden(p, path)
        if name.startswith(RESERVED_XATTR_PREFIX):
            raise errors.PermissionDenied(f"{name!r} is maintained by dgf and cannot be removed by hand.")
        with self.engine.audited(p.name, "xattr.remove", path, name):
            self.engine.removexattr(path, name, by=None if p.role == "admin" else p.name)
        return wire.Reply({})

    # -- query ----------------------------------------------------------------------------

    @wire.verb("find", optional=("show", "limit", "timeout", "level", "count", "explain", "page", "after"),
               xpath=str, root=str, show=list, limit=int, timeout=(int, float), level=str, count=bool,
               explain=bool, page=int, after=int)
    def find(self, p: Principal, xpath: str, root: str, show: list[str] | None = None, limit: int = 0,
             timeout: float = 0.0, level: str = "instance", count: bool = False,
             explain: bool = False, page: int = 0, after: int = 0) -> wire.Reply:
        """Files (or patient/study/series groups) whose header matches; results come in pages,
        the first with this reply and the rest through ``find.next`` with the returned cursor.

        For a caller that may stop early and resume (the first entries of a study list):
        ``page`` is the first page's rows, doubling on each next one up to PAGE_ROWS (0:
        PAGE_ROWS each), and then each row names its inode and its file's patient, study and
        series as the index holds them (``levels``); ``after`` starts the scan after an inode
        (instance level)."""
        if level not in ("instance", *query.LEVELS):
            raise errors.UsageError(f"--level must be instance, patient, study or series, not {level[:32]!r}.")
        expr = self._saved_or(p, xpath)
        q = query.prepare(expr, self.engine.query_catalogue(), self.dialect, self.engine.query_estimate,
                          self.limits)
        warnings = list(q.warnings)
        if explain:
            return wire.Reply({"explain": q.explain(), "warnings": warnings})
        limit_s = min(float(timeout), self.query_time_limit) if timeout > 0 else self.query_time_limit
        show_keys = [str(s) for s in show or []]
        query.check_show(show_keys, level)
        scope = self._scope(p)
        allowed = scope.allows if scope is not None else None
        if count:
            return wire.Reply({"count": query.count(self.engine, q, root, time.monotonic() + limit_s, level,
                                                    allowed), "warnings": warnings})
        cur = _Cursor(p.fingerprint, time.monotonic(), q, root, show_keys, max(after, 0), limit if limit > 0 else None,
                      limit_s, allowed=allowed, rows=min(max(page, 0), PAGE_ROWS), paged=page > 0)
        if level != "instance":
            # Groups are complete only at the end of the scan: gathered now, then paged out.
            rows = query.run(self.engine, q, root, show_keys, limit, time.monotonic() + limit_s, level, allowed)
            cur.lines = [json.dumps(row).encode() + b"\n" for row in rows]
        reply = self._page(p, cur)
        reply.result["warnings"] = warnings
        return reply

    @wire.verb("find.next", cursor=str)
    def find_next(self, p: Principal, cursor: str) -> wire.Reply:
        with self._cursor_lock:
            cur = self._cursors.get(cursor)
            if cur is not None and cur.owner == p.fingerprint:
                del self._cursors[cursor]          # in use: back in the table after this page
            else:
                cur = None
        if cur is None:
            raise errors.NotFound("the query cursor has expired, was closed or was never issued "
                                  f"(each principal keeps at most {self.limits.cursors_per_principal} open "
                                  f"for {self.limits.cursor_idle_s:.0f} s); run the query again.")
        return self._page(p, cur)

    @wire.verb("find.close", cursor=str)
    def find_close(self, p: Principal, cursor: str) -> wire.Reply:
        with self._cursor_lock:
            cur = self._cursors.get(cursor)
            if cur is not None and cur.owner == p.fingerprint:
                del self._cursors[cursor]
        return wire.Reply({})

    def _page(self, p: Principal, cur: _Cursor) -> wire.Reply:
        """The next page of ``cur``; a cursor token when more may follow."""
        if cur.lines is not None:
            out, cur.lines = cur.lines[:PAGE_ROWS], cur.lines[PAGE_ROWS:]
            more = bool(cur.lines)
        else:
            assert cur.query is not None
            started = time.monotonic()
            want = cur.rows or PAGE_ROWS
            if cur.rows:
                cur.rows = min(2 * cur.rows, PAGE_ROWS)
            if cur.left is not None:
                want = min(want, cur.left)
            page = query.page(self.engine, cur.query, cur.root, cur.show, cur.after,
                              started + cur.budget, want, PAGE_SECONDS, cur.allowed, with_ino=cur.paged)
            cur.budget -= time.monotonic() - started
            out = [json.dumps(row).encode() + b"\n" for row in page.rows]
            more = page.after is not None
            if cur.left is not None:
                cur.left -= len(out)
                more = more and cur.left > 0
            cur.after = page.after or 0
        token = None
        if more:
            token = secrets.token_urlsafe(18)
            cur.used = time.monotonic()
            with self._cursor_lock:
                self._admit_cursor(cur)
                self._cursors[token] = cur
        return wire.Reply({"cursor": token}, payload=b"".join(out))

    def _admit_cursor(self, cur: _Cursor) -> None:
        """Each principal keeps at most cursors_per_principal open: the oldest goes first."""
        mine = sorted(((c.used, t) for t, c in self._cursors.items() if c.owner == cur.owner))
        for _, token in mine[:max(0, len(mine) + 1 - self.limits.cursors_per_principal)]:
            del self._cursors[token]

    def _expire_loop(self) -> None:
        while True:
            time.sleep(min(5.0, self.limits.cursor_idle_s / 4))
            self.expire_cursors()

    def expire_cursors(self) -> int:
        """Close cursors idle longer than cursor_idle_s; return how many."""
        now = time.monotonic()
        with self._cursor_lock:
            idle = [t for t, c in self._cursors.items() if now - c.used > self.limits.cursor_idle_s]
            for token in idle:
                del self._cursors[token]
        return len(idle)

    def _saved_or(self, p: Principal, xpath: str) -> str:
        """The XPath itself, or the saved query ``@NAME`` names: ``@owner/name`` exactly; a bare
        ``@name`` is the principal's own query of that name, else the shared (admin's) one."""
        if not xpath.startswith("@"):
            return xpath
        name = xpath[1:]
        saved = self.engine.saved_queries()
        found = saved.get(name) if "/" in name else saved.get(f"{p.name}/{name}", saved.get(name))
        if found is None:
            raise errors.NotFound(f"no saved query named {name[:65]!r}; see 'dgf query list'.")
        return found

    def _query_name(self, p: Principal, name: str) -> str:
        """The full name a principal saves ``name`` under: its own ``principal/name``; an admin's
        bare name is shared (everyone reads it, only admins change it)."""
        owner, _, short = name.rpartition("/")
        if not QUERY_NAME.fullmatch(short) or (owner and not QUERY_NAME.fullmatch(owner)):
            raise errors.UsageError(f"a query name is letters, digits, '.', '_' or '-', optionally after "
                                    f"'OWNER/' (not {name[:64]!r}).")
        if owner and owner != p.name:
            raise errors.PermissionDenied(f"saved query {name!r} belongs to {owner!r}; save your own as "
                                          f"{p.name}/{short}.")
        if not owner and p.role != "admin":
            return f"{p.name}/{short}"
        return name

    @wire.verb("query.save", name=str, xpath=str)
    def query_save(self, p: Principal, name: str, xpath: str) -> wire.Reply:
        """Save ``xpath`` as the principal's own query (``principal/name``; an admin's bare name
        is shared).  Nobody changes another principal's queries.  Audited."""
        full = self._query_name(p, name)
        query.compile_xpath(xpath, self.limits)
        if full not in self.engine.saved_queries() and \
                self.engine.saved_query_count(p.name) >= self.limits.saved_queries_per_principal:
            raise self.limits.refuse("saved_queries_per_principal", f"a saved query beyond {p.name!r}'s "
                                     f"{self.limits.saved_queries_per_principal}")
        with self.engine.audited(p.name, "query.save", full, xpath[:500]):
            self.engine.save_query(full, xpath, p.name)
        return wire.Reply({"name": full})

    @wire.verb("query.list")
    def query_list(self, p: Principal) -> wire.Reply:
        return wire.Reply({"queries": self.engine.saved_queries()})

    @wire.verb("query.remove", name=str)
    def query_remove(self, p: Principal, name: str) -> wire.Reply:
        """Remove one of the principal's own queries (a bare name: its own, else a shared one);
        an admin may remove any.  Audited."""
        saved = self.engine.saved_queries()
        full = name if "/" in name else (f"{p.name}/{name}" if f"{p.name}/{name}" in saved else name)
        if full not in saved:
            raise errors.NotFound(f"no saved query named {name[:65]!r}; see 'dgf query list'.")
        owner = full.rpartition("/")[0]
        if p.role != "admin" and owner != p.name:
            raise errors.PermissionDenied(f"saved query {full!r} belongs to {owner or 'the admins'}; only "
                                          f"{'they' if owner else 'an admin'} or an admin may remove it.")
        with self.engine.audited(p.name, "query.remove", full):
            self.engine.remove_query(full)
        return wire.Reply({"name": full})

    # -- upload ---------------------------------------------------------------------------

    @wire.verb("up.prepare", uids=list, patients=list)
    def up_prepare(self, p: Principal, uids: list[str], patients: list[str]) -> wire.Reply:
        """Pseudonyms for a batch (the HMAC key never leaves this server) and put capabilities."""
        keys = self.vault.keys
        placing = self._placing()
        sites = placing.takers
        if not sites:
            raise errors.ServerError("no I/O site takes uploads (none registered, or all draining); "
                                     "start an ioserver first.")
        patients = sorted({k for k in patients if isinstance(k, str)})
        self._charge_pseudonyms(p, len(patients))
        if patients:
            # The audit names how many and which pseudonyms, never the patients' own IDs.
            self.engine.audit(p.name, "pseudonym.issue", f"{len(patients)} patients", "ok",
                              ",".join(keys.pseudo_patient(k) for k in patients)[:1000])
        return wire.Reply({
            "uids": {u: keys.pseudo_uid(u) for u in uids if isinstance(u, str)},
            "patients": {k: [keys.pseudo_patient(k), keys.date_offset_days(k)]
                         for k in patients if isinstance(k, str)},
            "sites": [s.to_wire() for s in sites],
            "caps": {s.name: self._cap(p, "put", s.name, None) for s in sites},
            "replication": {"default": placement.default_factor(len(sites)),
                            "overrides": placing.overrides,
                            "mode": "async" if placing.background else "sync"},
            # The archive's de-identification options: a client that analysed the batch with
            # others (remembered, or learnt before an admin changed them) does it again.
            "options": placing.deid,
        })

    def _charge_pseudonyms(self, p: Principal, n: int) -> None:
        """Count ``n`` pseudonyms against the principal's rate (a sliding minute)."""
        now = time.monotonic()
        with self._cursor_lock:
            window = self._issued.setdefault(p.name, collections.deque())
            while window and now - window[0][0] > 60:
                window.popleft()
            used = sum(k for _, k in window)
            if used + n > self.limits.pseudonyms_per_minute:
                self.engine.audit(p.name, "pseudonym.issue", f"{n} patients", "refused", "rate limit")
                raise self.limits.refuse("pseudonyms_per_minute", f"{used + n} patient pseudonyms in a minute "
                                         f"for {p.name!r}")
            window.append((now, n))

    @wire.verb("up.check", paths=list, keys=list, uids=list)
    def up_check(self, p: Principal, paths: list[str], keys: list[str], uids: list[str]) -> wire.Reply:
        """What the archive already holds for files about to be uploaded (see
        ``check_files``), so that a re-run sends nothing already stored and conflicts are
        per-file failures found before any byte travels."""
        if not (len(paths) == len(keys) == len(uids)) or not all(
                isinstance(x, str) for x in (*paths, *keys, *uids)):
            raise errors.UsageError("up.check takes three lists of strings of one length.")
        return wire.Reply({"states": self.engine.check_files(list(zip(paths, keys, uids)))})

    @wire.verb("up.keys", studies=dict)
    def up_keys(self, p: Principal, studies: dict[str, str]) -> wire.Reply:
        """Data keys for studies ``{study UID: patient pseudonym}`` whose objects go to untrusted
        sites (sealed by the uploader, dgf/envelope.py), made where missing; audited by count."""
        if len(studies) > self.limits.list_items:
            raise self.limits.refuse("list_items", f"keys of {len(studies)} studies")
        for study, patient in studies.items():
            if not isinstance(patient, str) or not re.fullmatch(r"P[A-Z2-7]{16}", patient) or \
                    not re.fullmatch(r"[0-9.]{1,64}", study):
                raise errors.UsageError("up.keys takes de-identified study UIDs, each with its patient pseudonym.")
        keys = self.vault.study_keys(dict(studies), create=True)
        self.engine.audit(p.name, "study-key.issue", f"{len(keys)} studies", "ok", ",".join(sorted(keys))[:1000])
        return wire.Reply({"keys": {k: _b64(v) for k, (_, v) in keys.items()}})

    def _seal_keys(self, files: list[dict[str, Any]]) -> dict[str, tuple[str, bytes]]:
        """(patient, data key) of the studies a commit's sealed files name."""
        studies = {str(f["seal"].get("study")): "" for f in files if isinstance(f.get("seal"), dict)}
        return self.vault.study_keys(studies, create=False) if studies else {}

    def _profile(self) -> Any:
        """The profile sealed objects are checked against (rebuilt within seconds of a change)."""
        from dgf.dicom.profile import stored_profile

        return self._cached("deid.profile", lambda: stored_profile(sorted(self._deid_names())))

    def _unseal_header(self, f: dict[str, Any], blocks: bytes, keys: dict[str, tuple[str, bytes]]) -> bytes:
        """The XML header of a sealed object (``f``, a commit entry), derived here from the
        plaintext the uploader showed: checked against the stored object by sealing it again,
        checked against the archive's profile, and whatever was not shown must lie inside pixel
        values, which no check reads.  Raises PolicyRefused naming the problem."""
        import mmap

        from dgf import envelope
        from dgf.dicom import raw, validate
        from dgf.dicom.xmlheader import header_xml

        seal: Any = f.get("seal")
        path = str(f.get("path"))[:200]
        try:
            study, salt = str(seal["study"]), bytes.fromhex(seal["salt"])
            holes = [int(k) for k in seal.get("holes") or []]
            shown = base64.b64decode(seal["shown"])
            size = int(f["size"])
            if len(salt) != 8 or size < 1:
                raise ValueError("salt")
        except (TypeError, KeyError, ValueError) as exc:
            raise errors.UsageError(f"the seal of {path} in the commit is malformed.") from exc
        if study not in keys:
            raise errors.PolicyRefused(f"{path} is sealed under study {study[:40]}, which has no data key here "
                                       "(erased, or never issued by 'up.keys').")
        patient, key = keys[study]
        env = envelope.Envelope(key, salt, size)
        try:
            gaps = env.check_shown(shown, holes, str(f["key"]), blocks)
        except errors.IntegrityError as exc:
            raise errors.PolicyRefused(f"{path}: {exc.message} Nothing was published.") from exc
        # Shown whole, the plaintext is at hand; else it is laid out in an anonymous map whose
        # hidden blocks (pixel data) stay zero pages that cost no memory.
        view: Any = shown if not gaps else mmap.mmap(-1, size)
        try:
            at = 0
            for k in range(env.blocks() if gaps else 0):
                lo, hi = env.block_plain(k)
                if (lo, hi) in gaps:
                    continue
                view[lo:hi] = shown[at:at + hi - lo]
                at += hi - lo
            plain = view                    # as long as the plaintext (a DICOM file is never empty)
            part = raw.parse_part10(plain)
            validate.check(part, self._profile(), path)
            opaque = raw.opaque_values(part.data, part.dataset, part.encoding.little)
            for lo, hi in gaps:
                if not any(a <= lo and hi <= b for a, b in opaque):
                    raise errors.PolicyRefused(f"{path}: bytes {lo}-{hi} were not shown to the metaserver but are "
                                               "not pixel data; nothing was published.")
            top = {e.tag: e for e in part.dataset}
            said = {t: raw.text_value(part.data, top[t]) if t in top else "" for t in (0x0020000D, 0x00100020)}
            if said[0x0020000D] != study or said[0x00100020] != patient:
                raise errors.PolicyRefused(f"{path} is sealed under the key of another study or patient than its "
                                           "header names; nothing was published.")
            xml = header_xml(part)
            del part
        except errors.InvalidDicom as exc:
            raise errors.PolicyRefused(f"{path} is not a DICOM file this archive stores ({exc.message}).") from exc
        finally:
            if gaps:
                with contextlib.suppress(BufferError):
                    view.close()
        return xml

    @wire.verb("up.commit", payload=True, optional=("replace", "xml_sizes"), replace=bool, xml_sizes=list)
    def up_commit(self, p: Principal, payload: wire.Payload, replace: bool = False,
                  xml_sizes: list[int] | None = None) -> wire.Reply:
        """Publish uploaded files.  The payload is a JSON batch; with ``xml_sizes``, the files'
        XML headers follow it as bytes, one per file in order (otherwise each entry's ``xml``)."""
        if payload.size > self.limits.commit_bytes:
            raise self.limits.refuse("commit_bytes", f"a commit of {payload.size} bytes")
        body = payload.read()
        headers_at = len(body)
        if xml_sizes is not None:
            if len(xml_sizes) > self.limits.list_items:
                raise self.limits.refuse("list_items", f"a commit of {len(xml_sizes)} headers")
            if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in xml_sizes) \
                    or sum(xml_sizes) > len(body):
                raise errors.UsageError("the commit's xml_sizes do not fit its payload.")
            headers_at -= sum(xml_sizes)
        try:
            batch = json.loads(body[:headers_at])
            files = batch["files"]
            if not isinstance(files, list) or not all(isinstance(f, dict) for f in files):
                raise TypeError("files")
            batch_receipts = batch.get("receipts") or {}
            if not isinstance(batch_receipts, dict) or not all(isinstance(t, str) for t in batch_receipts.values()):
                raise TypeError("receipts")
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise errors.UsageError("the commit payload is not a valid batch.") from exc
        if len(files) > self.limits.list_items:
            raise self.limits.refuse("list_items", f"a commit of {len(files)} files")
        for n, f in enumerate(files):
            _check_entry(n, f, self.limits)
        if xml_sizes is None:
            headers = [str(f.get("xml") or "").encode("utf-8", "surrogateescape") for f in files]
        elif len(xml_sizes) != len(files):
            raise errors.UsageError(f"the commit has {len(files)} files but {len(xml_sizes)} xml_sizes.")
        else:
            headers = []
            for n in xml_sizes:
                headers.append(body[headers_at:headers_at + n])
                headers_at += n
        named = {f["site"] for f in files} | {c["site"] for f in files for c in f.get("copies") or []}
        site_keys = self._site_keys(named)
        placing = self._placing()
        known = placing.known
        untrusted = {st.name for st in known if st.untrusted}
        default, overrides = placement.default_factor(len(placing.takers)), placing.overrides
        background = placing.background
        seal_keys = self._seal_keys(files)
        receipt_of = _Receipts(site_keys, batch_receipts)
        new: list[NewFile] = []
        to_seal: list[tuple[int, str, bytes]] = []     # (index in new, patient, identity record)
        inherited: dict[str, tuple[str, dict[str, Any]] | None] = {}
        for f, xml in zip(files, headers):
            site = f["site"]
            gens: list[tuple[str, int]] = []      # (site, generation) each receipt signed for
            if site not in site_keys:
                raise errors.UsageError(f"unknown site {site!r} in commit.")
            if not f.get("receipt"):
                # A link: one more path for an object the archive holds (an instance is stored
                # once).  No bytes travelled; the stored object's replica and hash list stand.
                if site not in self.engine.object_replicas([f["key"]]).get(f["key"], []):
                    raise errors.PermissionDenied(f"{f['path']} has no receipt and its object is not "
                                                  f"held at site {site}.")
                blocks = self.engine.object_blocks([f["key"]]).get(f["key"], b"")
                # Its header is the stored object's, as a site derived it; not the writer's.
                stored = self.engine.object_header(f["key"])
                if stored is None:
                    raise errors.PermissionDenied(f"{f['path']} names an object with no header on record.")
                xml = stored
            else:
                blocks = _base64(f, "blocks")
                stored_size = envelope.sealed_size(f["size"]) if f.get("seal") else f["size"]
                if stored_size > BLOCK and len(blocks) != DIGEST * ((stored_size + BLOCK - 1) // BLOCK):
                    raise errors.PermissionDenied(f"the block digests for {f['path']} do not match the site's receipt.")
                if f.get("seal"):
                    # Sealed for untrusted sites: no site saw the plaintext, so the header is
                    # derived and checked here, from what the uploader shows.
                    xml = self._unseal_header(f, blocks, seal_keys)
                copies = [(site, f["receipt"])] + [(c["site"], c["receipt"]) for c in f.get("copies") or []]
                for where, receipt in copies:
                    if where not in site_keys:
                        raise errors.UsageError(f"unknown site {where!r} in commit.")
                    claims = receipt_of(where, receipt)
                    if (claims.get("t"), claims.get("site"), claims.get("key"), claims.get("size")) != \
                            ("receipt", where, f["key"], stored_size):
                        raise errors.PermissionDenied(f"the receipt for {f['path']} does not match its object.")
                    if (gen := _generation(claims, f["path"])) is not None:
                        gens.append((where, gen))
                    # The hash list is kept only as every site computed it from the bytes it stored.
                    if list_digest(blocks) != claims.get("bl", ""):
                        raise errors.PermissionDenied(
                            f"the block digests for {f['path']} do not match the receipt of site {where}.")
                    # The header published is the one the storing site derived from the bytes it
                    # checked against the profile: a writer cannot put anything else beside it.
                    if where == site and not f.get("seal") and claims.get("xh") != hashlib.sha256(xml).hexdigest():
                        raise errors.PermissionDenied(
                            f"the header sent for {f['path']} is not the one site {site} derived from the "
                            "stored object; nothing was published.")
                # Whatever a site may have taken in the seconds before it learnt it is untrusted,
                # nothing unsealed is published with a copy there.
                exposed = [where for where, _ in copies if where in untrusted]
                if exposed and not f.get("seal"):
                    raise errors.PermissionDenied(f"site {exposed[0]} is untrusted and {f['path']} is not sealed; "
                                                  "nothing was published.")
                held = len({where for where, _ in copies})
                need = placement.factor(f["path"], default, overrides)
                if held < need and not background:
                    raise errors.UsageError(
                        f"{f['path']} has {held} durable cop{'y' if held == 1 else 'ies'}; its directory keeps "
                        f"{need} (dgf admin replicas), so it is not published.")
            sealed, original_size = None, None
            patient = f.get("patient")
            if f.get("derived_from") and f.get("identity") is None:
                # A derived file (a reconstruction) inherits the identity of the instance it was
                # computed from: its record is the source's, marked as such, sealed for it.
                patient, sealed = self._derived_identity(f["derived_from"], f["key"], inherited)
            elif f.get("identity") is not None:
                record = _base64(f, "identity")
                original_size = identity.leading(record, self.limits.identity_bytes).get("original_size")
                if not isinstance(original_size, int) or original_size < 0:
                    raise errors.UsageError(f"the identity record for {f['path']} has no original size.")
                to_seal.append((len(new), f["patient"], record))
            xattrs = {query.HEADER_XATTR: xml}
            xattrs.update({k: v.encode() for k, v in (f.get("xattrs") or {}).items()})
            more = tuple(c["site"] for c in f.get("copies") or [] if f.get("receipt"))
            seal = f.get("seal")
            new.append(NewFile(f["path"], f["key"], f["size"], site, xattrs, patient, sealed,
                               blocks=blocks, original_size=original_size, copies=more,
                               wanted=placement.factor(f["path"], default, overrides) if background else 0,
                               stored_size=envelope.sealed_size(f["size"]) if seal else 0,
                               seal=f"{seal['salt']}:{seal['study']}" if seal else None,
                               linked=not f.get("receipt"), gens=tuple(gens)))
        # Patient keys are made only once every entry has passed its checks: a refused commit
        # leaves no key behind (a hostile writer could otherwise fill the vault with them).
        if to_seal:
            self.vault.ensure_keys({patient for _, patient, _ in to_seal})
            for i, patient, record in to_seal:
                new[i] = dataclasses.replace(new[i], identity=self.vault.seal(patient, new[i].object_key, record))
        with self.engine.audited(p.name, released="replaced by upload"):
            stats, released = self.engine.create_files(new, replace)
        return self._release_reply(p, released, {"created": len(stats)})

    def _derived_identity(self, source: str, key: str,
                          cache: dict[str, tuple[str, dict[str, Any]] | None]) -> tuple[str | None, bytes | None]:
        """(patient, sealed record) for a derived object computed from object ``source``: the
        source's record with ``derived_from`` set (none if the source holds no identity)."""
        if source not in cache:
            found = self.engine.identity(source)
            blob = self.vault.open(source)
            cache[source] = None if found is None or blob is None else (found[0], identity.decode(blob))
        held = cache[source]
        if held is None:
            return None, None
        patient, record = held
        return patient, self.vault.seal(patient, key, identity.encode({**record, "derived_from": source}))

    # -- download -------------------------------------------------------------------------

    @wire.verb("down.resolve", optional=("identified", "offset", "xpath"), paths=list, identified=bool,
               offset=int, xpath=str)
    def down_resolve(self, p: Principal, paths: list[str], identified: bool = False,
                     offset: int = 0, xpath: str | None = None) -> wire.Reply:
        """Files under ``paths`` (with ``xpath``: under its one root, whose header matches) with
        their replicas, hash lists, get capabilities and (for principals with that authority)
        identity records, at most ``resolve_files`` per reply: ``next`` is where the following
        page starts (None at the end).  Every identity release or refusal is audited before
        anything is returned."""
        if identified and p.role not in IDENTITY_ROLES:
            self.engine.audit(p.name, "identity.release", ",".join(map(str, paths))[:1000], "refused",
                              f"role {p.role}")
            raise errors.PermissionDenied(
                f"principal {p.name!r} (role {p.role}) may not receive patient identity; "
                "the refusal was audited.")
        if not all(isinstance(path, str) for path in paths):
            raise errors.UsageError("paths must be strings.")
        if offset < 0:
            raise errors.UsageError("offset must not be negative.")
        if xpath is not None:
            found, after = self._matching_files(p, xpath, paths, offset)
        else:
            found, after = self._files_under(p, paths, offset)
        return self._resolved(p, found, after, identified)

    def _matching_files(self, p: Principal, xpath: str, paths: list[str],
                        after: int) -> tuple[list[tuple[str, str, int]], int | None]:
        """One page of the files under the root ``paths`` names whose header matches ``xpath``,
        and the inode the next page starts after: the query runs here, so the matched paths
        need not travel to the client and back."""
        if len(paths) != 1:
            raise errors.UsageError("with an XPath, down.resolve takes one root path.")
        q = query.prepare(self._saved_or(p, xpath), self.engine.query_catalogue(), self.dialect,
                          self.engine.query_estimate, self.limits)
        scope = self._scope(p)
        page = query.page(self.engine, q, paths[0], [], after, time.monotonic() + self.query_time_limit,
                          self.limits.resolve_files, PAGE_SECONDS, scope.allows if scope is not None else None)
        return list(self.engine.walk_files_many([row["path"] for row in page.rows])), page.after

    def _files_under(self, p: Principal, paths: list[str], offset: int) -> tuple[list[tuple[str, str, int]],
                                                                                   int | None]:
        """One page of the files under ``paths`` from ``offset``, and the next page's offset."""
        page = self.limits.resolve_files
        found: list[tuple[str, str, int]] = []
        seen = 0
        more = False
        scope = self._scope(p)
        for fp, key, size in self.engine.walk_files_many(outermost(paths)):
            if scope is not None and not scope.allows(fp):
                continue                          # outside the researcher's grants
            if seen >= offset:
                if len(found) == page:
                    more = True
                    break
                found.append((fp, key, size))
            seen += 1
        return found, offset + len(found) if more else None

    def _resolved(self, p: Principal, found: list[tuple[str, str, int]], after: int | None,
                  identified: bool) -> wire.Reply:
        """``found`` files as down.resolve answers them (auditing any identity released)."""
        keys = sorted({key for _, key, _ in found})
        replicas = self.engine.object_replicas(keys)
        files = [ResolvedFile(fp, key, size, _read_order(key, replicas.get(key, []))) for fp, key, size in found]
        by_site: dict[str, set[str]] = {}
        for f in files:
            for site in f.sites:
                by_site.setdefault(site, set()).add(f.key)
        seals = self.engine.object_seals(keys)
        studies = self.vault.study_keys({seal.partition(":")[2]: "" for seal in seals.values()}, create=False) \
            if seals else {}
        out: dict[str, Any] = {
            "files": [list(f) for f in files],
            # Sealed objects (untrusted sites): salt and study, and the keys of those studies.
            "seals": {k: seal.split(":", 1) for k, seal in seals.items()},
            "study_keys": {study: _b64(key) for study, (_, key) in studies.items()},
            "blocks": {k: _b64(v) for k, v in self.engine.object_blocks(keys).items()},
            "sites": [s.to_wire() for s in self.engine.sites() if s.name in by_site],
            "caps": {site: self._cap(p, "get", site, sorted(keys)) for site, keys in by_site.items()},
            "next": after,
        }
        if identified:
            ids: dict[str, str] = {}
            for key in keys:
                record = self.vault.open(key)
                if record is not None:
                    ids[key] = _b64(record)
            self.engine.audit_many([(p.name, "identity.release", f.path, "ok" if f.key in ids else "none-held", "")
                                    for f in files])
            out["identities"] = ids
        return wire.Reply({}, payload=json.dumps(out).encode())

    @wire.verb("identity.sizes", keys=list)
    def identity_sizes(self, p: Principal, keys: list[str]) -> wire.Reply:
        """The size of each object's identified original (what an identified read returns), for
        an identified mount's stat.  A size is not identity; the records themselves are released
        (and audited) only by ``down.resolve``."""
        if not all(isinstance(k, str) for k in keys):
            raise errors.UsageError("keys must be strings.")
        if len(keys) > self.limits.list_items:
            raise self.limits.refuse("list_items", f"sizes of {len(keys)} objects")
        return wire.Reply({"sizes": self.engine.identified_sizes(sorted(set(keys)))})

    # -- replication ----------------------------------------------------------------------

    @wire.verb("replicas.get", path=str)
    def replicas_get(self, p: Principal, path: str) -> wire.Reply:
        """A directory's replication factor: set there, inherited (from where), or the default."""
        st = self.engine.stat(path)
        overrides = self.engine.replication_overrides()
        default = placement.default_factor(len(self.engine.sites()))
        probe = st.path.rstrip("/") + "/x" if st.is_dir else st.path
        n = placement.factor(probe, default, overrides)
        where = placement.set_at(probe, overrides)
        return wire.Reply({"path": st.path, "copies": n, "set_at": where, "default": default,
                           "sites": len(self.engine.sites())})

    @wire.verb("admin.replicas.set", path=str, copies=int)
    def replicas_set(self, p: Principal, path: str, copies: int) -> wire.Reply:
        """Set a directory's replication factor (0: inherit again); audited.  Files uploaded
        from then on get that many copies; ``dgf fsck --repair`` brings older files in line."""
        st = self.engine.stat(path)
        if not st.is_dir:
            raise errors.NotADirectory(f"{path} is not a directory; replication is set per directory.")
        n_sites = len(self.engine.sites())
        if copies < 0 or copies > n_sites:
            raise errors.UsageError(f"copies must be between 1 and the number of sites ({n_sites}), "
                                    "or 0 to inherit.")
        with self.engine.audited(p.name, "replicas.set", st.path, str(copies)):
            if copies == 0:
                try:
                    self.engine.removexattr(st.path, REPLICAS_XATTR)
                except errors.NoAttribute:
                    pass
            else:
                self.engine.setxattr(st.path, REPLICAS_XATTR, str(copies).encode())
        return self.replicas_get(p, st.path)

    @wire.verb("admin.backup")
    def backup(self, p: Principal) -> wire.Reply:
        """A consistent copy of the metadata database, taken while it serves (SQLite's online
        backup), streamed to the admin.  Patient keys in it stay wrapped by the vault key, which
        is not in the copy: keep the vault key file safe on its own."""
        import os
        import tempfile

        fd, tmp = tempfile.mkstemp(prefix="dgf-backup-", suffix=".db")
        os.close(fd)
        try:
            self.engine.backup_to(tmp)
            size = os.path.getsize(tmp)
            fh = open(tmp, "rb")
        finally:
            os.unlink(tmp)                       # the open handle keeps the bytes until sent

        def chunks() -> Iterator[bytes]:
            with fh:
                yield from iter(lambda: fh.read(wire.CHUNK), b"")

        self.engine.audit(p.name, "backup", "metadata", "ok", f"{size} bytes")
        return wire.Reply({"size": size}, stream=chunks(), stream_size=size)

    # -- checking and repair (dgf fsck) ---------------------------------------------------

    @wire.verb("admin.fsck.objects", optional=("offset",), root=str, offset=int)
    def fsck_objects(self, p: Principal, root: str, offset: int = 0) -> wire.Reply:
        """The objects of the files under ``root``, a page at a time: key, size, the copies its
        directory keeps (the most any of its paths asks), every recorded replica with its
        state, and one of its paths."""
        if offset < 0:
            raise errors.UsageError("offset must not be negative.")
        page = self.limits.list_items
        default = placement.default_factor(len(self.engine.sites()))
        overrides = self.engine.replication_overrides()
        found: dict[str, list[Any]] = {}
        seen = 0
        more = False
        for path, key, size in self.engine.walk_files(root):
            if seen >= offset:
                if len(found) >= page and key not in found:
                    more = True
                    break
                entry = found.setdefault(key, [key, size, 0, [], path])
                entry[2] = max(entry[2], placement.factor(path, default, overrides))
            seen += 1
        rows = self.engine.replica_rows(sorted(found))
        sealed = self.engine.object_seals(sorted(found))
        for key, entry in found.items():
            entry[3] = [list(r) for r in rows.get(key, [])]
            if key in sealed:                    # the stored size; untrusted sites may hold a copy
                entry[1] = envelope.sealed_size(entry[1])
            entry.append(key in sealed)
        # Each replica's generation, apart (admin clients older than generations read the rest):
        # a trimmed copy is deleted only if no upload stored it again since.
        return wire.Reply({"objects": list(found.values()), "next": seen if more else None,
                           "sites": [st.to_wire() for st in self.engine.sites()],
                           "gens": self.engine.replica_gens(sorted(found))})

    @wire.verb("admin.fsck.caps", sites=list)
    def fsck_caps(self, p: Principal, sites: list[str]) -> wire.Reply:
        """Capabilities to check, list and repair at these sites (``fsck``), for this admin."""
        if not all(isinstance(site, str) for site in sites):
            raise errors.UsageError("sites must be site names (strings).")
        known = {st.name for st in self.engine.sites()}
        return wire.Reply({"caps": {site: self._cap(p, "fsck", site, None) for site in sites if site in known}})

    @wire.verb("admin.fsck.recorded", site=str, keys=list)
    def fsck_recorded(self, p: Principal, site: str, keys: list[str]) -> wire.Reply:
        if len(keys) > self.limits.list_items:
            raise self.limits.refuse("list_items", f"a lookup of {len(keys)} objects")
        return wire.Reply({"recorded": sorted(self.engine.recorded_at(site, [str(k) for k in keys]))})

    @wire.verb("admin.fsck.copy", source=str, target=str, keys=list)
    def fsck_copy(self, p: Principal, source: str, target: str, keys: list[str]) -> wire.Reply:
        """A get capability at ``source`` issued to site ``target`` itself, so the target fetches
        the objects site to site."""
        sites = {st.name: st for st in self.engine.sites()}
        holder = {q.name: q for q in self.engine.principals() if q.role == "site"}.get(target)
        if source not in sites or target not in sites or holder is None:
            raise errors.NotFound(f"site {source if source not in sites else target!r} is not registered.")
        keys = [str(k) for k in keys]
        if len(keys) > self.limits.list_items:
            raise self.limits.refuse("list_items", f"a copy of {len(keys)} objects")
        if sites[target].untrusted:
            sealed = self.engine.object_seals(keys)
            plain = [k for k in keys if k not in sealed]
            if plain:
                raise errors.PermissionDenied(f"site {target} is untrusted and object {plain[0][:16]}... is not "
                                              "sealed; it may only be copied to trusted sites.")
        return wire.Reply({"cap": self._cap(holder, "get", source, keys, at=sites[source]),
                           "source": sites[source].to_wire()})

    @wire.verb("admin.fsck.adopt", site=str, objects=dict)
    def fsck_adopt(self, p: Principal, site: str, objects: dict[str, Any]) -> wire.Reply:
        """Take back objects ``site`` holds but no file records (written after the backup a
        restore went back to), each on the site's signed receipt and with the XML header the site
        built from its bytes: an object the archive knows gets its copy recorded; an unknown one
        becomes a file under /lost+found/PATIENT/STUDY/SERIES/SOP.dcm (pseudonymised values from
        its de-identified header).  Its identity is not recoverable: it was only ever here."""
        keyring = {q.name: q for q in self.engine.principals() if q.role == "site"}
        if site not in keyring:
            raise errors.NotFound(f"site {site!r} is not registered.")
        if len(objects) > self.limits.list_items:
            raise self.limits.refuse("list_items", f"an adoption of {len(objects)} objects")
        public = crypto.load_public(keyring[site].public_key)
        known = self.engine.object_replicas(list(objects))
        recorded: list[str] = []
        new: list[NewFile] = []
        failed: dict[str, str] = {}
        for key, info in objects.items():
            try:
                if not isinstance(info, dict):
                    raise errors.UsageError("each object needs its receipt, size, blocks and header.")
                blocks = base64.b64decode(str(info.get("blocks") or ""))
                claims = crypto.verify_token(public, str(info.get("receipt") or ""))
                xml = str(info.get("xml") or "").encode("utf-8", "surrogateescape")
                if (claims.get("t"), claims.get("site"), claims.get("key"), claims.get("size")) != \
                        ("receipt", site, key, info.get("size")) or claims.get("bl", "") != list_digest(blocks) \
                        or claims.get("xh") != hashlib.sha256(xml).hexdigest():
                    raise errors.PermissionDenied(f"the receipt of site {site} does not match object {key[:16]}....")
                gen = _generation(claims, f"object {key[:16]}...")
                if known.get(key):
                    if not self.engine.add_replica(key, site, gen):
                        raise errors.NotFound(f"object {key[:16]}... left the archive meanwhile.")
                    recorded.append(key)
                    continue
                new.append(NewFile(_lost_and_found(key, xml), key, int(info["size"]), site,
                                   {query.HEADER_XATTR: xml}, blocks=blocks, gens=((site, gen),) if gen else ()))
            except (errors.DgfError, ValueError, KeyError, TypeError) as exc:
                failed[key] = exc.message if isinstance(exc, errors.DgfError) else "malformed adoption entry"
        adopted: list[str] = []
        for f in new:
            try:
                with self.engine.audited(p.name, "object.adopt", f.path, f"{f.object_key[:16]} at {site}"):
                    self.engine.create_files([f], False)
                adopted.append(f.path)
            except errors.DgfError as exc:
                failed[f.object_key] = exc.message
        if recorded:
            self.engine.audit(p.name, "replica.add", f"{len(recorded)} adopted copies", site)
        return wire.Reply({"adopted": adopted, "recorded": recorded, "failed": failed})

    @wire.verb("admin.fsck.delete", optional=("gens",), site=str, keys=list, gens=list)
    def fsck_delete(self, p: Principal, site: str, keys: list[str], gens: list[Any] | None = None) -> wire.Reply:
        """A delete capability at ``site`` for objects the archive does not record there
        (orphans); recorded copies are never handed out for deletion this way.  ``gens``: the
        generation of each as the site listed it (null: any), so one stored since is kept."""
        keys = [str(k) for k in keys]
        if len(keys) > self.limits.list_items:
            raise self.limits.refuse("list_items", f"a removal of {len(keys)} objects")
        if gens is not None and (len(gens) != len(keys) or not all(g is None or type(g) is int for g in gens)):
            raise errors.UsageError("admin.fsck.delete takes one generation (or null) per key.")
        named = {k: g for k, g in zip(keys, gens or ()) if g is not None}
        # Checked and noted at once: an upload's receipt for these bytes, committed after
        # this, is refused rather than recording a copy the delete is about to remove.
        recorded = self.engine.note_orphans_deleted(site, keys, named)
        if recorded:
            raise errors.PermissionDenied(f"{len(recorded)} of these objects are recorded at site {site}; "
                                          "only orphans may be removed.")
        self.engine.audit(p.name, "fsck.orphans", site, "ok", f"{len(keys)} objects")
        return wire.Reply({"cap": self._cap(p, "delete", site, keys, gens=named)})

    @wire.verb("admin.replica.add", key=str, site=str, receipt=str)
    def replica_add(self, p: Principal, key: str, site: str, receipt: str) -> wire.Reply:
        """Record a copy a repair made, on the site's signed receipt (same size, same block
        list as the object's)."""
        self._record_copy(p, key, site, receipt)
        return wire.Reply({})

    def _record_copy(self, p: Principal, key: str, site: str, receipt: str) -> None:
        keys = self._site_keys({site})        # once per copy a site reports (site.replica.add)
        if site not in keys:
            raise errors.NotFound(f"site {site!r} is not registered.")
        claims = crypto.verify_token(keys[site], receipt)
        blocks = self.engine.object_blocks([key]).get(key, b"")
        if (claims.get("t"), claims.get("site"), claims.get("key")) != ("receipt", site, key) or \
                claims.get("bl", "") != (list_digest(blocks) if blocks else ""):
            raise errors.PermissionDenied(f"the receipt of site {site} does not match object {key[:16]}....")
        if any(st.untrusted for st in self.engine.sites() if st.name == site) and not self.engine.object_seals([key]):
            raise errors.PermissionDenied(f"site {site} is untrusted and object {key[:16]}... is not sealed; "
                                          "its copy there is not recorded.")
        with self.engine.audited(p.name, "replica.add", key, site):
            if not self.engine.add_replica(key, site, _generation(claims, f"object {key[:16]}...")):
                raise errors.NotFound(f"object {key[:16]}... is not in the archive.")

    # -- replication in the background (mode async) -----------------------------------------

    def _replication_mode(self) -> str:
        return _mode_of(self.engine.get_setting("replication.mode"))

    @wire.verb("admin.replicas.mode", optional=("mode",), mode=str)
    def replicas_mode(self, p: Principal, mode: str = "") -> wire.Reply:
        """How uploads are replicated: ``sync`` (the default: a file is published only once every
        copy its directory keeps is durable) or ``async`` (published on one durable copy,
        visible as under-replicated, the other copies made by the sites in the background)."""
        if mode:
            if mode not in ("sync", "async"):
                raise errors.UsageError(f"replication mode is 'sync' or 'async', not {mode[:32]!r}.")
            with self.engine.audited(p.name, "replicas.mode", mode):
                self.engine.set_setting("replication.mode", mode)
        return wire.Reply({"mode": self._replication_mode()})

    @wire.verb("site.work", optional=("limit",), limit=int)
    def site_work(self, p: Principal, limit: int = 64) -> wire.Reply:
        """The copies this site should make now: objects queued as under-replicated whose next
        copy placement puts here, each with a get capability at a site holding a sound copy
        (issued to this site, so it fetches site to site)."""
        limit = max(1, min(limit, 256))
        sites = {st.name: st for st in self.engine.sites()}
        draining = self._draining()
        now = time.monotonic()
        window = self.limits.repair_interval_s * SITE_ALIVE_INTERVALS
        with self._cursor_lock:
            self._asking[p.name] = now
            # Sites that asked for work lately are alive: a copy is not placed on a site that is
            # down (it would wait for it). Until every site has had time to ask, all count.
            alive = {n for n, t in self._asking.items() if now - t < window}
            warm = now - self._started > window
        takers = sorted(n for n in sites if n not in draining and (n in alive or not warm))
        zones = {n: st.zone for n, st in sites.items()}
        done: list[str] = []
        work: dict[str, list[tuple[str, int]]] = {}       # source site -> [(key, size)]
        queue = self.engine.repair_queue(REPAIR_SCAN)
        sealed = self.engine.object_seals([key for key, *_ in queue]) \
            if any(st.untrusted for st in sites.values()) else {}
        for key, size, wanted, copies in queue:
            sound = [s for s, state in copies if state == "ok" and s in sites]
            if len(sound) >= wanted or not sound:
                if len(sound) >= wanted:
                    done.append(key)
                continue                          # no sound copy left: only fsck can say more
            held = {s for s, _ in copies}
            # Unsealed objects go to trusted sites only.
            target = placement.choose(key, [s for s in takers if s not in held and (
                key in sealed or not sites[s].untrusted)], 1, zones=zones, avoid=sound)
            if target == [p.name] and sum(len(v) for v in work.values()) < limit:
                work.setdefault(_read_order(key, sound)[0], []).append((key, size))
        self.engine.repairs_done(done)
        return wire.Reply({"copies": [
            {"source": sites[src].to_wire(), "grant": self._cap(p, "get", src, [k for k, _ in items], at=sites[src]),
             "objects": [[k, n] for k, n in items]} for src, items in work.items()]})

    @wire.verb("site.replica.add", key=str, receipt=str)
    def site_replica_add(self, p: Principal, key: str, receipt: str) -> wire.Reply:
        """A site made a copy it was asked for (site.work): recorded on its own signed receipt."""
        self._record_copy(p, key, p.name, receipt)
        return wire.Reply({})

    @wire.verb("admin.replica.drop", key=str, site=str)
    def replica_drop(self, p: Principal, key: str, site: str) -> wire.Reply:
        """Forget a copy fsck found missing or corrupt; refused while it is the last record
        of the object (its files would point nowhere)."""
        rows = self.engine.replica_rows([key]).get(key, [])
        if not any(s == site for s, _ in rows):
            raise errors.NotFound(f"object {key[:16]}... has no recorded copy at site {site}.")
        if not any(s != site and state == "ok" for s, state in rows):
            raise errors.PermissionDenied(f"site {site} holds the last recorded copy of object {key[:16]}...; "
                                          "it is kept on record until another copy exists.")
        with self.engine.audited(p.name, "replica.drop", key, site):
            self.engine.drop_replica(key, site)
        return wire.Reply({})

    # -- de-identification policy ---------------------------------------------------------

    @wire.verb("deid.options")
    def deid_options(self, p: Principal) -> wire.Reply:
        """The archive's de-identification options (names of the enabled PS3.15 options)."""
        return wire.Reply({"options": self._deid_names()})

    def _deid_names(self) -> list[str]:
        return _deid_names_of(self.engine.get_setting("deid.options"))

    @wire.verb("admin.deid.set", options=list)
    def deid_set(self, p: Principal, options: list[str]) -> wire.Reply:
        names = [str(o) for o in options]
        unknown = sorted(set(names) - set(OPTIONS))
        if unknown:
            raise errors.UsageError(f"unknown de-identification option {unknown[0]!r}; known: {', '.join(OPTIONS)}.")
        if "retain_long_full_dates" in names and "retain_long_modified_dates" in names:
            raise errors.UsageError("choose either full dates or modified dates, not both.")
        ordered = [n for n in OPTIONS if n in names]
        with self.engine.audited(p.name, "deid.options", "archive", ",".join(ordered) or "basic profile only"):
            self.engine.set_setting("deid.options", json.dumps(ordered))
        return wire.Reply({"options": ordered})

    # -- administration -------------------------------------------------------------------

    @wire.verb("admin.principal.add", name=str, role=str, public_key=str)
    def principal_add(self, p: Principal, name: str, role: str, public_key: str) -> wire.Reply:
        principal = make_principal(name, role, public_key)
        with self.engine.audited(p.name, "grant", name, f"role {role}"):
            self.engine.add_principal(principal)
        if self.principals is not None:
            self.principals.forget()
        return wire.Reply(principal.to_wire())

    @wire.verb("admin.principal.remove", name=str)
    def principal_remove(self, p: Principal, name: str) -> wire.Reply:
        if name == p.name:
            raise errors.UsageError("an admin cannot remove itself; ask another admin.")
        with self.engine.audited(p.name, "revoke", name):
            self.engine.remove_principal(name)
        if self.principals is not None:
            self.principals.forget()           # this server's sessions of it end now
        return wire.Reply({})

    @wire.verb("admin.principal.list")
    def principal_list(self, p: Principal) -> wire.Reply:
        return wire.Reply({"principals": [q.to_wire() for q in self.engine.principals()]})

    @wire.verb("admin.audit", optional=("limit", "after"), limit=int, after=int)
    def audit(self, p: Principal, limit: int = 100, after: int = 0) -> wire.Reply:
        """The newest ``limit`` records, or (``after``) the oldest ``limit`` after that id: an
        export reads the whole log in order, a page at a time."""
        limit = max(1, min(limit, self.limits.list_items))
        return wire.Reply({"entries": self.engine.audit_log(limit, after)})

    @wire.verb("admin.erase", patient=str)
    def erase(self, p: Principal, patient: str) -> wire.Reply:
        """Erase a patient, named by pseudonym: every file whose header names them is removed
        (its objects released for deletion at the sites), then their identity records and data
        key are destroyed (a backup made before still holds them).
        Each step is audited; run again after a failure, it goes on where it stopped."""
        if not re.fullmatch(r"P[A-Z2-7]{16}", patient):
            raise errors.UsageError(f"name the patient by pseudonym (P + 16 letters and digits, as in "
                                    f"'dgf_find ... --show PatientID'), not {patient[:32]!r}.")
        q = query.prepare(f"/DicomHeader[PatientID='{patient}']", self.engine.query_catalogue(), self.dialect,
                          self.engine.query_estimate, self.limits, review=False)
        paths = sorted({r["path"] for r in query.run(self.engine, q, "/", [], 0,
                                                     time.monotonic() + self.query_time_limit)})
        released: Released = {}
        for path in paths:
            with self.engine.audited(p.name, "delete", path, released=f"erased {patient}"):
                released.update(self.engine.unlink(path))
        with self.engine.audited(p.name, "patient.erase", patient, f"{len(paths)} files"):
            identities = self.vault.erase(patient)
        log.warning("patient %s erased by %s: %d files, %d identity records", patient, p.name, len(paths), identities)
        return self._release_reply(p, released, {"files": len(paths), "identities": identities})

    @wire.verb("admin.vault.rotate")
    def vault_rotate(self, p: Principal) -> wire.Reply:
        """Replace the key that wraps every patient's data key (pseudonyms stay)."""
        if self.vault_source is None:
            raise errors.ServerError("this metaserver does not know where its vault key lives.")
        with self._cursor_lock:                  # one rotation at a time in this process
            old = self.vault.keys.kek_id
            n = self.vault.rotate(self.vault_source)
        self.engine.audit(p.name, "vault.rotate", "vault", "ok", f"{n} patient keys, {old[:8]} -> "
                                                                 f"{self.vault.keys.kek_id[:8]}")
        log.warning("vault key rotated by %s: %d patient keys re-wrapped", p.name, n)
        return wire.Reply({"patients": n, "kek": self.vault.keys.kek_id[:8]})

    @wire.verb("admin.audit.verify")
    def audit_verify(self, p: Principal) -> wire.Reply:
        """Walk the audit hash chain (see ``SqlEngine.audit_verify``)."""
        result = self.engine.audit_verify()
        self.engine.audit(p.name, "audit.verify", "audit", "ok" if result["broken_at"] is None else "broken",
                          f"{result['records']} records")
        return wire.Reply(result)


def make_principal(name: str, role: str, public_key: str) -> Principal:
    if role not in ROLES:
        raise errors.UsageError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}.")
    if not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise errors.UsageError(f"principal names use letters, digits, '-', '_' and '.', got {name!r}.")
    crypto.load_public(public_key)
    return Principal(name, role, " ".join(public_key.split()[:2]), crypto.fingerprint(public_key))


def open_engine(url: str, db_wait_s: float = DEFAULT_LIMITS.db_wait_s) -> SqlEngine:
    return SqlEngine(url, db_wait_s)


def build(cfg: MetaserverConfig) -> ssh.SSHServer:
    engine = open_engine(cfg.db, cfg.limits.db_wait_s)
    source = VaultSource(cfg.vault_key, cfg.path.parent)
    recorded = engine.get_setting("vault.kek_id")
    keys = open_keys(source, recorded)
    if recorded is None:
        engine.set_setting("vault.kek_id", keys.kek_id)      # this database's key from now on
    vault = Vault(engine, keys)
    host_key = crypto.load_paramiko_key(cfg.host_key)
    principals = Principals(engine)
    service = MetaService(engine, vault, crypto.load_signing_key(cfg.host_key), cfg.limits, principals)
    service.vault_source = source

    def authorize(key: paramiko.PKey) -> Principal | None:
        return principals.lookup(crypto.fingerprint(key))

    return ssh.SSHServer(host_key, service, SUBSYSTEM, authorize, host=cfg.listen[0], port=cfg.listen[1],
                          limits=cfg.limits)


def init(cfg_path: Path) -> None:
    """Create the host key and vault key named by a metaserver config, if missing."""
    cfg = MetaserverConfig.load(cfg_path)
    if not cfg.host_key.exists():
        crypto.generate_keypair(cfg.host_key, "dgf-metaserver")
    if not cfg.vault_key.startswith("env:") and not Path(cfg.vault_key).exists():
        crypto.new_vault_keyfile(Path(cfg.vault_key))
    open_engine(cfg.db).close()
    # What every client and site config pins as metaserver_host_key.
    print(f"metaserver_host_key = {crypto.public_line(crypto.load_paramiko_key(cfg.host_key))}")


def protect(cfg: MetaserverConfig) -> None:
    """Seal the vault key file with a passphrase (``DGF_VAULT_NEW_PASSPHRASE``, or typed twice
    at the terminal); the metaserver then needs it at every start (``DGF_VAULT_PASSPHRASE``)."""
    import getpass

    source = VaultSource(cfg.vault_key, cfg.path.parent)
    if source.env is not None:
        raise errors.UsageError(f"the vault key comes from {source.describe()}; seal a file instead.")
    keys = source.read()
    phrase = os.environ.get("DGF_VAULT_NEW_PASSPHRASE")
    if not phrase:
        if not sys.stdin.isatty():
            raise errors.UsageError("set DGF_VAULT_NEW_PASSPHRASE or run this on a terminal.")
        phrase = getpass.getpass("new passphrase for the vault key: ")
        if phrase != getpass.getpass("the same again: "):
            raise errors.UsageError("the two passphrases differ; nothing was changed.")
    if len(phrase) < 12:
        raise errors.UsageError("use a passphrase of 12 characters or more.")
    crypto.write_private(source.path, source.encode(keys, phrase))
    print(f"vault key {source.path} sealed; start the metaserver with {PASSPHRASE_ENV} set, or on a terminal")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dgf-metaserver",
        description="dgf metadata server: namespace, XML headers, identity vault, principals, audit, "
                    "served over SSH (subsystem dgf-meta).")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_init = sub.add_parser("init", help="create the host key, vault key and database named by the config "
                                         "(and enroll principals, as enroll does)")
    p_init.add_argument("--config", required=True)
    p_serve = sub.add_parser("serve", help="run the server in the foreground")
    p_serve.add_argument("--config", required=True, help="metaserver config file (INI, [metaserver])")
    p_serve.add_argument("--db", help="database URL overriding the config, e.g. postgresql://user@host/dgf")
    p_serve.add_argument("--ready-file", help="write HOST:PORT here once listening")
    p_enroll = sub.add_parser("enroll", help="enroll principals directly in the database (bootstrap); "
                                             "repeat --name/--role/--public-key for several at once")
    p_enroll.add_argument("--config", required=True)
    for p, needed in ((p_enroll, True), (p_init, False)):
        p.add_argument("--name", required=needed, action="append", default=[])
        p.add_argument("--role", required=needed, choices=ROLES, action="append", default=[])
        p.add_argument("--public-key", required=needed, action="append", default=[],
                       help="file with an OpenSSH ed25519 public key")
    p_vault = sub.add_parser("vault", help="seal the vault key file with a passphrase (or change it)")
    p_vault.add_argument("action", choices=["protect"])
    p_vault.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s dgf-metaserver %(levelname)s %(message)s")
    # Alembic says ~16 lines at INFO on every start ("setup plugin ...", "Context impl ..."):
    # they buried the one line that says why a start failed.  Its warnings and errors remain.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        if args.cmd == "vault":
            protect(MetaserverConfig.load(args.config))
            return 0
        if args.cmd == "init":
            init(Path(args.config))
        cfg = MetaserverConfig.load(args.config)
        if args.cmd in ("init", "enroll"):
            if not len(args.name) == len(args.role) == len(args.public_key):
                raise errors.UsageError("enroll takes one --role and one --public-key per --name.")
            if args.name:
                engine = open_engine(cfg.db)
                try:
                    for name, role, key in zip(args.name, args.role, args.public_key):
                        engine.add_principal(make_principal(name, role, Path(key).read_text().strip()))
                        engine.audit("bootstrap", "grant", name, "ok", f"role {role}")
                finally:
                    engine.close()
            return 0
        if args.db:
            cfg = dataclasses.replace(cfg, db=args.db)
        server = build(cfg)
    except errors.DgfError as exc:
        print(f"dgf-metaserver: {exc}", file=sys.stderr)
        return exc.exit_code
    log.info("metaserver listening on %s:%d", *server.address)
    server.run(args.ready_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
