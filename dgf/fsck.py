"""``dgf fsck``: is every file's object held, intact, in as many copies as its directory keeps?

The admin's client orchestrates; the bytes never come to it:

1. the metaserver lists the objects under a path, with the copies each should have and every
   copy it records (``admin.fsck.objects``);
2. each site re-hashes its copies where they lie (``fsck.verify``, streamed from its disk) and
   says which are intact, missing or corrupt (a corrupt copy is quarantined, as on a read);
3. for a whole-archive check, each site lists what it stores (``fsck.list``); what the archive
   does not record there is an orphan (an upload that died before its commit, a copy of a
   removed file);
4. with ``repair``: an object with fewer intact copies than it should have is copied **site to
   site** (the target fetches from a sound copy with a capability the metaserver issued to it,
   checks and stores it, and signs a receipt the metaserver checks before recording the copy);
   records of missing or corrupt copies are then dropped; orphans older than ``grace_s`` are
   removed; an object with more intact copies than its directory keeps loses the extra ones
   (placement picks the copies to keep, so zones stay distinct): their records first, then the
   bytes, so no reader is ever sent to a copy about to go.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from dgf import errors, placement
from dgf.transport import KEPT
from dgf.types import Site

#: Objects per site request (a check or a copy); each is bounded by the servers' list_items.
BATCH = 200
#: How long one site request may run: re-hashing a batch of large objects takes a while.
SITE_WAIT_S = 600.0
#: Orphans per adoption request (each carries its XML header).
ADOPT_BATCH = 32
#: Orphans younger than this are left alone: they may be an upload about to commit.
GRACE_S = 3600.0


@dataclass
class Entry:
    key: str
    size: int
    want: int                               # copies its directory keeps
    path: str                               # one of its paths, for messages
    recorded: dict[str, str]                # site -> state the metaserver records
    sealed: bool = False                    # sealed (dgf/envelope.py): untrusted sites may take a copy
    found: dict[str, str] = field(default_factory=dict)   # site -> ok | missing | corrupt | unchecked
    gens: dict[str, int] = field(default_factory=dict)    # site -> generation recorded (if any)

    @property
    def intact(self) -> list[str]:
        return sorted(s for s, state in self.found.items() if state == "ok")


@dataclass
class FsckReport:
    objects: int = 0
    copies_checked: int = 0
    missing: list[tuple[str, str]] = field(default_factory=list)        # (path, site)
    corrupt: list[tuple[str, str]] = field(default_factory=list)
    under: list[tuple[str, int, int]] = field(default_factory=list)     # (path, intact, wanted)
    over: list[tuple[str, int, int]] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)                       # no intact copy anywhere
    orphans: list[tuple[str, str, int, float]] = field(default_factory=list)  # (site, key, size, age s)
    #: (site, key) -> the orphan's generation when listed: its removal keeps it if stored since.
    orphan_gens: dict[tuple[str, str], int] = field(default_factory=dict)
    unreachable: dict[str, str] = field(default_factory=dict)          # site -> why
    copied: list[tuple[str, str]] = field(default_factory=list)         # (path, to site)
    dropped: list[tuple[str, str]] = field(default_factory=list)        # (path, site) records forgotten
    removed: list[tuple[str, str]] = field(default_factory=list)        # (site, key) orphans removed
    trimmed: list[tuple[str, str]] = field(default_factory=list)        # (path, site) extra copies removed
    adopted: list[tuple[str, str]] = field(default_factory=list)        # (path, site) orphans made files again
    readopted: list[tuple[str, str]] = field(default_factory=list)      # (site, key) copies recorded again
    failures: list[str] = field(default_factory=list)                   # repair steps that failed
    #: Copies a removal left because an upload stored them again since fsck looked: benign (the
    #: upload's commit names them, or the next fsck finds an orphan), so not failures.
    kept: list[str] = field(default_factory=list)
    bytes_copied: int = 0
    seconds: float = 0.0
    repair: bool = False

    @property
    def whole(self) -> bool:
        """Every object has its copies, all intact, and every site answered."""
        if self.repair:
            fixed = {p for p, _ in self.copied}
            return not self.lost and not self.failures and not self.unreachable and \
                all(p in fixed or have >= want for p, have, want in self.under)
        return not (self.missing or self.corrupt or self.under or self.lost or self.unreachable)


def fsck(client: Any, root: str = "/", repair: bool = False, grace_s: float = GRACE_S,
         progress: Callable[[str], None] | None = None, adopt: bool = False) -> FsckReport:
    """Check (and with ``repair`` mend) the objects of the files under ``root``; with ``adopt``
    (after a metadata restore), orphans older than ``grace_s`` are taken back into the archive
    instead of being removed."""
    t0 = time.perf_counter()
    say = progress or (lambda line: None)
    report = FsckReport(repair=repair)
    entries, sites = _objects(client, root)
    report.objects = len(entries)
    caps = client.meta.call("admin.fsck.caps", sites=sorted(sites))[0]["caps"]
    say(f"checking {sum(len(e.recorded) for e in entries.values())} copies of {len(entries)} objects "
        f"on {len(sites)} site(s)")
    lock = threading.Lock()

    def check(site: str) -> None:
        keys = [k for k, e in entries.items() if site in e.recorded]
        try:
            for i in range(0, len(keys), BATCH):
                states = client.site_link(site).call("fsck.verify", caps[site], wait_s=SITE_WAIT_S,
                                                     keys=keys[i:i + BATCH])[0]["states"]
                with lock:
                    for key, state in states.items():
                        entries[key].found[site] = state
                        report.copies_checked += 1
        except errors.DgfError as exc:
            with lock:
                report.unreachable[site] = exc.message
                for key in keys:
                    entries[key].found.setdefault(site, "unchecked")
        if root == "/" and site not in report.unreachable:
            _orphans(client, site, caps[site], report, lock)

    with ThreadPoolExecutor(max(1, len(sites)), thread_name_prefix="dgf-fsck") as pool:
        list(pool.map(check, sorted(sites)))
    for e in entries.values():
        for site, state in e.found.items():
            if state == "missing":
                report.missing.append((e.path, site))
            elif state == "corrupt":
                report.corrupt.append((e.path, site))
        have = len(e.intact)
        if have == 0:
            report.lost.append(e.path)
        elif have < e.want:
            report.under.append((e.path, have, e.want))
        elif have > e.want:
            report.over.append((e.path, have, e.want))
    if adopt:
        _adopt(client, caps, report, grace_s, say)
    if repair:
        _repair(client, entries, sites, caps, report, say)
        _trim(client, entries, sites, report, say)
        _remove_orphans(client, report, grace_s, say)
    report.seconds = time.perf_counter() - t0
    return report


def _objects(client: Any, root: str) -> tuple[dict[str, Entry], dict[str, Site]]:
    entries: dict[str, Entry] = {}
    sites: dict[str, Site] = {}
    offset: int | None = 0
    while offset is not None:
        page = client.meta.call("admin.fsck.objects", root=root, offset=offset)[0]
        for s in page["sites"]:
            site = Site.from_wire(s)
            sites[site.name] = site
        gens = page.get("gens") or {}             # none from an older metaserver
        for key, size, want, rows, path, sealed in page["objects"]:
            e = entries.get(key)
            if e is None:
                entries[key] = Entry(key, size, want, path, {s: state for s, state in rows}, sealed=sealed,
                                     gens=dict(gens.get(key) or {}))
            else:
                e.want = max(e.want, want)
        offset = page["next"]
    client._learn_sites(sites.values())
    return entries, sites


def _orphans(client: Any, site: str, cap: str, report: FsckReport, lock: threading.Lock) -> None:
    """What ``site`` stores that the archive does not record there."""
    after = ""
    now = time.time()
    while True:
        reply = client.site_link(site).call("fsck.list", cap, wait_s=SITE_WAIT_S, after=after, limit=2000)[0]
        listed = reply["objects"]
        if not listed:
            return
        gens = dict(zip((k for k, _, _ in listed), reply.get("gens") or ()))   # none from an older site
        for i in range(0, len(listed), BATCH):
            part = listed[i:i + BATCH]
            recorded = set(client.meta.call("admin.fsck.recorded", site=site,
                                             keys=[k for k, _, _ in part])[0]["recorded"])
            with lock:
                report.orphans.extend((site, k, size, now - mtime) for k, size, mtime in part if k not in recorded)
                report.orphan_gens.update(((site, k), gens[k]) for k, _, _ in part
                                          if k not in recorded and type(gens.get(k)) is int)
        after = listed[-1][0]
        if not reply["more"]:
            return


def _repair(client: Any, entries: dict[str, Entry], sites: dict[str, Site], caps: dict[str, str],
            report: FsckReport, say: Callable[[str], None]) -> None:
    """Copy under-replicated objects site to site, then forget the copies that are gone."""
    up = [s for s in sorted(sites) if s not in report.unreachable]
    zones = {name: site.zone for name, site in sites.items()}
    jobs: dict[tuple[str, str], list[Entry]] = {}          # (source, target) -> objects
    for e in entries.values():
        intact = e.intact
        need = e.want - len(intact)
        if not intact or need <= 0:
            continue
        # An unsealed object is never copied to an untrusted site.
        takers = [s for s in up if s not in intact and (e.sealed or not sites[s].untrusted)]
        candidates = placement.choose(e.key, takers, len(up), zones=zones, avoid=intact)
        if len(candidates) < need:
            report.failures.append(f"{e.path}: {need} more cop{'y' if need == 1 else 'ies'} wanted, "
                                   f"{len(candidates)} site(s) can take one")
        for target in candidates[:need]:
            jobs.setdefault((intact[0], target), []).append(e)
    if jobs:
        say(f"copying {sum(len(v) for v in jobs.values())} object(s) site to site")
    lock = threading.Lock()

    def copy(source: str, target: str, batch: list[Entry]) -> None:
        for i in range(0, len(batch), BATCH):
            part = batch[i:i + BATCH]
            try:
                grant = client.meta.call("admin.fsck.copy", source=source, target=target,
                                         keys=[e.key for e in part])[0]
            except errors.DgfError as exc:
                with lock:
                    report.failures.extend(f"{e.path}: no copy from {source} to {target} ({exc.message})" for e in part)
                continue
            for e in part:
                try:
                    _replicate(client, caps[target], grant, target, e.key, e.size)
                except errors.DgfError as exc:
                    with lock:
                        report.failures.append(f"{e.path}: copy from site {source} to site {target} failed "
                                               f"({exc.message})")
                    continue
                with lock:
                    report.copied.append((e.path, target))
                    report.bytes_copied += e.size
                    e.found[target] = "ok"

    by_target: dict[str, list[tuple[str, list[Entry]]]] = {}
    for (source, target), batch in jobs.items():
        by_target.setdefault(target, []).append((source, batch))
    def to(target: str) -> None:
        for source, batch in by_target[target]:
            copy(source, target, batch)

    with ThreadPoolExecutor(max(1, len(by_target)), thread_name_prefix="dgf-repair") as pool:
        list(pool.map(to, by_target))
    # Records of copies that are gone, now that other copies stand in for them.
    for e in entries.values():
        for site, state in list(e.found.items()):
            if state in ("missing", "corrupt") and site in e.recorded:
                try:
                    client.meta.call("admin.replica.drop", key=e.key, site=site)
                    report.dropped.append((e.path, site))
                except errors.DgfError as exc:
                    report.failures.append(f"{e.path}: the record of its copy at {site} stays ({exc.message})")


def _replicate(client: Any, cap: str, grant: dict[str, Any], target: str, key: str, size: int) -> None:
    """Have ``target`` fetch one object from the source ``grant`` names (site to site) and record
    the copy on the target's signed receipt."""
    receipt = client.site_link(target).call("replicate", cap, wait_s=SITE_WAIT_S, key=key, size=size,
                                            source=grant["source"], grant=grant["cap"])[0]["receipt"]
    client.meta.call("admin.replica.add", key=key, site=target, receipt=receipt)


