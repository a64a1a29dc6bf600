"""The ``dgf-io`` service and the ``dgf-ioserver`` process.

Clients authenticate with their SSH key (the keys enrolled at the metaserver, fetched over the
site's own authenticated link and refreshed when an unknown key knocks), then present capabilities
signed by the metaserver: no operation on an object happens without one.  Uploads answer with a
receipt signed by the site key, which the metaserver checks before an upload becomes visible.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dgf import crypto, envelope, errors, ssh, wire
from dgf.config import IoserverConfig
from dgf.integrity import block_digests, list_digest
from dgf.limits import DEFAULT as DEFAULT_LIMITS
from dgf.limits import Limits
from dgf.sshlib import paramiko
from dgf.types import Site
from ioserver.store import LocalObjectStore, ObjectStore, check_key

log = logging.getLogger("dgf.ioserver")

SUBSYSTEM = "dgf-io"
#: Seconds between refreshes of the enrolled keys: a removed principal is cut off within this.
KEY_REFRESH_S = 2.0
#: Seconds between attempts to register while the site waits to be enrolled.
REGISTER_RETRY_S = 2.0
#: Seconds the archive's de-identification profile is trusted before it is asked for again.
PROFILE_REFRESH_S = 30.0
#: An object the profile refuses has it asked for again, at most this often (ArchiveProfile).
PROFILE_RECHECK_S = 0.25
#: Objects per fsck.adopt request: each reply carries their XML headers.
ADOPT_BATCH = 32


def _xh(xml: bytes) -> str:
    """What a receipt signs for an XML header: its SHA-256 ("" when none was derived)."""
    return hashlib.sha256(xml).hexdigest() if xml else ""


@dataclass(frozen=True)
class Peer:
    name: str
    role: str
    fingerprint: str


@dataclass
class Session:
    """One client channel: who it is and which capabilities it presented."""

    peer: Peer
    caps: list[crypto.Capability] = field(default_factory=list)

    def require(self, op: str, key: str | None) -> list[crypto.Capability]:
        """The session's unexpired capabilities for ``op`` on ``key`` (None: any object)."""
        now = time.time()
        self.caps = [c for c in self.caps if c.expires > now]
        held = [cap for cap in self.caps
                if cap.op == op and (cap.keys is None or (key is not None and key in cap.keys))]
        if held:
            return held
        raise errors.PermissionDenied(
            f"no valid '{op}' capability for this object; the metaserver grants them per request."
        )


class KeyRing:
    """Which SSH keys this site accepts: the metaserver's list of enrolled principals.

    Refreshed every KEY_REFRESH_S seconds in the background and checked on every request, so a
    principal an admin removes loses its open sessions here within seconds, not when its
    capabilities expire."""

    def __init__(self, fetch: Any) -> None:
        self._fetch = fetch
        self._keys: dict[str, Peer] = {}
        self._last = 0.0
        self._lock = threading.Lock()
        #: The archive's grant epoch: capabilities issued under an older one are refused.
        self.grant_epoch = 0
        #: An admin marked this site untrusted: it stores sealed objects only (dgf/envelope.py).
        self.untrusted = False

    def start(self) -> None:
        def loop() -> None:
            while True:
                time.sleep(KEY_REFRESH_S)
                try:
                    self.refresh(force=True)
                except Exception as exc:  # noqa: BLE001 - the metaserver may be away; keep the last list
                    log.warning("could not refresh enrolled keys from the metaserver (%s)", type(exc).__name__)

        threading.Thread(target=loop, daemon=True, name="dgf-keyring").start()

    def enrolled(self, fingerprint: str) -> bool:
        return fingerprint in self._keys

    def refresh(self, force: bool = False) -> None:
        with self._lock:
            # An unknown key may belong to a principal enrolled a moment ago: look again, at most
            # a few times a second (a stranger knocking must not hammer the metaserver).
            if not force and time.time() - self._last < 0.25:
                return
            self._last = time.time()
            reply = self._fetch()
            self._keys = {p["fingerprint"]: Peer(p["name"], p["role"], p["fingerprint"])
                          for p in reply["principals"]}
            self.grant_epoch = int(reply.get("grant_epoch") or 0)
            self.untrusted = bool(reply.get("untrusted"))

    def lookup(self, key: paramiko.PKey) -> Peer | None:
        fp = crypto.fingerprint(key)
        peer = self._keys.get(fp)
        if peer is None:
            try:
                self.refresh()
            except errors.DgfError:
                log.warning("could not refresh enrolled keys from the metaserver")
            peer = self._keys.get(fp)
        return peer


