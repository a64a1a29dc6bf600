"""Replicas: how many copies, where, and what the metaserver accepts (issue 14)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dgf import errors, local, placement
from dgf.client import Client
from ioserver.store import object_path
from tests import corpus
from tests.pg import PostgresServer


def test_placement_rules() -> None:
    overrides = {"/a": 3, "/a/b/c": 1}
    assert placement.factor("/x.dcm", 2, overrides) == 2
    assert placement.factor("/a/x.dcm", 2, overrides) == 3
    assert placement.factor("/a/b/x.dcm", 2, overrides) == 3           # inherited from /a
    assert placement.factor("/a/b/c/d/x.dcm", 2, overrides) == 1
    assert placement.default_factor(1) == 1 and placement.default_factor(3) == 2
    sites = ["s3", "s1", "s2"]
    for basis in ("1.2.3", "4.5.6", "7.8.9"):
        two = placement.choose(basis, sites, 2)
        assert len(set(two)) == 2 and set(two) <= set(sites)
        assert placement.choose(basis, sites, 2) == two                 # deterministic
    assert placement.choose("x", sites, 2, first="s3") == ["s3", "s1"]   # the named site first
    assert len(placement.choose("x", sites, 5)) == 3                   # never twice on one site


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> Iterator[local.Federation]:
    fed = local.up(tmp_path_factory.mktemp("three") / "fed", sites=("site-a", "site-b", "site-c"))
    yield fed
    local.down(fed.root, quiet=True)




def _stored(fed: local.Federation, key: str) -> list[str]:
    return [site for site in fed.sites
            if object_path(fed.root / f"store-{site}", key).is_file()]


def test_copies_per_directory_on_distinct_sites(three: local.Federation, tmp_path: Path) -> None:
    with Client(three.config("admin")) as admin:
        for d in ("/one", "/all"):
            admin.mkdir(d)
        assert admin.meta.call("replicas.get", path="/")[0]["copies"] == 2     # the default
        admin.meta.call("admin.replicas.set", path="/one", copies=1)
        admin.meta.call("admin.replicas.set", path="/all", copies=3)
        with pytest.raises(errors.UsageError, match="between 1 and the number of sites"):
            admin.meta.call("admin.replicas.set", path="/all", copies=4)
        admin.mkdir("/all/deeper")
        inherited = admin.meta.call("replicas.get", path="/all/deeper")[0]
        assert inherited["copies"] == 3 and inherited["set_at"] == "/all"
        assert any(e["action"] == "replicas.set" and e["target"] == "/all" for e in admin.audit_log(20))
    with Client(three.config("clinician")) as c:
        for where, n in (("/default", 2), ("/one", 1), ("/all/deeper", 3)):
            (tmp_path / where.replace("/", "_")).mkdir()
            files = corpus.fresh_instances(tmp_path / where.replace("/", "_"), 6)
            report = c.upload(files, to=where)
            assert report.uploaded == len(files) and not report.failed
            for st in c.ls(where):
                sites = [s for s, state in c.stat(st.path).replicas if state == "ok"]
                assert len(sites) == n and sorted(sites) == sorted(_stored(three, st.object_key or ""))
        # Over the series, copies land on every site.
        used = {s for st in c.ls("/default") for s, _ in c.stat(st.path).replicas}
        assert len(used) >= 2
    with Client(three.config("researcher")) as r:
        with pytest.raises(errors.PermissionDenied):
            r.meta.call("admin.replicas.set", path="/one", copies=2)


def test_the_metaserver_publishes_only_fully_replicated_uploads(three: local.Federation, tmp_path: Path) -> None:
    """A writer that stores one copy and commits it is refused: the directory keeps two."""
    with Client(three.config("clinician")) as c:
        sent: list[bytes] = []
        original = c.meta.call

        def strip_copies(verb: str, payload: bytes = b"", wait_s: float | None = None, **args: object):  # type: ignore[no-untyped-def]
            if verb == "up.commit":
                # The batch's JSON, then its files' XML headers (xml_sizes) as bytes: sent back
                # as the JSON strings the metaserver also reads.
                at = len(payload) - sum(args["xml_sizes"])  # type: ignore[arg-type]
                batch = json.loads(payload[:at])
                for f, n in zip(batch["files"], args.pop("xml_sizes")):  # type: ignore[call-overload]
                    f["copies"], f["xml"] = [], payload[at:at + n].decode()
                    at += n
                payload = json.dumps(batch).encode()
                sent.append(payload)
            return original(verb, payload, wait_s, **args)

        c.meta.call = strip_copies  # type: ignore[method-assign]
        with pytest.raises(errors.UsageError, match="has 1 durable copy; its directory keeps 2"):
            c.upload(corpus.fresh_instances(tmp_path, 1), to="/forged")
        assert sent
        c.meta.call = original  # type: ignore[method-assign]
        with pytest.raises(errors.NotFound):
            c.stat("/forged")
        # A copy claimed twice at one site is one copy.
        batch = json.loads(sent[0])
        f = batch["files"][0]
        f["copies"] = [{"site": f["site"], "receipt": f["receipt"]}]
        with pytest.raises(errors.UsageError, match="has 1 durable copy"):
            c.meta.call("up.commit", json.dumps(batch).encode())
        # A receipt of one site presented as another's is refused.
        other = next(s for s in three.sites if s != f["site"])
        f["copies"] = [{"site": other, "receipt": f["receipt"]}]
        with pytest.raises(errors.PermissionDenied):
            c.meta.call("up.commit", json.dumps(batch).encode())
        assert base64.b64decode(f["blocks"]) == b"" or f["size"] > 0


def test_fsck_repair_removes_copies_beyond_the_directorys_count(three: local.Federation, tmp_path: Path) -> None:
    """A directory that kept three copies now keeps two: fsck reports the extra copies and
    --repair removes them (record first, then bytes), keeping copies on distinct sites."""
    with Client(three.config("admin")) as admin:
        admin.mkdir("/trim")
    assert _dgf(three, "admin", "replicas", "set", "/trim", "3").returncode == 0
    with Client(three.config("clinician")) as c:
        c.upload(corpus.fresh_instances(tmp_path / "src", 3), to="/trim")
        keys = [c.stat(st.path).object_key for st in c.ls("/trim")]
    assert all(len(_stored(three, k)) == 3 for k in keys if k)
    assert _dgf(three, "admin", "replicas", "set", "/trim", "2").returncode == 0
    check = _dgf(three, "fsck", "/trim")
    assert "3 over-replicated (--repair removes the extra copies)" in check.stdout, check.stdout
    fixed = _dgf(three, "fsck", "/trim", "--repair")
    assert fixed.returncode == 0 and "3 extra copies removed" in fixed.stdout, fixed.stdout + fixed.stderr
    with Client(three.config("clinician")) as c:
        for st in c.ls("/trim"):
            held = sorted(s for s, state in c.stat(st.path).replicas if state == "ok")
            assert len(held) == 2 and held == sorted(_stored(three, st.object_key or c.stat(st.path).object_key or ""))
        out = c.download(["/trim"], tmp_path / "out")
        assert out.downloaded == 3 and not out.failed
    again = _dgf(three, "fsck", "/trim")
    assert again.returncode == 0 and "over-replicated" not in again.stdout


def test_the_object_reader_reports_a_bad_copy_it_meets_in_a_bulk_download(three: local.Federation,
                                                                          tmp_path: Path) -> None:
    """dgf_down, read_file and the mount read through one object reader: a copy that fails its
    check is passed over for the next and reported to its site, which quarantines it; readers
    are not sent there again."""
    with Client(three.config("clinician")) as c:
        c.upload(corpus.fresh_instances(tmp_path / "src", 2), to="/reader")
        refs = {f[0]: (f[1], f[3]) for f in c.resolve(["/reader"])["files"]}
    path, (key, sites) = sorted(refs.items())[0]
    first = sites[0]                                         # the copy readers try first
    stored = object_path(three.root / f"store-{first}", key)
    damaged = bytearray(stored.read_bytes())
    damaged[len(damaged) // 2] ^= 0x01
    stored.write_bytes(bytes(damaged))
    with Client(three.config("researcher")) as r:
        out = r.download(["/reader"], tmp_path / "out")
        assert out.downloaded == 2 and not out.failed
        assert sorted(hashlib.sha256(f.read_bytes()).hexdigest() for f in (tmp_path / "out").rglob("*.dcm")) \
            == sorted(k for k, _ in refs.values())
        deadline = time.monotonic() + 10
        while dict(r.stat(path).replicas).get(first) != "quarantined":
            assert time.monotonic() < deadline, r.stat(path).replicas
            time.sleep(0.1)
        assert first not in r.resolve([path])["files"][0][3]     # not offered any more
        assert hashlib.sha256(r.read_file(path)).hexdigest() == key


def test_a_directory_wanting_more_copies_than_sites_fails_by_name(tmp_path: Path) -> None:
    fed = local.up(tmp_path / "fed", sites=("site-a",))
    try:
        with Client(fed.config("clinician")) as c:
            report = c.upload([corpus.file("CT_small.dcm")], to="/solo")
            assert report.uploaded == 1                                   # one site: one copy
            assert [s for s, _ in c.stat(c.ls("/solo")[0].path).replicas] == ["site-a"]
    finally:
        local.down(fed.root, quiet=True)


def _obj(fed: local.Federation, site: str, key: str) -> Path:
    return object_path(fed.root / f"store-{site}", key)


def test_fsck_finds_and_repairs_site_to_site(tmp_path: Path) -> None:
    fed = local.up(tmp_path / "fed", sites=("site-a", "site-b", "site-c"))
    try:
        with Client(fed.config("clinician")) as c:
            assert c.upload(corpus.fresh_instances(tmp_path, 8), to="/fs").uploaded == 8
            files = c.ls("/fs")
            copies = {st.path: [s for s, _ in c.stat(st.path).replicas] for st in files}
        # Damage: a byte flipped in one copy, another copy deleted, two files no record names.
        flip, gone = files[0], files[1]
        bad_site, lost_site = copies[flip.path][0], copies[gone.path][1]
        stored = _obj(fed, bad_site, flip.object_key or "")
        data = bytearray(stored.read_bytes())
        data[-100] ^= 0xFF
        stored.write_bytes(bytes(data))
        _obj(fed, lost_site, gone.object_key or "").unlink()
        old_orphan = _obj(fed, "site-c", "0" * 64)
        old_orphan.parent.mkdir(parents=True, exist_ok=True)
        old_orphan.write_bytes(b"left by an upload that died")
        os.utime(old_orphan, (time.time() - 7200, time.time() - 7200))
        young = _obj(fed, "site-c", "1" * 64)
        young.parent.mkdir(parents=True, exist_ok=True)
        young.write_bytes(b"an upload about to commit")

        check = _dgf(fed, "fsck")
        assert check.returncode == 6, check.stderr
        assert "1 corrupt copies (quarantined):" in check.stdout and f"{flip.path} at site {bad_site}" in check.stdout
        assert "1 missing copies:" in check.stdout and f"{gone.path} at site {lost_site}" in check.stdout
        assert "2 under-replicated:" in check.stdout and "2 orphans:" in check.stdout
        assert "8 objects, 16 copies checked" in check.stdout and "NOT whole" in check.stdout

        repaired = _dgf(fed, "fsck", "--repair")
        assert repaired.returncode == 0, repaired.stdout + repaired.stderr
        assert "2 copies made site to site:" in repaired.stdout and "1 orphans removed:" in repaired.stdout
        assert not old_orphan.exists() and young.exists()          # the young one may still commit
        with Client(fed.config("clinician")) as c:
            for st in (flip, gone):
                sites = [s for s, state in c.stat(st.path).replicas if state == "ok"]
                assert len(sites) == 2 and all(_obj(fed, s, st.object_key or "").is_file() for s in sites)
                assert hashlib.sha256(c.read_file(st.path)).hexdigest() == st.object_key
        again = _dgf(fed, "fsck")
        assert again.returncode == 0 and "1 orphans:" in again.stdout   # whole; the young orphan waits
        assert "under-replicated" not in again.stdout and "corrupt" not in again.stdout
        with Client(fed.config("admin")) as admin:
            actions = [e["action"] for e in admin.audit_log(100)]
            assert actions.count("replica.add") == 2 and "fsck.orphans" in actions
            # A damaged copy's record is dropped, unless the repair made the new copy right there.
            damaged = {(flip.path, bad_site), (gone.path, lost_site)}
            made_there = {line.strip().replace(" -> site ", "@") for line in repaired.stdout.splitlines()}
            assert actions.count("replica.drop") == sum(f"{p}@{s}" not in made_there for p, s in damaged)

        # A site lost for good: every file stays readable, and a repair restores two copies
        # from the survivors (the bytes go site to site).
        os.kill(int(local.status(fed.root)["processes"]["site-a"]["pid"]), signal.SIGKILL)  # type: ignore[index]
        with Client(fed.config("clinician")) as c:
            out = c.download(["/fs"], tmp_path / "out")
            assert out.downloaded == 8 and not out.failed
        healed = _dgf(fed, "fsck", "/fs", "--repair")
        assert "site site-a did not answer" in healed.stdout
        with Client(fed.config("clinician")) as c:
            for st in c.ls("/fs"):
                living = [s for s, state in c.stat(st.path).replicas if state == "ok" and s != "site-a"]
                assert len(living) == 2, st.path
        with Client(fed.config("researcher")) as r:
            with pytest.raises(errors.PermissionDenied):
                r.meta.call("admin.fsck.caps", sites=["site-b"])
    finally:
        local.down(fed.root, quiet=True)


def test_fsck_keeps_orphans_and_extra_copies_stored_again_after_it_looked(three: local.Federation,
                                                                        tmp_path: Path) -> None:
    # fsck lists an orphan (bytes no file records) or finds a copy too many, then removes it.
    # An upload of the same instance that stored those bytes again in between, to commit them,
    # lost them: the removal was unconditional.  Each removal now names the generation fsck
    # saw, and the site keeps bytes stored since.
    from dgf import fsck
    from ioserver.store import LocalObjectStore

    fed = three
    data = b"bytes an upload died before committing, " + os.urandom(16)
    key = hashlib.sha256(data).hexdigest()
    orphan = _obj(fed, "site-c", key)
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(data)
    os.utime(orphan, (time.time() - 7200, time.time() - 7200))
    site_c = LocalObjectStore(fed.root / "store-site-c")       # the site's own store, as a put uses it
    with Client(fed.config("admin")) as admin:
        caps = admin.meta.call("admin.fsck.caps", sites=["site-c"])[0]["caps"]

        def listed() -> fsck.FsckReport:
            report = fsck.FsckReport()
            fsck._orphans(admin, "site-c", caps["site-c"], report, threading.Lock())
            assert ("site-c", key) in report.orphan_gens
            return report

        report = listed()
        site_c.stamp(key)                                      # an upload stores it again
        fsck._remove_orphans(admin, report, 0, lambda _: None)
        assert orphan.exists() and ("site-c", key) not in report.removed
        assert any("stored again" in f for f in report.kept) and not report.failures
        report = listed()                                      # listed afresh, it goes
        fsck._remove_orphans(admin, report, 0, lambda _: None)
        assert not orphan.exists() and ("site-c", key) in report.removed

        with Client(fed.config("clinician")) as c:
            c.upload(corpus.fresh_instances(tmp_path, 1), to="/stored-again")
            [st] = c.ls("/stored-again")
        entries, sites = fsck._objects(admin, "/stored-again")
        e = entries[st.object_key or ""]
        held = sorted(e.recorded)
        assert len(held) == 2 and set(e.gens) == set(held)
        e.want, e.found = 1, {s: "ok" for s in held}
        for site in held:                                      # stored again at both sites
            LocalObjectStore(fed.root / f"store-{site}").stamp(e.key)
        report = fsck.FsckReport()
        fsck._trim(admin, entries, sites, report, lambda _: None)
        assert report.trimmed == [] and all(_obj(fed, s, e.key).exists() for s in held)
        assert any("stored again" in f for f in report.kept) and not report.failures


def _dgf(fed: local.Federation, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DGF_CONFIG=str(fed.config("admin")))
    return subprocess.run([str(Path(sys.executable).parent / "dgf"), *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_sites_scrub_in_the_background(tmp_path: Path) -> None:
    """A byte flipped on a site's disk is found by the site itself, without any read: the copy
    is quarantined, readers go to the other copy, and fsck --repair makes a new one."""
    fed = local.up(tmp_path / "fed", limits={"scrub_mb_s": "200", "scrub_pause_s": "0.3"})
    try:
        with Client(fed.config("clinician")) as c:
            c.upload(corpus.fresh_instances(tmp_path, 1), to="/scrub")
            st = c.ls("/scrub")[0]
            stored = _obj(fed, "site-b", st.object_key or "")
            data = bytearray(stored.read_bytes())
            data[len(data) // 2] ^= 0x01
            stored.write_bytes(bytes(data))
            deadline = time.monotonic() + 20
            while ("site-b", "quarantined") not in c.stat(st.path).replicas and time.monotonic() < deadline:
                time.sleep(0.2)
            assert c.stat(st.path).replicas == (("site-a", "ok"), ("site-b", "quarantined"))
            assert not stored.exists()
            assert hashlib.sha256(c.read_file(st.path)).hexdigest() == st.object_key
        assert "1 corrupt" in (fed.root / "logs" / "site-b.log").read_text()
        repaired = _dgf(fed, "fsck", "--repair")
        assert repaired.returncode == 0 and "1 copies made site to site" in repaired.stdout, repaired.stdout
        with Client(fed.config("clinician")) as c:
            assert c.stat(st.path).replicas == (("site-a", "ok"), ("site-b", "ok")) and stored.is_file()
    finally:
        local.down(fed.root, quiet=True)


def test_drain_moves_everything_off_a_site_while_reads_go_on(tmp_path: Path) -> None:
    fed = local.up(tmp_path / "fed", sites=("site-a", "site-b", "site-c"))
    try:
        with Client(fed.config("admin")) as admin:
            admin.mkdir("/single")
            admin.meta.call("admin.replicas.set", path="/single", copies=1)
        with Client(fed.config("clinician")) as c:
            c.upload(corpus.fresh_instances(tmp_path, 12), to="/d")
            (tmp_path / "one").mkdir()
            c.upload(corpus.fresh_instances(tmp_path / "one", 4), to="/single", site="site-a")   # only copies, on site-a
            paths = [st.path for st in c.ls("/d") + c.ls("/single")]
            held = [p for p in paths if "site-a" in dict(c.stat(p).replicas)]
        assert held, "site-a holds nothing to drain"
        # Removing a site that holds an only copy is refused.
        refused = _dgf(fed, "admin", "site", "remove", "site-a")
        assert refused.returncode == 4 and "holds the only sound copy of 4 object(s)" in refused.stderr
        # A reader downloads everything over and over while site-a drains.
        stop, errors_seen, rounds = threading.Event(), [], []

        def reader() -> None:
            with Client(fed.config("researcher")) as r:
                while not stop.is_set():
                    out = r.download(["/d", "/single"], tmp_path / f"read{len(rounds)}")
                    errors_seen.extend(f.reason for f in out.failed)
                    rounds.append(out.downloaded)

        t = threading.Thread(target=reader)
        t.start()
        try:
            drained = _dgf(fed, "admin", "site", "drain", "site-a")
        finally:
            stop.set()
            t.join()
        assert drained.returncode == 0, drained.stdout + drained.stderr
        assert f"{len(held)} object(s) moved" in drained.stdout and "0 stay" in drained.stdout
        assert not errors_seen and rounds and all(n == len(paths) for n in rounds)
        assert not [p for p in (fed.root / "store-site-a" / "objects").rglob("*") if p.is_file()]
        listed = _dgf(fed, "admin", "site", "list")
        assert "site-a" in listed.stdout and "draining" in listed.stdout
        with Client(fed.config("clinician")) as c:
            for p in paths:
                sites = [s for s, state in c.stat(p).replicas if state == "ok"]
                assert "site-a" not in sites and len(sites) == (1 if p.startswith("/single") else 2)
            (tmp_path / "new").mkdir()
            c.upload(corpus.fresh_instances(tmp_path / "new", 4), to="/after")           # nothing new goes to site-a
            assert all("site-a" not in dict(c.stat(st.path).replicas) for st in c.ls("/after"))
        removed = _dgf(fed, "admin", "site", "remove", "site-a")
        assert removed.returncode == 0 and "site site-a removed" in removed.stdout
        assert "site-a" not in _dgf(fed, "admin", "site", "list").stdout
        assert _dgf(fed, "fsck").returncode == 0
    finally:
        local.down(fed.root, quiet=True)


def test_backup_online_and_a_restore_drill(tmp_path: Path) -> None:
    import sqlite3

    fed = local.up(tmp_path / "fed")
    try:
        with Client(fed.config("clinician")) as c:
            (tmp_path / "a").mkdir()
            c.upload(corpus.fresh_instances(tmp_path / "a", 3), to="/before")
            before = {st.path: st.object_key for st in c.ls("/before")}
        backup = tmp_path / "meta-backup.db"
        done = _dgf(fed, "admin", "backup", str(backup))
        assert done.returncode == 0 and "backed up the metadata" in done.stdout, done.stderr
        assert _dgf(fed, "admin", "backup", str(backup)).returncode == 3        # never overwritten
        with Client(fed.config("admin")) as admin:
            assert any(e["action"] == "backup" for e in admin.audit_log(20))
        with sqlite3.connect(backup) as db:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            # Identity stays sealed: no patient value in the copy (the vault key is not in it).
            assert b"CompressedSamples" not in backup.read_bytes()
        with Client(fed.config("clinician")) as c:
            (tmp_path / "b").mkdir()
            c.upload(corpus.fresh_instances(tmp_path / "b", 2), to="/after")
            after = [st.object_key for st in c.ls("/after")]
        # Restore: stop, put the copy in place of the database, start.
        local.down(fed.root)
        (fed.root / "metadata.db").unlink()
        for extra in ("metadata.db-wal", "metadata.db-shm"):
            (fed.root / extra).unlink(missing_ok=True)
        backup.rename(fed.root / "metadata.db")
        local.up(fed.root)
        with Client(fed.config("clinician")) as c:
            assert {st.path: st.object_key for st in c.ls("/before")} == before
            for path, key in before.items():
                assert hashlib.sha256(c.read_file(path)).hexdigest() == key
            with pytest.raises(errors.NotFound):
                c.stat("/after")
        # What was written after the backup is found, as orphans, on every site.
        check = _dgf(fed, "fsck")
        assert check.returncode == 0 and f"{2 * len(after)} orphans:" in check.stdout, check.stdout
        # ... and adopted back, on the sites' signed receipts and the headers they build: each
        # object becomes a file under /lost+found once, its other copy is recorded.
        adopted = _dgf(fed, "fsck", "--adopt", "--repair", "--grace", "0")
        assert adopted.returncode == 0, adopted.stdout + adopted.stderr
        assert f"{len(after)} orphans adopted as files" in adopted.stdout, adopted.stdout
        assert f"{len(after)} orphans adopted as copies of known objects" in adopted.stdout
        assert "orphans removed" not in adopted.stdout
        with Client(fed.config("clinician")) as c:
            found = [r["path"] for r in c.find("/DicomHeader", "/lost+found")]
            assert len(found) == len(after)
            keys = sorted(c.stat(p).object_key or "" for p in found)
            assert keys == sorted(after)
            for p in found:
                assert len([s for s, state in c.stat(p).replicas if state == "ok"]) == 2
                assert hashlib.sha256(c.read_file(p)).hexdigest() == c.stat(p).object_key
            with pytest.raises(errors.NotFound, match="no identity"):
                c.read_file(found[0], identified=True)       # it was only ever on the metaserver
        with Client(fed.config("admin")) as admin:
            assert sum(e["action"] == "object.adopt" for e in admin.audit_log(50)) == len(after)
        clean = _dgf(fed, "fsck")
        assert clean.returncode == 0 and "orphans" not in clean.stdout, clean.stdout
    finally:
        local.down(fed.root, quiet=True)


def test_two_metaservers_over_one_postgresql(postgres: PostgresServer, tmp_path: Path) -> None:
    """No metaserver assumes it is alone: what one changes the other serves (the directory map
    included), and when one dies the other goes on."""
    fed = local.up(tmp_path / "fed", db=postgres.create_database("twometa"))
    second: subprocess.Popen[bytes] | None = None
    try:
        conf = fed.root / "metaserver-2.conf"
        conf.write_text((fed.root / "metaserver.conf").read_text().replace(
            f"listen = {fed.metaserver}", "listen = 127.0.0.1:0"))
        ready = fed.root / "metaserver-2.addr"
        with open(fed.root / "logs" / "metaserver-2.log", "ab") as log:
            second = subprocess.Popen([sys.executable, "-m", "metaserver.server", "serve", "--config", str(conf),
                                       "--ready-file", str(ready)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        other = ready.read_text().strip()
        for who in ("clinician", "researcher", "admin"):
            (fed.root / f"{who}-2.conf").write_text(fed.config(who).read_text().replace(fed.metaserver, other))
        (tmp_path / "src").mkdir()
        with Client(fed.config("clinician")) as a, Client(fed.root / "clinician-2.conf") as b:
            a.upload(corpus.fresh_instances(tmp_path / "src", 4), to="/pg/first")
            assert len(b.ls("/pg/first")) == 4                            # written at A, read at B
            for c in (a, b):                     # both build their directory maps now
                found = c.find("/DicomHeader[Modality='CT']", "/pg")
                assert len(found) == 4 and all(r["path"].startswith("/pg/first/") for r in found)
            b.mv("/pg/first", "/pg/renamed")                             # the tree changes at B ...
            paths = sorted(r["path"] for r in a.find("/DicomHeader[Modality='CT']", "/pg"))
            assert len(paths) == 4 and all(p.startswith("/pg/renamed/") for p in paths), paths  # ... A knows
            b.save_query("pg-ct", "/DicomHeader[Modality='CT']")
            assert "clinician/pg-ct" in a.saved_queries()
        # A client that names both (metaserver = A, B) and holds its session across the death of
        # the one it talks to: its next call goes to the other, and reads and writes go on.
        both = fed.root / "clinician-both.conf"
        both.write_text(fed.config("clinician").read_text().replace(fed.metaserver, f"{fed.metaserver}, {other}"))
        with Client(both) as c:
            assert len(c.ls("/pg/renamed")) == 4                           # through A
            os.kill(fed.pids["metaserver"], signal.SIGKILL)
            deadline = time.monotonic() + 10
            while c.meta.conn.alive:                         # the session notices the peer is gone
                assert time.monotonic() < deadline
                time.sleep(0.05)
            out = c.download(["/pg/renamed"], tmp_path / "out")
            assert out.downloaded == 4 and not out.failed
            assert "{}:{}".format(*c.meta.conn.address) == other
            (tmp_path / "more").mkdir()
            assert c.upload(corpus.fresh_instances(tmp_path / "more", 2), to="/pg/later").uploaded == 2
        with Client(both) as c:                                  # a new session skips the dead one
            assert len(c.find("/DicomHeader", "/pg")) == 6
    finally:
        if second is not None:
            second.kill()
            second.wait()
        local.down(fed.root, quiet=True)


def test_copies_go_to_distinct_zones(tmp_path: Path) -> None:
    zones = {"site-a": "east", "site-b": "east", "site-c": "west", "site-d": "west"}
    assert placement.choose("x", list(zones), 2, zones=zones) in (["site-a", "site-c"], ["site-b", "site-c"],
                                                                  ["site-c", "site-a"], ["site-d", "site-a"])
    for basis in ("1", "2", "3", "4", "5"):
        two = placement.choose(basis, list(zones), 2, zones=zones)
        assert {zones[s] for s in two} == {"east", "west"}
        three = placement.choose(basis, list(zones), 3, zones=zones)
        assert len(set(three)) == 3                                    # zones run out: sites still distinct
    assert placement.choose("x", ["site-b", "site-c", "site-d"], 1, zones=zones, avoid=["site-a"])[0] != "site-b"
    fed = local.up(tmp_path / "fed", sites=tuple(zones), zones=zones)
    try:
        with Client(fed.config("admin")) as admin:
            assert {s.name: s.zone for s in admin.sites()} == zones
        with Client(fed.config("clinician")) as c:
            assert c.upload(corpus.fresh_instances(tmp_path, 10), to="/z").uploaded == 10
            for st in c.ls("/z"):
                held = [s for s, _ in c.stat(st.path).replicas]
                assert len(held) == 2 and {zones[s] for s in held} == {"east", "west"}, held
        # A zone lost: every file is still readable from the other.
        for site in ("site-c", "site-d"):
            os.kill(int(local.status(fed.root)["processes"][site]["pid"]), signal.SIGKILL)  # type: ignore[index]
        with Client(fed.config("clinician")) as c:
            out = c.download(["/z"], tmp_path / "out")
            assert out.downloaded == 10 and not out.failed
    finally:
        local.down(fed.root, quiet=True)


def test_async_replication_publishes_on_one_copy_and_the_sites_catch_up(tmp_path: Path) -> None:
    """'dgf admin replicas mode async': a file is published on one durable copy and shows as
    under-replicated; the sites copy it site to site in the background.  Uploads go on while a
    site is down, and the site catches up when it returns."""
    fed = local.up(tmp_path / "fed", limits={"repair_interval_s": "0.3"})
    try:
        assert "replication: sync" in _dgf(fed, "admin", "replicas", "mode").stdout
        assert _dgf(fed, "admin", "replicas", "mode", "async").returncode == 0

        def copies(c: Client, path: str) -> list[str]:
            return sorted(site for site, state in c.stat(path).replicas if state == "ok")

        def settled(c: Client, paths: list[str], timeout: float = 30) -> None:
            deadline = time.monotonic() + timeout
            while any(len(copies(c, p)) < 2 for p in paths):
                assert time.monotonic() < deadline, {p: copies(c, p) for p in paths}
                time.sleep(0.2)

        with Client(fed.config("clinician")) as c:
            report = c.upload(corpus.fresh_instances(tmp_path / "a", 4), to="/async/a")
            assert report.uploaded == 4 and not report.failed
            first = [st.path for st in c.ls("/async/a")]
            settled(c, first)                                    # the sites made the second copies
            os.kill(fed.pids["site-b"], signal.SIGKILL)
            later = c.upload(corpus.fresh_instances(tmp_path / "b", 3), to="/async/b")
            assert later.uploaded == 3 and not later.failed      # sync would refuse these
            second = [st.path for st in c.ls("/async/b")]
            assert all(copies(c, p) == ["site-a"] for p in second)
        shown = json.loads(_dgf(fed, "stat", second[0]).stdout)
        assert shown["under_replicated"] is True and shown["copies_wanted"] == 2
        fed = local.up(fed.root)                                 # site-b returns ...
        with Client(fed.config("clinician")) as c:
            settled(c, second)                                   # ... and catches up
        os.kill(fed.pids["site-a"], signal.SIGKILL)              # now the other copies alone serve
        with Client(fed.config("researcher")) as r:
            out = r.download(["/async"], tmp_path / "out")
        assert out.downloaded == 7 and not out.failed, out.failed
        audit = _dgf(fed, "admin", "audit", "--limit", "200").stdout
        assert audit.count("replica.add") >= 7 and "site-b" in audit
    finally:
        local.down(fed.root, quiet=True)


def test_a_copy_whose_site_is_down_goes_to_another_site(tmp_path: Path) -> None:
    """Synchronous replication with a site down and a spare left: the copies placed on the dead
    site are sent to the spare, so every upload still has its two durable copies."""
    fed = local.up(tmp_path / "fed", sites=("site-a", "site-b", "site-c"))
    try:
        os.kill(fed.pids["site-c"], signal.SIGKILL)
        with Client(fed.config("clinician")) as c:
            report = c.upload(corpus.fresh_instances(tmp_path / "src", 8), to="/spare")
            assert report.uploaded == 8 and not report.failed, report.failed
            held = [sorted(s for s, state in c.stat(st.path).replicas if state == "ok") for st in c.ls("/spare")]
        assert all(h == ["site-a", "site-b"] for h in held), held
    finally:
        local.down(fed.root, quiet=True)


def test_async_copies_go_around_a_site_that_is_gone(tmp_path: Path) -> None:
    """Background replication with a site down for good: copies whose placement named that site
    go to the sites still asking for work."""
    fed = local.up(tmp_path / "fed", sites=("site-a", "site-b", "site-c"), limits={"repair_interval_s": "0.3"})
    try:
        assert _dgf(fed, "admin", "replicas", "mode", "async").returncode == 0
        os.kill(fed.pids["site-c"], signal.SIGKILL)
        with Client(fed.config("clinician")) as c:
            report = c.upload(corpus.fresh_instances(tmp_path / "src", 8), to="/around")
            assert report.uploaded == 8 and not report.failed
            paths = [st.path for st in c.ls("/around")]
            deadline = time.monotonic() + 30
            while True:
                held = [sorted(s for s, state in c.stat(p).replicas if state == "ok") for p in paths]
                if all(len(h) == 2 for h in held):
                    break
                assert time.monotonic() < deadline, held
                time.sleep(0.3)
        assert all("site-c" not in h for h in held)
    finally:
        local.down(fed.root, quiet=True)