def _adopt(client: Any, caps: dict[str, str], report: FsckReport, grace_s: float,
           say: Callable[[str], None]) -> None:
    """Take orphans older than ``grace_s`` back: each site builds the header of its copy and
    signs a receipt; the metaserver records the copy, or makes the object a file again under
    /lost+found (its identity, which only the metaserver held, is not recoverable)."""
    by_site: dict[str, list[str]] = {}
    for site, key, _, age in report.orphans:
        if age >= grace_s:
            by_site.setdefault(site, []).append(key)
    if by_site:
        say(f"adopting {sum(len(v) for v in by_site.values())} orphan(s)")
    adopted: set[str] = set()
    for site, keys in sorted(by_site.items()):
        for i in range(0, len(keys), ADOPT_BATCH):
            part = keys[i:i + ADOPT_BATCH]
            try:
                found = client.site_link(site).call("fsck.adopt", caps[site], wait_s=SITE_WAIT_S, keys=part)[0]["objects"]
                ready = {k: v for k, v in found.items() if "error" not in v}
                report.failures.extend(f"orphan {k[:16]}... at site {site} stays ({v['error']})"
                                       for k, v in found.items() if "error" in v)
                if not ready:
                    continue
                reply = client.meta.call("admin.fsck.adopt", site=site, objects=ready)[0]
            except errors.DgfError as exc:
                report.failures.append(f"orphans at site {site} were not adopted ({exc.message})")
                continue
            report.adopted.extend((path, site) for path in reply["adopted"])
            report.readopted.extend((site, k) for k in reply["recorded"])
            report.failures.extend(f"orphan {k[:16]}... at site {site} stays ({why})" for k, why in reply["failed"].items())
            adopted.update(k for k in ready if k not in reply["failed"])
    report.orphans = [o for o in report.orphans if o[1] not in adopted]