class ArchiveProfile:
    """The archive's de-identification profile as the metaserver states it, refreshed every
    PROFILE_REFRESH_S; the last one known stands while the metaserver is away (asked again at
    most once a PROFILE_RECHECK_S meanwhile, so that checks do not each wait on it)."""

    def __init__(self, fetch: Callable[[], list[str]]) -> None:
        self._fetch = fetch
        self._profile: Any = None
        self._names: list[str] | None = None
        self._read = 0.0
        self._tried = 0.0
        self._lock = threading.Lock()

    def get(self, again: bool = False) -> Any:
        """The profile; ``again``: asked afresh, unless it was asked for within PROFILE_RECHECK_S
        (an object it refuses may have been de-identified under options an admin set since)."""
        from dgf.dicom.profile import stored_profile

        with self._lock:
            now = time.monotonic()
            due = now - self._read > PROFILE_REFRESH_S or again
            if self._profile is None or (due and now - self._tried > PROFILE_RECHECK_S):
                self._tried = now
                try:
                    names = sorted(self._fetch())
                    if names != self._names:
                        self._profile = stored_profile(names)
                        self._names = names
                    self._read = time.monotonic()
                except errors.DgfError as exc:
                    if self._profile is None:
                        raise errors.ServerError("this site does not know the archive's de-identification "
                                                 f"profile yet ({exc.message}); it stores nothing until it does.") from exc
                    log.warning("could not refresh the de-identification profile (%s); keeping the last", exc)
            return self._profile


