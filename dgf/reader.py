"""The one object reader: every byte a client returns comes through here.

The mount, ``Client.read_file``, ``dgf_down`` (bulk) and ``identity`` summaries all read objects
the same way:

- the replicas are tried in the order the metaserver gave (spread by a hash of object and
  site), and a site that fails in transport has its link dropped and is passed over for a while;
- every byte is verified before it is returned: a whole object against its SHA-256 key, a range
  of a large object block by block against its hash list (``dgf.integrity``);
- a copy that fails its check is reported to its site, which re-hashes it, quarantines it if it
  is bad and tells the metaserver (so nobody is sent there again), and the read goes on at the
  next replica;
- a copy missing where the archive said it was (a drain or a repair moved it) makes the reader
  resolve the file once more and try the copies not tried yet; capabilities older than
  :data:`CAP_REFRESH_S` are refreshed the same way.

Reconstruction reads its projections on the sites themselves; when a site fails there, the
client redoes its share on another replica (``Client.recon``), with the same replica lists.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dgf import errors
from dgf.envelope import Envelope, open_file
from dgf.integrity import BLOCK as DIGEST_BLOCK
from dgf.integrity import check_range
from dgf.transport import GetResult, run_parallel
from dgf.types import ResolvedFile

if TYPE_CHECKING:
    from dgf.client import Client

log = logging.getLogger("dgf.reader")

#: Capabilities live 10 minutes; a reader older than this resolves again before reading.
CAP_REFRESH_S = 300.0


@dataclass
class ObjectRef:
    """One resolved file: its object, size, replicas in read order, the capabilities to read
    them and the object's hash list (empty for objects of one block)."""

    path: str
    key: str
    size: int
    sites: list[str]
    caps: dict[str, str]
    digests: bytes = b""
    resolved: float = field(default_factory=time.monotonic)
    #: A sealed object (on untrusted sites): how to unseal it; ``size`` is its plaintext's.
    env: Envelope | None = None

    @property
    def stored(self) -> int:
        """The size of the object as sites store it."""
        return self.env.sealed_size if self.env is not None else self.size

    @classmethod
    def all_of(cls, resolved: dict[str, Any]) -> list[ObjectRef]:
        """The files of a ``Client.resolve`` reply."""
        blocks = resolved.get("blocks") or {}
        seals = resolved.get("seals") or {}
        keys = {study: base64.b64decode(k) for study, k in (resolved.get("study_keys") or {}).items()}
        now = time.monotonic()
        out = []
        for path, key, size, sites in ResolvedFile.all_of(resolved):
            env = None
            if key in seals:
                salt, study = seals[key]
                if study not in keys:
                    raise errors.PermissionDenied(f"{path} is sealed under a study key the archive no longer "
                                                  "holds (its patient was erased).")
                env = Envelope(keys[study], bytes.fromhex(salt), size)
            out.append(cls(path, key, size, list(sites), resolved["caps"],
                           base64.b64decode(blocks[key]) if key in blocks else b"", now, env))
        return out

    def copy(self) -> ObjectRef:
        return ObjectRef(self.path, self.key, self.size, list(self.sites), self.caps, self.digests, self.resolved,
                         self.env)