def _trim(client: Any, entries: dict[str, Entry], sites: dict[str, Site], report: FsckReport,
          say: Callable[[str], None]) -> None:
    """Remove the intact copies an object has beyond its directory's count (a lowered count,
    a copy made twice): the record goes first (readers stop being sent there), then the bytes."""
    zones = {name: site.zone for name, site in sites.items()}
    extra: dict[str, list[Entry]] = {}
    for e in entries.values():
        intact = e.intact
        if e.want < 1 or len(intact) <= e.want:
            continue
        keep = placement.choose(e.key, intact, e.want, zones=zones)
        for site in intact:
            if site not in keep:
                extra.setdefault(site, []).append(e)
    if extra:
        say(f"removing {sum(len(v) for v in extra.values())} extra cop(ies)")
    for site, batch in sorted(extra.items()):
        dropped: list[Entry] = []
        for e in batch:
            try:
                client.meta.call("admin.replica.drop", key=e.key, site=site)
                dropped.append(e)
            except errors.DgfError as exc:
                report.failures.append(f"{e.path}: its extra copy at {site} stays ({exc.message})")
        for i in range(0, len(dropped), BATCH):
            part = dropped[i:i + BATCH]
            try:
                cap = client.meta.call("admin.fsck.delete", site=site, keys=[e.key for e in part],
                                       gens=[e.gens.get(site) for e in part])[0]["cap"]
                left = client.site_link(site).delete_many([e.key for e in part], cap)
                for e in part:
                    if e.key not in left:
                        report.trimmed.append((e.path, site))
                        e.found[site] = "removed"
                    elif left[e.key] == KEPT:
                        report.kept.append(f"{e.path}: its extra copy at {site} was stored again since it "
                                           "was checked; it stays, for the next fsck")
                    else:
                        report.failures.append(f"{e.path}: its extra copy at {site} is left as an orphan "
                                               f"({left[e.key]})")
            except errors.DgfError as exc:
                # The record is gone: what stays on the site is an orphan the next fsck removes.
                report.failures.append(f"extra copies at site {site} are left as orphans ({exc.message})")