class IoService(wire.Service):
    def __init__(self, site: str, store: ObjectStore, cap_public: Any,
                 site_key: Any, keyring: KeyRing | None = None,
                 limits: Limits = DEFAULT_LIMITS, peer_key: paramiko.PKey | None = None) -> None:
        super().__init__()
        self.site = site
        self.store = store
        self._cap_public = cap_public
        self._site_key = site_key
        self._peer_key = peer_key          # this site's SSH identity, to reach other sites
        self.keyring = keyring
        self.limits = limits
        #: The archive's profile; every object stored for an upload is checked against it.
        self.profile: ArchiveProfile | None = None

    def new_session(self, principal: Peer) -> Session:
        return Session(principal)

    def dispatch(self, ctx: Session, header: dict[str, Any], payload: wire.Payload) -> wire.Reply:
        if self.keyring is not None and not self.keyring.enrolled(ctx.peer.fingerprint):
            raise errors.PermissionDenied(f"principal {ctx.peer.name!r} is no longer enrolled; "
                                          "its sessions at this site are closed to it.")
        if ctx.caps:
            # A revoked grant ends the capabilities issued under it within the key refresh.
            ctx.caps = [c for c in ctx.caps if not self._revoked(c)]
        return super().dispatch(ctx, header, payload)

    def _revoked(self, cap: crypto.Capability) -> bool:
        return cap.epoch is not None and self.keyring is not None and cap.epoch < self.keyring.grant_epoch

    def _receipt(self, key: str, size: int, digests: bytes, gen: int, header: str = "") -> str:
        """This site's signed word that it holds ``key`` (``size`` bytes, hash list ``digests``)
        as of generation ``gen`` (ObjectStore.put) and, for an upload, the SHA-256 of the XML
        header it derived from those bytes (``xh``): the metaserver publishes no other header
        for the object."""
        claims: dict[str, Any] = {"t": "receipt", "site": self.site, "key": key, "size": size, "g": gen}
        if digests:
            claims["bl"] = list_digest(digests)
        if header:
            claims["xh"] = header
        return crypto.sign_token(self._site_key, claims)

    def _batch_receipt(self, objects: list[tuple[str, int, bytes, str, int] | None]) -> str:
        """One signed word for a whole ``put.batch``: ``objs[i]`` is ``[key, size, hash-list
        digest, header SHA-256]`` and ``gens[i]`` the generation of object ``i`` as :meth:`_receipt`
        would sign them (apart, so that a metaserver older than generations reads it), or null where
        object ``i`` was refused.  A commit names an object's entry as ``REF#i``; one signature
        per batch instead of one per object (Ed25519: 0.04 ms to sign here, 0.12 ms to verify)."""
        return crypto.sign_token(self._site_key, {"t": "receipts", "site": self.site, "objs": [
            None if o is None else [o[0], o[1], list_digest(o[2]), o[3]] for o in objects],
            "gens": [None if o is None else o[4] for o in objects]})

    def _vet(self, data: bytes | memoryview, key: str, derive: bool = True) -> bytes:
        """Check an object against the archive's profile before it is stored or signed for
        (PolicyRefused names what is wrong), and return its XML header as this site derives it
        from the bytes: the one header the metaserver publishes for it.  Empty for a sealed
        object, and unless ``derive`` (an uploader's extra copies: their headers go unused)."""
        if self._sealed(data, key):
            return b""      # sealed: the metaserver checks what the uploader shows it (up.commit)
        return self._checked_header(data, key, derive)

    def _checked_header(self, data: bytes | memoryview, key: str, derive: bool = True) -> bytes:
        """The XML header of object ``key`` once it passed the profile (parsed once for both)."""
        from dgf.dicom import raw, validate
        from dgf.dicom.xmlheader import header_xml

        what = f"object {key[:16]}..."
        try:
            part = raw.parse_part10(data)  # type: ignore[arg-type]
            if self.profile is not None:
                known = self.profile.get()
                try:
                    validate.check(part, known, what)
                except errors.PolicyRefused:
                    # Options an admin changed since this site last asked: checked under the
                    # archive's profile as it is now (asked at most once a PROFILE_RECHECK_S).
                    now = self.profile.get(again=True)
                    if now is known:
                        raise
                    validate.check(part, now, what)
            return header_xml(part) if derive else b""
        except errors.InvalidDicom as exc:
            raise errors.PolicyRefused(f"{what} is not a DICOM file this archive stores ({exc.message}).") from exc

    def _sealed(self, data: bytes | memoryview, key: str) -> bool:
        """Whether ``data`` is a sealed object; an untrusted site refuses any other."""
        if envelope.trailer_of(data) is not None:
            return True
        if self.keyring is not None and self.keyring.untrusted:
            raise errors.PolicyRefused(f"site {self.site} is untrusted and stores sealed objects only; object "
                                       f"{key[:16]}... is not sealed.")
        return False

    @wire.verb("hello")
    def hello(self, s: Session) -> wire.Reply:
        return wire.Reply({"site": self.site, "principal": s.peer.name})

    @wire.verb("auth", token=str)
    def auth(self, s: Session, token: str) -> wire.Reply:
        cap = crypto.check_capability(self._cap_public, token, s.peer.fingerprint, self.site)
        if self._revoked(cap):
            raise errors.PermissionDenied("the cohort grants this capability was issued under have changed "
                                          "since; ask the metaserver for a new one.")
        s.caps.append(cap)
        return wire.Reply({"op": cap.op, "expires": cap.expires})

    @wire.verb("put", payload=True, optional=("header",), key=str, size=int, header=bool)
    def put(self, s: Session, payload: wire.Payload, key: str, size: int, header: bool = False) -> wire.Reply:
        """One object, streamed; with ``header``, the XML header derived here is the reply's payload."""
        s.require("put", key)
        if payload.size != size:
            raise errors.UsageError(f"put declared {size} bytes but sent {payload.size}.")
        created, digests, gen = self.store.put(key, payload.chunks(), size)
        try:
            with self.store.mapped(key) as data:
                xml = self._vet(data, key)
        except errors.PolicyRefused:
            if created:
                self.store.delete(key, gen)  # refused: nothing of it stays here
            raise
        return wire.Reply({"created": created, "receipt": self._receipt(key, size, digests, gen, _xh(xml))},
                          payload=xml if header else b"")

    @wire.verb("put.batch", payload=True, optional=("headers",), keys=list, sizes=list, headers=list)
    def put_batch(self, s: Session, payload: wire.Payload, keys: list[str], sizes: list[int],
                  headers: list[int] | None = None) -> wire.Reply:
        """Many small objects in one frame: the payload is their bytes back to back.

        Each object is checked and stored on its own; the reply has a receipt or an error per
        object, so one bad object does not fail its neighbours.  ``headers`` names the objects
        (by index) whose XML headers the uploader wants back, the ones it will publish: only
        those are derived, and the reply's payload is them back to back (``header_sizes``).
        Without it every header is derived and none sent."""
        if len(keys) != len(sizes) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                              for n in sizes):
            raise errors.UsageError("put.batch needs one non-negative size per key.")
        if sum(sizes) != payload.size:
            raise errors.UsageError(f"put.batch declared {sum(sizes)} bytes but sent {payload.size}.")
        # Bounded before a byte is read: the batch is held in memory for its group commit.
        if len(keys) > self.limits.batch_objects:
            raise self.limits.refuse("batch_objects", f"a put.batch of {len(keys)} objects")
        if payload.size > self.limits.batch_bytes:
            raise self.limits.refuse("batch_bytes", f"a put.batch of {payload.size} bytes")
        if headers is not None and len(headers) > len(keys):
            raise errors.UsageError("put.batch asks for more headers than it sends objects.")
        wanted = None if headers is None else {i for i in headers if isinstance(i, int)}
        s.require("put", None)
        items = [(str(key), b"".join(payload.chunks_of(size))) for key, size in zip(keys, sizes)]
        xmls: dict[int, bytes] = {}
        refused: dict[int, str] = {}
        for i, (key, data) in enumerate(items):
            try:
                xmls[i] = self._vet(data, key, derive=wanted is None or i in wanted)
            except errors.PolicyRefused as exc:
                refused[i] = exc.message
        vetted = [items[i] for i in sorted(xmls)]
        stored = dict(zip(sorted(xmls), self.store.put_many(vetted)))
        objects: list[tuple[str, int, bytes, str, int] | None] = []
        failures: list[str | None] = []
        for i, (key, data) in enumerate(items):
            got = stored.get(i)
            failures.append(refused.get(i) or (got.message if isinstance(got, errors.DgfError) else None))
            objects.append(None if failures[-1] is not None or not isinstance(got, int) else
                           (key, len(data), block_digests(data), _xh(xmls[i]), got))
        sent = [xmls[i] if objects[i] is not None else b"" for i in sorted(wanted or ()) if 0 <= i < len(items)]
        return wire.Reply({"batch": self._batch_receipt(objects), "errors": failures,
                           "receipts": [None if o is None else f"#{i}" for i, o in enumerate(objects)],
                           "header_sizes": [len(x) for x in sent]}, payload=b"".join(sent))

    @wire.verb("get.batch", keys=list)
    def get_batch(self, s: Session, keys: list[str]) -> wire.Reply:
        """Whole objects back to back in one reply; sizes (-1: missing) in the result.

        Hashes are checked while streaming; a corrupt object is quarantined after it is sent
        (the client verifies every object and tries another replica)."""
        sizes = []
        for key in keys:
            s.require("get", key)
            try:
                sizes.append(self.store.stat(key))
            except errors.NotFound:
                sizes.append(-1)

        def stream() -> Iterator[bytes]:
            for key, size in zip(keys, sizes):
                if size < 0:
                    continue
                sent = 0
                try:
                    _, chunks = self.store.get(key)
                    for chunk in chunks:
                        sent += len(chunk)
                        yield chunk
                except errors.DgfError:
                    pass  # quarantined or gone meanwhile; the client's hash check rejects it
                if sent < size:
                    yield b"\0" * (size - sent)  # keep the frame whole for the objects after it

        return wire.Reply({"sizes": sizes}, stream=stream(), stream_size=sum(n for n in sizes if n > 0))

    @wire.verb("get", optional=("offset", "length"), key=str, offset=int, length=int)
    def get(self, s: Session, key: str, offset: int = 0, length: int = -1) -> wire.Reply:
        s.require("get", key)
        n, chunks = self.store.get(key, offset, length)
        if n <= wire.CHUNK:
            return wire.Reply({"size": n}, payload=b"".join(chunks))
        return wire.Reply({"size": n}, stream=chunks, stream_size=n)

    @wire.verb("stat", key=str)
    def stat(self, s: Session, key: str) -> wire.Reply:
        s.require("get", key)
        return wire.Reply({"size": self.store.stat(key)})

    @wire.verb("delete", key=str)
    def delete(self, s: Session, key: str) -> wire.Reply:
        """Remove an object released by the metaserver.  Its capability names the generation it
        released (where the metaserver knows it): bytes stored again since are kept.  Of the
        session's capabilities for the object (an earlier release's may be among them), one
        that names the generation stored, or none, allows it."""
        deleted, kept = self._delete(key, s.require("delete", key))
        return wire.Reply({"deleted": deleted, "kept": kept})

    @wire.verb("delete.batch", keys=list)
    def delete_batch(self, s: Session, keys: list[str]) -> wire.Reply:
        """:meth:`delete` of many objects in one frame (an ``rm -r`` frees thousands), with
        ``deleted`` and ``kept`` per key.  Every key is checked first: one malformed, or without
        a capability, refuses the frame and nothing of it is deleted."""
        if len(keys) > self.limits.batch_objects:
            raise self.limits.refuse("batch_objects", f"a delete.batch of {len(keys)} objects")
        caps = [s.require("delete", check_key(key)) for key in keys]
        done = [self._delete(key, c) for key, c in zip(keys, caps)]
        return wire.Reply({"deleted": [d for d, _ in done], "kept": [k for _, k in done]})

    def _delete(self, key: str, caps: list[crypto.Capability]) -> tuple[bool, bool]:
        """(deleted, kept): kept when stored again since the generation named (an absent
        object is neither)."""
        # A release of a replica recorded before generations names none: deleted as before.
        gens = None if any(c.gens is None or key not in c.gens for c in caps) else \
            {c.gens[key] for c in caps if c.gens is not None}
        deleted = self.store.delete(key, gens)
        return deleted, not deleted and self.store.held(key)

    @wire.verb("verify", key=str)
    def verify(self, s: Session, key: str) -> wire.Reply:
        """Re-hash a stored object here (a reader found a bad block): a corrupt copy is
        quarantined and reported to the metaserver, which stops offering it."""
        s.require("get", key)
        try:
            return wire.Reply({"ok": self.store.verify(key)})
        except errors.IntegrityError:
            return wire.Reply({"ok": False})

    @wire.verb("recon.partial", optional=("seals",), keys=list, indices=list, geometry=dict, window=str,
               seals=dict)
    def recon_partial(self, s: Session, keys: list[str], indices: list[int], geometry: dict[str, Any],
                      window: str, seals: dict[str, Any] | None = None) -> wire.Reply:
        """The map step of FDK near the data: filter and back-project the projections this site
        holds (``keys``, which are projections ``indices`` of the scan) into a partial volume,
        returned as float32 bytes [z, y, x].  Sealed projections are unsealed with the keys the
        reader sends in ``seals`` (key: [data key base64, salt hex, size]); an untrusted site
        takes no key and reconstructs nothing sealed."""
        from dgf.dicom.projections import read_projection
        from ioserver.recon import Geometry, partial_fdk

        if len(keys) != len(indices) or not keys:
            raise errors.UsageError("recon.partial needs one projection index per key.")
        for key in keys:
            s.require("get", key)
        g = Geometry.from_dict(geometry)
        if not all(isinstance(i, int) and 0 <= i < g.n_projections for i in indices):
            raise errors.UsageError("recon.partial got a projection index outside the scan.")
        nu, nv = g.detector_shape
        # Bounded before anything is allocated: the volume and the projections it reads.
        voxels = int(np.prod(g.volume_shape, dtype=np.int64))
        if voxels > self.limits.recon_voxels:
            raise self.limits.refuse("recon_voxels", f"a partial volume of {'x'.join(map(str, g.volume_shape))} voxels")
        if len(keys) * nu * nv * 4 > self.limits.recon_projection_bytes:
            raise self.limits.refuse("recon_projection_bytes",
                                     f"{len(keys)} projections of {nu}x{nv} ({len(keys) * nu * nv * 4} bytes)")
        projections = np.empty((len(keys), nv, nu), dtype=np.float32)
        if seals and self.keyring is not None and self.keyring.untrusted:
            raise errors.PermissionDenied(f"site {self.site} is untrusted: it takes no key, so it cannot "
                                          "reconstruct sealed projections; reconstruct on a trusted site.")
        for slot, key in enumerate(keys):
            _, chunks = self.store.get(key)
            data = b"".join(chunks)
            if envelope.trailer_of(data) is not None:
                seal = (seals or {}).get(key)
                if not isinstance(seal, list) or len(seal) != 3:
                    raise errors.UsageError(f"projection {key[:16]}... is sealed here; the request must carry its key.")
                data = envelope.Envelope(base64.b64decode(seal[0]), bytes.fromhex(seal[1]), int(seal[2])).open(data)
            try:
                _, _, _, image = read_projection(data, (nv, nu))
            except errors.UsageError as exc:
                raise errors.UsageError(f"projection {key[:16]}...: {exc.message}") from None
            projections[slot] = image
        log.info("site %s: back-projecting %d projections into %s", self.site, len(keys), g.volume_shape)
        volume = partial_fdk(projections, g, [int(i) for i in indices], window)
        raw = volume.reshape(-1).data.cast("B")
        return wire.Reply({"shape": list(volume.shape), "dtype": "float32"},
                          stream=(raw[i:i + wire.CHUNK] for i in range(0, len(raw), wire.CHUNK)),
                          stream_size=len(raw))

    # -- checking and repair (dgf fsck): an admin's "fsck" capability ----------------------

    @wire.verb("fsck.verify", keys=list)
    def fsck_verify(self, s: Session, keys: list[str]) -> wire.Reply:
        """Re-hash these objects here (streamed from disk, not sent anywhere): ok, missing or
        corrupt (a corrupt copy is quarantined and reported, as on a read)."""
        s.require("fsck", None)
        if len(keys) > self.limits.list_items:
            raise self.limits.refuse("list_items", f"a check of {len(keys)} objects")
        states: dict[str, str] = {}
        for key in keys:
            key = str(key)
            try:
                states[key] = "ok" if self.store.verify(key) else "corrupt"
            except errors.NotFound:
                states[key] = "missing"
            except errors.IntegrityError:
                states[key] = "corrupt"
        return wire.Reply({"states": states})

    @wire.verb("fsck.list", optional=("after", "limit"), after=str, limit=int)
    def fsck_list(self, s: Session, after: str = "", limit: int = 10_000) -> wire.Reply:
        """The objects stored here, in key order, a page at a time: [key, size, mtime], and
        beside them (for admin clients older than generations) each one's generation: a
        removal of orphans names it, and an object stored again since is kept."""
        s.require("fsck", None)
        limit = max(1, min(limit, self.limits.list_items))
        objects = self.store.listing(after, limit)
        return wire.Reply({"objects": [[k, n, t] for k, n, t, _ in objects], "gens": [g for *_, g in objects],
                           "more": len(objects) == limit})

    @wire.verb("fsck.adopt", keys=list)
    def fsck_adopt(self, s: Session, keys: list[str]) -> wire.Reply:
        """What the metaserver needs to take back objects this site holds but no file records
        (written after the backup a metadata restore went back to): for each, re-hashed here,
        its size, hash list and this site's signed receipt, and the XML header built here from
        the (de-identified) bytes; or why not.  Nothing leaves but the header."""
        s.require("fsck", None)
        if len(keys) > ADOPT_BATCH:
            raise errors.UsageError(f"fsck.adopt takes at most {ADOPT_BATCH} objects a request, not {len(keys)}.")
        out: dict[str, dict[str, Any]] = {}
        for key in keys:
            key = str(key)
            try:
                out[key] = self._adoptable(key)
            except errors.DgfError as exc:
                out[key] = {"error": exc.message}
        return wire.Reply({"objects": out})

    def _adoptable(self, key: str) -> dict[str, Any]:
        import base64
        import mmap
        import tempfile

        from dgf.integrity import Hasher

        # Stamped before it is read, as a put does: the receipt names this generation.
        gen = self.store.stamp(key)
        if gen is None:
            raise errors.NotFound(f"object {key[:16]}... is not stored at this site.")
        n, chunks = self.store.get(key)          # verified as it is read; a bad copy is quarantined
        hasher = Hasher()
        with tempfile.TemporaryFile(prefix="dgf-adopt-") as spool:
            for chunk in chunks:
                hasher.update(chunk)
                spool.write(chunk)
            spool.flush()
            if hasher.whole.hexdigest() != key:
                raise errors.IntegrityError(f"object {key[:16]}... failed its checksum here.")
            with mmap.mmap(spool.fileno(), 0, access=mmap.ACCESS_READ) if n else contextlib.nullcontext(b"") as data:
                if envelope.trailer_of(data) is not None:  # type: ignore[arg-type]
                    raise errors.PolicyRefused(f"object {key[:16]}... is sealed: no site can read its header, "
                                               "so it cannot be adopted.")
                xml = self._checked_header(data, key)  # type: ignore[arg-type]   # stored before sites checked, perhaps
        digests = hasher.digests()
        return {"size": n, "blocks": base64.b64encode(digests).decode(), "xml": xml.decode("utf-8", "surrogateescape"),
                "receipt": self._receipt(key, n, digests, gen, _xh(xml))}

    @wire.verb("replicate", key=str, size=int, source=dict, grant=str)
    def replicate(self, s: Session, key: str, size: int, source: dict[str, Any], grant: str) -> wire.Reply:
        """Copy an object here from another site, site to site (the bytes do not pass through
        the admin who asks): ``grant`` is the metaserver's get capability at ``source``, issued
        to this site.  Checked and stored as an upload is; the reply is this site's receipt."""
        s.require("fsck", None)
        try:
            origin = Site.from_wire(source)
            if not 0 < origin.port < 65536:
                raise ValueError(origin.port)
        except (KeyError, TypeError, ValueError) as exc:
            raise errors.UsageError("the replication source is not a site (name, host, port 1-65535 "
                                    "and host key).") from exc
        (_, receipt, error), = self.copy_from(origin, grant, [(key, size)])
        if error is not None:
            raise error
        return wire.Reply({"created": True, "receipt": receipt})

    def copy_from(self, origin: Site, grant: str, objects: list[tuple[str, int]]
                  ) -> list[tuple[str, str | None, errors.DgfError | None]]:
        """Fetch ``objects`` (key, size) from site ``origin`` over one connection, presenting
        ``grant`` (the metaserver's get capability there, issued to this site), and store each
        as an upload is stored: (key, this site's receipt, or the error) for each."""
        if self._peer_key is None:
            raise errors.ServerError(f"site {self.site} has no key to reach other sites with.")
        if origin.name == self.site:
            raise errors.UsageError("a site cannot replicate from itself.")
        # The source is the one the metaserver named in the grant, address included: a site
        # connects (and presents its key) only where the metaserver says, whoever asks.
        claims = crypto.verify_token(self._cap_public, grant)
        if (claims.get("op"), claims.get("site"), claims.get("at")) != \
                ("get", origin.name, [origin.host, origin.port, origin.host_key]):
            raise errors.PermissionDenied(f"the replication source {origin.name!r} at {origin.host}:{origin.port} "
                                          "is not the site the metaserver's grant names; nothing was copied.")
        where = f"site {origin.name}"
        out: list[tuple[str, str | None, errors.DgfError | None]] = []
        conn = ssh.Connection(origin.host, origin.port, self._peer_key, origin.host_key, SUBSYSTEM,
                               name=where, read_timeout=wire.READ_TIMEOUT)
        try:
            chan = conn.channel()
            chan.call("auth", token=grant)
            for key, size in objects:
                try:
                    chan.send("get", {"key": key})
                    header = chan.receive_header()
                    n = int(header.get("n", 0))
                    if n != size:
                        raise errors.IntegrityError(f"{where} holds {n} bytes of object {key[:16]}..., not {size}.")
                    created, digests, gen = self.store.put(key, chan.payload_chunks(n), size)
                    if self.keyring is not None and self.keyring.untrusted:
                        try:
                            with self.store.mapped(key) as data:
                                self._sealed(data, key)
                        except errors.PolicyRefused:
                            if created:
                                self.store.delete(key, gen)
                            raise
                except errors.DgfError as exc:
                    # The channel may be out of step (a refused or half-read object): the rest
                    # of the batch waits for the next request.
                    out.extend((k, None, exc) for k, _ in objects[len(out):])
                    break
                log.info("site %s: replicated %s (%d bytes) from %s", self.site, key[:16], size, origin.name)
                out.append((key, self._receipt(key, size, digests, gen), None))
        finally:
            conn.close()
        return out

    @wire.verb("scrub")
    def scrub(self, s: Session) -> wire.Reply:
        if s.peer.role != "admin":
            raise errors.PermissionDenied("only an admin may scrub a site.")
        return wire.Reply({"corrupt": self.store.scrub()})


