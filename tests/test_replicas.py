"""Replicas: how many copies, where, and what the metaserver accepts (issue 14)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pydicom
import pytest
from pydicom.uid import generate_uid

from dgf import errors, local, placement
from dgf.client import Client
from tests import corpus


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


def _fresh(tmp: Path, n: int) -> list[Path]:
    """``n`` real CT files, each its own instance and series (nothing is a link to another)."""
    out = []
    for i in range(n):
        ds = pydicom.dcmread(corpus.file("CT_small.dcm"))
        ds.SOPInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.save_as(tmp / f"f{i}.dcm")
        out.append(tmp / f"f{i}.dcm")
    return out


def _stored(fed: local.Federation, key: str) -> list[str]:
    return [site for site in fed.sites
            if (fed.root / f"store-{site}" / "objects" / key[:2] / key[2:4] / key).is_file()]


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
            files = _fresh(tmp_path / where.replace("/", "_"), 6)
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
                batch = json.loads(payload)
                for f in batch["files"]:
                    f["copies"] = []
                payload = json.dumps(batch).encode()
                sent.append(payload)
            return original(verb, payload, wait_s, **args)

        c.meta.call = strip_copies  # type: ignore[method-assign]
        with pytest.raises(errors.UsageError, match="has 1 durable copy; its directory keeps 2"):
            c.upload(_fresh(tmp_path, 1), to="/forged")
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
    return fed.root / f"store-{site}" / "objects" / key[:2] / key[2:4] / key


def test_fsck_finds_and_repairs_site_to_site(tmp_path: Path) -> None:
    fed = local.up(tmp_path / "fed", sites=("site-a", "site-b", "site-c"))
    try:
        with Client(fed.config("clinician")) as c:
            assert c.upload(_fresh(tmp_path, 8), to="/fs").uploaded == 8
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
            assert actions.count("replica.add") == 2 and "replica.drop" in actions and "fsck.orphans" in actions

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
            c.upload(_fresh(tmp_path, 1), to="/scrub")
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