def _remove_orphans(client: Any, report: FsckReport, grace_s: float, say: Callable[[str], None]) -> None:
    old: dict[str, list[str]] = {}
    for site, key, _, age in report.orphans:
        if age >= grace_s:
            old.setdefault(site, []).append(key)
    for site, keys in old.items():
        say(f"removing {len(keys)} orphan(s) at site {site}")
        for i in range(0, len(keys), BATCH):
            part = keys[i:i + BATCH]
            try:
                # Looked up again: the repair (or an upload meanwhile) may have adopted some.
                recorded = set(client.meta.call("admin.fsck.recorded", site=site, keys=part)[0]["recorded"])
                part = [k for k in part if k not in recorded]
                if not part:
                    continue
                # Each names the generation listed: one an upload stored again since (to commit
                # it, after the check above) is kept.
                cap = client.meta.call("admin.fsck.delete", site=site, keys=part,
                                       gens=[report.orphan_gens.get((site, k)) for k in part])[0]["cap"]
                left = client.site_link(site).delete_many(part, cap)
                for key in part:
                    if key not in left:
                        report.removed.append((site, key))
                    elif left[key] == KEPT:
                        report.kept.append(f"orphan {key[:16]}... at site {site} was stored again since it "
                                           "was listed (an upload about to commit); it stays")
                    else:
                        report.failures.append(f"orphan {key[:16]}... at site {site} stays ({left[key]})")
            except errors.DgfError as exc:
                report.failures.append(f"orphans at site {site} stay ({exc.message})")