class SiteMetaLink:
    """The site's own authenticated channel to the metaserver (registration, enrolled keys)."""

    def __init__(self, cfg: IoserverConfig) -> None:
        self.cfg = cfg
        self._key = crypto.load_paramiko_key(cfg.key)
        self._chan: wire.RpcChannel | None = None
        self._lock = threading.Lock()

    def call(self, verb_name: str, **args: Any) -> dict[str, Any]:
        with self._lock:
            for attempt in (1, 2):
                try:
                    if self._chan is None or self._chan.broken:
                        conn = ssh.connect_any(self.cfg.metaserver, self._key, self.cfg.metaserver_host_key,
                                                "dgf-meta", "the metaserver")
                        self._chan = conn.channel()
                    return self._chan.call(verb_name, **args)[0]
                except errors.TransportError:
                    self._chan = None
                    if attempt == 2:
                        raise
            raise AssertionError("unreachable")


def _reporter(link: SiteMetaLink) -> Any:
    """Report quarantined objects to the metaserver from a thread of their own (a read that
    found the corruption must not wait for the metaserver)."""
    pending: list[str] = []
    cond = threading.Condition()

    def loop() -> None:
        while True:
            with cond:
                while not pending:
                    cond.wait()
                keys = pending[:]
                del pending[:]
            try:
                link.call("site.report", keys=keys, state="quarantined")
            except errors.DgfError as exc:
                log.error("could not report %d quarantined objects to the metaserver (%s)", len(keys), exc)

    threading.Thread(target=loop, daemon=True, name="dgf-report").start()

    def report(key: str) -> None:
        with cond:
            pending.append(key)
            cond.notify()

    return report