class ObjectReader:
    """Verified reads of objects from their replicas, for one client (see the module doc)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self._verifier = ThreadPoolExecutor(1, thread_name_prefix="dgf-verify")

    def close(self) -> None:
        self._verifier.shutdown(wait=False)

    # -- one object, or a range of it -----------------------------------------------------

    def read(self, ref: ObjectRef, offset: int = 0, length: int = -1) -> bytes:
        """``length`` bytes of ``ref``'s object from ``offset`` (all of it by default), verified.

        A range of a large object must start on a hash-list block and end on one or at the end
        of the object (the mount reads 4 MiB blocks).  An object stored before objects had hash
        lists can only be checked whole: it is read whole and the range cut from it."""
        if time.monotonic() - ref.resolved > CAP_REFRESH_S:
            self._refresh(ref)
        length = ref.size - offset if length < 0 else min(length, ref.size - offset)
        if length <= 0 and (offset, ref.size) != (0, 0):
            return b""                   # at or past the end
        if ref.env is not None:
            # Sealed: fetch and check the whole hash-list blocks that hold the range, then
            # authenticate and decrypt just its chunks.
            _, a, b = ref.env.cipher_range(offset, length)
            return ref.env.open_range(self._verified(ref, a, b - a), a, offset, length)
        return self._verified(ref, offset, length)

    def _verified(self, ref: ObjectRef, offset: int, length: int) -> bytes:
        """Stored bytes ``[offset, offset+length)`` of ``ref``'s object, from the first replica
        whose copy passes the check."""
        size = ref.stored
        whole = size > DIGEST_BLOCK and not ref.digests and (offset, length) != (0, size)
        start, n = (0, size) if whole else (offset, length)
        # The file exists (it was resolved): no copy to read is an I/O error, not "no such file".
        last: errors.DgfError = errors.IntegrityError(f"no sound copy of {ref.path} is left to read (all "
                                                      "quarantined or missing); 'dgf fsck' says more.")
        tried: set[str] = set()
        missing = False
        # The generator asks "was a copy missing?" after the loop body set it: late binding wanted.
        for site in self._replicas(ref, tried, lambda: missing):  # noqa: B023
            tried.add(site)
            try:
                data = self._get(ref, site, start, n)
            except errors.DgfError as exc:
                log.warning("reading %s from site %s failed (%s); trying the next replica", ref.path, site, exc)
                if isinstance(exc, errors.TransportError):
                    self.client._drop_link(site, exc)
                # The file exists: a copy missing at a site (quarantined, lost) is an I/O
                # error, not "no such file" for a path the directory shows.
                missing = missing or isinstance(exc, errors.NotFound)
                last = errors.IntegrityError(f"the copy of {ref.path} at site {site} is missing or "
                                             "quarantined.") if isinstance(exc, errors.NotFound) else exc
                continue
            try:
                check_range(ref.key, ref.stored, ref.digests, start, data, f"site {site}")
            except errors.IntegrityError as exc:
                log.error("%s: %s; asking the site to verify and quarantine it", ref.path, exc)
                self.report_corrupt(site, ref)
                last = exc
                continue
            return data[offset:offset + length] if whole else data
        raise last

    def _get(self, ref: ObjectRef, site: str, start: int, n: int) -> bytes:
        """The bytes from one site; a capability the site no longer honours (expired, or issued
        under cohort grants that changed) is renewed once and the request made again."""
        for attempt in (1, 2):
            try:
                if (start, n) == (0, ref.stored):
                    return self.client.site_link(site).call("get", ref.caps[site], key=ref.key)[1]
                return self.client.site_link(site).read_range(ref.key, start, n, ref.caps[site])
            except errors.PermissionDenied:
                if attempt == 2 or not self._refresh(ref) or site not in ref.caps:
                    raise
        raise AssertionError("unreachable")

    def _replicas(self, ref: ObjectRef, tried: set[str], missing: Callable[[], bool]) -> Iterator[str]:
        """The sites to read ``ref`` from, in turn; when a copy was missing where the archive said
        it was, the file is resolved once more and the copies not tried yet follow."""
        yield from list(ref.sites)
        if not missing():
            return
        if self._refresh(ref):
            yield from [s for s in ref.sites if s not in tried]

    def _refresh(self, ref: ObjectRef) -> bool:
        """Resolve ``ref`` again (replicas and capabilities); False if the path now names
        another object (replaced meanwhile) or nothing."""
        try:
            fresh = ObjectRef.all_of(self.client.resolve([ref.path]))
        except errors.NotFound:
            return False                 # removed meanwhile: the read fails as it stands
        if not fresh or fresh[0].key != ref.key:
            return False
        ref.caps, ref.sites, ref.resolved, ref.env = fresh[0].caps, fresh[0].sites, fresh[0].resolved, fresh[0].env
        return True

    def report_corrupt(self, site: str, ref: ObjectRef) -> None:
        """Ask ``site`` to re-hash its copy, in the background: it quarantines a bad copy and
        tells the metaserver, which stops offering that replica to anyone."""
        caps = dict(ref.caps)

        def verify() -> None:
            try:
                ok = self.client.site_link(site).call("verify", caps[site], key=ref.key)[0].get("ok")
                log.warning("site %s verified %s: %s", site, ref.key[:16], "sound" if ok else "corrupt, quarantined")
            except errors.DgfError as exc:
                log.warning("site %s could not verify %s (%s)", site, ref.key[:16], exc)

        try:
            self._verifier.submit(verify)
        except RuntimeError:          # shut down: the client is closing
            pass

    # -- many objects at once (dgf_down) --------------------------------------------------

    def read_many(self, refs: Sequence[ObjectRef], deliver: Callable[[GetResult], None],
                  spool: Path | None = None, stop: threading.Event | None = None) -> dict[str, str]:
        """Fetch every object of ``refs`` once, replicas in turn: each site's share is pipelined
        in batches (large objects stream to ``spool``), verified as it arrives, and handed to
        ``deliver`` (from transfer threads).  A copy that fails its check is reported to its
        site.  Objects left undelivered after every replica (and one fresh resolve) are returned
        with the reason, by key.  Once ``stop`` is set no further request is sent, and
        :class:`dgf.transport.Stopped` is raised."""
        by_key: dict[str, ObjectRef] = {}
        for r in refs:
            by_key.setdefault(r.key, r)
        replicas = {k: list(r.sites) for k, r in by_key.items()}
        caps: dict[str, str] = {}
        for r in by_key.values():
            caps.update(r.caps)
        pending = set(by_key)
        why: dict[str, str] = {}
        denied: set[str] = set()                     # refused by capability: worth a fresh one
        lock = threading.Lock()

        def arrived(res: GetResult) -> None:
            env = by_key[res.key].env
            if res.error is None and env is not None:
                res = _unsealed(res, env)
            if res.error is not None:
                with lock:
                    why[res.key] = res.error.message
                    if isinstance(res.error, errors.PermissionDenied):
                        denied.add(res.key)
                return                               # tried again at the next replica
            with lock:
                pending.discard(res.key)
            deliver(res)

        def task(site: str, keys: list[str]) -> Callable[[], None]:
            def on_result(res: GetResult) -> None:
                if isinstance(res.error, errors.IntegrityError):
                    self.report_corrupt(site, by_key[res.key])
                arrived(res)

            def run() -> None:
                try:
                    self.client.site_link(site).get_many([(k, by_key[k].stored) for k in keys], caps[site],
                                                         on_result, spool, stop)
                except errors.DgfError as exc:
                    self.client._drop_link(site, exc)
                    log.warning("site %s failed during download: %s", site, exc)
                    with lock:
                        for k in keys:
                            why[k] = exc.message     # names the site and what went wrong
                            if isinstance(exc, errors.PermissionDenied):
                                denied.add(k)
            return run

        def each_replica() -> None:
            for attempt in range(max((len(r) for r in replicas.values()), default=0)):
                by_site: dict[str, list[str]] = {}
                with lock:
                    todo = sorted(pending)
                for key in todo:
                    if len(replicas[key]) > attempt:
                        by_site.setdefault(replicas[key][attempt], []).append(key)
                if not by_site:
                    break
                run_parallel(task(s, k) for s, k in by_site.items())

        each_replica()
        if pending:
            # Copies may have moved meanwhile (a drain, a repair), capabilities may have been
            # refused: ask once where they are now, and try the copies not tried yet (and, with
            # fresh capabilities, those that refused the old ones).
            fresh = {r.key: r for r in ObjectRef.all_of(self.client.resolve(sorted(by_key[k].path for k in pending)))}
            for key in list(pending):
                now = fresh.get(key)
                replicas[key] = [s for s in now.sites if s not in replicas[key] or key in denied] \
                    if now is not None else []
                if now is not None:
                    caps.update(now.caps)
            if any(replicas[k] for k in pending):
                each_replica()
        return {k: why.get(k, "no replica could be read (sites down or objects corrupt)") for k in sorted(pending)}


def _unsealed(res: GetResult, env: Envelope) -> GetResult:
    """A verified sealed object, unsealed (in memory, or spool file to spool file)."""
    try:
        if res.path is None:
            return GetResult(res.key, env.open(res.data or b""))
        plain = res.path.with_name(res.path.name + ".plain")
        try:
            open_file(env, str(res.path), str(plain))
        except BaseException:
            plain.unlink(missing_ok=True)
            raise
        finally:
            res.path.unlink(missing_ok=True)
        return GetResult(res.key, path=plain)
    except errors.IntegrityError as exc:
        return GetResult(res.key, error=exc)