@dataclass
class DrainReport:
    site: str
    moved: list[str] = field(default_factory=list)          # keys copied elsewhere, then removed here
    released: list[str] = field(default_factory=list)       # keys with enough copies elsewhere: removed here
    stuck: list[str] = field(default_factory=list)          # why objects stay (one line each)
    bytes_moved: int = 0
    seconds: float = 0.0


def drain(client: Any, site: str, progress: Callable[[str], None] | None = None) -> DrainReport:
    """Move every object off ``site`` while reads go on: the site is marked draining (no new
    copies go there), each object it holds gets a copy on another site (site to site, as a
    repair) before the site's copy is forgotten and removed, so no object ever has fewer sound
    copies than before.  An object no other site can take stays, and is named."""
    t0 = time.perf_counter()
    say = progress or (lambda line: None)
    report = DrainReport(site)
    client.meta.call("admin.site.drain", site=site, on=True)
    caps: dict[str, str] = {}
    after = ""
    while True:
        page = client.meta.call("admin.site.objects", site=site, after=after)[0]
        if not page["objects"]:
            break
        sites = {Site.from_wire(s).name: Site.from_wire(s) for s in page["sites"]}
        client._learn_sites(sites.values())
        takers = [s for s in sorted(sites) if s not in page["draining"]]
        missing_caps = [s for s in sites if s not in caps]
        if missing_caps:
            caps.update(client.meta.call("admin.fsck.caps", sites=missing_caps)[0]["caps"])
        say(f"site {site}: moving {len(page['objects'])} object(s)")
        for key, size, copies, sealed in page["objects"]:
            sound = [s for s, state in copies if state == "ok"]
            elsewhere = [s for s in sound if s != site]
            holders = {s for s, _ in copies}
            others = [s for s in sound if s != site]
            target = next(iter(placement.choose(key, [s for s in takers if s not in holders and (
                                                    sealed or not sites[s].untrusted)], 1,
                                                zones={n: st.zone for n, st in sites.items()}, avoid=others)), None)
            source = site if site in sound else (elsewhere[0] if elsewhere else None)
            try:
                if source is None:
                    report.stuck.append(f"{key[:16]}...: no sound copy anywhere to move from")
                    continue
                if target is not None:
                    grant = client.meta.call("admin.fsck.copy", source=source, target=target, keys=[key])[0]
                    _replicate(client, caps[target], grant, target, key, size)
                    report.moved.append(key)
                    report.bytes_moved += size
                elif site in sound:
                    # Every site that takes copies holds one already: moving would lower the count.
                    report.stuck.append(f"{key[:16]}...: every other site already holds a copy")
                    continue
                else:
                    report.released.append(key)      # the copy here is not sound: nothing is lost
                client.meta.call("admin.replica.drop", key=key, site=site)
                cap = client.meta.call("admin.fsck.delete", site=site, keys=[key])[0]["cap"]
                client.site_link(site).call("delete", cap, key=key)
            except errors.DgfError as exc:
                report.stuck.append(f"{key[:16]}...: {exc.message}")
        after = page["objects"][-1][0]
    report.seconds = time.perf_counter() - t0
    return report