def _scrubber(store: LocalObjectStore, rate_mb_s: float, pause_s: float) -> None:
    """Re-hash every stored object in the background, a pass every ``pause_s`` seconds at most
    ``rate_mb_s``; ``store.verify`` quarantines a corrupt copy and the reporter tells the
    metaserver, so readers stop being sent there and ``dgf fsck --repair`` makes a new copy."""
    def loop() -> None:
        while True:
            time.sleep(pause_s)
            t0, done, checked, corrupt = time.monotonic(), 0, 0, 0
            for key in list(store.keys()):
                try:
                    size = store.stat(key)
                    if not store.verify(key):
                        corrupt += 1
                except errors.NotFound:
                    continue                         # removed meanwhile
                except errors.IntegrityError:
                    corrupt += 1
                    size = 0
                except Exception:  # noqa: BLE001 - one unreadable object must not end the scrubbing
                    log.exception("scrub: could not check object %s", key[:16])
                    continue
                checked += 1
                done += size
                ahead = done / (rate_mb_s * 1e6) - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)
            log.info("scrub: %d objects (%d MB) checked in %.1f s, %d corrupt", checked, done // 10**6,
                     time.monotonic() - t0, corrupt)

    threading.Thread(target=loop, daemon=True, name="dgf-scrub").start()


def _repairer(service: IoService, link: SiteMetaLink, interval_s: float) -> None:
    """Make the copies the metaserver asks this site for (asynchronous replication: files
    published with fewer copies than their directory keeps), fetching site to site and
    reporting each on this site's signed receipt; a full page of work is followed at once by
    the next."""
    def loop() -> None:
        while True:
            try:
                work = link.call("site.work")["copies"]
            except errors.DgfError as exc:
                log.warning("could not ask the metaserver for copies to make (%s)", exc)
                work = []
            made = 0
            for job in work:
                origin = Site.from_wire(job["source"])
                try:
                    results = service.copy_from(origin, job["grant"], [(k, int(n)) for k, n in job["objects"]])
                except errors.DgfError as exc:
                    log.warning("copies from site %s failed (%s); asked again later", origin.name, exc)
                    continue
                for key, receipt, error in results:
                    if receipt is None:
                        log.warning("no copy of %s from site %s (%s)", key[:16], origin.name, error)
                        continue
                    try:
                        link.call("site.replica.add", key=key, receipt=receipt)
                        made += 1
                    except errors.DgfError as exc:
                        log.warning("the copy of %s was not recorded (%s)", key[:16], exc)
            if made:
                log.info("background replication: %d copies made", made)
            if not made:
                time.sleep(interval_s)

    threading.Thread(target=loop, daemon=True, name="dgf-repair").start()


def build(cfg: IoserverConfig, host_key: paramiko.PKey, listen_port: int) -> tuple[ssh.SSHServer, SiteMetaLink]:
    link = SiteMetaLink(cfg)
    keyring = KeyRing(lambda: link.call("site.keys"))
    store = LocalObjectStore(cfg.store)
    store.on_quarantine = _reporter(link)
    service = IoService(cfg.site, store, crypto.load_public(cfg.metaserver_host_key),
                        crypto.load_signing_key(cfg.key), keyring, cfg.limits,
                        peer_key=crypto.load_paramiko_key(cfg.key))
    service.profile = ArchiveProfile(lambda: list(link.call("deid.options")["options"]))
    server = ssh.SSHServer(host_key, service, SUBSYSTEM, keyring.lookup,
                            host=cfg.listen[0], port=listen_port, limits=cfg.limits)
    return server, link


def _register(server: ssh.SSHServer, link: SiteMetaLink, cfg: IoserverConfig, host_key: paramiko.PKey,
              ready_file: str | None, refused: list[errors.DgfError]) -> None:
    """Register with the metaserver, waiting (listening meanwhile, so an admin can read the
    host key on first contact) until an admin has enrolled this site; then start the key
    refresh and the scrubber and write the ready file.  A registration the metaserver refuses
    (another host key pinned) stops the server."""
    host, port = server.address
    waiting_since: float | None = None
    while True:
        try:
            link.call("site.register", site=cfg.site, host=host, port=port,
                      host_key=crypto.public_line(host_key), **({"zone": cfg.zone} if cfg.zone else {}))
            break
        except errors.AuthenticationFailed:
            if waiting_since is None:
                waiting_since = time.monotonic()
                log.warning("site %s is not enrolled at the metaserver yet; waiting for an admin to run "
                            "'dgf admin site add %s HOST:%d --key %s.pub' (host key %s)", cfg.site, cfg.site,
                            port, cfg.key, crypto.fingerprint(host_key))
        except errors.TransportError as exc:
            log.warning("cannot register with the metaserver yet (%s); trying again", exc)
        except errors.DgfError as exc:
            log.error("the metaserver refused this site's registration: %s", exc)
            refused.append(exc)
            server.close()
            return
        time.sleep(REGISTER_RETRY_S)
    keyring: KeyRing = server.service.keyring  # type: ignore[attr-defined]
    keyring.refresh(force=True)
    keyring.start()
    _scrubber(server.service.store, cfg.limits.scrub_mb_s, cfg.limits.scrub_pause_s)  # type: ignore[attr-defined]
    _repairer(server.service, link, cfg.limits.repair_interval_s)  # type: ignore[arg-type]
    log.info("site %s registered; serving %s on %s:%d", cfg.site, cfg.store, host, port)
    if ready_file:
        wire.write_ready(ready_file, server.address)


def init(cfg: IoserverConfig) -> None:
    """Create the site's host key and its own key where missing, and print what an admin needs
    to add the site: its public key file and its host key's fingerprint."""
    for path in (cfg.host_key, cfg.key):
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            crypto.generate_keypair(path, f"dgf-{cfg.site}")
    cfg.store.mkdir(parents=True, exist_ok=True)
    host_key = crypto.load_paramiko_key(cfg.host_key)
    print(f"site {cfg.site}: key {cfg.key}.pub, host key {crypto.fingerprint(host_key)}")
    print(f"an admin adds it with: dgf admin site add {cfg.site} HOST:{cfg.listen[1]} --key {cfg.key.name}.pub")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dgf-ioserver",
        description="Serve one site's object store over SSH (subsystem dgf-io).")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_init = sub.add_parser("init", help="create the site's host key, key and store named by the config")
    p_init.add_argument("--config", required=True, help="ioserver config file (INI, [ioserver])")
    serve = sub.add_parser("serve", help="run the server in the foreground")
    serve.add_argument("--config", required=True, help="ioserver config file (INI, [ioserver])")
    serve.add_argument("--stdio", action="store_true",
                       help="serve one session on stdin/stdout (forced command behind OpenSSH)")
    serve.add_argument("--principal", help="with --stdio: the principal OpenSSH authenticated")
    serve.add_argument("--ready-file", help="write HOST:PORT here once registered and listening")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s dgf-ioserver %(levelname)s %(message)s")
    refused: list[errors.DgfError] = []
    try:
        cfg = IoserverConfig.load(args.config)
        if args.cmd == "init":
            init(cfg)
            return 0
        host_key = crypto.load_paramiko_key(cfg.host_key)
        server, link = build(cfg, host_key, cfg.listen[1])
        if args.stdio:
            server.service.keyring.refresh(force=True)  # type: ignore[attr-defined]
            principals = link.call("site.keys")["principals"]
            match = [p for p in principals if p["name"] == args.principal]
            if not match:
                raise errors.PermissionDenied(f"principal {args.principal!r} is not enrolled.")
            peer = Peer(match[0]["name"], match[0]["role"], match[0]["fingerprint"])
            server.close()
            wire.serve_stream(server.service, server.service.new_session(peer),
                              wire.StdioStream(sys.stdin.buffer, sys.stdout.buffer))
            return 0
        threading.Thread(target=_register, args=(server, link, cfg, host_key, args.ready_file, refused),
                         daemon=True, name="dgf-register").start()
    except errors.DgfError as exc:
        print(f"dgf-ioserver: {exc}", file=sys.stderr)
        return exc.exit_code
    log.info("site %s listening on %s:%d", cfg.site, *server.address)
    server.run()  # the ready file is written only after registration
    if refused:
        print(f"dgf-ioserver: {refused[0]}", file=sys.stderr)
        return refused[0].exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
